"""Request limits (issue 16, item 2): every bound is checked before any work, names the figure and the limit, and can
be raised on purpose (``pipe.limits`` / ``--request-limit``)."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
import pytest

from infinitystar import pipeline as pipeline_module
from infinitystar.config import ConfigError, RequestLimits, get_preset, replace
from infinitystar.media import MediaError, write_image
from infinitystar.pipeline import InfinityStarPipeline

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPT = "a red ball bounces"


@pytest.fixture(scope="module")
def pipe() -> InfinityStarPipeline:
    return InfinityStarPipeline.from_preset(get_preset("pipeline", "tiny-test"), seed=0)


@pytest.fixture(autouse=True)
def default_limits(pipe):
    pipe.limits = RequestLimits()
    yield


def _no_work(monkeypatch):
    """Fail the test if the generation loop is reached: a refusal must come before any work."""
    def boom(*_a, **_k):
        raise AssertionError("the request reached the generation loop")
    monkeypatch.setattr(pipeline_module, "generate_codes", boom)


def test_lengths_over_the_limit_are_refused_before_work(pipe, monkeypatch):
    _no_work(monkeypatch)
    with pytest.raises(ValueError, match=r"seconds must be a finite number >= 0, got inf"):
        pipe(PROMPT, seconds=float("inf"))
    with pytest.raises(ValueError, match=r"seconds must be a finite number >= 0, got nan"):
        pipe(PROMPT, seconds=float("nan"))
    with pytest.raises(ValueError, match=r"16000000001 frames .* over the limit of 2001 frames.*"
                                         r"--request-limit max_frames=N"):
        pipe(PROMPT, seconds=1e9)
    pipe.limits = replace(pipe.limits, max_frames=5)
    with pytest.raises(ValueError, match=r"^9 frames \(0.5 s at 16 fps\) is over the limit of 5 frames"):
        pipe(PROMPT, num_frames=9)


def test_a_raised_limit_allows_the_request(pipe):
    pipe.limits = replace(pipe.limits, max_frames=5)
    assert pipe(PROMPT, num_frames=5, seed=0, progress=False).frames.shape[0] == 5


def test_prompt_videos_and_segments(pipe, monkeypatch):
    _no_work(monkeypatch)
    with pytest.raises(ValueError, match=r"the prompt has 4001 characters; the limit is 4000"):
        pipe("a" * 4001)
    pipe.limits = replace(pipe.limits, max_videos=3)
    with pytest.raises(ValueError, match=r"4 videos in one call; the limit is 3"):
        pipe([PROMPT, PROMPT], num_videos_per_prompt=2)
    story = InfinityStarPipeline.from_preset(get_preset("pipeline", "tiny-test-interactive"), seed=0)
    story.limits = replace(story.limits, max_segments=2)
    with pytest.raises(ValueError, match=r"an interactive story of 3 segments is over the limit of 2"):
        story.interactive([PROMPT, "it rolls", "it stops"])


def _png_header_only(path: Path, width: int, height: int) -> Path:
    """A tiny png file whose header claims ``width`` x ``height`` (a decompression bomb as far as sizes go)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64))
                     + chunk(b"IEND", b""))
    return path


def test_uploads_over_the_limits_are_refused_unread(pipe, tmp_path, monkeypatch):
    _no_work(monkeypatch)
    bomb = _png_header_only(tmp_path / "bomb.png", 12000, 12000)  # 144 MP a frame, 100 bytes on disk
    with pytest.raises(MediaError, match=r"image bomb.png is 12000x12000 = 144 megapixels a frame; the limit is 64"):
        pipe(PROMPT, image=str(bomb), num_frames=5)
    small = tmp_path / "small.png"
    write_image(np.zeros((100, 100, 3), np.uint8), small)
    pipe.limits = replace(pipe.limits, max_upload_pixels=5000)
    with pytest.raises(MediaError, match=r"100x100 = 0 megapixels .*max_upload_pixels"):
        pipe(PROMPT, image=str(small), num_frames=5)
    pipe.limits = replace(pipe.limits, max_upload_bytes=10)
    with pytest.raises(MediaError, match=r"image file small.png is 0.0 MiB; the limit is 0 MiB .*max_upload_bytes"):
        pipe(PROMPT, image=str(small), num_frames=5)


def test_working_memory_is_checked_against_the_device(pipe, monkeypatch):
    monkeypatch.setattr(pipeline_module, "available_memory", lambda _device: 1 << 20)
    _no_work(monkeypatch)
    with pytest.raises(MemoryError, match=r"this request needs about \d+\.\d GiB of working memory on cpu and 0\.0 "
                                          r"GiB is free"):
        pipe(PROMPT, num_frames=5)
    pipe.limits = replace(pipe.limits, check_memory=False)
    with pytest.raises(AssertionError, match="reached the generation loop"):  # no longer refused
        pipe(PROMPT, num_frames=5)


def test_limit_overrides_parse_and_validate():
    limits = RequestLimits().with_overrides(["max_frames=81", "check-memory=false"])
    assert limits.max_frames == 81 and limits.check_memory is False
    with pytest.raises(ConfigError, match="NAME one of max_frames"):
        RequestLimits().with_overrides(["frames=3"])
    with pytest.raises(ConfigError, match="max_frames must be an integer"):
        RequestLimits().with_overrides(["max_frames=lots"])
    with pytest.raises(ConfigError, match=r"limits.max_segments must be an integer >= 1, got 0"):
        RequestLimits(max_segments=0)

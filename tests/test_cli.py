"""The ``infinitystar generate`` / ``interactive`` commands: files that read back, and exit code 2 on bad input.

Runs in-process through ``infinitystar.cli.main`` on the tiny-test preset (random weights), plus one
subprocess run of the installed console script to prove the entry point.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from infinitystar import media
from infinitystar.cli import main
from infinitystar.config import get_preset
from infinitystar.pipeline import InfinityStarPipeline

SIZE = 96
FPS = 16
# Two-latent-frame clips: a segment / clip is 8 frames, so interactive and extension runs stay short.
SHORT_CLIPS = dataclasses.replace(get_preset("pipeline", "tiny-test"), name="tiny-short-clips", frames_inner_clip=2)
CONSOLE_SCRIPT = Path(sys.executable).parent / "infinitystar"


@pytest.fixture(autouse=True)
def _threads():
    # Tiny models on a shared 2-core machine: one intra-op thread is much faster than two that wait on each other.
    torch.set_num_threads(1)
    yield


@pytest.fixture(scope="module")
def short_model(tmp_path_factory) -> Path:
    """A saved pipeline folder (our layout) with 2-latent-frame clips, for --model."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("model") / "tiny-short-clips"
    InfinityStarPipeline.from_preset(SHORT_CLIPS, seed=0).save_pretrained(root)
    return root


def _run(argv: list[str], capsys) -> tuple[int, str, str]:
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _check_video(path: Path, frames: int) -> None:
    info = media.probe_video(path)
    assert (info.width, info.height) == (SIZE, SIZE)
    assert info.fps == pytest.approx(FPS)
    decoded, fps = media.read_video(path)
    assert decoded.shape == (frames, SIZE, SIZE, 3)
    assert fps == pytest.approx(FPS)


def test_generate_video_writes_an_mp4_that_reads_back(tmp_path, capsys):
    out = tmp_path / "clip.mp4"
    code, stdout, err = _run(["generate", "a red ball", "--preset", "tiny-test", "--frames", "17", "-o", str(out),
                              "--seed", "3", "--quiet"], capsys)
    assert code == 0, err
    assert f"wrote {out} (17 frames, 96x96" in stdout
    assert "RANDOM weights" in err
    _check_video(out, 17)


def test_generate_image_writes_a_png(tmp_path, capsys):
    out = tmp_path / "still.png"
    code, stdout, err = _run(["generate", "a red ball", "--preset", "tiny-test", "--frames", "1", "-o", str(out),
                              "--quiet"], capsys)
    assert code == 0, err
    with Image.open(out) as img:
        assert img.format == "PNG" and img.size == (SIZE, SIZE)


# The 17-frame file is read back as exactly its 17 frames: no "using the first ..." / "only whole clips" warning.
@pytest.mark.filterwarnings("error:the conditioning video:UserWarning")
def test_generate_image_to_video_and_extension(tmp_path, capsys, short_model):
    first = tmp_path / "first.png"
    Image.fromarray(np.full((SIZE, SIZE, 3), (200, 40, 40), dtype=np.uint8)).save(first)
    i2v = tmp_path / "i2v.mp4"
    code, _, err = _run(["generate", "a red ball", "--model", str(short_model), "--image", str(first), "--frames",
                         "17", "-o", str(i2v), "--quiet"], capsys)
    assert code == 0, err
    _check_video(i2v, 17)
    # Extend the 17-frame video (2 whole clips) by one clip.
    ext = tmp_path / "ext.mp4"
    code, _, err = _run(["generate", "the ball keeps rolling", "--model", str(short_model), "--video", str(i2v),
                         "--frames", "25", "-o", str(ext), "--quiet"], capsys)
    assert code == 0, err
    _check_video(ext, 25)


def test_interactive_writes_an_mp4(tmp_path, capsys, short_model):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red ball on the floor\n\nthe ball rolls away\n", encoding="utf-8")
    out = tmp_path / "story.mp4"
    code, stdout, err = _run(["interactive", str(prompts), "--model", str(short_model), "-o", str(out),
                              "--save-segments", "--quiet"], capsys)
    assert code == 0, err
    assert "2 segments, 17 frames" in stdout  # segment 0 = 1 + 8 frames, then one 8-frame clip
    _check_video(out, 17)
    _check_video(tmp_path / "story_0000.mp4", 9)
    _check_video(tmp_path / "story_0001.mp4", 8)


@pytest.mark.parametrize(
    ("args", "output", "message"),
    [
        (["generate", "a red ball", "--frames", "10"], "x.mp4", "num_frames must be 1 (an image) or 1 + 4k, got 10"),
        (["generate", "a red ball", "--frames", "17"], "x.png", "must end in .mp4"),
        (["generate", "a red ball", "--frames", "1"], "x.mp4", "must end in .png"),
        (["generate", "", "--frames", "5"], "x.mp4", "prompt must be a non-empty string"),
        (["generate", "a red ball", "--guidance", "0.5"], "x.mp4", "guidance_scale must be >= 1"),
        (["generate", "a red ball", "--resolution", "720p"], "x.mp4", "resolution '720p' is not available"),
        (["generate", "a red ball", "--image", "missing.png"], "x.mp4", "--image missing.png: no such file"),
        (["generate", "a red ball", "--aspect", "banana"], "x.mp4", "banana"),
    ],
    ids=["frames-not-1+4k", "video-to-png", "image-to-mp4", "empty-prompt", "guidance-below-1",
         "resolution-not-in-preset", "missing-image", "bad-aspect"],
)
def test_generate_bad_input_exits_2_and_writes_nothing(tmp_path, capsys, monkeypatch, args, output, message):
    monkeypatch.chdir(tmp_path)
    code, stdout, err = _run([*args, "--preset", "tiny-test", "-o", output, "--quiet"], capsys)
    assert code == 2
    assert "infinitystar generate: error:" in err and message in err, err
    assert list(tmp_path.iterdir()) == []


def test_bad_model_folder_and_corrupt_image(tmp_path, capsys):
    out = tmp_path / "x.mp4"
    code, _, err = _run(["generate", "a red ball", "--model", str(tmp_path / "no_model"), "-o", str(out)], capsys)
    assert code == 2 and "no_model does not exist" in err
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not an image at all")
    code, _, err = _run(["generate", "a red ball", "--preset", "tiny-test", "--image", str(bad), "--frames", "5",
                         "-o", str(out), "--quiet"], capsys)
    assert code == 2 and "broken.png" in err
    assert not out.exists()


def test_interactive_bad_input(tmp_path, capsys):
    out = tmp_path / "story.mp4"
    code, _, err = _run(["interactive", str(tmp_path / "none.txt"), "-o", str(out)], capsys)
    assert code == 2 and "none.txt does not exist" in err
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n", encoding="utf-8")
    code, _, err = _run(["interactive", str(empty), "-o", str(out)], capsys)
    assert code == 2 and "holds no prompt" in err
    prompts = tmp_path / "p.txt"
    prompts.write_text("a\nb\n", encoding="utf-8")
    code, _, err = _run(["interactive", str(prompts), "-o", str(tmp_path / "story.gif"), "--preset", "tiny-test"],
                        capsys)
    assert code == 2 and "story.gif must end in .mp4" in err
    assert not out.exists() and not (tmp_path / "story.gif").exists()


def test_argparse_rejects_unknown_resolution(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["generate", "a red ball", "--resolution", "360p"])
    assert exc.value.code == 2
    assert "360p" in capsys.readouterr().err


def test_console_script_entry_point(tmp_path):
    """The installed ``infinitystar`` script runs ``generate`` end to end in a fresh process."""
    assert CONSOLE_SCRIPT.is_file(), f"console script {CONSOLE_SCRIPT} is not installed (pip install -e .)"
    out = tmp_path / "x.mp4"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([str(CONSOLE_SCRIPT), "generate", "a red ball", "--preset", "tiny-test", "--frames", "5",
                           "-o", str(out), "--quiet"], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    _check_video(out, 5)
    bad = subprocess.run([str(CONSOLE_SCRIPT), "generate", "a red ball", "--preset", "tiny-test", "--frames", "6",
                          "-o", str(tmp_path / "y.mp4"), "--quiet"], capture_output=True, text=True, env=env,
                         timeout=300)
    assert bad.returncode == 2 and "got 6" in bad.stderr
    assert not (tmp_path / "y.mp4").exists()

"""Parity of the conditioning front end with the reference (golden README section 14, ``frontend/<case>``).

Every case folder under golden/frontend/ is one test id, and every video and image its config lists is checked:

* the frames that condition video extension (``get_clip(0, 5, 81)`` of ``tools/infer_video_480p.py``) and the
  interactive reference clip (``get_clip(duration - 5, duration, 81)`` of ``tools/infer_interact_480p.py``), read
  through our production functions (``pipeline.extension_frames`` for a 10 s output, the length the reference's
  extension script makes; ``pipeline.interactive_reference_frames``) from the stored mp4. The source frame of each
  delivered frame is read back from its pixels (frame i shows the bits of i as 8 vertical stripes), so the test
  checks the frames actually delivered, not only an index list;
* the interactive size template (nearest the decoded frame's own h/w) with its last scale and pixel size, and the
  extension template (nearest 0.571 whatever the video);
* the image transform (LANCZOS cover resize, centre crop, [-1, 1]) for every target, atol 1e-6.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import golden_cases
from infinitystar import media
from infinitystar.config import get_preset
from infinitystar.generation import schedules
from infinitystar.generation.plan import interactive_size, resolve_size
from infinitystar.pipeline import extension_frames, interactive_reference_frames

# golden README 14: "transform output atol 1e-6" (computed from uint8 with PIL's LANCZOS; ours uses the same).
TRANSFORM_ATOL = 1e-6
# The presets of the two reference scripts: extension = tools/infer_video_480p.py, interactive =
# tools/infer_interact_480p.py (both 16 fps, 20-latent clips: 1 + 80 frames = 5 s).
EXTENSION_PRESET = "official-480p"
INTERACTIVE_PRESET = "interactive-480p"

CASES = golden_cases("frontend")


def _config(case_dir: Path) -> dict:
    return json.loads((case_dir / "config.json").read_text())


def _videos() -> list[tuple[Path, str, dict]]:
    return [(case, name, video) for case in CASES
            for name, video in _config(case)["cases"]["frontend"]["videos"].items()]


VIDEOS = _videos()
VIDEO_IDS = [f"{case.name}/{name}" for case, name, _ in VIDEOS]


def source_frame_numbers(frames_THW3: np.ndarray) -> list[int]:
    """The frame number each decoded frame shows: stripe b (width W//8 from the left, in the middle half of the
    rows) is white if bit b is set. Each stripe's centre half must be clearly black or white (the video is
    lossless; only 4:2:0 chroma can blur stripe edges), so a frame can never be misread as another."""
    _, h, w, _ = frames_THW3.shape
    sw = w // 8
    numbers = []
    for frame in frames_THW3.astype(np.float64):
        band = frame[h // 4: 3 * h // 4]
        n = 0
        for b in range(8):
            level = band[:, b * sw + sw // 4: b * sw + 3 * sw // 4].mean()
            assert level < 64 or level > 192, f"stripe {b} is neither black nor white (mean {level:.1f})"
            n |= int(level > 128) << b
        numbers.append(n)
    return numbers


def test_cases_exist():
    assert CASES, "no golden frontend case found"
    assert VIDEOS, "the frontend cases list no video"


@pytest.mark.parametrize(("case_dir", "name", "video"), VIDEOS, ids=VIDEO_IDS)
def test_frame_count_and_rate_as_the_reference_readers_see_them(case_dir, name, video):
    for decoder in ("extension_decoder", "interactive_decoder"):
        num_frames, fps = media.count_video_frames(case_dir / video["file"])
        assert (num_frames, fps) == (video[decoder]["num_frames"], video[decoder]["fps"]), f"{name} ({decoder})"


@pytest.mark.parametrize(("case_dir", "name", "video"), VIDEOS, ids=VIDEO_IDS)
def test_extension_frames_match_the_reference(case_dir, name, video):
    cfg = get_preset("pipeline", EXTENSION_PRESET)
    want = video["extension_source_frame_indices"]
    # The reference's extension makes 10 s (161 frames): the first frame and two clips. A 10 s input keeps only its
    # first 5 s, like any other (golden: all indices < 5 s * fps).
    total_latents = 1 + 2 * cfg.frames_inner_clip
    frames = extension_frames(cfg, case_dir / video["file"], total_latents)
    assert frames.shape == (len(want), video["height"], video["width"], 3)
    got = source_frame_numbers(frames)
    differ = sum(g != w for g, w in zip(got, want, strict=True))
    assert got == want, f"{name}: {differ} of {len(want)} conditioning frames differ from the reference's"


@pytest.mark.parametrize(("case_dir", "name", "video"), VIDEOS, ids=VIDEO_IDS)
def test_interactive_reference_frames_match_the_reference(case_dir, name, video):
    cfg = get_preset("pipeline", INTERACTIVE_PRESET)
    want = video["interactive_source_frame_indices"]
    frames = interactive_reference_frames(cfg, case_dir / video["file"])
    assert frames.shape == (len(want), *video["interactive_decoder"]["frame_hw"], 3)
    got = source_frame_numbers(frames)
    differ = sum(g != w for g, w in zip(got, want, strict=True))
    assert got == want, f"{name}: {differ} of {len(want)} reference-clip frames differ from the reference's"


@pytest.mark.parametrize(("case_dir", "name", "video"), VIDEOS, ids=VIDEO_IDS)
def test_read_video_clip_returns_the_indices_it_delivers(case_dir, name, video):
    """The index list read_video_clip reports is the one the rule gives and the frames it delivers show."""
    dec = video["interactive_decoder"]
    seconds = dec["end_sec"] - dec["start_sec"]
    for at_end, key in ((False, "extension_source_frame_indices"), (True, "interactive_source_frame_indices")):
        frames, indices = media.read_video_clip(case_dir / video["file"], len(video[key]), seconds, at_end=at_end)
        assert indices.tolist() == video[key] == source_frame_numbers(frames), f"{name} at_end={at_end}"


@pytest.mark.parametrize(("case_dir", "name", "video"), VIDEOS, ids=VIDEO_IDS)
def test_interactive_template_is_nearest_the_video_aspect(case_dir, name, video):
    cfg = get_preset("pipeline", INTERACTIVE_PRESET)
    dec = video["interactive_decoder"]
    frames = interactive_reference_frames(cfg, case_dir / video["file"])
    template, pyramid, size = interactive_size(cfg, frames.shape[1:3])
    assert template == video["interactive_h_div_w_template"] == dec["h_div_w_template"]
    assert pyramid[-1][1:] == tuple(dec["scale_schedule_0_40M_pt21_last"][1:])
    assert list(size) == dec["tgt_hw"]


@pytest.mark.parametrize("case_dir", CASES, ids=[c.name for c in CASES])
def test_extension_template_ignores_the_video_aspect(case_dir):
    note = _config(case_dir)["cases"]["frontend"]["extension_template_note"]
    assert sorted(schedules.h_div_w_templates()) == sorted(note["elegant_templates"])
    assert schedules.nearest_h_div_w_template(0.571) == note["chosen_for_0_571"]
    # Extension's size comes from the requested aspect only (default 16:9), never from the video.
    assert resolve_size(get_preset("pipeline", EXTENSION_PRESET))[0] == note["chosen_for_0_571"]


@pytest.mark.parametrize("case_dir", CASES, ids=[c.name for c in CASES])
def test_image_transform_matches_the_reference(case_dir):
    cfg = _config(case_dir)
    tensors = load_file(str(case_dir / "transform.safetensors"))
    checked = set()
    for name, image in cfg["cases"]["frontend"]["images"].items():
        for target in image["targets"]:
            want = tensors[target["tensor"]]
            got = media.load_image_tensor(case_dir / image["file"], target["tgt_h"], target["tgt_w"])
            assert tuple(got.shape) == tuple(want.shape) == (3, target["tgt_h"], target["tgt_w"])
            diff = float((got - want).abs().max())
            assert diff <= TRANSFORM_ATOL, f"{name} {target['tgt_h']}x{target['tgt_w']}: max abs diff {diff:.2e}"
            checked.add(target["tensor"])
    assert checked == set(tensors), f"tensors not checked: {sorted(set(tensors) - checked)}"
    assert all(t.dtype == torch.float32 for t in tensors.values())


def test_interactive_from_a_portrait_file_keeps_its_aspect_and_the_reference_frames(tmp_path):
    """The whole production path on a small model: a 2:1 portrait file (1 s at 16 fps, frame i filled with level
    8*i) gives portrait segments, and segment 0 is the VAE round trip of the reference's pick of its last 0.5 s
    (8 frames per clip at 16 fps): start ceil(16 * (1 - 0.5)) = 8, end 16, linspace(8, 15, 9) = 8, 8, 9, ..., 15."""
    import dataclasses

    from infinitystar.pipeline import InfinityStarPipeline

    torch.set_num_threads(1)  # a tiny model: threads only wait for each other on a shared machine
    cfg = dataclasses.replace(get_preset("pipeline", "tiny-test-interactive"), name="tiny-short", frames_inner_clip=2)
    pipe = InfinityStarPipeline.from_preset(cfg, seed=0)
    levels = np.arange(16, dtype=np.uint8) * 8
    frames = np.broadcast_to(levels[:, None, None, None], (16, 96, 48, 3)).copy()
    path = media.write_video(frames, tmp_path / "tall.mp4", fps=16, crf=0)
    out = pipe.interactive(["a red ball", "the ball stops"], video=path, output_type="pt", seed=2, progress=False)
    _, _, (h, w) = resolve_size(cfg, aspect="1:2")  # the preset's bucket for a 2:1 portrait
    assert h > w and tuple(out.frames.shape[2:]) == (h, w)
    picked = media.read_video(path)[0][[8, 8, 9, 10, 11, 12, 13, 14, 15]]
    x = media.frames_to_tensor(media.resize_and_center_crop(picked, h, w))[None]
    with torch.no_grad():
        expected = pipe.vae.decode(pipe.vae.encode(x)).clamp(-1, 1)[0]
    err = float((out.segments[0] - expected).abs().max())
    assert err <= 1e-5, f"segment 0 differs from the round trip of the reference's frames by {err}"  # float rounding


@pytest.mark.parametrize(("case_dir", "name", "video"), VIDEOS, ids=VIDEO_IDS)
def test_a_container_without_a_frame_count_gives_the_same_clip(case_dir, name, video, tmp_path):
    """Matroska stores no frame count (decord and OpenCV then count or estimate): ours counts the packets, and the
    same frames re-encoded losslessly into .mkv give the same clips."""
    frames, fps = media.read_video(case_dir / video["file"])
    mkv = media.write_video(frames, tmp_path / f"{name}.mkv", fps=fps, crf=0)
    assert media.count_video_frames(mkv) == (video["frames"], float(video["fps"]))
    seconds = video["interactive_decoder"]["end_sec"] - video["interactive_decoder"]["start_sec"]
    for at_end, key in ((False, "extension_source_frame_indices"), (True, "interactive_source_frame_indices")):
        clip, indices = media.read_video_clip(mkv, len(video[key]), seconds, at_end=at_end)
        assert indices.tolist() == video[key] == source_frame_numbers(clip), f"{name} at_end={at_end}"


def test_clip_reader_rejects_what_it_cannot_deliver(tmp_path):
    frames = np.zeros((8, 16, 16, 3), dtype=np.uint8)  # 0.5 s at 16 fps
    path = media.write_video(frames, tmp_path / "short.mp4", fps=16)
    with pytest.raises(media.MediaError, match=r"short\.mp4 lasts 0\.500 s .* its last 5 s are needed"):
        media.read_video_clip(path, 81, 5.0, at_end=True)
    # From the start a shorter video repeats frames, as the reference's linspace does: 8 frames over 81 positions.
    _, indices = media.read_video_clip(path, 81, 5.0)
    assert indices.tolist() == np.linspace(0, 7, 81, dtype=int).tolist()
    with pytest.raises(media.MediaError, match="holds no frame"):
        media.clip_frame_indices(8, 16.0, 1.0, 2.0, 81)  # the window starts after the last frame
    with pytest.raises(media.MediaError, match="count must be a positive integer"):
        media.clip_frame_indices(8, 16.0, 0.0, 1.0, 0)

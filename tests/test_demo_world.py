"""The torus world of the demo (issue 18): videos of whole segments, stories that turn at segment boundaries, the
reference's interactive data layout, and the commands that write and read it.

Expected values come from the contract (a segment is 32 frames, a video 1 + 32 n; speed 0.6..1.1 px per frame; the
12 held-out triples of the issue), from geometry (a shape on a 64 px torus, its centroid measured as the phase of the
first Fourier coefficient, which moves by exactly the translation) and from the codec (lossless H.264 in YUV 4:2:0),
never from the code under test.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from infinitystar.cli import main
from infinitystar.config import get_preset
from infinitystar.demo import evaluate as ev
from infinitystar.demo import synthetic as syn
from infinitystar.media import read_video
from infinitystar.outputs import read_record
from infinitystar.train.config import DataConfig
from infinitystar.train.data import parse_record

ISSUE_HELD_OUT = {
    ("red", "triangle", "up"), ("green", "circle", "left"), ("blue", "square", "down"),
    ("yellow", "triangle", "right"), ("white", "circle", "up"), ("magenta", "square", "left"),
    ("red", "square", "right"), ("green", "triangle", "down"), ("blue", "circle", "right"),
    ("yellow", "square", "up"), ("white", "triangle", "left"), ("magenta", "circle", "down"),
}
UNIT = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
SIDE = 64
# make-demo-data in the fixture: counts small enough for a second of rendering.
SEED, N_VIDEOS, N_HELD_VIDEOS, N_STORIES, N_HELD_STORIES = 5, 6, 3, 4, 2
SEGMENTS, STORY_SEGMENTS = (1, 3), (2, 3)


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _torus_centroids(frames: np.ndarray) -> np.ndarray:
    """(x, y) per frame as the phase of the first Fourier coefficient of the column / row sums of the coverage.

    Shifting a pattern by d on a period-64 axis turns that phase by exactly 2 pi d / 64, so phase steps are the
    shape's steps whatever edge it crosses. Coverage = brightest channel / 255 (pure palette colours)."""
    cov = frames.max(axis=-1).astype(np.float64) / 255
    k = np.exp(2j * np.pi * np.arange(SIDE) / SIDE)
    fx = (cov.sum(axis=1) * k).sum(axis=-1)
    fy = (cov.sum(axis=2) * k).sum(axis=-1)
    return np.stack([np.angle(fx), np.angle(fy)], axis=-1) * SIDE / (2 * np.pi)


def _torus_steps(frames: np.ndarray) -> np.ndarray:
    """Centroid steps frame to frame, taken modulo the side into [-32, 32)."""
    c = _torus_centroids(frames)
    return (np.diff(c, axis=0) + SIDE / 2) % SIDE - SIDE / 2


# Step error bound of the phase centroid, in px. Horizontally the coverage is exact box filtering (translation
# equivariant); vertically it is midpoint sampling on 16 sub-rows, which displaces each edge by at most 1/32 px,
# and the uint8 rounding moves the phase by ~0.005 px. Two positions per step: well under 0.1 px, while a step in a
# wrong direction is off by speed * sqrt(2) >= 0.85 px.
STEP_TOL = 0.1


# ---------------------------------------------------------------------------------------------- the spec


def test_segments_frames_and_positions_by_hand():
    assert syn.SEGMENT_FRAMES == 32
    assert [syn.video_frames(n) for n in (1, 2, 3)] == [33, 65, 97]
    with pytest.raises(ValueError, match="segments"):
        syn.video_frames(0)
    spec = syn.VideoSpec("red", "circle", 20.0, (10.0, 20.0), 1.0, ("right", "down", "left"))
    assert (spec.segments, spec.frames) == (3, 97)
    # Segment 0 covers the steps into frames 1..32, segment 1 those into 33..64, segment 2 those into 65..96.
    assert spec.position(0) == (10.0, 20.0)
    assert spec.position(32) == (42.0, 20.0)
    assert spec.position(40) == (42.0, 28.0)
    assert spec.position(64) == (42.0, 52.0)
    assert spec.position(96) == (10.0, 52.0)  # unwrapped: the renderer wraps
    assert [spec.direction_at(t) for t in (1, 32, 33, 64, 65, 96)] == ["right", "right", "down", "down", "left",
                                                                        "left"]
    assert spec.triples() == (("red", "circle", "right"), ("red", "circle", "down"), ("red", "circle", "left"))
    with pytest.raises(ValueError, match="sideways"):
        syn.VideoSpec("red", "circle", 20.0, (10.0, 20.0), 1.0, ("sideways",))


# ---------------------------------------------------------------------------------------------- rendering


def test_render_clip_frames_are_byte_identical_to_the_former_renderer():
    # sha256 of render_clip for these specs, computed with the renderer as it was before the torus world (a copy of
    # the package from before issue 18): the shipped model's data and tests depend on these exact frames.
    h = hashlib.sha256()
    for split in ("train", "heldout"):
        for clip in syn.sample_clips(8, seed=0, split=split):
            h.update(syn.render_clip(clip.spec).tobytes())
    assert h.hexdigest() == "f716368cb62160e2f60d4316b2b747cfda64d72fb324896f7508146cb702001a"
    # The torus renderer draws the same in-frame paths byte for byte (nothing to wrap).
    for clip in syn.sample_clips(24, seed=9) + syn.sample_clips(12, seed=9, split="heldout"):
        s = clip.spec
        video = syn.VideoSpec(s.colour, s.shape, s.size, s.start, s.speed, (s.direction,))
        assert np.array_equal(syn.render_video(video), syn.render_clip(s))


@pytest.mark.parametrize("shape,area", [("circle", math.pi / 4), ("square", 1.0), ("triangle", 0.5)])
@pytest.mark.parametrize("cx,cy", [(61.3, 30.7), (2.6, 33.1), (27.4, 62.2), (62.9, 0.8)],
                         ids=["right-edge", "left-edge", "bottom-edge", "corner"])
def test_wrapped_shape_is_the_folded_plane_shape(shape, area, cx, cy):
    size = 21.5
    cov = syn.torus_coverage(shape, cx, cy, size, SIDE)
    # The same shape on a 3x3-tile plane, centred in the middle tile, then folded onto one tile.
    plane = syn.shape_coverage(shape, cx + SIDE, cy + SIDE, size, 3 * SIDE, 3 * SIDE)
    folded = plane.astype(np.float64).reshape(3, SIDE, 3, SIDE).sum(axis=(0, 2))
    # Each pixel holds one piece, computed at coordinates 64 apart: equal up to one float32 ulp (2^-24 below 1).
    np.testing.assert_allclose(cov, folded, rtol=0, atol=2.0**-24)
    n = np.count_nonzero(plane)
    assert abs(cov.astype(np.float64).sum() - plane.astype(np.float64).sum()) <= n * 2.0**-24
    # The area is the shape's (anti-aliasing keeps it to ~1 %), and pieces lie at both sides of the crossed edge.
    assert cov.sum() == pytest.approx(area * size**2, rel=0.02)
    ys, xs = np.nonzero(cov)
    crosses_x = cx + size / 2 > SIDE or cx - size / 2 < 0
    crosses_y = cy + size / 2 > SIDE or cy - size / 2 < 0
    assert crosses_x or crosses_y
    if crosses_x:
        assert cov[:, 0].any() and cov[:, -1].any() and not cov[:, SIDE // 2].any()
    if crosses_y:
        assert cov[0].any() and cov[-1].any() and not cov[SIDE // 2].any()


def test_rendered_frame_shows_both_pieces_in_the_pure_colour():
    spec = syn.VideoSpec("magenta", "square", 20.0, (60.0, 32.0), 1.0, ("right",))
    frame = syn.render_video(spec)[0].astype(int)
    # x from 50 to 70: columns 50..63 and 0..5 lit, whole columns (rows 22..41) at full colour.
    lit = frame.max(axis=(0, 2)) > 0
    assert lit[50:].all() and lit[:6].all() and not lit[6:50].any()
    assert (frame[22:42, 50:] == (255, 0, 255)).all() and (frame[22:42, :6] == (255, 0, 255)).all()
    assert not frame[:, :, 1].any()  # green stays off: the colour is pure


def test_plain_videos_move_at_constant_speed_across_the_edges():
    videos = syn.sample_videos(18, seed=7, segments=(3,))
    for v in videos:
        spec = v.spec
        assert 16 <= spec.size <= 24 and 0.6 <= spec.speed <= 1.1 and spec.segments == 3
        frames = syn.render_video(spec)
        assert frames.shape == (97, SIDE, SIDE, 3) and frames.dtype == np.uint8
        want = np.array(UNIT[spec.directions[0]], float) * spec.speed
        assert np.abs(_torus_steps(frames) - want).max() <= STEP_TOL, v
        # Travel >= 0.3 * 64 per segment, 3 segments, shape >= 16 px: the swept extent (> 64 px) must cross the
        # moving axis's edge, so some frame shows the shape in pieces at both sides.
        axis = 2 if want[0] else 1
        lit = frames.max(axis=-1) > 0
        first, last = np.take(lit, 0, axis=axis).any(axis=1), np.take(lit, -1, axis=axis).any(axis=1)
        assert (first & last).any(), v


def test_stories_turn_at_exactly_the_segment_boundaries():
    stories = syn.sample_stories(24, seed=3) + syn.sample_stories(6, seed=3, split="heldout")
    for st in stories:
        spec = st.spec
        assert all(a != b for a, b in zip(spec.directions, spec.directions[1:]))
        steps = _torus_steps(syn.render_video(spec))
        # The step into frame t belongs to segment (t - 1) // 32 (the contract's formula, not direction_at).
        want = np.array([UNIT[spec.directions[(t - 1) // 32]] for t in range(1, spec.frames)], float) * spec.speed
        assert np.abs(steps - want).max() <= STEP_TOL, st


# ---------------------------------------------------------------------------------------------- sampling


def test_training_never_shows_a_held_out_triple():
    videos = syn.sample_videos(3000, seed=1)
    stories = syn.sample_stories(3000, seed=1)
    video_triples = [v.spec.triples()[0] for v in videos]
    assert all(len(set(v.spec.triples())) == 1 for v in videos)  # a plain video keeps its direction
    story_triples = [t for s in stories for t in s.spec.triples()]
    assert not (set(video_triples) | set(story_triples)) & ISSUE_HELD_OUT
    # Balanced as sample_clips: 3000 videos = 50 rounds of the 60 training triples.
    counts = {t: video_triples.count(t) for t in set(video_triples)}
    assert len(counts) == 60 and set(counts.values()) == {50}
    assert {v.spec.segments for v in videos} == {1, 2, 3}
    # Stories use every training triple as a segment, every (colour, shape) pair in balanced rounds.
    assert set(story_triples) == set(syn.TRAIN_TRIPLES)
    pairs = [s.spec.triples()[0][:2] for s in stories]
    assert {pairs.count(p) for p in set(pairs)} <= {166, 167} and len(set(pairs)) == 18
    assert {s.spec.segments for s in stories} == {2, 3}
    for s in stories:
        assert len(s.captions) == s.spec.segments
        assert [ev.parse_prompt(c) for c in s.captions] == list(s.spec.triples())
        assert all(a != b for a, b in zip(s.spec.directions, s.spec.directions[1:]))
    # Each segment's caption is its own template draw: the wording varies inside a story too.
    assert any(len({syn.CAPTION_TEMPLATES.index(_template_of(c, t)) for c, t in zip(s.captions, s.spec.triples())})
               > 1 for s in stories)


def _template_of(caption: str, triple: tuple[str, str, str]) -> str:
    return next(tpl for tpl in syn.CAPTION_TEMPLATES if syn.caption(triple, tpl) == caption)


def test_held_out_split_holds_the_held_out_triples():
    videos = syn.sample_videos(24, seed=2, split="heldout")
    triples = [v.spec.triples()[0] for v in videos]
    assert set(triples) == ISSUE_HELD_OUT and {triples.count(t) for t in ISSUE_HELD_OUT} == {2}
    stories = syn.sample_stories(24, seed=2, split="heldout")
    assert {s.spec.triples()[1] for s in stories[:12]} == ISSUE_HELD_OUT  # one story per held-out triple
    for s in stories:
        first, middle, last = s.spec.triples()
        assert middle in ISSUE_HELD_OUT
        assert first not in ISSUE_HELD_OUT and last not in ISSUE_HELD_OUT
        assert first[2] != middle[2] and last[2] != middle[2]
        assert ev.parse_prompt(s.captions[1]) == middle


def test_sampling_is_deterministic_by_seed_split_and_index():
    assert syn.sample_videos(5, SEED) == syn.sample_videos(50, SEED)[:5]
    assert syn.sample_stories(5, SEED) == syn.sample_stories(50, SEED)[:5]
    assert syn.sample_stories(3, SEED, segments=(2,)) == syn.sample_stories(3, SEED, segments=(2,))
    assert [v.spec for v in syn.sample_videos(8, SEED)] != [v.spec for v in syn.sample_videos(8, SEED + 1)]
    assert [s.spec for s in syn.sample_stories(8, SEED)] != [s.spec for s in syn.sample_stories(8, SEED + 1)]
    assert {s.spec.segments for s in syn.sample_stories(40, SEED, segments=(3,))} == {3}


@pytest.mark.parametrize("call,message", [
    (lambda: syn.sample_videos(0, 0), "number of videos"),
    (lambda: syn.sample_videos(2, 0, split="test"), "split"),
    (lambda: syn.sample_videos(2, 0, segments=(0,)), "segments"),
    (lambda: syn.sample_stories(2, 0, segments=(1, 2)), "story segments"),
    (lambda: syn.sample_stories(2, -1), "seed"),
    (lambda: syn.render_video(syn.VideoSpec("red", "circle", 70.0, (0.0, 0.0), 1.0, ("up",))), "does not fit"),
], ids=["zero-videos", "bad-split", "zero-segments", "one-segment-story", "negative-seed", "shape-too-big"])
def test_bad_arguments_name_the_value(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_writers_check_before_writing(tmp_path):
    with pytest.raises(ValueError, match="clip size must be 16..1024 pixels, got 100000"):
        syn.make_videos(tmp_path / "a", 2, 0, size=100000)
    with pytest.raises(ValueError, match="fps"):
        syn.make_stories(tmp_path / "b", 2, 0, fps=0)
    with pytest.raises(ValueError, match="split"):
        syn.make_stories(tmp_path / "c", 2, 0, split="test")
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------------- files


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("world") / "data"
    rc = main(["make-demo-data", str(out), "--clips", str(N_VIDEOS), "--heldout-clips", str(N_HELD_VIDEOS),
               "--stories", str(N_STORIES), "--heldout-stories", str(N_HELD_STORIES),
               "--segments", ",".join(map(str, SEGMENTS)), "--story-segments", ",".join(map(str, STORY_SEGMENTS)),
               "--diamond-videos", "2", "--seed", str(SEED)])
    assert rc == 0
    return out


def test_make_demo_data_writes_videos_and_stories(world):
    counts = {"train": N_VIDEOS, "heldout": N_HELD_VIDEOS, "train_stories": N_STORIES,
              "heldout_stories": N_HELD_STORIES}
    for name, n in counts.items():
        rows = _rows(world / f"{name}.jsonl")
        assert len(rows) == n
        for i, row in enumerate(rows):
            demo = row["demo"]
            assert (demo["index"], demo["seed"], demo["world"]) == (i, SEED, "torus")
            assert row["end_frame_id"] == 1 + 32 * demo["segments"] == 1 + 32 * len(demo["directions"])
            assert (row["begin_frame_id"], row["fps"], row["width"], row["height"]) == (0, 16.0, SIDE, SIDE)
            assert not Path(row["video_path"]).is_absolute()
            frames, fps = read_video(world / row["video_path"])
            assert frames.shape == (row["end_frame_id"], SIDE, SIDE, 3) and fps == 16.0
    plain = _rows(world / "train.jsonl") + _rows(world / "heldout.jsonl")
    assert all(r["video_path"] == f"videos/{r['demo']['split']}_{r['demo']['index']:06d}.mp4" for r in plain)
    assert {r["demo"]["segments"] for r in plain} <= set(SEGMENTS)
    for r in plain:
        truth = (r["demo"]["colour"], r["demo"]["shape"], r["demo"]["directions"][0])
        assert ev.parse_prompt(r["tarsier2_caption"]) == ev.parse_prompt(r["MiniCPM_V_2_6_caption"]) == truth
    assert all(r["demo"]["segments"] == 3 for r in _rows(world / "heldout_stories.jsonl"))
    # The command writes what the API writes.
    again = syn.make_videos(world.parent / "again", N_VIDEOS, SEED, "train", segments=SEGMENTS)
    assert again.read_text() == (world / "train.jsonl").read_text()
    # The VAE's diamond videos: the new shape on the same torus, in their own file (no training caption list).
    diamonds = _rows(world / "diamond.jsonl")
    assert len(diamonds) == 2 and {r["demo"]["shape"] for r in diamonds} == {"diamond"}
    assert all(r["video_path"].startswith("videos/diamond_") and r["demo"]["world"] == "torus" for r in diamonds)
    first = read_video(world / diamonds[0]["video_path"])[0]
    judged = ev.judge_clip(first[:33])
    assert judged.shape == "diamond" and judged.colour == diamonds[0]["demo"]["colour"]


def _uniform_5x5(frames: np.ndarray) -> np.ndarray:
    """Pixels whose 5x5 neighbourhood (wrapped: a superset of the in-frame one) has one colour."""
    pad = np.pad(frames, ((0, 0), (2, 2), (2, 2), (0, 0)), mode="wrap")
    win = np.lib.stride_tricks.sliding_window_view(pad, (5, 5), axis=(1, 2))
    return (win.max(axis=(-2, -1)) == win.min(axis=(-2, -1))).all(axis=-1)


def test_stories_are_in_the_interactive_layout(world):
    for split in ("train", "heldout"):
        rows = _rows(world / f"{split}_stories.jsonl")
        for row, (path, spec) in zip(rows, syn.read_videos(world / f"{split}_stories.jsonl")):
            folder = world / row["demo"]["story"]
            assert folder.name == f"{split}_{row['demo']['index']:06d}" and path == folder / "story.mp4"
            assert row["video_path"] == f"{row['demo']['story']}/story.mp4"
            lines = (folder / "prompt.txt").read_text(encoding="utf-8").splitlines()
            assert lines == row["segment_captions"] and len(lines) == spec.segments
            assert lines[0] == row["tarsier2_caption"]
            assert [ev.parse_prompt(line) for line in lines] == list(spec.triples())
            story, _ = read_video(path)
            reference, _ = read_video(folder / "0000_refine_720p.mp4")
            assert story.shape[0] == spec.frames and reference.shape[0] == 33
            # Lossless in YUV: the first 33 frames decode the same from either file, whatever follows them.
            assert np.array_equal(reference, story[:33])
            # Against the render: where the 5x5 neighbourhood is one colour the 4:2:0 chroma filters see no edge,
            # so only the 8-bit limited-range YUV rounding remains: R = Y + 1.575 Cr, B = Y + 1.856 Cb with Y, Cb,
            # Cr off by <= 0.58 levels give <= 1.7, plus 0.5 from rounding RGB: at most 2 levels.
            rendered = syn.render_video(spec)[:33]
            uniform = _uniform_5x5(rendered)
            assert uniform.mean() > 0.8 and (uniform & (rendered.max(axis=-1) == 255)).any()
            assert np.abs(rendered.astype(int) - reference)[uniform].max() <= 2


def test_rows_parse_with_the_training_pipeline(world):
    pipeline = get_preset("pipeline", "demo")
    for name in ("train", "heldout", "train_stories", "heldout_stories"):
        path = world / f"{name}.jsonl"
        config = DataConfig(jsonl=(str(path),), max_seconds=6)
        for n, row in enumerate(_rows(path), 1):
            record, status = parse_record(row, f"{path}:{n}", config, pipeline, world)
            assert status == "ok" and record is not None
            # 1 + 32 k frames at 16 fps = 2 k whole seconds, sampled back as 16 * 2k + 1 frames.
            assert record.seconds == 2 * row["demo"]["segments"] and record.num_frames == row["end_frame_id"]
            assert Path(record.path).is_file()
            assert record.is_story == name.endswith("stories")
            if record.is_story:
                assert record.segment_captions == tuple(row["segment_captions"])


def test_read_videos_gives_back_the_sampled_specs(world, tmp_path):
    specs = [spec for _, spec in syn.read_videos(world / "train.jsonl")]
    assert specs == [v.spec for v in syn.sample_videos(N_VIDEOS, SEED, "train", SEGMENTS)]
    specs = [spec for _, spec in syn.read_videos(world / "heldout_stories.jsonl")]
    assert specs == [s.spec for s in syn.sample_stories(N_HELD_STORIES, SEED, "heldout", STORY_SEGMENTS)]
    # read_ground_truth still reads the new rows: the first segment's triple.
    assert [t for _, t in syn.read_ground_truth(world / "train_stories.jsonl")] == [
        s.spec.triples()[0] for s in syn.sample_stories(N_STORIES, SEED, "train", STORY_SEGMENTS)]
    # Rows of the former dataset read as one-segment specs that render its clips.
    old = syn.make_dataset(tmp_path, 3, seed=4)
    for (path, spec), clip in zip(syn.read_videos(old), syn.sample_clips(3, seed=4)):
        assert path.is_file() and spec.directions == (clip.spec.direction,)
        assert np.array_equal(syn.render_video(spec), syn.render_clip(clip.spec))


# ---------------------------------------------------------------------------------------------- the commands


def _run(argv: list[str], capsys) -> tuple[int, str, str]:
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.parametrize("args,message", [
    (["--segments", "0"], "--segments counts must be in 1..32 segments, got 0"),
    (["--segments", "1,x"], "--segments must be comma-separated whole numbers like 1,2,3, got '1,x'"),
    (["--story-segments", "1,2"], "--story-segments counts must be in 2..32 segments, got 1"),
    (["--stories", "-1"], "--stories must be >= 0, got -1"),
    (["--heldout-stories", "-2"], "--heldout-stories must be >= 0, got -2"),
    (["--diamond-videos", "-1"], "--diamond-videos must be >= 0, got -1"),
    (["--clips", "0"], "--clips must be >= 1"),
    (["--frames", "33", "--stories", "2"], "drop --stories"),
    (["--frames", "33", "--segments", "2"], "drop --segments"),
    (["--size", "1024", "--segments", "32"], "takes 3.0 GiB in memory"),
], ids=["zero-segments", "not-numbers", "one-segment-story", "negative-stories", "negative-heldout-stories",
        "negative-diamond-videos", "no-clips", "frames-with-stories", "frames-with-segments", "3-GiB-videos"])
def test_make_demo_data_bad_values_are_one_line(tmp_path, capsys, args, message):
    out = tmp_path / "out"
    code, _, err = _run(["make-demo-data", str(out), "--clips", "2", *args], capsys)
    assert code == 2 and err.count("\n") == 1
    assert "infinitystar make-demo-data: error:" in err and message in err, err
    assert not out.exists()


@pytest.fixture(scope="module")
def two_segment_story(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("story")
    syn.make_stories(root, 1, seed=1, segments=(2,))
    return root / "stories" / "train_000000"


def test_interactive_story_argument_errors(tmp_path, capsys, two_segment_story):
    out = tmp_path / "o.mp4"
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle moving left\n", encoding="utf-8")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "prompt.txt").write_text("a red circle moving left\n", encoding="utf-8")
    cases = [
        (["--story", str(tmp_path / "nowhere")], "nowhere is not a folder"),
        (["--story", str(broken)], "has no 0000_refine_720p.mp4 (its reference video)"),
        (["--story", str(tmp_path)], "has no prompt.txt"),
        ([str(prompts), "--story", str(two_segment_story)], "drop PROMPTS_FILE and --video"),
        (["--story", str(two_segment_story), "--video", str(two_segment_story / "story.mp4")],
         "drop PROMPTS_FILE and --video"),
    ]
    for args, message in cases:
        code, _, err = _run(["interactive", *args, "-o", str(out), "--preset", "tiny-test-interactive"], capsys)
        assert code == 2 and err.count("\n") == 1, err
        assert "infinitystar interactive: error:" in err and message in err, err
    assert not out.exists()


def test_interactive_runs_a_story_folder(tmp_path, capsys, two_segment_story):
    # An interactive tiny model whose clip is one demo segment (8 latent frames = 32 frames = 2 s at 16 fps).
    torch.set_num_threads(1)
    cfg = dataclasses.replace(get_preset("pipeline", "tiny-test"), name="tiny-story", frames_inner_clip=8,
                              interactive=True)
    from infinitystar.pipeline import InfinityStarPipeline

    model = tmp_path / "model"
    InfinityStarPipeline.from_preset(cfg, seed=0).save_pretrained(model)
    out = tmp_path / "story.mp4"
    code, stdout, err = _run(["interactive", "--story", str(two_segment_story), "--model", str(model), "-o", str(out),
                              "--dtype", "fp32", "--quiet"], capsys)
    assert code == 0, err
    # Segment 0 is the reference video's clip (33 frames), segment 1 one generated clip of 32.
    assert "2 segments, 65 frames" in stdout
    frames, _ = read_video(out)
    assert frames.shape[0] == 65
    record = read_record(out)
    lines = (two_segment_story / "prompt.txt").read_text(encoding="utf-8").splitlines()
    assert list(record.prompts) == lines and record.prompt == lines[0]
    assert Path(record.input_video).name == "0000_refine_720p.mp4"
    assert isinstance(record.seed, int) and f"seed {record.seed}" in stdout


def test_the_new_shape_diamond_is_rendered_and_judged():
    """The word a LoRA adapter teaches the demo model (demo.lora): rendered as a square turned 45 degrees, read by
    the judge, and never part of the base world's training or held-out triples."""
    from infinitystar.demo.evaluate import judge_clip, parse_prompt

    assert syn.NEW_SHAPE == "diamond" and syn.NEW_SHAPE not in syn.SHAPES
    assert not any(t[1] == syn.NEW_SHAPE for t in syn.TRAIN_TRIPLES + syn.HELD_OUT)
    spec = syn.VideoSpec("blue", "diamond", 20.0, (20.5, 30.5), 0.8, ("right",))
    frame = syn.render_video(spec)[0]
    mask = frame[..., 2] > 127
    rows = np.nonzero(mask.any(axis=1))[0]
    widths = mask.sum(axis=1)[rows]
    # Widest in the middle row and narrowing towards both tips: a diamond, not a square.
    assert widths.max() >= 18 and widths[0] <= 3 and widths[-1] <= 3
    videos = syn.sample_videos(24, seed=0, split=syn.NEW_SHAPE)
    assert {v.spec.triples()[0] for v in videos} == set(syn.NEW_SHAPE_TRIPLES)
    judged = [judge_clip(syn.render_video(v.spec)) for v in videos]
    assert all(j.triple == v.spec.triples()[0] for j, v in zip(judged, videos))
    assert parse_prompt(videos[0].caption) == videos[0].spec.triples()[0]


def test_the_new_motion_still_is_rendered_captioned_and_judged():
    """The other word a LoRA adapter teaches (demo.lora's default): a shape that does not move. Its 18 triples are
    outside the base world; every frame is the first; its captions name no direction; the judge reads the truth
    of every ground-truth video (no direction, the right colour and shape), on the torus and in frame."""
    from infinitystar.demo.evaluate import direction_right, judge_clip, parse_prompt, score

    assert syn.NEW_MOTION == "still" and syn.NEW_MOTION not in syn.DIRECTIONS
    assert not any(t[2] == syn.NEW_MOTION for t in syn.TRAIN_TRIPLES + syn.HELD_OUT)
    videos = syn.sample_videos(36, seed=0, split=syn.NEW_MOTION, segments=(1, 2))
    assert {v.spec.triples()[0] for v in videos} == set(syn.NEW_MOTION_TRIPLES)
    frames = [syn.render_video(v.spec) for v in videos]
    assert all((f == f[:1]).all() for f in frames)
    judged = [judge_clip(f) for f in frames]
    assert score(judged, [v.spec.triples()[0] for v in videos])["all"] == 1.0
    assert all(j.direction is None for j in judged)
    clips = syn.sample_clips(18, seed=1, split=syn.NEW_MOTION)
    assert score([judge_clip(syn.render_clip(c.spec)) for c in clips], [c.spec.triple for c in clips])["all"] == 1.0
    # One caption form per template index (the direction templates' indices map onto the four still ones).
    captions = {syn.caption(("red", "circle", "still"), i) for i in range(len(syn.CAPTION_TEMPLATES))}
    assert len(captions) == len(syn.STILL_TEMPLATES) and all("still" in c for c in captions)
    assert all(parse_prompt(c) == ("red", "circle", "still") for c in captions)
    assert all(parse_prompt(v.caption) == v.spec.triples()[0] for v in videos)
    # A moving shape is not still, and a still one has no direction to get right.
    assert direction_right(None, "still") and not direction_right("left", "still")
    assert not direction_right(None, "left") and direction_right("left", "left")
    with pytest.raises(ValueError, match="unknown direction 'sideways'.*and still"):
        syn.caption(("red", "circle", "sideways"))

"""The demo domain: the synthetic dataset (demo/synthetic.py), the analytic judge and the evaluation report
(demo/evaluate.py), and their two commands.

Expected values come from the DEMO MODEL issue (the held-out triples, 33 frames at 64x64 and 16 fps), from
geometry (areas of a disc, square and triangle; the direction a centroid moves) and from the reference's
metadata format (training spec 2.1), never from the code under test.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from infinitystar.cli import main
from infinitystar.demo import evaluate as ev
from infinitystar.demo import synthetic as syn
from infinitystar.media import probe_video, read_video

# The 12 held-out triples exactly as the issue lists them.
ISSUE_HELD_OUT = {
    ("red", "triangle", "up"), ("green", "circle", "left"), ("blue", "square", "down"),
    ("yellow", "triangle", "right"), ("white", "circle", "up"), ("magenta", "square", "left"),
    ("red", "square", "right"), ("green", "triangle", "down"), ("blue", "circle", "right"),
    ("yellow", "square", "up"), ("white", "triangle", "left"), ("magenta", "circle", "down"),
}
PALETTE = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255), "yellow": (255, 255, 0),
           "white": (255, 255, 255), "magenta": (255, 0, 255)}
N_TRAIN, N_HELD, SEED = 24, 12, 3


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    """A small dataset written by the ordinary command."""
    out = tmp_path_factory.mktemp("demo") / "data"
    rc = main(["make-demo-data", str(out), "--frames", "33", "--clips", str(N_TRAIN), "--heldout-clips", str(N_HELD),
               "--seed", str(SEED)])
    assert rc == 0
    return out


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# ---------------------------------------------------------------------------------------------- triples


def test_held_out_triples_are_the_issue_s_and_train_has_the_rest():
    assert set(syn.HELD_OUT) == ISSUE_HELD_OUT and len(syn.HELD_OUT) == 12
    assert len(syn.TRAIN_TRIPLES) == 6 * 3 * 4 - 12
    assert not set(syn.TRAIN_TRIPLES) & ISSUE_HELD_OUT
    # Every attribute value, and every (colour, shape) pair, is still seen in training.
    assert {t[0] for t in syn.TRAIN_TRIPLES} == set(PALETTE)
    assert {t[1] for t in syn.TRAIN_TRIPLES} == {"circle", "square", "triangle"}
    assert {t[2] for t in syn.TRAIN_TRIPLES} == {"left", "right", "up", "down"}
    assert {t[:2] for t in syn.TRAIN_TRIPLES} == {(c, s) for c in PALETTE for s in ("circle", "square", "triangle")}


def test_seen_eval_triples_are_seen_and_balanced():
    seen = ev.SEEN_EVAL_TRIPLES
    assert len(set(seen)) == 12 and not set(seen) & ISSUE_HELD_OUT
    assert all(sum(t[0] == c for t in seen) == 2 for c in PALETTE)
    assert all(sum(t[2] == d for t in seen) == 3 for d in ("left", "right", "up", "down"))
    prompts = ev.default_prompts()
    assert {ev.parse_prompt(p) for p in prompts["held-out"]} == ISSUE_HELD_OUT
    assert {ev.parse_prompt(p) for p in prompts["seen"]} == set(seen)


def test_splits_never_mix_in_memory():
    train = syn.sample_clips(600, seed=11, split="train")
    held = syn.sample_clips(60, seed=11, split="heldout")
    assert not {c.spec.triple for c in train} & ISSUE_HELD_OUT
    assert len({c.spec.triple for c in train}) == 60  # 600 clips in balanced rounds cover all 60, 10 each
    assert set(syn.count_triples(train).values()) == {10}
    assert {c.spec.triple for c in held} == ISSUE_HELD_OUT


def test_bad_arguments_name_the_value(tmp_path):
    with pytest.raises(ValueError, match="split"):
        syn.sample_clips(4, 0, split="test")
    with pytest.raises(ValueError, match="n_clips"):
        syn.sample_clips(0, 0)
    with pytest.raises(ValueError, match="purple"):
        syn.caption(("purple", "circle", "left"))
    with pytest.raises(ValueError, match="fps"):
        syn.make_dataset(tmp_path, 1, 0, fps=0)


# ---------------------------------------------------------------------------------------------- rendering


@pytest.mark.parametrize("shape,area", [("circle", math.pi / 4), ("square", 1.0), ("triangle", 0.5)])
def test_rendered_shape_area_colour_and_motion(shape, area):
    for i, colour in enumerate(PALETTE):
        direction = ("left", "right", "up", "down")[i % 4]
        rng = np.random.default_rng(i)
        spec = syn._sample_spec(rng, (colour, shape, direction), 64, 33)
        assert 16 <= spec.size <= 24
        frames = syn.render_clip(spec)
        assert frames.shape == (33, 64, 64, 3) and frames.dtype == np.uint8
        rgb = np.array(PALETTE[colour])
        # Pure colour: every pixel is a multiple of the palette colour (zero channels stay zero).
        cov = frames.max(axis=-1).astype(float) / 255
        assert np.abs(frames - np.rint(cov[..., None] * rgb)).max() <= 1
        # Area = the shape's analytic area (coverage is anti-aliased, so this holds to ~1 %).
        areas = cov.sum(axis=(1, 2))
        np.testing.assert_allclose(areas, area * spec.size**2, rtol=0.02)
        # Always entirely inside the frame.
        assert not (cov[:, 0].any() or cov[:, -1].any() or cov[:, :, 0].any() or cov[:, :, -1].any())
        # The centroid moves at constant speed in the named direction.
        ys, xs = np.mgrid[:64, :64]
        cx = (cov * xs).sum(axis=(1, 2)) / areas
        cy = (cov * ys).sum(axis=(1, 2)) / areas
        want = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}[direction]
        vx, vy = np.polyfit(np.arange(33), cx, 1)[0], np.polyfit(np.arange(33), cy, 1)[0]
        travel = math.hypot(vx, vy) * 32
        assert 0.25 * 64 <= travel <= 0.6 * 64
        assert np.allclose((vx / math.hypot(vx, vy), vy / math.hypot(vx, vy)), want, atol=0.02)


def test_triangle_points_up():
    spec = syn.ClipSpec("white", "triangle", "left", 20.0, (32.0, 32.0), 0.5)
    cov = syn.render_clip(spec, frames=2)[0].max(axis=-1) > 127
    widths = cov.sum(axis=1)[cov.any(axis=1)]
    assert widths[0] < 5 and widths[-1] > 17  # narrow apex on top, 20-px base at the bottom


# ---------------------------------------------------------------------------------------------- files


def test_files_read_back_as_33_frames_of_64x64_at_16fps(dataset):
    for split, n in (("train", N_TRAIN), ("heldout", N_HELD)):
        rows = _rows(dataset / f"{split}.jsonl")
        assert len(rows) == n
        for row in rows[:4]:
            path = dataset / row["video_path"]
            info = probe_video(path)
            assert (info.width, info.height, info.fps, info.num_frames) == (64, 64, 16.0, 33)
            frames, fps = read_video(path, fps=16)
            assert frames.shape == (33, 64, 64, 3) and fps == 16.0


def test_jsonl_rows_are_in_the_reference_format(dataset):
    for split in ("train", "heldout"):
        for row in _rows(dataset / f"{split}.jsonl"):
            assert isinstance(row["video_path"], str) and not Path(row["video_path"]).is_absolute()
            assert (dataset / row["video_path"]).is_file()
            assert isinstance(row["begin_frame_id"], int) and isinstance(row["end_frame_id"], int)
            assert isinstance(row["fps"], float)
            # Clip duration (end - begin) / fps mapped down to whole seconds gives 2 s -> 2 * 16 + 1 = 33 frames.
            assert int((row["end_frame_id"] - row["begin_frame_id"]) / row["fps"]) == 2
            for key in ("tarsier2_caption", "MiniCPM_V_2_6_caption"):
                assert isinstance(row[key], str) and row[key].strip()
                truth = (row["demo"]["colour"], row["demo"]["shape"], row["demo"]["direction"])
                assert ev.parse_prompt(row[key]) == truth
            assert row["tarsier2_caption"] != row["MiniCPM_V_2_6_caption"]
            assert "h_div_w" not in row


def test_jsonl_is_read_by_the_training_data_pipeline(dataset):
    from infinitystar.config import get_preset
    from infinitystar.train.config import DataConfig
    from infinitystar.train.data import ParseStats, read_jsonl

    path = dataset / "train.jsonl"
    stats = ParseStats()
    records = read_jsonl(path, DataConfig(jsonl=(str(path),)), get_preset("pipeline", "demo"), stats)
    assert len(records) == N_TRAIN and stats.bad == 0
    assert all(r.num_frames == 33 and r.seconds == 2 and Path(r.path).is_file() for r in records)


def test_held_out_triples_only_in_held_out_file(dataset):
    train = {tuple(t) for _, t in syn.read_ground_truth(dataset / "train.jsonl")}
    held = [t for _, t in syn.read_ground_truth(dataset / "heldout.jsonl")]
    assert not train & ISSUE_HELD_OUT
    assert set(held) == ISSUE_HELD_OUT  # 12 clips in one balanced round: each held-out triple once


def test_same_seed_same_dataset_other_seed_other(dataset, tmp_path):
    again = syn.make_dataset(tmp_path / "a", N_TRAIN, SEED)
    assert again.read_text() == (dataset / "train.jsonl").read_text()
    for row in _rows(again)[:3]:
        a, _ = read_video(tmp_path / "a" / row["video_path"])
        b, _ = read_video(dataset / row["video_path"])
        assert np.array_equal(a, b)
    other = syn.make_dataset(tmp_path / "b", N_TRAIN, SEED + 1)
    assert [r["demo"] for r in _rows(other)] != [r["demo"] for r in _rows(again)]
    # A longer dataset starts with the clips of a shorter one.
    assert syn.sample_clips(5, SEED) == syn.sample_clips(50, SEED)[:5]


def test_captions_vary_across_templates():
    clips = syn.sample_clips(200, seed=5)
    captions = [c.caption for c in clips] + [c.alt_caption for c in clips]
    used = {tpl for tpl in syn.CAPTION_TEMPLATES
            if any(syn.caption(c.spec.triple, tpl) in (c.caption, c.alt_caption) for c in clips)}
    assert len(used) == len(syn.CAPTION_TEMPLATES) >= 5
    one = [c for c in clips if c.spec.triple == clips[0].spec.triple]
    assert len({c.caption for c in one}) >= 2  # the same triple is told in different words
    assert syn.caption(("red", "circle", "left"), 0) == "a red circle moving left"
    assert len(set(captions)) > 100
    # Every template, for every triple, reads back as its triple (the scorer relies on it).
    for triple in syn.ALL_TRIPLES:
        for tpl in range(len(syn.CAPTION_TEMPLATES)):
            assert ev.parse_prompt(syn.caption(triple, tpl)) == triple
    assert set(syn.EVAL_TEMPLATES) <= set(syn.CAPTION_TEMPLATES)


def test_parse_prompt():
    assert ev.parse_prompt("<<<t=2s>>>A Yellow square slides upwards.") == ("yellow", "square", "up")
    with pytest.raises(ValueError, match="colour"):
        ev.parse_prompt("a red and blue circle moving left")
    with pytest.raises(ValueError, match="shape"):
        ev.parse_prompt("a red blob moving left")
    with pytest.raises(ValueError, match="direction"):
        ev.parse_prompt("a red circle spinning")
    with pytest.raises(ValueError, match="names 2 directions"):
        ev.parse_prompt("a red circle moving left, then still")
    assert ev.parse_prompt("a red circle standing still") == ("red", "circle", "still")  # the LoRA recipe's word


# ---------------------------------------------------------------------------------------------- the judge


def test_judge_is_right_on_ground_truth_clips():
    clips = syn.sample_clips(180, seed=101) + syn.sample_clips(40, seed=101, split="heldout")
    truths = [c.spec.triple for c in clips]
    judged = [ev.judge_clip(syn.render_clip(c.spec)) for c in clips]
    acc = ev.score(judged, truths)
    assert acc["n"] == 220
    assert acc["colour"] >= 0.99 and acc["shape"] >= 0.99 and acc["direction"] >= 0.99, acc
    # Sanity: against shuffled labels the same verdicts score about chance (1/6, 1/3, 1/4). With 220 clips the
    # standard errors are 0.025, 0.032, 0.029: the bounds sit 5-6.5 of them above chance (fixed permutation).
    perm = np.random.default_rng(0).permutation(len(truths))
    shuffled = ev.score(judged, [truths[i] for i in perm])
    assert shuffled["colour"] < 0.33 and shuffled["shape"] < 0.5 and shuffled["direction"] < 0.42, shuffled


def test_judge_is_right_on_clips_read_back_from_mp4(dataset):
    gt = syn.read_ground_truth(dataset / "train.jsonl") + syn.read_ground_truth(dataset / "heldout.jsonl")
    assert len(gt) >= 30
    judged = [ev.judge_clip(read_video(path)[0]) for path, _ in gt]
    acc = ev.score(judged, [t for _, t in gt])
    assert acc["colour"] >= 0.99 and acc["shape"] >= 0.99 and acc["direction"] >= 0.99, acc


def _blur(frames: np.ndarray, sigma: float) -> np.ndarray:
    x = torch.from_numpy(frames).float().permute(0, 3, 1, 2)
    r = int(3 * sigma) + 1
    k = torch.exp(-torch.arange(-r, r + 1).float() ** 2 / (2 * sigma**2))
    k = (k / k.sum()).view(1, 1, 1, -1)
    x = x.reshape(-1, 1, *x.shape[2:])
    x = F.conv2d(F.pad(x, (r, r, 0, 0), mode="replicate"), k)
    x = F.conv2d(F.pad(x, (0, 0, r, r), mode="replicate"), k.transpose(2, 3))
    return x.reshape(frames.shape[0], 3, *frames.shape[1:3]).permute(0, 2, 3, 1).numpy()


def test_judge_survives_blur_noise_dimming_and_resizing():
    rng = np.random.default_rng(1)
    clips = syn.sample_clips(48, seed=202)
    judged = []
    for i, c in enumerate(clips):
        f = syn.render_clip(c.spec).astype(np.float32)
        if i % 3 == 0:  # VAE-like blur plus mild noise
            f = _blur(f.astype(np.uint8), 1.5) + rng.normal(0, 8, f.shape)
        elif i % 3 == 1:  # dimmer, desaturated, on a grey background
            f = 0.6 * (0.75 * f + 0.25 * f.mean(-1, keepdims=True)) + 25
        else:  # another resolution (the tiny-test preset makes 96x96)
            t = torch.from_numpy(f).permute(0, 3, 1, 2)
            f = F.interpolate(t, size=(96, 96), mode="bicubic").permute(0, 2, 3, 1).numpy()
        judged.append(ev.judge_clip(np.clip(np.rint(f), 0, 255).astype(np.uint8)))
    acc = ev.score(judged, [c.spec.triple for c in clips])
    assert acc["all"] >= 47 / 48, acc


def test_judge_says_none_without_evidence():
    black = np.zeros((9, 64, 64, 3), np.uint8)
    assert ev.judge_clip(black).triple == (None, None, None)
    still = syn.render_clip(syn.ClipSpec("blue", "square", "left", 20.0, (32.0, 32.0), 0.0), frames=9)
    j = ev.judge_clip(still)
    assert j.triple == ("blue", "square", None)
    with pytest.raises(ValueError, match="uint8"):
        ev.judge_clip(black.astype(np.float32))
    with pytest.raises(ValueError, match="frames"):
        ev.judge_clip(black[:1])


# ---------------------------------------------------------------------------------------------- the report


class _PerfectPipe:
    """Renders exactly what the prompt asks for (ground truth), or a fixed wrong triple."""

    def __init__(self, wrong: tuple[str, str, str] | None = None):
        self.wrong = wrong

    def __call__(self, prompt, num_frames, seed, output_type, progress, **kw):
        triple = self.wrong or ev.parse_prompt(prompt)
        spec = syn.sample_clips(1, seed)[0].spec
        spec = syn.ClipSpec(*triple, spec.size, (28.0, 28.0), 1.0)

        class Out:
            frames = syn.render_clip(spec, frames=num_frames)
            fps = 16

        return Out()


def test_report_scores_seen_and_held_out(tmp_path):
    report = ev.evaluate_pipeline(_PerfectPipe(), None, n_per_prompt=1, seed=0, num_frames=9)
    s = report.summary()
    assert s["seen"]["n"] == 12 and s["held-out"]["n"] == 12
    assert s["all"]["all"] == 1.0
    wrong = ev.evaluate_pipeline(_PerfectPipe(("red", "circle", "left")), None, n_per_prompt=1, num_frames=9)
    ws = wrong.summary()
    # Held-out prompts never ask for red/circle/left all at once, seen ones once ("a red circle moving left").
    assert ws["held-out"]["all"] == 0.0 and ws["seen"]["all"] == pytest.approx(1 / 12)
    assert ws["seen"]["colour"] == pytest.approx(2 / 12)
    paths = wrong.save(tmp_path)
    assert "| seen | 12 |" in paths["markdown"].read_text()
    assert json.loads(paths["json"].read_text())["summary"]["held-out"]["n"] == 12


def test_evaluate_command_on_a_random_tiny_pipeline(tmp_path, capsys):
    out = tmp_path / "eval"
    rc = main(["evaluate", "--preset", "tiny-test", "--clips-per-prompt", "1", "--limit", "1", "--frames", "5",
               "--out", str(out), "--quiet"])
    assert rc == 0
    table = (out / "report.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| seen |") or line.startswith("| held-out |")]
    assert len(rows) == 2 + 2  # summary rows, then one per-prompt row each
    data = json.loads((out / "report.json").read_text())
    assert [c["group"] for c in data["clips"]] == ["seen", "held-out"]
    from PIL import Image

    with Image.open(out / "contact_sheet.png") as sheet:
        w, h = sheet.size
    assert w >= 5 * 96 and h >= 2 * 96  # 2 clips x 5 frames of (at least) 96 px
    assert "held-out" in capsys.readouterr().out


class _ShiftPipe:
    """Reconstructs every clip as its file's frames moved by ``shift`` levels (down where that would clip)."""

    class config:  # noqa: N801 - stands in for PipelineConfig
        fps = 16

    def __init__(self, shift: int) -> None:
        self.shift = shift

    def reconstruct(self, path, *, output_type):
        from infinitystar import media

        frames, _ = media.read_video(path, fps=16)
        assert output_type == "np"
        f = frames.astype(np.int16)
        return np.where(f + self.shift > 255, f - self.shift, f + self.shift).astype(np.uint8)


def test_reconstruction_psnr_compares_the_files_frames_with_the_round_trip(dataset):
    exact = ev.reconstruction_psnr(_ShiftPipe(0), dataset / "heldout.jsonl", n_clips=2)
    assert exact["psnr_db"] == float("inf") and exact["clips"] == 2 and exact["frames"] == [33]
    assert exact["by_frames"] == {33: {"psnr_db": float("inf"), "min_db": float("inf"), "clips": 2}}
    # Every value off by exactly one level: MSE 1, PSNR = 10 log10(255^2) = 48.13 dB.
    one = ev.reconstruction_psnr(_ShiftPipe(1), dataset / "heldout.jsonl")
    assert one["clips"] == N_HELD
    assert one["psnr_db"] == pytest.approx(48.1308, abs=1e-3) and one["min_db"] == pytest.approx(48.1308, abs=1e-3)
    four = ev.reconstruction_psnr(_ShiftPipe(4), dataset / "heldout.jsonl", n_clips=1)
    assert four["psnr_db"] == pytest.approx(48.1308 - 20 * math.log10(4), abs=1e-3)
    with pytest.raises(ValueError, match="n_clips"):
        ev.reconstruction_psnr(_ShiftPipe(0), dataset / "heldout.jsonl", n_clips=0)


def test_tokenizer_metrics_hold_each_clip_length_against_30_db():
    rows = ev.tokenizer_metrics({"psnr_db": 30.5, "clips": 3, "by_frames": {
        33: {"psnr_db": 31.0, "min_db": 29.0, "clips": 2}, 65: {"psnr_db": 29.5, "min_db": 29.5, "clips": 1}}})
    assert [(r.metric, r.value, r.n, r.met) for r in rows] == [
        ("PSNR, 33-frame held-out clips", 31.0, 2, True), ("PSNR, 65-frame held-out clips", 29.5, 1, False),
        ("PSNR, all held-out clips", 30.5, 3, True)]
    assert all(r.target == 30.0 and r.unit == "dB" for r in rows)


def test_an_upper_bound_target_is_met_at_or_below_it():
    ratio = ev.TaskMetric("long", "peak RSS ratio", 1.04, 1.05, 1, "ratio", at_most=True)
    assert ratio.met and not ev.TaskMetric("long", "peak RSS ratio", 1.06, 1.05, 1, "ratio", at_most=True).met
    assert not ev.TaskMetric("t2v-2s", "colour", 0.97, 0.98, 100).met
    table = ev.TaskReport([], [ratio]).table()
    assert "| long | peak RSS ratio | 1.040 | ≤ 1.05 | yes |" in table


def test_evaluate_command_measures_the_tokenizer(dataset, tmp_path, capsys):
    out = tmp_path / "eval"
    rc = main(["evaluate", "--preset", "tiny-test", "--clips-per-prompt", "1", "--limit", "1", "--frames", "5",
               "--out", str(out), "--quiet", "--vae-data", str(dataset / "heldout.jsonl"), "--vae-clips", "1"])
    assert rc == 0
    rec = json.loads((out / "report.json").read_text())["reconstruction"]
    assert rec["clips"] == 1 and rec["frames"] == [33]
    assert 0 < rec["psnr_db"] < 40  # a random tokenizer: far from the frames, but a finite figure
    assert "Tokenizer reconstruction" in (out / "report.md").read_text()
    assert "tokenizer reconstruction:" in capsys.readouterr().out


def test_evaluate_command_checks_the_judge(capsys):
    assert main(["evaluate", "--check-judge", "24"]) == 0
    assert "all three 100.0%" in capsys.readouterr().out


def test_recipe_vocabulary_is_the_shipped_one(tmp_path):
    """The recipe writes the words of the training captions as the demo model's vocabulary (what the pipeline warns
    against); 200 clips cover every training template and triple, so they give exactly the shipped list."""
    from infinitystar.demo import DEMO_WEIGHTS
    from infinitystar.demo.synthetic import make_dataset
    from infinitystar.text import read_vocabulary
    from infinitystar.train.data import caption_words

    jsonl = make_dataset(tmp_path, n_clips=200, seed=0, size=32, frames=5)
    assert caption_words(jsonl) == sorted(read_vocabulary(DEMO_WEIGHTS / "text_encoder"))


def test_evaluate_tasks_command_holds_the_tokenizer_against_its_target(dataset, tmp_path, capsys):
    out = tmp_path / "eval"
    rc = main(["evaluate", "--tasks", "i2v", "--limit", "1", "--clips-per-prompt", "1", "--out", str(out), "--quiet",
               "--vae-data", str(dataset / "heldout.jsonl"), "--vae-clips", "2"])
    assert rc == 0
    rows = {(m["task"], m["metric"]): m for m in json.loads((out / "report.json").read_text())["metrics"]}
    for name in ("PSNR, 33-frame held-out clips", "PSNR, all held-out clips"):
        row = rows[("tokenizer", name)]
        assert row["n"] == 2 and row["target"] == ev.TOKENIZER_PSNR_TARGET and row["met"] == (row["value"] >= 30)
    assert "| tokenizer | PSNR, all held-out clips |" in capsys.readouterr().out

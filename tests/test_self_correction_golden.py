"""Parity of the bitwise-self-correction training tokenizer with the reference (golden README sections 6, 9).

Every golden transformer case folder and each ``train_*`` file in it is one test id. From ``P raw_features``,
the recorded BSC flip masks, the trained repetition of each scale and the config, the tokenizer must
reproduce ``P x_BLC`` (atol 1e-5) and every scale's ``gt_bits`` and ``input_bits_after_bsc`` (exact).
The random flip source is checked for seed reproducibility and its flip rate.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import golden_cases
from infinitystar.config import QuantizerConfig
from infinitystar.train.self_correction import (
    GivenFlipMasks,
    NoFlips,
    RandomBitFlips,
    tokenize_for_training,
)
from infinitystar.vae.multiscale import build_steps, schedule_repetitions

CODE_ATOL = 1e-5  # section 9: "x_BLC ... atol 1e-5"
CALLS_KEY = "bsc_calls (in call order: scale-major, repeat-minor)"
FLIP_KEY = re.compile(r"^bsc_call(\d+)\.flip_mask$")
SCALE_KEY = re.compile(r"^scale(\d+)\.(gt_bits|input_bits_after_bsc)$")


def _train_files() -> list[tuple[Path, str]]:
    out = []
    for case_dir in golden_cases("transformer"):
        for f in sorted(case_dir.glob("train_*.safetensors")):
            out.append((case_dir, f.stem.split("_", 1)[1]))
    return out


TRAIN = _train_files()


class TrainCase:
    def __init__(self, case_dir: Path, prefix: str) -> None:
        config = json.loads((case_dir / "config.json").read_text())
        self.p = prefix
        self.args = config["other_args"]
        self.case = config["cases"][prefix]
        raw = load_file(str(case_dir / f"train_{prefix}.safetensors"))
        self.t = {k[len(prefix) + 1:]: v for k, v in raw.items() if k.startswith(prefix + ".")}
        self.qconfig = QuantizerConfig(
            semantic_dim=self.args["semantic_scale_dim"],
            detail_dim=self.args["detail_scale_dim"],
            detail_scale_min_tokens=self.args["detail_scale_min_tokens"],
        )
        self.schedule = [tuple(s) for s in self.case["scale_schedule"]]
        self.reps = schedule_repetitions(self.schedule, self.args["image_scale_repetition"],
                                         self.args["video_scale_repetition"])
        self.selected = [s["selected_repeat_idx"] for s in self.case["per_scale"]]
        self.frames_inner_clip = self.args["frames_inner_clip"]
        self.masks = {int(FLIP_KEY.match(k).group(1)): v for k, v in self.t.items() if FLIP_KEY.match(k)}


@pytest.fixture(scope="module", params=TRAIN, ids=[f"{d.name}-{p}" for d, p in TRAIN])
def tc(request) -> TrainCase:
    case_dir, prefix = request.param
    return TrainCase(case_dir, prefix)


def _tokenize(tc: TrainCase, source):
    return tokenize_for_training(tc.t["raw_features"], tc.schedule, tc.reps, tc.selected, tc.qconfig, source,
                                 frames_inner_clip=tc.frames_inner_clip)


def test_per_scale_and_bsc_calls_match_config(tc):
    """Repetitions, trained repeats, RoPE scale index, and the BSC call numbering (call k = step k over every
    repeat of every scale but the last) agree with the recorded run."""
    per_scale = tc.case["per_scale"]
    assert [s["repeats"] for s in per_scale] == tc.reps
    steps = build_steps(tc.schedule, tc.reps, tc.qconfig, tc.frames_inner_clip)
    calls = tc.case[CALLS_KEY]
    bsc_steps = [s for s in steps if s.scale_index < len(tc.schedule) - 1]
    assert [c["call"] for c in calls] == list(range(len(bsc_steps)))
    assert [c["scale_index"] for c in calls] == [s.scale_index for s in bsc_steps]
    for c in calls:
        assert c["stored"] == (c["n_flipped"] > 0)
        if c["stored"]:
            assert int(tc.masks[c["call"]].sum()) == c["n_flipped"]
    assert set(tc.masks) == {c["call"] for c in calls if c["stored"]}
    tokens = _tokenize(tc, GivenFlipMasks(tc.masks))
    assert tokens.real_si == [s["real_si (rope scale index)"] for s in per_scale]
    assert tokens.scale_lengths == tc.case["scale_lengths"][: len(tc.schedule)]
    assert sum(tokens.scale_lengths) == tc.case["visual_tokens"]


def test_tokenizer_matches_golden(tc):
    tokens = _tokenize(tc, GivenFlipMasks(tc.masks))
    want = tc.t["x_BLC"]
    assert tokens.x_BLC.shape == want.shape
    diff = (tokens.x_BLC - want).abs().max().item()
    assert diff <= CODE_ATOL, f"{tc.p}.x_BLC: max abs diff {diff:.3e}"
    checked = 0
    for name, ref in tc.t.items():
        m = SCALE_KEY.match(name)
        if not m:
            continue
        si, kind = int(m.group(1)), m.group(2)
        got = tokens.gt_bits[si] if kind == "gt_bits" else tokens.input_bits_after_bsc[si]
        assert got.shape == ref.shape, f"{tc.p}.{name}: shape {tuple(got.shape)} != {tuple(ref.shape)}"
        n_diff = int((got.long() != ref.long()).sum())
        assert n_diff == 0, f"{tc.p}.{name}: {n_diff} bits differ"
        checked += 1
    assert checked == 2 * len(tc.schedule)


def test_flips_change_the_history(tc):
    """Sanity of the parity test itself: without the recorded flips the labels of later scales differ."""
    if not tc.masks:
        pytest.skip("this case records no flips")
    clean = _tokenize(tc, NoFlips())
    noisy = _tokenize(tc, GivenFlipMasks(tc.masks))
    assert any(not torch.equal(a, b) for a, b in zip(clean.gt_bits, noisy.gt_bits))
    # Without flips the accumulated bits are the labels; with them, a trained repeat whose call flipped
    # bits accumulates exactly labels XOR mask (the labels stay clean).
    assert all(torch.equal(g.reshape(f.shape), f) for g, f in zip(clean.gt_bits, clean.input_bits_after_bsc))
    steps = build_steps(tc.schedule, tc.reps, tc.qconfig, tc.frames_inner_clip)
    call_of = {(s.scale_index, s.repeat_index): s.index for s in steps}
    for si, (g, f) in enumerate(zip(noisy.gt_bits, noisy.input_bits_after_bsc)):
        mask = tc.masks.get(call_of[(si, tc.selected[si])])
        expected = g.reshape(f.shape) if mask is None else g.reshape(f.shape) ^ mask
        assert torch.equal(f, expected), f"scale {si}"


def test_random_flips_reproducible_and_rate():
    torch.manual_seed(0)
    qc = QuantizerConfig(detail_scale_min_tokens=16)
    schedule = [(1, 1, 1), (1, 2, 2), (1, 4, 4), (1, 8, 8)]
    reps = [2, 2, 2, 1]
    latent = torch.randn(1, 64, 1, 8, 8) / 8

    def run(seed: int):
        src = RandomBitFlips(0.3, torch.Generator().manual_seed(seed))
        return _tokenize_plain(latent, schedule, reps, qc, src), src

    (a, sa), (b, sb), (c, sc) = run(1), run(1), run(2)
    assert sa.drawn == sb.drawn
    assert torch.equal(a.x_BLC, b.x_BLC)
    assert all(torch.equal(x, y) for x, y in zip(a.input_bits_after_bsc, b.input_bits_after_bsc))
    assert sa.drawn != sc.drawn or not torch.equal(a.x_BLC, c.x_BLC)
    # Strengths come from {0.00, ..., 0.30}; one call per repeat of every scale but the last.
    assert len(sa.drawn) == sum(reps[:-1])
    assert all(0.0 <= p <= 0.3 + 1e-9 and abs(p * 100 - round(p * 100)) < 1e-6 for p in sa.drawn)

    # Flip rate of a single call on many bits follows the drawn p.
    steps = build_steps([(1, 64, 64)], [1], QuantizerConfig(detail_scale_min_tokens=1))
    bits = torch.zeros(1, 1, 64, 64, 64, dtype=torch.uint8)
    src = RandomBitFlips(0.3, torch.Generator().manual_seed(3))
    rates = []
    for _ in range(20):
        mask = src.flip_mask(0, steps[0], bits)
        rates.append((src.drawn[-1], 0.0 if mask is None else mask.float().mean().item()))
    # 64^3 = 262144 Bernoulli(p) bits: standard error <= 0.5 / 512 = 0.001, so 0.01 is >= 10 of them.
    for p, rate in rates:
        assert abs(rate - p) < 0.01, f"drawn p={p}, flipped fraction {rate}"
    assert len({p for p, _ in rates}) > 3  # the strength itself is random per call
    assert RandomBitFlips(-1.0, torch.Generator()).flip_mask(0, steps[0], bits) is None  # inference: no BSC


def _tokenize_plain(latent, schedule, reps, qc, src):
    return tokenize_for_training(latent, schedule, reps, [r - 1 for r in reps], qc, src)

"""Guidance and bit sampling: parity with the reference's recorded inference, plus unit properties.

Golden: for every transformer case with an ``infer.safetensors``, APG(cond, uncond) with the case's
``cfg_list`` and ``apg_norm_threshold`` must reproduce ``guided_logits`` (atol 1e-3, golden README
section 9) at every step that stores both branches; and replaying the per-bit multinomial with a
CPU generator seeded ``g_seed`` over the stored guided logits of all steps, in order, must give the
stored bits (the generator is drawn exactly once per step and by nothing else).
"""

from __future__ import annotations

import ast
import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import golden_cases
from infinitystar.generation.sampling import (
    apg_guidance,
    apply_temperature,
    bit_logits_from_flat,
    bits_to_scale_grid,
    cfg_guidance,
    guide_logits,
    sample_bits,
)

APG_ATOL = 1e-3  # golden README section 9: guided (APG) logits

INFER_CASES = [c for c in golden_cases("transformer") if (c / "infer.safetensors").is_file()]


def _maybe_literal(value):
    # Some config entries are stored as Python-literal strings (e.g. the step list).
    return ast.literal_eval(value) if isinstance(value, str) else value


def _load_infer(case: Path):
    config = json.loads((case / "config.json").read_text())
    infer = config["cases"]["infer"]
    steps = _maybe_literal(infer["steps"])
    tensors = load_file(str(case / "infer.safetensors"))
    return config, infer, steps, tensors


@pytest.mark.parametrize("case", INFER_CASES, ids=[c.name for c in INFER_CASES])
def test_apg_reproduces_guided_logits(case: Path):
    config, infer, steps, tensors = _load_infer(case)
    threshold = float(config["other_args"]["apg_norm_threshold"])
    checked, max_diff = 0, 0.0
    for step in steps:
        key = f"infer.step{step['step']:02d}"
        if f"{key}.cond_logits" not in tensors:
            continue
        cond_1nd2 = tensors[f"{key}.cond_logits"]
        uncond_1nd2 = tensors[f"{key}.uncond_logits"]
        cfg = float(infer["cfg_list"][step["scale_index"]])
        # The reference's shape: [1, n, 2d] with raw head index 2*bit + value.
        guided_1nV = apg_guidance(cond_1nd2.flatten(2), uncond_1nd2.flatten(2), cfg, norm_threshold=threshold)
        guided = bit_logits_from_flat(guided_1nV)
        expected = tensors[f"{key}.guided_logits"]
        assert guided.shape == expected.shape
        diff = (guided - expected).abs().max().item()
        max_diff = max(max_diff, diff)
        assert diff <= APG_ATOL, f"{key}: APG max abs diff {diff:.3e} > {APG_ATOL}"
        # The [1, n, d, 2] view must give the same numbers (norms span every non-batch dim: the same reduction over
        # the same contiguous memory in both views, so bitwise in practice; 1e-6 is a formality).
        torch.testing.assert_close(apg_guidance(cond_1nd2, uncond_1nd2, cfg, threshold), guided, rtol=0, atol=1e-6)
        checked += 1
    assert checked > 0, f"{case.name}: no step stores cond/uncond logits"
    print(f"{case.name}: APG checked on {checked} steps, max abs diff {max_diff:.3e}")


@pytest.mark.parametrize("case", INFER_CASES, ids=[c.name for c in INFER_CASES])
def test_bit_sampling_replays_recorded_bits(case: Path):
    _, infer, steps, tensors = _load_infer(case)
    generator = torch.Generator().manual_seed(int(infer["g_seed"]))
    assert len(steps) == int(infer["num_steps"])
    for step in steps:
        key = f"infer.step{step['step']:02d}"
        bits = sample_bits(tensors[f"{key}.guided_logits"], generator)
        grid = bits_to_scale_grid(bits, step["scale"])
        expected = tensors[f"{key}.bits"].long()
        mismatches = int((grid != expected).sum())
        assert mismatches == 0, (
            f"{key}: {mismatches}/{expected.numel()} sampled bits differ from the reference "
            f"(torch {torch.__version__}; the golden run used CPU multinomial with seed {infer['g_seed']})"
        )


# ----------------------------------------------------------------------------------------------
# Unit properties
# ----------------------------------------------------------------------------------------------


def _random_logits(seed: int, shape=(1, 37, 16, 2)) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * 3


def test_sampling_reproducible_by_seed_and_seed_dependent():
    logits = _random_logits(0, (1, 200, 16, 2)) * 0.1  # near 50/50 so different seeds must disagree
    a = sample_bits(logits, torch.Generator().manual_seed(7))
    b = sample_bits(logits, torch.Generator().manual_seed(7))
    c = sample_bits(logits, torch.Generator().manual_seed(8))
    assert a.dtype == torch.int64 and a.shape == (1, 200, 16)
    assert set(a.unique().tolist()) <= {0, 1}
    assert torch.equal(a, b)
    # Two independent draws disagree with probability 2p(1-p) per bit, >= 0.29 here (|logit difference| < 1.6): the
    # disagreeing fraction of 3200 bits has mean >= 0.29 and standard error <= 0.009, so 0.2 is 10 of them below.
    assert (a != c).float().mean() > 0.2


def test_sampled_frequencies_match_softmax():
    # 8 probabilities x 50,000 draws each. Bound: 5 standard errors sqrt(p(1-p)/N) (<= 0.0112),
    # a false alarm has probability ~6e-7 per probability (and the draw is seeded anyway).
    probs_one = torch.tensor([0.001, 0.05, 0.2, 0.4, 0.5, 0.7, 0.93, 0.999])
    draws = 50_000
    logit_one = torch.log(probs_one) - torch.log1p(-probs_one)  # logit of value 1 relative to value 0
    logits = torch.stack([torch.zeros_like(logit_one), logit_one], dim=-1)  # [8, 2]
    logits_Bnd2 = logits.expand(1, draws, 8, 2).contiguous()
    bits = sample_bits(logits_Bnd2, torch.Generator().manual_seed(123))
    freq = bits.double().mean(dim=(0, 1))
    p = probs_one.double()
    bound = 5 * torch.sqrt(p * (1 - p) / draws)
    assert torch.all((freq - p).abs() <= bound), f"frequencies {freq.tolist()} vs probabilities {p.tolist()}"


def test_cfg_scale_one_returns_cond():
    logits = _random_logits(1, (2, 11, 64, 2)).flatten(2)
    for method in ("apg", "cfg"):
        out = guide_logits(logits, 1.0, method=method)
        assert torch.equal(out, logits[0:1])
    assert torch.equal(cfg_guidance(logits[0:1], logits[1:2], 1.0), logits[0:1])
    assert torch.equal(apg_guidance(logits[0:1], logits[1:2], 1.0, 0.05), logits[0:1])


def test_cfg_formula():
    c, u = _random_logits(2).flatten(2), _random_logits(3).flatten(2)
    # Element-wise float32 in other groupings: a few roundings of 34|c| + 33|u| (|c|, |u| < 16): <= 5e-5 where the
    # result is small, and rtol covers large results.
    torch.testing.assert_close(cfg_guidance(c, u, 34.0), u + 34.0 * (c - u), rtol=1e-5, atol=1e-4)
    out = guide_logits(torch.cat([c, u]), 34.0, method="cfg")
    torch.testing.assert_close(out, 34.0 * c - 33.0 * u, rtol=1e-5, atol=1e-4)


def test_apg_zero_difference_returns_cond():
    c = _random_logits(4).flatten(2)
    assert torch.equal(apg_guidance(c, c.clone(), 34.0, norm_threshold=0.05), c)
    assert torch.equal(apg_guidance(c, c.clone(), 34.0, norm_threshold=0.0), c)


def test_apg_update_is_orthogonal_to_cond_and_rms_capped():
    c, u = _random_logits(5).flatten(2), _random_logits(6).flatten(2)
    cfg, thr = 34.0, 0.05
    update = (apg_guidance(c, u, cfg, norm_threshold=thr) - c).double() / (cfg - 1)
    cos = (update * c.double()).sum() / (update.norm() * c.double().norm())
    assert abs(cos.item()) < 1e-5
    rms = update.norm() / math.sqrt(update.numel())
    assert rms.item() <= thr * (1 + 1e-4)
    # Without the cap the update is the full orthogonal part of c - u.
    d = (c - u).double()
    unit = c.double() / c.double().norm()
    orth = d - (d * unit).sum() * unit
    torch.testing.assert_close(apg_guidance(c, u, cfg, norm_threshold=0.0).double(), c.double() + (cfg - 1) * orth,
                               rtol=0, atol=1e-3)


def test_apg_norms_are_per_batch_row():
    c, u = _random_logits(7, (2, 9, 16, 2)).flatten(2), _random_logits(8, (2, 9, 16, 2)).flatten(2)
    both = apg_guidance(c, u, 34.0, 0.05)
    # Each row's norms are the same contiguous reduction whether the batch holds 1 row or 2: bitwise in practice.
    for row in range(2):
        torch.testing.assert_close(both[row:row + 1], apg_guidance(c[row:row + 1], u[row:row + 1], 34.0, 0.05))


def test_temperature():
    x = _random_logits(9)
    assert torch.equal(apply_temperature(x, 0.4), x * (1 / 0.4))
    assert torch.equal(apply_temperature(x, 1.0), x)
    with pytest.raises(ValueError, match="tau"):
        apply_temperature(x, 0.0)


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="shape"):
        apg_guidance(torch.zeros(1, 4, 8), torch.zeros(1, 4, 6), 34.0)
    with pytest.raises(ValueError, match="batch of 2"):
        guide_logits(torch.zeros(3, 4, 8), 34.0)
    with pytest.raises(ValueError, match="dim of 2"):
        sample_bits(torch.zeros(1, 4, 3))
    with pytest.raises(ValueError, match="scale"):
        bits_to_scale_grid(torch.zeros(1, 5, 16, dtype=torch.long), (1, 2, 2))

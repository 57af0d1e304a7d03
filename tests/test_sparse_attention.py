"""Segment-sparse training attention against the dense masked SDPA path and an explicit float64 softmax.

Layouts come from the project's own packing code (``build_packed_layout``: scale, text and padding segments and
the real visibility rule), drawn at random with 2-3 samples of small schedules, plus hand-made rules for the
cases the packed layout never produces (rows that see nothing in mid-sequence, shared key sets, interleaved
segment ids).
"""

from __future__ import annotations

import gc
import math
import random

import pytest
import torch

from conftest import float32_rounding_tolerance
from infinitystar.config import get_preset
from infinitystar.generation.schedules import clip_layout
from infinitystar.transformer import sparse_attention
from infinitystar.transformer.attention import SegmentMask, attend
from infinitystar.transformer.sequence import PackedSample, build_packed_layout
from infinitystar.transformer.sparse_attention import segment_sparse_attention, sparse_attention_plan

pytestmark = pytest.mark.usefixtures("one_thread")  # small tensors

TINY = get_preset("transformer", "tiny-test")
IMAGE = [(1, 1, 1), (1, 2, 2), (1, 3, 3), (1, 4, 4)]
VIDEO = [(1, 1, 1), (1, 2, 2), (1, 4, 4), (2, 1, 1), (2, 2, 2), (2, 4, 4)]
VIDEO3 = [(1, 1, 1), (1, 2, 2), (1, 3, 3), (2, 1, 1), (2, 2, 2), (2, 3, 3), (2, 1, 1), (2, 2, 2), (2, 3, 3)]
FRAMES_INNER_CLIP = 2  # keeps VIDEO3's third clip inside the tiny model's RoPE frame range


def random_layout(seed: int):
    """A packed layout of 2-3 samples with random schedules, scale subsets (closed under the clip references, as
    training's subsets are) and text lengths; returns the layout and its mask."""
    rng = random.Random(seed)
    samples = []
    for _ in range(rng.choice([2, 3])):
        schedule = rng.choice([IMAGE, VIDEO, VIDEO3])
        refs = clip_layout(schedule, FRAMES_INNER_CLIP)
        ids = {si for si in range(len(schedule)) if rng.random() < 0.6} or {len(schedule) - 1}
        ids |= {r for si in ids for r in refs[si].ref_sids}
        ids = sorted(ids)
        samples.append(PackedSample(schedule, ids, ids, text_len=rng.randint(1, 8),
                                    frames_inner_clip=FRAMES_INNER_CLIP))
    layout = build_packed_layout(samples, TINY)
    return layout, SegmentMask(layout.segment_ids(), layout.segment_mask)


def qkv(L: int, heads: int, kv_heads: int, seed: int, head_dim: int = 16, grad: bool = True):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(1, heads, L, head_dim, generator=gen)
    k = torch.randn(1, kv_heads, L, head_dim, generator=gen)
    v = torch.randn(1, kv_heads, L, head_dim, generator=gen)
    return tuple(t.requires_grad_(grad) for t in (q, k, v))


def reference_float64(q, k, v, mask: SegmentMask, d_out):
    """Explicit masked softmax in float64 (kv head j serves query heads j*g ..), blind rows zero; returns the output,
    the q/k/v gradients of ``sum(out * d_out)`` and the float64 intermediates the tolerances are sized from."""
    g = q.shape[1] // k.shape[1]
    q64, k64, v64 = (t.detach().double().requires_grad_(True) for t in (q, k, v))
    kr, vr = k64.repeat_interleave(g, dim=1), v64.repeat_interleave(g, dim=1)
    seg = mask.segment_ids
    vis = mask.rule[seg][:, seg]
    s = (q64 @ kr.transpose(-1, -2)) * q.shape[-1] ** -0.5
    p = torch.softmax(s.masked_fill(~vis, -math.inf), dim=-1).nan_to_num(0.0)  # rows that see nothing: 0
    out = p @ vr
    grads = torch.autograd.grad(out, (q64, k64, v64), d_out.double())
    with torch.no_grad():
        dp = d_out.double() @ vr.transpose(-1, -2)
        delta = (d_out.double() * out).sum(-1, keepdim=True)
        ds_terms = (p * (dp.abs() + delta.abs())).abs().max().item()  # |dS| = |P (dP - delta)| <= this
        s_max = s.masked_fill(~vis, 0).abs().max().item()
    return out.detach(), grads, ds_terms, s_max


def tolerances(q, k, v, d_out, ds_terms: float, s_max: float) -> dict[str, float]:
    """Float32 rounding bounds of the attention output and gradients (conftest's model: ~sqrt(n) roundoffs of the
    magnitude of the terms per sum of n, summed in quadrature along the path).

    The scores sum over the head dim; a score's rounding moves exp(s) relatively by the absolute error of s, which
    scales with |s|, hence the factor (1 + max|s|) on every term. Output: terms p*v <= max|v|, sums over the
    keys for the softmax normaliser and the weighted sum. dV: terms p*dO. dQ/dK: terms scale*dS*k (or q), after
    dP (sum over the value dim), the row correction delta and the sum over keys (or queries).
    """
    L, D, Dv = q.shape[2], q.shape[3], v.shape[3]
    amp = 1.0 + s_max
    scale = D ** -0.5
    qk_max = max(q.abs().max().item(), k.abs().max().item())
    return {
        "out": float32_rounding_tolerance(v.abs().max().item() * amp, [D, L, L]),
        "dv": float32_rounding_tolerance(d_out.abs().max().item() * amp, [D, L, L, L]),
        "dq": float32_rounding_tolerance(scale * ds_terms * qk_max * amp, [D, L, L, Dv, Dv, L]),
        "dk": float32_rounding_tolerance(scale * ds_terms * qk_max * amp, [D, L, L, Dv, Dv, L]),
    }


def check_against_dense(mask: SegmentMask, heads: int, kv_heads: int, seed: int, compare_dense: bool = True):
    """Sparse vs the dense masked path and vs float64, output and gradients; returns the sparse output and grads."""
    q, k, v = qkv(mask.length, heads, kv_heads, seed)
    d_out = torch.randn(q.shape, generator=torch.Generator().manual_seed(seed + 1))
    ref, ref_grads, ds_terms, s_max = reference_float64(q, k, v, mask, d_out)
    tol = tolerances(q, k, v, d_out, ds_terms, s_max)
    out = segment_sparse_attention(q, k, v, mask, q.shape[-1] ** -0.5)
    grads = torch.autograd.grad(out, (q, k, v), d_out)
    assert out.shape == q.shape
    assert (out.double() - ref).abs().max() <= tol["out"]
    for name, g, r in zip(("dq", "dk", "dv"), grads, ref_grads):
        assert (g.double() - r).abs().max() <= tol[name], name
    if compare_dense:
        dense = attend(q, k, v, mask, "sdpa")
        dense_grads = torch.autograd.grad(dense, (q, k, v), d_out)
        assert (out - dense).abs().max() <= tol["out"]
        for name, g, r in zip(("dq", "dk", "dv"), grads, dense_grads):
            assert (g - r).abs().max() <= tol[name], name
    return out, grads


# ----------------------------------------------------------------------------------------------
# Packed layouts of the project
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("heads,kv_heads", [(4, 2), (4, 4)], ids=["gqa", "mha"])
@pytest.mark.parametrize("seed", range(4))
def test_random_packed_layouts_match_dense_path(seed, heads, kv_heads) -> None:
    layout, mask = random_layout(seed)
    out, (dq, dk, dv) = check_against_dense(mask, heads, kv_heads, seed)
    # Padding rows see nothing: exactly zero output, and nothing flows into or out of them.
    start = layout.seq_len - layout.pad_len
    if layout.pad_len:
        assert out[:, :, start:].abs().max() == 0
        assert dq[:, :, start:].abs().max() == 0
        assert dk[:, :, start:].abs().max() == 0 and dv[:, :, start:].abs().max() == 0
    assert torch.isfinite(out).all()


def test_plan_groups_and_visible_pairs_of_a_packed_layout() -> None:
    layout, mask = random_layout(0)
    plan = sparse_attention_plan(mask)
    assert plan.sliced
    # One group per visual scale and per text (each sees itself), the padding in none.
    n_seg = len(layout.segment_lengths) - (1 if layout.pad_len else 0)
    assert len(plan.groups) == n_seg
    assert plan.blind_rows == layout.pad_len
    seg = mask.segment_ids
    assert plan.visible_pairs == int(mask.rule[seg][:, seg].sum())
    assert plan.visible_fraction < 0.5  # the point of the exercise


@pytest.mark.parametrize("heads,kv_heads", [(4, 2), (4, 4)], ids=["gqa", "mha"])
def test_forward_without_grad_uses_kernel_gqa_and_matches(heads, kv_heads) -> None:
    """Without autograd the kv heads are expanded by the kernel (enable_gqa), not repeated: same results."""
    _, mask = random_layout(7)
    q, k, v = qkv(mask.length, heads, kv_heads, 7, grad=False)
    with torch.no_grad():
        out = segment_sparse_attention(q, k, v, mask, 0.25)
        dense = attend(q, k, v, mask, "sdpa")
    d_out = torch.zeros_like(q)
    ref, _, ds_terms, s_max = reference_float64(q, k, v, mask, d_out)
    tol = tolerances(q, k, v, d_out, ds_terms, s_max)["out"]
    assert (out - dense).abs().max() <= tol
    assert (out.double() - ref).abs().max() <= tol


# ----------------------------------------------------------------------------------------------
# Hand-made rules: blind rows mid-sequence, shared key sets, non-contiguous keys, interleaved ids
# ----------------------------------------------------------------------------------------------


def handmade_mask() -> SegmentMask:
    """Segments 0..5 over 96 tokens. 0 and 3 share one key set (non-contiguous queries, keys {1, 2}: one run over
    two segments); 1 sees {0, 4} (two runs); 2 sees nothing (blind, mid-sequence); 4 sees itself; 5 sees {5, 0, 2}."""
    lengths = [10, 20, 7, 15, 30, 14]
    seg = torch.repeat_interleave(torch.arange(6), torch.tensor(lengths))
    rule = torch.zeros(6, 6, dtype=torch.bool)
    for s, keys in {0: (1, 2), 3: (1, 2), 1: (0, 4), 4: (4,), 5: (5, 0, 2)}.items():
        rule[s, list(keys)] = True
    return SegmentMask(seg, rule)


@pytest.mark.parametrize("heads,kv_heads", [(4, 2), (4, 4)], ids=["gqa", "mha"])
def test_rows_that_see_nothing_are_zero_mid_sequence(heads, kv_heads) -> None:
    mask = handmade_mask()
    plan = sparse_attention_plan(mask)
    assert len(plan.groups) == 4  # {0, 3} share one; 2 is blind
    assert plan.blind_rows == 7
    out, (dq, _, _) = check_against_dense(mask, heads, kv_heads, seed=11)
    assert out[:, :, 30:37].abs().max() == 0
    assert dq[:, :, 30:37].abs().max() == 0


@pytest.mark.parametrize("heads,kv_heads", [(4, 2), (4, 4)], ids=["gqa", "mha"])
def test_interleaved_segment_ids_use_the_index_path(monkeypatch, heads, kv_heads) -> None:
    """Segment ids that change at nearly every token (beyond the sliced plan's run budget) gather by index."""
    gen = torch.Generator().manual_seed(4)
    seg = torch.randint(0, 4, (80,), generator=gen)
    rule = torch.tensor([[1, 0, 1, 0], [1, 1, 0, 0], [0, 0, 0, 0], [0, 1, 0, 1]], dtype=torch.bool)
    mask = SegmentMask(seg, rule)
    monkeypatch.setattr(sparse_attention, "MAX_SLICED_RUNS", 4)
    assert not sparse_attention_plan(mask).sliced
    out, _ = check_against_dense(mask, heads, kv_heads, seed=5)
    assert out[:, :, seg == 2].abs().max() == 0


def test_a_rule_allowing_only_absent_segments_gives_zero_rows() -> None:
    """Segment 1 may see only segment 2, which has no tokens: it sees nothing (zero, as FlexAttention). The dense
    path leaves such a row fully masked (NaN), so only the float64 reference is compared."""
    seg = torch.tensor([0] * 12 + [1] * 9)
    rule = torch.tensor([[1, 0, 0], [0, 0, 1], [0, 0, 1]], dtype=torch.bool)
    mask = SegmentMask(seg, rule)
    out, (dq, _, _) = check_against_dense(mask, 2, 1, seed=2, compare_dense=False)
    assert out[:, :, 12:].abs().max() == 0 and dq[:, :, 12:].abs().max() == 0


def test_all_rows_blind_gives_zeros_with_zero_gradients() -> None:
    mask = SegmentMask(torch.zeros(16, dtype=torch.int64), torch.zeros(1, 1, dtype=torch.bool))
    q, k, v = qkv(16, 2, 2, seed=0)
    out = segment_sparse_attention(q, k, v, mask, 0.25)
    assert out.shape == q.shape and out.abs().max() == 0
    # A constant: it contributes nothing to the gradients of a loss that uses it.
    (out.sum() + q.sum() + k.sum() + v.sum()).backward()
    for t in (q, k, v):
        assert torch.equal(t.grad, torch.ones_like(t))


# ----------------------------------------------------------------------------------------------
# Plan cache and input checks
# ----------------------------------------------------------------------------------------------


def test_plan_is_cached_per_mask_and_rebuilt_when_its_tensors_change() -> None:
    mask = handmade_mask()
    plan = sparse_attention_plan(mask)
    assert sparse_attention_plan(mask) is plan
    other = SegmentMask(mask.segment_ids, mask.rule.clone())
    assert sparse_attention_plan(other) is not plan
    mask.rule[2, 2] = True  # in place: segment 2 now sees itself
    replanned = sparse_attention_plan(mask)
    assert replanned is not plan and replanned.blind_rows == 0
    key = id(mask)
    del mask
    gc.collect()
    assert key not in sparse_attention._PLANS


def test_bad_inputs_raise_one_clear_error() -> None:
    mask = handmade_mask()
    q, k, v = qkv(96, 4, 2, seed=0, grad=False)
    with pytest.raises(ValueError, match="mask covers 96 tokens, the sequence has 95"):
        segment_sparse_attention(q[:, :, :95], k[:, :, :95], v[:, :, :95], mask, 0.25)
    with pytest.raises(ValueError, match="not a multiple of 3 key/value heads"):
        segment_sparse_attention(q, k.repeat(1, 2, 1, 1)[:, :3], v.repeat(1, 2, 1, 1)[:, :3], mask, 0.25)
    with pytest.raises(ValueError, match="must be .B, H, L, D."):
        segment_sparse_attention(q[0], k, v, mask, 0.25)
    bad = SegmentMask(mask.segment_ids + 3, mask.rule)
    with pytest.raises(ValueError, match="outside the rule's 6 segments"):
        segment_sparse_attention(q, k, v, bad, 0.25)

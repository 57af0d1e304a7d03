"""The transformer on a CUDA GPU: bf16 KV-cached steps through SDPA flash, compiled blocks, compiled flex training.

Every test here is marked ``cuda`` (conftest skips them where torch.cuda.is_available() is False); the CPU side
of the same features is tested in tests/test_attention_kernels.py.

bf16 bounds (used throughout): bf16 keeps 8 significant bits, so round-to-nearest errs by at most u = 2^-8
relative per rounding. Along a block's path from its input to its output there are 15 roundings of activations
(the stream cast, 2 norm outputs, q/k/v, the q/k norms, 2 RoPE roundings, attention, o_proj, a residual add,
gate/up, silu, the product, down_proj, a residual add) and 7 of the projections' bf16 weights: 22 per block,
plus the final norm's output. With unit-gain weights nothing amplifies a relative error; independent roundings,
each uniform in +-u, add up to an rms of u * sqrt(n / 3), and we allow 4 of those (as tests/test_precision.py).
Comparisons are relative Frobenius norms over all logits (or one gradient tensor), which this rms describes; a
real bug (a wrong mask, kv-head mapping, position or cache entry) moves them by a sizeable fraction of 1.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from conftest import float32_rounding_tolerance, kv_cached_step_logits, realistic_transformer, transformer_rounding_path
from infinitystar.config import get_preset, precision_policy
from infinitystar.train.step import TrainSample, train_step
from infinitystar.transformer.attention import SegmentMask
from infinitystar.transformer.model import InfinityStarTransformer
from infinitystar.transformer.sequence import PackedSample, build_packed_layout

pytestmark = pytest.mark.cuda

TINY = get_preset("transformer", "tiny-test")  # depth 4, 4 query heads over 2 kv heads, head_dim 32
VIDEO = [(1, 1, 1), (1, 2, 2), (1, 4, 4), (2, 1, 1), (2, 2, 2), (2, 4, 4)]
CUDA = torch.device("cuda")
BF16_UNIT_ROUNDOFF = 2.0**-8


def bf16_relative_bound(depth: int, passes: int = 1) -> float:
    """4 rms of the relative error of ``passes`` bf16 traversals of a depth-``depth`` stack (see the docstring);
    a backward traverses the stack once more, with as many roundings of its gradients as the forward has."""
    n = passes * (22 * depth + 1)
    return 4 * BF16_UNIT_ROUNDOFF * math.sqrt(n / 3)


def _relative(a: torch.Tensor, ref: torch.Tensor) -> float:
    return float((a.float() - ref.float()).norm() / ref.float().norm())


def _model(seed: int = 0) -> InfinityStarTransformer:
    """Weights of fan-in gain 1 (realistic activations), norm gains near 1, small biases; float32 on the GPU."""
    return realistic_transformer(TINY, seed).to(CUDA)


def _bf16(model: InfinityStarTransformer) -> InfinityStarTransformer:
    out = copy.deepcopy(model)
    out.set_precision(precision_policy("bf16"))
    assert next(out.blocks.parameters()).dtype == torch.bfloat16
    return out


def _generate(model: InfinityStarTransformer, negative_len: int | None = None, seed: int = 1) -> torch.Tensor:
    """Prefill with guidance (a negative prompt of another length pads a text row: a key mask), then every step
    of a two-clip video with fixed inputs; all step logits, flattened, in float32."""
    out = kv_cached_step_logits(model, VIDEO, negative_len=negative_len, seed=seed, device=CUDA)
    for logits in out:
        assert logits.device.type == CUDA.type and logits.dtype == torch.float32
    return torch.cat([logits.flatten() for logits in out])


# ----------------------------------------------------------------------------------------------
# KV-cached inference in bf16
# ----------------------------------------------------------------------------------------------


def test_bf16_kv_cached_steps_stay_close_to_fp32() -> None:
    model = _model()
    fp32 = _generate(model)
    bf16 = _generate(_bf16(model))
    rel = _relative(bf16, fp32)
    assert torch.isfinite(bf16).all()
    assert rel <= bf16_relative_bound(TINY.depth), rel
    assert rel > BF16_UNIT_ROUNDOFF / 16  # the blocks really ran in bf16 (float32 kernels differ by ~1e-6)


def test_flash_takes_the_unpadded_kv_cached_steps() -> None:
    """Flash alone (no fallback enabled) runs the prefill and every step in bf16: it accepts a query shorter than
    the keys, no mask and GQA. Flash and math are both within the bf16 bound of the float32 run."""
    model = _model()
    fp32 = _generate(model)
    bf16 = _bf16(model)
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        flash = _generate(bf16)
    with sdpa_kernel(SDPBackend.MATH):
        math_ = _generate(bf16)
    bound = bf16_relative_bound(TINY.depth)
    assert _relative(flash, fp32) <= bound
    assert _relative(math_, fp32) <= bound


def test_padded_negative_prompt_falls_back_from_flash() -> None:
    """A negative prompt of another length masks padded keys: flash refuses a mask, and the default priority moves
    on to cuDNN / memory-efficient, which match the float32 run within the bf16 bound."""
    model = _model()
    bf16 = _bf16(model)
    with pytest.raises(RuntimeError), sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        _generate(bf16, negative_len=9)
    fp32 = _generate(model, negative_len=9)
    with sdpa_kernel([SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]):
        fused = _generate(bf16, negative_len=9)
    assert _relative(fused, fp32) <= bf16_relative_bound(TINY.depth)
    assert _relative(_generate(bf16, negative_len=9), fp32) <= bf16_relative_bound(TINY.depth)


def test_compiled_blocks_match_eager_on_cuda() -> None:
    model = _model()
    eager_fp32 = _generate(model)
    eager_masked = _generate(model, negative_len=9)
    bf16 = _bf16(model)
    compiled = copy.deepcopy(model)
    compiled.compile_blocks()
    bf16.compile_blocks()
    assert compiled.compiled_blocks and bf16.compiled_blocks
    # float32: the same formula rounded differently (fused elementwise chains, other reduction orders) along the
    # path; keys: 9 padded text rows + the previous clip's last scale (16) + the own 32 tokens.
    path = transformer_rounding_path(model, 9 + 16 + 32)
    for negative_len, eager in ((None, eager_fp32), (9, eager_masked)):
        out = _generate(compiled, negative_len)
        tol = float32_rounding_tolerance(eager.abs().max().item(), path)
        assert (out - eager).abs().max() <= tol
    # bf16: inductor may keep a fused chain in float32 where eager rounds to bf16 in between: each run is within
    # the bf16 bound of the float32 one.
    assert _relative(_generate(bf16), eager_fp32) <= bf16_relative_bound(TINY.depth)


# ----------------------------------------------------------------------------------------------
# Training: compiled FlexAttention with the block mask vs dense SDPA
# ----------------------------------------------------------------------------------------------


def _train_samples(seed: int = 2) -> list[TrainSample]:
    """An image and a two-clip video of random inputs and bit labels, on the GPU."""
    gen = torch.Generator().manual_seed(seed)
    specs = [(VIDEO[:3], (0, 1, 2), [0, 2, 4], 5), (VIDEO, tuple(range(6)), [1, 2, 3, 5, 6, 7], 7)]
    packed = [PackedSample(s, ids, rsi, n) for s, ids, rsi, n in specs]
    semantic = iter(build_packed_layout(packed, TINY).semantic)
    samples = []
    for schedule, ids, rsi, text_len in specs:
        inputs, labels = [], []
        for si in ids:
            n = math.prod(schedule[si])
            bits = TINY.semantic_bits if next(semantic) else TINY.detail_bits
            inputs.append((torch.randn(1, n, TINY.d_vae, generator=gen) * 0.3).to(CUDA))
            labels.append(torch.randint(0, 2, (1, n, bits), generator=gen).to(CUDA))
        text = torch.randn(text_len, TINY.text_channels, generator=gen).to(CUDA)
        samples.append(TrainSample(schedule, ids, inputs, labels, rsi, text))
    return samples


def _train_grads(backend: str, autocast: torch.dtype | None) -> tuple[float, dict[str, torch.Tensor]]:
    model = _model(seed=3).train()
    metrics = train_step(model, None, _train_samples(), grad_clip=0, backend=backend, autocast_dtype=autocast,
                         uncond=[False, True])
    return metrics.loss, {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def test_block_mask_is_built_on_the_gpu() -> None:
    seg = torch.tensor([0] * 100 + [1] * 156, device=CUDA)
    mask = SegmentMask(seg, torch.tensor([[True, False], [True, True]], device=CUDA))
    assert mask.block_mask().kv_num_blocks.device.type == CUDA.type


def test_compiled_flex_training_step_matches_dense_sdpa() -> None:
    """One training step as the trainer runs it on a GPU (bf16 autocast, backend "flex" = compiled flex_attention
    with the block mask) against the dense masked SDPA, and both against a float32 dense step: loss and every
    gradient within the bf16 bound of a forward plus a backward pass."""
    loss_ref, g_ref = _train_grads("sdpa", None)
    loss_flex, g_flex = _train_grads("flex", torch.bfloat16)
    loss_sdpa, g_sdpa = _train_grads("sdpa", torch.bfloat16)
    assert set(g_flex) == set(g_sdpa) == set(g_ref) and "uncond_text" in g_ref
    # The per-bit loss has slope at most 1 in the logit margin m (two-class cross entropy), so the loss moves by at
    # most the mean |dm| <= fwd * rms(m). With labels independent of the margins, softplus(+-m) >= max(0, +-m) gives
    # loss >= mean|m| / 2, and rms(m) <= 1.5 mean|m| for bell-shaped margins: |d loss| <= 3 * fwd * loss.
    fwd = bf16_relative_bound(TINY.depth)
    assert abs(loss_flex - loss_ref) <= 3 * fwd * loss_ref
    assert abs(loss_sdpa - loss_ref) <= 3 * fwd * loss_ref
    bound = bf16_relative_bound(TINY.depth, passes=2)
    for name, ref in g_ref.items():
        if ref.norm() == 0:  # e.g. the unconditional rows beyond the dropped text: exactly zero on every path
            assert g_flex[name].norm() == 0 and g_sdpa[name].norm() == 0, name
            continue
        assert _relative(g_flex[name], ref) <= bound, (name, _relative(g_flex[name], ref))
        assert _relative(g_sdpa[name], ref) <= bound, (name, _relative(g_sdpa[name], ref))

"""Attention kernels on the CPU: SDPA's in-kernel GQA, the CUDA kernel priority, eager flex, compiled blocks.

The CUDA side of the same features (flash in bf16, compiled flex training, compiled blocks on a GPU) is in
tests/test_cuda_transformer.py.
"""

from __future__ import annotations

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from conftest import float32_rounding_tolerance, kv_cached_step_logits, realistic_transformer, transformer_rounding_path
from infinitystar.config import get_preset
from infinitystar.transformer import attention
from infinitystar.transformer.attention import (
    CUDA_INFERENCE_KERNELS,
    SegmentMask,
    attend,
    inference_attention_kernels,
)
from infinitystar.transformer.model import InfinityStarTransformer

TINY = get_preset("transformer", "tiny-test")  # 4 query heads over 2 kv heads: GQA with groups of 2
VIDEO = [(1, 1, 1), (1, 2, 2), (1, 4, 4), (2, 1, 1), (2, 2, 2), (2, 4, 4)]
EAGER_FLEX = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models


def _model(seed: int = 0) -> InfinityStarTransformer:
    """Weights of fan-in gain 1 (realistic activations), norm gains near 1, small biases."""
    return realistic_transformer(TINY, seed)


def _generate(model: InfinityStarTransformer, negative_len: int | None, seed: int = 1) -> list[torch.Tensor]:
    """Prefill (guidance, optionally a negative prompt of another length: padded keys) and every step of a
    two-clip video (the second clip attends the first clip's last scale), as the generation loop drives them."""
    return kv_cached_step_logits(model, VIDEO, negative_len=negative_len, seed=seed)


# ----------------------------------------------------------------------------------------------
# SDPA with the kv heads expanded in the kernel
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("negative_len", [None, 9], ids=["no-mask", "padded-negative"])
def test_in_kernel_gqa_is_bit_identical_to_repeated_kv_on_cpu(monkeypatch, negative_len) -> None:
    """The golden parity rests on this: without gradients, SDPA's enable_gqa gives the very bits of the explicit
    repeat_interleave it replaces, with and without a key-padding mask."""
    model = _model()
    in_kernel = _generate(model, negative_len)
    monkeypatch.setattr(attention, "_kv_groups_in_kernel", lambda q, k, v: False)
    repeated = _generate(model, negative_len)
    for a, b in zip(in_kernel, repeated):
        assert torch.equal(a, b)


def test_cpu_training_keeps_the_explicit_repeat() -> None:
    """K/V that need a gradient take the repeat on CPU (its backward sums a group in the order the training
    golden numbers were made with); without autograd, and on accelerators, the kernel expands the heads."""
    q, k, v = (torch.randn(1, h, 8, 16) for h in (4, 2, 2))
    assert attention._kv_groups_in_kernel(q, k, v)
    k.requires_grad_(True)
    assert not attention._kv_groups_in_kernel(q, k, v)
    with torch.no_grad():
        assert attention._kv_groups_in_kernel(q, k, v)
    assert attention._kv_groups_in_kernel(q.to("meta"), k.to("meta"), v.to("meta"))


def test_cuda_kernel_priority_is_scoped_and_cpu_untouched() -> None:
    before = torch._C._get_sdp_priority_order()
    flags = [torch.backends.cuda.flash_sdp_enabled(), torch.backends.cuda.math_sdp_enabled()]
    with inference_attention_kernels("cpu"):
        assert torch._C._get_sdp_priority_order() == before
    with inference_attention_kernels(torch.device("cuda", 0)):
        order = torch._C._get_sdp_priority_order()
        assert order[:len(CUDA_INFERENCE_KERNELS)] == [int(b) for b in CUDA_INFERENCE_KERNELS]
        assert order[0] == int(SDPBackend.FLASH_ATTENTION)
        assert torch.backends.cuda.math_sdp_enabled()  # the fallback stays available
    assert torch._C._get_sdp_priority_order() == before
    assert [torch.backends.cuda.flash_sdp_enabled(), torch.backends.cuda.math_sdp_enabled()] == flags
    # A caller's choice of kernels stands: only the order among the enabled ones is set.
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION), inference_attention_kernels("cuda"):
        assert torch.backends.cuda.flash_sdp_enabled()
        assert not (torch.backends.cuda.math_sdp_enabled() or torch.backends.cuda.mem_efficient_sdp_enabled()
                    or torch.backends.cuda.cudnn_sdp_enabled())
    assert [torch.backends.cuda.flash_sdp_enabled(), torch.backends.cuda.math_sdp_enabled()] == flags


def test_compiled_flex_is_built_once() -> None:
    assert attention.compiled_flex_attention() is attention.compiled_flex_attention()


# ----------------------------------------------------------------------------------------------
# FlexAttention on the CPU: eager (its forward equals the dense path's: test_transformer.py; torch has no CPU
# backward for flex, so the gradients are compared on CUDA in test_cuda_transformer.py)
# ----------------------------------------------------------------------------------------------


@EAGER_FLEX
def test_flex_stays_eager_on_cpu(monkeypatch) -> None:
    def refuse():
        raise AssertionError("compiled flex requested on the CPU")

    monkeypatch.setattr(attention, "compiled_flex_attention", refuse)
    seg = torch.tensor([0] * 64 + [1] * 64)
    mask = SegmentMask(seg, torch.tensor([[True, False], [True, True]]))
    q, k, v = (torch.randn(1, h, 128, 16) for h in (4, 2, 2))
    assert torch.isfinite(attend(q, k, v, mask, "flex")).all()


# ----------------------------------------------------------------------------------------------
# Opt-in compiled blocks
# ----------------------------------------------------------------------------------------------


@pytest.mark.slow  # ~10 s with a warm inductor cache, ~45 s cold (the C++ compiler): the tiny model's graphs
def test_compiled_blocks_match_eager_steps() -> None:
    model = _model()
    eager = _generate(model, negative_len=9)
    eager_plain = _generate(model, negative_len=None)
    keys = list(model.state_dict())
    assert not model.compiled_blocks
    model.compile_blocks()
    assert model.compiled_blocks
    # Compiled in place: checkpoints save and load under the same names.
    assert list(model.state_dict()) == keys
    compiled = _generate(model, negative_len=9)
    compiled_plain = _generate(model, negative_len=None)
    # Inductor fuses the elementwise chains (norms, RoPE, SwiGLU) and may reorder float32 sums: the same formula
    # rounded differently along the whole path; the longest key list is the text (9 padded rows), the first
    # clip's last scale (16) and the own 32 tokens.
    path = transformer_rounding_path(model, 9 + 16 + 32)
    for a, b in zip(eager + eager_plain, compiled + compiled_plain):
        assert a.shape == b.shape
        assert (a - b).abs().max() <= float32_rounding_tolerance(a.abs().max().item(), path)


# ----------------------------------------------------------------------------------------------
# The preallocated KV cache
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("negative_len", [None, 9], ids=["no-mask", "padded-negative"])
def test_preallocated_cache_gives_the_concatenating_caches_bits(negative_len) -> None:
    """The work buffer hands SDPA the same keys in the same order as the concatenation (a strided view instead of a
    fresh tensor), over a two-clip video whose second clip changes the context to the first clip's last scale."""
    model = _model()
    model.kv_cache_preallocate = False
    concatenated = _generate(model, negative_len)
    model.kv_cache_preallocate = True
    preallocated = _generate(model, negative_len)
    assert len(preallocated) == len(VIDEO)
    for a, b in zip(preallocated, concatenated):
        assert torch.equal(a, b)


def test_preallocated_cache_copies_the_context_once_per_layout_and_follows_changed_entries() -> None:
    """A step with the context of the previous step reuses the buffer's context (no copy, no new buffer); a changed
    entry (map_keys, put, keep_only) is copied in again, so a step never reads stale keys."""
    cache = attention.KVCache(1, preallocate=True)
    g = torch.Generator().manual_seed(0)

    def kv(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.randn(2, 2, n, 8, generator=g), torch.randn(2, 2, n, 8, generator=g)

    cache.put(0, "text", *kv(5))
    cache.put(0, 3, *kv(4))
    own = kv(6)
    k1, _ = cache.attention_keys(0, (3, "text"), *own)
    buffer = cache._work[0].k
    k2, v2 = cache.attention_keys(0, (3, "text"), *kv(5))
    assert cache._work[0].k is buffer and k2.data_ptr() == k1.data_ptr()  # same buffer, context kept
    (kt,), (vt,) = cache.get(0, ["text"])
    assert torch.equal(k2[:, :, 4:9], kt) and torch.equal(v2[:, :, 4:9], vt)
    bigger = kv(20)  # past the capacity: a new, larger buffer with the context copied in
    k_big, v_big = cache.attention_keys(0, (3, "text"), *bigger)
    assert cache._work[0].k is not buffer and k_big.shape[2] == 29
    assert torch.equal(k_big[:, :, 9:], bigger[0]) and torch.equal(v_big[:, :, 4:9], vt)

    cache.map_keys(3, lambda k: k * 2)
    k3, _ = cache.attention_keys(0, (3, "text"), *own)
    (k_ref,), _ = cache.get(0, [3])
    assert torch.equal(k3, torch.cat([k_ref, kt, own[0]], dim=2))

    cache.keep_only({"text"})
    cache.put(0, 3, *kv(4))  # a new entry under an old id
    k4, _ = cache.attention_keys(0, (3, "text"), *own)
    (k_new,), _ = cache.get(0, [3])
    assert torch.equal(k4[:, :, :4], k_new)
    assert cache.work_nbytes() > 0 and cache.nbytes() == sum(t.numel() * 4 for t in (k_new, k_new, kt, vt))
    cache.release_work_buffers()
    assert cache.work_nbytes() == 0


def test_cache_default_layout_follows_the_device() -> None:
    model = _model()
    assert model.new_cache().preallocate is True  # a CPU model
    assert attention.KVCache.default_preallocate("cuda") is False
    model.kv_cache_preallocate = False
    assert model.new_cache().preallocate is False
    assert model.new_cache(preallocate=True).preallocate is True

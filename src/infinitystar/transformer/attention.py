"""GQA self-attention with QK-RMSNorm, one attention function with three backends, and the KV cache.

Backends of :func:`attend` (the model calls nothing else):

* ``"sdpa"``: ``scaled_dot_product_attention``. At inference the caller concatenates exactly the
  keys a query may see (no mask). For a packed training sequence it computes only the visible blocks
  (:func:`~infinitystar.transformer.sparse_attention.segment_sparse_attention`: the query segments that see the same
  keys form a group, one unmasked SDPA per group; 20-26 % of the pairs at the official schedules), which equals the
  dense masked result within float rounding.
* ``"dense"``: the former packed-training path, kept for comparison: one SDPA with a dense boolean
  ``[L, L]`` mask built from the segment rule; rows that may see nothing (padding) are given their
  own key so the softmax stays finite (a fully masked row is NaN in SDPA, and NaN leaks through
  ``0 * NaN`` in both the forward and the backward), then zeroed, which is FlexAttention's result.
* ``"flex"``: ``torch.nn.attention.flex_attention`` with a block mask from the same rule (GPU
  training). On CUDA it goes through one ``torch.compile``d flex_attention (:func:`compiled_flex_attention`):
  eager flex materializes the full score matrix and is the slow reference path. On CPU it stays eager
  (compiled flex with this data-dependent mask crashes there, and would cost minutes of compilation).

GQA: SDPA's ``enable_gqa`` serves kv head j to query heads ``j*g .. j*g+g-1`` without materializing the
repeated K/V. Flash, cuDNN and memory-efficient SDPA accept it on CUDA (PyTorch's ``sdp_utils.cpp`` of the
2.13 era; on ROCm memory-efficient does not); a kernel that refuses it only passes the call to the next one.
On CPU its forward is bit-identical to the explicit ``repeat_interleave`` (tests/test_attention_kernels.py),
but its K/V gradients sum the group's contributions in another order, so CPU *training* keeps the
explicit repeat (the training golden numbers stay bit-identical); see :func:`_kv_groups_in_kernel`.

Kernel choice at inference (:func:`inference_attention_kernels`): on CUDA, SDPA tries flash, then cuDNN,
then memory-efficient, then math. A KV-cached step has no causal mask (the query sees every cached key),
which flash takes even though the query is shorter than the keys. The one case flash cannot take is a
key-padding mask: guidance with a negative prompt of another length than the prompt pads the shorter text
row. Avoiding it (each row's text cached unpadded, one SDPA per row) would be the same mathematics but not
the same bits as the reference's padded batch of 2 (other blocking of the sums, two GEMM shapes instead of
one), and twice the kernel launches per block. So that case runs on cuDNN or the memory-efficient kernel
(both take a boolean mask and GQA); the common cases (no negative prompt, one of the prompt's length, or no
guidance) have no mask and run on flash.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Hashable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.flex_attention import BlockMask, flex_attention

from .rope import apply_rope
from .sparse_attention import kv_groups_in_kernel as _kv_groups_in_kernel
from .sparse_attention import segment_sparse_attention

Backend = Literal["sdpa", "flex", "dense"]


class RMSNorm(nn.Module):
    """``x * rsqrt(mean(x^2) + eps) * weight`` computed in float32, returned in the input dtype."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        y = xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        return (y * self.weight.float()).to(x.dtype)


# ----------------------------------------------------------------------------------------------
# Masks
# ----------------------------------------------------------------------------------------------


@dataclass
class SegmentMask:
    """Token-level view of a segment rule: token q sees token k iff ``rule[seg[q], seg[k]]``.

    Builds (and caches) the dense mask for SDPA or the block mask for FlexAttention on demand.
    """

    segment_ids: torch.Tensor  # [L] int64
    rule: torch.Tensor  # [S, S] bool
    _dense: torch.Tensor | None = field(default=None, repr=False)
    _visible_rows: torch.Tensor | None = field(default=None, repr=False)
    _block: BlockMask | None = field(default=None, repr=False)

    @property
    def length(self) -> int:
        return int(self.segment_ids.shape[0])

    def to(self, device: torch.device | str) -> SegmentMask:
        return SegmentMask(self.segment_ids.to(device), self.rule.to(device))

    def visible_rows(self) -> torch.Tensor:
        """``[L]`` bool: queries that see at least one key."""
        if self._visible_rows is None:
            self._visible_rows = self.rule.any(dim=1)[self.segment_ids]
        return self._visible_rows

    def dense(self) -> torch.Tensor:
        """``[L, L]`` bool for SDPA; rows that see nothing get their diagonal (their output is zeroed later)."""
        if self._dense is None:
            seg = self.segment_ids
            dense = self.rule[seg][:, seg]
            blind = ~self.visible_rows()
            idx = torch.nonzero(blind).flatten()
            dense[idx, idx] = True
            self._dense = dense
        return self._dense

    def block_mask(self) -> BlockMask:
        """FlexAttention's block mask of the rule, on the device of the segment ids.

        Built from per-tile segment counts (:func:`segment_block_mask`), the same block mask as
        ``create_block_mask`` without its dense ``[L, L]`` mask (and the int64 gather indices behind it: ~9 L^2
        bytes, 9 GB at 32k tokens).
        """
        if self._block is None:
            seg, rule = self.segment_ids, self.rule

            def mask_mod(b, h, q_idx, kv_idx):
                return rule[seg[q_idx], seg[kv_idx]]

            self._block = segment_block_mask(seg, rule, mask_mod)
        return self._block


FLEX_TILE = 128  # FlexAttention's default sparse block size


def segment_block_mask(segment_ids: torch.Tensor, rule: torch.Tensor, mask_mod: Callable,
                       tile: int = FLEX_TILE) -> BlockMask:
    """The block mask ``create_block_mask(mask_mod, ...)`` would build for "q sees k iff rule[seg[q], seg[k]]".

    The visible (query, key) pairs of tile pair (i, j) are ``sum_{s,t} n[i,s] rule[s,t] n[j,t]`` with ``n[i,s]``
    the tokens of segment s in tile i: one small matrix product instead of the ``[L, L]`` mask. It runs in
    float64 (exact integers far beyond tile^2, and never TF32). A tile pair is full when all tile^2 pairs are
    visible (a last, short tile never is: torch pads it with invisible pairs), partial when some are.
    """
    L = int(segment_ids.shape[0])
    dev = segment_ids.device
    tiles = -(-L // tile)
    counts = torch.zeros(tiles, rule.shape[0], dtype=torch.float64, device=dev)
    tile_of = torch.arange(L, device=dev) // tile
    counts.index_put_((tile_of, segment_ids), torch.ones(L, dtype=torch.float64, device=dev), accumulate=True)
    visible = counts @ rule.to(torch.float64) @ counts.T
    full = visible == tile * tile
    partial = (visible > 0) & ~full

    def ordered(dense_TT: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # Per query tile: how many kv tiles, and their indices first (ascending), as create_block_mask orders them.
        dense = dense_TT.to(torch.int32)[None, None]
        order = torch.argsort(dense, dim=-1, descending=True, stable=True)
        return dense.sum(dim=-1).to(torch.int32), order.to(torch.int32)

    kv_num, kv_idx = ordered(partial)
    full_num, full_idx = ordered(full)
    return BlockMask.from_kv_blocks(kv_num, kv_idx, full_num, full_idx, BLOCK_SIZE=tile, mask_mod=mask_mod,
                                    seq_lengths=(L, L))


# Inference SDPA kernels on CUDA, best first; math last so that anything the fused kernels refuse still runs.
CUDA_INFERENCE_KERNELS = (SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                          SDPBackend.MATH)


def inference_attention_kernels(device: torch.device | str) -> contextlib.AbstractContextManager:
    """Context for the KV-cached forwards: on CUDA, SDPA tries flash, cuDNN, memory-efficient, math in that order.

    torch's own order on Hopper/Blackwell puts cuDNN first; flash is preferred here because it takes every
    unpadded step shape (query shorter than the keys, no mask, GQA) and needs no per-shape plan. The caller
    enters it around the block loop, outside any compiled region, so a compiled block traces its SDPA under it.
    Only the order changes: a backend the caller switched off (``sdpa_kernel(SDPBackend.FLASH_ATTENTION)`` around a
    generation, say) stays off. Elsewhere (CPU) nothing changes.
    """
    if torch.device(device).type != "cuda":
        return contextlib.nullcontext()
    enabled = {
        SDPBackend.FLASH_ATTENTION: torch.backends.cuda.flash_sdp_enabled(),
        SDPBackend.CUDNN_ATTENTION: torch.backends.cuda.cudnn_sdp_enabled(),
        SDPBackend.EFFICIENT_ATTENTION: torch.backends.cuda.mem_efficient_sdp_enabled(),
        SDPBackend.MATH: torch.backends.cuda.math_sdp_enabled(),
    }
    return sdpa_kernel([b for b in CUDA_INFERENCE_KERNELS if enabled[b]], set_priority=True)


@functools.cache
def compiled_flex_attention() -> Callable[..., torch.Tensor]:
    """``flex_attention`` under ``torch.compile``, built once per process on first use (CUDA training).

    Compiled, flex generates one fused kernel that skips the masked blocks of the block mask; eager flex
    computes and materializes the full score matrix. Shapes change from step to step (packed lengths), so
    torch's automatic dynamic shapes recompile once for a new length and then generalize.
    """
    return torch.compile(flex_attention)


def attend(
    q_BHLD: torch.Tensor,
    k_BHLD: torch.Tensor,
    v_BHLD: torch.Tensor,
    mask: SegmentMask | None = None,
    backend: Backend = "sdpa",
    key_mask_BL: torch.Tensor | None = None,
) -> torch.Tensor:
    """Softmax attention (scale ``D**-0.5``, no causal mask) with GQA; returns ``[B, H, Lq, D]``.

    ``key_mask_BL`` (inference, SDPA only; True = real key) hides padded keys, e.g. the padding of a
    negative prompt shorter or longer than the prompt in the batch-of-2 text prefix.

    ``k``/``v`` may have fewer heads than ``q``; kv head j serves query heads ``j*g .. j*g+g-1``.
    ``mask`` (packed training) restricts which keys each query sees; without it every query sees
    every key given (inference: the caller passes exactly the visible keys).
    """
    heads, kv_heads = q_BHLD.shape[1], k_BHLD.shape[1]
    if heads % kv_heads:
        raise ValueError(f"{heads} query heads are not a multiple of {kv_heads} key/value heads")
    scale = q_BHLD.shape[-1] ** -0.5
    if backend == "flex":
        block = mask.block_mask() if mask is not None else None
        if not q_BHLD.is_cuda:
            return flex_attention(q_BHLD, k_BHLD, v_BHLD, block_mask=block, scale=scale, enable_gqa=heads != kv_heads)
        # The fused kernel gets one dtype (the blocks' autocast already made q/k/v bf16; it accumulates in
        # float32 itself) and no ambient autocast: autocast around compiled flex is a known source of dtype-mixing
        # failures in its backward.
        with torch.autocast("cuda", enabled=False):
            return compiled_flex_attention()(q_BHLD, k_BHLD.to(q_BHLD.dtype), v_BHLD.to(q_BHLD.dtype),
                                             block_mask=block, scale=scale, enable_gqa=heads != kv_heads)
    if backend not in ("sdpa", "dense"):
        raise ValueError(f"unknown attention backend {backend!r}; expected 'sdpa', 'flex' or 'dense'")
    if backend == "sdpa" and mask is not None and key_mask_BL is None:
        # Packed training: only the visible blocks (segment groups), not the dense [L, L] mask.
        return segment_sparse_attention(q_BHLD, k_BHLD, v_BHLD, mask, scale)
    groups = heads // kv_heads
    gqa = groups > 1
    if gqa and not _kv_groups_in_kernel(q_BHLD, k_BHLD, v_BHLD):
        k_BHLD = k_BHLD.repeat_interleave(groups, dim=1)
        v_BHLD = v_BHLD.repeat_interleave(groups, dim=1)
        gqa = False
    if key_mask_BL is not None:
        if mask is not None:
            raise ValueError("key_mask_BL is for cached inference; packed training uses the segment mask")
        return F.scaled_dot_product_attention(q_BHLD, k_BHLD, v_BHLD, attn_mask=key_mask_BL[:, None, None, :],
                                              scale=scale, enable_gqa=gqa)
    if mask is None:
        return F.scaled_dot_product_attention(q_BHLD, k_BHLD, v_BHLD, scale=scale, enable_gqa=gqa)
    out = F.scaled_dot_product_attention(q_BHLD, k_BHLD, v_BHLD, attn_mask=mask.dense(), scale=scale,
                                         enable_gqa=gqa)
    keep = mask.visible_rows().to(out.dtype)[:, None]
    return out * keep


# ----------------------------------------------------------------------------------------------
# KV cache
# ----------------------------------------------------------------------------------------------


class KVCache:
    """Post-RoPE keys/values of earlier segments, per layer, keyed by segment id.

    Keys are the text prefix (``TEXT``) and scale indices. A step attends to
    ``[cache[r] for r in refs] + [cache[TEXT]] + [its own keys]``, in that order (the reference's).
    The generation loop calls :meth:`keep_only` with the ids later steps can still see, to free the rest.

    With ``preallocate`` every layer also owns a work buffer laid out ``[context | own]``: the context entries are
    copied in when a step's context changes (once per clip: every scale of a clip sees the same references) and each
    step writes only its own keys after them, so attention reads one view instead of a concatenation of the whole
    context per layer and step. The buffer grows by doubling (a handful of allocations per generation) and holds a
    second copy of the context, so it trades memory for copies: the default (:meth:`default_preallocate`) is on for
    the CPU, where the copies cost time, and off for CUDA, where they are cheap next to the kernels and memory is the
    limit (the memory model, ``infinitystar.memory.estimate``, counts the concatenating cache). Both give the same
    bits: the kernel sees the same numbers in the same order.
    """

    TEXT: Hashable = "text"

    def __init__(self, depth: int, preallocate: bool = False) -> None:
        self.depth = depth
        self.preallocate = preallocate
        self._store: list[dict[Hashable, tuple[torch.Tensor, torch.Tensor]]] = [{} for _ in range(depth)]
        # Key-padding masks [B, L] (True = real key) of entries that have padding; shared by all layers.
        self._key_masks: dict[Hashable, torch.Tensor] = {}
        self._work: list[_WorkBuffer | None] = [None] * depth

    @staticmethod
    def default_preallocate(device: torch.device | str) -> bool:
        """Whether a cache for ``device`` preallocates its work buffers (see the class docstring): on the CPU only."""
        return torch.device(device).type == "cpu"

    def put(self, layer: int, key: Hashable, k_BHLD: torch.Tensor, v_BHLD: torch.Tensor) -> None:
        self._store[layer][key] = (k_BHLD, v_BHLD)
        self._invalidate(key)

    def get(self, layer: int, keys: Sequence[Hashable]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        store = self._store[layer]
        missing = [k for k in keys if k not in store]
        if missing:
            raise KeyError(f"KV cache of layer {layer} holds {sorted(map(str, store))}, not {missing}")
        return [store[k][0] for k in keys], [store[k][1] for k in keys]

    def attention_keys(self, layer: int, context: Sequence[Hashable], k_own_BHLD: torch.Tensor,
                       v_own_BHLD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``[cache[c] for c in context] + own`` along the tokens, for K and V: the keys a step attends to."""
        if not context:
            return k_own_BHLD, v_own_BHLD
        ks, vs = self.get(layer, context)
        if not self.preallocate:
            return torch.cat([*ks, k_own_BHLD], dim=2), torch.cat([*vs, v_own_BHLD], dim=2)
        context = tuple(context)
        ctx_len = sum(k.shape[2] for k in ks)
        end = ctx_len + k_own_BHLD.shape[2]
        work = self._work[layer]
        if work is None or not work.fits(k_own_BHLD, v_own_BHLD, end):
            capacity = end if work is None else max(end, 2 * work.k.shape[2])
            work = self._work[layer] = _WorkBuffer.like(k_own_BHLD, v_own_BHLD, capacity)
        if work.context != context:
            start = 0
            for k, v in zip(ks, vs):
                n = k.shape[2]
                work.k[:, :, start:start + n].copy_(k)
                work.v[:, :, start:start + n].copy_(v)
                start += n
            work.context = context
        work.k[:, :, ctx_len:end].copy_(k_own_BHLD)
        work.v[:, :, ctx_len:end].copy_(v_own_BHLD)
        return work.k[:, :, :end], work.v[:, :, :end]

    def _invalidate(self, key: Hashable) -> None:
        """Forget every work-buffer layout holding ``key`` (its entry changed or left)."""
        for work in self._work:
            if work is not None and work.context is not None and key in work.context:
                work.context = None

    def map_keys(self, key: Hashable, fn) -> None:
        """Replace the cached keys of entry ``key`` by ``fn(k)`` in every layer (values unchanged), e.g. to move
        them to other RoPE positions."""
        for store in self._store:
            k, v = store[key]
            store[key] = (fn(k), v)
        self._invalidate(key)

    def set_key_mask(self, key: Hashable, mask_BL: torch.Tensor) -> None:
        self._key_masks[key] = mask_BL

    def key_mask(self, keys: Sequence[Hashable], own_mask_BL: torch.Tensor | None, own_len: int,
                 batch: int) -> torch.Tensor | None:
        """The [B, Lk] key mask of ``[cache[k] for k in keys] + own``, or None when nothing is padded."""
        if own_mask_BL is None and not any(k in self._key_masks for k in keys):
            return None
        parts = []
        for k in keys:
            m = self._key_masks.get(k)
            if m is None:
                kt = self._store[0][k][0]
                m = torch.ones(batch, kt.shape[2], dtype=torch.bool, device=kt.device)
            parts.append(m.expand(batch, -1))
        if own_mask_BL is None:
            dev = parts[0].device
            own_mask_BL = torch.ones(batch, own_len, dtype=torch.bool, device=dev)
        parts.append(own_mask_BL)
        return torch.cat(parts, dim=1)

    def keys(self) -> list[Hashable]:
        return list(self._store[0]) if self.depth else []

    def __contains__(self, key: Hashable) -> bool:
        return self.depth > 0 and key in self._store[0]

    def keep_only(self, keys: Iterable[Hashable]) -> None:
        """Drop every cached segment not in ``keys``."""
        keep = set(keys)
        for store in self._store:
            for k in [k for k in store if k not in keep]:
                del store[k]
                self._invalidate(k)
        for k in [k for k in self._key_masks if k not in keep]:
            del self._key_masks[k]

    def release_work_buffers(self) -> None:
        """Free the preallocated work buffers (the cached entries stay); the next step allocates them again."""
        self._work = [None] * self.depth

    def nbytes(self) -> int:
        """Bytes of the cached entries (what later steps can read); the work buffers are :meth:`work_nbytes`."""
        return sum(k.numel() * k.element_size() + v.numel() * v.element_size()
                   for store in self._store for k, v in store.values())

    def work_nbytes(self) -> int:
        """Bytes of the preallocated work buffers (0 without ``preallocate``)."""
        return sum(w.k.numel() * w.k.element_size() * 2 for w in self._work if w is not None)


@dataclass
class _WorkBuffer:
    """One layer's ``[context | own]`` K and V, ``[B, H_kv, capacity, D]``; ``context`` is the layout they hold."""

    k: torch.Tensor
    v: torch.Tensor
    context: tuple[Hashable, ...] | None = None

    @classmethod
    def like(cls, k_BHLD: torch.Tensor, v_BHLD: torch.Tensor, capacity: int) -> _WorkBuffer:
        B, H, _, D = k_BHLD.shape
        return cls(k_BHLD.new_empty(B, H, capacity, D), v_BHLD.new_empty(B, H, capacity, v_BHLD.shape[-1]))

    def fits(self, k_BHLD: torch.Tensor, v_BHLD: torch.Tensor, length: int) -> bool:
        k, v = self.k, self.v
        return (k.shape[:2] == k_BHLD.shape[:2] and k.shape[3] == k_BHLD.shape[3] and v.shape[3] == v_BHLD.shape[3]
                and k.dtype == k_BHLD.dtype and v.dtype == v_BHLD.dtype and k.device == k_BHLD.device
                and k.shape[2] >= length)


@dataclass
class CacheStep:
    """How one cached forward uses the cache: read ``context`` ids first, store own K/V as ``store_as``."""

    cache: KVCache
    context: tuple[Hashable, ...] = ()
    store_as: Hashable | None = None
    # [B, L] mask of this step's own keys (True = real token), stored with them; None = no padding.
    key_mask: torch.Tensor | None = None


# ----------------------------------------------------------------------------------------------
# Module
# ----------------------------------------------------------------------------------------------


class SelfAttention(nn.Module):
    """GQA self-attention: projections, per-head QK-RMSNorm, 4-axis RoPE (after the norm), attention, output."""

    def __init__(self, dim: int, num_heads: int, num_kv_heads: int, head_dim: int, bias: bool = False,
                 eps: float = 1e-6) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.q_proj = nn.Linear(dim, num_heads * head_dim, bias=bias)
        self.k_proj = nn.Linear(dim, num_kv_heads * head_dim, bias=bias)
        self.v_proj = nn.Linear(dim, num_kv_heads * head_dim, bias=bias)
        self.o_proj = nn.Linear(num_heads * head_dim, dim, bias=bias)
        self.q_norm = RMSNorm(head_dim, eps)
        self.k_norm = RMSNorm(head_dim, eps)

    def forward(
        self,
        x_BLC: torch.Tensor,
        rope_2LD: torch.Tensor,
        mask: SegmentMask | None = None,
        backend: Backend = "sdpa",
        cache_step: CacheStep | None = None,
        layer: int = 0,
    ) -> torch.Tensor:
        B, L, _ = x_BLC.shape
        q = self.q_norm(self.q_proj(x_BLC).view(B, L, self.num_heads, self.head_dim)).transpose(1, 2)
        k = self.k_norm(self.k_proj(x_BLC).view(B, L, self.num_kv_heads, self.head_dim)).transpose(1, 2)
        v = self.v_proj(x_BLC).view(B, L, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, rope_2LD), apply_rope(k, rope_2LD)
        key_mask = None
        if cache_step is not None:
            k, v, key_mask = _exchange_with_cache(cache_step, layer, k, v)
        o = attend(q, k, v, mask, backend, key_mask_BL=key_mask)
        return self.o_proj(o.transpose(1, 2).reshape(B, L, self.num_heads * self.head_dim))


@torch.compiler.disable
def _exchange_with_cache(step: CacheStep, layer: int, k_BHLD: torch.Tensor,
                         v_BHLD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Store this step's K/V (if asked), and return ``[cached context ; own]`` K/V and their key mask.

    Kept out of ``torch.compile`` (one clean graph break per block): it is dictionary bookkeeping on Python
    objects whose keys and lengths change every step; the compute on either side of it stays compiled.
    """
    B, L = k_BHLD.shape[0], k_BHLD.shape[2]
    cache = step.cache
    key_mask = cache.key_mask(step.context, step.key_mask, L, B)
    if step.store_as is not None:
        cache.put(layer, step.store_as, k_BHLD, v_BHLD)
        if step.key_mask is not None and layer == 0:
            cache.set_key_mask(step.store_as, step.key_mask)
    k_BHLD, v_BHLD = cache.attention_keys(layer, step.context, k_BHLD, v_BHLD)
    return k_BHLD, v_BHLD, key_mask

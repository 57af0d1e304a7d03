"""GQA self-attention with QK-RMSNorm, one attention function with two backends, and the KV cache.

Backends of :func:`attend` (the model calls nothing else):

* ``"sdpa"``: ``scaled_dot_product_attention``. At inference the caller concatenates exactly the
  keys a query may see (no mask). For a packed training sequence on CPU it takes a dense boolean
  ``[L, L]`` mask built from the segment rule; rows that may see nothing (padding) are given their
  own key so the softmax stays finite (a fully masked row is NaN in SDPA, and NaN leaks through
  ``0 * NaN`` in both the forward and the backward), then zeroed, which is FlexAttention's result.
* ``"flex"``: ``torch.nn.attention.flex_attention`` with a block mask from the same rule (GPU
  training). It is used eagerly here; compiling it is the caller's business (on CPU, compiled flex
  with this data-dependent mask crashes, so don't).
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

from .rope import apply_rope

Backend = Literal["sdpa", "flex"]


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
        if self._block is None:
            seg, rule = self.segment_ids, self.rule

            def mask_mod(b, h, q_idx, kv_idx):
                return rule[seg[q_idx], seg[kv_idx]]

            self._block = create_block_mask(mask_mod, B=None, H=None, Q_LEN=self.length, KV_LEN=self.length,
                                            device=seg.device)
        return self._block


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
        return flex_attention(q_BHLD, k_BHLD, v_BHLD, block_mask=block, scale=scale, enable_gqa=heads != kv_heads)
    if backend != "sdpa":
        raise ValueError(f"unknown attention backend {backend!r}; expected 'sdpa' or 'flex'")
    groups = heads // kv_heads
    if groups > 1:
        k_BHLD = k_BHLD.repeat_interleave(groups, dim=1)
        v_BHLD = v_BHLD.repeat_interleave(groups, dim=1)
    if key_mask_BL is not None:
        if mask is not None:
            raise ValueError("key_mask_BL is for cached inference; packed training uses the segment mask")
        return F.scaled_dot_product_attention(q_BHLD, k_BHLD, v_BHLD, attn_mask=key_mask_BL[:, None, None, :],
                                              scale=scale)
    if mask is None:
        return F.scaled_dot_product_attention(q_BHLD, k_BHLD, v_BHLD, scale=scale)
    out = F.scaled_dot_product_attention(q_BHLD, k_BHLD, v_BHLD, attn_mask=mask.dense(), scale=scale)
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
    """

    TEXT: Hashable = "text"

    def __init__(self, depth: int) -> None:
        self.depth = depth
        self._store: list[dict[Hashable, tuple[torch.Tensor, torch.Tensor]]] = [{} for _ in range(depth)]
        # Key-padding masks [B, L] (True = real key) of entries that have padding; shared by all layers.
        self._key_masks: dict[Hashable, torch.Tensor] = {}

    def put(self, layer: int, key: Hashable, k_BHLD: torch.Tensor, v_BHLD: torch.Tensor) -> None:
        self._store[layer][key] = (k_BHLD, v_BHLD)

    def get(self, layer: int, keys: Sequence[Hashable]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        store = self._store[layer]
        missing = [k for k in keys if k not in store]
        if missing:
            raise KeyError(f"KV cache of layer {layer} holds {sorted(map(str, store))}, not {missing}")
        return [store[k][0] for k in keys], [store[k][1] for k in keys]

    def map_keys(self, key: Hashable, fn) -> None:
        """Replace the cached keys of entry ``key`` by ``fn(k)`` in every layer (values unchanged), e.g. to move
        them to other RoPE positions."""
        for store in self._store:
            k, v = store[key]
            store[key] = (fn(k), v)

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
        for k in [k for k in self._key_masks if k not in keep]:
            del self._key_masks[k]

    def nbytes(self) -> int:
        return sum(k.numel() * k.element_size() + v.numel() * v.element_size()
                   for store in self._store for k, v in store.values())


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
            key_mask = cache_step.cache.key_mask(cache_step.context, cache_step.key_mask, L, B)
            if cache_step.store_as is not None:
                cache_step.cache.put(layer, cache_step.store_as, k, v)
                if cache_step.key_mask is not None and layer == 0:
                    cache_step.cache.set_key_mask(cache_step.store_as, cache_step.key_mask)
            if cache_step.context:
                ks, vs = cache_step.cache.get(layer, cache_step.context)
                k = torch.cat([*ks, k], dim=2)
                v = torch.cat([*vs, v], dim=2)
        o = attend(q, k, v, mask, backend, key_mask_BL=key_mask)
        return self.o_proj(o.transpose(1, 2).reshape(B, L, self.num_heads * self.head_dim))

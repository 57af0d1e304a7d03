"""The InfinityStar spacetime transformer: a plain decoder-only stack over [text prefix ; visual tokens].

No AdaLN, no cross-attention, no position table, no dropout: text conditions through self-attention
to the projected text tokens, and scale/time/space identity is carried only by the 4-axis RoPE.

Reading order: :class:`SwiGLU`, :class:`Block`, :class:`InfinityStarTransformer` (with its two
entry points, :meth:`~InfinityStarTransformer.forward_packed` for training and
:meth:`~InfinityStarTransformer.prefill_text` / :meth:`~InfinityStarTransformer.step` for
KV-cached inference). Official checkpoint key names live in ``infinitystar.checkpoints`` only.

Dtypes: the embeddings and the heads always run in float32 with autocast off (as the reference);
the blocks follow :meth:`~InfinityStarTransformer.set_precision` (weights and autocast), else the caller's
autocast and their parameter dtype.
"""

from __future__ import annotations

import contextlib
from collections.abc import Hashable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ..config import PrecisionPolicy, TransformerConfig
from .attention import Backend, CacheStep, KVCache, RMSNorm, SegmentMask, SelfAttention, inference_attention_kernels
from .rope import rope_table, text_positions, visual_positions
from .sequence import PackedLayout


class SwiGLU(nn.Module):
    """``down(silu(gate(x)) * up(x))``, bias-free (Qwen3 MLP)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(nn.functional.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    """Pre-norm block: ``h = x + attn(norm(x)); out = h + mlp(norm(h))``."""

    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(cfg.embed_dim, cfg.norm_eps)
        self.attn = SelfAttention(cfg.embed_dim, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.qkvo_bias,
                                  cfg.norm_eps)
        self.mlp_norm = RMSNorm(cfg.embed_dim, cfg.norm_eps)
        self.mlp = SwiGLU(cfg.embed_dim, cfg.mlp_intermediate)

    def forward(self, x: torch.Tensor, rope: torch.Tensor, mask: SegmentMask | None = None, backend: Backend = "sdpa",
                cache_step: CacheStep | None = None, layer: int = 0) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), rope, mask, backend, cache_step, layer)
        return x + self.mlp(self.mlp_norm(x))


@dataclass
class PackedOutput:
    """Result of a packed forward: bit logits ``[1, n_s, d_s, 2]`` per visual scale (packed order)."""

    logits: list[torch.Tensor]
    hidden: torch.Tensor  # [1, L, C] final block output (before the final norm), padding included
    block_outputs: list[torch.Tensor] | None = None  # [1, L, C] per block, if requested


class InfinityStarTransformer(nn.Module):
    """Bitwise next-scale predictor. Build with a :class:`~infinitystar.config.TransformerConfig`."""

    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__()
        self.cfg = cfg
        C = cfg.embed_dim
        # Learned text for the unconditional branch (CFG/APG and training condition dropout).
        self.uncond_text = nn.Parameter(torch.empty(cfg.text_maxlen, cfg.text_channels))
        self.text_proj = nn.Linear(cfg.text_channels, C)
        self.code_embed = nn.Linear(cfg.d_vae, C)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.depth))
        self.final_norm = RMSNorm(C, cfg.norm_eps)
        self.detail_head = nn.Linear(C, 2 * cfg.detail_bits)
        self.semantic_head = nn.Linear(C, 2 * cfg.semantic_bits)
        # Autocast dtype of the block stack (None = the caller's autocast, if any); see set_precision.
        self.block_autocast: torch.dtype | None = None
        # KV-cache layout of new_cache() (None: by device); benchmarks set False to time the concatenating cache.
        self.kv_cache_preallocate: bool | None = None
        if not any(p.is_meta for p in self.parameters()):
            self.reset_parameters()

    # ------------------------------------------------------------------ init

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """The reference's effective training init: Linear weights N(0, 0.02), biases 0, norms 1, and the
        unconditional text truncated-normal(std 1.2, cut at +-2) / sqrt(text_channels) from a CPU generator seeded 0."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, RMSNorm):
                nn.init.ones_(m.weight)
        gen = torch.Generator().manual_seed(0)
        uncond = torch.empty(self.uncond_text.shape)
        nn.init.trunc_normal_(uncond, std=1.2, a=-2.0, b=2.0, generator=gen)
        self.uncond_text.copy_(uncond / self.cfg.text_channels ** 0.5)

    # ------------------------------------------------------------------ precision

    def set_precision(self, policy: PrecisionPolicy) -> None:
        """Cast the blocks to ``policy.block_dtype`` and run them under ``policy.block_autocast``.

        Everything outside the blocks (uncond text, text_proj, code_embed, final norm, heads) stays float32.
        A float32 -> bf16 -> float32 round trip keeps the bf16-rounded weights (reload for exact float32).
        """
        self.blocks.to(policy.block_dtype)
        self.block_autocast = policy.block_autocast_dtype

    def _stream_dtype(self, x: torch.Tensor) -> torch.dtype:
        """dtype of the inference residual stream: the autocast dtype when set (the reference's projected
        prefix tokens come out of autocast in bf16 even over float32 block weights), else the blocks' dtype."""
        if self.block_autocast is not None:
            return self.block_autocast
        return next(self.blocks.parameters()).dtype if len(self.blocks) else x.dtype

    def _blocks_autocast(self, device: torch.device) -> contextlib.AbstractContextManager:
        # No context at all when unset: autocast(enabled=False) would switch off a caller's (training) autocast.
        if self.block_autocast is None:
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=self.block_autocast)

    # ------------------------------------------------------------------ pieces

    def _check_text(self, text_LC: torch.Tensor) -> None:
        if text_LC.dim() != 2 or text_LC.shape[1] != self.cfg.text_channels:
            raise ValueError(f"text features must be [tokens, {self.cfg.text_channels}] (text_channels), "
                             f"got shape {tuple(text_LC.shape)}")
        if text_LC.shape[0] > self.cfg.text_maxlen:
            raise ValueError(f"text of {text_LC.shape[0]} tokens exceeds text_maxlen {self.cfg.text_maxlen}")

    def embed_text(self, text_LC: torch.Tensor) -> torch.Tensor:
        """``text_proj`` in float32 (autocast off)."""
        with torch.autocast(text_LC.device.type, enabled=False):
            return self.text_proj(text_LC.float())

    def embed_codes(self, codes_BLC: torch.Tensor) -> torch.Tensor:
        """Input embedding of the summed-code tokens ``[B, L, d_vae]`` in float32 (autocast off)."""
        if codes_BLC.shape[-1] != self.cfg.d_vae:
            raise ValueError(f"visual input must have {self.cfg.d_vae} channels (d_vae) in the last dim, "
                             f"got shape {tuple(codes_BLC.shape)}")
        with torch.autocast(codes_BLC.device.type, enabled=False):
            return self.code_embed(codes_BLC.float())

    def bit_logits(self, h_BLC: torch.Tensor, semantic: bool) -> torch.Tensor:
        """Final norm, then the chosen head in true float32: ``[B, L, d, 2]`` (``[..., j, v]`` = logit of bit j = v)."""
        head = self.semantic_head if semantic else self.detail_head
        base = getattr(head, "base_layer", head)  # a LoRA-adapted head (transformer.lora) wraps the nn.Linear
        h = self.final_norm(h_BLC).float()
        with torch.autocast(h.device.type, enabled=False):
            out = nn.functional.linear(h, base.weight.float(), base.bias.float() if base.bias is not None else None)
            if not getattr(head, "merged", True):  # unmerged adapters add their low-rank update, also in float32
                for name in head.active_adapters:
                    if name in head.lora_A:
                        a, b = head.lora_A[name].weight.float(), head.lora_B[name].weight.float()
                        low = nn.functional.linear(head.lora_dropout[name](h), a)
                        out = out + nn.functional.linear(low, b) * head.scaling[name]
        return out.unflatten(-1, (-1, 2))

    # ------------------------------------------------------------------ training

    def forward_packed(
        self,
        x_BLC: torch.Tensor,
        texts: Sequence[torch.Tensor],
        layout: PackedLayout,
        backend: Backend = "sdpa",
        uncond: Sequence[bool] | None = None,
        return_block_outputs: bool = False,
    ) -> PackedOutput:
        """Training forward over one packed sequence.

        ``x_BLC [1, L_vis, d_vae]``: the visual inputs of every packed scale and condition block, in the layout's
        order (sample-major, a sample's condition blocks before its scales); ``texts``:
        one ``[L_text_b, text_channels]`` tensor per sample; ``uncond[b]`` replaces sample b's text by the
        learned unconditional rows (condition dropout, decided by the caller's RNG).
        """
        if x_BLC.dim() != 3 or x_BLC.shape[0] != 1 or x_BLC.shape[1] != layout.visual_len:
            raise ValueError(f"x_BLC must be [1, {layout.visual_len}, {self.cfg.d_vae}] for this layout, "
                             f"got {tuple(x_BLC.shape)}")
        if len(texts) != len(layout.text_lens):
            raise ValueError(f"{len(texts)} texts for a layout of {len(layout.text_lens)} samples")
        feats = []
        for b, (t, n) in enumerate(zip(texts, layout.text_lens)):
            self._check_text(t)
            if t.shape[0] != n:
                raise ValueError(f"text {b} has {t.shape[0]} tokens, the layout expects {n}")
            feats.append(self.uncond_text[:n] if uncond is not None and uncond[b] else t.to(x_BLC.device))
        text = torch.cat(feats)
        # Keeps the unconditional rows on the autograd graph even when unused (sharded training wants every
        # parameter to receive a gradient); numerically a no-op.
        text = text + self.uncond_text[:1, :1] * 0
        vis = self.embed_codes(x_BLC)
        txt = self.embed_text(text)[None]
        pad = vis.new_zeros(1, layout.pad_len, self.cfg.embed_dim)
        x = torch.cat([vis, txt, pad], dim=1)
        mask = SegmentMask(layout.segment_ids().to(x.device), layout.segment_mask.to(x.device))
        rope = layout.rope.to(x.device)
        block_outs = [] if return_block_outputs else None
        with self._blocks_autocast(x.device):
            for i, blk in enumerate(self.blocks):
                x = blk(x, rope, mask, backend, None, i)
                if block_outs is not None:
                    block_outs.append(x)
        logits = []  # per visual scale (condition blocks have none)
        for scale, sem, start in zip(layout.scales, layout.semantic, layout.scale_offsets, strict=True):
            n = scale[0] * scale[1] * scale[2]
            logits.append(self.bit_logits(x[:, start:start + n], sem))
        return PackedOutput(logits=logits, hidden=x, block_outputs=block_outs)

    # ------------------------------------------------------------------ inference

    def new_cache(self, preallocate: bool | None = None) -> KVCache:
        """An empty KV cache for this model. ``preallocate`` (default: :attr:`kv_cache_preallocate`, else
        :meth:`KVCache.default_preallocate` for the model's device) gives every layer a ``[context | own]`` work
        buffer instead of concatenating the context each step; the two give the same bits."""
        if preallocate is None:
            preallocate = self.kv_cache_preallocate
        if preallocate is None:
            param = next(self.parameters(), None)
            preallocate = KVCache.default_preallocate(param.device if param is not None else "cpu")
        return KVCache(self.cfg.depth, preallocate=preallocate)

    def prefill_text(self, text_LC: torch.Tensor, cache: KVCache, negative_LC: torch.Tensor | None = None,
                     guidance: bool = True) -> None:
        """Run the text prefix through every block and cache its K/V under ``KVCache.TEXT``.

        With ``guidance`` the batch is 2: row 0 the prompt, row 1 the unconditional text: the learned rows
        ``uncond_text[:L]`` (the reference), or the features of a negative prompt of any length. Rows of
        different lengths are right-padded to the longer one and the padding is masked out of every later
        attention (the reference zero-pads a shorter negative prompt without a mask and rejects a longer one).
        Text sees only text.
        """
        self._check_text(text_LC)
        rows = [text_LC.float()]
        if guidance:
            if negative_LC is None:
                rows.append(self.uncond_text[: text_LC.shape[0]].to(text_LC.device))
            else:
                self._check_text(negative_LC)
                rows.append(negative_LC.float())
        lens = [r.shape[0] for r in rows]
        L = max(lens)
        key_mask = None
        if len(set(lens)) > 1:
            rows = [torch.cat([r, r.new_zeros(L - r.shape[0], r.shape[1])]) for r in rows]
            lens_B1 = torch.tensor(lens, device=text_LC.device)[:, None]
            key_mask = torch.arange(L, device=text_LC.device)[None, :] < lens_B1
        # One projection over the row-concatenation, as the reference (GEMM tiling affects the last bits).
        x = self.embed_text(torch.cat(rows)).view(len(rows), L, -1)
        rope = rope_table(text_positions(L), self.cfg.head_dim, self.cfg.rope_theta).to(x.device)
        step = CacheStep(cache, (), KVCache.TEXT, key_mask=key_mask)
        x = x.to(self._stream_dtype(x))
        with self._blocks_autocast(x.device), inference_attention_kernels(x.device):
            for i, blk in enumerate(self.blocks):
                x = blk(x, rope, None, "sdpa", step, i)

    def step_rope(self, scale: Sequence[int], real_si: int, frame_ss: int, full_hw: Sequence[int]) -> torch.Tensor:
        """RoPE table of one visual step (see :func:`~infinitystar.transformer.rope.visual_positions`)."""
        pos = visual_positions(scale, real_si, frame_ss, full_hw, self.cfg.text_maxlen, self.cfg.rope_max_frames)
        return rope_table(pos, self.cfg.head_dim, self.cfg.rope_theta)

    def step(
        self,
        codes_1LC: torch.Tensor,
        rope_2LD: torch.Tensor,
        cache: KVCache,
        refs: Sequence[Hashable] = (),
        store_as: Hashable | None = None,
        semantic: bool = False,
        batch: int = 2,
        attend_text: bool = True,
    ) -> torch.Tensor:
        """One visual step: embed ``codes_1LC [1, n, d_vae]`` once, repeat it to ``batch`` rows (cond/uncond),
        attend to ``[cache[r] for r in refs] + [cached text] + own`` and return the logits ``[batch, n, d, 2]``.

        ``store_as`` caches this step's K/V under that id (the reference stores a scale at its last repetition).
        ``attend_text=False`` leaves the text out of the keys (with no ``refs`` the step sees only itself: the
        interactive condition passes).
        """
        if codes_1LC.dim() != 3 or codes_1LC.shape[0] != 1:
            raise ValueError(f"step input must be [1, tokens, {self.cfg.d_vae}], got {tuple(codes_1LC.shape)}")
        if rope_2LD.shape[1] != codes_1LC.shape[1]:
            raise ValueError(f"RoPE table has {rope_2LD.shape[1]} rows for {codes_1LC.shape[1]} tokens")
        # Materialized rows (not a stride-0 expand): every block then sees the same strides, which compiled blocks
        # guard on (an expanded input would compile block 0 apart). The values, and so the results, are the same.
        x = self.embed_codes(codes_1LC).expand(batch, -1, -1).contiguous()
        x = x.to(self._stream_dtype(x))
        rope = rope_2LD.to(x.device)
        cstep = CacheStep(cache, (*refs, KVCache.TEXT) if attend_text else tuple(refs), store_as)
        with self._blocks_autocast(x.device), inference_attention_kernels(x.device):
            for i, blk in enumerate(self.blocks):
                x = blk(x, rope, None, "sdpa", cstep, i)
        return self.bit_logits(x, semantic)

    # ------------------------------------------------------------------ compilation

    def compile_blocks(self, mode: str | None = None, dynamic: bool | None = True) -> None:
        """Opt-in ``torch.compile`` of every block's forward (``Block.compile``), for inference on a GPU.

        Only the blocks: the Python loop over them, the embeddings, the heads and the KV-cache bookkeeping
        stay eager. Inside a block the cache exchange is a ``torch.compiler.disable``d helper, so each block
        compiles to two graphs (norm, projections, QK-norm, RoPE | attention, output projection, MLP) around
        one clean break. The token count changes from scale to scale and the key count from step to step:
        ``dynamic=True`` compiles shape-generic graphs at once instead of one per scale. All blocks share
        one code object and, with torch's module inlining, the same compiled graphs. ``mode`` is
        torch.compile's (e.g. ``"max-autotune-no-cudagraphs"``; CUDA graphs do not suit a cache whose
        tensors change every step). The first forward of each new kind of call pays the compilation.
        """
        for blk in self.blocks:
            blk.compile(mode=mode, dynamic=dynamic)

    @property
    def compiled_blocks(self) -> bool:
        """Whether :meth:`compile_blocks` compiled the blocks (every one of them)."""
        return len(self.blocks) > 0 and all(getattr(b, "_compiled_call_impl", None) is not None
                                            for b in self.blocks)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

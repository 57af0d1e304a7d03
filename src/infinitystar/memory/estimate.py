"""The memory model: GPU bytes of one generation, computed from the configuration alone (no model is built).

Why: to say before a download or a run whether a mode fits a card (``infinitystar`` refuses or warns early), and to
check a GPU run against expectations (``benchmarks/bench_gpu.py`` prints the estimate beside the measured peak).

What is exact and what is a model:

* weights: exact. Parameter counts are written out from the config dims (the formulas below mirror the modules'
  constructors; ``tests/test_memory_estimate.py`` checks them against built models, the 8B included), times the
  bytes of each parameter's dtype under the precision policy (blocks bf16 under ``bf16``, everything else float32;
  Flan-T5 fp16; the VAE float32). Quantized block linears count torchao's layout: int8 data + a float32 scale and
  an int8 zero point per output row (``Int8Tensor``); fp8 data + a float32 scale per row (``Float8Tensor``, PerRow).
* KV cache: exact. The generation plan's steps replayed with the loop's keep policy
  (:func:`~infinitystar.generation.loop.generate_codes`: after each step only the text and the scales a later step
  reads are kept; the peak is read after a step's store, before the cleanup); per layer K and V of
  ``[batch, kv_heads, tokens, head_dim]`` in the stream dtype.
* activations: a model of the live tensors of the largest step (attention: q, the concatenated and GQA-expanded
  K/V, the output; MLP: silu(gate), up, their product), checked against the live bytes of real steps on a CPU
  (tests: within -10%/+50%); of Flan-T5 on a padded prompt and of the VAE decoder's largest chunk (resnet working
  set, causal-conv caches, the decoded frames), both coarser and not checked here. Allocator rounding, kernel
  workspaces and the CUDA context (~0.5 GiB, outside ``torch.cuda.max_memory_allocated``) are not modelled.

The peak of a mode is what stays resident plus the largest transient phase (prompt encoding, the loop, the decode);
under model offload only the working component is resident, so the peak is the largest component with its own
transients, not the sum.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..config import ConfigError, PipelineConfig, PrecisionPolicy, TransformerConfig, VAEConfig, precision_policy
from ..generation.plan import GenerationPlan, resolve_size
from ..generation.schedules import ScaleStep
from .modes import MemoryMode, memory_mode

GIB = 1024 ** 3
_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
ATTENTIONS = ("flash", "math")

# Flan-T5-XL's encoder (what RandomT5Encoder and the released text encoder are): vocab, heads x d_kv, d_ff, layers,
# relative-position buckets. Its d_model is the transformer's text_channels.
T5_XL = {"vocab": 32128, "heads": 32, "d_kv": 64, "d_ff": 5120, "layers": 24, "buckets": 32}


# ----------------------------------------------------------------------------------------------
# Parameter counts
# ----------------------------------------------------------------------------------------------


def block_linear_shapes(cfg: TransformerConfig) -> list[tuple[int, int]]:
    """(out_features, in_features) of the 7 linear layers of one block: q, k, v, o, gate, up, down."""
    C, H, KV, D, I = cfg.embed_dim, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.mlp_intermediate
    return [(H * D, C), (KV * D, C), (KV * D, C), (C, H * D), (I, C), (I, C), (C, I)]


def block_parameter_count(cfg: TransformerConfig) -> int:
    """Parameters of one transformer block: 7 linears (+ q/k/v/o biases when ``qkvo_bias``), two RMSNorms of the
    width and the per-head q/k RMSNorms."""
    C, H, KV, D = cfg.embed_dim, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    linears = sum(o * i for o, i in block_linear_shapes(cfg))
    biases = (H * D + 2 * KV * D + C) if cfg.qkvo_bias else 0
    return linears + biases + 2 * C + 2 * D


def transformer_small_parameter_count(cfg: TransformerConfig) -> int:
    """Parameters outside the blocks: the unconditional text rows, text_proj and code_embed (with biases), the final
    norm and the two heads (with biases); these stay float32 and on the GPU under every memory mode."""
    C = cfg.embed_dim
    uncond = cfg.text_maxlen * cfg.text_channels
    text_proj = cfg.text_channels * C + C
    code_embed = cfg.d_vae * C + C
    heads = (C + 1) * 2 * cfg.detail_bits + (C + 1) * 2 * cfg.semantic_bits
    return uncond + text_proj + code_embed + C + heads


def transformer_parameter_count(cfg: TransformerConfig) -> int:
    """All parameters of :class:`~infinitystar.transformer.model.InfinityStarTransformer`."""
    return transformer_small_parameter_count(cfg) + cfg.depth * block_parameter_count(cfg)


def _conv3d(c_in: int, c_out: int, k: int) -> int:
    return c_in * c_out * k ** 3 + c_out


def vae_parameter_count(cfg: VAEConfig) -> int:
    """All parameters of :class:`~infinitystar.vae.model.VideoVAE` (the official config: 184,659,383)."""
    w = cfg.block_out_channels
    n = len(w) - 1
    zc = cfg.latent_channels
    enc_res = lambda c: 2 * c + 2 * _conv3d(c, c, 3)  # noqa: E731 (two RMSNorm gains, two 3x3x3 convs)
    dec_res = lambda c: 2 * (c + 2 * _conv3d(zc, c, 1)) + 2 * _conv3d(c, c, 3)  # noqa: E731 (SpatialNorms)
    enc = _conv3d(cfg.in_channels, w[0], 3)
    for i in range(n):
        enc += cfg.layers_per_block * enc_res(w[i])
        if i < len(cfg.spatial_compression):
            enc += w[i] + _conv3d(w[i], w[i + 1] // 4, 3)  # DCDown3d: norm gain + conv to out/4
    enc += 2 * enc_res(w[-1]) + w[-1] + _conv3d(w[-1], 2 * zc, 3)
    r = tuple(reversed(w))
    dec = _conv3d(zc, r[0], 3) + 2 * dec_res(r[0])
    for i in range(n):
        dec += (cfg.layers_per_block + 1) * dec_res(r[i])
        if i >= n - len(cfg.spatial_compression):
            p = 2 if i >= n - len(cfg.temporal_compression) else 1
            dec += r[i] + _conv3d(r[i], r[i + 1] * 4 * p, 3)  # DCUp3d: norm gain + conv to 4*p*out
    dec += (r[-1] + 2 * _conv3d(zc, r[-1], 1)) + _conv3d(r[-1], cfg.out_channels, 3)
    d = cfg.embed_dim
    return enc + dec + 4 * (d * d + d) + 4


def t5_encoder_parameter_count(d_model: int, *, vocab: int = T5_XL["vocab"], heads: int = T5_XL["heads"],
                               d_kv: int = T5_XL["d_kv"], d_ff: int = T5_XL["d_ff"], layers: int = T5_XL["layers"],
                               buckets: int = T5_XL["buckets"]) -> int:
    """Parameters of a gated-GELU ``T5EncoderModel`` (shared embedding; per layer q/k/v/o, wi_0/wi_1/wo and two norm
    gains; the relative position bias in layer 0 only; the final norm). Flan-T5-XL: 1,223,527,424."""
    inner = heads * d_kv
    per_layer = 4 * d_model * inner + 3 * d_model * d_ff + 2 * d_model
    return vocab * d_model + layers * per_layer + buckets * heads + d_model


def text_encoder_bytes(cfg: PipelineConfig, precision: str) -> int:
    """GPU bytes of the preset's text encoder: Flan-T5-XL in the policy's text dtype, or the built-in encoders
    (float32: the byte encoder's 257-row table and, for both, the non-persistent position table)."""
    width, maxlen = cfg.transformer.text_channels, cfg.transformer.text_maxlen
    if cfg.text_encoder == "t5":
        policy = precision_policy(precision, interactive=cfg.interactive)
        return t5_encoder_parameter_count(width) * _BYTES[policy.text_weights]
    table = 257 * width if cfg.text_encoder == "bytes" else 0
    return 4 * (table + maxlen * width)


# ----------------------------------------------------------------------------------------------
# Weight bytes
# ----------------------------------------------------------------------------------------------


def quantized_linear_bytes(out_features: int, in_features: int, method: str) -> int:
    """Bytes torchao holds for one weight-only quantized linear weight (per-row layouts of torchao 0.18):
    int8 ``Int8Tensor``: int8 data + float32 scale + int8 zero point per row; fp8 ``Float8Tensor``: float8 data +
    float32 scale per row."""
    if method == "int8":
        return out_features * in_features + out_features * (4 + 1)
    if method == "fp8":
        return out_features * in_features + out_features * 4
    raise ConfigError(f"quantization must be 'int8' or 'fp8', got {method!r}")


def block_bytes(cfg: TransformerConfig, block_dtype: str, quantize: str | None = None) -> int:
    """Bytes of one block: its linears in ``block_dtype`` (or quantized), its norms (and biases) in ``block_dtype``."""
    e = _BYTES[block_dtype]
    shapes = block_linear_shapes(cfg)
    linear_params = sum(o * i for o, i in shapes)
    rest = block_parameter_count(cfg) - linear_params
    if quantize is None:
        return (linear_params + rest) * e
    return sum(quantized_linear_bytes(o, i, quantize) for o, i in shapes) + rest * e


def transformer_bytes(cfg: TransformerConfig, block_dtype: str, quantize: str | None = None) -> tuple[int, int]:
    """(bytes of the small float32 modules, bytes of all blocks)."""
    return 4 * transformer_small_parameter_count(cfg), cfg.depth * block_bytes(cfg, block_dtype, quantize)


# ----------------------------------------------------------------------------------------------
# The steps of a generation
# ----------------------------------------------------------------------------------------------

def request_plan(cfg: PipelineConfig, num_frames: int, *, resolution: str | None = None,
                 aspect: str | None = None) -> GenerationPlan:
    """The :class:`~infinitystar.generation.plan.GenerationPlan` the pipeline runs for a text-to-video request (its
    RoPE re-anchoring of long videos moves positions only, not tokens or references)."""
    _, pyramid, _ = resolve_size(cfg, resolution=resolution, aspect=aspect)
    return GenerationPlan(cfg, num_frames, pyramid, cfg.sampling)


def _plan_transients(plan: GenerationPlan, policy: PrecisionPolicy, *, text_tokens: int, attention: str,
                     tile: int | None) -> tuple[int, int, int]:
    """(peak KV cache, largest transformer step's activations, VAE decode transients) of one generation of
    ``plan``: what both the mode estimate and the pipeline's limit check add to the weights."""
    tcfg = plan.config.transformer
    e = _BYTES[policy.block_autocast or policy.block_weights]
    batch = 2 if plan.sampling.uses_guidance else 1
    steps = list(plan.steps.steps)
    kv = kv_cache_peak_bytes(tcfg, steps, text_tokens=text_tokens, batch=batch, elem_bytes=e)
    act = transformer_activation_bytes(tcfg, steps, text_tokens=text_tokens, batch=batch, elem_bytes=e,
                                       attention=attention)
    decode = vae_decode_activation_bytes(plan.config.vae, (plan.latent_frames, *plan.pyramid[-1][1:]), tile)
    return kv, act, decode


# ----------------------------------------------------------------------------------------------
# KV cache and transformer activations
# ----------------------------------------------------------------------------------------------


def _later_reads(steps: Sequence[ScaleStep]) -> list[set[int]]:
    """For each step, the scale ids a later step reads (the loop keeps exactly these and the text)."""
    out: list[set[int]] = []
    acc: set[int] = set()
    for s in reversed(steps):
        out.append(set(acc))
        acc |= set(s.ref_sids)
    return out[::-1]


def kv_cache_peak_bytes(cfg: TransformerConfig, steps: Sequence[ScaleStep], *, text_tokens: int, batch: int,
                        elem_bytes: int) -> int:
    """Peak KV-cache bytes of a generation over ``steps`` (what ``GenerationResult.peak_cache_bytes`` reports)."""
    per_token = cfg.depth * 2 * batch * cfg.num_kv_heads * cfg.head_dim * elem_bytes  # K and V, every layer
    later = _later_reads(steps)
    held: dict[int, int] = {}  # cached scale id -> tokens
    text = text_tokens * per_token
    peak = text
    for i, s in enumerate(steps):
        if s.is_last_repeat and s.si in later[i]:
            held[s.si] = s.query_tokens
        peak = max(peak, text + per_token * sum(held.values()))
        held = {k: v for k, v in held.items() if k in later[i]}
    return peak


def _step_activation_bytes(cfg: TransformerConfig, lq: int, lk: int, batch: int, e: int, attention: str,
                           head_bits: int) -> int:
    """Live transients of one transformer pass of ``lq`` queries over ``lk`` keys: the residual stream plus the
    largest of the attention phase, the MLP phase and the float32 head.

    Attention: the normed input, q, the concatenated (cached + own) K and V, their GQA expansion to the query heads
    (``repeat_interleave``), the output; ``"math"`` adds the float32 score matrix and its softmax, both live while the
    softmax runs (2 x B*H*Lq*Lk x 4 bytes). MLP: the normed input, silu(gate),
    up, their product and the down projection's output.
    """
    C, H, KV, D, I = cfg.embed_dim, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.mlp_intermediate
    resid = batch * lq * C * e
    kv = 2 * batch * KV * lk * D * e
    expanded = 2 * batch * H * lk * D * e if H != KV else 0
    attn = batch * lq * C * e + 2 * batch * H * lq * D * e + kv + expanded
    if attention == "math":
        # PyTorch's math SDPA computes in float32 (allow_fp16_bf16_reduction_math_sdp is off by default): float32
        # copies of q, K and V when the stream is narrower, then the scores and their softmax.
        attn += 2 * batch * H * lq * lk * 4 + (4 * batch * H * (lq + 2 * lk) * D if e < 4 else 0)
    mlp = 2 * batch * lq * C * e + 3 * batch * lq * I * e
    head = 4 * batch * lq * (C + 2 * 2 * head_bits)  # final norm and logits in float32 (+ guided copy)
    return resid + max(attn, mlp, head)


def transformer_activation_bytes(cfg: TransformerConfig, steps: Sequence[ScaleStep], *, text_tokens: int,
                                 batch: int, elem_bytes: int, attention: str = "flash") -> int:
    """The largest transient of any pass (the text prefill included)."""
    tokens = {s.si: s.query_tokens for s in steps}
    best = _step_activation_bytes(cfg, text_tokens, text_tokens, batch, elem_bytes, attention, 0)
    for s in steps:
        lk = text_tokens + sum(tokens[r] for r in s.ref_sids) + s.query_tokens
        bits = cfg.detail_bits if s.detail_head else cfg.semantic_bits
        best = max(best, _step_activation_bytes(cfg, s.query_tokens, lk, batch, elem_bytes, attention, bits))
    return best


def text_encoder_activation_bytes(cfg: PipelineConfig, precision: str) -> int:
    """One prompt through the encoder. Flan-T5: padded to ``text_maxlen`` tokens (as the reference pads), hidden
    states, q/k/v, the eager attention scores with the position bias (float32) and the gated feed-forward."""
    width, L = cfg.transformer.text_channels, cfg.transformer.text_maxlen
    if cfg.text_encoder != "t5":
        return 2 * L * width * 4
    e = 2 if precision == "bf16" else 4
    inner, h = T5_XL["heads"] * T5_XL["d_kv"], T5_XL["heads"]
    return L * e * (2 * width + 3 * inner + 3 * T5_XL["d_ff"]) + 2 * h * L * L * 4


# ----------------------------------------------------------------------------------------------
# VAE decode
# ----------------------------------------------------------------------------------------------


def vae_decode_activation_bytes(cfg: VAEConfig, latent_thw: tuple[int, int, int], tile: int | None = None) -> int:
    """Transients of ``VideoVAE.decode`` of a (t, h, w) latent: the decoded frames twice (chunk outputs and their
    concatenation) and the clamp's copy, plus the largest chunk's working set and the causal-conv caches.

    A resnet at (c, t, H, W) holds ~6 feature maps (input, the spatial norm's two modulation maps and its output,
    silu, the cache-extended input); an upsampler ~4 of its output size. Tiles of ``tile`` latent cells bound H, W.
    """
    t, h, w = latent_thw
    f = 4  # float32
    frames = 1 + cfg.time_stride * (t - 1)
    out_px = cfg.out_channels * frames * (cfg.space_stride * h) * (cfg.space_stride * w) * f
    th, tw = (h, w) if tile is None or (tile >= h and tile >= w) else (min(tile, h), min(tile, w))
    chunk_t = 1 if t == 1 else min(cfg.decode_latent_batch, t - 1)
    r = tuple(reversed(cfg.block_out_channels))
    n = len(r) - 1
    zc = cfg.latent_channels
    H, W, T = 2 * th, 2 * tw, chunk_t  # the f8 grid the decoder starts from
    cache = zc * 2 * H * W  # conv_in's two context frames
    work = 6 * r[0] * T * H * W
    cache += 2 * 2 * r[0] * 2 * H * W  # two mid resnets, two 3x3x3 convs each
    for i in range(n):
        work = max(work, 6 * r[i] * T * H * W)
        cache += (cfg.layers_per_block + 1) * 2 * r[i] * 2 * H * W
        if i >= n - len(cfg.spatial_compression):
            p = 2 if i >= n - len(cfg.temporal_compression) else 1
            cache += r[i] * 2 * H * W
            work = max(work, 4 * r[i + 1] * 4 * p * T * H * W)
            T, H, W = T * p, 2 * H, 2 * W
    work = max(work, 6 * r[-1] * T * H * W)
    cache += r[-1] * 2 * H * W
    if th == h and tw == w:
        return 3 * out_px + (work + cache) * f
    tile_px = cfg.out_channels * frames * (cfg.space_stride * th) * (cfg.space_stride * tw) * f
    weight = (cfg.space_stride * h) * (cfg.space_stride * w) * f
    return 2 * out_px + weight + 3 * tile_px + (work + cache) * f


# ----------------------------------------------------------------------------------------------
# The estimate
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MemoryEstimate:
    """GPU bytes of one generation under one memory mode (see the module docstring for what is exact)."""

    mode: str
    transformer_weights: int  # all of the transformer's weights, in the mode's form (quantized blocks counted so)
    text_encoder_weights: int
    vae_weights: int
    kv_cache: int  # peak KV cache of the generation
    transformer_activations: int  # peak transient activations of one transformer step
    text_encoder_activations: int
    vae_decode_activations: int
    peak: int  # resident weights + the largest transient phase, for the mode
    resident_transformer: int = 0  # of transformer_weights, what is on the GPU while it works (block offload: less)

    def table(self) -> str:
        """Human-readable lines, GiB."""
        rows = [("transformer weights", self.transformer_weights),
                ("  on the GPU while generating", self.resident_transformer),
                ("text encoder weights", self.text_encoder_weights), ("VAE weights", self.vae_weights),
                ("KV cache (peak)", self.kv_cache), ("transformer activations", self.transformer_activations),
                ("text encoder activations", self.text_encoder_activations),
                ("VAE decode activations", self.vae_decode_activations), (f"peak ({self.mode})", self.peak)]
        return "\n".join(f"{name:<32}{b / GIB:9.2f} GiB" for name, b in rows)


def estimate_memory(cfg: PipelineConfig, mode: MemoryMode | str, *, num_frames: int, resolution: str | None = None,
                    aspect: str | None = None, precision: str = "bf16", attention: str = "flash",
                    text_tokens: int | None = None) -> MemoryEstimate:
    """GPU bytes of one text-to-video generation of ``num_frames`` pixel frames (1 = an image) with preset ``cfg``.

    ``text_tokens``: prompt length in text tokens (default ``text_maxlen``, the most a prompt can take);
    ``attention``: ``"flash"`` (fused SDPA, no score matrix) or ``"math"`` (scores materialized, float32).
    """
    mode = memory_mode(mode)
    if attention not in ATTENTIONS:
        raise ConfigError(f"attention must be one of {list(ATTENTIONS)}, got {attention!r}")
    policy = precision_policy(precision, interactive=cfg.interactive)
    tcfg = cfg.transformer
    if text_tokens is None:
        text_tokens = tcfg.text_maxlen
    if not 1 <= text_tokens <= tcfg.text_maxlen:
        raise ConfigError(f"text_tokens must be in 1..{tcfg.text_maxlen} (text_maxlen), got {text_tokens}")
    plan = request_plan(cfg, num_frames, resolution=resolution, aspect=aspect)
    small, blocks = transformer_bytes(tcfg, policy.block_weights, mode.quantize)
    t_weights = small + blocks
    te_weights = text_encoder_bytes(cfg, precision)
    v_weights = 4 * vae_parameter_count(cfg.vae)
    tile = mode.vae_tile_size if mode.vae_decode == "tiled" else None
    kv, t_act, v_act = _plan_transients(plan, policy, text_tokens=text_tokens, attention=attention, tile=tile)
    te_act = text_encoder_activation_bytes(cfg, precision)

    if mode.offload == "block":
        working_t = small + 2 * mode.block_group_size * block_bytes(tcfg, policy.block_weights, mode.quantize)
        working_t = min(working_t, t_weights)
        encode = small + te_weights + te_act
        generate = working_t + kv + t_act
        decode = small + v_weights + v_act
    elif mode.offload == "model":
        working_t = t_weights
        encode, generate, decode = te_weights + te_act, t_weights + kv + t_act, v_weights + v_act
    else:
        working_t = t_weights
        resident = t_weights + v_weights
        text_resident = 0 if mode.release_text_encoder else te_weights
        encode = resident + te_weights + te_act
        generate = resident + text_resident + kv + t_act
        decode = resident + text_resident + v_act
    return MemoryEstimate(mode.name, t_weights, te_weights, v_weights, kv, t_act, te_act, v_act,
                          max(encode, generate, decode), working_t)


__all__ = ["ATTENTIONS", "MemoryEstimate", "block_bytes", "block_parameter_count", "estimate_memory",
           "request_plan",
           "kv_cache_peak_bytes", "quantized_linear_bytes", "t5_encoder_parameter_count", "text_encoder_bytes",
           "transformer_activation_bytes", "transformer_bytes", "transformer_parameter_count",
           "transformer_small_parameter_count", "vae_decode_activation_bytes", "vae_parameter_count"]


# ----------------------------------------------------------------------------------------------
# One request against the machine (the pipeline's limit check)
# ----------------------------------------------------------------------------------------------


def working_memory_bytes(plan: GenerationPlan, *, precision: str, tile: int | None = None,
                         text_tokens: int | None = None) -> int:
    """Working bytes of one generation of ``plan`` beyond the loaded weights: the KV cache with the largest step's
    activations, or the VAE decode, whichever is larger (they never overlap). Activations as fused attention keeps
    them (the smaller figure: the limit check refuses only what clearly cannot fit)."""
    cfg = plan.config
    policy = precision_policy(precision, interactive=cfg.interactive)
    tokens = cfg.transformer.text_maxlen if text_tokens is None else text_tokens
    kv, act, decode = _plan_transients(plan, policy, text_tokens=tokens, attention="flash", tile=tile)
    return max(kv + act, decode)


def available_memory(device: torch.device) -> int | None:
    """Bytes this process can still take on ``device``: the GPU's free memory plus what PyTorch's allocator holds
    unused, or the host's ``MemAvailable`` (Linux); None where it cannot be told."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))
    if device.type == "cpu":
        try:
            with open("/proc/meminfo", encoding="ascii") as f:
                for line in f:
                    if line.startswith("MemAvailable:"):
                        return int(line.split()[1]) * 1024
        except (OSError, ValueError, IndexError):
            return None
    return None


__all__ += ["available_memory", "working_memory_bytes"]

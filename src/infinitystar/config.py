"""Configuration dataclasses and the registry of named presets.

Every component is built from a frozen dataclass. Constructors validate their values and raise a
``ConfigError`` that names the offending field and value, so a typo in a preset or a user config
fails at construction, not deep inside a forward pass.

Presets are registered by kind (``"vae"``, ``"quantizer"``, ``"transformer"``, ``"pipeline"``) and
name; ``get_preset("vae", "official")`` returns the configuration of the released checkpoint.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, TypeVar

T = TypeVar("T")


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the field and the value."""


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


# ----------------------------------------------------------------------------------------------
# Tokenizer
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class VAEConfig:
    """The Wan-style causal 3-D convolutional VAE with absorbed 2x2 patchify.

    The defaults are the official ``infinitystar_videovae.pth`` architecture (184,659,383
    parameters): 16x spatial and 4x temporal compression into a 64-channel latent.
    """

    in_channels: int = 3
    out_channels: int = 3
    # Entry i is the input width of down block i, entry i+1 its output width (mirrored in the decoder).
    block_out_channels: tuple[int, ...] = (96, 192, 384, 384, 384)
    # Resnets per encoder block; the decoder uses one more per block, as the reference does.
    layers_per_block: int = 2
    # Width of the f8 latent before the absorbed 2x2 patchify (16 -> 64 channels at stride 16).
    latent_channels: int = 16
    # Per-block down/up sampling factors: encoder block i compresses space if i < len(spatial),
    # time if i < len(temporal); the decoder mirrors it.
    spatial_compression: tuple[int, ...] = (2, 2, 2)
    temporal_compression: tuple[int, ...] = (2, 2)
    # Pixel frames per encoder chunk after the first (the causal cache carries across chunks).
    encode_frame_batch: int = 8
    # Latent frames per decoder chunk after the first.
    decode_latent_batch: int = 2
    # Initial value of the latent scale (the checkpoint overrides it).
    latent_scale_init: float = 1.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "block_out_channels", tuple(self.block_out_channels))
        object.__setattr__(self, "spatial_compression", tuple(self.spatial_compression))
        object.__setattr__(self, "temporal_compression", tuple(self.temporal_compression))
        n_blocks = len(self.block_out_channels) - 1
        _require(n_blocks >= 1, f"VAEConfig.block_out_channels needs at least 2 entries, got {self.block_out_channels}")
        for c in self.block_out_channels:
            _require(c > 0 and c % 4 == 0,
                     f"VAEConfig.block_out_channels must be positive multiples of 4, got {self.block_out_channels}")
        _require(self.layers_per_block >= 1, f"VAEConfig.layers_per_block must be >= 1, got {self.layers_per_block}")
        _require(self.latent_channels > 0, f"VAEConfig.latent_channels must be > 0, got {self.latent_channels}")
        _require(len(self.spatial_compression) <= n_blocks,
                 f"VAEConfig.spatial_compression has {len(self.spatial_compression)} entries for {n_blocks} blocks")
        _require(len(self.temporal_compression) <= len(self.spatial_compression),
                 f"VAEConfig.temporal_compression {self.temporal_compression} is longer than spatial_compression "
                 f"{self.spatial_compression}")
        for f in (*self.spatial_compression, *self.temporal_compression):
            _require(f == 2, f"VAEConfig compression factors must be 2 (got {f}): the DC samplers are 2x")
        _require(self.encode_frame_batch > 0 and self.encode_frame_batch % self.time_stride == 0,
                 f"VAEConfig.encode_frame_batch must be a positive multiple of {self.time_stride}, "
                 f"got {self.encode_frame_batch}")
        _require(self.decode_latent_batch > 0,
                 f"VAEConfig.decode_latent_batch must be > 0, got {self.decode_latent_batch}")

    @property
    def space_stride(self) -> int:
        """Pixels per latent cell along H and W (encoder stride times the absorbed patchify)."""
        return 2 ** len(self.spatial_compression) * 2

    @property
    def time_stride(self) -> int:
        """Pixel frames per latent frame after the first (causal) frame."""
        return 2 ** len(self.temporal_compression)

    @property
    def embed_dim(self) -> int:
        """Channels of the continuous latent the transformer sees (latent_channels x 2x2 patchify)."""
        return self.latent_channels * 4


@dataclass(frozen=True)
class QuantizerConfig:
    """Multi-scale bitwise spherical quantization of the 64-channel latent.

    Scales with at least ``detail_scale_min_tokens`` spatial tokens (h*w) are quantized with
    ``detail_dim`` bits per token; smaller ("semantic") scales quantize a channel-averaged residual
    with ``semantic_dim`` bits.
    """

    embed_dim: int = 64
    semantic_dim: int = 16
    detail_dim: int = 64
    # Official: 750 for the 720p model, 350 for 480p.
    detail_scale_min_tokens: int = 750

    def __post_init__(self) -> None:
        _require(self.embed_dim > 0, f"QuantizerConfig.embed_dim must be > 0, got {self.embed_dim}")
        for name in ("semantic_dim", "detail_dim"):
            v = getattr(self, name)
            _require(0 < v <= self.embed_dim,
                     f"QuantizerConfig.{name} must be in 1..embed_dim={self.embed_dim}, got {v}")
        _require(self.detail_scale_min_tokens >= 0,
                 f"QuantizerConfig.detail_scale_min_tokens must be >= 0, got {self.detail_scale_min_tokens}")

    def bits_for(self, h: int, w: int) -> int:
        """Bits per token of a scale of h x w tokens."""
        return self.detail_dim if h * w >= self.detail_scale_min_tokens else self.semantic_dim


# ----------------------------------------------------------------------------------------------
# Registry
# ----------------------------------------------------------------------------------------------

_REGISTRY: dict[str, dict[str, Any]] = {}


def register_preset(kind: str, name: str, config: Any) -> None:
    """Register ``config`` under ``(kind, name)``; re-registering a name is an error."""
    table = _REGISTRY.setdefault(kind, {})
    if name in table:
        raise ConfigError(f"preset {kind}/{name!r} is already registered")
    table[name] = config


def get_preset(kind: str, name: str) -> Any:
    """Return the preset ``name`` of ``kind``; the error lists the names that exist."""
    table = _REGISTRY.get(kind)
    if table is None:
        raise ConfigError(f"unknown preset kind {kind!r}; known kinds: {sorted(_REGISTRY)}")
    if name not in table:
        raise ConfigError(f"unknown {kind} preset {name!r}; available: {sorted(table)}")
    return table[name]


def list_presets(kind: str) -> list[str]:
    return sorted(_REGISTRY.get(kind, {}))


def replace(config: T, **changes: Any) -> T:
    """A copy of a config dataclass with some fields changed (validated again)."""
    return dataclasses.replace(config, **changes)  # type: ignore[type-var]


def config_to_dict(config: Any) -> dict[str, Any]:
    return dataclasses.asdict(config)


def config_from_dict(cls: type[T], data: dict[str, Any]) -> T:
    """Build ``cls`` from a dict, rejecting unknown keys by name."""
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"unknown {cls.__name__} fields {unknown}; valid fields: {sorted(names)}")
    return cls(**data)


register_preset("vae", "official", VAEConfig())
# Same code path as the official model at a width that runs in milliseconds (the golden `tiny` case).
register_preset("vae", "tiny-test", VAEConfig(block_out_channels=(8, 16, 16, 16, 16)))

register_preset("quantizer", "official-720p", QuantizerConfig(detail_scale_min_tokens=750))
register_preset("quantizer", "official-480p", QuantizerConfig(detail_scale_min_tokens=350))
register_preset("quantizer", "tiny-test", QuantizerConfig(detail_scale_min_tokens=9))

__all__ = [
    "ConfigError",
    "QuantizerConfig",
    "VAEConfig",
    "config_from_dict",
    "config_to_dict",
    "get_preset",
    "list_presets",
    "register_preset",
    "replace",
]


# ----------------------------------------------------------------------------------------------
# Transformer
# ----------------------------------------------------------------------------------------------


def mlp_intermediate_size(embed_dim: int, mlp_ratio: float) -> int:
    """The reference's SwiGLU width: ``round(embed_dim * mlp_ratio / 256) * 256``.

    Python's ``round`` is half-to-even, so e.g. width 160 with ratio 4 gives 512, not 640; the
    official 8B (4096 x 4) gives 16384.
    """
    return int(round(embed_dim * mlp_ratio / 256)) * 256


@dataclass(frozen=True)
class TransformerConfig:
    """The spacetime decoder-only transformer (Qwen3-style blocks, 4-axis RoPE, two bit heads).

    Defaults are the official ``infinity_qwen8b`` (8,768,382,112 parameters in the official state
    dict, of which 4,096 are the dead ``sos_token`` this implementation does not keep).
    """

    depth: int = 36
    embed_dim: int = 4096
    num_heads: int = 32
    # GQA: query head h uses key/value head h // (num_heads // num_kv_heads).
    num_kv_heads: int = 8
    # Must equal embed_dim // num_heads (the reference derives it); (head_dim / 2) % 4 == 0 for the 4-axis RoPE.
    head_dim: int = 128
    mlp_intermediate: int = 16384
    # Width of the text encoder features (flan-t5-xl: 2048) and rows of the learned unconditional text.
    text_channels: int = 2048
    # Rows of ``cfg_uncond`` and the RoPE scale-axis offset of visual tokens (positions text_maxlen + step).
    text_maxlen: int = 512
    # Channels of the summed-code map fed to the input embedding.
    d_vae: int = 64
    # Bits per token of the detail head (``head``) and the semantic head (``semantic_head2``).
    detail_bits: int = 64
    semantic_bits: int = 16
    # The reference stores norm_eps but every RMSNorm uses 1e-6.
    norm_eps: float = 1e-6
    # Packed training sequences are zero-padded to a multiple of this.
    pad_to_multiplier: int = 128
    # Blocks per checkpoint chunk only shape the official key names (block_chunks.{c}.module.{j}).
    block_chunks: int = 6
    qkvo_bias: bool = False
    # Inference head rule: semantic head iff (scale index % scales per clip) < semantic_scales.
    semantic_scales: int = 12
    # Training head rule (and tokenizer): semantic iff h*w < detail_scale_min_tokens.
    detail_scale_min_tokens: int = 750
    rope_theta: float = 10000.0
    # Latent frames the RoPE frame axis covers (reference: int(video_frames / 4 + 1)); longer schedules are
    # rejected because the reference's tables end there.
    rope_max_frames: int = 21

    def __post_init__(self) -> None:
        for name in ("depth", "embed_dim", "num_heads", "num_kv_heads", "head_dim", "mlp_intermediate",
                     "text_channels", "text_maxlen", "d_vae", "detail_bits", "semantic_bits", "pad_to_multiplier",
                     "block_chunks", "rope_max_frames"):
            v = getattr(self, name)
            _require(isinstance(v, int) and v > 0, f"TransformerConfig.{name} must be a positive int, got {v!r}")
        _require(self.head_dim * self.num_heads == self.embed_dim,
                 f"TransformerConfig: head_dim * num_heads = {self.head_dim} * {self.num_heads} = "
                 f"{self.head_dim * self.num_heads} != embed_dim {self.embed_dim}")
        _require(self.num_heads % self.num_kv_heads == 0,
                 f"TransformerConfig: num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}")
        _require(self.head_dim % 8 == 0,
                 f"TransformerConfig.head_dim {self.head_dim}: the 4-axis RoPE needs head_dim/2 = {self.head_dim / 2} "
                 f"divisible by 4")
        _require(self.depth % self.block_chunks == 0,
                 f"TransformerConfig: depth {self.depth} is not a multiple of block_chunks {self.block_chunks}")
        _require(self.semantic_scales >= 0,
                 f"TransformerConfig.semantic_scales must be >= 0, got {self.semantic_scales}")
        _require(self.detail_scale_min_tokens >= 0,
                 f"TransformerConfig.detail_scale_min_tokens must be >= 0, got {self.detail_scale_min_tokens}")
        _require(self.norm_eps > 0, f"TransformerConfig.norm_eps must be > 0, got {self.norm_eps}")
        _require(self.rope_theta > 0, f"TransformerConfig.rope_theta must be > 0, got {self.rope_theta}")

    @property
    def kv_groups(self) -> int:
        """Query heads per key/value head."""
        return self.num_heads // self.num_kv_heads

    @property
    def blocks_per_chunk(self) -> int:
        return self.depth // self.block_chunks


def _qwen(depth: int, embed_dim: int, kv_div: int, mlp_ratio: float, chunks: int, head_dim: int = 128,
          num_heads: int | None = None, bias: bool = False, **kw: Any) -> TransformerConfig:
    heads = num_heads if num_heads is not None else embed_dim // head_dim
    return TransformerConfig(depth=depth, embed_dim=embed_dim, num_heads=heads, num_kv_heads=heads // kv_div,
                             head_dim=embed_dim // heads, mlp_intermediate=mlp_intermediate_size(embed_dim, mlp_ratio),
                             block_chunks=chunks, qkvo_bias=bias, **kw)


# The released checkpoints (same architecture; run-time head split and RoPE frame reach differ).
register_preset("transformer", "official-8b-720p", TransformerConfig(semantic_scales=12, detail_scale_min_tokens=750))
# 480p supports 10 s videos (161 frames -> 41 latent frames).
register_preset("transformer", "official-8b-480p",
                TransformerConfig(semantic_scales=11, detail_scale_min_tokens=350, rope_max_frames=41))
register_preset("transformer", "interactive-480p",
                TransformerConfig(semantic_scales=11, detail_scale_min_tokens=350, rope_max_frames=41))
# The golden `tiny` case: same code path as the 8B at a width that runs in milliseconds.
register_preset("transformer", "tiny-test", TransformerConfig(
    depth=4, embed_dim=128, num_heads=4, num_kv_heads=2, head_dim=32, mlp_intermediate=512, text_channels=32,
    block_chunks=2, semantic_scales=10, detail_scale_min_tokens=200))
# The other sizes the reference registers (all build Qwen-style blocks; MHA where kv heads are not given).
register_preset("transformer", "qwen7b", _qwen(36, 4096, 4, 3.0, 6))
register_preset("transformer", "qwen8b-v2", _qwen(36, 4096, 1, 3.0, 6))
register_preset("transformer", "qwen-wide14b", _qwen(36, 5632, 4, 3.4, 6))
register_preset("transformer", "qwen13b-mha", _qwen(40, 5120, 1, 3.4, 8, bias=True))
register_preset("transformer", "qwen2-2b", _qwen(28, 2304, 1, 3.55, 7))
register_preset("transformer", "qwen0b", _qwen(4, 512, 1, 3.55, 2))
register_preset("transformer", "qwen2-30b", _qwen(54, 6144, 4, 4, 27))
register_preset("transformer", "qwen14b", _qwen(48, 4608, 4, 4, 24))
register_preset("transformer", "2b", _qwen(32, 2048, 1, 4, 1))
register_preset("transformer", "sa2b", _qwen(28, 2560, 1, 4, 7))
register_preset("transformer", "sa8b", _qwen(42, 4096, 1, 4, 7))
register_preset("transformer", "sa14b", _qwen(40, 5120, 1, 3.4, 8))
register_preset("transformer", "sa12b", _qwen(60, 4096, 1, 4, 1))
register_preset("transformer", "sa16b", _qwen(42, 4096, 1, 4, 1))
register_preset("transformer", "8b", _qwen(40, 3584, 1, 4, 1))
register_preset("transformer", "20b", _qwen(58, 4608, 1, 4, 1))
for _depth, _width, _heads in ((12, 768, 8), (16, 1152, 12), (24, 1536, 16), (32, 2080, 20), (40, 2688, 24),
                               (48, 3360, 28)):
    register_preset("transformer", f"layer{_depth}", _qwen(_depth, _width, 1, 4, 1, num_heads=_heads))
# Not registered: the reference's `infinity_v2b` (head dim 126) fails its own RoPE assertion.

__all__ += ["TransformerConfig", "mlp_intermediate_size"]


# ----------------------------------------------------------------------------------------------
# Sampling and pipelines
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SamplingConfig:
    """How bits are drawn from the logits. Defaults are the official 720p/480p scripts' values."""

    # "apg" (official T2V/I2V scripts), "cfg" (the interactive model), or "none" (conditional branch only).
    guidance: str = "apg"
    guidance_scale: float = 34.0
    apg_norm_threshold: float = 0.05
    # Logits are multiplied by 1/tau: tau_image on the first-frame pyramid, tau_video on video clips.
    tau_image: float = 1.0
    tau_video: float = 0.4

    def __post_init__(self) -> None:
        _require(self.guidance in ("apg", "cfg", "none"),
                 f"SamplingConfig.guidance must be 'apg', 'cfg' or 'none', got {self.guidance!r}")
        _require(isinstance(self.guidance_scale, (int, float)) and math.isfinite(self.guidance_scale)
                 and self.guidance_scale >= 1, f"guidance scale must be a number >= 1, got {self.guidance_scale!r}")
        _require(self.apg_norm_threshold > 0,
                 f"SamplingConfig.apg_norm_threshold must be > 0, got {self.apg_norm_threshold}")
        for name in ("tau_image", "tau_video"):
            _require(getattr(self, name) > 0, f"SamplingConfig.{name} must be > 0, got {getattr(self, name)}")

    @property
    def uses_guidance(self) -> bool:
        return self.guidance != "none" and self.guidance_scale != 1


@dataclass(frozen=True)
class PipelineConfig:
    """Everything a generation pipeline needs besides weights: components, resolution, lengths, defaults.

    The duration prefix, prompt template, repetitions, temperatures and guidance all come from here
    (no script globals): a user changes them by passing arguments, never by editing code.
    """

    name: str
    vae: VAEConfig
    quantizer: QuantizerConfig
    transformer: TransformerConfig
    # Pixel budget of the scale pyramid ('0.06M', '0.25M', '0.40M', '0.90M') ...
    pn: str = "0.90M"
    # ... optionally truncated to its first `num_scales` grids (custom small budgets; None = the pn's own).
    num_scales: int | None = None
    # Aspect ratio used when the user gives none ("W:H"); the official scripts ask for 0.571 (-> 16:9).
    default_aspect: str = "16:9"
    aspects: tuple[str, ...] = ("16:9", "9:16", "1:1", "4:3", "3:4", "21:9")
    image_repetition: tuple[int, ...] = (3,) * 15
    video_repetition: tuple[int, ...] = (3,) * 12 + (2, 1, 1)
    sampling: SamplingConfig = SamplingConfig()
    fps: int = 16
    # Latent frames per video clip (20 = 5 s at 16 fps).
    frames_inner_clip: int = 20
    default_seconds: int = 5
    # Prompt template: "<<<t=5s>>>" duration prefix for videos, and a quality suffix (the official scripts').
    duration_prefix: bool = True
    quality_suffix: str = ", Close-up on big objects, emphasize scale and detail"
    # "t5" (Flan-T5 from a local folder), "bytes" or "words" (built-in byte- or word-level encoders; no download).
    text_encoder: str = "t5"
    # The interactive model: plain CFG, per-segment prompts, the interactive schedule.
    interactive: bool = False
    seed: int = 41

    def __post_init__(self) -> None:
        object.__setattr__(self, "image_repetition", tuple(int(r) for r in self.image_repetition))
        object.__setattr__(self, "video_repetition", tuple(int(r) for r in self.video_repetition))
        object.__setattr__(self, "aspects", tuple(self.aspects))
        k = self.scales_per_clip
        for name in ("image_repetition", "video_repetition"):
            reps = getattr(self, name)
            _require(len(reps) == k and all(r >= 1 for r in reps),
                     f"PipelineConfig.{name} needs {k} entries >= 1 (one per scale of a clip), got {list(reps)}")
        _require(self.fps > 0, f"PipelineConfig.fps must be > 0, got {self.fps}")
        _require(self.frames_inner_clip > 0,
                 f"PipelineConfig.frames_inner_clip must be > 0, got {self.frames_inner_clip}")
        _require(self.default_seconds >= 0, f"PipelineConfig.default_seconds must be >= 0, got {self.default_seconds}")
        _require(self.text_encoder in ("t5", "bytes", "words"),
                 f"PipelineConfig.text_encoder must be 't5', 'bytes' or 'words', got {self.text_encoder!r}")
        _require(self.quantizer.embed_dim == self.transformer.d_vae == self.vae.embed_dim,
                 f"latent widths disagree: quantizer {self.quantizer.embed_dim}, transformer d_vae "
                 f"{self.transformer.d_vae}, VAE {self.vae.embed_dim}")
        _require(self.quantizer.detail_dim == self.transformer.detail_bits
                 and self.quantizer.semantic_dim == self.transformer.semantic_bits,
                 f"bit widths disagree: quantizer {self.quantizer.semantic_dim}/{self.quantizer.detail_dim}, "
                 f"transformer {self.transformer.semantic_bits}/{self.transformer.detail_bits}")
        _require(self.quantizer.detail_scale_min_tokens == self.transformer.detail_scale_min_tokens,
                 f"detail_scale_min_tokens disagree: quantizer {self.quantizer.detail_scale_min_tokens}, "
                 f"transformer {self.transformer.detail_scale_min_tokens}")

    @property
    def scales_per_clip(self) -> int:
        from .schedules import num_scales_for_pn  # schedules imports nothing from here

        full = num_scales_for_pn(self.pn)
        if self.num_scales is not None:
            _require(1 <= self.num_scales <= full,
                     f"PipelineConfig.num_scales must be in 1..{full} for pn={self.pn!r}, got {self.num_scales}")
            return self.num_scales
        return full

    @property
    def frames_per_clip(self) -> int:
        """Pixel frames per video clip."""
        return self.frames_inner_clip * self.vae.time_stride


_T5_720P = TransformerConfig(semantic_scales=12, detail_scale_min_tokens=750)
_T5_480P = TransformerConfig(semantic_scales=11, detail_scale_min_tokens=350, rope_max_frames=41)

register_preset("pipeline", "official-720p", PipelineConfig(
    name="official-720p", vae=VAEConfig(), quantizer=QuantizerConfig(detail_scale_min_tokens=750),
    transformer=_T5_720P, pn="0.90M"))
register_preset("pipeline", "official-480p", PipelineConfig(
    name="official-480p", vae=VAEConfig(), quantizer=QuantizerConfig(detail_scale_min_tokens=350),
    transformer=_T5_480P, pn="0.40M", image_repetition=(3,) * 14, video_repetition=(3,) * 12 + (2, 1)))
register_preset("pipeline", "interactive-480p", PipelineConfig(
    name="interactive-480p", vae=VAEConfig(), quantizer=QuantizerConfig(detail_scale_min_tokens=350),
    transformer=_T5_480P, pn="0.40M", image_repetition=(3,) * 12 + (2, 1), video_repetition=(3,) * 12 + (2, 1),
    sampling=SamplingConfig(guidance="cfg", guidance_scale=3.0, tau_image=0.5, tau_video=0.5),
    quality_suffix="", interactive=True, seed=0))
# Random weights at toy size: 6 scales of the 1:1 ladder (up to 6x6 latent = 96x96 pixels), a byte-level text
# encoder; exercises every code path in seconds on a CPU.
register_preset("pipeline", "tiny-test", PipelineConfig(
    name="tiny-test", vae=VAEConfig(block_out_channels=(8, 16, 16, 16, 16)),
    quantizer=QuantizerConfig(detail_scale_min_tokens=16),
    transformer=TransformerConfig(depth=2, embed_dim=64, num_heads=2, num_kv_heads=1, head_dim=32,
                                  mlp_intermediate=128, text_channels=32, text_maxlen=64, block_chunks=1,
                                  semantic_scales=3, detail_scale_min_tokens=16, rope_max_frames=21),
    pn="0.06M", num_scales=6, default_aspect="1:1", aspects=("1:1",), image_repetition=(2, 2, 1, 1, 1, 1),
    video_repetition=(2, 2, 1, 1, 1, 1), sampling=SamplingConfig(guidance_scale=3.0), default_seconds=1,
    text_encoder="bytes", seed=0))

__all__ += ["PipelineConfig", "SamplingConfig"]


# ----------------------------------------------------------------------------------------------
# Inference precision
# ----------------------------------------------------------------------------------------------

# What a user may ask for: "fp32" (everything in float32) or "bf16" (the reference's inference policy).
PRECISIONS = ("fp32", "bf16")
_DTYPE_NAMES = ("float32", "bfloat16", "float16")


def _torch_dtype(name: str | None) -> Any:
    import torch  # lazily: this module stays importable without torch

    return None if name is None else getattr(torch, name)


@dataclass(frozen=True)
class PrecisionPolicy:
    """The dtypes inference runs in (inference.md 2.1 and 5, transformer.md 11).

    Only the transformer blocks and the Flan-T5 encoder change; the embeddings, the unconditional text,
    the final norm and the heads, the VAE and the summed codes always stay float32. Build one with
    :func:`precision_policy`, which knows the reference's two variants.
    """

    name: str
    # Weight dtype of the transformer blocks, and the autocast dtype their forward runs under (None = off).
    block_weights: str = "float32"
    block_autocast: str | None = None
    # Weight dtype of the Flan-T5 encoder, and the autocast dtype it runs under (None = off).
    text_weights: str = "float32"
    text_autocast: str | None = None

    def __post_init__(self) -> None:
        _require(self.name in PRECISIONS, f"precision must be one of {list(PRECISIONS)}, got {self.name!r}")
        for field_name in ("block_weights", "block_autocast", "text_weights", "text_autocast"):
            value = getattr(self, field_name)
            _require(value in _DTYPE_NAMES or (value is None and field_name.endswith("autocast")),
                     f"PrecisionPolicy.{field_name} must be one of {list(_DTYPE_NAMES)}, got {value!r}")

    @property
    def block_dtype(self) -> Any:
        return _torch_dtype(self.block_weights)

    @property
    def block_autocast_dtype(self) -> Any:
        return _torch_dtype(self.block_autocast)

    @property
    def text_dtype(self) -> Any:
        return _torch_dtype(self.text_weights)

    @property
    def text_autocast_dtype(self) -> Any:
        return _torch_dtype(self.text_autocast)


def check_precision(name: Any) -> str:
    """``name`` if it is a precision a user may ask for; one ConfigError line otherwise."""
    _require(isinstance(name, str) and name in PRECISIONS,
             f"precision must be one of {list(PRECISIONS)} (or None: bf16 on CUDA, fp32 elsewhere), got {name!r}")
    return name


def default_precision(device_type: str) -> str:
    """The precision used when none was asked for: the reference's bf16 on CUDA, fp32 on every other device
    (bf16 matmuls on a CPU are slower than fp32 and only lose accuracy)."""
    return "bf16" if device_type == "cuda" else "fp32"


def precision_policy(name: str, *, interactive: bool = False) -> PrecisionPolicy:
    """The policy behind a precision name.

    ``"bf16"`` is what the reference's scripts do: the T2V/I2V scripts cast every block to bf16
    (``block.bfloat16()``, ``bf16=1``) and run blocks and Flan-T5 (fp16 weights) under bf16 autocast; the
    interactive script keeps float32 block weights (``bf16=0``) under the same autocast and runs Flan-T5 in
    plain fp16 (it encodes outside the autocast region).
    """
    check_precision(name)
    if name == "fp32":
        return PrecisionPolicy("fp32")
    if interactive:
        return PrecisionPolicy("bf16", block_weights="float32", block_autocast="bfloat16", text_weights="float16")
    return PrecisionPolicy("bf16", block_weights="bfloat16", block_autocast="bfloat16", text_weights="float16",
                           text_autocast="bfloat16")


__all__ += ["PRECISIONS", "PrecisionPolicy", "check_precision", "default_precision", "precision_policy"]


# ----------------------------------------------------------------------------------------------
# Training data
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DataConfig:
    """Where the training records and cached latents live, and how clips and captions are drawn.

    Defaults follow the released 480p fine-tuning scripts (training spec sections 2 and 10): 16 fps,
    whole-second durations clamped to 5 s (``video_frames=81``), the ``<<<t=Ns>>>`` duration prefix on
    video captions, sentence truncation with probability 0.3 and 10 % condition (caption) dropout.
    """

    # jsonl files or glob patterns (``data/*/*.jsonl``); records in the reference format.
    jsonl: tuple[str, ...] = ()
    # Root of the safetensors latent cache written by ``infinitystar extract-features``.
    cache_dir: str = ""
    # Relative ``video_path`` / ``image_path`` values are resolved against this folder (None = the
    # folder of the jsonl file that holds the record).
    video_root: str | None = None
    # Training frame rate; clips are sampled by timestamp at this rate whatever the native fps.
    fps: int = 16
    # Pixel budget of the bucket table and of the scale pyramid ('0.06M', '0.25M', '0.40M', '0.90M') ...
    pn: str = "0.40M"
    # ... optionally truncated to its first `num_scales` grids (tiny test models; None = the pn's own).
    num_scales: int | None = None
    # Latent frames per clip of the space-time pyramid (20 = 5 s at 16 fps with the 4x temporal VAE).
    frames_inner_clip: int = 20
    # VAE temporal compression (latent frames = (pixel frames - 1) / time_stride + 1).
    time_stride: int = 4
    # Clips longer than this many whole seconds are clamped to it (or dropped with drop_long_video);
    # 5 = the released `video_frames=81`, 10 = 161.
    max_seconds: int = 5
    # Clips shorter than this many whole seconds are dropped (0 keeps everything, as the scripts).
    min_seconds: int = 0
    drop_long_video: bool = False
    # Caption processing: "<<<t=Ns>>>" prefix on video captions (images never get one).
    duration_prefix: bool = True
    # Probability of sentence truncation (videos) / of the short caption (images): `short_cap_prob`.
    short_caption_prob: float = 0.3
    # Sentence truncation on/off (`enable_dynamic_length_prompt`); images still pick short vs long.
    sentence_truncation: bool = True
    # Probability that a sample's caption is replaced by the unconditional one (`cfg` = 0.1).
    cond_dropout: float = 0.1
    # Image records: "both" keeps images and videos, "video"/"image" keeps only one kind.
    media: str = "both"
    # If set, the fraction of each epoch's samples that are images (images are repeated or
    # subsampled to reach it); None = the records' own proportion.
    image_fraction: float | None = None
    # Extraction: "mean" stores the posterior mean, "sample" a seeded posterior sample (the reference).
    latent_sampling: str = "mean"
    # Seed of every data random stream (shuffling, caption draws, dropout); persisted in checkpoints.
    seed: int = 0
    num_workers: int = 0

    def __post_init__(self) -> None:
        from .schedules import num_scales_for_pn  # schedules imports nothing from here

        jsonl = (self.jsonl,) if isinstance(self.jsonl, str) else tuple(self.jsonl)
        object.__setattr__(self, "jsonl", jsonl)
        _require(all(isinstance(p, str) and p for p in jsonl),
                 f"DataConfig.jsonl must be non-empty path strings, got {list(jsonl)}")
        _require(isinstance(self.fps, int) and self.fps > 0, f"DataConfig.fps must be an int > 0, got {self.fps!r}")
        try:
            full = num_scales_for_pn(self.pn)
        except (KeyError, ValueError) as err:
            raise ConfigError(f"DataConfig.pn: unknown pixel budget {self.pn!r} ({err})") from None
        if self.num_scales is not None:
            _require(1 <= self.num_scales <= full,
                     f"DataConfig.num_scales must be in 1..{full} for pn={self.pn!r}, got {self.num_scales}")
        _require(self.frames_inner_clip > 0,
                 f"DataConfig.frames_inner_clip must be > 0, got {self.frames_inner_clip}")
        _require(self.time_stride > 0, f"DataConfig.time_stride must be > 0, got {self.time_stride}")
        _require(self.fps % self.time_stride == 0,
                 f"DataConfig.fps ({self.fps}) must be a multiple of time_stride ({self.time_stride}) so whole "
                 f"seconds map to whole latent frames")
        _require(self.max_seconds >= 0, f"DataConfig.max_seconds must be >= 0, got {self.max_seconds}")
        _require(0 <= self.min_seconds <= self.max_seconds,
                 f"DataConfig.min_seconds must be in 0..max_seconds ({self.max_seconds}), got {self.min_seconds}")
        for name in ("short_caption_prob", "cond_dropout"):
            value = getattr(self, name)
            _require(0.0 <= value <= 1.0, f"DataConfig.{name} must be in [0, 1], got {value}")
        _require(self.media in ("both", "video", "image"),
                 f"DataConfig.media must be 'both', 'video' or 'image', got {self.media!r}")
        if self.image_fraction is not None:
            _require(0.0 <= self.image_fraction <= 1.0,
                     f"DataConfig.image_fraction must be in [0, 1], got {self.image_fraction}")
            _require(self.media == "both",
                     f"DataConfig.image_fraction needs media='both', got media={self.media!r}")
        _require(self.latent_sampling in ("mean", "sample"),
                 f"DataConfig.latent_sampling must be 'mean' or 'sample', got {self.latent_sampling!r}")
        _require(isinstance(self.seed, int), f"DataConfig.seed must be an int, got {self.seed!r}")
        _require(self.num_workers >= 0, f"DataConfig.num_workers must be >= 0, got {self.num_workers}")

    @property
    def latent_frames_per_second(self) -> int:
        return self.fps // self.time_stride


__all__ += ["DataConfig"]


# ----------------------------------------------------------------------------------------------
# Transformer training
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TrainConfig:
    """One transformer training run (``infinitystar train CONFIG``), loadable from TOML or JSON.

    Defaults are the released fine-tuning scripts' (training spec sections 5 and 9): AdamW with lr
    4e-5, betas (0.9, 0.97), eps 1e-8, no weight decay, constant LR without warmup, gradient clip 5,
    bf16 autocast on CUDA with fp32 master weights, per-block activation checkpointing, no EMA,
    bitwise self-correction strength 0.3 and the scale-subset table of the script for the pipeline's pixel
    budget (720p for pn 0.90M, else 480p). Condition (caption) dropout is a data setting: ``data.cond_dropout``.
    """

    # What to train: a pipeline preset name (random initialisation, e.g. "tiny-test") or a model folder in
    # our layout or the official download (fine-tuning; see InfinityStarPipeline.from_pretrained).
    pipeline: str = "tiny-test"
    # With a folder holding several official transformers: which one (official-720p, official-480p, ...).
    pipeline_preset: str | None = None
    # Records, latent cache, captions, buckets; its pn/num_scales/frames_inner_clip must match the pipeline's.
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    # Run folder: train_config.json, train_log.jsonl, checkpoints/step_XXXXXXXX.
    output_dir: str = "runs/train"
    # Optimizer steps of the whole run (a resumed run continues up to this number).
    steps: int = 1000
    # Samples per step per data-parallel rank, packed into one sequence (global batch = batch_size x ranks).
    batch_size: int = 1
    # Token budget (text + visual) of a packed sequence: samples draw only scale subsets that fit; None = none.
    max_tokens: int | None = None
    lr: float = 4e-5
    betas: tuple[float, float] = (0.9, 0.97)
    eps: float = 1e-8
    weight_decay: float = 0.0
    # "constant" (the reference), "cosine" or "linear" decay from lr to lr*min_lr_ratio at `steps`, after warmup.
    lr_schedule: str = "constant"
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0
    # Global gradient-norm clip (<= 0 disables it).
    grad_clip: float = 5.0
    # bf16 autocast of the blocks on CUDA (the reference's fp16=2); CPU always trains in float32.
    bf16: bool = True
    # FSDP2 MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32) instead of fp32 parameters (CUDA only).
    fsdp_bf16_params: bool = False
    # Recompute every block in backward (the reference's enable_checkpointing=full-block).
    activation_checkpointing: bool = True
    # Exponential moving average of the weights, 0 = off (the reference: off; 0.9999 when on).
    ema_decay: float = 0.0
    # Bitwise self-correction: per-scale flip probability drawn from {0, 0.01, ..., strength}.
    bsc_strength: float = 0.3
    # Scale subsets ("outcomes"): off trains every scale of every sample. The default table needs the
    # official pyramids; small presets whose clips have fewer scales than the table names get only
    # outcome 0 (the first-frame pyramid), so train them with var_len = false.
    var_len: bool = True
    # Relative outcome probabilities; None = the release script's table for the pipeline's pn: 720p's at 0.90M,
    # else 480p's (train.scale_subsets.var_len_prob_for).
    var_len_prob: tuple[float, ...] | None = None
    drop_720p_last_scale: bool = True
    # Loss weights per scale (reweight_loss_by_scale=4, max_reweight_value=40 in the scripts).
    reweight_loss_by_scale: float = 4.0
    max_reweight_value: float = 40.0
    # Log every N steps (console + train_log.jsonl), checkpoint every N steps and at the end, keep the newest K.
    log_every: int = 1
    ckpt_every: int = 200
    keep_last_k: int = 3
    # Seed of the model initialisation (presets) and of the per-sample training draws (scale subsets,
    # repetitions, BSC flips); the data order has its own seed, data.seed.
    seed: int = 0
    # "auto" (CUDA if available), "cpu" or "cuda".
    device: str = "auto"
    # Attention backend of the training forward: "auto" (FlexAttention on CUDA, SDPA on CPU), "sdpa", "flex".
    attention: str = "auto"

    def __post_init__(self) -> None:
        object.__setattr__(self, "betas", tuple(float(b) for b in self.betas))
        if self.var_len_prob is not None:
            object.__setattr__(self, "var_len_prob", tuple(float(p) for p in self.var_len_prob))
        if isinstance(self.data, dict):
            object.__setattr__(self, "data", config_from_dict(DataConfig, self.data))
        _require(isinstance(self.data, DataConfig), f"TrainConfig.data must be a DataConfig, got {self.data!r}")
        _require(isinstance(self.pipeline, str) and bool(self.pipeline),
                 f"TrainConfig.pipeline must be a preset name or a folder, got {self.pipeline!r}")
        _require(isinstance(self.output_dir, str) and bool(self.output_dir),
                 f"TrainConfig.output_dir must be a non-empty path, got {self.output_dir!r}")
        for name in ("steps", "batch_size", "log_every", "ckpt_every", "keep_last_k"):
            v = getattr(self, name)
            _require(isinstance(v, int) and not isinstance(v, bool) and v >= 1,
                     f"TrainConfig.{name} must be an int >= 1, got {v!r}")
        _require(self.max_tokens is None or (isinstance(self.max_tokens, int) and self.max_tokens > 0),
                 f"TrainConfig.max_tokens must be None or a positive int, got {self.max_tokens!r}")
        _require(self.lr > 0 and math.isfinite(self.lr), f"TrainConfig.lr must be > 0, got {self.lr}")
        _require(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas),
                 f"TrainConfig.betas must be two numbers in [0, 1), got {self.betas}")
        _require(self.eps > 0, f"TrainConfig.eps must be > 0, got {self.eps}")
        _require(self.weight_decay >= 0, f"TrainConfig.weight_decay must be >= 0, got {self.weight_decay}")
        _require(self.lr_schedule in ("constant", "cosine", "linear"),
                 f"TrainConfig.lr_schedule must be 'constant', 'cosine' or 'linear', got {self.lr_schedule!r}")
        _require(isinstance(self.warmup_steps, int) and self.warmup_steps >= 0,
                 f"TrainConfig.warmup_steps must be an int >= 0, got {self.warmup_steps!r}")
        _require(0 <= self.min_lr_ratio <= 1, f"TrainConfig.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        _require(math.isfinite(self.grad_clip), f"TrainConfig.grad_clip must be finite, got {self.grad_clip}")
        _require(0 <= self.ema_decay < 1, f"TrainConfig.ema_decay must be in [0, 1) (0 = off), got {self.ema_decay}")
        _require(0 <= self.bsc_strength <= 1, f"TrainConfig.bsc_strength must be in [0, 1], got {self.bsc_strength}")
        _require(self.var_len_prob is None or (bool(self.var_len_prob) and all(p >= 0 for p in self.var_len_prob)
                                               and any(p > 0 for p in self.var_len_prob)),
                 f"TrainConfig.var_len_prob must be non-negative with a positive entry, got {self.var_len_prob}")
        _require(self.reweight_loss_by_scale >= 0,
                 f"TrainConfig.reweight_loss_by_scale must be >= 0, got {self.reweight_loss_by_scale}")
        _require(self.max_reweight_value > 0,
                 f"TrainConfig.max_reweight_value must be > 0, got {self.max_reweight_value}")
        _require(isinstance(self.seed, int) and not isinstance(self.seed, bool),
                 f"TrainConfig.seed must be an int, got {self.seed!r}")
        _require(self.device in ("auto", "cpu", "cuda"),
                 f"TrainConfig.device must be 'auto', 'cpu' or 'cuda', got {self.device!r}")
        _require(self.attention in ("auto", "sdpa", "flex"),
                 f"TrainConfig.attention must be 'auto', 'sdpa' or 'flex', got {self.attention!r}")


def train_config_from_dict(data: dict[str, Any]) -> TrainConfig:
    """A :class:`TrainConfig` from plain data (a ``[data]`` table becomes the DataConfig); unknown keys are
    rejected by name, at both levels."""
    data = dict(data)
    if "data" in data:
        if not isinstance(data["data"], dict):
            raise ConfigError(f"TrainConfig.data must be a table/object, got {data['data']!r}")
        data["data"] = config_from_dict(DataConfig, data["data"])
    return config_from_dict(TrainConfig, data)


def load_train_config(path: str, **overrides: Any) -> TrainConfig:
    """Read a TrainConfig from a ``.toml`` or ``.json`` file; ``overrides`` replace top-level fields."""
    import json
    from pathlib import Path

    import tomllib

    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"training config {p} does not exist")
    if p.suffix.lower() == ".toml":
        try:
            data = tomllib.loads(p.read_text(encoding="utf-8"))
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{p}: invalid TOML: {exc}") from None
    elif p.suffix.lower() == ".json":
        try:
            data = json.loads(p.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{p}: invalid JSON: {exc}") from None
    else:
        raise ConfigError(f"training config {p} must be a .toml or .json file")
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: the top level must be a table/object, got {type(data).__name__}")
    data.update(overrides)
    try:
        return train_config_from_dict(data)
    except TypeError as exc:
        raise ConfigError(f"{p}: {exc}") from None


__all__ += ["TrainConfig", "load_train_config", "train_config_from_dict"]


# ----------------------------------------------------------------------------------------------
# VAE training
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class VAETrainConfig:
    """Training or fine-tuning the video VAE (``infinitystar train-vae CONFIG``; ``train/vae_trainer.py``).

    The reference never released its tokenizer training code (vae spec 7); the loss structure and the
    default weights below follow what its code does contain: an L1 reconstruction term, the BSQ
    commitment (0.25) and entropy (0.1) terms, Adam with betas (0.9, 0.95), lr 1e-4, gradient clip 1.0,
    a hinge-loss PatchGAN. LPIPS (which needs downloaded VGG weights) is replaced by a structural
    term that needs no download (see ``train/vae_losses.structural_loss``).

    Relative paths in a config *file* are resolved against that file's folder (``from_file``).
    """

    # Architecture: a VAE preset name ("tiny-test", "official", ...). None = the architecture stored in
    # ``init_checkpoint`` (the official preset for the official .pth).
    vae_preset: str | None = None
    # Weights to start from (our safetensors export or the official .pth); None = random initialisation.
    init_checkpoint: str | None = None
    # Training media, any mix of: folders (scanned recursively for videos, images and .npy clips), .jsonl
    # files in the reference format (records with `video_path` or `image_path`, relative to the jsonl),
    # .txt lists (one path per line) and single media files. May be empty only when the Python API is
    # given a dataset object instead (``train_vae(config, dataset=...)``).
    data: tuple[str, ...] = ()
    # Held-out media (same forms) for the evaluation PSNR; empty = no evaluation.
    eval_data: tuple[str, ...] = ()
    # Held-out clips drawn once (seeded) and evaluated every `eval_every` steps and at the end (0 = end only).
    eval_clips: int = 8
    eval_every: int = 0
    # Clip shape: pixel frames (1 + 4k; 1 trains on single frames), sampling rate, size after the
    # reference's cover-resize + centre crop (multiples of 16). Images become still clips.
    num_frames: int = 17
    fps: float = 16.0
    height: int = 64
    width: int = 64
    # Keep every decoded, resized source video in memory (fast for small data sets such as the demo's).
    cache_decoded: bool = False
    # Optimisation. batch_size >= 2 matters on CPU: PyTorch only uses its fast (oneDNN) 3-D convolution
    # for small inputs when the batch has more than one sample (measured ~4x faster per sample).
    steps: int = 1000
    batch_size: int = 4
    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.0
    # Linear warm-up steps, then "constant" or "cosine" decay to lr * min_lr_ratio at the last step.
    warmup_steps: int = 0
    lr_schedule: str = "constant"
    min_lr_ratio: float = 0.1
    # Gradient-norm clip (0 = off).
    grad_clip: float = 1.0
    # Loss weights. Pixel terms are on [-1, 1] pixels, averaged over every element.
    l1_weight: float = 1.0
    l2_weight: float = 0.0
    # Sparse scenes (a small object on a dark background, as the demo's clips): pixels whose brightest channel
    # is above `foreground_threshold` ([-1, 1] scale) weigh 1 + foreground_weight in the L1/L2 terms, so the
    # few object pixels are not drowned by the background (0 = off, every pixel weighs 1).
    foreground_weight: float = 0.0
    foreground_threshold: float = -0.9
    # Train only the decoder side (decoder + proj_up); the encoder, proj_down and the latent scale stay frozen,
    # so the latents and bit labels -- and a transformer trained on them -- are unchanged. For fine-tuning a
    # decoder on longer clips than the VAE was trained on (the demo recipe's second VAE stage).
    train_decoder_only: bool = False
    # Structural "perceptual" term: (1 - SSIM) over an image pyramid + image/time-gradient L1.
    perceptual_weight: float = 0.1
    # Generator side of the hinge GAN (0 = off, no discriminator is built); active from `gan_start_step`.
    gan_weight: float = 0.0
    gan_start_step: int = 0
    disc_lr: float | None = None  # None = lr
    disc_channels: int = 64
    disc_layers: int = 3
    # BSQ terms, averaged over the quantization steps (only with `quantize`).
    commitment_weight: float = 0.25
    entropy_weight: float = 0.1
    # Decode the multi-scale BSQ summed codes instead of the continuous latent (straight-through), so the
    # decoder learns to decode what the transformer generates.
    quantize: bool = True
    # Semantic/detail bit widths and threshold of the quantizer (a "quantizer" preset).
    quantizer_preset: str = "tiny-test"
    # Repetitions per scale of a clip pyramid ('[2,2,1,1]', '[3]*12+[2,1,1]' or a list); None = 1 each.
    quant_repetition: str | tuple[int, ...] | None = None
    # Gradient of the quantizer: "identity" (straight through the whole multi-scale quantizer, as VAR) or
    # "residual" (straight through each step's BSQ, through its l2 normalisation, as the reference's BSQ).
    quant_gradient: str = "identity"
    # Latent frames per clip pyramid after the first frame (the pipeline's frames_inner_clip: 20 official, 8 demo).
    quant_frames_inner_clip: int = 20
    seed: int = 0
    out_dir: str = "outputs/vae-train"
    # Training-state checkpoints every N steps (and at the end); only the newest `keep_last_k` are kept.
    checkpoint_every: int = 500
    keep_last_k: int = 2
    log_every: int = 10
    # Continue from the newest checkpoint in `out_dir` if there is one.
    resume: bool = True
    device: str = "cpu"
    # torch intra-op threads for the run (None = leave PyTorch's setting). On a CPU shared with other jobs,
    # fewer threads than cores avoids OpenMP oversubscription (measured up to 10x faster per step).
    threads: int | None = None
    # Convolution weights/activations in channels_last_3d memory layout (faster oneDNN kernels on CPU).
    channels_last: bool = True
    progress: bool = True

    def __post_init__(self) -> None:
        for name in ("data", "eval_data"):
            value = getattr(self, name)
            value = (value,) if isinstance(value, str) else tuple(value)
            object.__setattr__(self, name, value)
            _require(all(isinstance(p, str) and p for p in value),
                     f"VAETrainConfig.{name} must be a list of non-empty path strings, got {list(value)}")
        _require(self.vae_preset is not None or self.init_checkpoint is not None,
                 "VAETrainConfig: set vae_preset (e.g. 'tiny-test') or init_checkpoint")
        if self.vae_preset is not None:
            get_preset("vae", self.vae_preset)  # raises with the list of presets
        get_preset("quantizer", self.quantizer_preset)
        _require(isinstance(self.num_frames, int) and self.num_frames >= 1 and (self.num_frames - 1) % 4 == 0,
                 f"VAETrainConfig.num_frames must be 1 + 4k (1, 5, 9, 13, 17, ...), got {self.num_frames!r}")
        _require(isinstance(self.fps, (int, float)) and math.isfinite(self.fps) and self.fps > 0,
                 f"VAETrainConfig.fps must be a number > 0, got {self.fps!r}")
        for name in ("height", "width"):
            v = getattr(self, name)
            _require(isinstance(v, int) and v >= 16 and v % 16 == 0,
                     f"VAETrainConfig.{name} must be a positive multiple of 16, got {v!r}")
        for name in ("steps", "batch_size", "eval_clips", "checkpoint_every", "keep_last_k", "log_every",
                     "disc_channels", "disc_layers", "quant_frames_inner_clip"):
            v = getattr(self, name)
            _require(isinstance(v, int) and v >= 1, f"VAETrainConfig.{name} must be an int >= 1, got {v!r}")
        for name in ("eval_every", "warmup_steps", "gan_start_step", "seed"):
            v = getattr(self, name)
            _require(isinstance(v, int) and v >= 0, f"VAETrainConfig.{name} must be an int >= 0, got {v!r}")
        _require(self.lr > 0, f"VAETrainConfig.lr must be > 0, got {self.lr}")
        _require(self.disc_lr is None or self.disc_lr > 0, f"VAETrainConfig.disc_lr must be > 0, got {self.disc_lr}")
        betas = tuple(float(b) for b in self.betas)
        object.__setattr__(self, "betas", betas)
        _require(len(betas) == 2 and all(0 <= b < 1 for b in betas),
                 f"VAETrainConfig.betas must be two numbers in [0, 1), got {list(self.betas)}")
        _require(self.lr_schedule in ("constant", "cosine"),
                 f"VAETrainConfig.lr_schedule must be 'constant' or 'cosine', got {self.lr_schedule!r}")
        _require(0 <= self.min_lr_ratio <= 1, f"VAETrainConfig.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        for name in ("weight_decay", "grad_clip", "l1_weight", "l2_weight", "foreground_weight", "perceptual_weight",
                     "gan_weight", "commitment_weight", "entropy_weight"):
            v = getattr(self, name)
            _require(isinstance(v, (int, float)) and math.isfinite(v) and v >= 0,
                     f"VAETrainConfig.{name} must be a number >= 0, got {v!r}")
        _require(self.l1_weight + self.l2_weight + self.perceptual_weight > 0,
                 "VAETrainConfig: l1_weight, l2_weight and perceptual_weight are all 0 (no reconstruction loss)")
        _require(isinstance(self.foreground_threshold, (int, float)) and -1 <= self.foreground_threshold < 1,
                 f"VAETrainConfig.foreground_threshold must be in [-1, 1), got {self.foreground_threshold!r}")
        if self.quant_repetition is not None and not isinstance(self.quant_repetition, str):
            object.__setattr__(self, "quant_repetition", tuple(int(r) for r in self.quant_repetition))
        _require(self.quant_gradient in ("identity", "residual"),
                 f"VAETrainConfig.quant_gradient must be 'identity' or 'residual', got {self.quant_gradient!r}")
        _require(self.threads is None or (isinstance(self.threads, int) and self.threads >= 1),
                 f"VAETrainConfig.threads must be None or an int >= 1, got {self.threads!r}")
        _require(isinstance(self.out_dir, str) and bool(self.out_dir),
                 f"VAETrainConfig.out_dir must be a non-empty path, got {self.out_dir!r}")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> VAETrainConfig:
        """Build from a dict; unknown keys are rejected by name."""
        return config_from_dict(cls, data)

    @classmethod
    def from_file(cls, path: str) -> VAETrainConfig:
        """Read a TOML (``.toml``) or JSON (``.json``) file of top-level keys; relative paths are resolved
        against the file's folder."""
        import json
        from pathlib import Path

        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"config file {p} does not exist")
        text = p.read_text(encoding="utf-8")
        if p.suffix.lower() == ".toml":
            try:
                import tomllib
            except ImportError:  # Python 3.10
                raise ConfigError(f"{p}: reading TOML needs Python 3.11+; use a .json config") from None
            try:
                raw = tomllib.loads(text)
            except tomllib.TOMLDecodeError as err:
                raise ConfigError(f"{p} is not valid TOML: {err}") from None
        elif p.suffix.lower() == ".json":
            try:
                raw = json.loads(text)
            except json.JSONDecodeError as err:
                raise ConfigError(f"{p} is not valid JSON: {err}") from None
        else:
            raise ConfigError(f"config file {p} must end in .toml or .json")
        if not isinstance(raw, dict):
            raise ConfigError(f"{p} must hold a table/object of settings, got {type(raw).__name__}")
        base = p.resolve().parent

        def resolve(value: str) -> str:
            return value if Path(value).is_absolute() else str(base / value)

        for key in ("data", "eval_data"):
            if isinstance(raw.get(key), str):
                raw[key] = [raw[key]]
            if isinstance(raw.get(key), list):
                raw[key] = [resolve(v) if isinstance(v, str) else v for v in raw[key]]
        for key in ("init_checkpoint", "out_dir"):
            if isinstance(raw.get(key), str):
                raw[key] = resolve(raw[key])
        try:
            return cls.from_dict(raw)
        except TypeError as err:  # e.g. a value of the wrong kind reaching __post_init__
            raise ConfigError(f"{p}: {err}") from None


__all__ += ["VAETrainConfig"]


# ----------------------------------------------------------------------------------------------
# The demo model (weights ship in ``infinitystar/demo/weights``; recipe: ``infinitystar train-demo``)
# ----------------------------------------------------------------------------------------------

# 64x64 frames -> a 4x4 latent with the usual 16x/4x VAE; the 1:1 ladder's first 4 grids (1x1 .. 4x4) are the
# pyramid. The three small grids are semantic (16 bits), the 4x4 grid is detail (64 bits): both the tokenizer
# rule (h*w < 16) and the transformer's inference rule (scale index < 3) give this split.
_DEMO_VAE = VAEConfig(block_out_channels=(16, 32, 64, 64, 64), layers_per_block=1)
_DEMO_QUANTIZER = QuantizerConfig(detail_scale_min_tokens=16)
_DEMO_TRANSFORMER = TransformerConfig(
    depth=4, embed_dim=192, num_heads=3, num_kv_heads=3, head_dim=64, mlp_intermediate=512, text_channels=64,
    text_maxlen=96, block_chunks=1, semantic_scales=3, detail_scale_min_tokens=16, rope_max_frames=21)
register_preset("vae", "demo", _DEMO_VAE)
register_preset("quantizer", "demo", _DEMO_QUANTIZER)
register_preset("transformer", "demo", _DEMO_TRANSFORMER)
# 33-frame clips (9 latent frames: the first frame + one 8-frame clip = 2 s at 16 fps), word-level text
# encoder (no download). The 4x4 detail scale runs twice (repetition 2, as the official presets repeat
# scales): 128 bits per token instead of 64 raised the tokenizer's PSNR (+1.4 dB after 400 VAE steps, same
# seed and batches), and the second pass refines a sampled first pass instead of drawing all detail bits at
# once. Guidance defaults were chosen on the demo judge (README, "Demo model").
register_preset("pipeline", "demo", PipelineConfig(
    name="demo", vae=_DEMO_VAE, quantizer=_DEMO_QUANTIZER, transformer=_DEMO_TRANSFORMER,
    pn="0.06M", num_scales=4, default_aspect="1:1", aspects=("1:1",), image_repetition=(1, 1, 1, 2),
    video_repetition=(1, 1, 1, 2), sampling=SamplingConfig(guidance="cfg", guidance_scale=3.0, tau_image=1.0,
                                                           tau_video=1.0),
    frames_inner_clip=8, default_seconds=2, quality_suffix="", text_encoder="words", seed=0))

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
from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Any, TypeVar

import torch

from .generation.schedules import num_scales_for_pn, uses_detail_lfq
from .hardware import cpu_precision

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
    # How every convolution pads a frame's borders: "zeros" (the reference, every official preset) or "circular"
    # (each frame wraps around: the demo world is a torus, so an object that leaves one edge is at the other).
    spatial_padding: str = "zeros"

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
        _require(self.spatial_padding in ("zeros", "circular"),
                 f"VAEConfig.spatial_padding must be 'zeros' or 'circular', got {self.spatial_padding!r}")

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
        return self.detail_dim if uses_detail_lfq((1, h, w), self.detail_scale_min_tokens) else self.semantic_dim


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
    # Inference head rule (generation.schedules.uses_semantic_head): semantic head iff si % K < semantic_scales.
    semantic_scales: int = 12
    # Training head rule and tokenizer (generation.schedules.uses_detail_lfq): detail iff h*w >= this.
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
    guidance_method: str = "apg"
    # Strength of guidance, >= 1; 1 turns it off whatever the method (see uses_guidance).
    guidance_scale: float = 34.0
    apg_norm_threshold: float = 0.05
    # Logits are multiplied by 1/tau: tau_image on the first-frame pyramid, tau_video on video clips.
    tau_image: float = 1.0
    tau_video: float = 0.4

    def __post_init__(self) -> None:
        _require(self.guidance_method in ("apg", "cfg", "none"),
                 f"SamplingConfig.guidance_method must be 'apg', 'cfg' or 'none', got {self.guidance_method!r}")
        # The one check of the guidance scale: the pipeline, the CLI and the web page all end here.
        _require(isinstance(self.guidance_scale, (int, float)) and not isinstance(self.guidance_scale, bool)
                 and math.isfinite(self.guidance_scale) and self.guidance_scale >= 1,
                 f"guidance_scale must be >= 1 (1 = no guidance), got {self.guidance_scale!r}")
        _require(self.apg_norm_threshold > 0,
                 f"SamplingConfig.apg_norm_threshold must be > 0, got {self.apg_norm_threshold}")
        for name in ("tau_image", "tau_video"):
            _require(getattr(self, name) > 0, f"SamplingConfig.{name} must be > 0, got {getattr(self, name)}")

    @property
    def uses_guidance(self) -> bool:
        """Whether the unconditional branch runs: the one place that decides "scale 1 means off"."""
        return self.guidance_method != "none" and self.guidance_scale != 1

    def with_guidance_scale(self, guidance_scale: float | None) -> SamplingConfig:
        """These settings with another guidance scale (None: unchanged); checked like any field."""
        return self if guidance_scale is None else dataclasses.replace(self, guidance_scale=guidance_scale)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SamplingConfig:
        """From a saved dict; files written before the method was named ``guidance_method`` say ``guidance``."""
        data = dict(data)
        if "guidance" in data and "guidance_method" not in data:
            data["guidance_method"] = data.pop("guidance")
        return config_from_dict(cls, data)


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


# The official settings, stated here only: tests/test_official_modes.py rebuilds every official mode of the
# reference (golden/scale_schedules.json) from these presets.
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
    sampling=SamplingConfig(guidance_method="cfg", guidance_scale=3.0, tau_image=0.5, tau_video=0.5),
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
# tiny-test as an interactive model (``pipe.interactive`` needs ``interactive=True``): interactive stories on random
# weights in seconds. In float32 it computes exactly what tiny-test computes; only the bf16 policy differs.
register_preset("pipeline", "tiny-test-interactive",
                replace(get_preset("pipeline", "tiny-test"), name="tiny-test-interactive", interactive=True))

__all__ += ["PipelineConfig", "SamplingConfig"]


# ----------------------------------------------------------------------------------------------
# Inference precision
# ----------------------------------------------------------------------------------------------

# What a user may ask for: "fp32" (everything in float32) or "bf16" (the reference's inference policy).
PRECISIONS = ("fp32", "bf16")
_DTYPE_NAMES = ("float32", "bfloat16", "float16")


def _torch_dtype(name: str | None) -> torch.dtype | None:
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
             f"precision must be one of {list(PRECISIONS)} (or None: the device's default), got {name!r}")
    return name


def default_precision(device_type: str) -> str:
    """The precision used when none was asked for: the reference's bf16 on CUDA; on a CPU, bf16 only where it is native
    and measured faster (:func:`infinitystar.hardware.cpu_precision`: elsewhere bf16 is emulated, many times slower
    than fp32); fp32 on every other device."""
    if device_type == "cuda":
        return "bf16"
    if device_type == "cpu":
        try:
            return cpu_precision().precision
        except ValueError as exc:  # a bad INFINITYSTAR_CPU_PRECISION
            raise ConfigError(str(exc)) from None
    return "fp32"


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


# The dtypes ``pipe.to(dtype)`` / ``torch_dtype=`` accept, and the precision each one means.
_PRECISION_OF_DTYPE = {torch.float32: "fp32", torch.bfloat16: "bf16"}


def precision_for_dtype(dtype: Any) -> str:
    """The precision a torch dtype (or its name, ``"bfloat16"``/``"float32"``, or a precision name) asks for."""
    if isinstance(dtype, str):
        if dtype in PRECISIONS:
            return dtype
        dtype = getattr(torch, dtype, dtype)
    if dtype not in _PRECISION_OF_DTYPE:
        raise ConfigError(f"dtype must be torch.bfloat16 (the reference's bf16 policy) or torch.float32, got {dtype!r}"
                          f" (float16 is not a precision of InfinityStar: its Flan-T5 runs in fp16 under bf16 anyway)")
    return _PRECISION_OF_DTYPE[dtype]


DEVICE_CHOICES = ("auto", "cpu", "cuda")


def resolve_device(device: Any) -> torch.device:
    """``"auto"`` -> CUDA when present, else the CPU; any other device as a ``torch.device``. Asking for CUDA where
    there is none is one ConfigError line (not torch's deep traceback at the first move)."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ConfigError(f"unknown device {device!r}: use 'auto', 'cpu', 'cuda' or 'cuda:N'") from exc
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device {device!r} was asked for, but this machine has no CUDA GPU that PyTorch can use "
                              f"(torch {torch.__version__}); use --device cpu or auto")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ConfigError(f"device {device!r} does not exist: this machine has {torch.cuda.device_count()} CUDA "
                              f"device(s)")
        if dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
    return dev


__all__ += ["PRECISIONS", "PrecisionPolicy", "check_precision", "default_precision", "precision_policy",
            "precision_for_dtype", "resolve_device", "DEVICE_CHOICES"]


# ----------------------------------------------------------------------------------------------
# The demo model (weights ship in ``infinitystar/demo/weights``; recipe: ``infinitystar train-demo``)
# ----------------------------------------------------------------------------------------------

# 64x64 frames -> a 4x4 latent with the usual 16x/4x VAE; the 1:1 ladder's first 4 grids (1x1 .. 4x4) are the
# pyramid. The three small grids are semantic (16 bits), the 4x4 grid is detail (64 bits): both the tokenizer
# rule (h*w < 16) and the transformer's inference rule (scale index < 3) give this split.
# Circular padding: the demo world is a torus (demo.synthetic). The weights shipped before it (the in-frame world)
# were trained zero-padded; their model_index.json has no spatial_padding and so loads as "zeros".
_DEMO_VAE = VAEConfig(block_out_channels=(16, 32, 64, 64, 64), layers_per_block=1, spatial_padding="circular")
_DEMO_QUANTIZER = QuantizerConfig(detail_scale_min_tokens=16)
_DEMO_TRANSFORMER = TransformerConfig(
    depth=4, embed_dim=192, num_heads=3, num_kv_heads=3, head_dim=64, mlp_intermediate=512, text_channels=64,
    text_maxlen=96, block_chunks=1, semantic_scales=3, detail_scale_min_tokens=16, rope_max_frames=25)
register_preset("vae", "demo", _DEMO_VAE)
register_preset("quantizer", "demo", _DEMO_QUANTIZER)
register_preset("transformer", "demo", _DEMO_TRANSFORMER)
# The RoPE covers 25 latent frames, the first frame + three 8-frame clips: the longest training videos (6 s);
# longer videos run their later clips at the third clip's positions (generation.plan). It is also an
# interactive model (stories of 2 s segments), trained on story turns (train.tasks).
# 33-frame clips (9 latent frames: the first frame + one 8-frame clip = 2 s at 16 fps), word-level text
# encoder (no download). The 4x4 detail scale runs twice (repetition 2, as the official presets repeat
# scales): 128 bits per token instead of 64 raised the tokenizer's PSNR (+1.4 dB after 400 VAE steps, same
# seed and batches), and the second pass refines a sampled first pass instead of drawing all detail bits at
# once. Guidance defaults were chosen on the demo judge (README, "Demo model").
register_preset("pipeline", "demo", PipelineConfig(
    name="demo", vae=_DEMO_VAE, quantizer=_DEMO_QUANTIZER, transformer=_DEMO_TRANSFORMER,
    pn="0.06M", num_scales=4, default_aspect="1:1", aspects=("1:1",), image_repetition=(1, 1, 1, 2),
    video_repetition=(1, 1, 1, 2), sampling=SamplingConfig(guidance_method="cfg", guidance_scale=3.0, tau_image=1.0,
                                                           tau_video=1.0),
    frames_inner_clip=8, default_seconds=2, quality_suffix="", text_encoder="words", interactive=True, seed=0))


# ----------------------------------------------------------------------------------------------
# Request limits
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RequestLimits:
    """Upper bounds of one request, checked before any work: a typo (``--frames 1000001``, ``--seconds 1e9``, a
    200-segment story, a 100-megapixel upload) is one line naming the figure and the limit, never minutes of work
    that end in an out-of-memory kill. Raise a bound on purpose with ``pipe.limits = replace(pipe.limits, ...)`` or
    ``--request-limit NAME=VALUE``.
    """

    # Pixel frames of one video: 2001 is 125 s at 16 fps, 25 times the official 5 s clips.
    max_frames: int = 2001
    # Characters of one prompt (the text encoders keep at most text_maxlen tokens: 512 for Flan-T5).
    max_prompt_chars: int = 4000
    # Prompts of one interactive story (one segment each).
    max_segments: int = 50
    # Videos of one call (prompts x num_videos_per_prompt).
    max_videos: int = 64
    # A conditioning image or video file: bytes on disk, and pixels of one frame (64 MP: 8000 x 8000).
    max_upload_bytes: int = 512 * 1024 * 1024
    max_upload_pixels: int = 64_000_000
    # Refuse a request whose estimated working memory exceeds what the device has free
    # (infinitystar.memory.estimate; the weights already loaded are not counted again).
    check_memory: bool = True

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "check_memory":
                _require(isinstance(value, bool), f"limits.check_memory must be true or false, got {value!r}")
            else:
                _require(isinstance(value, int) and not isinstance(value, bool) and value >= 1,
                         f"limits.{f.name} must be an integer >= 1, got {value!r}")

    def with_overrides(self, items: Sequence[str]) -> RequestLimits:
        """These limits with ``NAME=VALUE`` strings applied (the CLI's ``--request-limit``); unknown names fail
        naming the valid ones."""
        changes: dict[str, Any] = {}
        names = [f.name for f in fields(self)]
        for item in items:
            name, sep, value = item.partition("=")
            name = name.strip().replace("-", "_")
            if not sep or name not in names:
                raise ConfigError(f"--request-limit {item!r}: expected NAME=VALUE with NAME one of {', '.join(names)}")
            if name == "check_memory":
                if value.strip().lower() not in ("true", "false", "1", "0", "yes", "no"):
                    raise ConfigError(f"--request-limit {item!r}: check_memory is true or false")
                changes[name] = value.strip().lower() in ("true", "1", "yes")
            else:
                try:
                    changes[name] = int(value)
                except ValueError:
                    raise ConfigError(f"--request-limit {item!r}: {name} must be an integer") from None
        return replace(self, **changes)




def limit_hint(name: str) -> str:
    """The end of a refusal by limit ``name``: where the limit lives and how to raise it."""
    return f"(RequestLimits.{name}; --request-limit {name}=N raises it)"


__all__ += ["RequestLimits", "limit_hint"]

"""Configuration dataclasses and the registry of named presets.

Every component is built from a frozen dataclass. Constructors validate their values and raise a
``ConfigError`` that names the offending field and value, so a typo in a preset or a user config
fails at construction, not deep inside a forward pass.

Presets are registered by kind (``"vae"``, ``"quantizer"``, ``"transformer"``, ``"pipeline"``) and
name; ``get_preset("vae", "official")`` returns the configuration of the released checkpoint.
"""

from __future__ import annotations

import dataclasses
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

"""The memory modes: what stays on the GPU, in which form, while a pipeline generates.

A mode is a frozen :class:`MemoryMode`; :data:`MEMORY_MODES` names the ones users pick. Every mode but the
quantized ones computes exactly what ``plain`` computes (the same weights in the same dtype, only moved at other
times), so the same seed gives the same video; ``int8``/``fp8`` round the transformer's linear weights.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

from ..config import ConfigError

Offload = Literal["none", "model", "block"]
Quantization = Literal["int8", "fp8"]
VAEDecode = Literal["full", "tiled"]

OFFLOADS = ("none", "model", "block")
QUANTIZATIONS = ("int8", "fp8")
VAE_DECODES = ("full", "tiled")


@dataclass(frozen=True)
class MemoryMode:
    """How a pipeline keeps its components while it works on an accelerator.

    ``offload``: ``"none"`` (every component on the GPU), ``"model"`` (text encoder, transformer and VAE each on the
    GPU only while it works, the rest in host memory), ``"block"`` (the transformer's small modules on the GPU, its
    blocks in host memory, ``block_group_size`` of them moved in at a time, the next group prefetched on a side
    stream; text encoder and VAE as with ``"model"``).
    ``quantize``: None, or weight-only ``"int8"`` / ``"fp8"`` of the transformer blocks' linear layers (torchao;
    fp8 needs a GPU of compute capability 8.9 or newer).
    ``vae_decode``: ``"full"`` frames or ``"tiled"`` (overlapping spatial tiles of ``vae_tile_size`` latent cells:
    bounded activation memory at 720p, an approximation near tile borders). The decoder always runs causally in
    temporal chunks, so time never needs slicing.
    ``release_text_encoder``: move the text encoder off the GPU as soon as the prompts are encoded.
    """

    name: str = "custom"
    offload: Offload = "none"
    block_group_size: int = 4
    quantize: Quantization | None = None
    vae_decode: VAEDecode = "full"
    vae_tile_size: int = 32
    release_text_encoder: bool = False

    def __post_init__(self) -> None:
        if self.offload not in OFFLOADS:
            raise ConfigError(f"MemoryMode.offload must be one of {list(OFFLOADS)}, got {self.offload!r}")
        if self.quantize is not None and self.quantize not in QUANTIZATIONS:
            raise ConfigError(f"MemoryMode.quantize must be None or one of {list(QUANTIZATIONS)}, "
                              f"got {self.quantize!r}")
        if self.vae_decode not in VAE_DECODES:
            raise ConfigError(f"MemoryMode.vae_decode must be one of {list(VAE_DECODES)}, got {self.vae_decode!r}")
        if not (isinstance(self.block_group_size, int) and self.block_group_size >= 1):
            raise ConfigError(f"MemoryMode.block_group_size must be an int >= 1, got {self.block_group_size!r}")
        if not (isinstance(self.vae_tile_size, int) and self.vae_tile_size >= 1):
            raise ConfigError(f"MemoryMode.vae_tile_size must be an int >= 1, got {self.vae_tile_size!r}")

    @property
    def exact(self) -> bool:
        """Whether the mode computes what ``plain`` computes (no weight rounding, no tiling)."""
        return self.quantize is None and self.vae_decode == "full"

    def with_(self, **changes) -> MemoryMode:
        return replace(self, **changes)


MEMORY_MODES: dict[str, MemoryMode] = {m.name: m for m in (
    MemoryMode("plain"),
    MemoryMode("model_offload", offload="model"),
    MemoryMode("block_offload", offload="block", release_text_encoder=True),
    MemoryMode("int8", quantize="int8"),
    MemoryMode("fp8", quantize="fp8"),
    # The least GPU memory: int8 blocks streamed a group at a time, tiled VAE decode, text encoder off the GPU.
    MemoryMode("smallest", offload="block", quantize="int8", vae_decode="tiled", release_text_encoder=True),
)}


def memory_mode(mode: str | MemoryMode) -> MemoryMode:
    """The mode named ``mode`` (one ConfigError line listing the names otherwise), or ``mode`` itself."""
    if isinstance(mode, MemoryMode):
        return mode
    if mode not in MEMORY_MODES:
        raise ConfigError(f"unknown memory mode {mode!r}; valid: {', '.join(MEMORY_MODES)}")
    return MEMORY_MODES[mode]


__all__ = ["MEMORY_MODES", "OFFLOADS", "QUANTIZATIONS", "VAE_DECODES", "MemoryMode", "memory_mode"]

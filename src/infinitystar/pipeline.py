"""``InfinityStarPipeline``: text/image/video in, frames out — one object for every task.

Shaped like a diffusers pipeline: ``from_pretrained(local_dir)``, ``__call__`` with ``check_inputs``,
``encode_prompt``, the loop inside a progress bar, decode, ``output_type``. The pipeline owns no
math: every frame, clip and step count comes from :mod:`infinitystar.generation.plan`, the loop (interactive
turns and forced steps included) is :mod:`infinitystar.generation.loop`, the tokenizer :mod:`infinitystar.vae`.

Two folder layouts load:

* the official download: a transformer shard folder (``infinitystar_8b_720p_weights/``,
  ``infinitystar_8b_480p_weights/`` or an interactive one), ``infinitystar_videovae.pth`` and
  ``text_encoder/flan-t5-xl-official``;
* our own: ``model_index.json`` plus one subfolder per component (``transformer/``, ``vae/``,
  ``text_encoder/``), each with ``config.json`` and ``model.safetensors``.
"""

from __future__ import annotations

import contextlib
import json
import os
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn
from tqdm.auto import tqdm

from . import checkpoints, media
from .config import (
    ConfigError,
    PipelineConfig,
    PrecisionPolicy,
    QuantizerConfig,
    SamplingConfig,
    TransformerConfig,
    VAEConfig,
    check_precision,
    config_from_dict,
    config_to_dict,
    default_precision,
    get_preset,
    precision_for_dtype,
    precision_policy,
    resolve_device,
)
from .fileio import atomic_write_json
from .generation import schedules
from .generation.loop import GenerationResult, ProgressCallback, StepEvent, generate_codes, run_interactive_turn
from .generation.plan import (
    GenerationPlan,
    InteractivePlan,
    clip_seconds,
    clips_in_seconds,
    condition_clips,
    encode_latent_bits,
    frames_of_clips,
    interactive_size,
    num_frames_for,
    resolve_size,
    whole_pixel_frames,
)
from .memory import MEMORY_MODES, MemoryMode, memory_mode
from .memory.materialize import random_pipeline_components
from .memory.offload import BlockOffload
from .memory.quantize import quantize_blocks
from .text import (
    ByteTextEncoder,
    FlanT5Encoder,
    TextEncoder,
    WordTextEncoder,
    build_prompt,
    duration_seconds_for_frames,
    interactive_prompt,
)
from .transformer.model import InfinityStarTransformer
from .vae.model import VideoVAE

_KEEP = object()  # "leave as it is" for a keyword whose None means something

MODEL_INDEX = "model_index.json"
OFFICIAL_VAE_FILE = "infinitystar_videovae.pth"
OFFICIAL_T5_DIR = Path("text_encoder") / "flan-t5-xl-official"
# Official transformer folder name fragments -> preset.
OFFICIAL_TRANSFORMER_DIRS = {
    "infinitystar_8b_720p_weights": "official-720p",
    "infinitystar_8b_480p_weights": "official-480p",
    "InfinityStarInteract_24K_iters": "interactive-480p",
}


@dataclass
class InfinityStarPipelineOutput:
    """``frames``: uint8 [T, H, W, 3] (np), a list of PIL images (pil), a float tensor [3, T, H, W] in [-1, 1]
    (pt), or the summed-code latent [1, 64, T', h, w] (latent). ``segments`` holds the per-prompt pieces of an
    interactive generation."""

    frames: Any
    fps: int
    latent: Tensor | None = None
    segments: list[Any] = field(default_factory=list)


def _pipeline_config_to_dict(cfg: PipelineConfig) -> dict[str, Any]:
    return config_to_dict(cfg)


def _pipeline_config_from_dict(data: dict[str, Any]) -> PipelineConfig:
    data = dict(data)
    data["vae"] = config_from_dict(VAEConfig, data["vae"])
    data["quantizer"] = config_from_dict(QuantizerConfig, data["quantizer"])
    data["transformer"] = config_from_dict(TransformerConfig, data["transformer"])
    data["sampling"] = SamplingConfig.from_dict(data["sampling"])
    for key in ("image_repetition", "video_repetition", "aspects"):
        data[key] = tuple(data[key])
    return config_from_dict(PipelineConfig, data)


def _own_layout_config(root: Path) -> PipelineConfig:
    index = json.loads((root / MODEL_INDEX).read_text())
    try:
        return _pipeline_config_from_dict(index["config"])
    except (KeyError, TypeError) as exc:
        raise ConfigError(f"{root / MODEL_INDEX} has no valid 'config': {exc}") from exc


def _official_layout_choice(root: Path, preset: str | PipelineConfig | None) -> tuple[str, PipelineConfig]:
    """The transformer folder of an official download to load and its configuration (see ``from_pretrained``)."""
    found = {name: p for name, p in OFFICIAL_TRANSFORMER_DIRS.items() if (root / name).exists()}
    if preset is None or isinstance(preset, PipelineConfig):
        if len(found) != 1:
            raise ValueError(f"{root} holds transformer folders {sorted(found) or 'none'}; pass preset= one of "
                             f"{sorted(OFFICIAL_TRANSFORMER_DIRS.values())}")
        folder_name, name = next(iter(found.items()))
        return folder_name, preset if isinstance(preset, PipelineConfig) else get_preset("pipeline", name)
    names = [n for n, p in OFFICIAL_TRANSFORMER_DIRS.items() if p == preset]
    if not names:
        raise ValueError(f"unknown official preset {preset!r}; valid: {sorted(OFFICIAL_TRANSFORMER_DIRS.values())}")
    if not (root / names[0]).exists():
        raise FileNotFoundError(f"preset {preset!r} needs the transformer folder {root / names[0]}")
    return names[0], get_preset("pipeline", preset)


def _not_a_pipeline_folder(root: Path) -> FileNotFoundError:
    return FileNotFoundError(f"{root} is neither a pipeline folder ({MODEL_INDEX}) nor an official download "
                             f"({OFFICIAL_VAE_FILE} + transformer shard folder + {OFFICIAL_T5_DIR})")


def read_pipeline_config(source: str | os.PathLike, preset: str | None = None) -> PipelineConfig:
    """The configuration of a pipeline preset name or model folder (our layout or the official download, where
    ``preset`` picks the transformer as in ``from_pretrained``), read without loading any weights."""
    root = Path(source)
    if not root.is_dir():
        return get_preset("pipeline", str(source))  # the error lists the presets
    if (root / MODEL_INDEX).is_file():
        return _own_layout_config(root)
    if (root / OFFICIAL_VAE_FILE).is_file():
        return _official_layout_choice(root, preset)[1]
    raise _not_a_pipeline_folder(root)


def _movable(component: Any) -> bool:
    """Whether a component has weights to move between devices (Flan-T5 wraps its module, others are modules)."""
    return isinstance(component, (nn.Module, FlanT5Encoder))


def _check_condition_tensor(x: Tensor, what: str, want: tuple[int, ...], given: Any) -> Tensor:
    """``x`` as float32 after checking its layout (``want``, [1, 3, T, H, W] at the bucket size) and range."""
    if tuple(x.shape) != want:
        layouts = "[3, H, W], [3, 1, H, W] or [1, 3, H, W]" if what == "image" else "[3, T, H, W] or [1, 3, T, H, W]"
        raise ValueError(f"{what} tensor of shape {tuple(given)} must be {layouts} with H x W = {want[3]}x{want[4]} "
                         f"(the bucket)")
    if not x.is_floating_point():
        raise ValueError(f"{what} tensor must be floating point in [-1, 1], got dtype {x.dtype}")
    lo, hi = float(x.min()), float(x.max())
    if lo < -1 - 1e-6 or hi > 1 + 1e-6:
        raise ValueError(f"{what} tensor values must lie in [-1, 1], got [{lo:.4g}, {hi:.4g}]")
    return x.float()


def extension_frames(cfg: PipelineConfig, path: str | os.PathLike, total_latents: int) -> np.ndarray:
    """The frames of a video file that condition video extension to ``total_latents`` latent frames with preset
    ``cfg``, as uint8 RGB [T, H, W, 3] at the file's own size.

    The first c whole clips (c = those the file's duration ``num_frames / fps`` covers, at most all but the
    output's last clip), i.e. ``1 + c * frames_per_clip`` frames spread over the first ``c * frames_per_clip / fps``
    seconds exactly as the reference's reader picks them (:func:`media.read_video_clip`; ``get_clip(0, 5, 81)``
    for the official models: a 16 fps file gives its frame 0 twice, a 30 fps file every ~1.85th frame). A file
    shorter than one clip gives its first frame only (with a warning).
    """
    num_frames, fps = media.count_video_frames(path)
    clips = condition_clips(cfg, clips_in_seconds(cfg, num_frames / fps), total_latents)
    if clips == 0:
        warnings.warn(f"{path} lasts {num_frames / fps:.2f} s, less than one clip ({clip_seconds(cfg):g} s): "
                      f"only its first frame conditions the video", stacklevel=4)
        return media.read_video(path, max_frames=1)[0]
    return media.read_video_clip(path, frames_of_clips(cfg, clips), clips * clip_seconds(cfg))[0]


def interactive_reference_frames(cfg: PipelineConfig, path: str | os.PathLike) -> np.ndarray:
    """The reference video of an interactive story with preset ``cfg``: its last ``frames_per_clip / fps`` seconds
    as ``1 + frames_per_clip`` uint8 RGB frames at the file's own size, picked as the reference does
    (``get_clip(duration - 5, duration, 81)``, :func:`media.read_video_clip`)."""
    return media.read_video_clip(path, frames_of_clips(cfg, 1), clip_seconds(cfg), at_end=True)[0]


def _to_arguments(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, Any]:
    """(device, dtype) of a ``to(...)`` call in any of ``nn.Module.to``'s forms."""
    unknown = set(kwargs) - {"device", "dtype"}
    if unknown:
        raise TypeError(f"to() got unexpected keyword arguments {sorted(unknown)}")
    device, dtype = kwargs.get("device"), kwargs.get("dtype")
    if len(args) > 2:
        raise TypeError(f"to() takes a device and/or a dtype, got {len(args)} positional arguments")
    for a in args:
        if isinstance(a, torch.dtype):
            dtype = a
        else:
            device = a
    if device is None and dtype is None:
        raise TypeError("to() needs a device, a dtype or both")
    return device, dtype


def _frame_hw(video: Tensor | np.ndarray) -> tuple[int, int]:
    """(H, W) of uint8 frames [T, H, W, 3] or of a float video [..., H, W]."""
    if isinstance(video, np.ndarray):
        return int(video.shape[1]), int(video.shape[2])
    return int(video.shape[-2]), int(video.shape[-1])


class InfinityStarPipeline:
    """Text-to-image, text-to-video, image-to-video, video extension, long and interactive videos."""

    def __init__(self, transformer: InfinityStarTransformer, vae: VideoVAE, text_encoder: TextEncoder,
                 config: PipelineConfig) -> None:
        if text_encoder.width != config.transformer.text_channels:
            raise ConfigError(f"text encoder width {text_encoder.width} != transformer text_channels "
                              f"{config.transformer.text_channels}")
        # Inference-only, however the weights were made: a loaded checkpoint comes frozen, and CPU convolutions
        # take another kernel (other rounding, ~1e-7) when a weight requires grad, even under no_grad; so a
        # pipeline built from a preset and one loaded from its save_pretrained folder compute the same bits.
        # The trainer turns gradients back on for the module it trains.
        self.transformer = transformer.eval().requires_grad_(False)
        self.vae = vae.eval().requires_grad_(False)
        self.text_encoder = text_encoder
        self.config = config
        # Where the components are given (a pipeline built from modules already on a GPU computes there).
        self._device = next(transformer.parameters()).device
        self._memory: MemoryMode = MEMORY_MODES["plain"]
        self._block_offload: BlockOffload | None = None
        self._quantized: str | None = None  # "int8"/"fp8" once the blocks' linear weights were quantized
        # None: the precision follows the device (see set_precision); the weights arrive in float32.
        self._precision_request: str | None = None
        self._policy: PrecisionPolicy = precision_policy("fp32", interactive=config.interactive)

    # ------------------------------------------------------------------------------------------
    # Construction
    # ------------------------------------------------------------------------------------------

    @classmethod
    def from_preset(cls, name: str | PipelineConfig, seed: int = 0, *, device: torch.device | str | None = None,
                    torch_dtype: torch.dtype | None = None) -> InfinityStarPipeline:
        """A pipeline with randomly initialised weights (tests, benchmarks, training from scratch).

        Without ``device`` the weights are made on the CPU with the reference's initialisation, seeded by
        ``seed``. With ``device`` they are built on the meta device and materialized straight on ``device`` in
        ``torch_dtype`` (default: the device's precision), never held in host memory: the official 8B presets run
        with nothing downloaded (random weights, and a random stand-in of Flan-T5-XL for their text encoder).
        """
        cfg = get_preset("pipeline", name) if isinstance(name, str) else name
        if device is not None:
            dev = resolve_device(device)
            precision = precision_for_dtype(torch_dtype) if torch_dtype is not None else default_precision(dev.type)
            policy = precision_policy(precision, interactive=cfg.interactive)
            transformer, vae, text = random_pipeline_components(cfg, dev, policy.block_dtype, seed=seed)
            pipe = cls(transformer, vae, text, cfg)
            pipe._precision_request = precision if torch_dtype is not None else None
            return pipe.to(dev)
        torch.manual_seed(seed)
        transformer = InfinityStarTransformer(cfg.transformer)
        vae = VideoVAE(cfg.vae)
        text = cls._build_text_encoder(cfg, None)
        return cls(transformer, vae, text, cfg)

    @staticmethod
    def _build_text_encoder(cfg: PipelineConfig, folder: Path | None) -> TextEncoder:
        if cfg.text_encoder in ("bytes", "words"):
            cls_ = ByteTextEncoder if cfg.text_encoder == "bytes" else WordTextEncoder
            enc = cls_(cfg.transformer.text_channels, max_length=cfg.transformer.text_maxlen)
            if folder is not None and enc.state_dict():
                checkpoints.load_state_dict_strict(enc, checkpoints.load_safetensors(folder / "model.safetensors"),
                                                   cls_.__name__, source=str(folder))
            return enc
        if folder is None:
            raise ConfigError(f"preset {cfg.name!r} needs a Flan-T5 folder (text_encoder='t5'); use from_pretrained")
        return FlanT5Encoder.from_pretrained(folder)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, *, preset: str | PipelineConfig | None = None,
                        precision: str | None = None, torch_dtype: torch.dtype | None = None,
                        ) -> InfinityStarPipeline:
        """Load our layout (``model_index.json``) or the official download layout from a local folder.

        For the official layout ``preset`` picks the transformer folder when several are present (a preset name),
        or gives the whole configuration (a :class:`PipelineConfig`, e.g. for a small stand-in of that layout).
        ``precision`` (see :meth:`set_precision`): ``"bf16"`` reads the block weights straight into bf16 (half the
        host memory of loading float32 first); None follows the device the pipeline is later moved to.
        ``torch_dtype`` (diffusers' name) says the same as a dtype: ``torch.bfloat16`` or ``torch.float32``.
        """
        if torch_dtype is not None:
            asked = precision_for_dtype(torch_dtype)
            if precision is not None and check_precision(precision) != asked:
                raise ValueError(f"precision={precision!r} contradicts torch_dtype={torch_dtype}")
            precision = asked
        if precision is not None:
            check_precision(precision)
        root = Path(path)
        if not root.is_dir():
            raise FileNotFoundError(f"model folder {root} does not exist")
        if (root / MODEL_INDEX).is_file():
            pipe = cls._from_own_layout(root, precision)
        elif (root / OFFICIAL_VAE_FILE).is_file():
            pipe = cls._from_official_layout(root, preset, precision)
        else:
            raise _not_a_pipeline_folder(root)
        return pipe.set_precision(precision)

    @staticmethod
    def _load_block_dtype(cfg: PipelineConfig, precision: str | None) -> torch.dtype | None:
        """dtype to read the block weights in: the asked precision's, else as stored (cast later if needed)."""
        return None if precision is None else precision_policy(precision, interactive=cfg.interactive).block_dtype

    @classmethod
    def _from_own_layout(cls, root: Path, precision: str | None) -> InfinityStarPipeline:
        cfg = _own_layout_config(root)
        transformer = checkpoints.load_transformer(root / "transformer" / "model.safetensors", cfg.transformer)
        block_dtype = cls._load_block_dtype(cfg, precision)
        if block_dtype is not None:
            transformer.blocks.to(block_dtype)
        vae = checkpoints.load_vae(root / "vae" / "model.safetensors", cfg.vae)
        text = cls._build_text_encoder(cfg, root / "text_encoder")
        return cls(transformer, vae, text, cfg)

    @classmethod
    def _from_official_layout(cls, root: Path, preset: str | PipelineConfig | None,
                              precision: str | None) -> InfinityStarPipeline:
        folder_name, cfg = _official_layout_choice(root, preset)
        transformer = checkpoints.load_official_transformer(root / folder_name, cfg.transformer,
                                                            block_dtype=cls._load_block_dtype(cfg, precision))
        vae = checkpoints.load_vae(root / OFFICIAL_VAE_FILE, cfg.vae)
        text = cls._build_text_encoder(cfg, root / OFFICIAL_T5_DIR)
        return cls(transformer, vae, text, cfg)

    def save_pretrained(self, path: str | os.PathLike) -> None:
        """Write our layout: ``model_index.json`` + ``transformer/``, ``vae/``, ``text_encoder/`` (safetensors)."""
        root = Path(path)
        for sub in ("transformer", "vae", "text_encoder"):
            (root / sub).mkdir(parents=True, exist_ok=True)
        checkpoints.save_transformer(self.transformer, root / "transformer" / "model.safetensors")
        checkpoints.save_vae(self.vae, root / "vae" / "model.safetensors")
        atomic_write_json(root / "transformer" / "config.json", config_to_dict(self.config.transformer))
        atomic_write_json(root / "vae" / "config.json", config_to_dict(self.config.vae))
        if isinstance(self.text_encoder, nn.Module):
            # The word encoder has no weights at all: nothing to write (its vectors come from hashing words).
            state = self.text_encoder.state_dict()
            if state:
                checkpoints.save_safetensors(state, root / "text_encoder" / "model.safetensors")
        elif isinstance(self.text_encoder, FlanT5Encoder):
            # A Flan-T5 folder (tokenizer + encoder weights) that FlanT5Encoder.from_pretrained reads back.
            self.text_encoder.tokenizer.save_pretrained(str(root / "text_encoder"))
            self.text_encoder.model.save_pretrained(str(root / "text_encoder"))
        else:
            warnings.warn("the text encoder is not a module; save its folder separately", stacklevel=2)
        atomic_write_json(root / MODEL_INDEX,
                          {"_class_name": type(self).__name__, "config": _pipeline_config_to_dict(self.config)})

    # ------------------------------------------------------------------------------------------
    # Devices
    # ------------------------------------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        """Where the pipeline computes (the GPU also under the offload modes, whose weights wait in host memory)."""
        return self._device

    @property
    def dtype(self) -> torch.dtype:
        """The transformer blocks' weight dtype (float32, or bfloat16 under ``bf16``; see :meth:`set_precision`)."""
        return self._blocks_dtype() or torch.float32

    @property
    def memory_mode(self) -> MemoryMode:
        """The memory mode in effect (see :meth:`set_memory_mode`)."""
        return self._memory

    def to(self, *args: Any, **kwargs: Any) -> InfinityStarPipeline:
        """Move the pipeline to a device and/or precision, as ``nn.Module.to``: ``to("cuda")``,
        ``to(torch.bfloat16)``, ``to("cuda", torch.bfloat16)`` or ``to(device=..., dtype=...)``.

        A dtype is a precision (:meth:`set_precision`): ``torch.bfloat16`` -> ``"bf16"``, ``torch.float32`` ->
        ``"fp32"``. Without one, the device's default applies (bf16 on CUDA) unless a precision was asked for.
        The memory mode stays: under an offload mode the weights stay in host memory and ``device`` is where they
        work.
        """
        device, dtype = _to_arguments(args, kwargs)
        return self._change(device=None if device is None else resolve_device(device),
                            precision=self._precision_request if dtype is None else precision_for_dtype(dtype))

    def set_memory_mode(self, mode: str | MemoryMode, device: torch.device | str | None = None,
                        ) -> InfinityStarPipeline:
        """Choose how the components use GPU memory (:data:`~infinitystar.memory.MEMORY_MODES` names them).

        ``plain`` keeps everything on ``device``; ``model_offload`` moves each component there only while it works;
        ``block_offload`` streams the transformer's blocks in groups; ``int8``/``fp8`` quantize the blocks' linear
        weights; ``smallest`` combines block offload, int8, tiled VAE decode and releasing the text encoder. Every mode
        but the quantized ones and the tiled decode gives ``plain``'s video for the same seed. ``device`` (default:
        the pipeline's device, or CUDA when that is the CPU and a GPU is present) is where the work happens.
        Quantization cannot be undone in place (the float weights are gone): leaving it needs a reload.
        """
        mode = memory_mode(mode)
        if device is None and self._device.type == "cpu" and torch.cuda.is_available():
            device = "cuda"
        return self._change(device=None if device is None else resolve_device(device), memory=mode)

    def enable_model_cpu_offload(self, device: torch.device | str = "cuda") -> InfinityStarPipeline:
        """Keep components in host memory and move each to ``device`` only while it works (memory mode
        ``model_offload``, keeping the current quantization and VAE decode)."""
        return self.set_memory_mode(replace(self._memory, name="model_offload", offload="model"), device)

    def enable_block_offload(self, group_size: int = 4, device: torch.device | str = "cuda") -> InfinityStarPipeline:
        """Stream the transformer blocks onto ``device`` ``group_size`` at a time (memory mode ``block_offload``)."""
        return self.set_memory_mode(replace(self._memory, name="block_offload", offload="block",
                                            block_group_size=group_size), device)

    def enable_vae_tiling(self, tile_size: int = 32) -> InfinityStarPipeline:
        """Decode frames in overlapping spatial tiles of ``tile_size`` latent cells (bounded memory, approximate near
        tile borders: see :meth:`VideoVAE.decode`)."""
        return self.set_memory_mode(replace(self._memory, name="custom", vae_decode="tiled", vae_tile_size=tile_size),
                                    self._device)

    @property
    def vae_tile_size(self) -> int | None:
        """Tile size of the VAE decode in latent cells, None for whole frames."""
        return self._memory.vae_tile_size if self._memory.vae_decode == "tiled" else None

    def compile_blocks(self, mode: str | None = None) -> InfinityStarPipeline:
        """``torch.compile`` the transformer blocks (opt-in; worth it on a GPU). The first generation of each new
        shape pays the compilation (``benchmarks/bench_gpu.py --compile`` reports that warm-up apart)."""
        if self._memory.offload == "block":
            raise ConfigError("compiled blocks and block offload do not combine (the offload hooks move weights "
                              "under the compiled code): pick another memory mode or leave compile off")
        self.transformer.compile_blocks(mode=mode)
        return self

    def _change(self, *, device: torch.device | None = None, precision: str | None | object = _KEEP,
                memory: MemoryMode | None = None) -> InfinityStarPipeline:
        """Apply a new device / precision request / memory mode, all checked first: a refused change leaves the
        pipeline as it was (no half-moved state)."""
        device = self._device if device is None else device
        request = self._precision_request if precision is _KEEP else precision
        memory = self._memory if memory is None else memory
        name = request or default_precision(device.type)
        block_dtype = precision_policy(name, interactive=self.config.interactive).block_dtype
        if self._quantized is not None:
            if memory.quantize != self._quantized:
                raise ConfigError(f"the transformer blocks are quantized to {self._quantized}; memory mode "
                                  f"{memory.name!r} needs {memory.quantize or 'their float weights'}: reload the "
                                  "pipeline first")
            if block_dtype != self._policy.block_dtype:
                raise ConfigError(f"the transformer blocks are quantized to {self._quantized} from "
                                  f"{self._policy.block_weights} weights; precision {name!r} needs a reload")
        if memory.offload == "block" and getattr(self.transformer, "compiled_blocks", False):
            raise ConfigError("block offload and compiled blocks do not combine: reload the pipeline without "
                              "compile_blocks() to stream blocks")
        self._device, self._precision_request, self._memory = device, request, memory
        self._place()
        return self

    def _place(self) -> None:
        """Put every component where the memory mode and device say, in the precision in effect.

        Order: undo block streaming, cast (before any move: a bf16 copy moves half the bytes), quantize, then
        place. Under an offload mode the host (CPU) keeps the weights that are not working.
        """
        mode, device = self._memory, self._device
        if self._block_offload is not None:
            self._block_offload.detach(torch.device("cpu"))
            self._block_offload = None
        self._apply_precision(device)
        if mode.quantize is not None and self._quantized is None:
            quantize_blocks(self.transformer.blocks, mode.quantize, device=device)
            self._quantized = mode.quantize
        self._move_all(device if mode.offload == "none" else torch.device("cpu"))
        if self._offloaded(self.text_encoder):
            self.text_encoder.to("cpu")
        if mode.offload == "block":
            # The small modules (embeddings, heads, the learned unconditional text) stay on the device; the blocks
            # live in host memory and come over a group at a time while they run.
            for name, child in self.transformer.named_children():
                if name != "blocks":
                    child.to(device)
            self.transformer.uncond_text.data = self.transformer.uncond_text.data.to(device)
            self._block_offload = BlockOffload(self.transformer.blocks, device, mode.block_group_size).attach()

    def _move_all(self, device: torch.device) -> None:
        self.transformer.to(device)
        self.vae.to(device)
        if _movable(self.text_encoder):
            self.text_encoder.to(device)

    def _offloaded(self, module: Any) -> bool:
        """Whether ``module`` waits in host memory and visits the device only while it works."""
        if not _movable(module):
            return False
        offload = self._memory.offload
        if offload == "none":
            return module is self.text_encoder and self._memory.release_text_encoder
        # Under block offload the transformer stays put: its blocks stream on their own.
        return not (offload == "block" and module is self.transformer)

    # ------------------------------------------------------------------------------------------
    # Precision
    # ------------------------------------------------------------------------------------------

    @property
    def precision(self) -> str:
        """The precision in effect: ``"fp32"`` or ``"bf16"`` (see :meth:`set_precision`)."""
        return self._policy.name

    @property
    def precision_policy(self) -> PrecisionPolicy:
        """The dtypes in effect, component by component."""
        return self._policy

    def set_precision(self, precision: str | None) -> InfinityStarPipeline:
        """``"fp32"``: everything in float32. ``"bf16"``: the reference's policy (transformer blocks in bf16 under
        bf16 autocast, Flan-T5 in fp16 under bf16 autocast; the interactive model keeps float32 block weights under
        the autocast and runs Flan-T5 in plain fp16). Embeddings, heads, the VAE and the codes stay float32 either
        way. ``None``: follow the device, bf16 on CUDA (also when offloading to CUDA), fp32 elsewhere; an explicit
        choice sticks across later :meth:`to` calls.
        """
        if precision is not None:
            check_precision(precision)
        return self._change(precision=precision)

    def _apply_precision(self, device: torch.device) -> None:
        """Cast the components to the precision asked for, or to ``device``'s default when none was."""
        name = self._precision_request or default_precision(device.type)
        policy = precision_policy(name, interactive=self.config.interactive)
        if policy == self._policy and self._blocks_dtype() == policy.block_dtype:
            return
        if self._blocks_dtype() == torch.bfloat16 and policy.block_dtype == torch.float32:
            warnings.warn("transformer blocks go back from bf16 to float32 but keep their bf16-rounded values; "
                          "reload the model for the exact float32 weights", stacklevel=5)
        self.transformer.set_precision(policy)
        set_text = getattr(self.text_encoder, "set_precision", None)
        if set_text is not None:  # the built-in byte/word encoders are tiny and always float32
            set_text(policy)
        self._policy = policy

    def _blocks_dtype(self) -> torch.dtype | None:
        params = list(self.transformer.blocks.parameters())
        return params[0].dtype if params else None

    @contextlib.contextmanager
    def _working(self, module: Any) -> Iterator[Any]:
        """``module`` on the working device for the duration: moved there and back under an offload mode (or, for
        the text encoder, when it is released after encoding), else it already is there."""
        if not self._offloaded(module):
            yield module
            return
        module.to(self._device)
        try:
            yield module
        finally:
            module.to("cpu")
            if self._device.type == "cuda":
                torch.cuda.empty_cache()  # hand the freed memory back before the next component arrives

    # ------------------------------------------------------------------------------------------
    # Inputs
    # ------------------------------------------------------------------------------------------

    def resolve_size(self, *, resolution: str | None = None, aspect: str | None = None, height: int | None = None,
                     width: int | None = None, h_div_w: float | None = None,
                     ) -> tuple[float, list[schedules.Scale], tuple[int, int]]:
        """(template, image pyramid, pixel (H, W)) for the requested size: see :func:`resolve_size`."""
        return resolve_size(self.config, resolution=resolution, aspect=aspect, height=height, width=width,
                            h_div_w=h_div_w)

    def num_frames_for(self, num_frames: int | None, seconds: float | None) -> int:
        """Pixel frames of a request (:func:`infinitystar.generation.plan.num_frames_for`)."""
        return num_frames_for(self.config, num_frames, seconds)

    def build_prompt(self, prompt: str, num_frames: int) -> str:
        cfg = self.config
        seconds = None
        if num_frames > 1 and cfg.duration_prefix:
            seconds = duration_seconds_for_frames(num_frames, cfg.fps)
        return build_prompt(prompt, duration_s=seconds, quality_suffix=cfg.quality_suffix)

    def encode_prompt(self, prompt: str, negative_prompt: str | None = None) -> tuple[Tensor, Tensor | None]:
        """Text features of the (templated) prompt and of the negative prompt, if any. The prompt was checked by
        :meth:`check_inputs`."""
        with self._working(self.text_encoder):
            text = self.text_encoder([prompt]).kv_compact
            negative = None
            if negative_prompt:
                negative = self.text_encoder([negative_prompt]).kv_compact
        return text, negative

    def _load_condition(self, image: Any, video: Any, size: tuple[int, int], *,
                        total_latents: int | None = None) -> Tensor | None:
        """The conditioning image or video as [1, 3, T, H, W] in [-1, 1] at the bucket size, or None.

        A video tensor is used as given. A video file gives, with ``total_latents`` (video extension), the
        reference's conditioning clip (:func:`extension_frames`); without it (``reconstruct``), every frame
        at the preset's fps.
        """
        if image is not None and video is not None:
            raise ValueError("give either image= (image-to-video) or video= (video extension), not both")
        h, w = size
        if image is not None:
            if isinstance(image, Tensor):
                x = image
                if x.dim() == 3:  # [3, H, W]
                    x = x[:, None]
                if x.dim() == 4:  # [3, 1, H, W] or a batch of one [1, 3, H, W]
                    x = x[None] if x.shape[0] == 3 else x[:, :, None]
                return _check_condition_tensor(x, "image", (1, 3, 1, h, w), image.shape)
            return media.load_image_tensor(image, h, w)[None, :, None]
        if video is not None:
            if isinstance(video, Tensor):
                x = video if video.dim() == 5 else video[None]  # [1, 3, T, H, W] or [3, T, H, W]
                t = x.shape[2] if x.dim() == 5 else -1
                return _check_condition_tensor(x, "video", (1, 3, t, h, w), video.shape)
            if total_latents is None:
                frames, _ = media.read_video(video, fps=self.config.fps)
            else:
                frames = extension_frames(self.config, video, total_latents)
            frames = media.resize_and_center_crop(frames, h, w)
            return media.frames_to_tensor(frames)[None]
        return None

    def _reference_condition(self, reference: Tensor | np.ndarray, size: tuple[int, int]) -> Tensor:
        """The interactive reference as [1, 3, 1 + frames_per_clip, H, W] in [-1, 1] at the bucket size."""
        if isinstance(reference, Tensor):
            x = self._load_condition(None, reference, size)
            assert x is not None
            need = frames_of_clips(self.config, 1)
            if x.shape[2] < need:
                raise ValueError(f"the reference video needs at least {need} frames at {self.config.fps} fps, "
                                 f"got {x.shape[2]}")
            return x[:, :, -need:]
        return media.frames_to_tensor(media.resize_and_center_crop(reference, *size))[None]

    # ------------------------------------------------------------------------------------------
    # Generation
    # ------------------------------------------------------------------------------------------

    def check_inputs(self, prompts: Sequence[str], output_type: str, guidance_scale: float | None,
                     ) -> SamplingConfig:
        """Check what every task shares, once, before any work: the prompts (non-empty strings), the output type
        and the guidance scale. Returns the sampling settings with the guidance scale applied."""
        for i, p in enumerate(prompts):
            if not isinstance(p, str) or not p.strip():
                where = "prompt" if len(prompts) == 1 else f"prompt {i}"
                raise ValueError(f"{where} must be a non-empty string, got {p!r}")
        if output_type not in ("np", "pil", "pt", "latent"):
            raise ValueError(f"unknown output_type {output_type!r}; valid: 'np', 'pil', 'pt', 'latent'")
        return self.config.sampling.with_guidance_scale(guidance_scale)

    def _encode_video(self, video: Tensor) -> Tensor:
        """VAE encode (posterior mean) of [1, 3, T, H, W] in [-1, 1]."""
        with self._working(self.vae) as vae:
            return vae.encode(video.to(self.device), sample=False)

    @staticmethod
    def _progress(enabled: bool) -> contextlib.AbstractContextManager[ProgressCallback | None]:
        """A tqdm bar over the loop's steps, fed by its progress callback (None when disabled)."""

        @contextlib.contextmanager
        def bar() -> Iterator[ProgressCallback | None]:
            if not enabled:
                yield None
                return
            shown: list[tqdm] = []  # opened at the first report, when the total is known

            def update(done: int, total: int) -> None:
                if not shown:
                    shown.append(tqdm(total=total, desc="scales", leave=False))
                shown[0].update(done - shown[0].n)

            try:
                yield update
            finally:
                for b in shown:
                    b.close()

        return bar()

    @torch.no_grad()
    def reconstruct(self, video: Any, *, resolution: str | None = None, aspect: str | None = None,
                    height: int | None = None, width: int | None = None, output_type: str = "np") -> Any:
        """``video`` through the tokenizer alone: VAE encode, multi-scale BSQ bits along the schedule generation
        uses, their summed codes, VAE decode. The best any generated video can look with these weights.

        ``video``: a file path or a [3, T, H, W] / [1, 3, T, H, W] tensor in [-1, 1] at the bucket size; it is
        resized and centre-cropped like a conditioning video and cut to 1 + 4k frames.
        """
        if output_type not in ("np", "pil", "pt"):
            raise ValueError(f"unknown output_type {output_type!r}; valid: 'np', 'pil', 'pt'")
        cfg = self.config
        _, pyramid, size = self.resolve_size(resolution=resolution, aspect=aspect, height=height, width=width)
        x = self._load_condition(None, video, size)
        assert x is not None
        plan = GenerationPlan(cfg, whole_pixel_frames(x.shape[2], cfg.vae.time_stride), pyramid, cfg.sampling)
        latent = self._encode_video(x[:, :, :plan.num_frames])
        codes = encode_latent_bits(cfg, latent, plan.schedule).summed_codes
        return self._format(self.decode_latent(codes), output_type)

    def decode_latent(self, latent: Tensor) -> Tensor:
        """Summed codes [1, 64, T', h, w] -> video [1, 3, T, H, W] clamped to [-1, 1]."""
        with self._working(self.vae) as vae, torch.no_grad():
            video = vae.decode(latent.to(self.device).float(), tile_size=self.vae_tile_size)
        return video.clamp(-1, 1)

    @staticmethod
    def _format(video_13THW: Tensor, output_type: str) -> Any:
        """Decoded video [1, 3, T, H, W] -> ``output_type``; np/pil frames are uint8 RGB, truncated like the
        reference's ``.to(uint8)`` (no BGR flip, no frame-0 copy: see the README)."""
        if output_type == "pt":
            return video_13THW[0].cpu()
        frames = media.tensor_to_frames(video_13THW[0].cpu())
        if output_type == "np":
            return frames
        if output_type == "pil":
            return [Image.fromarray(f) for f in frames]
        raise ValueError(f"unknown output_type {output_type!r}; valid: 'np', 'pil', 'pt', 'latent'")

    @torch.no_grad()
    def __call__(
        self,
        prompt: str,
        negative_prompt: str | None = None,
        *,
        image: Any = None,
        video: Any = None,
        num_frames: int | None = None,
        seconds: float | None = None,
        resolution: str | None = None,
        aspect: str | None = None,
        height: int | None = None,
        width: int | None = None,
        guidance_scale: float | None = None,
        generator: torch.Generator | None = None,
        seed: int | None = None,
        output_type: str = "np",
        callback_on_step_end: Callable[[InfinityStarPipeline, StepEvent], None] | None = None,
        callback_on_clip_end: Callable[[int, Any], None] | None = None,
        progress: bool = True,
    ) -> InfinityStarPipelineOutput:
        """Generate an image (``num_frames=1``) or a video.

        ``image`` makes it image-to-video (the image is the first frame); ``video`` makes it a video
        extension: its first whole clips, at most all but the output's last, are kept (a file's frames picked as
        the reference picks them, :func:`extension_frames`; a tensor's frame for frame), the rest generated.
        ``callback_on_clip_end(index, frames)`` receives each finished clip's frames (``output_type`` format) as
        soon as it is decoded.
        """
        cfg = self.config
        # Checked before the template adds the duration tag and quality suffix (which would make "" non-empty).
        sampling = self.check_inputs([prompt], output_type, guidance_scale)
        num_frames = self.num_frames_for(num_frames, seconds)
        if image is not None and num_frames == 1:
            raise ValueError("image-to-video needs num_frames > 1 (the image is the first frame)")
        if video is not None and num_frames == 1:
            raise ValueError("video extension needs num_frames longer than the given video, got num_frames=1")
        if generator is None:
            # On the device that samples: the same seed on the same device gives the same video.
            generator = torch.Generator(device=self.device).manual_seed(cfg.seed if seed is None else seed)
        _, pyramid, size = self.resolve_size(resolution=resolution, aspect=aspect, height=height, width=width)
        plan = GenerationPlan(cfg, num_frames, pyramid, sampling)
        condition = self._load_condition(image, video, size, total_latents=plan.latent_frames)
        forced: list[Tensor] = []
        if condition is not None:
            plan = plan.with_condition(condition.shape[2])
            plan.check_condition()
            forced = plan.forced_bits(self._encode_video(condition[:, :, :plan.condition_pixel_frames]))
        text, negative = self.encode_prompt(self.build_prompt(prompt, num_frames), negative_prompt)
        on_step = None if callback_on_step_end is None else (lambda ev: callback_on_step_end(self, ev))
        with self._working(self.transformer) as transformer, self._progress(progress) as on_progress:
            result: GenerationResult = generate_codes(
                transformer, cfg.quantizer, text, plan.schedule, plan.steps, plan.repetitions, sampling,
                generator=generator, negative_LC=negative, forced_bits=forced, frames_inner_clip=cfg.frames_inner_clip,
                on_step=on_step, on_progress=on_progress,
            )
        if output_type == "latent":
            return InfinityStarPipelineOutput(frames=result.summed_codes, fps=cfg.fps, latent=result.summed_codes)
        video_out = self.decode_latent(result.summed_codes)
        if callback_on_clip_end is not None:
            self._emit_clips(plan.clip_pixel_frames, video_out, output_type, callback_on_clip_end)
        return InfinityStarPipelineOutput(frames=self._format(video_out, output_type), fps=cfg.fps,
                                          latent=result.summed_codes)

    def _emit_clips(self, clip_frames: Sequence[int], video: Tensor, output_type: str,
                    callback: Callable[[int, Any], None]) -> None:
        start = 0
        for i, n in enumerate(clip_frames):
            callback(i, self._format(video[:, :, start:start + n], output_type))
            start += n

    # ------------------------------------------------------------------------------------------
    # Interactive
    # ------------------------------------------------------------------------------------------

    @torch.no_grad()
    def interactive(
        self,
        prompts: Sequence[str],
        *,
        video: Any = None,
        aspect: str | None = None,
        guidance_scale: float | None = None,
        seed: int | None = None,
        output_type: str = "np",
        callback_on_segment_end: Callable[[int, Any], None] | None = None,
        progress: bool = True,
    ) -> InfinityStarPipelineOutput:
        """Interactive long video: one prompt per segment, each segment continuing the previous one.

        Segment 0 is the given ``video`` (a file's last ``frames_per_clip / fps`` seconds, sampled as the reference
        does, or a tensor's last 1 + frames_per_clip frames; VAE-encoded at the template nearest the video's own
        aspect unless ``aspect`` is given) or, without one, generated from
        ``prompts[0]`` as a text-to-video clip. Every later prompt generates one clip (``frames_inner_clip``
        latent frames) with the interactive schedule: it attends to its text, a low-resolution semantic
        condition of the previous segment and a full-resolution detail condition (the story's first frame and
        the previous segment's last two latent frames).
        """
        cfg = self.config
        prompts = list(prompts)
        if not prompts:
            raise ValueError("interactive generation needs at least one prompt")
        sampling = self.check_inputs(prompts, output_type, guidance_scale)
        # A file: its last clip at its own size (whose aspect picks the template); a tensor: as given.
        reference = video if video is None or isinstance(video, Tensor) else interactive_reference_frames(cfg, video)
        template, pyramid, size = interactive_size(cfg, None if reference is None else _frame_hw(reference), aspect)
        seed = cfg.seed if seed is None else seed
        turn_plan = InteractivePlan(cfg, tuple(pyramid), sampling)
        # Segment 0: a whole first clip (first frame + one video clip), as latent.
        if video is not None:
            condition = self._reference_condition(reference, size)
            with self._working(self.vae) as vae:
                former = vae.encode(condition.to(self.device))
            first_video = self.decode_latent(former)
        else:
            out = self(prompts[0], num_frames=turn_plan.first_segment_frames, aspect=aspect,
                       guidance_scale=guidance_scale, seed=seed, output_type="latent", progress=progress)
            former = out.latent
            assert former is not None
            first_video = self.decode_latent(former)
        segments = [first_video]
        if callback_on_segment_end is not None:
            callback_on_segment_end(0, self._format(first_video, output_type))
        first_frame = former[:, :, :1]
        for i, prompt in enumerate(prompts[1:], start=1):
            text, _ = self.encode_prompt(interactive_prompt(prompt, turn_plan.clip_seconds))
            with self._working(self.transformer) as transformer, self._progress(progress) as on_progress:
                turn = run_interactive_turn(transformer, cfg.quantizer, text, former, first_frame, turn_plan.layout,
                                            turn_plan.steps, turn_plan.repetitions, sampling, seed=seed,
                                            on_progress=on_progress)
            decoded = self.decode_latent(turn.decode_latent)
            new_frames = decoded[:, :, -turn_plan.clip_pixel_frames:]
            segments.append(new_frames)
            former = turn.next_context
            if callback_on_segment_end is not None:
                callback_on_segment_end(i, self._format(new_frames, output_type))
        full = torch.cat(segments, dim=2)
        return InfinityStarPipelineOutput(frames=self._format(full, output_type), fps=cfg.fps,
                                          segments=[self._format(s, output_type) for s in segments])


def export_to_video(frames: Any, path: str | os.PathLike, fps: int = 16) -> Path:
    """Write frames (np uint8 [T, H, W, 3], PIL list or a [3, T, H, W] tensor) as mp4, or png for one frame."""
    if isinstance(frames, Tensor):
        frames = media.tensor_to_frames(frames)
    if isinstance(frames, list):
        frames = np.stack([np.asarray(f) for f in frames])
    path = Path(path)
    media.save_output(frames, path, fps=fps)
    return path


__all__ = ["InfinityStarPipeline", "InfinityStarPipelineOutput", "export_to_video", "extension_frames",
           "interactive_reference_frames", "read_pipeline_config"]

"""``InfinityStarPipeline``: text/image/video in, frames out — one object for every task.

Shaped like a diffusers pipeline: ``from_pretrained(local_dir)``, ``__call__`` with ``check_inputs``,
``encode_prompt``, the loop inside a progress bar, decode, ``output_type``. The pipeline owns no
math: the loop is :mod:`infinitystar.generation`, the tokenizer :mod:`infinitystar.vae`.

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
import math
import os
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from . import checkpoints, schedules
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
    precision_policy,
)
from .fileio import atomic_write_json
from .generation import GenerationResult, StepEvent, generate_codes, plan_steps, run_interactive_turn
from .text import ByteTextEncoder, FlanT5Encoder, TextEncoder, WordTextEncoder, build_prompt, duration_prefix
from .transformer.model import InfinityStarTransformer
from .vae.model import VideoVAE
from .vae.multiscale import MultiScaleEncoding, encode_to_bits

MODEL_INDEX = "model_index.json"
OFFICIAL_VAE_FILE = "infinitystar_videovae.pth"
OFFICIAL_T5_DIR = Path("text_encoder") / "flan-t5-xl-official"
# Official transformer folder name fragments -> preset.
OFFICIAL_TRANSFORMER_DIRS = {
    "infinitystar_8b_720p_weights": "official-720p",
    "infinitystar_8b_480p_weights": "official-480p",
    "InfinityStarInteract_24K_iters": "interactive-480p",
}
RESOLUTIONS = {"720p": "0.90M", "480p": "0.40M"}


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
    data["sampling"] = config_from_dict(SamplingConfig, data["sampling"])
    for key in ("image_repetition", "video_repetition", "aspects"):
        data[key] = tuple(data[key])
    return config_from_dict(PipelineConfig, data)


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


def resolve_size(cfg: PipelineConfig, *, resolution: str | None = None, aspect: str | None = None,
             height: int | None = None, width: int | None = None, h_div_w: float | None = None,
             ) -> tuple[float, list[schedules.Scale], tuple[int, int]]:
    """(template, image pyramid, pixel (H, W)) of preset ``cfg`` for the requested size.

    The template is the one nearest ``height / width``, else ``h_div_w`` (a ratio as is, e.g. an
    interactive reference video's own h/w), else ``aspect`` (``"W:H"``), else the preset's default aspect.
    Errors name what the preset can do.
    """
    if resolution is not None:
        want = RESOLUTIONS.get(resolution)
        if want is None:
            raise ValueError(f"unknown resolution {resolution!r}; valid: {sorted(RESOLUTIONS)}")
        if want != cfg.pn:
            have = [r for r, pn in RESOLUTIONS.items() if pn == cfg.pn]
            raise ValueError(f"resolution {resolution!r} is not available with preset {cfg.name!r}, which "
                             f"generates {have[0] if have else cfg.pn}")
    if (height is None) != (width is None):
        raise ValueError("give both height and width, or neither")
    if sum(x is not None for x in (height, aspect, h_div_w)) > 1:
        raise ValueError("give one of aspect, height/width or h_div_w, not several")
    if height is not None:
        if height <= 0 or width <= 0:  # type: ignore[operator]
            raise ValueError(f"height and width must be positive, got {height}x{width}")
        template = schedules.nearest_h_div_w_template(height / width)  # type: ignore[operator]
    elif h_div_w is not None:
        template = schedules.nearest_h_div_w_template(h_div_w)
    else:
        template = schedules.nearest_h_div_w_template(schedules.parse_aspect_ratio(aspect or cfg.default_aspect))
    ladder = schedules.spatial_ladder(template)[: cfg.scales_per_clip]
    pyramid = [(1, h, w) for h, w in ladder]
    try:  # the head rule and the quantizer rule must agree on every scale of this template's pyramid
        schedules.detail_scale_flags(pyramid, cfg.transformer.semantic_scales,
                                     cfg.transformer.detail_scale_min_tokens)
    except ValueError:
        asked = (f"{height}x{width}" if height is not None else f"h/w {h_div_w:.4g}" if h_div_w is not None
                 else aspect or cfg.default_aspect)
        raise ValueError(f"aspect {asked} (template h/w {template}) is not supported by preset {cfg.name!r}: its "
                         f"semantic/detail scale split does not fit that pyramid; supported aspects: "
                         f"{list(cfg.aspects)}") from None
    stride = cfg.vae.space_stride
    size = (pyramid[-1][1] * stride, pyramid[-1][2] * stride)
    if height is not None and (height, width) != size:
        raise ValueError(f"size {height}x{width} is not one the preset {cfg.name!r} generates; the nearest "
                         f"bucket is {size[0]}x{size[1]} (aspect template {template})")
    return template, pyramid, size


def _condition_clips(cfg: PipelineConfig, given_clips: int, total_latents: int) -> int:
    """Whole clips of a given video that video extension keeps: all it holds, but at most all clips of the output
    except its last (the reference conditions its 10 s output on the first 5 s of any longer input)."""
    fic = cfg.frames_inner_clip
    room = (total_latents - 2) // fic  # the forced 1 + c*fic latent frames must leave one to generate
    if given_clips >= 1 and room < 1:
        frames = 1 + cfg.frames_per_clip
        raise ValueError(f"video extension keeps at least the given video's first clip ({frames} frames, "
                         f"{cfg.frames_per_clip / cfg.fps:g} s) and generates after it, but the requested length "
                         f"({total_latents} latent frames) leaves nothing to generate after it; ask for more than "
                         f"{frames} frames ({cfg.frames_per_clip / cfg.fps:g} s)")
    return min(given_clips, max(room, 0))


def extension_frames(cfg: PipelineConfig, path: str | os.PathLike, total_latents: int) -> np.ndarray:
    """The frames of a video file that condition video extension to ``total_latents`` latent frames with preset
    ``cfg``, as uint8 RGB [T, H, W, 3] at the file's own size.

    The first c whole clips (c = those the file's duration ``num_frames / fps`` covers, at most all but the
    output's last clip), i.e. ``1 + c * frames_per_clip`` frames spread over the first ``c * frames_per_clip / fps``
    seconds exactly as the reference's reader picks them (:func:`media.read_video_clip`; ``get_clip(0, 5, 81)``
    for the official models: a 16 fps file gives its frame 0 twice, a 30 fps file every ~1.85th frame). A file
    shorter than one clip gives its first frame only (with a warning).
    """
    from . import media

    num_frames, fps = media.count_video_frames(path)
    per_clip = cfg.frames_per_clip
    covered = math.floor(num_frames / fps * cfg.fps / per_clip)
    clips = _condition_clips(cfg, covered, total_latents)
    if clips == 0:
        warnings.warn(f"{path} lasts {num_frames / fps:.2f} s, less than one clip ({per_clip / cfg.fps:g} s): "
                      f"only its first frame conditions the video", stacklevel=4)
        return media.read_video(path, max_frames=1)[0]
    return media.read_video_clip(path, 1 + clips * per_clip, clips * per_clip / cfg.fps)[0]


def interactive_reference_frames(cfg: PipelineConfig, path: str | os.PathLike) -> np.ndarray:
    """The reference video of an interactive story with preset ``cfg``: its last ``frames_per_clip / fps`` seconds
    as ``1 + frames_per_clip`` uint8 RGB frames at the file's own size, picked as the reference does
    (``get_clip(duration - 5, duration, 81)``, :func:`media.read_video_clip`)."""
    from . import media

    per_clip = cfg.frames_per_clip
    return media.read_video_clip(path, 1 + per_clip, per_clip / cfg.fps, at_end=True)[0]


def _frame_hw(video: Tensor | np.ndarray) -> tuple[int, int]:
    """(H, W) of uint8 frames [T, H, W, 3] or of a float video [..., H, W]."""
    if isinstance(video, np.ndarray):
        return int(video.shape[1]), int(video.shape[2])
    return int(video.shape[-2]), int(video.shape[-1])


def interactive_size(cfg: PipelineConfig, reference_hw: tuple[int, int] | None, aspect: str | None = None,
                     ) -> tuple[float, list[schedules.Scale], tuple[int, int]]:
    """(template, image pyramid, pixel (H, W)) of an interactive story with preset ``cfg``.

    With a reference video of frame size ``reference_hw`` = (h, w): the template nearest its own h/w, as the
    reference picks its ``infinity_star_interact`` template from the decoded frame (a portrait video stays
    portrait). An explicit ``aspect``, or no reference video, follows :func:`resolve_size`.
    """
    if reference_hw is None or aspect is not None:
        return resolve_size(cfg, aspect=aspect)
    h, w = reference_hw
    try:
        return resolve_size(cfg, h_div_w=h / w)
    except ValueError as exc:
        raise ValueError(f"the reference video's frame size {w}x{h}: {exc}; pass an aspect to crop it to one "
                         f"of those") from None


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
        self._offload_device: torch.device | None = None
        self.vae_tile_size: int | None = None
        # None: the precision follows the device (see set_precision); the weights arrive in float32.
        self._precision_request: str | None = None
        self._policy: PrecisionPolicy = precision_policy("fp32", interactive=config.interactive)

    # ------------------------------------------------------------------------------------------
    # Construction
    # ------------------------------------------------------------------------------------------

    @classmethod
    def from_preset(cls, name: str | PipelineConfig, seed: int = 0) -> InfinityStarPipeline:
        """A pipeline with randomly initialised weights (tests, benchmarks, training from scratch)."""
        cfg = get_preset("pipeline", name) if isinstance(name, str) else name
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
                        precision: str | None = None) -> InfinityStarPipeline:
        """Load our layout (``model_index.json``) or the official download layout from a local folder.

        For the official layout ``preset`` picks the transformer folder when several are present (a preset name),
        or gives the whole configuration (a :class:`PipelineConfig`, e.g. for a small stand-in of that layout).
        ``precision`` (see :meth:`set_precision`): ``"bf16"`` reads the block weights straight into bf16 (half the
        host memory of loading float32 first); None follows the device the pipeline is later moved to.
        """
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
            raise FileNotFoundError(f"{root} is neither a pipeline folder ({MODEL_INDEX}) nor an official download "
                                f"({OFFICIAL_VAE_FILE} + transformer shard folder + {OFFICIAL_T5_DIR})")
        return pipe.set_precision(precision)

    @staticmethod
    def _load_block_dtype(cfg: PipelineConfig, precision: str | None) -> torch.dtype | None:
        """dtype to read the block weights in: the asked precision's, else as stored (cast later if needed)."""
        return None if precision is None else precision_policy(precision, interactive=cfg.interactive).block_dtype

    @classmethod
    def _from_own_layout(cls, root: Path, precision: str | None) -> InfinityStarPipeline:
        index = json.loads((root / MODEL_INDEX).read_text())
        try:
            cfg = _pipeline_config_from_dict(index["config"])
        except (KeyError, TypeError) as exc:
            raise ConfigError(f"{root / MODEL_INDEX} has no valid 'config': {exc}") from exc
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
        found = {name: p for name, p in OFFICIAL_TRANSFORMER_DIRS.items() if (root / name).exists()}
        if preset is None or isinstance(preset, PipelineConfig):
            if len(found) != 1:
                raise ValueError(f"{root} holds transformer folders {sorted(found) or 'none'}; pass preset= one of "
                                 f"{sorted(OFFICIAL_TRANSFORMER_DIRS.values())}")
            folder_name, name = next(iter(found.items()))
            cfg = preset if isinstance(preset, PipelineConfig) else get_preset("pipeline", name)
        else:
            names = [n for n, p in OFFICIAL_TRANSFORMER_DIRS.items() if p == preset]
            if not names:
                valid = sorted(OFFICIAL_TRANSFORMER_DIRS.values())
                raise ValueError(f"unknown official preset {preset!r}; valid: {valid}")
            folder_name = names[0]
            if not (root / folder_name).exists():
                raise FileNotFoundError(f"preset {preset!r} needs the transformer folder {root / folder_name}")
            cfg = get_preset("pipeline", preset)
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
        if self._offload_device is not None:
            return self._offload_device
        return next(self.transformer.parameters()).device

    def to(self, device: torch.device | str) -> InfinityStarPipeline:
        """Move every component to ``device``; without an explicit precision, apply that device's default."""
        device = torch.device(device)
        self._offload_device = None
        self._apply_precision(device)  # before the move: a bf16 copy moves half the bytes
        self._move_all(device)
        return self

    def enable_model_cpu_offload(self, device: torch.device | str = "cuda") -> None:
        """Keep components on the CPU and move each to ``device`` only while it works; the precision follows
        ``device`` (not the CPU) unless one was set."""
        device = torch.device(device)
        self._apply_precision(device)
        self._move_all(torch.device("cpu"))
        self._offload_device = device

    def _move_all(self, device: torch.device) -> None:
        self.transformer.to(device)
        self.vae.to(device)
        if _movable(self.text_encoder):
            self.text_encoder.to(device)

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
        self._precision_request = precision
        self._apply_precision(self.device)
        return self

    def _apply_precision(self, device: torch.device) -> None:
        """Cast the components to the precision asked for, or to ``device``'s default when none was."""
        name = self._precision_request or default_precision(device.type)
        policy = precision_policy(name, interactive=self.config.interactive)
        if policy == self._policy and self._blocks_dtype() == policy.block_dtype:
            return
        if self._blocks_dtype() == torch.bfloat16 and policy.block_dtype == torch.float32:
            warnings.warn("transformer blocks go back from bf16 to float32 but keep their bf16-rounded values; "
                          "reload the model for the exact float32 weights", stacklevel=3)
        self.transformer.set_precision(policy)
        set_text = getattr(self.text_encoder, "set_precision", None)
        if set_text is not None:  # the built-in byte/word encoders are tiny and always float32
            set_text(policy)
        self._policy = policy

    def _blocks_dtype(self) -> torch.dtype | None:
        params = list(self.transformer.blocks.parameters())
        return params[0].dtype if params else None

    def enable_vae_tiling(self, tile_size: int = 32) -> None:
        """Decode frames in overlapping spatial tiles of ``tile_size`` latent cells (bounded memory)."""
        self.vae_tile_size = tile_size

    @contextlib.contextmanager
    def _working(self, module: Any) -> Iterator[Any]:
        """``module`` on the working device for the duration (with CPU offload; else it already is there)."""
        if self._offload_device is None or not _movable(module):
            yield module
            return
        module.to(self._offload_device)
        try:
            yield module
        finally:
            module.to("cpu")

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
        cfg = self.config
        if num_frames is not None and seconds is not None:
            raise ValueError("give either num_frames or seconds, not both")
        if seconds is not None:
            if not seconds >= 0:
                raise ValueError(f"seconds must be >= 0, got {seconds}")
            num_frames = int(round(seconds * cfg.fps)) + 1
        if num_frames is None:
            num_frames = cfg.default_seconds * cfg.fps + 1
        if not isinstance(num_frames, int) or num_frames < 1 or (num_frames - 1) % cfg.vae.time_stride:
            raise ValueError(f"num_frames must be 1 (an image) or 1 + {cfg.vae.time_stride}k, got {num_frames!r}")
        return num_frames

    def build_prompt(self, prompt: str, num_frames: int) -> str:
        cfg = self.config
        seconds = None
        if num_frames > 1 and cfg.duration_prefix:
            seconds = int((num_frames - 1) // cfg.fps)
        return build_prompt(prompt, duration_s=seconds, quality_suffix=cfg.quality_suffix)

    def encode_prompt(self, prompt: str, negative_prompt: str | None = None) -> tuple[Tensor, Tensor | None]:
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError(f"prompt must be a non-empty string, got {prompt!r}")
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
            from . import media

            return media.load_image_tensor(image, h, w)[None, :, None]
        if video is not None:
            if isinstance(video, Tensor):
                x = video if video.dim() == 5 else video[None]  # [1, 3, T, H, W] or [3, T, H, W]
                t = x.shape[2] if x.dim() == 5 else -1
                return _check_condition_tensor(x, "video", (1, 3, t, h, w), video.shape)
            from . import media

            if total_latents is None:
                frames, _ = media.read_video(video, fps=self.config.fps)
            else:
                frames = extension_frames(self.config, video, total_latents)
            frames = media.resize_and_center_crop(frames, h, w)
            return media.frames_to_tensor(frames)[None]
        return None

    def _reference_condition(self, reference: Tensor | np.ndarray, size: tuple[int, int]) -> Tensor:
        """The interactive reference as [1, 3, 1 + frames_per_clip, H, W] in [-1, 1] at the bucket size."""
        from . import media

        if isinstance(reference, Tensor):
            x = self._load_condition(None, reference, size)
            assert x is not None
            need = 1 + self.config.frames_per_clip
            if x.shape[2] < need:
                raise ValueError(f"the reference video needs at least {need} frames at {self.config.fps} fps, "
                                 f"got {x.shape[2]}")
            return x[:, :, -need:]
        return media.frames_to_tensor(media.resize_and_center_crop(reference, *size))[None]

    # ------------------------------------------------------------------------------------------
    # Generation
    # ------------------------------------------------------------------------------------------

    def _sampling(self, guidance_scale: float | None) -> SamplingConfig:
        """The preset's sampling settings, with the guidance scale overridden if given (1 = no guidance)."""
        base = self.config.sampling
        if guidance_scale is None:
            return base
        if not guidance_scale >= 1:
            raise ValueError(f"guidance_scale must be >= 1 (1 = no guidance), got {guidance_scale}")
        return SamplingConfig(guidance=base.guidance if guidance_scale != 1 else "none",
                              guidance_scale=float(guidance_scale), apg_norm_threshold=base.apg_norm_threshold,
                              tau_image=base.tau_image, tau_video=base.tau_video)

    def _forced_bits(self, condition: Tensor, schedule: list[schedules.Scale],
                     total_latents: int) -> tuple[list[Tensor], int, int]:
        """Encode the condition and quantize it along the schedule's leading clips.

        Returns (bits per forced step, number of forced scales, latent frames the condition covers).
        """
        cfg = self.config
        frames = condition.shape[2]
        whole_clips = (frames - 1) // cfg.frames_per_clip
        kept_clips = _condition_clips(cfg, whole_clips, total_latents)
        forced_latents = 1 + kept_clips * cfg.frames_inner_clip
        kept_frames = 1 + kept_clips * cfg.frames_per_clip
        if kept_clips == whole_clips and kept_frames < frames:  # a partial clip dropped (not a longer video cut)
            warnings.warn(f"the conditioning video has {frames} frames; only whole clips are kept ({forced_latents} "
                          f"latent frames = {kept_frames} frames)", stacklevel=3)
        k = cfg.scales_per_clip
        condition = condition[:, :, :kept_frames]
        n_scales = k * (1 + kept_clips)
        return self._tokenize(condition, schedule[:n_scales]).bits, n_scales, forced_latents

    def _tokenize(self, video: Tensor, schedule: Sequence[schedules.Scale]) -> MultiScaleEncoding:
        """VAE encode (posterior mean) and multi-scale BSQ along ``schedule`` with the preset's repetitions."""
        cfg = self.config
        with self._working(self.vae) as vae:
            latent = vae.encode(video.to(self.device), sample=False)
        reps = schedules.scale_repetitions(schedule, cfg.image_repetition, cfg.video_repetition)
        return encode_to_bits(latent.float(), schedule, reps, cfg.quantizer, frames_inner_clip=cfg.frames_inner_clip)

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
        latents = 1 + (x.shape[2] - 1) // cfg.vae.time_stride
        x = x[:, :, : 1 + (latents - 1) * cfg.vae.time_stride]
        schedule = schedules.video_scale_schedule(pyramid, latents, cfg.frames_inner_clip)
        return self._format(self.decode_latent(self._tokenize(x, schedule).summed_codes), output_type)

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
        from . import media

        frames = media.tensor_to_frames(video_13THW[0].cpu())
        if output_type == "np":
            return frames
        if output_type == "pil":
            from PIL import Image

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
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError(f"prompt must be a non-empty string, got {prompt!r}")
        if output_type not in ("np", "pil", "pt", "latent"):
            raise ValueError(f"unknown output_type {output_type!r}; valid: 'np', 'pil', 'pt', 'latent'")
        sampling = self._sampling(guidance_scale)
        num_frames = self.num_frames_for(num_frames, seconds)
        if image is not None and num_frames == 1:
            raise ValueError("image-to-video needs num_frames > 1 (the image is the first frame)")
        if video is not None and num_frames == 1:
            raise ValueError("video extension needs num_frames longer than the given video, got num_frames=1")
        if generator is None:
            generator = torch.Generator().manual_seed(cfg.seed if seed is None else seed)
        template, pyramid, size = self.resolve_size(resolution=resolution, aspect=aspect, height=height, width=width)
        total_latents = 1 + (num_frames - 1) // cfg.vae.time_stride
        schedule = schedules.video_scale_schedule(pyramid, total_latents, cfg.frames_inner_clip)
        condition = self._load_condition(image, video, size, total_latents=total_latents)
        forced: list[Tensor] = []
        n_forced_scales = 0
        if condition is not None:
            forced, n_forced_scales, _ = self._forced_bits(condition, schedule, total_latents)
        text, negative = self.encode_prompt(self.build_prompt(prompt, num_frames), negative_prompt)
        reps = schedules.scale_repetitions(schedule, cfg.image_repetition, cfg.video_repetition)
        steps = plan_steps(schedule, image_repetition=cfg.image_repetition, video_repetition=cfg.video_repetition,
                           semantic_scales=cfg.transformer.semantic_scales,
                           detail_scale_min_tokens=cfg.transformer.detail_scale_min_tokens, sampling=sampling,
                           teacher_forced_scales=n_forced_scales, frames_inner_clip=cfg.frames_inner_clip,
                           rope_max_frames=cfg.transformer.rope_max_frames)
        on_step = None if callback_on_step_end is None else (lambda ev: callback_on_step_end(self, ev))
        with self._working(self.transformer) as transformer:
            result: GenerationResult = generate_codes(
                transformer, cfg.quantizer, text, schedule, steps, reps, sampling, generator=generator,
                negative_LC=negative, forced_bits=forced, frames_inner_clip=cfg.frames_inner_clip, on_step=on_step,
                progress=progress,
            )
        if output_type == "latent":
            return InfinityStarPipelineOutput(frames=result.summed_codes, fps=cfg.fps, latent=result.summed_codes)
        video_out = self.decode_latent(result.summed_codes)
        if callback_on_clip_end is not None:
            self._emit_clips(result, video_out, output_type, callback_on_clip_end)
        return InfinityStarPipelineOutput(frames=self._format(video_out, output_type), fps=cfg.fps,
                                          latent=result.summed_codes)

    def _emit_clips(self, result: GenerationResult, video: Tensor, output_type: str,
                    callback: Callable[[int, Any], None]) -> None:
        start = 0
        for i, codes in enumerate(result.clip_codes):
            t = codes.shape[2]
            n = 1 if i == 0 else t * self.config.vae.time_stride
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
        for i, p in enumerate(prompts):
            if not isinstance(p, str) or not p.strip():
                raise ValueError(f"prompt {i} is empty")
        sampling = self._sampling(guidance_scale)
        # A file: its last clip at its own size (whose aspect picks the template); a tensor: as given.
        reference = video if video is None or isinstance(video, Tensor) else interactive_reference_frames(cfg, video)
        template, pyramid, size = interactive_size(cfg, None if reference is None else _frame_hw(reference), aspect)
        seed = cfg.seed if seed is None else seed
        fic = cfg.frames_inner_clip
        clip_frames = fic * cfg.vae.time_stride
        # Segment 0: a whole first clip (first frame + one video clip), as latent.
        if video is not None:
            condition = self._reference_condition(reference, size)
            with self._working(self.vae) as vae:
                former = vae.encode(condition.to(self.device))
            first_video = self.decode_latent(former)
        else:
            out = self(prompts[0], num_frames=1 + clip_frames, aspect=aspect, guidance_scale=guidance_scale,
                       seed=seed, output_type="latent", progress=progress)
            former = out.latent
            assert former is not None
            first_video = self.decode_latent(former)
        segments = [first_video]
        if callback_on_segment_end is not None:
            callback_on_segment_end(0, self._format(first_video, output_type))
        first_frame = former[:, :, :1]
        layout = schedules.interactive_layout_for(pyramid, cfg.frames_inner_clip, cfg.vae.time_stride)
        seg_schedule = list(layout.schedule)
        reps = list(cfg.image_repetition)  # one per scale of the segment (PipelineConfig checks the length)
        steps = plan_steps(seg_schedule, image_repetition=cfg.image_repetition, video_repetition=cfg.video_repetition,
                           semantic_scales=cfg.transformer.semantic_scales,
                           detail_scale_min_tokens=cfg.transformer.detail_scale_min_tokens,
                           sampling=sampling, frames_inner_clip=fic)
        for i, prompt in enumerate(prompts[1:], start=1):
            text, _ = self.encode_prompt(duration_prefix(fic * cfg.vae.time_stride // cfg.fps) + prompt)
            with self._working(self.transformer) as transformer:
                turn = run_interactive_turn(transformer, cfg.quantizer, text, former, first_frame, layout, steps, reps,
                                            sampling, seed=seed, progress=progress)
            decoded = self.decode_latent(turn.decode_latent)
            new_frames = decoded[:, :, -clip_frames:]
            segments.append(new_frames)
            former = turn.next_context
            if callback_on_segment_end is not None:
                callback_on_segment_end(i, self._format(new_frames, output_type))
        full = torch.cat(segments, dim=2)
        return InfinityStarPipelineOutput(frames=self._format(full, output_type), fps=cfg.fps,
                                          segments=[self._format(s, output_type) for s in segments])


def export_to_video(frames: Any, path: str | os.PathLike, fps: int = 16) -> Path:
    """Write frames (np uint8 [T, H, W, 3], PIL list or a [3, T, H, W] tensor) as mp4, or png for one frame."""
    from . import media

    if isinstance(frames, Tensor):
        frames = media.tensor_to_frames(frames)
    if isinstance(frames, list):
        frames = np.stack([np.asarray(f) for f in frames])
    path = Path(path)
    media.save_output(frames, path, fps=fps)
    return path


__all__ = ["InfinityStarPipeline", "InfinityStarPipelineOutput", "export_to_video", "extension_frames",
           "interactive_reference_frames", "interactive_size", "resolve_size"]

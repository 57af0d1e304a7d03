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
    QuantizerConfig,
    SamplingConfig,
    TransformerConfig,
    VAEConfig,
    config_from_dict,
    config_to_dict,
    get_preset,
)
from .fileio import atomic_write_json
from .generation import GenerationResult, StepEvent, generate_codes, plan_steps, prefill_interactive_conditions
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


class InfinityStarPipeline:
    """Text-to-image, text-to-video, image-to-video, video extension, long and interactive videos."""

    def __init__(self, transformer: InfinityStarTransformer, vae: VideoVAE, text_encoder: TextEncoder,
                 config: PipelineConfig) -> None:
        if text_encoder.width != config.transformer.text_channels:
            raise ConfigError(f"text encoder width {text_encoder.width} != transformer text_channels "
                              f"{config.transformer.text_channels}")
        self.transformer = transformer.eval()
        self.vae = vae.eval()
        self.text_encoder = text_encoder
        self.config = config
        self._offload_device: torch.device | None = None
        self.vae_tile_size: int | None = None

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
                        block_dtype: torch.dtype | None = None) -> InfinityStarPipeline:
        """Load our layout (``model_index.json``) or the official download layout from a local folder.

        For the official layout ``preset`` picks the transformer folder when several are present (a preset name),
        or gives the whole configuration (a :class:`PipelineConfig`, e.g. for a small stand-in of that layout).
        """
        root = Path(path)
        if not root.is_dir():
            raise FileNotFoundError(f"model folder {root} does not exist")
        if (root / MODEL_INDEX).is_file():
            return cls._from_own_layout(root, block_dtype)
        if (root / OFFICIAL_VAE_FILE).is_file():
            return cls._from_official_layout(root, preset, block_dtype)
        raise FileNotFoundError(f"{root} is neither a pipeline folder ({MODEL_INDEX}) nor an official download "
                                f"({OFFICIAL_VAE_FILE} + transformer shard folder + {OFFICIAL_T5_DIR})")

    @classmethod
    def _from_own_layout(cls, root: Path, block_dtype: torch.dtype | None) -> InfinityStarPipeline:
        index = json.loads((root / MODEL_INDEX).read_text())
        try:
            cfg = _pipeline_config_from_dict(index["config"])
        except (KeyError, TypeError) as exc:
            raise ConfigError(f"{root / MODEL_INDEX} has no valid 'config': {exc}") from exc
        transformer = checkpoints.load_transformer(root / "transformer" / "model.safetensors", cfg.transformer)
        if block_dtype is not None:
            transformer.blocks.to(block_dtype)
        vae = checkpoints.load_vae(root / "vae" / "model.safetensors", cfg.vae)
        text = cls._build_text_encoder(cfg, root / "text_encoder")
        return cls(transformer, vae, text, cfg)

    @classmethod
    def _from_official_layout(cls, root: Path, preset: str | PipelineConfig | None,
                              block_dtype: torch.dtype | None) -> InfinityStarPipeline:
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
                                                            block_dtype=block_dtype)
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
        self._offload_device = None
        self.transformer.to(device)
        self.vae.to(device)
        if isinstance(self.text_encoder, nn.Module):
            self.text_encoder.to(device)
        return self

    def enable_model_cpu_offload(self, device: torch.device | str = "cuda") -> None:
        """Keep components on the CPU and move each to ``device`` only while it works."""
        self.to("cpu")
        self._offload_device = torch.device(device)

    def enable_vae_tiling(self, tile_size: int = 32) -> None:
        """Decode frames in overlapping spatial tiles of ``tile_size`` latent cells (bounded memory)."""
        self.vae_tile_size = tile_size

    @contextlib.contextmanager
    def _working(self, module: nn.Module) -> Iterator[nn.Module]:
        if self._offload_device is None:
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
                     width: int | None = None) -> tuple[float, list[schedules.Scale], tuple[int, int]]:
        """(template, image pyramid, pixel (H, W)) for the requested size; errors name what the preset can do."""
        cfg = self.config
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
        if height is not None and aspect is not None:
            raise ValueError("give either aspect or height/width, not both")
        if height is not None:
            if height <= 0 or width <= 0:  # type: ignore[operator]
                raise ValueError(f"height and width must be positive, got {height}x{width}")
            template = schedules.nearest_h_div_w_template(height / width)  # type: ignore[operator]
        else:
            template = schedules.nearest_h_div_w_template(schedules.parse_aspect_ratio(aspect or cfg.default_aspect))
        ladder = schedules.spatial_ladder(template)[: cfg.scales_per_clip]
        pyramid = [(1, h, w) for h, w in ladder]
        try:  # the head rule and the quantizer rule must agree on every scale of this template's pyramid
            schedules.detail_scale_flags(pyramid, cfg.transformer.semantic_scales,
                                         cfg.transformer.detail_scale_min_tokens)
        except ValueError:
            asked = f"{height}x{width}" if height is not None else (aspect or cfg.default_aspect)
            raise ValueError(f"aspect {asked} (template h/w {template}) is not supported by preset {cfg.name!r}: its "
                             f"semantic/detail scale split does not fit that pyramid; supported aspects: "
                             f"{list(cfg.aspects)}") from None
        stride = cfg.vae.space_stride
        size = (pyramid[-1][1] * stride, pyramid[-1][2] * stride)
        if height is not None and (height, width) != size:
            raise ValueError(f"size {height}x{width} is not one the preset {cfg.name!r} generates; the nearest "
                             f"bucket is {size[0]}x{size[1]} (aspect template {template})")
        return template, pyramid, size

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
        with self._working(self.text_encoder) if isinstance(self.text_encoder, nn.Module) else contextlib.nullcontext():
            text = self.text_encoder([prompt]).kv_compact
            negative = None
            if negative_prompt:
                negative = self.text_encoder([negative_prompt]).kv_compact
        return text, negative

    def _load_condition(self, image: Any, video: Any, size: tuple[int, int]) -> Tensor | None:
        """The conditioning image or video as [1, 3, T, H, W] in [-1, 1] at the bucket size, or None."""
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

            # A 5.0 s file holds 80 frames at 16 fps (t = 0 .. 4.9375 s); the reference's reader accepts windows a
            # little past the end, so that 81 frames (1 + 4*20) come from a 5 s video. Only that case is padded
            # (last frame once): reading every file with 0.2 s of end slack appended up to 4 copies of the last
            # frame to any video, which extension then kept as given frames and interactive used as context.
            frames, _ = media.read_video(video, fps=self.config.fps)
            if len(frames) % self.config.vae.time_stride == 0:
                frames = np.concatenate([frames, frames[-1:]])
            frames = media.resize_and_center_crop(frames, h, w)
            return media.frames_to_tensor(frames)[None]
        return None

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
        if (frames - 1) % cfg.vae.time_stride:
            keep = 1 + (frames - 1) // cfg.vae.time_stride * cfg.vae.time_stride
            warnings.warn(f"the conditioning video has {frames} frames; using the first {keep} (1 + 4k)", stacklevel=3)
            condition = condition[:, :, :keep]
            frames = keep
        latents = 1 + (frames - 1) // cfg.vae.time_stride
        k = cfg.scales_per_clip
        whole_clips = (latents - 1) // cfg.frames_inner_clip
        forced_latents = 1 + whole_clips * cfg.frames_inner_clip
        if forced_latents < latents:
            warnings.warn(f"the conditioning video covers {latents} latent frames; only whole clips are kept "
                          f"({forced_latents} latent frames = {1 + (forced_latents - 1) * cfg.vae.time_stride} "
                          f"frames)", stacklevel=3)
        if forced_latents >= total_latents and total_latents > 1:
            raise ValueError(f"the requested length ({total_latents} latent frames) leaves nothing to generate after "
                             f"the given video ({forced_latents} latent frames): ask for more frames")
        condition = condition[:, :, : 1 + (forced_latents - 1) * cfg.vae.time_stride]
        n_scales = k * (1 + whole_clips)
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

    def _format(self, video_13THW: Tensor, output_type: str) -> Any:
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
        extension (its whole clips are kept, the rest generated). ``callback_on_clip_end(index, frames)``
        receives each finished clip's frames (``output_type`` format) as soon as it is decoded.
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
        condition = self._load_condition(image, video, size)
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

        Segment 0 is the given ``video`` (its last whole clip, VAE-encoded) or, without one, generated from
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
        template, pyramid, size = self.resolve_size(aspect=aspect)
        seed = cfg.seed if seed is None else seed
        fic = cfg.frames_inner_clip
        clip_frames = fic * cfg.vae.time_stride
        # Segment 0: a whole first clip (first frame + one video clip), as latent.
        if video is not None:
            condition = self._load_condition(None, video, size)
            assert condition is not None
            need = 1 + clip_frames
            if condition.shape[2] < need:
                raise ValueError(f"the reference video needs at least {need} frames at {cfg.fps} fps, "
                                 f"got {condition.shape[2]}")
            condition = condition[:, :, -need:]
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
        from .generation import DETAIL_CONDITION, SEMANTIC_CONDITION

        for i, prompt in enumerate(prompts[1:], start=1):
            text, _ = self.encode_prompt(duration_prefix(fic * cfg.vae.time_stride // cfg.fps) + prompt)
            generator = torch.Generator().manual_seed(seed)  # the reference re-seeds every turn
            with self._working(self.transformer) as transformer:
                cache = transformer.new_cache()
                batch = 2 if sampling.uses_guidance else 1
                transformer.prefill_text(text.to(self.device), cache, guidance=batch == 2)
                prefill_interactive_conditions(transformer, cache, former.to(self.device), first_frame.to(self.device),
                                               layout, batch=batch)
                result = generate_codes(transformer, cfg.quantizer, text, seg_schedule, steps, reps, sampling,
                                        generator=generator, frames_inner_clip=fic, cache=cache,
                                        extra_context=(SEMANTIC_CONDITION, DETAIL_CONDITION), progress=progress)
            joined = torch.cat([former[:, :, 1:], result.summed_codes.to(former)], dim=2)
            decoded = self.decode_latent(joined)
            new_frames = decoded[:, :, -clip_frames:]
            segments.append(new_frames)
            former = joined[:, :, -(fic + 1):]
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


__all__ = ["InfinityStarPipeline", "InfinityStarPipelineOutput", "export_to_video"]

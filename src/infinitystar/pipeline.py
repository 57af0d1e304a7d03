"""``InfinityStarPipeline``: text/image/video in, frames out — one object for every task.

Shaped like a diffusers pipeline: ``from_pretrained(local_dir)``, ``__call__`` with ``check_inputs``,
``encode_prompt``, the loop inside a progress bar, decode, ``output_type``, ``return_dict``,
``callback_on_step_end`` and ``interrupt``. The pipeline owns no math: every frame, clip and step count comes from
:mod:`infinitystar.generation.plan`, the loop (interactive turns and forced steps included) is
:mod:`infinitystar.generation.loop`, the tokenizer :mod:`infinitystar.vae`.

What a model can do is :attr:`InfinityStarPipeline.capabilities` (tasks, sizes, fps, the words a closed-vocabulary
text encoder knows); a call reports its progress as :class:`ProgressEvent` s (tqdm bars by default) and always
returns the seed it used.

Two folder layouts load (and the ids of models that ship in the package, :data:`LOCAL_MODELS`):

* the official download: a transformer shard folder (``infinitystar_8b_720p_weights/``,
  ``infinitystar_8b_480p_weights/`` or an interactive one), ``infinitystar_videovae.pth`` and
  ``text_encoder/flan-t5-xl-official``;
* our own: ``model_index.json`` plus one subfolder per component (``transformer/``, ``vae/``,
  ``text_encoder/``), each with ``config.json`` and ``model.safetensors``.
"""

from __future__ import annotations

import contextlib
import difflib
import inspect
import json
import os
import secrets
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
    RequestLimits,
    SamplingConfig,
    TransformerConfig,
    VAEConfig,
    check_precision,
    config_from_dict,
    config_to_dict,
    default_precision,
    get_preset,
    limit_hint,
    precision_for_dtype,
    precision_policy,
    resolve_device,
)
from .fileio import atomic_write_json, make_folder
from .generation import schedules
from .generation.loop import GenerationResult, StepEvent, generate_codes, run_interactive_turn
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
from .memory.estimate import available_memory, working_memory_bytes
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
    read_vocabulary,
    unknown_words,
    word_tokens,
    write_vocabulary,
)
from .transformer import lora
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
# Model ids ``from_pretrained`` resolves to pipeline folders that ship inside the package. The path is computed from
# this file's location, not imported: ``demo`` (which owns the folder and exposes the id as ``DEMO_MODEL_ID``) sits
# above ``pipeline`` in the layering.
DEMO_MODEL_ID = "infinitystar-demo"
LOCAL_MODELS: dict[str, Path] = {DEMO_MODEL_ID: Path(__file__).resolve().parent / "demo" / "weights"}
# Seeds drawn for calls without one lie in [0, SEED_LIMIT): every tool (and any other framework's RNG) takes them.
SEED_LIMIT = 2**31


class UnknownWordsWarning(UserWarning):
    """A prompt has words the model's closed-vocabulary text encoder was not trained on (the demo's word encoder):
    they condition it on vectors it never saw. Its own class, so a caller that expects them can filter exactly it."""


# Every task a model may offer, in the order capabilities list them.
TASKS = ("text-to-image", "text-to-video", "image-to-video", "video-extension", "interactive")
PROGRESS_STAGES = ("encode_prompt", "generate", "decode", "write")


@dataclass
class InfinityStarPipelineOutput:
    """What a call returns.

    ``frames``: uint8 [T, H, W, 3] (np), a list of PIL images (pil), a float tensor [3, T, H, W] in [-1, 1]
    (pt), or the summed-code latent [1, 64, T', h, w] (latent). A call with a list of prompts or
    ``num_videos_per_prompt > 1`` gives a list with one such entry per video (prompt-major), ``latent`` likewise.
    ``segments`` holds the per-prompt pieces of an interactive generation. ``seed`` is the seed of the (first)
    video, ``seeds`` those of every video (the pipeline always sets both, drawing a random seed when none was
    given). ``interrupted``: the call stopped early (:attr:`InfinityStarPipeline.interrupt`); the frames are those
    of the steps done."""

    frames: Any
    fps: int
    latent: Tensor | list[Tensor] | None = None
    segments: list[Any] = field(default_factory=list)
    seed: int | None = None
    seeds: list[int] = field(default_factory=list)
    interrupted: bool = False


@dataclass(frozen=True)
class ProgressEvent:
    """One progress report of a call (see ``progress`` of :meth:`InfinityStarPipeline.__call__`).

    ``stage``: ``"encode_prompt"`` (``done`` texts of ``total``: the prompt and the negative prompt),
    ``"generate"`` (scale steps), ``"decode"`` (VAE decoder chunks) or ``"write"`` (the front doors' file writing).
    Every stage reports ``done=0`` when it starts, then after each unit of work. ``clip``: the 1-based clip of the
    step just done (``"generate"`` of a call) or the segment (every stage of an interactive story); else None.
    """

    stage: str
    done: int
    total: int
    clip: int | None = None


@dataclass(frozen=True)
class Capabilities:
    """What a loaded model can do, derived from its configuration and text encoder (never promised by hand).

    ``tasks``: a subset of :data:`TASKS`; ``aspects`` the "W:H" ratios the preset generates and ``sizes`` their
    pixel (height, width); ``fps`` the frame rate it generates at; ``max_seconds`` the longest video (None: no limit,
    long videos continue past the RoPE range by anchoring; 0 for an image-only model); ``vocabulary`` the words a
    closed-vocabulary text encoder was trained on, with those of the active LoRA adapters (None: an open vocabulary,
    e.g. Flan-T5 or the byte encoder).
    """

    tasks: tuple[str, ...]
    aspects: tuple[str, ...]
    sizes: dict[str, tuple[int, int]]
    fps: int
    max_seconds: float | None
    vocabulary: tuple[str, ...] | None

    def unknown_words(self, prompt: str) -> list[str]:
        """The distinct words of ``prompt`` outside :attr:`vocabulary` (tokenised as the word encoder does:
        lower-cased words and punctuation runs), in order of appearance; none for an open vocabulary."""
        return unknown_words(self.vocabulary, word_tokens(prompt))


class _Reporter:
    """Where one call's progress goes: tqdm bars (``True``), nowhere (``False``) or a callable of ProgressEvent."""

    _LABELS = {"encode_prompt": "text encoder", "generate": "scales", "decode": "VAE decode", "write": "writing"}

    def __init__(self, progress: bool | Callable[[ProgressEvent], None]) -> None:
        if not isinstance(progress, bool) and not callable(progress):
            raise TypeError(f"progress must be True, False or a callable taking a ProgressEvent, got {progress!r}")
        self._callback = None if isinstance(progress, bool) else progress
        self._bars = progress is True
        self.prefix = ""  # e.g. "video 2/4 " when a call makes several

    @contextlib.contextmanager
    def stage(self, stage: str, total: int | None = None, clip: int | None = None,
              ) -> Iterator[Callable[..., None]]:
        """``update(done, total=None, clip=None)`` for one stage; the start event (done=0) is sent here when
        ``total`` is known, else by the first update. The bar closes however the stage ends."""
        bars: list[Any] = []

        def update(done: int, total_now: int | None = None, clip_now: int | None = None) -> None:
            n = total if total_now is None else total_now
            assert n is not None
            if self._callback is not None:
                self._callback(ProgressEvent(stage, done, n, clip if clip_now is None else clip_now))
            if self._bars:
                if not bars:
                    bars.append(tqdm(total=n, desc=self.prefix + self._LABELS[stage], leave=False))
                bars[0].update(done - bars[0].n)

        try:
            if total is not None:
                update(0)
            yield update
        finally:
            for bar in bars:
                bar.close()


# diffusers arguments that have no meaning here, each with the reason (a call naming one fails in one line).
_NO_SCHEDULE = "InfinityStar generates scale by scale; its steps are the preset's schedule (scales x repetitions)"
_TEXT_ONLY = "pass the prompt text: the pipeline adds its template (duration tag, quality suffix) and encodes it"
_NOT_DIFFUSION = ("InfinityStar samples bits scale by scale from the empty first scale, there is no noise latent; "
                  "condition on image= or video= instead")
DIFFUSERS_ONLY_ARGUMENTS: dict[str, str] = {
    "num_inference_steps": _NO_SCHEDULE,
    "timesteps": _NO_SCHEDULE,
    "sigmas": _NO_SCHEDULE,
    "denoising_end": _NO_SCHEDULE,
    "eta": "there is no DDIM noise to scale: bits are sampled per scale (the preset's temperatures set how)",
    "latents": _NOT_DIFFUSION,
    "strength": _NOT_DIFFUSION,
    "prompt_embeds": _TEXT_ONLY,
    "negative_prompt_embeds": _TEXT_ONLY,
    "pooled_prompt_embeds": _TEXT_ONLY,
    "negative_pooled_prompt_embeds": _TEXT_ONLY,
    "prompt_attention_mask": _TEXT_ONLY,
    "negative_prompt_attention_mask": _TEXT_ONLY,
    "max_sequence_length": "the text encoder's maximum length is part of the model (text_maxlen)",
    "cross_attention_kwargs": "the transformer's attention takes no extra arguments",
    "attention_kwargs": "the transformer's attention takes no extra arguments",
    "joint_attention_kwargs": "the transformer's attention takes no extra arguments",
    "guidance_rescale": "guidance is the preset's CFG/APG (sampling.guidance_method); only guidance_scale is set "
                        "per call",
    "true_cfg_scale": "guidance is the preset's CFG/APG; set its strength with guidance_scale",
    "clip_skip": "the text encoder is Flan-T5 or a built-in encoder, not CLIP: there are no layers to skip",
    "num_images_per_prompt": "use num_videos_per_prompt (an image is a one-frame video, num_frames=1)",
    "decode_chunk_size": "the VAE decodes in the model's own temporal chunks; bound its memory with "
                         "enable_vae_tiling() or a memory mode",
    "fps": "the model generates at the frame rate it was trained at (config.fps); output.fps reports it",
    "frame_rate": "the model generates at the frame rate it was trained at (config.fps); output.fps reports it",
    "callback": "the old diffusers callback is gone; use callback_on_step_end",
    "callback_steps": "the old diffusers callback is gone; use callback_on_step_end",
    "ip_adapter_image": "there are no IP-adapters; give an image= for image-to-video",
    "ip_adapter_image_embeds": "there are no IP-adapters; give an image= for image-to-video",
}


def _reject_keywords(kwargs: dict[str, Any], valid: Sequence[str]) -> None:
    """One line for the first keyword ``__call__`` does not take: why, for a diffusers argument, else the nearest
    valid name."""
    for name in kwargs:
        reason = DIFFUSERS_ONLY_ARGUMENTS.get(name)
        if reason is not None:
            raise TypeError(f"{name} does not apply to InfinityStarPipeline: {reason}")
        near = difflib.get_close_matches(name, valid, n=1)
        hint = f"; did you mean {near[0]!r}?" if near else ""
        raise TypeError(f"InfinityStarPipeline.__call__() got an unexpected keyword argument {name!r}{hint}")


def draw_seed(count: int = 1) -> int:
    """A fresh seed for a run without one, such that ``seed .. seed + count - 1`` all lie below :data:`SEED_LIMIT`:
    from the OS's entropy (not torch's or random's global state, which a fixed seed elsewhere in the process would
    make repeat)."""
    return secrets.randbelow(SEED_LIMIT - count + 1)


def _check_seed(seed: Any, count: int = 1) -> int:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= seed <= 2**63 - count:
        raise ValueError(f"seed must be an integer in [0, 2**63 - {count}] (seeds seed .. seed+{count - 1} are used), "
                         f"got {seed!r}")
    return int(seed)


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
    try:
        index = json.loads((root / MODEL_INDEX).read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{root / MODEL_INDEX} is not valid JSON ({exc}); the model folder is damaged") from None
    if not isinstance(index, dict):
        raise ValueError(f"{root / MODEL_INDEX} must hold a JSON object, got {type(index).__name__}")
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


def _model_folder(source: str | os.PathLike) -> Path:
    """The folder of ``source``: a folder as given, else the shipped folder of a :data:`LOCAL_MODELS` id."""
    root = Path(source)
    if root.is_dir() or str(source) not in LOCAL_MODELS:
        return root
    shipped = LOCAL_MODELS[str(source)]
    if not (shipped / MODEL_INDEX).is_file():
        raise FileNotFoundError(f"model {str(source)!r} is not shipped in this installation ({shipped} holds no "
                                f"{MODEL_INDEX}); `infinitystar train-demo OUT --ship` builds it")
    return shipped


def read_pipeline_config(source: str | os.PathLike, preset: str | None = None) -> PipelineConfig:
    """The configuration of a pipeline preset name, local model id (:data:`LOCAL_MODELS`) or model folder (our
    layout or the official download, where ``preset`` picks the transformer as in ``from_pretrained``), read without
    loading any weights."""
    root = _model_folder(source)
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
                      f"only its first frame conditions the video",
                      stacklevel=5)  # here, _load_condition, __call__, torch.no_grad's wrapper, the caller
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


def _check_frames_array(arr: np.ndarray, what: str, layout: str, ndim: int) -> None:
    """One clear line unless ``arr`` is uint8 RGB frames of ``ndim`` dims (``layout``), as ``output_type="np"``."""
    if arr.dtype != np.uint8 or arr.ndim != ndim or arr.shape[-1] != 3 or 0 in arr.shape:
        raise ValueError(f"the {what} array must be uint8 {layout} RGB, got {arr.dtype} of shape {arr.shape}")


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
        self._interrupt = False  # diffusers' interrupt flag: the loop stops at the next step (see ``interrupt``)
        # Bounds of one request, checked before any work (see RequestLimits); replace them to allow more.
        self.limits = RequestLimits()
        self.transformer = transformer.eval().requires_grad_(False)
        self.vae = vae.eval().requires_grad_(False)
        self.text_encoder = text_encoder
        self.config = config
        # Where the components are given (a pipeline built from modules already on a GPU computes there).
        self._device = next(transformer.parameters()).device
        self._memory: MemoryMode = MEMORY_MODES["plain"]
        self._block_offload: BlockOffload | None = None
        self._quantized: str | None = None  # "int8"/"fp8" once the blocks' linear weights were quantized
        self._lora: dict[str, float] = {}  # loaded LoRA adapters -> weight (see load_lora_weights)
        self._lora_words: dict[str, tuple[str, ...]] = {}  # adapter -> the words of its training captions
        self._lora_fused = False
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
            if isinstance(enc, WordTextEncoder) and folder is not None:
                enc.vocabulary = read_vocabulary(folder)  # the words of its training captions, when recorded
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
        """Load our layout (``model_index.json``) or the official download layout from a local folder, or a model
        that ships in the package by its id (``"infinitystar-demo"``, :data:`LOCAL_MODELS`; a folder of that name
        wins, as a local folder wins over a hub id in diffusers).

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
        root = _model_folder(path)
        if root.exists() and not root.is_dir():
            raise NotADirectoryError(f"--model/from_pretrained wants a model folder, and {root} is a file")
        if not root.is_dir():
            known = ", ".join(repr(name) for name in LOCAL_MODELS)
            raise FileNotFoundError(f"model folder {root} does not exist (nor is it a shipped model id: {known})")
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
        if self._lora:
            raise ConfigError(f"this pipeline holds LoRA adapters ({', '.join(self._lora)}); save_pretrained writes "
                              f"the base model only: save from a pipeline without adapters (each adapter is its own "
                              f"folder already)")
        root = Path(path)
        for sub in ("transformer", "vae", "text_encoder"):
            make_folder(root / sub, "model folder")
        checkpoints.save_transformer(self.transformer, root / "transformer" / "model.safetensors")
        checkpoints.save_vae(self.vae, root / "vae" / "model.safetensors")
        atomic_write_json(root / "transformer" / "config.json", config_to_dict(self.config.transformer))
        atomic_write_json(root / "vae" / "config.json", config_to_dict(self.config.vae))
        if isinstance(self.text_encoder, nn.Module):
            # The word encoder has no weights at all: nothing to write (its vectors come from hashing words).
            state = self.text_encoder.state_dict()
            if state:
                checkpoints.save_safetensors(state, root / "text_encoder" / "model.safetensors")
            vocabulary = getattr(self.text_encoder, "vocabulary", None)
            if vocabulary is not None:
                write_vocabulary(root / "text_encoder", vocabulary)
        elif isinstance(self.text_encoder, FlanT5Encoder):
            # A Flan-T5 folder (tokenizer + encoder weights) that FlanT5Encoder.from_pretrained reads back.
            self.text_encoder.tokenizer.save_pretrained(str(root / "text_encoder"))
            self.text_encoder.model.save_pretrained(str(root / "text_encoder"))
        else:
            warnings.warn("the text encoder is not a module; save its folder separately", stacklevel=2)
        atomic_write_json(root / MODEL_INDEX,
                          {"_class_name": type(self).__name__, "config": _pipeline_config_to_dict(self.config)})

    # ------------------------------------------------------------------------------------------
    # LoRA adapters (transformer.lora; diffusers' names)
    # ------------------------------------------------------------------------------------------

    @property
    def lora_adapters(self) -> dict[str, float]:
        """The loaded adapters and their weights (0 for a loaded but inactive one)."""
        return dict(self._lora)

    def load_lora_weights(self, path: str | os.PathLike, adapter_name: str | None = None,
                          scale: float = 1.0) -> str:
        """Load a LoRA adapter folder (``train`` with a ``[lora]`` section, then ``export``; or PEFT's layout) into
        the transformer as ``adapter_name`` (default ``adapter_<n>``) with weight ``scale``, active together with
        the adapters already loaded. An adapter made for another base model is refused in one line. Returns the
        name."""
        adapter = lora.read_adapter(path)
        if self._lora_fused:
            raise ConfigError("adapters are fused into the weights: unfuse_lora() before loading another")
        if self._quantized is not None or self._block_offload is not None:
            raise ConfigError(f"load LoRA adapters in memory mode plain or model_offload (now {self._memory.name}): "
                              f"quantized or block-offloaded weights cannot take them")
        lora.check_base(adapter, self.config.name, lora.base_identity(self.transformer))
        name = adapter_name if adapter_name is not None else f"adapter_{len(self._lora)}"
        if name in self._lora:
            raise ValueError(f"an adapter named {name!r} is loaded already")
        words = lora.adapter_vocabulary(adapter)
        lora.load_adapter_weights(self.transformer, adapter, name)
        self._lora[name] = float(scale)
        self._lora_words[name] = words
        lora.set_adapter_scales(self.transformer, self._lora)
        return name

    def set_adapters(self, adapter_names: str | Sequence[str], adapter_weights: float | Sequence[float] | None = None
                     ) -> None:
        """Use exactly ``adapter_names`` (the others become inactive), with ``adapter_weights`` (default 1 each)."""
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        if adapter_weights is None:
            weights = [1.0] * len(names)
        elif isinstance(adapter_weights, int | float):
            weights = [float(adapter_weights)] * len(names)
        else:
            weights = [float(w) for w in adapter_weights]
        if len(weights) != len(names):
            raise ValueError(f"{len(names)} adapter names but {len(weights)} weights")
        if self._lora_fused:
            raise ConfigError("adapters are fused into the weights: unfuse_lora() before changing them")
        chosen = dict(zip(names, weights))
        lora.set_adapter_scales(self.transformer, chosen)  # checks the names against the loaded adapters
        self._lora = {n: chosen.get(n, 0.0) for n in self._lora}

    def fuse_lora(self) -> None:
        """Merge the active adapters, at their weights, into the transformer's weights (no per-step LoRA cost)."""
        if not self._lora:
            raise ValueError("no LoRA adapter is loaded")
        if not self._lora_fused:
            lora.fuse_adapters(self.transformer)
            self._lora_fused = True

    def unfuse_lora(self) -> None:
        """Undo :meth:`fuse_lora` (the base weights come back up to the float rounding of the add and subtract)."""
        if self._lora_fused:
            lora.unfuse_adapters(self.transformer)
            self._lora_fused = False

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
    def components(self) -> dict[str, Any]:
        """The pipeline's parts by name, as diffusers' ``components``: ``transformer``, ``vae``, ``text_encoder``."""
        return {"transformer": self.transformer, "vae": self.vae, "text_encoder": self.text_encoder}

    @property
    def capabilities(self) -> Capabilities:
        """What this model can do (:class:`Capabilities`), derived from its configuration and text encoder.

        The RoPE frame axis decides the lengths (:func:`~infinitystar.generation.plan.plan_steps`): a model whose
        axis holds only the first frame makes images; one that holds the first frame and a whole clip makes videos of
        any length (later clips reuse the last covered clip's positions), and only such a model extends a video (a
        kept clip plus a generated one) or tells interactive stories (which also need ``config.interactive``); in
        between, videos up to the axis's length. The sizes are those :func:`resolve_size` gives the preset's aspects
        (an aspect whose pyramid the model cannot split is left out).
        """
        cfg = self.config
        rope = cfg.transformer.rope_max_frames
        unlimited = rope - 1 >= cfg.frames_inner_clip
        tasks = ["text-to-image"]
        if rope > 1:
            tasks += ["text-to-video", "image-to-video"]
        if unlimited:
            tasks.append("video-extension")
            if cfg.interactive:
                tasks.append("interactive")
        sizes: dict[str, tuple[int, int]] = {}
        for aspect in cfg.aspects:
            with contextlib.suppress(ValueError):
                sizes[aspect] = resolve_size(cfg, aspect=aspect)[2]
        # Latent frame L > 0 lies time_stride pixel frames after the first frame: L = rope - 1 is the last covered.
        longest = (rope - 1) * cfg.vae.time_stride / cfg.fps
        return Capabilities(tasks=tuple(tasks), aspects=tuple(sizes), sizes=sizes, fps=cfg.fps,
                            max_seconds=None if unlimited else longest,
                            vocabulary=self._vocabulary())

    @property
    def interrupt(self) -> bool:
        """diffusers' interrupt flag: set it (``pipe.interrupt = True``, or ``pipe._interrupt``) from a callback or
        another thread and the running call stops after the current scale step, returning what it has (the output's
        ``interrupted`` is set). Every call starts with it cleared."""
        return self._interrupt

    @interrupt.setter
    def interrupt(self, value: bool) -> None:
        self._interrupt = bool(value)

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
        if self._lora and (mode.quantize is not None or mode.offload == "block"):
            raise ConfigError(f"memory mode {mode.name} quantizes or streams the blocks, which cannot carry the loaded "
                              f"LoRA adapters; use plain or model_offload")
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
        way. ``None``: follow the device, bf16 on CUDA (also when offloading to CUDA), on a CPU bf16 only where it is
        native and measured faster (``infinitystar.hardware``), else fp32; an explicit choice sticks across later
        :meth:`to` calls.
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

    def encode_prompt(self, prompt: str, negative_prompt: str | None = None, *,
                      on_progress: Callable[[int, int], None] | None = None) -> tuple[Tensor, Tensor | None]:
        """Text features of the (templated) prompt and of the negative prompt, if any. The prompt was checked by
        :meth:`check_inputs`. ``on_progress(done, total)`` after each text (a large Flan-T5 takes a while)."""
        total = 2 if negative_prompt else 1
        with self._working(self.text_encoder):
            text = self.text_encoder([prompt]).kv_compact
            if on_progress is not None:
                on_progress(1, total)
            negative = None
            if negative_prompt:
                negative = self.text_encoder([negative_prompt]).kv_compact
                if on_progress is not None:
                    on_progress(2, total)
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
            if isinstance(image, np.ndarray):  # uint8 [H, W, 3] (a frame of output_type="np"), resized to fit
                _check_frames_array(image, "image", "[H, W, 3]", 3)
                return media.frames_to_tensor(media.resize_and_center_crop(image[None], h, w))[None]
            if isinstance(image, (str, os.PathLike)):
                media.check_input_size(image, "image", max_bytes=self.limits.max_upload_bytes,
                                       max_pixels=self.limits.max_upload_pixels)
            return media.load_image_tensor(image, h, w)[None, :, None]
        if video is not None:
            if isinstance(video, Tensor):
                x = video if video.dim() == 5 else video[None]  # [1, 3, T, H, W] or [3, T, H, W]
                t = x.shape[2] if x.dim() == 5 else -1
                return _check_condition_tensor(x, "video", (1, 3, t, h, w), video.shape)
            if isinstance(video, np.ndarray):  # uint8 [T, H, W, 3], frame for frame as a tensor, resized to fit
                _check_frames_array(video, "video", "[T, H, W, 3]", 4)
                return media.frames_to_tensor(media.resize_and_center_crop(video, h, w))[None]
            media.check_input_size(video, "video", max_bytes=self.limits.max_upload_bytes,
                                   max_pixels=self.limits.max_upload_pixels)
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

    # The tensors ``callback_on_step_end`` may ask for (diffusers' ``_callback_tensor_inputs``): the step's sampled
    # bits (1, t, h, w, d), the guided logits it sampled from (1, t*h*w, d, 2; None for a forced step that was not
    # run) and the running sum of codes after it (1, 64, T', H, W), what the VAE would decode now.
    _callback_tensor_inputs = ("bits", "logits", "summed_codes")

    def _check_limits(self, prompts: Sequence[str], *, num_frames: int | None = None, videos: int = 1,
                      segments: int | None = None) -> None:
        """Refuse a request over :attr:`limits` in one line naming the figure and the limit, before any work."""
        lim, cfg = self.limits, self.config
        if segments is not None and segments > lim.max_segments:
            raise ValueError(f"an interactive story of {segments} segments is over the limit of {lim.max_segments} "
                             + limit_hint("max_segments"))
        for i, p in enumerate(prompts):
            if isinstance(p, str) and len(p) > lim.max_prompt_chars:
                where = "the prompt" if len(prompts) == 1 else f"prompt {i}"
                raise ValueError(f"{where} has {len(p)} characters; the limit is {lim.max_prompt_chars} "
                                 + limit_hint("max_prompt_chars"))
        if videos > lim.max_videos:
            raise ValueError(f"{videos} videos in one call; the limit is {lim.max_videos} " + limit_hint("max_videos"))
        if num_frames is not None and num_frames > lim.max_frames:
            raise ValueError(f"{num_frames} frames ({(num_frames - 1) / cfg.fps:g} s at {cfg.fps} fps) is over the "
                             f"limit of {lim.max_frames} frames, {(lim.max_frames - 1) / cfg.fps:g} s "
                             + limit_hint("max_frames"))

    def _check_working_memory(self, plan: GenerationPlan) -> None:
        """Refuse a request whose estimated working memory (beyond the loaded weights) is more than the device has
        free: a clear line now rather than an out-of-memory kill minutes later."""
        if not self.limits.check_memory:
            return
        available = available_memory(self._device)
        if available is None:
            return
        need = working_memory_bytes(plan, precision=self.precision, tile=self.vae_tile_size)
        if need > available:
            gib = 2**30
            raise MemoryError(f"this request needs about {need / gib:.1f} GiB of working memory on {self._device} "
                              f"and {available / gib:.1f} GiB is free: ask for fewer frames or a smaller size (or "
                              "a smaller memory mode); --request-limit check_memory=false skips this check")

    def check_inputs(self, prompts: Sequence[str], output_type: str, guidance_scale: float | None,
                     ) -> SamplingConfig:
        """Check what every task shares, once, before any work: the prompts (non-empty strings), the output type
        and the guidance scale. Returns the sampling settings with the guidance scale applied."""
        for i, p in enumerate(prompts):
            where = "prompt" if len(prompts) == 1 else f"prompt {i}"
            if not isinstance(p, str) or not p.strip():
                raise ValueError(f"{where} must be a non-empty string, got {p!r}")
            try:
                p.encode("utf-8")
            except UnicodeEncodeError as exc:  # e.g. a shell argument in another encoding (Python's surrogates)
                raise ValueError(f"{where} is not valid text: characters {exc.start}-{exc.end - 1} are bytes that are "
                                 "not UTF-8; give the prompt in UTF-8") from None
        if output_type not in ("np", "pil", "pt", "latent"):
            raise ValueError(f"unknown output_type {output_type!r}; valid: 'np', 'pil', 'pt', 'latent'")
        return self.config.sampling.with_guidance_scale(guidance_scale)

    def _encode_video(self, video: Tensor) -> Tensor:
        """VAE encode (posterior mean) of [1, 3, T, H, W] in [-1, 1]."""
        with self._working(self.vae) as vae:
            return vae.encode(video.to(self.device), sample=False)

    @staticmethod
    def _prompt_batch(prompt: Any, negative_prompt: Any, per_prompt: Any) -> tuple[list[str], list[str | None]]:
        """The prompts and their negative prompts, one each, after checking their types and ``per_prompt``."""
        if isinstance(per_prompt, bool) or not isinstance(per_prompt, int) or per_prompt < 1:
            raise ValueError(f"num_videos_per_prompt must be an integer >= 1, got {per_prompt!r}")
        if isinstance(prompt, str):
            prompts = [prompt]
        elif isinstance(prompt, (list, tuple)) and prompt:
            prompts = list(prompt)
        else:
            raise ValueError(f"prompt must be a string or a non-empty list of strings, got {prompt!r}")
        if negative_prompt is None or isinstance(negative_prompt, str):
            return prompts, [negative_prompt] * len(prompts)
        if not isinstance(negative_prompt, (list, tuple)) or len(negative_prompt) != len(prompts):
            raise ValueError(f"negative_prompt must be a string, None or a list of one per prompt ({len(prompts)}), "
                             f"got {negative_prompt!r}")
        for i, n in enumerate(negative_prompt):
            if n is not None and not isinstance(n, str):
                raise ValueError(f"negative_prompt {i} must be a string or None, got {n!r}")
        return prompts, list(negative_prompt)

    def _check_tensor_inputs(self, names: Any) -> tuple[str, ...]:
        if isinstance(names, str) or not isinstance(names, (list, tuple)):
            raise ValueError(f"callback_on_step_end_tensor_inputs must be a list of names, got {names!r}")
        bad = [n for n in names if n not in self._callback_tensor_inputs]
        if bad:
            raise ValueError(f"callback_on_step_end_tensor_inputs names {bad}, which the pipeline does not have; "
                             f"valid: {list(self._callback_tensor_inputs)}")
        return tuple(names)

    def _generators(self, generator: Any, seed: int | None, count: int) -> list[tuple[torch.Generator, int]]:
        """(generator, seed) of each of ``count`` videos: the given generators (their ``initial_seed()`` reported),
        else seeds ``seed``, ``seed + 1``, ... (a random ``seed`` when none is given) on the sampling device."""
        if generator is not None:
            if seed is not None:
                raise ValueError("give seed or generator, not both")
            gens = list(generator) if isinstance(generator, (list, tuple)) else [generator]
            for g in gens:
                if not isinstance(g, torch.Generator):
                    raise ValueError(f"generator must be a torch.Generator or a list of them, got {g!r}")
            if len(gens) != count:
                raise ValueError(f"{len(gens)} generator(s) for {count} videos: pass one torch.Generator per video, "
                                 f"or seed= (the videos then use seed, seed+1, ...)")
            return [(g, g.initial_seed()) for g in gens]
        base = draw_seed(count) if seed is None else _check_seed(seed, count)
        # On the device that samples: the same seed on the same device gives the same video.
        return [(torch.Generator(device=self.device).manual_seed(base + k), base + k) for k in range(count)]

    def _vocabulary(self) -> tuple[str, ...] | None:
        """The words a closed-vocabulary text encoder was trained on, plus those of the active LoRA adapters'
        training captions (an adapter teaches the model its words); None for an open vocabulary."""
        vocabulary = getattr(self.text_encoder, "vocabulary", None)
        if vocabulary is None:
            return None
        taught = {w for name, weight in self._lora.items() if weight != 0 for w in self._lora_words.get(name, ())}
        return tuple(sorted(set(vocabulary) | taught)) if taught else tuple(vocabulary)

    def _warn_unknown_words(self, prompts: Sequence[str | None]) -> None:
        """One :class:`UnknownWordsWarning` naming the prompts' words a closed-vocabulary text encoder was not trained
        on."""
        words = unknown_words(self._vocabulary(), [w for p in prompts if p for w in word_tokens(p)])
        if words:
            # stacklevel 4: this helper, the public method, torch.no_grad's wrapper, the caller.
            warnings.warn(f"the model's text encoder was not trained on {', '.join(map(repr, words))}: those words "
                          f"condition it on vectors it never saw (capabilities.vocabulary lists the words it knows, "
                          f"with those of the active LoRA adapters)", UnknownWordsWarning, stacklevel=4)

    def _step_callbacks(self, callback_on_step_end: Callable[..., Any] | None, tensor_inputs: tuple[str, ...],
                        callback_on_scale_step: Callable[[InfinityStarPipeline, StepEvent], None] | None,
                        ) -> Callable[[StepEvent], None] | None:
        """The loop's per-step hook that feeds both step callbacks."""
        if callback_on_step_end is None and callback_on_scale_step is None:
            return None

        def on_step(ev: StepEvent) -> None:
            if callback_on_scale_step is not None:
                callback_on_scale_step(self, ev)
            if callback_on_step_end is not None:
                have = {"bits": ev.bits_BthwD, "logits": ev.logits_Bnd2, "summed_codes": ev.summed_codes_B64THW}
                given = {name: have[name] for name in tensor_inputs}
                returned = callback_on_step_end(self, ev.index, ev.step, given)
                if returned is None:
                    return
                if not isinstance(returned, dict):
                    raise TypeError(f"callback_on_step_end must return a dict (diffusers' convention), got "
                                    f"{type(returned).__name__}")
                for name, value in returned.items():
                    if name in given and value is not given[name]:
                        raise ValueError(f"callback_on_step_end returned a new {name!r}: the step tensors are "
                                         f"read-only here (the step's bits are already in the codes)")

        return on_step

    def _encode(self, prompt: str, negative: str | None, reporter: _Reporter,
                clip: int | None = None) -> tuple[Tensor, Tensor | None]:
        with reporter.stage("encode_prompt", 2 if negative else 1, clip) as update:
            return self.encode_prompt(prompt, negative, on_progress=update)

    def _generate(self, plan: GenerationPlan, text: Tensor, negative: Tensor | None, forced: Sequence[Tensor],
                  sampling: SamplingConfig, generator: torch.Generator, reporter: _Reporter,
                  on_step: Callable[[StepEvent], None] | None, *, segment: int | None = None,
                  summed_codes_in_events: bool = False,
                  on_clip: Callable[[int, Tensor], None] | None = None) -> GenerationResult:
        """The loop over ``plan``: progress per step (its clip, or the interactive ``segment``), stopping when
        :attr:`interrupt` is set."""
        clip = [1 if segment is None else segment]

        def step_hook(ev: StepEvent) -> None:
            if segment is None:
                clip[0] = ev.step.clip_id + 1
            if on_step is not None:
                on_step(ev)

        with reporter.stage("generate", plan.num_steps, clip[0]) as update, \
                self._working(self.transformer) as transformer:
            return generate_codes(
                transformer, self.config.quantizer, text, plan.schedule, plan.steps, plan.repetitions, sampling,
                generator=generator, negative_LC=negative, forced_bits=forced,
                frames_inner_clip=self.config.frames_inner_clip, on_step=step_hook,
                on_progress=lambda done, total: update(done, total, clip[0]),
                summed_codes_in_events=summed_codes_in_events, should_stop=lambda: self._interrupt, on_clip=on_clip,
            )

    def _streams_decode(self) -> bool:
        """Whether clips can be decoded while the loop runs: the VAE stays on the device (no offload mode moves it
        in and out around the transformer) and decodes untiled (the streaming decoder does not tile)."""
        return self.vae_tile_size is None and not self._offloaded(self.vae)

    def _clip_streamer(self, plan: GenerationPlan, output_type: str, reporter: _Reporter,
                       callback: Callable[[int, Any], None]) -> tuple[Callable[[int, Tensor], None], list[Any]]:
        """``on_clip`` for the loop that decodes each clip as soon as its codes are complete (the VAE's causal cache
        carried from clip to clip: the same frames as decoding the whole latent after the loop) and hands it to
        ``callback``; and the list the finished clips collect in, already in ``output_type``'s form (:meth:`_format`;
        joined by :meth:`_join_clips`).

        Only the output form is kept: for np/pil the uint8 frames (1 byte a value, not the decoder's 4), so a long
        video's peak memory grows by its uint8 frames and not by a float32 copy of the whole video (issue 18: a 30 s
        video peaks like a 6 s one)."""
        decoder = self.vae.stream_decoder()
        finished: list[Any] = []
        clips = len(plan.clip_pixel_frames)

        def on_clip(index: int, codes: Tensor) -> None:
            with reporter.stage("decode", clips, clip=index + 1) as update:
                update(index)
                decoded = decoder.decode(codes.to(self.device).float()).clamp(-1, 1)
                update(index + 1)
            clip = self._format(decoded, output_type)
            finished.append(clip)
            callback(index, clip)

        return on_clip, finished

    @staticmethod
    def _join_clips(clips: Sequence[Any], output_type: str) -> Any:
        """The streamed clips (:meth:`_clip_streamer`'s list) as one output of ``output_type``, as :meth:`_format`
        gives it for the whole decoded video (per value the same conversion, so the same frames)."""
        if output_type == "pt":
            return torch.cat(list(clips), dim=1)
        if output_type == "pil":
            return [image for clip in clips for image in clip]
        return np.concatenate(list(clips), axis=0)

    def _decode(self, latent: Tensor, reporter: _Reporter, clip: int | None = None) -> Tensor:
        with reporter.stage("decode", clip=clip) as update:
            return self.decode_latent(latent, on_chunk=update)

    @torch.no_grad()
    def reconstruct(self, video: Any, *, resolution: str | None = None, aspect: str | None = None,
                    height: int | None = None, width: int | None = None, output_type: str = "np",
                    progress: bool | Callable[[ProgressEvent], None] = False) -> Any:
        """``video`` through the tokenizer alone: VAE encode, multi-scale BSQ bits along the schedule generation
        uses, their summed codes, VAE decode. The best any generated video can look with these weights.

        ``video``: a file path or a [3, T, H, W] / [1, 3, T, H, W] tensor in [-1, 1] at the bucket size; it is
        resized and centre-cropped like a conditioning video and cut to 1 + 4k frames. ``progress`` reports the
        decode as :meth:`__call__` does (off by default: evaluations reconstruct many clips).
        """
        if output_type not in ("np", "pil", "pt"):
            raise ValueError(f"unknown output_type {output_type!r}; valid: 'np', 'pil', 'pt'")
        reporter = _Reporter(progress)
        cfg = self.config
        _, pyramid, size = self.resolve_size(resolution=resolution, aspect=aspect, height=height, width=width)
        x = self._load_condition(None, video, size)
        assert x is not None
        plan = GenerationPlan(cfg, whole_pixel_frames(x.shape[2], cfg.vae.time_stride), pyramid, cfg.sampling)
        latent = self._encode_video(x[:, :, :plan.num_frames])
        codes = encode_latent_bits(cfg, latent, plan.schedule).summed_codes
        return self._format(self._decode(codes, reporter), output_type)

    def decode_latent(self, latent: Tensor, on_chunk: Callable[[int, int], None] | None = None) -> Tensor:
        """Summed codes [1, 64, T', h, w] -> video [1, 3, T, H, W] clamped to [-1, 1]; ``on_chunk(done, total)``
        as :meth:`VideoVAE.decode` reports it (0 first, then after every decoder chunk)."""
        with self._working(self.vae) as vae, torch.no_grad():
            video = vae.decode(latent.to(self.device).float(), tile_size=self.vae_tile_size, on_chunk=on_chunk)
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
        prompt: str | list[str],
        negative_prompt: str | list[str | None] | None = None,
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
        num_videos_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        seed: int | None = None,
        output_type: str = "np",
        return_dict: bool = True,
        callback_on_step_end: Callable[[InfinityStarPipeline, int, schedules.ScaleStep, dict[str, Any]],
                                       dict[str, Any] | None] | None = None,
        callback_on_step_end_tensor_inputs: Sequence[str] = ("summed_codes",),
        callback_on_scale_step: Callable[[InfinityStarPipeline, StepEvent], None] | None = None,
        callback_on_clip_end: Callable[[int, Any], None] | None = None,
        stream_clips: bool = False,
        progress: bool | Callable[[ProgressEvent], None] = True,
        **kwargs: Any,
    ) -> InfinityStarPipelineOutput | tuple[Any]:
        """Generate an image (``num_frames=1``) or a video per prompt and seed.

        ``image`` makes it image-to-video (the image is the first frame): a file, a PIL image, uint8 ``[H, W, 3]``
        or a float tensor at the output size; ``video`` makes it a video extension: its first whole clips, at most
        all but the output's last, are kept (a file's frames picked as the reference picks them,
        :func:`extension_frames`; uint8 frames ``[T, H, W, 3]`` or a float tensor frame for frame), the rest
        generated. Files and arrays are resized and centre-cropped to the output size.

        Several videos (a list of prompts, ``num_videos_per_prompt > 1``) are generated one after the other, not
        as a batch: the transformer's batch holds the guidance pair, and batching videos would change the
        order of the generator's draws. Video k of the call uses seed ``seed + k`` (prompt-major), so each equals
        the single call with that seed; each prompt is encoded once. Without ``seed`` and ``generator`` a random
        seed is drawn; the output reports every seed. ``generator`` instead: one per video.

        Callbacks: ``callback_on_step_end(pipe, step, timestep, callback_kwargs) -> dict`` as in diffusers, after
        every scale step (``timestep`` is that :class:`~infinitystar.generation.schedules.ScaleStep`: scale, clip,
        repeat; ``callback_kwargs`` holds the tensors ``callback_on_step_end_tensor_inputs`` names, of
        ``_callback_tensor_inputs``; they are read-only). Setting :attr:`interrupt` there stops the call after that
        step. ``callback_on_scale_step(pipe, event)`` receives the loop's full
        :class:`~infinitystar.generation.loop.StepEvent`. ``callback_on_clip_end(index, frames)`` receives each
        finished clip's frames (``output_type`` format) after the decode; with ``stream_clips=True`` as soon as they
        exist: each clip is decoded while the loop goes on to the next one (the VAE's causal cache carried over: the
        same frames as decoding after the loop; the decode then reports progress per clip), except under an offload
        memory mode or a tiled decode, which decode after the loop.

        ``progress``: True draws tqdm bars (text encoding, scale steps, VAE decode per chunk), False is silent, a
        callable receives :class:`ProgressEvent` s instead; whatever it raises aborts the call at once, during the
        decode too. ``return_dict=False`` returns ``(frames,)``. diffusers arguments that do not apply here
        (``num_inference_steps``, ``latents``, ``prompt_embeds``, ...) are refused with the reason.
        """
        _reject_keywords(kwargs, [p for p in _CALL_PARAMETERS if p != "kwargs"])
        cfg = self.config
        self._interrupt = False
        prompts, negatives = self._prompt_batch(prompt, negative_prompt, num_videos_per_prompt)
        # Checked before the template adds the duration tag and quality suffix (which would make "" non-empty).
        sampling = self.check_inputs(prompts, output_type, guidance_scale)
        tensor_inputs = self._check_tensor_inputs(callback_on_step_end_tensor_inputs)
        reporter = _Reporter(progress)
        num_frames = self.num_frames_for(num_frames, seconds)
        if image is not None and num_frames == 1:
            raise ValueError("image-to-video needs num_frames > 1 (the image is the first frame)")
        if video is not None and num_frames == 1:
            raise ValueError("video extension needs num_frames longer than the given video, got num_frames=1")
        count = len(prompts) * num_videos_per_prompt
        self._check_limits([*prompts, *(n for n in negatives if n)], num_frames=num_frames, videos=count)
        generators = self._generators(generator, seed, count)
        self._warn_unknown_words([*prompts, *negatives])
        _, pyramid, size = self.resolve_size(resolution=resolution, aspect=aspect, height=height, width=width)
        plan = GenerationPlan(cfg, num_frames, pyramid, sampling)
        self._check_working_memory(plan)
        condition = self._load_condition(image, video, size, total_latents=plan.latent_frames)
        forced: list[Tensor] = []
        if condition is not None:
            plan = plan.with_condition(condition.shape[2])
            plan.check_condition()
            forced = plan.forced_bits(self._encode_video(condition[:, :, :plan.condition_pixel_frames]))
        on_step = self._step_callbacks(callback_on_step_end, tensor_inputs, callback_on_scale_step)
        summed_in_events = callback_on_step_end is not None and "summed_codes" in tensor_inputs
        frames: list[Any] = []
        latents: list[Tensor] = []
        interrupted = False
        text = negative = None
        for k, (gen, _) in enumerate(generators):
            if k and self._interrupt:
                interrupted = True
                break
            reporter.prefix = f"video {k + 1}/{count} " if count > 1 else ""
            if k % num_videos_per_prompt == 0:
                p = k // num_videos_per_prompt
                text, negative = self._encode(self.build_prompt(prompts[p], num_frames), negatives[p], reporter)
            assert text is not None
            on_clip, streamed = None, []
            if (stream_clips and callback_on_clip_end is not None and output_type != "latent"
                    and self._streams_decode()):
                on_clip, streamed = self._clip_streamer(plan, output_type, reporter, callback_on_clip_end)
            result = self._generate(plan, text, negative, forced, sampling, gen, reporter, on_step,
                                    summed_codes_in_events=summed_in_events, on_clip=on_clip)
            interrupted = result.interrupted
            latents.append(result.summed_codes)
            if output_type == "latent":
                frames.append(result.summed_codes)
                continue
            if streamed and not result.interrupted:
                frames.append(self._join_clips(streamed, output_type))
                continue
            # not streamed, or interrupted (a video that ends in a partial clip): decoded whole, as it stands
            video_out = self._decode(result.summed_codes, reporter)
            if callback_on_clip_end is not None and not result.interrupted:
                self._emit_clips(plan.clip_pixel_frames, video_out, output_type, callback_on_clip_end)
            frames.append(self._format(video_out, output_type))
        seeds = [s for _, s in generators[:len(frames)]]
        one = isinstance(prompt, str) and num_videos_per_prompt == 1
        out = InfinityStarPipelineOutput(frames=frames[0] if one else frames, fps=cfg.fps,
                                         latent=latents[0] if one else latents, seed=seeds[0], seeds=seeds,
                                         interrupted=interrupted)
        return out if return_dict else (out.frames,)

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
        progress: bool | Callable[[ProgressEvent], None] = True,
    ) -> InfinityStarPipelineOutput:
        """Interactive long video: one prompt per segment, each segment continuing the previous one (needs an
        interactive model: ``"interactive" in capabilities.tasks``).

        Segment 0 is the given ``video`` (a file's last ``frames_per_clip / fps`` seconds, sampled as the reference
        does, or a tensor's last 1 + frames_per_clip frames; VAE-encoded at the template nearest the video's own
        aspect unless ``aspect`` is given) or, without one, generated from
        ``prompts[0]`` as a text-to-video clip. Every later prompt generates one clip (``frames_inner_clip``
        latent frames) with the interactive schedule: it attends to its text, a low-resolution semantic
        condition of the previous segment and a full-resolution detail condition (the story's first frame and
        the previous segment's last two latent frames). Every turn samples with a generator seeded ``seed``, as the
        reference does (a random seed when none is given; the output reports it). ``progress`` as in
        :meth:`__call__`, its events' ``clip`` the 1-based segment. Setting :attr:`interrupt` (e.g. in
        ``callback_on_segment_end``) stops the story after the current step; a segment cut short is dropped,
        except segment 0.
        """
        cfg = self.config
        tasks = self.capabilities.tasks
        if "interactive" not in tasks:
            raise ValueError(f"model {cfg.name!r} is not interactive (its tasks: {', '.join(tasks)}); interactive "
                             f"stories need an interactive model such as preset 'interactive-480p'")
        if isinstance(prompts, str):
            raise ValueError("prompts must be a list with one prompt per segment, not one string")
        prompts = list(prompts)
        if not prompts:
            raise ValueError("interactive generation needs at least one prompt")
        self._interrupt = False
        sampling = self.check_inputs(prompts, output_type, guidance_scale)
        self._check_limits(prompts, segments=len(prompts))
        reporter = _Reporter(progress)
        seed = draw_seed() if seed is None else _check_seed(seed)
        self._warn_unknown_words(prompts)
        # A file: its last clip at its own size (whose aspect picks the template); a tensor: as given.
        reference = video if video is None or isinstance(video, Tensor) else interactive_reference_frames(cfg, video)
        template, pyramid, size = interactive_size(cfg, None if reference is None else _frame_hw(reference), aspect)
        turn_plan = InteractivePlan(cfg, tuple(pyramid), sampling)
        interrupted = False
        # Segment 0: a whole first clip (first frame + one video clip), as latent.
        if video is not None:
            condition = self._reference_condition(reference, size)
            with self._working(self.vae) as vae:
                former = vae.encode(condition.to(self.device))
        else:
            frames = turn_plan.first_segment_frames
            text, _ = self._encode(self.build_prompt(prompts[0], frames), None, reporter, clip=1)
            generator = torch.Generator(device=self.device).manual_seed(seed)
            first = self._generate(GenerationPlan(cfg, frames, pyramid, sampling), text, None, [], sampling,
                                   generator, reporter, None, segment=1)
            former, interrupted = first.summed_codes, first.interrupted
        segments = [self._decode(former, reporter, clip=1)]
        if callback_on_segment_end is not None and not interrupted:
            callback_on_segment_end(0, self._format(segments[0], output_type))
        first_frame = former[:, :, :1]
        for i, prompt in enumerate(prompts[1:], start=1):
            if interrupted or self._interrupt:
                interrupted = True
                break
            text, _ = self._encode(interactive_prompt(prompt, turn_plan.clip_seconds), None, reporter, clip=i + 1)
            with reporter.stage("generate", turn_plan.num_steps, i + 1) as update, \
                    self._working(self.transformer) as transformer:
                turn = run_interactive_turn(transformer, cfg.quantizer, text, former, first_frame, turn_plan.layout,
                                            turn_plan.steps, turn_plan.repetitions, sampling, seed=seed,
                                            on_progress=update, should_stop=lambda: self._interrupt)
            if turn.result.interrupted:
                interrupted = True
                break
            decoded = self._decode(turn.decode_latent, reporter, clip=i + 1)
            new_frames = decoded[:, :, -turn_plan.clip_pixel_frames:]
            segments.append(new_frames)
            former = turn.next_context
            if callback_on_segment_end is not None:
                callback_on_segment_end(i, self._format(new_frames, output_type))
        full = torch.cat(segments, dim=2)
        return InfinityStarPipelineOutput(frames=self._format(full, output_type), fps=cfg.fps,
                                          segments=[self._format(s, output_type) for s in segments], seed=seed,
                                          seeds=[seed], interrupted=interrupted)


# The keywords __call__ takes (for the nearest-name hint of an unknown one).
_CALL_PARAMETERS = tuple(inspect.signature(InfinityStarPipeline.__call__).parameters)[1:]


def export_to_video(frames: Any, path: str | os.PathLike, fps: int = 16) -> Path:
    """Write frames (np uint8 [T, H, W, 3], PIL list or a [3, T, H, W] tensor) as mp4, or png for one frame."""
    if isinstance(frames, Tensor):
        frames = media.tensor_to_frames(frames)
    if isinstance(frames, list):
        frames = np.stack([np.asarray(f) for f in frames])
    path = Path(path)
    media.save_output(frames, path, fps=fps)
    return path


__all__ = ["DEMO_MODEL_ID", "DIFFUSERS_ONLY_ARGUMENTS", "LOCAL_MODELS", "SEED_LIMIT", "TASKS", "Capabilities",
           "InfinityStarPipeline", "UnknownWordsWarning",
           "InfinityStarPipelineOutput", "ProgressEvent", "draw_seed", "export_to_video", "extension_frames",
           "interactive_reference_frames", "read_pipeline_config"]

"""Training configurations, nested by concern like torchtitan's job config, and their one file loader.

A run is one frozen dataclass whose fields are sections (``model``, ``data``, ``optimizer``, ``training``,
``checkpoint``, ``logging``, ``parallelism``, ...); a TOML or JSON file holds one table per section::

    out_dir = "runs/tiny"
    [model]
    pipeline = "tiny-test"
    [optimizer]
    lr = 1e-3
    [training]
    steps = 2000

Each field is validated once, by the section that owns it; unknown keys are rejected with their dotted path
(``optimizer.lrr``). The sections shared by both trainers (:class:`OptimizerConfig`, :class:`CheckpointConfig`,
:class:`LoggingConfig`) carry the same names and meaning in both; each trainer gives its own defaults.

May import: ``infinitystar.config`` (presets, ``ConfigError``), ``schedules`` and the pure training modules
that own a section (``train.loss``, ``train.scale_subsets``); nothing that builds models.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from infinitystar.config import ConfigError, get_preset
from infinitystar.train.loss import LossWeighting
from infinitystar.train.scale_subsets import ScaleSubsetConfig
from infinitystar.transformer.lora import LoRAConfig

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10: the same parser, as the `tomli` package (a dependency there only)
    import tomli as tomllib

C = TypeVar("C")


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def _is_int(value: Any, low: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= low


def _is_number(value: Any, low: float = 0.0) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value >= low


# ----------------------------------------------------------------------------------------------
# Sections shared by both trainers
# ----------------------------------------------------------------------------------------------


LR_SCHEDULES = ("constant", "cosine", "linear")


@dataclass(frozen=True)
class OptimizerConfig:
    """AdamW and its learning-rate schedule (:meth:`lr_at`)."""

    lr: float = 4e-5
    betas: tuple[float, float] = (0.9, 0.97)
    eps: float = 1e-8
    weight_decay: float = 0.0
    # Global gradient-norm clip (0 = off).
    grad_clip: float = 5.0
    # Linear warm-up over `warmup_steps`, then "constant", or "cosine" / "linear" decay from lr to lr * min_lr_ratio
    # at the run's last step.
    schedule: str = "constant"
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0

    def __post_init__(self) -> None:
        betas = tuple(float(b) for b in self.betas)
        object.__setattr__(self, "betas", betas)
        _require(_is_number(self.lr) and self.lr > 0, f"optimizer.lr must be > 0, got {self.lr!r}")
        _require(len(betas) == 2 and all(0 <= b < 1 for b in betas),
                 f"optimizer.betas must be two numbers in [0, 1), got {list(betas)}")
        _require(_is_number(self.eps) and self.eps > 0, f"optimizer.eps must be > 0, got {self.eps!r}")
        for name in ("weight_decay", "grad_clip"):
            _require(_is_number(getattr(self, name)), f"optimizer.{name} must be a number >= 0, got "
                                                       f"{getattr(self, name)!r}")
        _require(self.schedule in LR_SCHEDULES,
                 f"optimizer.schedule must be one of {list(LR_SCHEDULES)}, got {self.schedule!r}")
        _require(_is_int(self.warmup_steps, 0), f"optimizer.warmup_steps must be an int >= 0, got "
                                                 f"{self.warmup_steps!r}")
        _require(_is_number(self.min_lr_ratio) and self.min_lr_ratio <= 1,
                 f"optimizer.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio!r}")

    def lr_at(self, step: int, total_steps: int) -> float:
        """Learning rate of optimizer step ``step`` (0-based) of a ``total_steps`` run: linear warm-up, then
        constant, or cosine / linear decay to ``lr * min_lr_ratio`` at ``total_steps``."""
        if self.warmup_steps and step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        if self.schedule == "constant":
            return self.lr
        span = max(1, total_steps - self.warmup_steps)
        progress = min(1.0, max(0.0, (step - self.warmup_steps) / span))
        low = self.lr * self.min_lr_ratio
        if self.schedule == "cosine":
            return low + (self.lr - low) * 0.5 * (1.0 + math.cos(math.pi * progress))
        return self.lr + (low - self.lr) * progress


@dataclass(frozen=True)
class CheckpointConfig:
    """Training-state checkpoints (``out_dir/checkpoints``): every N steps and at the end; the newest K are kept."""

    every: int = 200
    keep_last_k: int = 3

    def __post_init__(self) -> None:
        for name in ("every", "keep_last_k"):
            _require(_is_int(getattr(self, name), 1), f"checkpoint.{name} must be an int >= 1, got "
                                                       f"{getattr(self, name)!r}")


@dataclass(frozen=True)
class LoggingConfig:
    """One JSON record per logged step in ``out_dir/train_log.jsonl``: every N steps and the last."""

    every: int = 1

    def __post_init__(self) -> None:
        _require(_is_int(self.every, 1), f"logging.every must be an int >= 1, got {self.every!r}")


DEVICES = ("auto", "cpu", "cuda")


@dataclass(frozen=True)
class ParallelismConfig:
    """Where and how the run computes. Several processes come from ``torchrun`` (``train.distributed``)."""

    # "auto" (CUDA if available), "cpu" or "cuda".
    device: str = "auto"
    # Recompute every block in backward (the reference's enable_checkpointing=full-block); transformer only.
    activation_checkpointing: bool = True
    # FSDP2 MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32) instead of fp32 parameters (CUDA only).
    fsdp_bf16_params: bool = False
    # torch intra-op threads (None = PyTorch's setting). On a CPU shared with other jobs fewer threads than cores
    # avoids OpenMP oversubscription (measured up to 10x faster per VAE step).
    threads: int | None = None

    def __post_init__(self) -> None:
        _require(self.device in DEVICES, f"parallelism.device must be one of {list(DEVICES)}, got {self.device!r}")
        _require(self.threads is None or _is_int(self.threads, 1),
                 f"parallelism.threads must be None or an int >= 1, got {self.threads!r}")


# ----------------------------------------------------------------------------------------------
# Transformer training
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DataConfig:
    """Where the training records and cached latents live, and how clips and captions are drawn.

    Defaults follow the released 480p fine-tuning scripts (training spec sections 2 and 10): whole-second
    durations clamped to 5 s (``video_frames=81``), the ``<<<t=Ns>>>`` duration prefix on video captions,
    sentence truncation with probability 0.3 and 10 % condition (caption) dropout. The training fps, the scale
    pyramid (pixel budget, scales per clip, clip length) and the VAE stride are the pipeline's (``model.pipeline``):
    the data is cut as the model generates.
    """

    # Fields of older configs that now come from the pipeline: named in one clear error, never silently dropped.
    MOVED_FIELDS: ClassVar[dict[str, str]] = {
        key: f"{what} comes from the pipeline (model.pipeline; extract-features --pipeline)"
        for key, what in (("pn", "the pixel budget"), ("num_scales", "the number of scales per clip"),
                          ("frames_inner_clip", "the clip length"), ("time_stride", "the VAE time stride"),
                          ("fps", "the training fps"))
    }

    # jsonl files or glob patterns (``data/*/*.jsonl``); records in the reference format.
    jsonl: tuple[str, ...] = ()
    # Root of the safetensors latent cache written by ``infinitystar extract-features``.
    cache_dir: str = ""
    # Relative ``video_path`` / ``image_path`` values are resolved against this folder (None = the
    # folder of the jsonl file that holds the record).
    video_root: str | None = None
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
    # Tasks beyond text-to-video (train.tasks; the reference trains none of them, we train them as they are
    # generated). Of each epoch's video samples, this fraction is trained as image-to-video (the first frame's
    # scales given: no self-correction flips, no loss) ...
    image_to_video_prob: float = 0.0
    # ... and this fraction of the videos with two or more clips as video extension (the first frame and 1..n-1
    # whole clips given). Story records (``segment_captions``) are always interactive turns.
    extension_prob: float = 0.0
    # Interactive turns: the conditions get Gaussian noise of one of these strengths times their std, drawn per
    # sample (the reference's interactive training: 0, 0.15, 0.30); generation adds none.
    condition_noise: tuple[float, ...] = (0.0, 0.15, 0.30)
    # Interactive turns: the fraction whose conditions are built from the previous segment's *summed codes* (its
    # latent quantized through the multi-scale BSQ, what generation holds after a generated segment) instead of the
    # continuous latent (what the reference trains on, and what generation holds for a given reference video's
    # first turn). 0 = the reference. A small model trained on continuous conditions only follows a new prompt
    # far less often after a generated segment (docs/demo.md).
    condition_codes_prob: float = 0.0

    def __post_init__(self) -> None:
        jsonl = (self.jsonl,) if isinstance(self.jsonl, str) else tuple(self.jsonl)
        object.__setattr__(self, "jsonl", jsonl)
        _require(all(isinstance(p, str) and p for p in jsonl),
                 f"DataConfig.jsonl must be non-empty path strings, got {list(jsonl)}")
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
        for name in ("image_to_video_prob", "extension_prob", "condition_codes_prob"):
            value = getattr(self, name)
            _require(isinstance(value, int | float) and 0.0 <= value <= 1.0,
                     f"DataConfig.{name} must be in [0, 1], got {value!r}")
        _require(self.image_to_video_prob + self.extension_prob <= 1.0,
                 f"DataConfig.image_to_video_prob + extension_prob must be <= 1, got "
                 f"{self.image_to_video_prob} + {self.extension_prob}")
        noise = tuple(self.condition_noise) if isinstance(self.condition_noise, list | tuple) else None
        _require(bool(noise) and all(isinstance(v, int | float) and 0.0 <= v <= 10.0 for v in noise),
                 f"DataConfig.condition_noise must be a non-empty list of strengths in [0, 10], "
                 f"got {self.condition_noise!r}")
        object.__setattr__(self, "condition_noise", tuple(float(v) for v in noise))


ATTENTION_BACKENDS = ("auto", "sdpa", "flex", "dense")


@dataclass(frozen=True)
class ModelConfig:
    """What the transformer trainer trains."""

    # A pipeline preset name (random initialisation, e.g. "tiny-test") or a model folder in our layout or the
    # official download (fine-tuning; see InfinityStarPipeline.from_pretrained).
    pipeline: str = "tiny-test"
    # With a folder holding several official transformers: which one (official-720p, official-480p, ...).
    pipeline_preset: str | None = None
    # Attention backend of the training forward: "auto" (FlexAttention on CUDA, SDPA on CPU), "sdpa" (SDPA over the
    # visible blocks only), "flex", "dense" (one SDPA with the dense [L, L] mask: the former CPU path, 4-5x the work).
    attention: str = "auto"

    def __post_init__(self) -> None:
        _require(isinstance(self.pipeline, str) and bool(self.pipeline),
                 f"model.pipeline must be a preset name or a folder, got {self.pipeline!r}")
        _require(self.attention in ATTENTION_BACKENDS,
                 f"model.attention must be one of {list(ATTENTION_BACKENDS)}, got {self.attention!r}")


@dataclass(frozen=True)
class TrainingConfig:
    """The transformer run's length, batch and per-sample draws."""

    # Optimizer steps of the whole run (a resumed run continues up to this number).
    steps: int = 1000
    # Samples per step per data-parallel rank, packed into one sequence (global batch = batch_size x ranks).
    batch_size: int = 1
    # Token budget (text + visual) of a packed sequence: samples draw only scale subsets that fit; None = none.
    max_tokens: int | None = None
    # bf16 autocast of the blocks on CUDA (the reference's fp16=2); CPU always trains in float32.
    bf16: bool = True
    # Exponential moving average of the weights, 0 = off (the reference: off; 0.9999 when on).
    ema_decay: float = 0.0
    # Bitwise self-correction: per-scale flip probability drawn from {0, 0.01, ..., strength}.
    bsc_strength: float = 0.3
    # Seed of the model initialisation (presets) and of the per-sample training draws (scale subsets,
    # repetitions, BSC flips); the data order has its own seed, data.seed.
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size"):
            _require(_is_int(getattr(self, name), 1), f"training.{name} must be an int >= 1, got "
                                                       f"{getattr(self, name)!r}")
        _require(self.max_tokens is None or _is_int(self.max_tokens, 1),
                 f"training.max_tokens must be None or a positive int, got {self.max_tokens!r}")
        _require(0 <= self.ema_decay < 1, f"training.ema_decay must be in [0, 1) (0 = off), got {self.ema_decay}")
        _require(0 <= self.bsc_strength <= 1, f"training.bsc_strength must be in [0, 1], got {self.bsc_strength}")
        _require(_is_int(self.seed, -(2**63)), f"training.seed must be an int, got {self.seed!r}")


@dataclass(frozen=True)
class LoRATrainConfig:
    """A LoRA fine-tune (``[lora]``, ``transformer.lora``): with ``enabled`` the base transformer stays frozen (its
    weights are never written: checkpoints hold the adapter and its optimizer state only) and one adapter of
    ``rank``/``alpha``/``dropout`` on the ``targets`` layers trains; ``infinitystar export`` then writes the adapter
    folder (PEFT's layout) that ``pipe.load_lora_weights`` and ``--lora`` load. ``targets``: ``attention``, ``mlp``,
    ``heads`` or regular expressions over module names."""

    enabled: bool = False
    # The adapter's shape, with LoRAConfig's defaults (one place for them).
    rank: int = LoRAConfig.rank
    alpha: float = LoRAConfig.alpha
    dropout: float = LoRAConfig.dropout
    targets: tuple[str, ...] = LoRAConfig.targets

    def __post_init__(self) -> None:
        targets = (self.targets,) if isinstance(self.targets, str) else tuple(self.targets)
        object.__setattr__(self, "targets", targets)
        try:
            self.adapter()
        except ValueError as err:
            raise ConfigError(f"lora: {err}") from None

    def adapter(self) -> LoRAConfig:
        return LoRAConfig(rank=self.rank, alpha=float(self.alpha), dropout=float(self.dropout), targets=self.targets)


@dataclass(frozen=True)
class TrainConfig:
    """One transformer training run (``infinitystar train CONFIG``; ``train/trainer.py``).

    Defaults are the released fine-tuning scripts' (training spec sections 5 and 9): AdamW with lr
    4e-5, betas (0.9, 0.97), eps 1e-8, no weight decay, constant LR without warmup, gradient clip 5,
    bf16 autocast on CUDA with fp32 master weights, per-block activation checkpointing, no EMA,
    bitwise self-correction strength 0.3 and the scale-subset table of the script for the pipeline's pixel
    budget (720p for pn 0.90M, else 480p). Condition (caption) dropout is a data setting: ``data.cond_dropout``.
    """

    # Run folder: train_config.json, train_log.jsonl, checkpoints/step_XXXXXXXX.
    out_dir: str = "runs/train"
    model: ModelConfig = field(default_factory=ModelConfig)
    # Records, latent cache, captions, clip durations; fps, buckets and pyramids are model.pipeline's.
    data: DataConfig = field(default_factory=DataConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    # Loss weights per scale (reweight_loss_by_scale=4, max_reweight_value=40 in the scripts).
    loss: LossWeighting = field(default_factory=LossWeighting)
    # Scale subsets ("outcomes"): var_len = false trains every scale of every sample. The default table needs the
    # official pyramids; small presets whose clips have fewer scales than the table names get only outcome 0
    # (the first-frame pyramid), so train them with var_len = false. var_len_prob None = the release script's
    # table for the pipeline's pn (720p's at 0.90M, else 480p's; train.scale_subsets.var_len_prob_for).
    scale_subsets: ScaleSubsetConfig = field(default_factory=lambda: ScaleSubsetConfig(var_len_prob=None))
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    parallelism: ParallelismConfig = field(default_factory=ParallelismConfig)
    # A LoRA fine-tune instead of training every weight (off by default).
    lora: LoRATrainConfig = field(default_factory=LoRATrainConfig)

    def __post_init__(self) -> None:
        _check_sections(self)
        _require(isinstance(self.out_dir, str) and bool(self.out_dir),
                 f"out_dir must be a non-empty path, got {self.out_dir!r}")
        _require(not (self.lora.enabled and self.training.ema_decay > 0),
                 "training.ema_decay with lora.enabled: an EMA of the adapter is not supported (set ema_decay = 0)")


# ----------------------------------------------------------------------------------------------
# VAE training
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class VAEModelConfig:
    """The VAE to train and which of its parts learn."""

    # Architecture: a VAE preset name ("tiny-test", "official", ...). None = the architecture stored in
    # ``init_checkpoint`` (the official preset for the official .pth).
    vae_preset: str | None = None
    # Weights to start from (our safetensors export or the official .pth); None = random initialisation.
    init_checkpoint: str | None = None
    # Train only the decoder side (decoder + proj_up); the encoder, proj_down and the latent scale stay frozen,
    # so the latents and bit labels -- and a transformer trained on them -- are unchanged. For fine-tuning a
    # decoder on longer clips than the VAE was trained on (the demo recipe's second VAE stage).
    train_decoder_only: bool = False
    # Convolution weights/activations in channels_last_3d memory layout (faster oneDNN kernels on CPU).
    channels_last: bool = True

    def __post_init__(self) -> None:
        _require(self.vae_preset is not None or self.init_checkpoint is not None,
                 "model: set vae_preset (e.g. 'tiny-test') or init_checkpoint")
        if self.vae_preset is not None:
            get_preset("vae", self.vae_preset)  # raises with the list of presets


# Bounds of a VAE training clip, checked when the config is read: the reference trains its tokenizer at up to 720p
# on 5 s clips; 2048 px and 257 frames leave room for more while refusing typos (65536 x 65536 would be hundreds
# of GiB per clip) before any data is read.
MAX_VAE_CLIP_SIDE = 2048
MAX_VAE_CLIP_FRAMES = 257


@dataclass(frozen=True)
class VAEDataConfig:
    """Training and held-out media and the clip shape.

    ``paths`` / ``eval_paths``: any mix of folders (scanned recursively for videos, images and .npy clips),
    .jsonl files in the reference format (records with `video_path` or `image_path`, relative to the jsonl),
    .txt lists (one path per line) and single media files. ``paths`` may be empty only when the Python API is
    given a dataset object instead (``train_vae(config, dataset=...)``).
    """

    paths: tuple[str, ...] = ()
    # Held-out media (same forms) for the evaluation PSNR; empty = no evaluation.
    eval_paths: tuple[str, ...] = ()
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

    def __post_init__(self) -> None:
        for name in ("paths", "eval_paths"):
            value = getattr(self, name)
            value = (value,) if isinstance(value, str) else tuple(value)
            object.__setattr__(self, name, value)
            _require(all(isinstance(p, str) and p for p in value),
                     f"data.{name} must be a list of non-empty path strings, got {list(value)}")
        _require(_is_int(self.num_frames, 1) and (self.num_frames - 1) % 4 == 0,
                 f"data.num_frames must be 1 + 4k (1, 5, 9, 13, 17, ...), got {self.num_frames!r}")
        _require(_is_number(self.fps) and self.fps > 0, f"data.fps must be a number > 0, got {self.fps!r}")
        for name in ("height", "width"):
            v = getattr(self, name)
            _require(_is_int(v, 16) and v % 16 == 0 and v <= MAX_VAE_CLIP_SIDE,
                     f"data.{name} must be a multiple of 16 in 16..{MAX_VAE_CLIP_SIDE}, got {v!r}")
        _require(self.num_frames <= MAX_VAE_CLIP_FRAMES,
                 f"data.num_frames must be at most {MAX_VAE_CLIP_FRAMES}, got {self.num_frames}")
        _require(_is_int(self.eval_clips, 1), f"data.eval_clips must be an int >= 1, got {self.eval_clips!r}")
        _require(_is_int(self.eval_every, 0), f"data.eval_every must be an int >= 0, got {self.eval_every!r}")


@dataclass(frozen=True)
class VAETrainingConfig:
    """The VAE run's length, batch and seed."""

    # batch_size >= 2 matters on CPU: PyTorch only uses its fast (oneDNN) 3-D convolution for small inputs when
    # the batch has more than one sample (measured ~4x faster per sample).
    steps: int = 1000
    batch_size: int = 4
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size"):
            _require(_is_int(getattr(self, name), 1), f"training.{name} must be an int >= 1, got "
                                                       f"{getattr(self, name)!r}")
        _require(_is_int(self.seed, 0), f"training.seed must be an int >= 0, got {self.seed!r}")


@dataclass(frozen=True)
class VAELossConfig:
    """Loss weights. Pixel terms are on [-1, 1] pixels, averaged over every element."""

    l1_weight: float = 1.0
    l2_weight: float = 0.0
    # Sparse scenes (a small object on a dark background, as the demo's clips): pixels whose brightest channel
    # is above `foreground_threshold` ([-1, 1] scale) weigh 1 + foreground_weight in the L1/L2 terms, so the
    # few object pixels are not drowned by the background (0 = off, every pixel weighs 1).
    foreground_weight: float = 0.0
    foreground_threshold: float = -0.9
    # Structural "perceptual" term: (1 - SSIM) over an image pyramid + image/time-gradient L1.
    perceptual_weight: float = 0.1
    # BSQ terms, averaged over the quantization steps (only with quantizer.enabled).
    commitment_weight: float = 0.25
    entropy_weight: float = 0.1

    def __post_init__(self) -> None:
        for name in ("l1_weight", "l2_weight", "foreground_weight", "perceptual_weight", "commitment_weight",
                     "entropy_weight"):
            _require(_is_number(getattr(self, name)), f"loss.{name} must be a number >= 0, got "
                                                       f"{getattr(self, name)!r}")
        _require(self.l1_weight + self.l2_weight + self.perceptual_weight > 0,
                 "loss: l1_weight, l2_weight and perceptual_weight are all 0 (no reconstruction loss)")
        _require(_is_number(self.foreground_threshold, -1.0) and self.foreground_threshold < 1,
                 f"loss.foreground_threshold must be in [-1, 1), got {self.foreground_threshold!r}")


@dataclass(frozen=True)
class DiscriminatorConfig:
    """The hinge-loss PatchGAN: the generator term's weight (0 = off, no discriminator is built), its start step
    and the discriminator's own learning rate and size."""

    weight: float = 0.0
    start_step: int = 0
    lr: float | None = None  # None = optimizer.lr (it follows the same schedule)
    channels: int = 64
    layers: int = 3

    def __post_init__(self) -> None:
        _require(_is_number(self.weight), f"discriminator.weight must be a number >= 0, got {self.weight!r}")
        _require(_is_int(self.start_step, 0), f"discriminator.start_step must be an int >= 0, got "
                                               f"{self.start_step!r}")
        _require(self.lr is None or (_is_number(self.lr) and self.lr > 0),
                 f"discriminator.lr must be > 0, got {self.lr!r}")
        for name in ("channels", "layers"):
            _require(_is_int(getattr(self, name), 1), f"discriminator.{name} must be an int >= 1, got "
                                                       f"{getattr(self, name)!r}")


QUANT_GRADIENTS = ("identity", "residual")


@dataclass(frozen=True)
class VAEQuantizerConfig:
    """The multi-scale BSQ between encoder and decoder during training."""

    # Decode the multi-scale BSQ summed codes instead of the continuous latent (straight-through), so the
    # decoder learns to decode what the transformer generates.
    enabled: bool = True
    # Semantic/detail bit widths and threshold of the quantizer (a "quantizer" preset).
    preset: str = "tiny-test"
    # Repetitions per scale of a clip pyramid ('[2,2,1,1]', '[3]*12+[2,1,1]' or a list); None = 1 each.
    repetition: str | tuple[int, ...] | None = None
    # Gradient of the quantizer: "identity" (straight through the whole multi-scale quantizer, as VAR) or
    # "residual" (straight through each step's BSQ, through its l2 normalisation, as the reference's BSQ).
    gradient: str = "identity"
    # Latent frames per clip pyramid after the first frame (the pipeline's frames_inner_clip: 20 official, 8 demo).
    frames_inner_clip: int = 20

    def __post_init__(self) -> None:
        get_preset("quantizer", self.preset)  # raises with the list of presets
        if self.repetition is not None and not isinstance(self.repetition, str):
            object.__setattr__(self, "repetition", tuple(int(r) for r in self.repetition))
        _require(self.gradient in QUANT_GRADIENTS,
                 f"quantizer.gradient must be one of {list(QUANT_GRADIENTS)}, got {self.gradient!r}")
        _require(_is_int(self.frames_inner_clip, 1),
                 f"quantizer.frames_inner_clip must be an int >= 1, got {self.frames_inner_clip!r}")


@dataclass(frozen=True)
class VAETrainConfig:
    """Training or fine-tuning the video VAE (``infinitystar train-vae CONFIG``; ``train/vae_trainer.py``).

    The reference never released its tokenizer training code (vae spec 7); the loss structure and the
    default weights below follow what its code does contain: an L1 reconstruction term, the BSQ
    commitment (0.25) and entropy (0.1) terms, Adam with betas (0.9, 0.95), lr 1e-4, gradient clip 1.0,
    a hinge-loss PatchGAN. LPIPS (which needs downloaded VGG weights) is replaced by a structural
    term that needs no download (see ``train/vae_losses.structural_loss``).

    Relative paths in a config *file* are resolved against that file's folder (``load_config``).
    """

    # Run folder: train_config.json, train_log.jsonl, checkpoints/, the final vae.safetensors.
    out_dir: str = "outputs/vae-train"
    model: VAEModelConfig = field(default_factory=VAEModelConfig)
    data: VAEDataConfig = field(default_factory=VAEDataConfig)
    optimizer: OptimizerConfig = field(default_factory=lambda: OptimizerConfig(
        lr=1e-4, betas=(0.9, 0.95), grad_clip=1.0, min_lr_ratio=0.1))
    training: VAETrainingConfig = field(default_factory=VAETrainingConfig)
    loss: VAELossConfig = field(default_factory=VAELossConfig)
    discriminator: DiscriminatorConfig = field(default_factory=DiscriminatorConfig)
    quantizer: VAEQuantizerConfig = field(default_factory=VAEQuantizerConfig)
    checkpoint: CheckpointConfig = field(default_factory=lambda: CheckpointConfig(every=500, keep_last_k=2))
    logging: LoggingConfig = field(default_factory=lambda: LoggingConfig(every=10))
    parallelism: ParallelismConfig = field(default_factory=lambda: ParallelismConfig(device="cpu"))

    # Paths of a config file that are relative to the file's folder (see load_config).
    FILE_RELATIVE_PATHS: typing.ClassVar[tuple[str, ...]] = ("out_dir", "model.init_checkpoint", "data.paths",
                                                             "data.eval_paths")

    def __post_init__(self) -> None:
        _check_sections(self)
        _require(isinstance(self.out_dir, str) and bool(self.out_dir),
                 f"out_dir must be a non-empty path, got {self.out_dir!r}")


# ----------------------------------------------------------------------------------------------
# Building from plain data and files
# ----------------------------------------------------------------------------------------------


def _section_types(cls: type) -> dict[str, type]:
    """``{field name: dataclass type}`` of the fields of ``cls`` that are sections."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls) if dataclasses.is_dataclass(hints[f.name])}


def _check_sections(config: Any) -> None:
    for name, kind in _section_types(type(config)).items():
        value = getattr(config, name)
        _require(isinstance(value, kind), f"{name} must be a {kind.__name__} section, got {value!r}")


def _check_keys(cls: type, data: Any, where: str) -> None:
    if not isinstance(data, dict):
        raise ConfigError(f"{where or cls.__name__} must be a table/object, got {data!r}")
    names = {f.name for f in dataclasses.fields(cls)}
    for key, reason in getattr(cls, "MOVED_FIELDS", {}).items():
        dotted = f"{where}.{key}" if where else key
        _require(key not in data, f"{dotted} is no longer a {cls.__name__} setting: {reason}")
    unknown = sorted(set(data) - names)
    if unknown:
        shown = [f"{where}.{k}" if where else k for k in unknown]
        raise ConfigError(f"unknown {cls.__name__} fields {shown}; valid fields: {sorted(names)}")


def config_from_dict(cls: type[C], data: dict[str, Any], where: str = "") -> C:
    """Build ``cls`` from plain data (one dict per section); unknown keys are rejected with their dotted path.

    A section left out, or a key a section's table leaves out, keeps the run kind's default (the VAE's optimizer
    defaults are not the transformer's)."""
    _check_keys(cls, data, where)
    sections = _section_types(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    values = dict(data)
    for name in set(data) & set(sections):
        inner = f"{where}.{name}" if where else name
        factory = fields[name].default_factory
        if factory is sections[name]:
            values[name] = config_from_dict(sections[name], data[name], inner)
        else:
            _check_keys(sections[name], data[name], inner)
            try:
                values[name] = dataclasses.replace(factory(), **data[name])  # type: ignore[misc]
            except TypeError as err:
                raise ConfigError(f"{inner}: {err}") from None
    try:
        return cls(**values)
    except TypeError as err:  # e.g. a value of the wrong kind reaching __post_init__
        raise ConfigError(f"{where or cls.__name__}: {err}") from None


def config_to_dict(config: Any) -> dict[str, Any]:
    """Plain data (nested dicts) of a config; :func:`config_from_dict` reads it back."""
    return dataclasses.asdict(config)


def read_config_file(path: str | Path) -> dict[str, Any]:
    """The table of a ``.toml`` or ``.json`` file; a missing file, a parse error or another suffix is one clear
    error naming the file."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"config file {p} does not exist")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(f"config file {p} is not UTF-8 text (byte {err.start} is not): give a .toml or .json "
                          "file") from None
    suffix = p.suffix.lower()
    try:
        if suffix == ".toml":
            data = tomllib.loads(text)
        elif suffix == ".json":
            data = json.loads(text)
        else:
            raise ConfigError(f"config file {p} must end in .toml or .json")
    except (tomllib.TOMLDecodeError, json.JSONDecodeError) as err:
        raise ConfigError(f"{p} is not valid {suffix[1:].upper()}: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: the top level must be a table/object, got {type(data).__name__}")
    return data


def _resolve_relative(data: dict[str, Any], dotted: str, base: Path) -> None:
    *sections, key = dotted.split(".")
    table = data
    for name in sections:
        table = table.get(name)
        if not isinstance(table, dict):
            return
    value = table.get(key)
    if isinstance(value, str) and key.endswith("paths"):
        value = [value]

    def resolve(v: Any) -> Any:
        return v if not isinstance(v, str) or Path(v).is_absolute() else str(base / v)

    if isinstance(value, list):
        table[key] = [resolve(v) for v in value]
    elif value is not None:
        table[key] = resolve(value)


def load_config(cls: type[C], path: str | Path, overrides: dict[str, Any] | None = None) -> C:
    """Read ``cls`` (:class:`TrainConfig` or :class:`VAETrainConfig`) from a TOML or JSON file.

    ``overrides`` replace single fields by dotted name (``{"training.steps": 10, "out_dir": "runs/x"}``). Paths
    named in the class's ``FILE_RELATIVE_PATHS`` are resolved against the file's folder.
    """
    p = Path(path)
    data = read_config_file(p)
    for dotted in getattr(cls, "FILE_RELATIVE_PATHS", ()):
        _resolve_relative(data, dotted, p.resolve().parent)
    for dotted, value in (overrides or {}).items():
        *sections, key = dotted.split(".")
        table = data
        for name in sections:
            table = table.setdefault(name, {})
        table[key] = value
    try:
        return config_from_dict(cls, data)
    except ConfigError as err:
        raise ConfigError(f"{p}: {err}") from None


def with_overrides(config: C, overrides: dict[str, Any]) -> C:
    """A copy of ``config`` with fields replaced by dotted name (validated again by their sections)."""
    for dotted, value in overrides.items():
        config = _replace_path(config, dotted.split("."), value)
    return config


def _replace_path(config: Any, path: list[str], value: Any) -> Any:
    head, *rest = path
    new = value if not rest else _replace_path(getattr(config, head), rest, value)
    return dataclasses.replace(config, **{head: new})


__all__ = [
    "CheckpointConfig",
    "DataConfig",
    "DiscriminatorConfig",
    "LoggingConfig",
    "ModelConfig",
    "OptimizerConfig",
    "ParallelismConfig",
    "TrainConfig",
    "TrainingConfig",
    "VAEDataConfig",
    "VAELossConfig",
    "VAEModelConfig",
    "VAEQuantizerConfig",
    "VAETrainConfig",
    "VAETrainingConfig",
    "config_from_dict",
    "config_to_dict",
    "load_config",
    "read_config_file",
    "with_overrides",
]

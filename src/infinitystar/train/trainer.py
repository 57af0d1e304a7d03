"""The transformer training loop (``infinitystar train CONFIG``) and the export of a run.

One process (CPU or one GPU)::

    infinitystar train configs/train_tiny.toml

Several processes on one machine (FSDP2 over all of them; gloo on CPU, nccl on CUDA)::

    torchrun --standalone --nproc_per_node 2 -m infinitystar.cli train configs/train_tiny.toml

A killed run continues from its newest complete checkpoint when started again with the same
command (``--resume auto``, the default). ``infinitystar export RUN_DIR OUT_DIR`` turns a run into a
pipeline folder that ``InfinityStarPipeline.from_pretrained`` loads.

What one step does, per data-parallel rank (training spec sections 3-6):

1. take ``batch_size`` samples (cached latent, schedule, caption, condition-dropout flag) from the
   rank's shard of :class:`~infinitystar.train.dataset.LatentDataset`;
2. encode the captions with the pipeline's *frozen* text encoder (Flan-T5 as in the reference; the
   byte-level encoder of the small presets is frozen too: it is a fixed random code of full rank per
   byte and position, the transformer's ``text_proj`` and attention learn everything on top of it,
   the trained model stays the only module under FSDP and the exported encoder is the base one);
3. per sample, draw its scale subset, repetitions and bitwise self-correction flips from a generator
   seeded by ``(seed, step, global sample index)`` and tokenize it (``train.step.prepare_packed_batch``),
   then pack all samples into one sequence and run ``train.step.train_step`` (bf16 autocast on CUDA,
   fp32 on CPU; global-norm gradient clipping; AdamW);
4. log the loss and bit accuracy, per scale too, to the console (tqdm) and ``train_log.jsonl``;
5. every ``checkpoint.every`` steps and at the end, write a DCP checkpoint (``train.checkpointing``).

Determinism: every random draw of a step is a function of the seeds, the step and the sample's index
in the global batch, and the data order of ``(data.seed, epoch)``; none depends on the world size or
on where a run was resumed. With the loss of every rank scaled by ``dp_size * W_rank / W_global``
(``W`` = summed scale weights), the data-parallel mean of the gradients equals the gradient of one
packed step over the global batch, so ``N`` processes with ``batch_size = B`` train the same model as
one process with ``batch_size = N * B`` (up to float rounding).
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
import sys
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from infinitystar.config import ConfigError, PipelineConfig, get_preset
from infinitystar.fileio import atomic_write_json, make_folder
from infinitystar.generation.schedules import (
    latent_frames,
    pixel_frames,
    scale_repetitions,
    scales_per_clip,
)
from infinitystar.pipeline import InfinityStarPipeline
from infinitystar.train import checkpointing, runlog
from infinitystar.train.config import TrainConfig, config_from_dict, config_to_dict
from infinitystar.train.data import caption_words, resolve_jsonl_files
from infinitystar.train.dataset import TRAIN_TASKS, LatentDataset
from infinitystar.train.distributed import (
    DistInfo,
    all_reduce_sum,
    apply_activation_checkpointing,
    apply_fsdp,
    gather_objects,
    init_distributed,
    mixed_precision_policy,
    rank_seed,
    seed_process,
)
from infinitystar.train.ema import EMA
from infinitystar.train.features import feature_tag, vae_identity
from infinitystar.train.loss import LossWeighting, raw_scale_weights
from infinitystar.train.scale_subsets import ScaleSubsetConfig, outcome_table
from infinitystar.train.step import TrainSample, make_optimizer, prepare_packed_batch, train_step
from infinitystar.train.tasks import given_prefix_sample, interactive_turn_sample
from infinitystar.transformer.lora import add_adapter, base_identity, save_adapter

# ----------------------------------------------------------------------------------------------
# Small pure pieces
# ----------------------------------------------------------------------------------------------


# The adapter of a LoRA run (one per run; pipe.load_lora_weights names it anew when it is loaded).
ADAPTER_NAME = "default"


def sample_generator(seed: int, step: int, global_index: int) -> torch.Generator:
    """The generator of one sample's training draws: a function of (seed, step, index in the global batch) only."""
    digest = hashlib.sha256(f"train\0{seed}\0{step}\0{global_index}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))


def sample_weight_mass(sample: TrainSample, weighting: LossWeighting) -> float:
    """Sum of the raw (un-normalised) loss weights of a sample's trained scales."""
    counts = [math.prod(sample.schedule[i]) for i in sample.scale_ids if i >= sample.loss_from]  # given: no loss
    full = [math.prod(sample.schedule[-1])] * len(counts)
    return float(sum(raw_scale_weights(counts, full, weighting)))


def latent_seconds(schedule: Sequence[Sequence[int]], time_stride: int = 4, fps: int = 16) -> float:
    """Duration of a schedule's clip in seconds ((latent frames - 1) * stride / fps), for the per-scale log keys."""
    k = scales_per_clip(schedule)
    frames = sum(int(schedule[c + k - 1][0]) for c in range(0, len(schedule), k))
    return (pixel_frames(frames, time_stride) - 1) / fps


# ----------------------------------------------------------------------------------------------
# Building the pieces
# ----------------------------------------------------------------------------------------------


def load_base_pipeline(cfg: TrainConfig):
    """The pipeline a run starts from: a model folder (fine-tuning) or a preset with seeded random weights."""
    model = cfg.model
    if Path(model.pipeline).is_dir():
        # float32 weights whatever the host prefers for inference (a CPU with native bf16 would otherwise load bf16
        # blocks): training keeps fp32 master weights and autocasts (training.bf16 on CUDA).
        return InfinityStarPipeline.from_pretrained(model.pipeline, preset=model.pipeline_preset, precision="fp32")
    get_preset("pipeline", model.pipeline)  # a clear error listing the presets if neither folder nor preset
    return InfinityStarPipeline.from_preset(model.pipeline, seed=cfg.training.seed)


def scale_subset_config(cfg: TrainConfig, pipe_cfg: PipelineConfig) -> ScaleSubsetConfig:
    """The run's scale-subset settings; without an explicit ``var_len_prob``, the release script's table for the
    pipeline's pixel budget (a 720p fine-tune gets train_720p.sh's, not the 480p one)."""
    subsets = cfg.scale_subsets.for_pn(pipe_cfg.pn)
    if subsets.var_len:
        _check_table_covers_longest_clip(cfg, pipe_cfg, subsets)
    return subsets


def _check_table_covers_longest_clip(cfg: TrainConfig, pipe_cfg: PipelineConfig, subsets: ScaleSubsetConfig) -> None:
    """Fail at the start, not at the first long sample: the table needs one probability per outcome of the longest
    schedule the data makes (a 10 s clip has 11 outcomes; the 720p table, like the reference's, has 7)."""
    d = cfg.data
    latents = latent_frames(1 + d.max_seconds * pipe_cfg.fps, pipe_cfg.vae.time_stride)
    pyramids = 1 + -(-(latents - 1) // pipe_cfg.frames_inner_clip)  # the first frame, then whole or partial clips
    if pyramids < 2:
        return
    scales_per_clip = pipe_cfg.scales_per_clip
    need = len(outcome_table(pyramids * scales_per_clip, scales_per_clip, subsets.drop_720p_last_scale))
    if len(subsets.var_len_prob) < need:
        raise ConfigError(f"scale_subsets.var_len_prob has {len(subsets.var_len_prob)} entries but {d.max_seconds} "
                          f"s clips (data.max_seconds) have {need} scale-subset outcomes: lower max_seconds or give "
                          f"a var_len_prob with {need} entries")


def _text_encoder_to(encoder: Any, device: torch.device) -> None:
    if isinstance(encoder, nn.Module):
        encoder.to(device).eval().requires_grad_(False)
    elif isinstance(getattr(encoder, "model", None), nn.Module):
        dtype = torch.float16 if device.type == "cuda" else torch.float32
        encoder.model.to(device=device, dtype=dtype).eval().requires_grad_(False)


def load_run_config(run_dir: str | os.PathLike) -> TrainConfig:
    return config_from_dict(TrainConfig, runlog.read_config(run_dir))

# ----------------------------------------------------------------------------------------------
# The trainer
# ----------------------------------------------------------------------------------------------


@dataclass
class TrainResult:
    """What a finished (or stopped) run reports: its folder, the step reached and the logged losses."""

    run_dir: Path
    step: int
    losses: dict[int, float] = field(default_factory=dict)
    samples_per_s: float = float("nan")
    tokens_per_s: float = float("nan")
    resumed_from: int | None = None


class Trainer:
    """Holds the model, optimizer, data stream and run folder of one training run; :meth:`run` trains.

    ``resume``: ``"auto"`` (newest complete checkpoint of the run folder, if any), ``"none"`` (start fresh;
    existing checkpoints are kept and later overwritten step by step), or a checkpoint folder.
    ``dataset`` replaces the :class:`~infinitystar.train.dataset.LatentDataset` built from ``cfg.data``
    (anything with ``iterate(start)``, ``state_dict(position)`` and ``resume_position(state)``).
    """

    def __init__(self, cfg: TrainConfig, *, resume: str = "auto", progress: bool = True,
                 info: DistInfo | None = None, dataset: Any = None) -> None:
        self.cfg = cfg
        self.info = info if info is not None else init_distributed(cfg.parallelism.device)
        self.progress = progress and self.info.is_main
        self.run_dir = Path(cfg.out_dir)
        self.ckpt_dir = self.run_dir / runlog.CHECKPOINT_DIR
        self.log_path = self.run_dir / runlog.LOG_FILE
        info = self.info
        seed_process(rank_seed(cfg.training.seed, info.dp_rank))

        pipe = load_base_pipeline(cfg)
        self.pipe_cfg = pipe.config
        self.device = info.device
        self.text_encoder = pipe.text_encoder
        _text_encoder_to(self.text_encoder, self.device)
        vae = pipe.vae
        model = pipe.transformer
        del pipe
        # A LoRA run: the adapter is the only trainable part; the base stays frozen and is never written.
        self.lora = cfg.lora.enabled
        if self.lora:
            add_adapter(model, cfg.lora.adapter(), ADAPTER_NAME)
        self.model = self._parallelize(model)
        opt = cfg.optimizer
        self.optimizer = make_optimizer(self.model, lr=opt.lr_at(0, cfg.training.steps), betas=opt.betas,
                                        weight_decay=opt.weight_decay, eps=opt.eps)
        self.ema = EMA(self.model, cfg.training.ema_decay) if cfg.training.ema_decay > 0 else None
        self.weighting: LossWeighting = cfg.loss
        self.subsets = scale_subset_config(cfg, self.pipe_cfg)
        cuda = self.device.type == "cuda"
        self.autocast_dtype = torch.bfloat16 if cfg.training.bf16 and cuda else None
        attention = cfg.model.attention
        self.backend = attention if attention != "auto" else ("flex" if cuda else "sdpa")
        self.dataset = dataset if dataset is not None else self._build_dataset(vae)
        del vae

        self.step = 0
        self.position: Any = None
        self.resumed_from: int | None = None
        # Which checkpoint, checked before anything is written: a bad --resume leaves the run folder untouched.
        resume_from, skipped = checkpointing.resume_checkpoint(self.ckpt_dir, resume)
        if info.is_main:
            make_folder(self.run_dir, "run folder (out_dir)")
            runlog.write_config(self.run_dir, config_to_dict(cfg))
            runlog.report_skipped_checkpoints(skipped)
        self._resume(resume_from, skipped)

    # -- construction helpers ----------------------------------------------------------------------

    def _parallelize(self, model: nn.Module) -> nn.Module:
        """Train mode, activation checkpointing, device, then FSDP2 over the dp mesh when there are several ranks."""
        cfg, info = self.cfg, self.info
        model.train()
        if not self.lora:  # (a LoRA run keeps the requires_grad add_adapter set: the adapter only)
            model.requires_grad_(True)
        if cfg.parallelism.activation_checkpointing:
            apply_activation_checkpointing(model)
        model.to(self.device)
        if info.distributed:
            bf16_params = cfg.parallelism.fsdp_bf16_params and self.device.type == "cuda"
            apply_fsdp(model, info.mesh, mixed_precision_policy(torch.bfloat16 if bf16_params else None))
        return model

    def _build_dataset(self, vae: nn.Module) -> Any:
        # Only latents extracted with *this* pipeline's VAE (and the configured posterior mode) are used.
        tag = feature_tag(vae_identity(vae), self.cfg.data.latent_sampling, self.cfg.data.seed)
        return LatentDataset(self.cfg.data, self.pipe_cfg, rank=self.info.dp_rank, world_size=self.info.dp_size,
                             feature_tag=tag)

    def _resume(self, path: Path | None, skipped: list[tuple[Path, str]]) -> None:
        if path is None:
            return
        record = checkpointing.load_checkpoint(path, self.info, self.model, self.optimizer,
                                               ema=self.ema.state_dict() if self.ema is not None else None,
                                               trainable_only=self.lora)
        self.step = int(record["step"])
        self.resumed_from = self.step
        state = record["data_position"]
        self.position = self.dataset.resume_position(state) if state is not None else None
        self._log({"event": "resume", "step": self.step, "checkpoint": str(path),
                   "skipped": [{"checkpoint": str(p), "reason": why} for p, why in skipped]})

    # -- logging -----------------------------------------------------------------------------------

    def _log(self, record: dict[str, Any]) -> None:
        if self.info.is_main:
            runlog.append_record(self.log_path, record)

    # -- one step ----------------------------------------------------------------------------------

    def _encode_texts(self, captions: list[str]) -> list[torch.Tensor]:
        with torch.no_grad():
            feats = self.text_encoder(captions).split()
        return [t.to(self.device, torch.float32) for t in feats]

    def _prepare(self, batch: list[Any], step: int) -> tuple[list[TrainSample], list[bool], int]:
        """Tokenized samples, their dropout flags, and how many samples the token budget left out."""
        info, run = self.info, self.cfg.training
        texts = self._encode_texts([s.caption for s in batch])
        global_batch = run.batch_size * info.dp_size
        remaining = run.max_tokens
        out, uncond, left_out = [], [], 0
        for k, (ds, text) in enumerate(zip(batch, texts)):
            if remaining is not None and remaining - int(text.shape[0]) < math.prod(ds.schedule[0]):
                left_out += 1
                continue
            gen = sample_generator(run.seed, step, step * global_batch + info.dp_rank * run.batch_size + k)
            sample = self._tokenize(ds, text, gen, remaining)
            if sample is None:
                left_out += 1
                continue
            out.append(sample)
            uncond.append(bool(ds.drop_text))
            if remaining is not None:
                remaining -= sample.visual_tokens + int(text.shape[0])
        return out, uncond, left_out

    def _tokenize(self, ds: Any, text: torch.Tensor, gen: torch.Generator, budget: int | None) -> TrainSample | None:
        """The training sample of data sample ``ds`` for its task (``train.tasks``); None when the tokens of an
        image-to-video, extension or interactive sample (always whole) exceed the token ``budget``."""
        run, pipe_cfg = self.cfg.training, self.pipe_cfg
        latent = ds.latent_CTHW[None].to(self.device, torch.float32)
        reps = scale_repetitions(ds.schedule, pipe_cfg.image_repetition, pipe_cfg.video_repetition)
        task = getattr(ds, "task", "text-to-video")
        if task == "text-to-video":
            [sample] = prepare_packed_batch(
                [latent], [text], [ds.schedule], [reps], pipe_cfg.quantizer, self.subsets, gen,
                max_tokens=budget, bsc_strength=run.bsc_strength, frames_inner_clip=pipe_cfg.frames_inner_clip)
            return sample
        if task in ("image-to-video", "video-extension"):
            sample = given_prefix_sample(latent, text, ds.schedule, reps, pipe_cfg.quantizer,
                                         ds.given_clips if task == "video-extension" else 0, gen,
                                         bsc_strength=run.bsc_strength, frames_inner_clip=pipe_cfg.frames_inner_clip)
        elif task == "interactive":
            pyramid = ds.schedule[:scales_per_clip(ds.schedule)]
            sample = interactive_turn_sample(latent, ds.turn, text, pipe_cfg, pyramid, gen,
                                             bsc_strength=run.bsc_strength,
                                             condition_noise=self.cfg.data.condition_noise,
                                             condition_codes_prob=self.cfg.data.condition_codes_prob)
        else:
            raise ValueError(f"unknown training task {task!r}")
        tokens = sample.visual_tokens + sum(block.tokens for block, _ in sample.conditions) + int(text.shape[0])
        return None if budget is not None and tokens > budget else sample

    def train_one_step(self, batch: list[Any]) -> dict[str, Any]:
        """Train on this rank's ``batch`` (a list of data samples) and return the step's global log record."""
        cfg, info, step = self.cfg, self.info, self.step
        t0 = time.perf_counter()
        lr = cfg.optimizer.lr_at(step, cfg.training.steps)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        samples, uncond, left_out = self._prepare(batch, step)
        mass = sum(sample_weight_mass(s, self.weighting) for s in samples)
        # Every rank learns whether any rank is left without a sample, so all stop together instead of hanging.
        total_mass, empty_ranks = all_reduce_sum([mass, float(not samples)], info)
        if empty_ranks:
            raise ValueError(f"step {step}: the token budget training.max_tokens={cfg.training.max_tokens} leaves "
                             f"room for no sample "
                             f"on {int(empty_ranks)} rank(s); raise it above the longest caption plus the first "
                             f"scale")
        metrics = train_step(self.model, self.optimizer, samples, self.weighting, grad_clip=cfg.optimizer.grad_clip,
                             backend=self.backend, autocast_dtype=self.autocast_dtype, uncond=uncond,
                             loss_scale=info.dp_size * mass / total_mass)
        if self.ema is not None:
            self.ema.update(self.model)
        text_tokens = sum(int(s.text.shape[0]) for s in samples)
        tasks = [sum(getattr(ds, "task", "text-to-video") == t for ds in batch) for t in TRAIN_TASKS]
        sums = all_reduce_sum([mass * metrics.loss, mass * metrics.acc, len(samples), metrics.visual_tokens,
                               text_tokens, sum(uncond), left_out, *tasks], info)
        per_scale = self._per_scale(samples, metrics.per_scale)
        self.step = step + 1
        dt = time.perf_counter() - t0
        tokens = sums[3] + sums[4]
        return {
            "event": "step", "step": self.step, "loss": sums[0] / total_mass, "acc": sums[1] / total_mass,
            "grad_norm": metrics.grad_norm, "lr": lr, "samples": int(sums[2]), "visual_tokens": int(sums[3]),
            "text_tokens": int(sums[4]), "uncond": int(sums[5]), "left_out_for_budget": int(sums[6]),
            "seq_len": metrics.seq_len, "step_time_s": dt, "samples_per_s": sums[2] / dt, "tokens_per_s": tokens / dt,
            "tasks": {t: int(n) for t, n in zip(TRAIN_TASKS, sums[7:]) if n},  # the batch's samples per task
            "per_scale": per_scale,
        }

    def _per_scale(self, samples: list[TrainSample], rows: list[tuple]) -> dict[str, dict[str, float]]:
        """Loss and accuracy per (clip duration, scale index), averaged over the global batch (interactive turns
        under ``turn/``; given scales have no loss and no row)."""
        local = []
        for b, si, scale, loss, acc, _w in rows:
            if samples[b].conditions:  # an interactive turn: its own schedule, logged apart
                local.append((f"turn/s{si:03d}", loss, acc, list(scale)))
                continue
            seconds = latent_seconds(samples[b].schedule, self.pipe_cfg.vae.time_stride, self.pipe_cfg.fps)
            local.append((f"t{seconds:04.1f}s/s{si:03d}", loss, acc, list(scale)))
        merged: dict[str, list] = defaultdict(lambda: [0.0, 0.0, 0, None])
        for rank_rows in gather_objects(local, self.info):
            for key, loss, acc, scale in rank_rows:
                m = merged[key]
                m[0] += loss
                m[1] += acc
                m[2] += 1
                m[3] = scale
        return {k: {"loss": v[0] / v[2], "acc": v[1] / v[2], "n": v[2], "scale": v[3]}
                for k, v in sorted(merged.items())}

    # -- the loop ----------------------------------------------------------------------------------

    def save(self) -> Path:
        state = self.dataset.state_dict(self.position) if self.position is not None else None
        path = checkpointing.save_checkpoint(
            self.ckpt_dir, self.step, self.info, self.model, self.optimizer,
            ema=self.ema.state_dict() if self.ema is not None else None, data_position=state,
            extra={"config": config_to_dict(self.cfg)}, keep_last_k=self.cfg.checkpoint.keep_last_k,
            trainable_only=self.lora)
        self._log({"event": "checkpoint", "step": self.step, "path": str(path)})
        return path

    def run(self) -> TrainResult:
        cfg = self.cfg
        self._log({"event": "start", "step": self.step, "world_size": self.info.world_size,
                   "device": str(self.device), "parameters": sum(p.numel() for p in self.model.parameters()),
                   "global_batch": cfg.training.batch_size * self.info.dp_size})
        stream = self.dataset.iterate(self.position)
        steps = cfg.training.steps
        bar = tqdm(total=steps, initial=self.step, desc="train", unit="step", disable=not self.progress,
                   file=sys.stderr, dynamic_ncols=True)
        throughput: list[tuple[float, float, float]] = []
        try:
            while self.step < steps:
                t0 = time.perf_counter()
                batch = [next(stream) for _ in range(cfg.training.batch_size)]
                data_time = time.perf_counter() - t0
                record = self.train_one_step(batch)
                self.position = batch[-1].next_position
                # Throughput over the whole iteration: reading the latents counts, logging and saving do not.
                wall = data_time + record["step_time_s"]
                tokens = record["visual_tokens"] + record["text_tokens"]
                record.update(data_time_s=data_time, samples_per_s=record["samples"] / wall, tokens_per_s=tokens / wall)
                throughput.append((wall, record["samples"], tokens))
                if self.step % cfg.logging.every == 0 or self.step == steps:
                    self._log(record)
                bar.update(1)
                bar.set_postfix(loss=f"{record['loss']:.4f}", acc=f"{record['acc']:.3f}", lr=f"{record['lr']:.2e}")
                if self.step % cfg.checkpoint.every == 0 or self.step == steps:
                    self.save()
        finally:
            bar.close()
            with contextlib.suppress(Exception):
                stream.close()
        # Throughput over the steps after the first (which pays one-off costs: allocations, compilation).
        tail = throughput[1:] or throughput
        t = sum(x[0] for x in tail)
        result = TrainResult(self.run_dir, self.step, resumed_from=self.resumed_from,
                             samples_per_s=sum(x[1] for x in tail) / t if t else float("nan"),
                             tokens_per_s=sum(x[2] for x in tail) / t if t else float("nan"))
        if self.info.is_main:
            result.losses = runlog.step_losses(self.log_path)
            self._log({"event": "end", "step": self.step, "samples_per_s": result.samples_per_s,
                       "tokens_per_s": result.tokens_per_s})
        return result


def train(cfg: TrainConfig, *, resume: str = "auto", progress: bool = True, dataset: Any = None) -> TrainResult:
    """Build a :class:`Trainer` for ``cfg`` (joining the torchrun process group if any) and run it."""
    return Trainer(cfg, resume=resume, progress=progress, dataset=dataset).run()


# ----------------------------------------------------------------------------------------------
# Export
# ----------------------------------------------------------------------------------------------


def export_run(run_dir: str | os.PathLike, out_dir: str | os.PathLike, *, checkpoint: str | os.PathLike | None = None,
               use_ema: bool = False) -> Path:
    """Write a trained run as a pipeline folder (our layout) that ``InfinityStarPipeline.from_pretrained`` loads.

    The VAE and text encoder are the run's base pipeline's (they are not trained); the transformer weights
    come from ``checkpoint`` (default: the newest complete checkpoint of the run), the EMA weights with
    ``use_ema``. Runs in one process whatever the number of processes that trained. A LoRA run (``[lora]``) writes
    its adapter folder instead (``transformer.lora``: PEFT's layout and the base model's identity).
    """
    run = Path(run_dir)
    cfg = load_run_config(run)
    if checkpoint is None:
        ckpt = checkpointing.latest_checkpoint(run / runlog.CHECKPOINT_DIR)
        if ckpt is None:
            raise FileNotFoundError(f"run {run} has no complete checkpoint in {run / runlog.CHECKPOINT_DIR}")
    else:
        ckpt = Path(checkpoint)
    pipe = load_base_pipeline(cfg)
    record = checkpointing.read_complete(ckpt)
    if cfg.lora.enabled:
        # The adapter alone, in PEFT's layout, with the identity of the base it was trained on.
        base = {"name": pipe.config.name, "identity": base_identity(pipe.transformer), "source": cfg.model.pipeline}
        add_adapter(pipe.transformer, cfg.lora.adapter(), ADAPTER_NAME)
        checkpointing.load_model_weights(ckpt, pipe.transformer, trainable_only=True)
        training = {"run": str(run.resolve()), "step": record["step"], "lr": cfg.optimizer.lr,
                    "batch_size": cfg.training.batch_size, "data": list(cfg.data.jsonl)}
        # A closed-vocabulary base (the demo's word encoder) warns about words it was not trained on; the adapter
        # records the words of its own captions, so that loading it makes them known (pipeline.load_lora_weights).
        vocabulary = None
        if getattr(pipe.text_encoder, "vocabulary", None) is not None:
            vocabulary = sorted({w for f in resolve_jsonl_files(cfg.data.jsonl) for w in caption_words(f)})
        return save_adapter(out_dir, pipe.transformer, cfg.lora.adapter(), adapter_name=ADAPTER_NAME, base=base,
                            training=training, vocabulary=vocabulary)
    checkpointing.load_model_weights(ckpt, pipe.transformer, use_ema=use_ema)
    out = Path(out_dir)
    pipe.save_pretrained(out)
    atomic_write_json(out / "training_source.json", {"run": str(run.resolve()), "checkpoint": str(Path(ckpt).resolve()),
                                                     "step": record["step"], "ema": use_ema})
    return out

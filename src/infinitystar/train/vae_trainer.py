"""Training and fine-tuning the video VAE (``infinitystar train-vae CONFIG``).

    infinitystar train-vae vae_train.toml          # or: python -m infinitystar.cli train-vae vae_train.toml

    from infinitystar.train.config import VAEDataConfig, VAEModelConfig, VAETrainConfig, VAETrainingConfig
    from infinitystar.train.vae_trainer import train_vae
    result = train_vae(VAETrainConfig(model=VAEModelConfig(vae_preset="tiny-test"),
                                      data=VAEDataConfig(paths=("clips/",)), training=VAETrainingConfig(steps=2000)))

One process, or several under ``torchrun`` (data parallel: ``DistributedDataParallel`` averages the
gradients; ``batch_size`` is per process, rank r trains on slice r of the step's ``batch_size * world``
clips, so two processes of batch 2 see exactly the clips of one process of batch 4). Each step: a batch
of clips (drawn from a generator seeded by (seed, step)) ->
encoder -> posterior mean -> (optionally) multi-scale BSQ with a straight-through gradient -> decoder
-> loss = l1 * L1 + l2 * MSE + perceptual * structural + gan * hinge-G + mean BSQ aux (commitment +
entropy) -> Adam step (gradient clipped); with the GAN on, then a hinge-loss discriminator step.

The reference's tokenizer training code never shipped (vae spec 7); what is known and followed here:
the loss terms and their default weights, the BSQ auxiliary losses (spec 5), and a training-time
quantizer with the same residual algorithm as inference (spec 6.7). Choices of ours, and why:

* The latent is the posterior *mean* (no sampling, no KL term): the reference's KL weight is 0, and
  the transformer is trained on quantized means here too, so sampling noise would only be a
  regulariser the decoder never meets at inference.
* Quantization gradient: the decoder input is ``z + (summed_codes - z).detach()`` (the straight-through
  estimator over the whole multi-scale quantizer, as VAR does): the decoder learns to decode exactly
  the summed codes the transformer will produce, and the encoder receives the decoder's gradient
  unchanged. The BSQ commitment and entropy terms (computed on every step's residual, as the
  reference's per-step BSQ does) keep the latent quantizable.
* The training quantizer uses the inference layout (first frame alone, then 20-latent-frame clips;
  identical to the reference's training grouping up to 81 frames) and a scale ladder ending at the
  clip's latent size (``training_schedule``); for square latents it is the official 1:1 ladder.
* Checkpoints are the transformer trainer's (``train.checkpointing``: DCP folders written atomically, the
  newest ``checkpoint.keep_last_k`` kept); resuming restores model, optimizers, step and RNG, and because
  batches are a function of (seed, step) the resumed run continues exactly as an uninterrupted one would.

Outputs in ``out_dir`` (the run folder of ``train.runlog``, as the transformer trainer's): ``train_config.json``,
``train_log.jsonl`` (one JSON object per logged step: losses, batch PSNR, lr, grad norm, seconds per step;
``eval_psnr`` when evaluated), ``checkpoints/step_XXXXXXXX/`` and the final ``vae.safetensors``
(``checkpoints.load_vae`` reads it).
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from infinitystar.checkpoints import load_vae, save_vae
from infinitystar.config import ConfigError, QuantizerConfig, get_preset
from infinitystar.fileio import make_folder
from infinitystar.generation.schedules import (
    BASE_LEVELS,
    FRAMES_INNER_CLIP,
    Scale,
    parse_repetition,
    scale_repetitions,
    scales_per_clip,
)
from infinitystar.generation.schedules import video_scale_schedule as _video_schedule
from infinitystar.train import checkpointing, runlog
from infinitystar.train.config import VAETrainConfig, config_to_dict
from infinitystar.train.distributed import (
    DistInfo,
    all_reduce_sum,
    apply_ddp,
    barrier,
    broadcast_object,
    init_distributed,
)
from infinitystar.train.vae_data import ClipDataset, MediaClipDataset, list_media
from infinitystar.train.vae_losses import PatchDiscriminator, hinge_d_loss, hinge_g_loss, psnr, structural_loss
from infinitystar.vae.bsq import bsq_aux_losses
from infinitystar.vae.model import VideoVAE
from infinitystar.vae.multiscale import encode_to_bits

# ---------------------------------------------------------------------------------------------
# Training-time multi-scale quantization


def training_schedule(latent_frames: int, height: int, width: int,
                      frames_inner_clip: int = FRAMES_INNER_CLIP) -> list[Scale]:
    """Scale schedule for a (latent_frames, height, width) latent: a spatial ladder ending at (height, width).

    Level s of the official ladder (1, 2, 3, 4, 5, 6, 7, 8, 10, 12, ...) gives (round(s h / m), round(s w / m)),
    m = max(h, w), for every s < m; duplicates are dropped and (h, w) ends the ladder. The first frame gets
    the ladder alone, then one pyramid per clip of ``frames_inner_clip`` latent frames.
    """
    if min(latent_frames, height, width) < 1:
        raise ValueError(f"latent size must be positive, got {(latent_frames, height, width)}")
    m = max(height, width)
    ladder: list[tuple[int, int]] = []
    for s in BASE_LEVELS:
        if s >= m:
            break
        hw = (max(1, round(s * height / m)), max(1, round(s * width / m)))
        if hw not in ladder and hw != (height, width):
            ladder.append(hw)
    ladder.append((height, width))
    return _video_schedule([(1, h, w) for h, w in ladder], latent_frames, frames_inner_clip)


@dataclass
class QuantizedLatent:
    """Output of :class:`TrainingQuantizer`: the decoder input and the BSQ terms (means over steps)."""

    codes: Tensor  # (B, 64, T', h, w): summed codes in value, straight-through to the latent in gradient
    aux: Tensor  # mean over steps of commitment_weight * commitment + entropy term
    commitment: Tensor
    entropy_penalty: Tensor
    num_steps: int


class TrainingQuantizer:
    """Multi-scale residual BSQ of a latent, differentiable by the straight-through estimator.

    The quantizer of generation and feature extraction (``vae.multiscale.encode_to_bits`` with the running sum held
    constant between steps), plus the BSQ auxiliary losses of every step's residual. ``repetition`` gives the
    repeats per scale of a clip pyramid (None = 1 each).

    ``gradient``: "identity" passes the decoder's gradient to the latent unchanged (``z + (codes - z).detach()``);
    "residual" sums each step's straight-through BSQ output ``v + (sign(v)/sqrt(d) - v).detach()`` (v the
    normalised residual, the running sum held constant), so the gradient goes through every step's
    resampling and l2 normalisation. Both give the same values.
    """

    def __init__(self, quantizer_config: QuantizerConfig, repetition: str | Sequence[int] | None = None, *,
                 commitment_weight: float = 0.25, entropy_weight: float = 0.1, gradient: str = "identity",
                 frames_inner_clip: int = FRAMES_INNER_CLIP) -> None:
        if gradient not in ("identity", "residual"):
            raise ValueError(f"gradient must be 'identity' or 'residual', got {gradient!r}")
        self.gradient = gradient
        self.frames_inner_clip = frames_inner_clip
        self.config = quantizer_config
        self.repetition = None if repetition is None else parse_repetition(repetition)
        self.commitment_weight = commitment_weight
        self.entropy_weight = entropy_weight

    def schedule(self, latent_shape: Sequence[int]) -> tuple[list[Scale], list[int]]:
        t, h, w = (int(v) for v in latent_shape[-3:])
        sched = training_schedule(t, h, w, self.frames_inner_clip)
        k = scales_per_clip(sched)
        reps = [1] * k if self.repetition is None else self.repetition
        if len(reps) != k:
            raise ConfigError(f"quantizer.repetition has {len(reps)} entries but a {h}x{w} latent has {k} scales "
                              f"per clip {[s[1:] for s in sched[:k]]}")
        return sched, scale_repetitions(sched, reps, reps)

    def __call__(self, latent_BCThw: Tensor) -> QuantizedLatent:
        z = latent_BCThw.float()
        if z.shape[1] != self.config.embed_dim:
            raise ValueError(f"latent has {z.shape[1]} channels, the quantizer expects {self.config.embed_dim}")
        sched, reps = self.schedule(z.shape)
        # Each step's residual (the BSQ input) reaches z through the clip's latent only: the sum is held constant.
        enc = encode_to_bits(z, sched, reps, self.config, frames_inner_clip=self.frames_inner_clip, return_lfq=True,
                             detach_sum=True)
        assert enc.lfq_inputs is not None
        with torch.autocast(device_type=z.device.type, enabled=False):
            aux = [bsq_aux_losses(r, commitment_weight=self.commitment_weight, entropy_weight=self.entropy_weight)
                   for r in enc.lfq_inputs]
        summed = enc.summed_codes
        codes = summed if self.gradient == "residual" else z + (summed - z).detach()
        return QuantizedLatent(codes=codes.to(latent_BCThw.dtype), aux=torch.stack([a.aux for a in aux]).mean(),
                               commitment=torch.stack([a.commitment for a in aux]).mean(),
                               entropy_penalty=torch.stack([a.entropy_penalty for a in aux]).mean(),
                               num_steps=len(enc.steps))


# ---------------------------------------------------------------------------------------------
# Model and reconstruction


def build_vae(config: VAETrainConfig) -> VideoVAE:
    """The VAE to train: the preset's architecture, with ``init_checkpoint``'s weights if given."""
    m = config.model
    if m.init_checkpoint is not None:
        arch = get_preset("vae", m.vae_preset) if m.vae_preset is not None else None
        model = load_vae(m.init_checkpoint, arch)
    else:
        assert m.vae_preset is not None  # VAEModelConfig guarantees one of the two
        model = VideoVAE(get_preset("vae", m.vae_preset))
    return model.float().train().requires_grad_(True)


# Parameters a decoder-only fine-tune leaves alone: everything that shapes the latent (hence the bits).
ENCODER_SIDE = ("encoder.", "proj_down.", "proj_down_two.", "scale_learnable_parameters")


def freeze_encoder_side(model: VideoVAE) -> VideoVAE:
    """``requires_grad=False`` on the encoder, ``proj_down`` and the latent scale (see ``ENCODER_SIDE``)."""
    for name, p in model.named_parameters():
        if name.startswith(ENCODER_SIDE):
            p.requires_grad_(False)
    return model


def to_channels_last(model: nn.Module) -> nn.Module:
    """Convolution weights in channels_last_3d layout (the oneDNN kernels' native one); values unchanged."""
    for m in model.modules():
        if isinstance(m, nn.Conv3d):
            m.to(memory_format=torch.channels_last_3d)
    return model


class _Reconstruction(nn.Module):
    """encode -> quantize -> decode as one ``forward``, the unit ``DistributedDataParallel`` wraps (DDP
    synchronises gradients of what runs inside a wrapped module's forward, not of other methods)."""

    def __init__(self, vae: VideoVAE, quantizer: TrainingQuantizer | None, frozen_encoder: bool) -> None:
        super().__init__()
        self.vae = vae
        self.quantizer = quantizer
        self.frozen_encoder = frozen_encoder

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        with torch.no_grad() if self.frozen_encoder else contextlib.nullcontext():
            latent = self.vae.encode(x, chunked=False)
        zero = latent.new_zeros(())
        aux = commit = penalty = zero
        if self.quantizer is not None:
            q = self.quantizer(latent)
            latent, aux, commit, penalty = q.codes, q.aux, q.commitment, q.entropy_penalty
        return self.vae.decode(latent, chunked=False), aux, commit, penalty


def reconstruct(model: VideoVAE, video: Tensor, quantizer: TrainingQuantizer | None = None) -> Tensor:
    """Encode (posterior mean), optionally quantize, decode: (B, 3, T, H, W) -> (B, 3, T, H, W), unclamped."""
    return _Reconstruction(model, quantizer, frozen_encoder=False)(video)[0]


# ---------------------------------------------------------------------------------------------
# Files


def list_checkpoints(out_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """(step, folder) of the complete training checkpoints in ``out_dir/checkpoints``, oldest first."""
    return checkpointing.complete_checkpoints(Path(out_dir) / runlog.CHECKPOINT_DIR)


# ---------------------------------------------------------------------------------------------
# Trainer


@dataclass
class TrainResult:
    model: VideoVAE
    step: int
    export_path: Path
    history: list[dict[str, float]] = field(default_factory=list)  # one entry per step run by this call
    eval_psnr: float | None = None


class VAETrainer:
    """Owns the model, optimizers, data and files of one VAE training run; :meth:`run` trains to ``steps``."""

    def __init__(self, config: VAETrainConfig, dataset: ClipDataset | None = None,
                 eval_dataset: ClipDataset | None = None, info: DistInfo | None = None) -> None:
        self.config = cfg = config
        self.out_dir = Path(cfg.out_dir)
        # torchrun's environment -> a process group (gloo on CPU, nccl on CUDA); none in a single process.
        self.info = info if info is not None else init_distributed(cfg.parallelism.device)
        self.device = self.info.device
        if dataset is None:
            if not cfg.data.paths:
                raise ConfigError("data.paths is empty and no dataset was given")
            dataset = self._media_dataset(cfg.data.paths)
        self.dataset = dataset
        if eval_dataset is None and cfg.data.eval_paths:
            eval_dataset = self._media_dataset(cfg.data.eval_paths)
        self.eval_dataset = eval_dataset
        self._eval_clips: list[Tensor] | None = None

        if cfg.parallelism.threads is not None:
            torch.set_num_threads(cfg.parallelism.threads)
        torch.manual_seed(cfg.training.seed)  # weight initialisation (random-init runs)
        self.model = build_vae(cfg).to(self.device)
        if cfg.model.train_decoder_only:
            freeze_encoder_side(self.model)
        if cfg.model.channels_last:
            to_channels_last(self.model)
        q = cfg.quantizer
        self.quantizer = (TrainingQuantizer(get_preset("quantizer", q.preset), q.repetition,
                                            commitment_weight=cfg.loss.commitment_weight,
                                            entropy_weight=cfg.loss.entropy_weight, gradient=q.gradient,
                                            frames_inner_clip=q.frames_inner_clip)
                          if q.enabled else None)
        if self.quantizer is not None and self.quantizer.config.embed_dim != self.model.config.embed_dim:
            raise ConfigError(f"quantizer preset {q.preset!r} has embed_dim "
                              f"{self.quantizer.config.embed_dim}, the VAE's latent has {self.model.config.embed_dim}")
        opt = cfg.optimizer
        self.optimizer = torch.optim.AdamW([p for p in self.model.parameters() if p.requires_grad], lr=opt.lr,
                                           betas=opt.betas, eps=opt.eps, weight_decay=opt.weight_decay)
        self.disc: PatchDiscriminator | None = None
        self.disc_optimizer: torch.optim.Optimizer | None = None
        gan = cfg.discriminator
        if gan.weight > 0:
            self.disc = PatchDiscriminator(self.model.config.out_channels, gan.channels, gan.layers).to(self.device)
            self.disc_optimizer = torch.optim.AdamW(self.disc.parameters(), lr=gan.lr or opt.lr, betas=opt.betas,
                                                    eps=opt.eps, weight_decay=opt.weight_decay)
        # What the step runs: the plain modules in one process, DDP wrappers under torchrun. find_unused_parameters:
        # proj_down_two/proj_up_two are kept for the official key names but never run, so they get no gradient.
        self.recon = apply_ddp(_Reconstruction(self.model, self.quantizer, cfg.model.train_decoder_only), self.info,
                               find_unused_parameters=True)
        self.disc_step = apply_ddp(self.disc, self.info) if self.disc is not None else None
        self.step = 0

    def _media_dataset(self, sources: Sequence[str]) -> MediaClipDataset:
        d = self.config.data
        return MediaClipDataset(list_media(sources), num_frames=d.num_frames, fps=d.fps, height=d.height,
                                width=d.width, cache_decoded=d.cache_decoded)

    # --- schedule and data ---------------------------------------------------------------------

    def batch(self, step: int) -> Tensor:
        """This rank's clips of step ``step`` (B, 3, T, H, W): slice ``rank`` of the ``B * world`` clips drawn
        from a generator seeded by (seed, step) alone."""
        rng = np.random.default_rng([self.config.training.seed, step])
        b, rank = self.config.training.batch_size, self.info.rank
        clips = [self.dataset.sample(rng) for _ in range(b * self.info.world_size)][rank * b:(rank + 1) * b]
        shapes = {tuple(c.shape) for c in clips}
        d = self.config.data
        want = (3, d.num_frames, d.height, d.width)
        if shapes != {want}:
            raise ValueError(f"the dataset returned clips of shape {sorted(shapes)}, expected {want}")
        x = torch.stack(clips).to(self.device)
        return x.contiguous(memory_format=torch.channels_last_3d) if self.config.model.channels_last else x

    def _gan_active(self, step: int) -> bool:
        return self.disc is not None and step >= self.config.discriminator.start_step

    # --- one step --------------------------------------------------------------------------------

    def train_step(self, step: int) -> dict[str, float]:
        cfg, model = self.config, self.model
        losses, opt = cfg.loss, cfg.optimizer
        t0 = time.perf_counter()
        x = self.batch(step)
        lr = opt.lr_at(step, cfg.training.steps)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        model.train()
        x_hat, aux, commit, penalty = self.recon(x)
        zero = x_hat.new_zeros(())
        diff = x_hat - x
        if losses.foreground_weight > 0:
            weight = 1 + losses.foreground_weight * (x.amax(1, keepdim=True) > losses.foreground_threshold).to(x.dtype)
            l1 = (weight * diff.abs()).mean()
            l2 = (weight * diff.pow(2)).mean()
        else:
            l1 = diff.abs().mean()
            l2 = diff.pow(2).mean()
        perc = structural_loss(x_hat, x) if losses.perceptual_weight > 0 else zero
        loss = losses.l1_weight * l1 + losses.l2_weight * l2 + losses.perceptual_weight * perc + aux
        gan_active = self._gan_active(step)
        g_loss = zero
        if gan_active:
            assert self.disc is not None
            self.disc.requires_grad_(False)
            g_loss = hinge_g_loss(self.disc(x_hat))
            loss = loss + cfg.discriminator.weight * g_loss
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        params = [p for p in model.parameters() if p.grad is not None]
        grad_norm = (torch.nn.utils.clip_grad_norm_(params, opt.grad_clip) if opt.grad_clip > 0
                     else torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params])))
        self.optimizer.step()
        d_loss = zero
        if gan_active:
            assert self.disc is not None and self.disc_optimizer is not None
            self.disc.requires_grad_(True)
            for group in self.disc_optimizer.param_groups:
                group["lr"] = (cfg.discriminator.lr or opt.lr) * lr / opt.lr
            # One forward of real and fake together: a DDP module runs one forward per backward.
            assert self.disc_step is not None
            logits_real, logits_fake = self.disc_step(torch.cat([x, x_hat.detach()])).chunk(2)
            d_loss = hinge_d_loss(logits_real, logits_fake)
            self.disc_optimizer.zero_grad(set_to_none=True)
            d_loss.backward()
            if opt.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(self.disc.parameters(), opt.grad_clip)
            self.disc_optimizer.step()
        names = ("loss", "l1", "l2", "perceptual", "gan_g", "gan_d", "bsq_aux", "commitment", "entropy_penalty",
                 "psnr")
        values = [loss, l1, l2, perc, g_loss, d_loss, aux, commit, penalty, psnr(x_hat.detach(), x)]
        # Metrics are means over ranks (the gradient norm is already the all-reduced one's).
        world = self.info.world_size
        means = [v / world for v in all_reduce_sum([v.item() for v in values], self.info)]
        return {"event": "step", "step": step + 1, **dict(zip(names, means)), "lr": lr,
                "grad_norm": grad_norm.item(), "step_time_s": time.perf_counter() - t0}

    # --- evaluation ------------------------------------------------------------------------------

    def eval_clips(self) -> list[Tensor]:
        if self.eval_dataset is None:
            return []
        if self._eval_clips is None:
            rng = np.random.default_rng([self.config.training.seed, 0x5EED_E7A1])
            self._eval_clips = [self.eval_dataset.sample(rng) for _ in range(self.config.data.eval_clips)]
        return self._eval_clips

    @torch.no_grad()
    def evaluate(self) -> float | None:
        """Mean PSNR (dB, pixels in [-1, 1] mapped to [0, 1]) of the held-out clips, through the quantizer if on.
        Computed by rank 0 (every rank gets its value)."""
        value = self._evaluate_here() if self.info.is_main else None
        return broadcast_object(value, self.info)

    def _evaluate_here(self) -> float | None:
        clips = self.eval_clips()
        if not clips:
            return None
        self.model.eval()
        values = []
        b = self.config.training.batch_size
        for i in range(0, len(clips), b):
            x = torch.stack(clips[i:i + b]).to(self.device)
            values.append(psnr(reconstruct(self.model, x, self.quantizer), x, reduction="none"))
        self.model.train()
        return float(torch.cat(values).mean())

    # --- checkpoints -----------------------------------------------------------------------------

    def _parts(self) -> checkpointing.Parts:
        """What a checkpoint holds beside the VAE and its optimizer: the discriminator and its optimizer, if any."""
        return {"discriminator": (self.disc, self.disc_optimizer)} if self.disc is not None else {}

    def save_checkpoint(self) -> Path:
        """Collective: a DCP checkpoint (``train.checkpointing``, as the transformer trainer's) of the model,
        optimizers, step and RNG states; every rank holds the same replicated state, written once."""
        path = checkpointing.save_checkpoint(
            self.out_dir / runlog.CHECKPOINT_DIR, self.step, self.info, self.model, self.optimizer,
            extra={"config": config_to_dict(self.config)}, keep_last_k=self.config.checkpoint.keep_last_k,
            parts=self._parts())
        self._log({"event": "checkpoint", "step": self.step, "path": str(path)})
        return path

    def load_checkpoint(self, path: str | os.PathLike) -> None:
        """Collective: restore the model, optimizers, RNG states and step of a checkpoint folder."""
        record = checkpointing.load_checkpoint(path, self.info, self.model, self.optimizer, parts=self._parts())
        self.step = int(record["step"])

    @property
    def export_path(self) -> Path:
        """Where :meth:`export` writes by default (and where a run's final weights are)."""
        return self.out_dir / "vae.safetensors"

    def export(self, path: str | os.PathLike | None = None) -> Path:
        """Write the model as safetensors (official key names, config in the metadata) for ``load_vae``."""
        out = Path(path) if path is not None else self.export_path
        save_vae(self.model, out, metadata={"step": str(self.step), "source": "infinitystar train-vae"})
        return out

    # --- the loop --------------------------------------------------------------------------------

    def _log(self, record: dict[str, Any]) -> None:
        if self.info.is_main:
            runlog.append_record(self.out_dir / runlog.LOG_FILE, record)

    def _resume(self, resume: str) -> None:
        """``"auto"``: the newest loadable checkpoint of ``out_dir`` if any (damaged newer ones are skipped and
        reported); ``"none"``: start fresh (older checkpoints are overwritten step by step); else a checkpoint
        folder. Step records after the checkpoint's step are dropped from the log: the resumed run logs them again."""
        path, skipped = checkpointing.resume_checkpoint(self.out_dir / runlog.CHECKPOINT_DIR, resume)
        if self.info.is_main:
            runlog.report_skipped_checkpoints(skipped)
        if path is None:
            return
        self.load_checkpoint(path)
        if self.info.is_main:
            runlog.drop_steps_after(self.out_dir / runlog.LOG_FILE, self.step)
        self._log({"event": "resume", "step": self.step, "checkpoint": str(path),
                   "skipped": [{"checkpoint": str(p), "reason": why} for p, why in skipped]})

    def run(self, *, resume: str = "auto", progress: bool = True) -> TrainResult:
        cfg = self.config
        steps = cfg.training.steps
        make_folder(self.out_dir, "run folder (out_dir)")
        self._resume(resume)
        if self.info.is_main:
            runlog.write_config(self.out_dir, config_to_dict(cfg))
        barrier(self.info)  # no rank starts before every rank has read the same checkpoint
        self._log({"event": "start", "step": self.step, "world_size": self.info.world_size, "device": str(self.device),
                   "parameters": sum(p.numel() for p in self.model.parameters()),
                   "global_batch": cfg.training.batch_size * self.info.world_size})
        history: list[dict[str, Any]] = []
        eval_psnr = None
        bar = tqdm(total=steps, initial=min(self.step, steps), disable=not progress or not self.info.is_main,
                   desc="train-vae", dynamic_ncols=True)
        try:
            while self.step < steps:
                record = self.train_step(self.step)
                self.step += 1
                history.append(record)
                bar.update(1)
                bar.set_postfix(loss=f"{record['loss']:.4f}", psnr=f"{record['psnr']:.2f}")
                final = self.step == steps
                if cfg.data.eval_every and self.step % cfg.data.eval_every == 0 or final:
                    eval_psnr = self.evaluate()
                    if eval_psnr is not None:
                        record["eval_psnr"] = eval_psnr
                if self.step % cfg.logging.every == 0 or final or "eval_psnr" in record:
                    self._log(record)
                if self.step % cfg.checkpoint.every == 0 or final:
                    self.save_checkpoint()
        finally:
            bar.close()
        if eval_psnr is None and self.eval_dataset is not None:
            eval_psnr = self.evaluate()
        if self.info.is_main:
            self.export()
        self._log({"event": "end", "step": self.step, "export": str(self.export_path)})
        barrier(self.info)
        return TrainResult(model=self.model, step=self.step, export_path=self.export_path, history=history,
                           eval_psnr=eval_psnr)


def train_vae(config: VAETrainConfig, dataset: ClipDataset | None = None, eval_dataset: ClipDataset | None = None,
              *, resume: str = "auto", progress: bool = True) -> TrainResult:
    """Train (or resume, or fine-tune) a VAE as ``config`` says; returns the trained model and the export path.

    ``dataset``/``eval_dataset`` (objects with ``sample(rng) -> (3, T, H, W)`` tensors) replace
    ``config.data.paths``/``config.data.eval_paths``, e.g. a procedural generator. ``resume`` as the transformer
    trainer's: ``"auto"``, ``"none"`` or a checkpoint.
    """
    return VAETrainer(config, dataset, eval_dataset).run(resume=resume, progress=progress)


__all__ = [
    "QuantizedLatent",
    "TrainResult",
    "TrainingQuantizer",
    "VAETrainer",
    "build_vae",
    "list_checkpoints",
    "psnr",
    "reconstruct",
    "train_vae",
    "training_schedule",
]

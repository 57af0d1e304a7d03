"""Training and fine-tuning the video VAE (``infinitystar train-vae CONFIG``).

    infinitystar train-vae vae_train.toml          # or: python -m infinitystar.cli train-vae vae_train.toml

    from infinitystar.config import VAETrainConfig
    from infinitystar.train.vae_trainer import train_vae
    result = train_vae(VAETrainConfig(vae_preset="tiny-test", data=("clips/",), steps=2000))

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
* Checkpoints are single ``torch.save`` files of plain state dicts (loadable with
  ``weights_only=True``), written to a temp file and ``os.replace``-d; resuming restores model,
  optimizers, step and RNG, and because batches are a function of (seed, step) the resumed run
  continues exactly as an uninterrupted one would.

Outputs in ``out_dir``: ``vae_train_config.json``, ``log.jsonl`` (one JSON object per logged step:
losses, batch PSNR, lr, grad norm, seconds per step; ``eval_psnr`` when evaluated),
``checkpoints/step_XXXXXXXX.pt`` and the final ``vae.safetensors`` (``checkpoints.load_vae`` reads it).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from infinitystar.checkpoints import load_state_dict_strict, load_vae, save_vae, torch_load_weights_only
from infinitystar.config import ConfigError, QuantizerConfig, VAETrainConfig, config_to_dict, get_preset
from infinitystar.fileio import atomic_output, atomic_write_text
from infinitystar.schedules import BASE_LEVELS, FRAMES_INNER_CLIP, parse_repetition, scale_repetitions
from infinitystar.schedules import video_scale_schedule as _video_schedule
from infinitystar.train.distributed import DistInfo, all_reduce_sum, barrier, broadcast_object, init_distributed
from infinitystar.train.vae_data import ClipDataset, MediaClipDataset, list_media
from infinitystar.train.vae_losses import PatchDiscriminator, hinge_d_loss, hinge_g_loss, psnr, structural_loss
from infinitystar.vae.bsq import bsq_aux_losses, bsq_quantize
from infinitystar.vae.model import VideoVAE
from infinitystar.vae.multiscale import DOWN_MODE, UP_MODE, build_steps, resample_channels_space

Scale = tuple[int, int, int]
CHECKPOINT_FORMAT = "infinitystar-vae-train"
_CKPT_NAME = re.compile(r"^step_(\d{8})\.pt$")


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

    Same algorithm as ``vae.multiscale.encode_to_bits`` (per clip: residual -> area-resample to
    (bits, h, w) -> BSQ -> trilinear back -> accumulate), with the BSQ auxiliary losses of every step's
    residual. ``repetition`` gives the repeats per scale of a clip pyramid (None = 1 each).

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
        k = per_clip_count(sched)
        reps = [1] * k if self.repetition is None else self.repetition
        if len(reps) != k:
            raise ConfigError(f"quant_repetition has {len(reps)} entries but a {h}x{w} latent has {k} scales per "
                              f"clip {[s[1:] for s in sched[:k]]}")
        return sched, scale_repetitions(sched, reps, reps)

    def __call__(self, latent_BCThw: Tensor) -> QuantizedLatent:
        z = latent_BCThw.float()
        if z.shape[1] != self.config.embed_dim:
            raise ValueError(f"latent has {z.shape[1]} channels, the quantizer expects {self.config.embed_dim}")
        sched, reps = self.schedule(z.shape)
        steps = build_steps(sched, reps, self.config, self.frames_inner_clip)
        _, _, _, hh, ww = z.shape
        residual_grad = self.gradient == "residual"
        clip_sums: list[Tensor] = []
        aux_terms, commits, penalties = [], [], []
        acc: Tensor | None = None
        st_acc: Tensor | None = None  # "residual": the same sum, carrying every step's straight-through gradient
        target: Tensor | None = None
        with torch.autocast(device_type=z.device.type, enabled=False):
            for step in steps:
                if acc is None:
                    target = z[:, :, step.frame_ss:step.frame_ee]
                    acc = torch.zeros_like(target).detach()
                    st_acc = torch.zeros_like(acc)
                assert target is not None
                _, h, w = step.scale
                # The running sum is a constant here: gradients reach z through `target` only.
                residual = resample_channels_space(target - acc, step.bits, h, w, DOWN_MODE)
                aux = bsq_aux_losses(residual, commitment_weight=self.commitment_weight,
                                     entropy_weight=self.entropy_weight)
                aux_terms.append(aux.aux)
                commits.append(aux.commitment)
                penalties.append(aux.entropy_penalty)
                q = bsq_quantize(residual if residual_grad else residual.detach()).quantized
                up = resample_channels_space(q, z.shape[1], hh, ww, UP_MODE)
                acc = acc + up.detach()
                if residual_grad:
                    st_acc = st_acc + up
                if step.ends_clip:
                    clip_sums.append(st_acc if residual_grad else acc)
                    acc = None
        summed = torch.cat(clip_sums, dim=2)
        codes = summed if residual_grad else z + (summed - z).detach()
        return QuantizedLatent(codes=codes.to(latent_BCThw.dtype), aux=torch.stack(aux_terms).mean(),
                               commitment=torch.stack(commits).mean(), entropy_penalty=torch.stack(penalties).mean(),
                               num_steps=len(steps))


def per_clip_count(schedule: Sequence[Scale]) -> int:
    """Scales of the first-frame pyramid (= scales per clip): up to and including the first full-size one."""
    full = schedule[-1][1:]
    for i, s in enumerate(schedule):
        if s[1:] == full:
            return i + 1
    return len(schedule)


# ---------------------------------------------------------------------------------------------
# Model and reconstruction


def build_vae(config: VAETrainConfig) -> VideoVAE:
    """The VAE to train: the preset's architecture, with ``init_checkpoint``'s weights if given."""
    if config.init_checkpoint is not None:
        arch = get_preset("vae", config.vae_preset) if config.vae_preset is not None else None
        model = load_vae(config.init_checkpoint, arch)
    else:
        assert config.vae_preset is not None  # VAETrainConfig guarantees one of the two
        model = VideoVAE(get_preset("vae", config.vae_preset))
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
    """(step, path) of the training checkpoints in ``out_dir/checkpoints``, oldest first."""
    root = Path(out_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _CKPT_NAME.match(p.name))]
    return sorted(found)


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
        self.info = info if info is not None else init_distributed(cfg.device)
        self.device = self.info.device
        if dataset is None:
            if not cfg.data:
                raise ConfigError("VAETrainConfig.data is empty and no dataset was given")
            dataset = self._media_dataset(cfg.data)
        self.dataset = dataset
        if eval_dataset is None and cfg.eval_data:
            eval_dataset = self._media_dataset(cfg.eval_data)
        self.eval_dataset = eval_dataset
        self._eval_clips: list[Tensor] | None = None

        if cfg.threads is not None:
            torch.set_num_threads(cfg.threads)
        torch.manual_seed(cfg.seed)  # weight initialisation (random-init runs)
        self.model = build_vae(cfg).to(self.device)
        if cfg.train_decoder_only:
            freeze_encoder_side(self.model)
        if cfg.channels_last:
            to_channels_last(self.model)
        self.quantizer = (TrainingQuantizer(get_preset("quantizer", cfg.quantizer_preset), cfg.quant_repetition,
                                            commitment_weight=cfg.commitment_weight,
                                            entropy_weight=cfg.entropy_weight, gradient=cfg.quant_gradient,
                                            frames_inner_clip=cfg.quant_frames_inner_clip)
                          if cfg.quantize else None)
        if self.quantizer is not None and self.quantizer.config.embed_dim != self.model.config.embed_dim:
            raise ConfigError(f"quantizer preset {cfg.quantizer_preset!r} has embed_dim "
                              f"{self.quantizer.config.embed_dim}, the VAE's latent has {self.model.config.embed_dim}")
        self.optimizer = torch.optim.AdamW([p for p in self.model.parameters() if p.requires_grad], lr=cfg.lr,
                                           betas=cfg.betas, weight_decay=cfg.weight_decay)
        self.disc: PatchDiscriminator | None = None
        self.disc_optimizer: torch.optim.Optimizer | None = None
        if cfg.gan_weight > 0:
            self.disc = PatchDiscriminator(self.model.config.out_channels, cfg.disc_channels,
                                           cfg.disc_layers).to(self.device)
            self.disc_optimizer = torch.optim.AdamW(self.disc.parameters(), lr=cfg.disc_lr or cfg.lr,
                                                    betas=cfg.betas, weight_decay=cfg.weight_decay)
        # What the step runs: the plain modules in one process, DDP wrappers (rank 0's initial weights
        # broadcast, gradients averaged over ranks in backward) under torchrun.
        self.recon: nn.Module = _Reconstruction(self.model, self.quantizer, cfg.train_decoder_only)
        self.disc_step: nn.Module | None = self.disc
        if self.info.distributed:
            from torch.nn.parallel import DistributedDataParallel

            ids = [self.device.index] if self.device.type == "cuda" else None
            # find_unused_parameters: proj_down_two/proj_up_two are kept for the official key names but never
            # run, so they get no gradient; gradient_as_bucket_view spares a copy of every gradient.
            self.recon = DistributedDataParallel(self.recon, device_ids=ids, find_unused_parameters=True,
                                                 gradient_as_bucket_view=True)
            if self.disc is not None:
                self.disc_step = DistributedDataParallel(self.disc, device_ids=ids)
        self.step = 0

    def _media_dataset(self, sources: Sequence[str]) -> MediaClipDataset:
        cfg = self.config
        return MediaClipDataset(list_media(sources), num_frames=cfg.num_frames, fps=cfg.fps, height=cfg.height,
                                width=cfg.width, cache_decoded=cfg.cache_decoded)

    # --- schedule and data ---------------------------------------------------------------------

    def lr_at(self, step: int) -> float:
        cfg = self.config
        if step < cfg.warmup_steps:
            return cfg.lr * (step + 1) / cfg.warmup_steps
        if cfg.lr_schedule == "constant":
            return cfg.lr
        progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
        return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))

    def batch(self, step: int) -> Tensor:
        """This rank's clips of step ``step`` (B, 3, T, H, W): slice ``rank`` of the ``B * world`` clips drawn
        from a generator seeded by (seed, step) alone."""
        rng = np.random.default_rng([self.config.seed, step])
        b, rank = self.config.batch_size, self.info.rank
        clips = [self.dataset.sample(rng) for _ in range(b * self.info.world_size)][rank * b:(rank + 1) * b]
        shapes = {tuple(c.shape) for c in clips}
        want = (3, self.config.num_frames, self.config.height, self.config.width)
        if shapes != {want}:
            raise ValueError(f"the dataset returned clips of shape {sorted(shapes)}, expected {want}")
        x = torch.stack(clips).to(self.device)
        return x.contiguous(memory_format=torch.channels_last_3d) if self.config.channels_last else x

    def _gan_active(self, step: int) -> bool:
        return self.disc is not None and step >= self.config.gan_start_step

    # --- one step --------------------------------------------------------------------------------

    def train_step(self, step: int) -> dict[str, float]:
        cfg, model = self.config, self.model
        t0 = time.perf_counter()
        x = self.batch(step)
        lr = self.lr_at(step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        model.train()
        x_hat, aux, commit, penalty = self.recon(x)
        zero = x_hat.new_zeros(())
        diff = x_hat - x
        if cfg.foreground_weight > 0:
            weight = 1 + cfg.foreground_weight * (x.amax(1, keepdim=True) > cfg.foreground_threshold).to(x.dtype)
            l1 = (weight * diff.abs()).mean()
            l2 = (weight * diff.pow(2)).mean()
        else:
            l1 = diff.abs().mean()
            l2 = diff.pow(2).mean()
        perc = structural_loss(x_hat, x) if cfg.perceptual_weight > 0 else zero
        loss = cfg.l1_weight * l1 + cfg.l2_weight * l2 + cfg.perceptual_weight * perc + aux
        gan_active = self._gan_active(step)
        g_loss = zero
        if gan_active:
            assert self.disc is not None
            self.disc.requires_grad_(False)
            g_loss = hinge_g_loss(self.disc(x_hat))
            loss = loss + cfg.gan_weight * g_loss
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        params = [p for p in model.parameters() if p.grad is not None]
        grad_norm = (torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip) if cfg.grad_clip > 0
                     else torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params])))
        self.optimizer.step()
        d_loss = zero
        if gan_active:
            assert self.disc is not None and self.disc_optimizer is not None
            self.disc.requires_grad_(True)
            for group in self.disc_optimizer.param_groups:
                group["lr"] = (cfg.disc_lr or cfg.lr) * lr / cfg.lr
            # One forward of real and fake together: a DDP module runs one forward per backward.
            assert self.disc_step is not None
            logits_real, logits_fake = self.disc_step(torch.cat([x, x_hat.detach()])).chunk(2)
            d_loss = hinge_d_loss(logits_real, logits_fake)
            self.disc_optimizer.zero_grad(set_to_none=True)
            d_loss.backward()
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(self.disc.parameters(), cfg.grad_clip)
            self.disc_optimizer.step()
        names = ("loss", "l1", "l2", "perceptual", "gan_g", "gan_d", "bsq_aux", "commitment", "entropy_penalty",
                 "psnr")
        values = [loss, l1, l2, perc, g_loss, d_loss, aux, commit, penalty, psnr(x_hat.detach(), x)]
        # Metrics are means over ranks (the gradient norm is already the all-reduced one's).
        world = self.info.world_size
        means = [v / world for v in all_reduce_sum([v.item() for v in values], self.info)]
        return {"step": step + 1, **dict(zip(names, means)), "lr": lr, "grad_norm": grad_norm.item(),
                "sec": time.perf_counter() - t0}

    # --- evaluation ------------------------------------------------------------------------------

    def eval_clips(self) -> list[Tensor]:
        if self.eval_dataset is None:
            return []
        if self._eval_clips is None:
            rng = np.random.default_rng([self.config.seed, 0x5EED_E7A1])
            self._eval_clips = [self.eval_dataset.sample(rng) for _ in range(self.config.eval_clips)]
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
        for i in range(0, len(clips), self.config.batch_size):
            x = torch.stack(clips[i:i + self.config.batch_size]).to(self.device)
            values.append(psnr(reconstruct(self.model, x, self.quantizer), x, reduction="none"))
        self.model.train()
        return float(torch.cat(values).mean())

    # --- checkpoints -----------------------------------------------------------------------------

    def checkpoint_state(self) -> dict[str, Any]:
        return {
            "format": CHECKPOINT_FORMAT, "step": self.step,
            "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "discriminator": self.disc.state_dict() if self.disc is not None else None,
            "disc_optimizer": self.disc_optimizer.state_dict() if self.disc_optimizer is not None else None,
            "rng": {"torch": torch.get_rng_state()},
            "config": json.dumps(config_to_dict(self.config)),
        }

    def save_checkpoint(self) -> Path:
        """Rank 0 writes the checkpoint (every rank holds the same weights and optimizer state); all wait."""
        path = self.out_dir / "checkpoints" / f"step_{self.step:08d}.pt"
        if self.info.is_main:
            with atomic_output(path) as tmp:
                torch.save(self.checkpoint_state(), tmp)
            for _, old in list_checkpoints(self.out_dir)[:-self.config.keep_last_k]:
                old.unlink(missing_ok=True)
        barrier(self.info)
        return path

    def load_checkpoint(self, path: str | os.PathLike) -> None:
        state = torch_load_weights_only(path)
        if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"{path} is not a VAE training checkpoint (format {CHECKPOINT_FORMAT!r})")
        load_state_dict_strict(self.model, state["model"], "VideoVAE of this config", source=str(path))
        self.optimizer.load_state_dict(state["optimizer"])
        if self.disc is not None and state.get("discriminator") is not None:
            self.disc.load_state_dict(state["discriminator"])
            assert self.disc_optimizer is not None
            self.disc_optimizer.load_state_dict(state["disc_optimizer"])
        torch.set_rng_state(state["rng"]["torch"])
        self.step = int(state["step"])

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

    def _log(self, record: dict[str, float]) -> None:
        if not self.info.is_main:
            return
        with open(self.out_dir / "log.jsonl", "a", encoding="utf-8") as fh:
            fh.write(json.dumps(record) + "\n")

    def _truncate_log(self, step: int) -> None:
        """Drop log lines of steps after ``step`` (a resumed run will log them again)."""
        log = self.out_dir / "log.jsonl"
        if not self.info.is_main or not log.is_file():
            return
        kept = []
        for line in log.read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:  # a line cut short by a crash
                continue
            if isinstance(record, dict) and record.get("step", 0) <= step:
                kept.append(line)
        atomic_write_text(log, "".join(ln + "\n" for ln in kept))

    def run(self) -> TrainResult:
        from tqdm.auto import tqdm

        cfg = self.config
        self.out_dir.mkdir(parents=True, exist_ok=True)
        found = list_checkpoints(self.out_dir)
        if cfg.resume and found:
            self.load_checkpoint(found[-1][1])
            self._truncate_log(self.step)
        if self.info.is_main:
            atomic_write_text(self.out_dir / "vae_train_config.json",
                              json.dumps(config_to_dict(self.config), indent=2))
        barrier(self.info)  # no rank starts before every rank has read the same checkpoint
        history: list[dict[str, float]] = []
        eval_psnr = None
        bar = tqdm(total=cfg.steps, initial=min(self.step, cfg.steps),
                   disable=not cfg.progress or not self.info.is_main, desc="train-vae", dynamic_ncols=True)
        try:
            while self.step < cfg.steps:
                record = self.train_step(self.step)
                self.step += 1
                history.append(record)
                bar.update(1)
                bar.set_postfix(loss=f"{record['loss']:.4f}", psnr=f"{record['psnr']:.2f}")
                final = self.step == cfg.steps
                if cfg.eval_every and self.step % cfg.eval_every == 0 or final:
                    eval_psnr = self.evaluate()
                    if eval_psnr is not None:
                        record["eval_psnr"] = eval_psnr
                if self.step % cfg.log_every == 0 or final or "eval_psnr" in record:
                    self._log(record)
                if self.step % cfg.checkpoint_every == 0 or final:
                    self.save_checkpoint()
        finally:
            bar.close()
        if eval_psnr is None and self.eval_dataset is not None:
            eval_psnr = self.evaluate()
        if self.info.is_main:
            self.export()
        barrier(self.info)
        return TrainResult(model=self.model, step=self.step, export_path=self.export_path, history=history,
                           eval_psnr=eval_psnr)


def train_vae(config: VAETrainConfig, dataset: ClipDataset | None = None,
              eval_dataset: ClipDataset | None = None) -> TrainResult:
    """Train (or resume, or fine-tune) a VAE as ``config`` says; returns the trained model and the export path.

    ``dataset``/``eval_dataset`` (objects with ``sample(rng) -> (3, T, H, W)`` tensors) replace
    ``config.data``/``config.eval_data``, e.g. a procedural generator.
    """
    return VAETrainer(config, dataset, eval_dataset).run()


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

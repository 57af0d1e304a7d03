"""Multi-scale residual quantization: latent <-> per-step bit labels <-> summed codes.

The latent (B, 64, T, H, W) is split into clips by the schedule's clip layout (clip 0 = the first
frame as an image, then windows of up to ``frames_inner_clip`` latent frames). Each clip is
quantized on its own: a running sum of codes starts at zero and, for every scale (t, h, w) of the
clip's pyramid and every repetition of that scale, the residual ``target - sum`` is resampled to
(C1, h, w) (C1 = 16 "semantic" bits on small scales, 64 "detail" bits on large ones), quantized with
BSQ, and the code is resampled back to (64, H, W) and added to the sum. Time is never resampled.

Steps are ordered scale-major, repetition-minor; step k of this order is the k-th entry of every
per-step list here (bits, BSQ inputs, transformer inputs) and the k-th self-correction call.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from infinitystar.config import QuantizerConfig
from infinitystar.generation.schedules import (
    FRAMES_INNER_CLIP,
    Scale,
    ScalePackInfo,
    clip_layout,
    parse_repetition,
    scale_repetitions,
)
from infinitystar.vae.bsq import bits_to_codes, bsq_quantize

# The reference's z_interplote_down / z_interplote_up.
DOWN_MODE = "area"
UP_MODE = "trilinear"


# ---------------------------------------------------------------------------------------------
# Resampling


def resample_channels_space(x_BCThw: Tensor, channels: int, h: int, w: int, mode: str) -> Tensor:
    """Resample (B, C, T, H, W) jointly over (channels, height, width) to (B, channels, T, h, w).

    Time plays the role of the batch-channel axis of a 3-D ``F.interpolate`` and is left untouched.
    Area mode averages groups of channels (64 -> 16 = mean of 4 consecutive channels) together with
    adaptive average pooling in space; trilinear mode interpolates channels linearly (align_corners
    False) together with bilinear spatial upsampling. A same-size resample returns ``x`` itself
    (it would be an exact identity anyway).
    """
    if x_BCThw.dim() != 5:
        raise ValueError(f"expected a 5-D (B, C, T, H, W) tensor, got shape {tuple(x_BCThw.shape)}")
    if mode not in ("area", "trilinear"):
        raise ValueError(f"resample mode must be 'area' or 'trilinear', got {mode!r}")
    _, c, _, hh, ww = x_BCThw.shape
    if (c, hh, ww) == (channels, h, w):
        return x_BCThw
    x_BTChw = x_BCThw.permute(0, 2, 1, 3, 4)
    kwargs = {"align_corners": False} if mode == "trilinear" else {}
    y = F.interpolate(x_BTChw, size=(channels, h, w), mode=mode, **kwargs)
    return y.permute(0, 2, 1, 3, 4)


def area_resize(x_BCThw: Tensor, scale: Sequence[int]) -> Tensor:
    """Area-downsample (B, C, T, H, W) over (t, h, w) to ``scale`` (the transformer's input at a scale)."""
    t, h, w = (int(v) for v in scale)
    if tuple(x_BCThw.shape[2:]) == (t, h, w):
        return x_BCThw
    return F.interpolate(x_BCThw, size=(t, h, w), mode=DOWN_MODE)


# ---------------------------------------------------------------------------------------------
# Steps


@dataclass(frozen=True)
class StepInfo:
    """One quantization step: repetition ``repeat_index`` of scale ``scale_index``."""

    index: int
    scale_index: int
    repeat_index: int
    repeats: int  # repetitions of this scale
    scale: Scale
    clip_id: int
    frame_ss: int
    frame_ee: int
    bits: int  # bits per token (semantic_dim or detail_dim)
    is_last_repeat: bool
    ends_clip: bool  # the last step of its clip


def parse_repetitions(value: str | Sequence[int]) -> list[int]:
    """A repetition list given as a JSON string ('[3, 3, 2, 1]'), the reference's '[3]*12+[2,1,1]' form, or ints."""
    return parse_repetition(value)


def schedule_repetitions(
    schedule: Sequence[Sequence[int]],
    image_scale_repetition: str | Sequence[int],
    video_scale_repetition: str | Sequence[int],
) -> list[int]:
    """Per-scale repetition counts of a whole schedule: clip 0 uses the image list, video clips the video list,
    both indexed by the scale's position inside its clip (lists may be given in the reference's string form)."""
    sched = [tuple(int(v) for v in s) for s in schedule]
    return scale_repetitions(sched, parse_repetition(image_scale_repetition),  # type: ignore[arg-type]
                             parse_repetition(video_scale_repetition))


def build_steps(
    schedule: Sequence[Sequence[int]],
    repetitions: Sequence[int],
    quantizer_config: QuantizerConfig,
    frames_inner_clip: int = FRAMES_INNER_CLIP,
) -> list[StepInfo]:
    """Every (scale, repetition) step of a schedule, in order."""
    sched: list[Scale] = [tuple(int(v) for v in s) for s in schedule]  # type: ignore[misc]
    if any(len(s) != 3 or min(s) < 1 for s in sched):
        raise ValueError(f"every scale must be a positive (t, h, w), got {sched}")
    if len(repetitions) != len(sched):
        raise ValueError(f"{len(repetitions)} repetition counts for a schedule of {len(sched)} scales")
    if any(int(r) < 1 for r in repetitions):
        raise ValueError(f"repetitions must be >= 1, got {list(repetitions)}")
    layout: list[ScalePackInfo] = clip_layout(sched, frames_inner_clip)
    steps: list[StepInfo] = []
    for si, (scale, info) in enumerate(zip(sched, layout)):
        reps = int(repetitions[si])
        last_of_clip = si == len(sched) - 1 or layout[si + 1].clip_id != info.clip_id
        for r in range(reps):
            steps.append(StepInfo(
                index=len(steps), scale_index=si, repeat_index=r, repeats=reps, scale=scale,
                clip_id=info.clip_id, frame_ss=info.frame_ss, frame_ee=info.frame_ee,
                bits=quantizer_config.bits_for(scale[1], scale[2]),
                is_last_repeat=r == reps - 1, ends_clip=last_of_clip and r == reps - 1,
            ))
    return steps


# ---------------------------------------------------------------------------------------------
# Encode: latent -> bits


# A bit corruptor sees a step and its clean bits; it returns the bits to accumulate (possibly flipped)
# or None to keep the straight-through code of the clean bits. When it returns bits, the accumulated
# code is re-quantised from them as l2norm(2*bits - 1) (the reference's noise_apply_requant=1).
BitCorruptor = Callable[[StepInfo, Tensor], "Tensor | None"]


@dataclass
class MultiScaleEncoding:
    """Output of :func:`encode_to_bits`; per-step lists follow ``steps``."""

    steps: list[StepInfo]
    bits: list[Tensor]  # (B, t, h, w, d) uint8, the clean bit labels
    summed_codes: Tensor  # (B, 64, T, H, W), clips concatenated on t
    clip_initial_sums: list[Tensor]  # zeros of each clip's first scale shape (B, 64, t, h0, w0)
    lfq_inputs: list[Tensor] | None = None  # (B, d, t, h, w) residual fed to BSQ (before its l2 norm)
    quantized: list[Tensor] | None = None  # (B, d, t, h, w) straight-through BSQ output
    inputs: list[Tensor] | None = None  # (B, 64, t, h, w) transformer input = area-downsampled running sum
    accumulated_bits: list[Tensor] | None = None  # bits actually accumulated (after a corruptor); None if none
    extras: dict = field(default_factory=dict)


def _check_latent(latent: Tensor, schedule: Sequence[Scale], embed_dim: int, frames_inner_clip: int) -> None:
    if latent.dim() != 5:
        raise ValueError(f"latent must be (B, {embed_dim}, T, H, W), got shape {tuple(latent.shape)}")
    if latent.shape[1] != embed_dim:
        raise ValueError(f"latent has {latent.shape[1]} channels, the quantizer expects {embed_dim}")
    _, h_last, w_last = schedule[-1]
    if tuple(latent.shape[3:]) != (h_last, w_last):
        raise ValueError(
            f"latent spatial size {tuple(latent.shape[3:])} does not match the schedule's last scale {(h_last, w_last)}"
        )
    t_needed = clip_layout(schedule, frames_inner_clip)[-1].frame_ee
    if latent.shape[2] != t_needed:
        raise ValueError(f"latent has {latent.shape[2]} frames, the schedule covers {t_needed}")


def encode_to_bits(
    latent_B64THW: Tensor,
    schedule: Sequence[Sequence[int]],
    repetitions: Sequence[int],
    quantizer_config: QuantizerConfig,
    *,
    frames_inner_clip: int = FRAMES_INNER_CLIP,
    return_lfq: bool = False,
    return_inputs: bool = False,
    corruptor: BitCorruptor | None = None,
    step_filter: Callable[[StepInfo], bool] | None = None,
    detach_sum: bool = False,
) -> MultiScaleEncoding:
    """Quantize a latent into per-step bit labels (the reference's ``video_encode(..., infer_mode=True)``).

    ``return_lfq`` keeps every step's BSQ input and output, ``return_inputs`` the transformer input of every
    step. ``corruptor`` implements bitwise self-correction (see ``train.self_correction``). ``step_filter``
    (optional) says which steps' inputs/BSQ tensors to keep; the bits are always kept. Runs in float32
    with autocast disabled.

    Differentiable (VAE training, ``train.vae_trainer``): BSQ is straight-through, so ``summed_codes`` and the
    ``lfq_inputs`` carry gradients to the latent. ``detach_sum`` holds the running sum constant where it forms the
    next residual, so each step's gradient reaches the latent through its own residual only; values are unchanged.
    """
    sched: list[Scale] = [tuple(int(v) for v in s) for s in schedule]  # type: ignore[misc]
    steps = build_steps(sched, repetitions, quantizer_config, frames_inner_clip)
    embed = quantizer_config.embed_dim
    _check_latent(latent_B64THW, sched, embed, frames_inner_clip)
    latent = latent_B64THW.float()
    b, _, _, H, W = latent.shape

    bits_out: list[Tensor] = []
    lfq_in: list[Tensor] | None = [] if return_lfq else None
    lfq_q: list[Tensor] | None = [] if return_lfq else None
    inputs: list[Tensor] | None = [] if return_inputs else None
    acc_bits: list[Tensor] | None = [] if corruptor is not None else None
    clip_sums: list[Tensor] = []
    clip_initial: list[Tensor] = []
    acc: Tensor | None = None
    target: Tensor | None = None

    with torch.autocast(device_type=latent.device.type, enabled=False):
        for step in steps:
            if acc is None:  # first step of a clip: the running sum restarts at zeros
                t, h0, w0 = step.scale
                target = latent[:, :, step.frame_ss:step.frame_ee]
                clip_initial.append(latent.new_zeros(b, embed, t, h0, w0))
                # Up-sampling zeros of the first scale to the clip's full size gives zeros.
                acc = latent.new_zeros(b, embed, step.frame_ee - step.frame_ss, H, W)
            assert target is not None
            keep = step_filter is None or step_filter(step)
            if inputs is not None:
                inputs.append(area_resize(acc, step.scale) if keep else torch.empty(0))
            _, h, w = step.scale
            residual = resample_channels_space(target - (acc.detach() if detach_sum else acc), step.bits, h, w,
                                               DOWN_MODE)
            out = bsq_quantize(residual)
            bits_out.append(out.bits)
            if lfq_in is not None and lfq_q is not None:
                lfq_in.append(residual if keep else torch.empty(0))
                lfq_q.append(out.quantized if keep else torch.empty(0))
            q = out.quantized
            if corruptor is not None:
                used = corruptor(step, out.bits)
                if used is not None:
                    q = bits_to_codes(used)
                assert acc_bits is not None
                acc_bits.append(out.bits if used is None else used)
            acc = acc + resample_channels_space(q, embed, H, W, UP_MODE)
            if step.ends_clip:
                clip_sums.append(acc)
                acc = None

    return MultiScaleEncoding(
        steps=steps, bits=bits_out, summed_codes=torch.cat(clip_sums, dim=2), clip_initial_sums=clip_initial,
        lfq_inputs=lfq_in, quantized=lfq_q, inputs=inputs, accumulated_bits=acc_bits,
    )


# ---------------------------------------------------------------------------------------------
# Decode: bits -> summed codes (and the generation loop's running sum)


class CodeAccumulator:
    """Running sum of codes over the steps of a schedule, one step at a time.

    Feed each step's bits (or codes) in order with :meth:`add_bits`; it returns the transformer input of the
    next step: the area-downsampled running sum of the current clip at the next step's scale, or zeros of
    the next scale's shape when a new clip starts (each clip's sum restarts at zeros). ``None`` after the
    last step.

    Every clip is accumulated at (its own t, H, W) with (H, W) the last scale of the schedule; clip 0's
    full scale has the same (H, W) by construction. (The reference accumulates video clips at the last
    scale's t, which only works when all video clips have equal length; for those schedules this is the same.)
    """

    def __init__(
        self,
        schedule: Sequence[Sequence[int]],
        repetitions: Sequence[int],
        quantizer_config: QuantizerConfig,
        *,
        batch_size: int = 1,
        device: torch.device | str | None = None,
        frames_inner_clip: int = FRAMES_INNER_CLIP,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.schedule: list[Scale] = [tuple(int(v) for v in s) for s in schedule]  # type: ignore[misc]
        self.steps = build_steps(self.schedule, repetitions, quantizer_config, frames_inner_clip)
        self.config = quantizer_config
        self.batch_size = batch_size
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.full_hw = self.schedule[-1][1:]
        self.next_step = 0
        self.clip_sums: list[Tensor] = []  # finished clips
        self._acc: Tensor | None = None

    @property
    def done(self) -> bool:
        return self.next_step >= len(self.steps)

    def first_input(self) -> Tensor:
        """Transformer input of step 0: zeros of the first scale's shape."""
        return self._zeros(self.steps[0].scale)

    def _zeros(self, scale: Sequence[int]) -> Tensor:
        return torch.zeros(self.batch_size, self.config.embed_dim, *scale, device=self.device)

    def add_bits(self, bits_BthwD: Tensor) -> Tensor | None:
        """Add the codes of the next step's bit labels (B, t, h, w, d); return the next step's input."""
        step = self._expect()
        want = (self.batch_size, *step.scale, step.bits)
        if tuple(bits_BthwD.shape) != want:
            raise ValueError(f"step {step.index} (scale {step.scale}) expects bits of shape {want}, "
                             f"got {tuple(bits_BthwD.shape)}")
        return self.add_codes(bits_to_codes(bits_BthwD.to(self.device)))

    def add_codes(self, codes_BdThw: Tensor) -> Tensor | None:
        """Add a code tensor (B, d, t, h, w) for the next step; return the next step's input."""
        step = self._expect()
        want = (self.batch_size, step.bits, *step.scale)
        if tuple(codes_BdThw.shape) != want:
            raise ValueError(f"step {step.index} expects codes of shape {want}, got {tuple(codes_BdThw.shape)}")
        if self._acc is None:
            self._acc = self._zeros((step.frame_ee - step.frame_ss, *self.full_hw))
        up = resample_channels_space(codes_BdThw.float(), self.config.embed_dim, *self.full_hw, UP_MODE)
        self._acc = self._acc + up
        if step.ends_clip:
            self.clip_sums.append(self._acc)
            self._acc = None
        self.next_step += 1
        if self.done:
            return None
        nxt = self.steps[self.next_step]
        if self._acc is None:
            return self._zeros(nxt.scale)
        return area_resize(self._acc, nxt.scale)

    def _expect(self) -> StepInfo:
        if self.done:
            raise ValueError(f"all {len(self.steps)} steps have already been added")
        return self.steps[self.next_step]

    @property
    def summed_codes(self) -> Tensor:
        """(B, 64, T', H, W): finished clips, then the clip in progress, concatenated on t."""
        parts = list(self.clip_sums)
        if self._acc is not None:
            parts.append(self._acc)
        if not parts:
            raise ValueError("no step has been added yet")
        return torch.cat(parts, dim=2)


def bits_to_summed_codes(
    bits_per_step: Sequence[Tensor],
    schedule: Sequence[Sequence[int]],
    repetitions: Sequence[int],
    quantizer_config: QuantizerConfig,
    *,
    frames_inner_clip: int = FRAMES_INNER_CLIP,
) -> Tensor:
    """Summed codes (B, 64, T', H, W) of a full list of per-step bit labels (the reference's ``video_decode``)."""
    if not bits_per_step:
        raise ValueError("no bit labels given")
    acc = CodeAccumulator(schedule, repetitions, quantizer_config, batch_size=bits_per_step[0].shape[0],
                          device=bits_per_step[0].device, frames_inner_clip=frames_inner_clip)
    if len(bits_per_step) != len(acc.steps):
        raise ValueError(f"{len(bits_per_step)} bit tensors for a schedule of {len(acc.steps)} steps")
    for bits in bits_per_step:
        acc.add_bits(bits)
    return acc.summed_codes

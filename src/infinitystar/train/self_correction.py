"""Bitwise self-correction (BSC): the training tokenizer that turns a cached latent into transformer inputs and labels.

Teacher forcing with corrupted history: while quantizing the latent scale by scale (see
``vae.multiscale``), the bits of every step except those of the last scale are randomly flipped and the
running code sum is updated from the flipped bits (re-quantised as l2norm(2*bits - 1)). The labels
stay the clean bits of the residual relative to that corrupted sum, so the transformer learns to undo
earlier bit errors. Only one repetition per scale is trained: its input (the area-downsampled running
sum), its clean bits and its flipped bits are returned.

The flip source is pluggable: :class:`RandomBitFlips` draws like the reference (a strength
p = randint(0, floor(100 * strength) + 1) / 100 per call, then flips where rand < p) from a generator
we own; :class:`GivenFlipMasks` replays recorded masks (parity tests); :class:`NoFlips` disables BSC.
Calls are numbered scale-major, repetition-minor over every repetition of every scale except the last
scale of the sequence, so call k is quantization step k.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor

from infinitystar.config import QuantizerConfig
from infinitystar.generation.schedules import FRAMES_INNER_CLIP
from infinitystar.vae.multiscale import StepInfo, encode_to_bits

NOISE_APPLY_LAYERS = 1000  # the reference's noise_apply_layers: BSC on scales below min(this, last scale)


class BitFlipSource(Protocol):
    """Decides which bits BSC call ``call_index`` flips; ``None`` (or an all-false mask) flips nothing."""

    def flip_mask(self, call_index: int, step: StepInfo, bits_BthwD: Tensor) -> Tensor | None: ...


class NoFlips:
    """BSC off: the accumulated code is still re-quantised from the (unchanged) bits, as in the reference."""

    def flip_mask(self, call_index: int, step: StepInfo, bits_BthwD: Tensor) -> Tensor | None:
        return None


class GivenFlipMasks:
    """Replays recorded flip masks keyed by call index; a missing call flips nothing."""

    def __init__(self, masks: Mapping[int, Tensor]) -> None:
        self.masks = dict(masks)

    def flip_mask(self, call_index: int, step: StepInfo, bits_BthwD: Tensor) -> Tensor | None:
        mask = self.masks.get(call_index)
        if mask is None:
            return None
        if tuple(mask.shape) != tuple(bits_BthwD.shape):
            raise ValueError(f"flip mask of BSC call {call_index} has shape {tuple(mask.shape)}, "
                             f"the bits of step {step.index} (scale {step.scale}) have {tuple(bits_BthwD.shape)}")
        return mask.to(bits_BthwD.device)


class RandomBitFlips:
    """The reference's random BSC: per call, p = randint(0, floor(100*s) + 1) * 0.01 with s = strength of the
    call's scale, then every bit flips independently where rand < p. Strength <= 0 disables flips.

    ``strength`` is one float for every scale or a per-scale sequence (the reference's noise_apply_strength).
    Both draws come from ``generator`` (CPU or the tensors' device); the drawn p of every call is kept in
    ``drawn`` for logging.
    """

    def __init__(self, strength: float | Sequence[float], generator: torch.Generator) -> None:
        if isinstance(strength, (int, float)):
            self._strengths: Sequence[float] | None = None
            self._strength = float(strength)
        else:
            self._strengths = [float(s) for s in strength]
            self._strength = 0.0
        self.generator = generator
        self.drawn: list[float] = []

    def strength_for(self, scale_index: int) -> float:
        if self._strengths is None:
            return self._strength
        if scale_index >= len(self._strengths):
            raise ValueError(f"noise_apply_strength has {len(self._strengths)} entries, scale {scale_index} needs one")
        return self._strengths[scale_index]

    def flip_mask(self, call_index: int, step: StepInfo, bits_BthwD: Tensor) -> Tensor | None:
        s = self.strength_for(step.scale_index)
        if s <= 0:
            self.drawn.append(0.0)
            return None
        g = self.generator
        pct = int(torch.randint(0, math.floor(100 * s) + 1, (1,), generator=g, device=g.device).item())
        p = pct * 0.01
        self.drawn.append(p)
        u = torch.rand(bits_BthwD.shape, generator=g, device=g.device)
        return (u < p).to(bits_BthwD.device)


@dataclass
class TrainingTokens:
    """What one sample contributes to a training sequence (trained scales in schedule order).

    ``x_BLC`` (B, L, 64): per trained scale, the running sum at the trained repetition area-downsampled to the
    scale, flattened (t, h, w)-major, channels last, concatenated. ``gt_bits[i]`` (B, n_i, d_i) uint8: the
    clean labels. ``input_bits_after_bsc[i]`` (B, t, h, w, d) uint8: the bits that were accumulated (flipped).
    ``real_si[i]``: repetitions of all earlier scales + the trained repetition (the RoPE scale index).
    """

    x_BLC: Tensor
    gt_bits: list[Tensor]
    input_bits_after_bsc: list[Tensor]
    scales: list[int]
    selected_repeats: list[int]
    real_si: list[int]
    scale_lengths: list[int]


def tokenize_for_training(
    raw_features_B64THW: Tensor,
    schedule: Sequence[Sequence[int]],
    repetitions: Sequence[int],
    selected_repeats: Sequence[int],
    quantizer_config: QuantizerConfig,
    flip_source: BitFlipSource,
    *,
    trained_scales: Sequence[int] | None = None,
    frames_inner_clip: int = FRAMES_INNER_CLIP,
    noise_apply_layers: int = NOISE_APPLY_LAYERS,
) -> TrainingTokens:
    """Build the transformer input and labels of one sample (the reference's ``video_encode_global_bsc``).

    ``selected_repeats[si]`` is the repetition trained for scale si (drawn uniformly by the caller).
    ``trained_scales`` restricts the outputs to a subset of scales (default: all); the quantization itself
    always runs over the whole schedule so that every trained scale sees the same history and the BSC call
    numbering does not depend on the subset.
    """
    sched = [tuple(int(v) for v in s) for s in schedule]
    n_scales = len(sched)
    if len(selected_repeats) != n_scales:
        raise ValueError(f"{len(selected_repeats)} selected repeats for a schedule of {n_scales} scales")
    for si, (r, reps) in enumerate(zip(selected_repeats, repetitions)):
        if not 0 <= int(r) < int(reps):
            raise ValueError(f"selected repeat {r} of scale {si} is outside 0..{int(reps) - 1}")
    scales = list(range(n_scales)) if trained_scales is None else sorted({int(s) for s in trained_scales})
    if scales and (scales[0] < 0 or scales[-1] >= n_scales):
        raise ValueError(f"trained scales {scales} outside 0..{n_scales - 1}")
    wanted = {(si, int(selected_repeats[si])) for si in scales}
    bsc_scales = min(n_scales - 1, noise_apply_layers)

    after_bsc: dict[int, Tensor] = {}

    def corrupt(step: StepInfo, bits: Tensor) -> Tensor | None:
        if step.scale_index >= bsc_scales:
            return None
        mask = flip_source.flip_mask(step.index, step, bits)
        used = bits if mask is None else bits ^ mask.to(bits.dtype)
        if (step.scale_index, step.repeat_index) in wanted:
            after_bsc[step.scale_index] = used
        return used  # always re-quantised from bits (noise_apply_requant=1)

    enc = encode_to_bits(
        raw_features_B64THW, sched, repetitions, quantizer_config, frames_inner_clip=frames_inner_clip,
        return_inputs=True, corruptor=corrupt,
        step_filter=lambda st: (st.scale_index, st.repeat_index) in wanted,
    )
    assert enc.inputs is not None
    by_key = {(st.scale_index, st.repeat_index): st.index for st in enc.steps}
    first_step = {}
    for st in enc.steps:
        first_step.setdefault(st.scale_index, st.index)

    xs, gts, flipped, real_si, lengths = [], [], [], [], []
    for si in scales:
        k = by_key[(si, int(selected_repeats[si]))]
        x_B64thw = enc.inputs[k]
        b = x_B64thw.shape[0]
        xs.append(x_B64thw.permute(0, 2, 3, 4, 1).reshape(b, -1, x_B64thw.shape[1]))
        bits = enc.bits[k]
        gts.append(bits.reshape(b, -1, bits.shape[-1]))
        flipped.append(after_bsc.get(si, bits))
        real_si.append(first_step[si] + int(selected_repeats[si]))
        lengths.append(xs[-1].shape[1])
    x_BLC = torch.cat(xs, dim=1) if xs else raw_features_B64THW.new_zeros(raw_features_B64THW.shape[0], 0,
                                                                         quantizer_config.embed_dim)
    return TrainingTokens(x_BLC=x_BLC, gt_bits=gts, input_bits_after_bsc=flipped, scales=scales,
                          selected_repeats=[int(selected_repeats[si]) for si in scales], real_si=real_si,
                          scale_lengths=lengths)

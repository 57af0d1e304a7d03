"""Training samples for the tasks beyond text-to-video, each built as its generation path builds it.

The reference trains text-to-video (and text-to-image) only: image-to-video and video extension are run by forcing
the first scales at generation, and its interactive training was never released. Here each task is trained on the
sequence its generation runs:

* **image-to-video / video extension** (:func:`given_prefix_sample`): the first frame's scales, and for extension
  the scales of the first ``given_clips`` whole clips, are *given*. Generation forces their bits from the
  conditioning input's multi-scale quantization, so in training their inputs carry no self-correction flips, and
  they take no loss (they are context, as at generation). Every other scale is an ordinary text-to-video target:
  the same schedule, RoPE, attention and self-correction.
* **interactive turns** (:func:`interactive_turn_sample`): clip ``turn`` of a story latent is generated over the
  interactive schedule (one clip, every scale at t = ``frames_inner_clip``, no scale references) attending its text
  and two condition blocks: the previous segment (with the frame before it) area-downsampled to the semantic grid,
  and the story's first latent frame with the previous segment's last two frames at full size. The condition
  latents come from :func:`~infinitystar.generation.loop.interactive_condition_latents` and the layout from
  :func:`~infinitystar.generation.schedules.interactive_layout_for`, the functions the generation loop calls, and
  the RoPE rows of the condition blocks from :func:`~infinitystar.transformer.rope.condition_positions`; the
  packed sequence gives each block and scale what the KV cache gives it at generation
  (``transformer.sequence``), so the training logits of a turn equal the generation step logits for the same
  inputs (tests/test_train_tasks.py). The conditions are the VAE latents of the story with Gaussian noise of a
  strength drawn from ``condition_noise`` times their std (the reference's interactive training: 0, 0.15, 0.30).
  At generation the context after a generated segment is that segment's summed codes (quantized), not a continuous
  latent; with probability ``condition_codes_prob`` a turn's conditions are built from the story's summed codes
  (its latent through the multi-scale BSQ, each clip from zero, as generation accumulates it), so the model learns
  both forms. The reference trains the continuous form only (``condition_codes_prob = 0``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from infinitystar.config import PipelineConfig, QuantizerConfig
from infinitystar.generation.loop import interactive_condition_latents
from infinitystar.generation.schedules import (
    Scale,
    interactive_layout_for,
    scale_repetitions,
    scales_per_clip,
    video_scale_schedule,
)
from infinitystar.train.self_correction import BitFlipSource, RandomBitFlips, tokenize_for_training
from infinitystar.train.step import TrainSample, train_sample_from_tokens
from infinitystar.transformer.sequence import ConditionBlock
from infinitystar.vae.multiscale import StepInfo, encode_to_bits

__all__ = ["GivenScalesUnflipped", "given_prefix_sample", "given_scale_count", "interactive_turn_sample",
           "story_summed_codes"]


class GivenScalesUnflipped:
    """A bit-flip source that leaves the first ``given_scales`` scales clean (generation forces their exact bits)
    and asks ``inner`` for every later scale."""

    def __init__(self, inner: BitFlipSource, given_scales: int) -> None:
        self.inner = inner
        self.given_scales = given_scales

    def flip_mask(self, call_index: int, step: StepInfo, bits_BthwD: Tensor) -> Tensor | None:
        if step.scale_index < self.given_scales:
            return None
        return self.inner.flip_mask(call_index, step, bits_BthwD)


def given_scale_count(schedule: Sequence[Scale], given_clips: int) -> int:
    """Scales given by image-to-video (``given_clips=0``: the first frame's) or by an extension of ``given_clips``
    whole clips; at least one clip must be left to generate."""
    k = scales_per_clip(schedule)
    clips = len(schedule) // k - 1
    if not 0 <= given_clips < clips:
        raise ValueError(f"{given_clips} given clips for a video of {clips} clip(s): at least one clip must be "
                         f"generated")
    return k * (1 + given_clips)


def _draw_repeats(repetitions: Sequence[int], generator: torch.Generator) -> list[int]:
    return [int(torch.randint(0, int(r), (1,), generator=generator)) for r in repetitions]


def given_prefix_sample(
    latent_B64THW: Tensor,
    text: Tensor,
    schedule: Sequence[Scale],
    repetitions: Sequence[int],
    quantizer: QuantizerConfig,
    given_clips: int,
    generator: torch.Generator,
    *,
    bsc_strength: float | Sequence[float] = 0.3,
    frames_inner_clip: int,
) -> TrainSample:
    """An image-to-video (``given_clips=0``) or video-extension sample over every scale of ``schedule``."""
    given = given_scale_count(schedule, given_clips)
    flips = GivenScalesUnflipped(RandomBitFlips(bsc_strength, generator), given)
    tokens = tokenize_for_training(latent_B64THW, schedule, repetitions, _draw_repeats(repetitions, generator),
                                   quantizer, flips, frames_inner_clip=frames_inner_clip)
    return train_sample_from_tokens(tokens, schedule, text, frames_inner_clip=frames_inner_clip, loss_from=given)


def _noise(like: Tensor, generator: torch.Generator) -> Tensor:
    return torch.randn(like.shape, generator=generator, device=generator.device).to(like)


def _tokens(x_B64thw: Tensor) -> Tensor:
    """(1, C, t, h, w) -> (1, t*h*w, C), tokens in (t, h, w) row-major order (the generation loop's order)."""
    return x_B64thw.flatten(2).transpose(1, 2)


def story_summed_codes(latent_B64THW: Tensor, pipeline: PipelineConfig, image_pyramid: Sequence[Scale]) -> Tensor:
    """The summed codes of a latent ``(1, C, 1 + k * clip, H, W)`` over its video schedule (the image pyramid for
    frame 0, then one pyramid per clip, each accumulated from zero with the pipeline's repetitions): what the
    generation loop holds as ``former`` after generating those frames (``pipeline.interactive``)."""
    clip = pipeline.frames_inner_clip
    schedule = video_scale_schedule(list(image_pyramid), int(latent_B64THW.shape[2]), clip)
    repetitions = scale_repetitions(schedule, pipeline.image_repetition, pipeline.video_repetition)
    codes = encode_to_bits(latent_B64THW, schedule, repetitions, pipeline.quantizer, frames_inner_clip=clip)
    return codes.summed_codes.to(latent_B64THW)


def interactive_turn_sample(
    story_B64THW: Tensor,
    turn: int,
    text: Tensor,
    pipeline: PipelineConfig,
    image_pyramid: Sequence[Scale],
    generator: torch.Generator,
    *,
    bsc_strength: float | Sequence[float] = 0.3,
    condition_noise: Sequence[float] = (0.0,),
    condition_codes_prob: float = 0.0,
) -> TrainSample:
    """The training sample of turn ``turn`` (>= 1) of a story latent ``(1, C, 1 + clips * clip, H, W)``.

    Context (generation's ``former``): latent frames ``[clip * (turn - 1), clip * turn + 1)``, the previous
    segment and the frame before it; first frame: latent frame 0; target: the ``turn``-th clip. With probability
    ``condition_codes_prob`` the context and first frame are taken from :func:`story_summed_codes` instead (no
    random number is drawn when it is 0).
    """
    clip = pipeline.frames_inner_clip
    frames = story_B64THW.shape[2]
    clips = (frames - 1) // clip
    if story_B64THW.dim() != 5 or story_B64THW.shape[0] != 1 or frames != 1 + clips * clip:
        raise ValueError(f"a story latent is (1, C, 1 + clips x {clip}, H, W), got {tuple(story_B64THW.shape)}")
    if clips < 2 or not 1 <= turn <= clips - 1:
        raise ValueError(f"turn {turn} of a story of {clips} clip(s): a story has two clips or more, its turns are "
                         f"1..{clips - 1}")
    layout = interactive_layout_for(image_pyramid, clip, pipeline.vae.time_stride)
    target = story_B64THW[:, :, clip * turn + 1: clip * (turn + 1) + 1]
    source = story_B64THW
    if condition_codes_prob > 0 and float(torch.rand((), generator=generator)) < condition_codes_prob:
        source = story_summed_codes(story_B64THW[:, :, :clip * turn + 1], pipeline, image_pyramid)
    context = source[:, :, clip * (turn - 1): clip * turn + 1]
    semantic, detail = interactive_condition_latents(context, source[:, :, :1], layout)
    strength = float(condition_noise[int(torch.randint(0, len(condition_noise), (1,), generator=generator))])
    if strength > 0:
        semantic = semantic + strength * semantic.std() * _noise(semantic, generator)
        detail = detail + strength * detail.std() * _noise(detail, generator)
    repetitions = list(pipeline.image_repetition)  # the interactive plan's: one per scale of the turn
    tokens = tokenize_for_training(target, layout.schedule, repetitions, _draw_repeats(repetitions, generator),
                                   pipeline.quantizer, RandomBitFlips(bsc_strength, generator),
                                   frames_inner_clip=clip)
    sample = train_sample_from_tokens(tokens, layout.schedule, text, frames_inner_clip=clip)
    sample.conditions = [
        (ConditionBlock(layout.semantic_condition_scale, layout.semantic_rope_scale_id, layout.semantic_rope_frames),
         _tokens(semantic)),
        (ConditionBlock(layout.detail_condition_scale, layout.detail_rope_scale_id, layout.detail_rope_frames),
         _tokens(detail)),
    ]
    return sample

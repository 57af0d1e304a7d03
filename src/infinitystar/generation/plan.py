"""The plan of one generation request: every spacetime number the loop and the front doors need, in one place.

Given a pipeline config, a frame count and a size (the template's image pyramid), a :class:`GenerationPlan`
answers the scale schedule, the clip layout, the repetitions, the steps (:func:`plan_steps`), the latent frame
counts, the semantic/detail flags and, for image-to-video and video extension, which leading steps are forced
and with which bits. An :class:`InteractivePlan` does the same for one interactive turn. The pipeline, the web page
and the CLI ask these objects; none of them does frame or clip arithmetic of its own.

Frame counts go through :func:`~.schedules.latent_frames` / :func:`~.schedules.pixel_frames` with the config's VAE
time stride; lengths in seconds through :func:`frames_for_seconds`.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, replace
from functools import cached_property

from torch import Tensor

from ..config import PipelineConfig, SamplingConfig
from ..vae.multiscale import MultiScaleEncoding, encode_to_bits
from .schedules import (
    FRAMES_INNER_CLIP,
    InteractiveSegmentLayout,
    Scale,
    ScalePackInfo,
    ScaleStep,
    build_step_plan,
    clip_layout,
    detail_scale_flags,
    interactive_layout_for,
    latent_frames,
    nearest_h_div_w_template,
    parse_aspect_ratio,
    pixel_frames,
    scale_repetitions,
    scales_per_clip,
    spatial_ladder,
    video_scale_schedule,
)

# ----------------------------------------------------------------------------------------------
# Sizes
# ----------------------------------------------------------------------------------------------

RESOLUTIONS = {"720p": "0.90M", "480p": "0.40M"}


def resolve_size(cfg: PipelineConfig, *, resolution: str | None = None, aspect: str | None = None,
             height: int | None = None, width: int | None = None, h_div_w: float | None = None,
             ) -> tuple[float, list[Scale], tuple[int, int]]:
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
        template = nearest_h_div_w_template(height / width)  # type: ignore[operator]
    elif h_div_w is not None:
        template = nearest_h_div_w_template(h_div_w)
    else:
        template = nearest_h_div_w_template(parse_aspect_ratio(aspect or cfg.default_aspect))
    ladder = spatial_ladder(template)[: cfg.scales_per_clip]
    pyramid = [(1, h, w) for h, w in ladder]
    try:  # the head rule and the quantizer rule must agree on every scale of this template's pyramid
        detail_scale_flags(pyramid, cfg.transformer.semantic_scales,
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


def interactive_size(cfg: PipelineConfig, reference_hw: tuple[int, int] | None, aspect: str | None = None,
                     ) -> tuple[float, list[Scale], tuple[int, int]]:
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


# ----------------------------------------------------------------------------------------------
# Lengths
# ----------------------------------------------------------------------------------------------


def frames_for_seconds(seconds: float, fps: int, time_stride: int) -> int:
    """Pixel frames of a length in seconds: 0 s is one frame (an image); anything longer is rounded to the nearest
    whole latent frame (``1 + s*k`` pixel frames, k >= 1), so every positive length makes a video."""
    if not (seconds >= 0 and math.isfinite(seconds)):
        raise ValueError(f"seconds must be a finite number >= 0, got {seconds}")
    if seconds == 0:
        return 1
    return 1 + time_stride * max(1, round(seconds * fps / time_stride))


def num_frames_for(cfg: PipelineConfig, num_frames: int | None, seconds: float | None) -> int:
    """The pixel frame count of a request given as ``num_frames`` or ``seconds`` (neither: the preset's default)."""
    if num_frames is not None and seconds is not None:
        raise ValueError("give either num_frames or seconds, not both")
    if seconds is not None:
        return frames_for_seconds(seconds, cfg.fps, cfg.vae.time_stride)
    if num_frames is None:
        return frames_for_seconds(cfg.default_seconds, cfg.fps, cfg.vae.time_stride)
    stride = cfg.vae.time_stride
    if not isinstance(num_frames, int) or num_frames < 1 or (num_frames - 1) % stride:
        raise ValueError(f"num_frames must be 1 (an image) or 1 + {stride}k, got {num_frames!r}")
    return num_frames


def whole_pixel_frames(num_pixel_frames: int, time_stride: int) -> int:
    """The longest ``1 + s*k`` prefix of ``num_pixel_frames`` frames: what the causal VAE encodes whole."""
    if num_pixel_frames < 1:
        raise ValueError(f"need at least one frame, got {num_pixel_frames}")
    return num_pixel_frames - (num_pixel_frames - 1) % time_stride


def clip_seconds(cfg: PipelineConfig) -> float:
    """Duration of one video clip in seconds (5 s for the official models)."""
    return cfg.frames_per_clip / cfg.fps


def frames_of_clips(cfg: PipelineConfig, clips: int) -> int:
    """Pixel frames of the first frame followed by ``clips`` whole video clips."""
    return 1 + clips * cfg.frames_per_clip


def clips_in_seconds(cfg: PipelineConfig, seconds: float) -> int:
    """Whole video clips a duration of ``seconds`` covers."""
    return math.floor(seconds * cfg.fps / cfg.frames_per_clip)


def condition_clips(cfg: PipelineConfig, given_clips: int, total_latents: int) -> int:
    """Whole clips of a given video that video extension keeps: all it holds, but at most all clips of the output
    except its last (the reference conditions its 10 s output on the first 5 s of any longer input)."""
    fic = cfg.frames_inner_clip
    room = (total_latents - 2) // fic  # the forced 1 + c*fic latent frames must leave one to generate
    if given_clips >= 1 and room < 1:
        frames = 1 + cfg.frames_per_clip
        raise ValueError(f"video extension keeps at least the given video's first clip ({frames} frames, "
                         f"{clip_seconds(cfg):g} s) and generates after it, but the requested length "
                         f"({total_latents} latent frames) leaves nothing to generate after it; ask for more than "
                         f"{frames} frames ({clip_seconds(cfg):g} s)")
    return min(given_clips, max(room, 0))


# ----------------------------------------------------------------------------------------------
# Steps
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StepPlan:
    """The steps of one generation, plus how far clips past the RoPE range are shifted (see :func:`plan_steps`)."""

    steps: list[ScaleStep]
    # Clip ids >= this one reuse the positions of the last covered clip (None: every clip is in range).
    anchored_from_clip: int | None = None
    # (scale-axis, frame-axis) shift that moves a clip's positions to the previous clip's.
    clip_shift: tuple[int, int] = (0, 0)


def plan_steps(
    schedule: Sequence[Scale],
    *,
    image_repetition: Sequence[int],
    video_repetition: Sequence[int],
    semantic_scales: int,
    detail_scale_min_tokens: int,
    sampling: SamplingConfig,
    teacher_forced_scales: int = 0,
    frames_inner_clip: int = FRAMES_INNER_CLIP,
    rope_max_frames: int | None = None,
) -> StepPlan:
    """The step plan of ``schedule``, with RoPE positions kept inside what the model was trained on.

    For schedules longer than the model's RoPE frame range (long videos by temporal autoregression),
    every clip past the last covered clip C reuses clip C's RoPE frame offset and scale indices, and
    the loop moves the cached context of such a clip (the previous clip's last scale) back by one clip
    by re-rotating its keys (:func:`~.loop.generate_codes`). Positions never leave the trained range, and every
    query of a new clip sees its context at the relative offset it was trained with (one clip back), when
    C >= 2 (clips C-1 and C are both video clips of equal shape). What is not reproduced: the context's
    deeper-layer keys and values were computed while it sat at clip C's offset from the text, not clip
    C-1's; and with C = 1 the trained context of clip 1 is the first-frame image, so a video-clip context
    is an approximation there. Within range the plan is the reference's.
    """
    steps = build_step_plan(
        schedule,
        image_repetition=image_repetition,
        video_repetition=video_repetition,
        semantic_scales=semantic_scales,
        detail_scale_min_tokens=detail_scale_min_tokens,
        tau_image=sampling.tau_image,
        tau_video=sampling.tau_video,
        teacher_forced_scales=teacher_forced_scales,
        frames_inner_clip=frames_inner_clip,
    )
    if rope_max_frames is None or not steps or steps[-1].frames[1] <= rope_max_frames:
        return StepPlan(steps)
    t0 = schedule[0][0]
    covered_clips = (rope_max_frames - t0) // frames_inner_clip  # video clips whose frames fit in RoPE
    if covered_clips < 1:
        raise ValueError(f"the model's RoPE covers {rope_max_frames} latent frames: not one whole video clip of "
                         f"{frames_inner_clip} frames after the first frame")
    # RoPE scale index and frame offset of each step of the last covered clip, by (scale-in-clip, repeat).
    k = scales_per_clip(schedule)
    anchor = {(s.si % k, s.repeat): (s.rope_scale_index, s.frames[0]) for s in steps if s.clip_id == covered_clips}
    prev = {(s.si % k, s.repeat): (s.rope_scale_index, s.frames[0]) for s in steps if s.clip_id == covered_clips - 1}
    last = (k - 1, max(r for (si, r) in anchor if si == k - 1))
    shift = (anchor[last][0] - prev[last][0], anchor[last][1] - prev[last][1]) if last in prev else (0, 0)
    out = []
    for s in steps:
        if s.clip_id > covered_clips:
            rope_si, frame_ss = anchor[(s.si % k, s.repeat)]
            s = replace(s, rope_scale_index=rope_si, frames=(frame_ss, frame_ss + s.scale[0]))
        out.append(s)
    return StepPlan(out, anchored_from_clip=covered_clips + 1, clip_shift=shift)


def _config_steps(cfg: PipelineConfig, schedule: Sequence[Scale], sampling: SamplingConfig, *,
                  teacher_forced_scales: int = 0, rope_max_frames: int | None = None) -> StepPlan:
    return plan_steps(schedule, image_repetition=cfg.image_repetition, video_repetition=cfg.video_repetition,
                      semantic_scales=cfg.transformer.semantic_scales,
                      detail_scale_min_tokens=cfg.transformer.detail_scale_min_tokens, sampling=sampling,
                      teacher_forced_scales=teacher_forced_scales, frames_inner_clip=cfg.frames_inner_clip,
                      rope_max_frames=rope_max_frames)


def encode_latent_bits(cfg: PipelineConfig, latent: Tensor, schedule: Sequence[Scale]) -> MultiScaleEncoding:
    """Multi-scale BSQ of a VAE latent along ``schedule`` with the preset's repetitions and quantizer."""
    reps = scale_repetitions(schedule, cfg.image_repetition, cfg.video_repetition)
    return encode_to_bits(latent.float(), schedule, reps, cfg.quantizer, frames_inner_clip=cfg.frames_inner_clip)


# ----------------------------------------------------------------------------------------------
# The plan of one request
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GenerationPlan:
    """One text/image/video-to-video (or image) request: ``num_frames`` pixel frames over ``pyramid``.

    ``condition_frames`` is the pixel frame count of a conditioning input (1 for image-to-video, the video's for
    video extension; None for text only): its first frame and whole clips (at most all but the output's last) are
    forced. Every answer is derived from the fields, once, on first use.
    """

    config: PipelineConfig
    num_frames: int
    pyramid: tuple[Scale, ...]
    sampling: SamplingConfig
    condition_frames: int | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "pyramid", tuple(tuple(s) for s in self.pyramid))
        if self.condition_frames is not None and self.num_frames == 1:
            raise ValueError("a conditioning image or video needs num_frames > 1 (it is the video's start)")

    def with_condition(self, condition_frames: int) -> GenerationPlan:
        """This request conditioned on an input of ``condition_frames`` pixel frames."""
        return replace(self, condition_frames=condition_frames)

    @property
    def time_stride(self) -> int:
        return self.config.vae.time_stride

    @cached_property
    def latent_frames(self) -> int:
        """Latent frames of the output."""
        return latent_frames(self.num_frames, self.time_stride)

    @cached_property
    def schedule(self) -> list[Scale]:
        """The full scale schedule: the first-frame pyramid, then one pyramid per clip."""
        return video_scale_schedule(self.pyramid, self.latent_frames, self.config.frames_inner_clip)

    @cached_property
    def repetitions(self) -> list[int]:
        return scale_repetitions(self.schedule, self.config.image_repetition, self.config.video_repetition)

    @cached_property
    def clip_layout(self) -> list[ScalePackInfo]:
        return clip_layout(self.schedule, self.config.frames_inner_clip)

    @cached_property
    def detail_flags(self) -> list[bool]:
        """Per scale: True = detail head and 64-bit quantizer, False = semantic (both rules agree; checked)."""
        t = self.config.transformer
        return detail_scale_flags(self.schedule, t.semantic_scales, t.detail_scale_min_tokens)

    @property
    def scales_per_clip(self) -> int:
        return scales_per_clip(self.schedule)

    @property
    def num_clips(self) -> int:
        """Clips of the output, the first frame's included."""
        return len(self.schedule) // self.scales_per_clip

    @cached_property
    def clip_pixel_frames(self) -> list[int]:
        """Pixel frames each clip decodes to, in order (1 for the first frame, then ``t * time_stride``)."""
        ends = [self.clip_layout[(c + 1) * self.scales_per_clip - 1].frame_ee for c in range(self.num_clips)]
        starts = [0, *ends[:-1]]
        return [pixel_frames(e, self.time_stride) - (pixel_frames(s, self.time_stride) if s else 0)
                for s, e in zip(starts, ends)]

    # -- forced steps ------------------------------------------------------------------------------

    @cached_property
    def condition_clips(self) -> int:
        """Whole clips of the conditioning input that are kept (0 for an image or no condition)."""
        if self.condition_frames is None:
            return 0
        given = (self.condition_frames - 1) // self.config.frames_per_clip
        return condition_clips(self.config, given, self.latent_frames)

    @property
    def condition_pixel_frames(self) -> int:
        """Pixel frames of the conditioning input that are encoded: its first frame and kept clips."""
        return frames_of_clips(self.config, self.condition_clips)

    @property
    def forced_scales(self) -> int:
        """Leading scales whose bits come from the conditioning input (upstream ``gt_leak``)."""
        return 0 if self.condition_frames is None else self.scales_per_clip * (1 + self.condition_clips)

    @property
    def forced_latent_frames(self) -> int:
        return 0 if self.condition_frames is None else 1 + self.condition_clips * self.config.frames_inner_clip

    def check_condition(self) -> None:
        """Warn when a conditioning video ends in a partial clip that is dropped (not a longer video cut short)."""
        if self.condition_frames is None:
            return
        given = (self.condition_frames - 1) // self.config.frames_per_clip
        if self.condition_clips == given and self.condition_pixel_frames < self.condition_frames:
            warnings.warn(f"the conditioning video has {self.condition_frames} frames; only whole clips are kept "
                          f"({self.forced_latent_frames} latent frames = {self.condition_pixel_frames} frames)",
                          stacklevel=4)  # here, InfinityStarPipeline.__call__, torch.no_grad's wrapper, the caller

    def forced_bits(self, condition_latent: Tensor) -> list[Tensor]:
        """Bits of every forced step, from the VAE latent of the conditioning input's kept frames."""
        return encode_latent_bits(self.config, condition_latent, self.schedule[: self.forced_scales]).bits

    @cached_property
    def steps(self) -> StepPlan:
        return _config_steps(self.config, self.schedule, self.sampling, teacher_forced_scales=self.forced_scales,
                             rope_max_frames=self.config.transformer.rope_max_frames)

    @property
    def num_steps(self) -> int:
        """Transformer passes of the loop (one per scale repeat): the progress total."""
        return len(self.steps.steps)


@dataclass(frozen=True)
class InteractivePlan:
    """One interactive turn over ``pyramid``: its layout (conditions, decode window) and its steps."""

    config: PipelineConfig
    pyramid: tuple[Scale, ...]
    sampling: SamplingConfig

    @cached_property
    def layout(self) -> InteractiveSegmentLayout:
        cfg = self.config
        return interactive_layout_for(self.pyramid, cfg.frames_inner_clip, cfg.vae.time_stride)

    @property
    def repetitions(self) -> list[int]:
        return list(self.config.image_repetition)  # one per scale of the turn (PipelineConfig checks the length)

    @cached_property
    def steps(self) -> StepPlan:
        return _config_steps(self.config, list(self.layout.schedule), self.sampling)

    @property
    def num_steps(self) -> int:
        """Transformer passes of one turn (one per scale repeat): the progress total."""
        return len(self.steps.steps)

    @property
    def clip_pixel_frames(self) -> int:
        """Pixel frames each turn adds: one clip."""
        return self.layout.output_video_frames

    @property
    def first_segment_frames(self) -> int:
        """Pixel frames of segment 0 (a generated or given first frame plus one clip)."""
        return frames_of_clips(self.config, 1)

    @property
    def clip_seconds(self) -> int:
        """Whole seconds of one turn (the duration tag of its prompt)."""
        return self.clip_pixel_frames // self.config.fps

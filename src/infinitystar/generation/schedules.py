"""Spacetime scale schedules: pure functions over lists of (t, h, w) latent-unit scales.

A schedule is the first-frame pyramid (``K`` scales with t=1) followed by one pyramid of ``K``
scales per video clip (t = latent frames of that clip, at most ``frames_inner_clip``). The clip
layout rules below decide which latent frames each scale covers and which earlier scale it may
attend to (the last, full-resolution scale of the previous clip).

Contents, in reading order (all checked against golden/scale_schedules.json):
* clip layout: ``clip_layout`` -> ``ScalePackInfo`` (frames, attention references per scale);
* dynamic-resolution tables: ``base_ladder``, ``h_div_w_templates``, ``nearest_h_div_w_template``,
  ``parse_aspect_ratio``, ``image_scale_schedule``, ``pixel_size``, ``resolution_bucket``,
  ``video_scale_schedule``, ``build_scale_schedule`` (any 1 or 16*D+1 frames);
* repetitions and heads: ``parse_repetition`` (no eval), ``scale_repetitions``,
  ``rope_scale_indices``, ``uses_semantic_head`` / ``uses_detail_lfq`` / ``detail_scale_flags`` (the two
  semantic/detail rules, stated here only);
* frame counts: ``latent_frames`` / ``pixel_frames`` (the causal VAE's pixel <-> latent formula, stated here only);
* the generation loop's step plan: ``build_step_plan`` -> ``ScaleStep``;
* the interactive turn: ``interactive_layout_for`` -> ``InteractiveSegmentLayout``.

The official settings are the pipeline presets (``config.get_preset("pipeline", ...)``), stated there only;
tests/test_official_modes.py checks that they reproduce the reference's official modes. The reference's
whole-table dumps and its cost figures are rebuilt beside the tests (tests/reference_tables.py).
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

Scale = tuple[int, int, int]

FRAMES_INNER_CLIP = 20  # latent frames per video clip (5 s at 16 fps)


@dataclass(frozen=True)
class ScalePackInfo:
    """Where one scale sits in the clip layout.

    ``frame_ss:frame_ee`` are the latent frames of its clip; ``ref_sids`` the indices of the
    earlier scales whose cached keys it attends (besides the text and itself).
    """

    clip_id: int
    frame_ss: int
    frame_ee: int
    ref_sids: tuple[int, ...]


def first_full_spatial_size_scale_index(schedule: Sequence[Scale]) -> int:
    """Index of the first scale whose (h, w) equals the last scale's (h, w)."""
    if not schedule:
        raise ValueError("empty scale schedule")
    last_hw = tuple(schedule[-1][1:])
    for i, (_, h, w) in enumerate(schedule):
        if (h, w) == last_hw:
            return i
    raise AssertionError("unreachable")


def scales_per_clip(schedule: Sequence[Scale]) -> int:
    """Number of scales in each clip's pyramid (K): ``first_full_spatial_size_scale_index + 1``.

    Also the number of first-frame (image) scales: the reference's ``tower_split_index`` and ``scales_in_one_clip``.
    """
    return first_full_spatial_size_scale_index(schedule) + 1


def clip_layout(
    schedule: Sequence[Scale],
    frames_inner_clip: int = FRAMES_INNER_CLIP,
    context_from_largest_no: int = 1,
) -> list[ScalePackInfo]:
    """The reference's ``get_scale_pack_info`` for the elegant (clip20frames_v2) schedules.

    Clip 0 is the first frame ([0, t0)); clip c >= 1 starts at latent frame ``t0 + (c-1)*frames_inner_clip``
    whatever the previous clip's length. With ``context_from_largest_no=1`` (released setting) a scale of clip
    c >= 1 references exactly the last scale of clip c-1; with 0 it references every earlier scale.
    """
    k = scales_per_clip(schedule)
    if len(schedule) % k:
        raise ValueError(f"schedule of {len(schedule)} scales is not a whole number of {k}-scale clips")
    t0 = schedule[0][0]
    out = []
    for si, (t, _, _) in enumerate(schedule):
        clip = si // k
        frame_ss = 0 if clip == 0 else t0 + (clip - 1) * frames_inner_clip
        if clip == 0:
            refs: tuple[int, ...] = ()
        elif context_from_largest_no:
            refs = ((clip - 1) * k + k - 1,)
        else:
            refs = tuple(range(clip * k))
        out.append(ScalePackInfo(clip, frame_ss, frame_ss + t, refs))
    return out


# ==============================================================================================
# Dynamic-resolution tables (the reference's ``dynamic_resolution.py``)
# ==============================================================================================
#
# Every aspect ratio has one "ladder" of spatial sizes; a pixel budget ``pn`` takes a prefix of it.
# The numbers below are the reference's; the tables they produce are checked entry by entry against
# golden/scale_schedules.json.

# Spatial "side" levels: level s targets an area of s*s latent tokens (40x40 ~ 480p, 60x60 ~ 720p).
BASE_LEVELS: tuple[int, ...] = (1, 2, 3, 4, 5, 6, 7, 8, 10, 12, 16, 24, 32, 40, 60)
# Base aspect ratios (h / w) of the landscape ladders; every ratio != 1 also gets its transpose.
BASE_H_DIV_W: tuple[float, ...] = (1.0, 100 / 116, 3 / 4, 2 / 3, 9 / 16, 1 / 2, 2 / 5, 1 / 3)
# Pixel budget name -> number of ladder levels used (a prefix of BASE_LEVELS).
PN_NUM_SCALES: dict[str, int] = {"0.06M": 11, "0.25M": 13, "0.40M": 14, "0.90M": 15}

SPATIAL_STRIDE = 16  # pixels per latent token along h and w
TEMPORAL_STRIDE = 4  # pixel frames per latent frame after the causal first frame
FPS = 16  # frame rate of every official model (training and output)


def _round_half_even(x: float) -> int:
    # Python's round() on a float is exact round-half-to-even, the same as numpy's np.round.
    return int(round(x))


def base_ladder(h_div_w: float, levels: Sequence[int] = BASE_LEVELS) -> tuple[tuple[int, int], ...]:
    """The (h, w) latent grids of one aspect ratio, one per level.

    For level s: ``w_f = sqrt(s^2 / r)``, ``h_f = w_f * r`` and ``(h, w) = (round(h_f), round(w_f))``
    (round half to even). Note that h is rounded from the *unrounded* w_f: rounding w first and then
    ``h = round(w * r)`` (as training.md section 2.5 words it) gives different grids for 12 of the 15
    templates (e.g. (6, 8) instead of (7, 8) at 0.861).
    """
    if not h_div_w > 0:
        raise ValueError(f"h_div_w must be a positive number, got {h_div_w!r}")
    out = []
    for s in levels:
        w_f = math.sqrt(s * s / h_div_w)
        out.append((_round_half_even(w_f * h_div_w), _round_half_even(w_f)))
    return tuple(out)


def template_key(ladder: Sequence[tuple[int, int]]) -> float:
    """The reference's template key: ``int(1000 * h / w) / 1000`` of the ladder's largest grid."""
    h, w = ladder[-1]
    return int(1000 * h / w) / 1000


@functools.lru_cache(maxsize=1)
def _ladders() -> dict[float, tuple[tuple[int, int], ...]]:
    ladders: dict[float, tuple[tuple[int, int], ...]] = {}
    for ratio in BASE_H_DIV_W:
        ladder = base_ladder(ratio)
        variants = [ladder] if ratio == 1 else [ladder, tuple((w, h) for h, w in ladder)]
        for lad in variants:
            ladders[template_key(lad)] = lad
    return dict(sorted(ladders.items()))


def h_div_w_templates() -> tuple[float, ...]:
    """The 15 template keys, ascending: 0.336, 0.4, ..., 0.562 (16:9 landscape), ..., 1.0, ..., 2.971."""
    return tuple(_ladders())


def spatial_ladder(h_div_w_template: float) -> tuple[tuple[int, int], ...]:
    """All 15 (h, w) grids of a template key (exact key, see ``nearest_h_div_w_template``)."""
    ladders = _ladders()
    if h_div_w_template not in ladders:
        raise ValueError(
            f"unknown h/w template {h_div_w_template!r}; valid templates: {list(ladders)} "
            "(use nearest_h_div_w_template for an arbitrary ratio)"
        )
    return ladders[h_div_w_template]


def nearest_h_div_w_template(h_div_w: float) -> float:
    """The template key closest to ``h_div_w`` (minimum |h/w - key|; ties go to the smaller key).

    The keys are the truncated ratios of the largest grids, not the nominal ratios: 16:9 landscape
    is 0.562 (45x80), and the official scripts' hard-coded request ``0.571`` lands on it
    (|0.571 - 0.562| = 0.009, next key 0.671). Portrait 9:16 is 1.777.
    """
    if not (isinstance(h_div_w, (int, float)) and math.isfinite(h_div_w) and h_div_w > 0):
        raise ValueError(f"h_div_w must be a positive finite number, got {h_div_w!r}")
    return min(h_div_w_templates(), key=lambda key: abs(h_div_w - key))


def parse_aspect_ratio(aspect: str) -> float:
    """``"W:H"`` (screen convention, e.g. ``"16:9"`` landscape) -> the h/w ratio (``9/16``)."""
    parts = aspect.strip().split(":") if isinstance(aspect, str) else []
    try:
        w, h = (float(p) for p in parts)
    except ValueError:
        raise ValueError(f"aspect ratio must look like 'W:H' (e.g. '16:9'), got {aspect!r}") from None
    if not (w > 0 and h > 0 and math.isfinite(w) and math.isfinite(h)):
        raise ValueError(f"aspect ratio sides must be positive, got {aspect!r}")
    return h / w


def num_scales_for_pn(pn: str) -> int:
    """Number of spatial scales (K) of a pixel budget; ValueError names the valid budgets."""
    if pn not in PN_NUM_SCALES:
        raise ValueError(f"unknown pixel budget pn={pn!r}; valid: {list(PN_NUM_SCALES)}")
    return PN_NUM_SCALES[pn]


def image_scale_schedule(pn: str, h_div_w_template: float) -> list[Scale]:
    """The first-frame pyramid: the first K grids of the template's ladder, each with t = 1."""
    k = num_scales_for_pn(pn)
    return [(1, h, w) for h, w in spatial_ladder(h_div_w_template)[:k]]


def pixel_size(pn: str, h_div_w_template: float) -> tuple[int, int]:
    """Pixel (H, W) of the resolution bucket: 16 x the last grid of the pn's pyramid (480x848 for 0.40M 16:9)."""
    _, h, w = image_scale_schedule(pn, h_div_w_template)[-1]
    return SPATIAL_STRIDE * h, SPATIAL_STRIDE * w


def resolution_bucket(height: int, width: int, pn: str) -> tuple[float, tuple[int, int]]:
    """Bucket of an image/video of ``height x width`` pixels: (nearest template key, target pixel (H, W))."""
    if not (height > 0 and width > 0):
        raise ValueError(f"image size must be positive, got {height}x{width}")
    template = nearest_h_div_w_template(height / width)
    return template, pixel_size(pn, template)


# ----------------------------------------------------------------------------------------------
# Frame counts and spacetime schedules
# ----------------------------------------------------------------------------------------------


def latent_frames(num_pixel_frames: int, time_stride: int = TEMPORAL_STRIDE) -> int:
    """Latent frames of ``pixel_frames`` pixel frames through the causal VAE: ``1 + (F - 1) / s``.

    The first frame is encoded alone, then every ``time_stride`` frames make one latent frame; F must be
    ``1 + s*k``. Pass the VAE config's ``time_stride``; the default is the official VAE's.
    """
    f = num_pixel_frames
    if not isinstance(f, int) or f < 1 or (f - 1) % time_stride:
        raise ValueError(f"number of pixel frames must be 1 + {time_stride}k (1, {1 + time_stride}, "
                         f"{1 + 2 * time_stride}, ...), got {f!r}")
    return 1 + (f - 1) // time_stride


def pixel_frames(num_latent_frames: int, time_stride: int = TEMPORAL_STRIDE) -> int:
    """Pixel frames the causal VAE decodes from ``num_latent_frames`` latent frames: ``1 + (T - 1) * s``."""
    t = num_latent_frames
    if not isinstance(t, int) or t < 1:
        raise ValueError(f"latent frame count must be a positive int, got {t!r}")
    return 1 + (t - 1) * time_stride


def video_scale_schedule(
    image_schedule: Sequence[Scale], pt: int, frames_inner_clip: int = FRAMES_INNER_CLIP
) -> list[Scale]:
    """Image pyramid + one pyramid per clip for a video of ``pt`` latent frames.

    Clips hold ``frames_inner_clip`` latent frames; the last one holds the remainder
    ``(pt - 1) mod frames_inner_clip`` when that is not 0 (e.g. pt = 25 -> 1 + 20 + 4).
    ``pt = 1`` is the image schedule itself.
    """
    if not isinstance(pt, int) or pt < 1:
        raise ValueError(f"latent frame count pt must be a positive int, got {pt!r}")
    if not image_schedule or any(t != 1 for t, _, _ in image_schedule):
        raise ValueError("image_schedule must be a non-empty list of (1, h, w) scales")
    out = [tuple(s) for s in image_schedule]
    video_frames_left = pt - 1
    while video_frames_left > 0:
        t = min(frames_inner_clip, video_frames_left)
        out.extend((t, h, w) for _, h, w in image_schedule)
        video_frames_left -= t
    return out  # type: ignore[return-value]


def visual_tokens(schedule: Sequence[Scale]) -> int:
    """Distinct visual tokens of a schedule (sum of t*h*w, repetitions not counted)."""
    return sum(t * h * w for t, h, w in schedule)


def build_scale_schedule(pn: str, h_div_w_template: float, num_frames: int) -> list[Scale]:
    """The schedule for ``num_frames`` pixel frames: 1 (image) or a whole number of seconds (16*D + 1).

    Any whole-second length is accepted (17 = 1 s, 81 = 5 s, 161 = 10 s, 97 = 6 s -> 1 + 20 + 4 latent
    frames).
    """
    seconds_frames = FPS  # pixel frames per second
    if not isinstance(num_frames, int) or num_frames < 1 or (num_frames - 1) % seconds_frames:
        raise ValueError(
            f"num_frames must be 1 (image) or 16*seconds + 1 (17, 33, 49, 65, 81, ..., 161, ...), got {num_frames!r}"
        )
    return video_scale_schedule(image_scale_schedule(pn, h_div_w_template), latent_frames(num_frames))


# ==============================================================================================
# Repetitions, semantic/detail split, RoPE scale index
# ==============================================================================================

_REP_TOKEN = re.compile(r"\s*(?:(?P<int>\d+)|(?P<op>[\[\],*+]))")


def parse_repetition(spec: str | Sequence[int]) -> list[int]:
    """Parse a reference repetition string such as ``'[3]*12+[2,1]'`` into ``[3, ..., 3, 2, 1]``.

    Grammar (no ``eval``): ``expr := term ('+' term)*``, ``term := list ('*' INT)? | INT '*' list``,
    ``list := '[' INT (',' INT)* ']'``. Every count must be >= 1. A sequence of ints is validated and
    returned as a list. Anything else (names, calls, attribute access, ...) raises ValueError.
    """
    if not isinstance(spec, str):
        reps = list(spec)
        if not reps or any(not isinstance(r, int) or isinstance(r, bool) or r < 1 for r in reps):
            raise ValueError(f"repetitions must be a non-empty list of ints >= 1, got {spec!r}")
        return reps

    tokens: list[str] = []
    pos = 0
    text = spec.strip()
    while pos < len(text):
        m = _REP_TOKEN.match(text, pos)
        if m is None or m.end() == pos:
            raise ValueError(f"invalid repetition string {spec!r}: unexpected text at {text[pos:]!r}")
        tokens.append(m.group("int") or m.group("op"))
        pos = m.end()
        while pos < len(text) and text[pos].isspace():
            pos += 1
    if not tokens:
        raise ValueError(f"empty repetition string {spec!r}")

    def bad(why: str) -> ValueError:
        return ValueError(f"invalid repetition string {spec!r}: {why}")

    i = 0

    def peek() -> str | None:
        return tokens[i] if i < len(tokens) else None

    def take_int() -> int:
        nonlocal i
        tok = peek()
        if tok is None or not tok.isdigit():
            raise bad(f"expected an integer, got {tok!r}")
        i += 1
        return int(tok)

    def take(op: str) -> None:
        nonlocal i
        if peek() != op:
            raise bad(f"expected {op!r}, got {peek()!r}")
        i += 1

    def take_list() -> list[int]:
        take("[")
        items = [take_int()]
        while peek() == ",":
            take(",")
            items.append(take_int())
        take("]")
        return items

    out: list[int] = []
    while True:
        if peek() == "[":
            items = take_list()
            if peek() == "*":
                take("*")
                items = items * take_int()
        else:
            n = take_int()
            take("*")
            items = take_list() * n
        out.extend(items)
        if peek() is None:
            break
        take("+")
    if not out or any(r < 1 for r in out):
        raise bad("every repetition count must be >= 1 and the list must not be empty")
    return out


def scale_repetitions(
    schedule: Sequence[Scale], image_repetition: Sequence[int], video_repetition: Sequence[int]
) -> list[int]:
    """Repeats per scale: the image list for the first K scales, the video list (by clip-relative index) after.

    Both lists must have K entries (the reference indexes them by ``si % K``).
    """
    k = scales_per_clip(schedule)
    for name, reps in (("image_repetition", image_repetition), ("video_repetition", video_repetition)):
        if len(reps) != k:
            raise ValueError(f"{name} has {len(reps)} entries but the schedule has {k} scales per clip: {list(reps)}")
        if any(r < 1 for r in reps):
            raise ValueError(f"{name} entries must be >= 1, got {list(reps)}")
    return [image_repetition[si] if si < k else video_repetition[si % k] for si in range(len(schedule))]


def rope_scale_indices(repetitions: Sequence[int]) -> list[list[int]]:
    """RoPE scale index of every (scale, repeat) step: running count of steps (``real_si = cum + r``)."""
    out, cum = [], 0
    for reps in repetitions:
        out.append(list(range(cum, cum + reps)))
        cum += reps
    return out


def uses_semantic_head(si: int, scales_per_clip: int, semantic_scales: int) -> bool:
    """The transformer's rule: the 16-bit semantic head predicts clip-relative scales ``si % K < semantic_scales``."""
    return si % scales_per_clip < semantic_scales


def uses_detail_lfq(scale: Scale, detail_scale_min_tokens: int) -> bool:
    """The quantizer's rule: a scale with ``h*w >= detail_scale_min_tokens`` uses the 64-bit detail BSQ."""
    _, h, w = scale
    return h * w >= detail_scale_min_tokens


def detail_scale_flags(
    schedule: Sequence[Scale], semantic_scales: int, detail_scale_min_tokens: int, *, strict: bool = True
) -> list[bool]:
    """Per scale: True = detail (64 bits), False = semantic (16 bits), by the head rule.

    The reference decides twice with two rules (head: ``si % K >= semantic_scales``; quantizer:
    ``h*w >= detail_scale_min_tokens``). They agree for the released settings on every template;
    with ``strict`` a disagreement raises, so one flag per scale can drive both.
    """
    k = scales_per_clip(schedule)
    flags = []
    for si, scale in enumerate(schedule):
        head_detail = not uses_semantic_head(si, k, semantic_scales)
        if strict and head_detail != uses_detail_lfq(scale, detail_scale_min_tokens):
            raise ValueError(
                f"scale {si} {tuple(scale)}: head rule (si % {k} < semantic_scales={semantic_scales}) and quantizer "
                f"rule (h*w >= detail_scale_min_tokens={detail_scale_min_tokens}) disagree"
            )
        flags.append(head_detail)
    return flags


# ==============================================================================================
# Per-step plan of the generation loop
# ==============================================================================================


@dataclass(frozen=True)
class ScaleStep:
    """One transformer pass of the generation loop: repeat ``repeat`` of scale ``si``.

    ``rope_scale_index`` is the step's position on the RoPE scale axis (add the text offset, 512 in
    the official model). ``ref_sids`` are the earlier scales whose cached K/V this step attends
    (besides the text, any interactive conditions and itself). Only the last repeat's K/V are cached
    (``is_last_repeat``).
    """

    si: int
    repeat: int
    num_repeats: int
    rope_scale_index: int
    scale: Scale
    clip_id: int
    frames: tuple[int, int]
    ref_sids: tuple[int, ...]
    detail_head: bool
    detail_lfq: bool
    bits: int
    tau: float
    teacher_forced: bool

    @property
    def query_tokens(self) -> int:
        t, h, w = self.scale
        return t * h * w

    @property
    def is_last_repeat(self) -> bool:
        return self.repeat == self.num_repeats - 1


def build_step_plan(
    schedule: Sequence[Scale],
    *,
    image_repetition: Sequence[int],
    video_repetition: Sequence[int],
    semantic_scales: int,
    detail_scale_min_tokens: int,
    tau_image: float = 1.0,
    tau_video: float = 0.4,
    teacher_forced_scales: int = 0,
    semantic_bits: int = 16,
    detail_bits: int = 64,
    frames_inner_clip: int = FRAMES_INNER_CLIP,
    context_from_largest_no: int = 1,
    strict: bool = True,
) -> list[ScaleStep]:
    """Every (scale, repeat) step of the reference's AR loop over ``schedule``, in execution order.

    Image scales (the first K) use ``image_repetition`` and ``tau_image``, the others
    ``video_repetition`` (by clip-relative index) and ``tau_video``. The first
    ``teacher_forced_scales`` scales (upstream ``gt_leak``; I2V: K, V2V: 2K) take their bits from the
    conditioning input. ``strict`` requires the head and quantizer semantic/detail rules to agree.
    """
    schedule = [tuple(s) for s in schedule]
    reps = scale_repetitions(schedule, image_repetition, video_repetition)
    layout = clip_layout(schedule, frames_inner_clip, context_from_largest_no)
    k = scales_per_clip(schedule)
    detail = detail_scale_flags(schedule, semantic_scales, detail_scale_min_tokens, strict=strict)
    steps = []
    for si, (scale, n_rep, rope_ids, info) in enumerate(zip(schedule, reps, rope_scale_indices(reps), layout)):
        for r, rope_id in enumerate(rope_ids):
            steps.append(
                ScaleStep(
                    si=si,
                    repeat=r,
                    num_repeats=n_rep,
                    rope_scale_index=rope_id,
                    scale=scale,  # type: ignore[arg-type]
                    clip_id=info.clip_id,
                    frames=(info.frame_ss, info.frame_ee),
                    ref_sids=info.ref_sids,
                    detail_head=detail[si],
                    detail_lfq=uses_detail_lfq(scale, detail_scale_min_tokens),  # type: ignore[arg-type]
                    bits=detail_bits if detail[si] else semantic_bits,
                    tau=tau_image if si < k else tau_video,
                    teacher_forced=si < teacher_forced_scales,
                )
            )
    return steps


# ==============================================================================================
# Interactive long-video mode (``infinity_star_interact``)
# ==============================================================================================

INTERACT_SEMANTIC_SCALE_INDEX = 7  # the semantic condition is area-downsampled to this clip scale's grid
INTERACT_SEMANTIC_ROPE_SCALE_ID = 800
INTERACT_DETAIL_ROPE_SCALE_ID = 801


@dataclass(frozen=True)
class InteractiveSegmentLayout:
    """Layout of one interactive turn (turn i >= 1), all frame indices in latent frames.

    The turn keeps a 21-frame context latent ``former`` (frame 0 = last frame of the segment before
    the previous one, frames 1..20 = the previous segment) and the story's first latent frame.
    * The generated clip: ``schedule`` (K scales (20, h, w)), RoPE frames ``frames`` = [0, 20), no
      scale references; every step attends text + both conditions + itself.
    * Semantic condition: ``former[semantic_source]`` (the previous segment) area-downsampled to
      ``semantic_condition_scale``, RoPE scale id 800, RoPE frames 1..20.
    * Detail condition: the story's first latent frame + ``former[:, :, detail_former_frames]`` (by default
      the previous segment's last two frames, former frames 19, 20) at full resolution, RoPE scale id 801,
      RoPE frames 0 and the same former indices (0, 19, 20).
    * Both conditions attend only their own tokens (not the text, not each other); the steps attend both.
    * Decode ``cat(former[1:], new)`` (40 latent frames) and keep the last ``output_video_frames``
      pixel frames; the next ``former`` is the last 21 latent frames of that concatenation.
    """

    schedule: tuple[Scale, ...]
    frames: tuple[int, int]
    semantic_condition_scale: Scale
    semantic_rope_scale_id: int
    semantic_rope_frames: tuple[int, ...]
    semantic_source: tuple[int, int]
    detail_condition_scale: Scale
    detail_rope_scale_id: int
    detail_rope_frames: tuple[int, ...]
    detail_former_frames: tuple[int, ...]  # indices into ``former`` (previous segment = former frames 1..clip)
    context_latent_frames: int
    decode_latent_frames: int
    output_video_frames: int
    prefix_passes: int  # text + semantic condition + detail condition


def interactive_layout_for(pyramid: Sequence[Scale], frames_inner_clip: int = FRAMES_INNER_CLIP,
                           time_stride: int = TEMPORAL_STRIDE, *,
                           semantic_scale_index: int = INTERACT_SEMANTIC_SCALE_INDEX,
                           detail_frame_inds: Sequence[int] | None = None) -> InteractiveSegmentLayout:
    """The interactive turn layout over any image pyramid: its grids at t = ``frames_inner_clip``.

    The semantic condition uses the grid of clip scale ``semantic_scale_index`` (7, the released model), or the
    last grid of a shorter pyramid. ``detail_frame_inds`` (upstream's name) picks the detail condition's frames of
    the previous segment, 0-based within it; default its last two (upstream's [18, 19]).
    """
    clip = frames_inner_clip
    schedule = tuple((clip, h, w) for _, h, w in pyramid)
    if semantic_scale_index < 0:
        raise ValueError(f"semantic_scale_index must be >= 0, got {semantic_scale_index}")
    _, h7, w7 = schedule[min(semantic_scale_index, len(schedule) - 1)]
    _, full_h, full_w = schedule[-1]
    # Default: the previous segment's last two frames (its only one when a clip is one latent frame).
    inds = tuple(range(max(clip - 2, 0), clip)) if detail_frame_inds is None else tuple(map(int, detail_frame_inds))
    if not inds or any(not 0 <= i < clip for i in inds):
        raise ValueError(f"detail_frame_inds must be non-empty frame indices in 0..{clip - 1} of the previous "
                         f"segment, got {list(inds)}")
    # Previous-segment frame i is former frame i + 1 (former frame 0 is the frame before the segment), and the
    # reference's RoPE frame of each detail frame is that former index; the story's first frame sits at 0.
    former_frames = tuple(i + 1 for i in inds)
    return InteractiveSegmentLayout(
        schedule=schedule,
        frames=(0, clip),
        semantic_condition_scale=(clip, h7, w7),
        semantic_rope_scale_id=INTERACT_SEMANTIC_ROPE_SCALE_ID,
        semantic_rope_frames=tuple(range(1, clip + 1)),
        semantic_source=(1, clip + 1),
        detail_condition_scale=(1 + len(former_frames), full_h, full_w),
        detail_rope_scale_id=INTERACT_DETAIL_ROPE_SCALE_ID,
        detail_rope_frames=(0, *former_frames),
        detail_former_frames=former_frames,
        context_latent_frames=clip + 1,
        decode_latent_frames=2 * clip,
        output_video_frames=clip * time_stride,
        prefix_passes=3,
    )

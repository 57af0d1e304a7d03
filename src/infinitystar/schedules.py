"""Spacetime scale schedules: pure functions over lists of (t, h, w) latent-unit scales.

A schedule is the first-frame pyramid (``K`` scales with t=1) followed by one pyramid of ``K``
scales per video clip (t = latent frames of that clip, at most ``frames_inner_clip``). The clip
layout rules below decide which latent frames each scale covers and which earlier scale it may
attend to (the last, full-resolution scale of the previous clip).

Contents, in reading order (all checked against golden/scale_schedules.json):
* clip layout: ``clip_layout`` -> ``ScalePackInfo`` (frames, attention references per scale);
* dynamic-resolution tables: ``base_ladder``, ``h_div_w_templates``, ``nearest_h_div_w_template``,
  ``parse_aspect_ratio``, ``image_scale_schedule``, ``pixel_size``, ``resolution_bucket``,
  ``pt2scale_schedule``, ``schedule_table``, ``build_scale_schedule`` (any 1 or 16*D+1 frames);
* repetitions and heads: ``parse_repetition`` (no eval), ``scale_repetitions``,
  ``rope_scale_indices``, ``tower_split_index``, ``detail_scale_flags``;
* the generation loop's step plan: ``build_step_plan`` -> ``ScaleStep``;
* the interactive turn: ``interactive_segment_layout``;
* the official modes as data: ``OFFICIAL_MODES`` / ``get_mode`` -> ``InferenceMode``;
* cost figures: ``plan_cost`` / ``mode_cost``.
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
    """Number of scales in each clip's pyramid (K): ``first_full_spatial_size_scale_index + 1``."""
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
LATENT_FRAMES_PER_SECOND = FPS // TEMPORAL_STRIDE  # 4: schedules exist for whole seconds only

SCHEDULE_ELEGANT = "infinity_elegant_clip20frames_v2"  # T2I / T2V / I2V / V2V models
SCHEDULE_INTERACT = "infinity_star_interact"  # interactive model: identical tables


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


def latent_frames(num_frames: int) -> int:
    """Latent frames of a clip of ``num_frames`` pixel frames: 1 + (F - 1) / 4 (causal VAE)."""
    if not isinstance(num_frames, int) or num_frames < 1 or (num_frames - 1) % TEMPORAL_STRIDE:
        raise ValueError(f"number of pixel frames must be 1 + 4k (1, 5, 9, ..., 81, ...), got {num_frames!r}")
    return 1 + (num_frames - 1) // TEMPORAL_STRIDE


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


def _table_latent_frames(video_frames: int) -> int:
    # The reference sizes its tables by ``video_frames // 4 + 1`` and asserts whole 20-frame clips.
    if (
        not isinstance(video_frames, int)
        or video_frames < 1
        or (video_frames - 1) % (TEMPORAL_STRIDE * FRAMES_INNER_CLIP)
    ):
        raise ValueError(f"table video_frames must be 1 + 80k (81 = 5 s, 161 = 10 s, 241, ...), got {video_frames!r}")
    return latent_frames(video_frames)


def pt2scale_schedule(pn: str, h_div_w_template: float, video_frames: int = 81) -> dict[int, list[Scale]]:
    """The reference's ``pt2scale_schedule``: latent frame count -> full scale list.

    Keys are ``pt = 1`` (image) and every whole second ``pt = 5, 9, ..., video_frames // 4 + 1``;
    other pt are not in the table (training samples whole seconds).
    """
    pt_max = _table_latent_frames(video_frames)
    image = image_scale_schedule(pn, h_div_w_template)
    return {
        pt: video_scale_schedule(image, pt)
        for pt in [1, *range(1 + LATENT_FRAMES_PER_SECOND, pt_max + 1, LATENT_FRAMES_PER_SECOND)]
    }


def scales_in_one_clip(pn: str) -> int:
    """Scales per clip pyramid (K) of a pixel budget; the reference's ``image_scales`` as well."""
    return num_scales_for_pn(pn)


def max_video_scales(pn: str, video_frames: int = 81) -> int:
    """Length of the longest schedule of the table: K x (1 + number of 20-frame clips)."""
    pt_max = _table_latent_frames(video_frames)
    return num_scales_for_pn(pn) * (1 + (pt_max - 1) // FRAMES_INNER_CLIP)


def visual_tokens(schedule: Sequence[Scale]) -> int:
    """Distinct visual tokens of a schedule (sum of t*h*w, repetitions not counted)."""
    return sum(t * h * w for t, h, w in schedule)


def visual_tokens_per_pt(pn: str, h_div_w_template: float, video_frames: int = 81) -> dict[int, int]:
    """``visual_tokens`` of every schedule of the table, by pt."""
    return {pt: visual_tokens(s) for pt, s in pt2scale_schedule(pn, h_div_w_template, video_frames).items()}


@dataclass(frozen=True)
class ScheduleTable:
    """One (video_frames, template, pn) entry of the reference's dynamic-resolution table."""

    pixel: tuple[int, int]
    scales_in_one_clip: int
    max_video_scales: int
    pt2scale_schedule: dict[int, list[Scale]]
    visual_tokens_per_pt: dict[int, int]


def schedule_table(pn: str, h_div_w_template: float, video_frames: int = 81) -> ScheduleTable:
    """All fields the reference stores for one (video_frames, template, pn)."""
    table = pt2scale_schedule(pn, h_div_w_template, video_frames)
    return ScheduleTable(
        pixel=pixel_size(pn, h_div_w_template),
        scales_in_one_clip=scales_in_one_clip(pn),
        max_video_scales=max_video_scales(pn, video_frames),
        pt2scale_schedule=table,
        visual_tokens_per_pt={pt: visual_tokens(s) for pt, s in table.items()},
    )


def build_scale_schedule(pn: str, h_div_w_template: float, num_frames: int) -> list[Scale]:
    """The schedule for ``num_frames`` pixel frames: 1 (image) or a whole number of seconds (16*D + 1).

    Any whole-second length is accepted (17 = 1 s, 81 = 5 s, 161 = 10 s, 97 = 6 s -> 1 + 20 + 4 latent
    frames). Note that upstream's generation loop only handles video clips of equal length; a short last
    clip needs the clean per-clip accumulation grid (``ScaleStep.clip_grid``).
    """
    seconds_frames = FPS  # pixel frames per second
    if not isinstance(num_frames, int) or num_frames < 1 or (num_frames - 1) % seconds_frames:
        raise ValueError(
            f"num_frames must be 1 (image) or 16*seconds + 1 (17, 33, 49, 65, 81, ..., 161, ...), got {num_frames!r}"
        )
    return video_scale_schedule(image_scale_schedule(pn, h_div_w_template), latent_frames(num_frames))


def interactive_segment_schedule(pn: str = "0.40M", h_div_w_template: float = 0.562) -> list[Scale]:
    """One interactive turn: the clip pyramid of the 5 s table, ``pt2scale_schedule[21][K:]`` (K scales (20, h, w))."""
    image = image_scale_schedule(pn, h_div_w_template)
    return [(FRAMES_INNER_CLIP, h, w) for _, h, w in image]


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


def format_repetition(reps: Sequence[int]) -> str:
    """Compact reference-style string of a repetition list (``[3]*12+[2,1]``); parse_repetition inverts it."""
    parts: list[str] = []
    singles: list[int] = []
    i = 0
    while i < len(reps):
        j = i
        while j < len(reps) and reps[j] == reps[i]:
            j += 1
        if j - i > 1:
            if singles:
                parts.append(f"[{','.join(map(str, singles))}]")
                singles = []
            parts.append(f"[{reps[i]}]*{j - i}")
        else:
            singles.append(reps[i])
        i = j
    if singles:
        parts.append(f"[{','.join(map(str, singles))}]")
    return "+".join(parts)


def tower_split_index(schedule: Sequence[Scale]) -> int:
    """Number of first-frame (image) scales: ``first_full_spatial_size_scale_index + 1`` (= K)."""
    return first_full_spatial_size_scale_index(schedule) + 1


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


def rope_scale_table_size(
    image_repetition: Sequence[int], video_repetition: Sequence[int], max_video_scales: int, margin: int = 10
) -> int:
    """Rows the reference allots on the RoPE scale axis after the text: Σimg + Σvid·(video clips) + margin.

    (720p/81 frames: 45 + 40 + 10 = 95.) The interactive model uses a fixed 1000 + 10 because its
    conditions sit at scale ids 800/801.
    """
    k = len(image_repetition)
    if max_video_scales % k:
        raise ValueError(f"max_video_scales={max_video_scales} is not a multiple of K={k}")
    return sum(image_repetition) + sum(video_repetition) * (max_video_scales // k - 1) + margin


def uses_semantic_head(si: int, scales_in_clip: int, semantic_scales: int) -> bool:
    """The transformer's rule: the 16-bit semantic head predicts clip-relative scales ``si % K < semantic_scales``."""
    return si % scales_in_clip < semantic_scales


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
    (besides the text and itself); ``extra_kv_tokens`` counts other cached context tokens (the
    interactive conditions). Only the last repeat's K/V are cached (``is_last_repeat``).
    ``clip_grid`` is the (t, H, W) grid the clip's codes accumulate into: the clip's own t at the
    full spatial size (upstream uses the *last* scale of the schedule, which is the same for
    equal-length clips and breaks for a short last clip).
    """

    si: int
    repeat: int
    num_repeats: int
    rope_scale_index: int
    scale: Scale
    clip_id: int
    frames: tuple[int, int]
    ref_sids: tuple[int, ...]
    ref_tokens: int
    extra_kv_tokens: int
    detail_head: bool
    detail_lfq: bool
    bits: int
    tau: float
    teacher_forced: bool
    clip_grid: Scale

    @property
    def query_tokens(self) -> int:
        t, h, w = self.scale
        return t * h * w

    @property
    def visual_kv_tokens(self) -> int:
        """Visual keys this step attends (text excluded): itself + referenced scales + conditions."""
        return self.query_tokens + self.ref_tokens + self.extra_kv_tokens

    @property
    def is_last_repeat(self) -> bool:
        return self.repeat == self.num_repeats - 1

    @property
    def head(self) -> str:
        return "detail" if self.detail_head else "semantic"

    @property
    def lfq(self) -> str:
        return "detail" if self.detail_lfq else "semantic"


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
    extra_kv_tokens: int = 0,
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
    _, full_h, full_w = schedule[-1]
    steps = []
    for si, (scale, n_rep, rope_ids, info) in enumerate(zip(schedule, reps, rope_scale_indices(reps), layout)):
        ref_tokens = sum(schedule[r][0] * schedule[r][1] * schedule[r][2] for r in info.ref_sids)
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
                    ref_tokens=ref_tokens,
                    extra_kv_tokens=extra_kv_tokens,
                    detail_head=detail[si],
                    detail_lfq=uses_detail_lfq(scale, detail_scale_min_tokens),  # type: ignore[arg-type]
                    bits=detail_bits if detail[si] else semantic_bits,
                    tau=tau_image if si < k else tau_video,
                    teacher_forced=si < teacher_forced_scales,
                    clip_grid=(scale[0], full_h, full_w),
                )
            )
    return steps


# ==============================================================================================
# Interactive long-video mode (``infinity_star_interact``)
# ==============================================================================================

INTERACT_SEMANTIC_SCALE_INDEX = 7  # the semantic condition is area-downsampled to this clip scale's grid
INTERACT_SEMANTIC_ROPE_SCALE_ID = 800
INTERACT_DETAIL_ROPE_SCALE_ID = 801
INTERACT_ROPE_SCALE_TABLE_SIZE = 1000 + 10


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

    @property
    def extra_condition_tokens(self) -> int:
        """Condition tokens every step attends (text excluded): 1320 + 4770 = 6090 at 480p 16:9."""
        return visual_tokens([self.semantic_condition_scale, self.detail_condition_scale])


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


def interactive_segment_layout(pn: str = "0.40M", h_div_w_template: float = 0.562) -> InteractiveSegmentLayout:
    """The interactive turn layout for a pixel budget and template (the released model: 0.40M)."""
    pyramid = image_scale_schedule(pn, h_div_w_template)
    if len(pyramid) <= INTERACT_SEMANTIC_SCALE_INDEX:
        raise ValueError(f"pn={pn!r} has {len(pyramid)} scales; the interactive mode needs more than 7")
    return interactive_layout_for(pyramid)


# ==============================================================================================
# The official inference modes
# ==============================================================================================


@dataclass(frozen=True)
class InferenceMode:
    """Settings of one official inference mode (the upstream scripts' hard-coded values).

    ``video_frames`` sizes the tables (81 or 161); ``latent_frames`` is the pt of the schedule that
    is generated (1 = image). ``teacher_forced_scales`` is upstream's ``gt_leak`` (0 = none).
    """

    name: str
    task: str  # "t2v" | "i2v" | "v2v" | "t2i" | "interact"
    pn: str
    video_frames: int
    latent_frames: int
    h_div_w_template: float
    image_repetition: tuple[int, ...]
    video_repetition: tuple[int, ...]
    tau_image: float
    tau_video: float
    guidance: str  # "apg" | "cfg"
    guidance_scale: float
    apg_norm_threshold: float | None
    semantic_scales: int
    detail_scale_min_tokens: int
    teacher_forced_scales: int = 0
    seed: int = 41
    interactive: bool = False

    @property
    def pixel_size(self) -> tuple[int, int]:
        return pixel_size(self.pn, self.h_div_w_template)

    def schedule(self) -> list[Scale]:
        if self.interactive:
            return interactive_segment_schedule(self.pn, self.h_div_w_template)
        return pt2scale_schedule(self.pn, self.h_div_w_template, self.video_frames)[self.latent_frames]

    def interactive_layout(self) -> InteractiveSegmentLayout | None:
        return interactive_segment_layout(self.pn, self.h_div_w_template) if self.interactive else None

    def step_plan(self) -> list[ScaleStep]:
        layout = self.interactive_layout()
        return build_step_plan(
            self.schedule(),
            image_repetition=self.image_repetition,
            video_repetition=self.video_repetition,
            semantic_scales=self.semantic_scales,
            detail_scale_min_tokens=self.detail_scale_min_tokens,
            tau_image=self.tau_image,
            tau_video=self.tau_video,
            teacher_forced_scales=self.teacher_forced_scales,
            extra_kv_tokens=layout.extra_condition_tokens if layout else 0,
        )


def _official_modes() -> dict[str, InferenceMode]:
    rep720_img, rep720_vid = tuple(parse_repetition("[3]*15")), tuple(parse_repetition("[3]*12+[2,1,1]"))
    rep480_img, rep480_vid = tuple(parse_repetition("[3]*14")), tuple(parse_repetition("[3]*12+[2,1]"))
    p720 = dict(
        pn="0.90M",
        video_frames=81,
        h_div_w_template=0.562,
        image_repetition=rep720_img,
        video_repetition=rep720_vid,
        tau_image=1.0,
        tau_video=0.4,
        guidance="apg",
        guidance_scale=34.0,
        apg_norm_threshold=0.05,
        semantic_scales=12,
        detail_scale_min_tokens=750,
    )
    p480 = dict(
        p720,
        pn="0.40M",
        image_repetition=rep480_img,
        video_repetition=rep480_vid,
        semantic_scales=11,
        detail_scale_min_tokens=350,
    )
    k720, k480 = PN_NUM_SCALES["0.90M"], PN_NUM_SCALES["0.40M"]
    modes = [
        InferenceMode("t2v_720p_5s", "t2v", latent_frames=21, **p720),
        InferenceMode("i2v_720p_5s", "i2v", latent_frames=21, teacher_forced_scales=k720, **p720),
        InferenceMode("t2v_480p_5s", "t2v", latent_frames=21, **p480),
        InferenceMode("i2v_480p_5s", "i2v", latent_frames=21, teacher_forced_scales=k480, **p480),
        InferenceMode("t2v_480p_10s", "t2v", latent_frames=41, **dict(p480, video_frames=161)),
        InferenceMode(
            "i2v_480p_10s", "i2v", latent_frames=41, teacher_forced_scales=k480, **dict(p480, video_frames=161)
        ),
        # V2V forces the first frame and the first 5 s clip; clip 2 (5-10 s) is generated.
        InferenceMode(
            "v2v_480p_10s", "v2v", latent_frames=41, teacher_forced_scales=2 * k480, **dict(p480, video_frames=161)
        ),
        # No upstream T2I script: what the pt=1 schedule of the video models would run (guidance assumed).
        InferenceMode("t2i_720p_no_script", "t2i", latent_frames=1, **p720),
        InferenceMode("t2i_480p_no_script", "t2i", latent_frames=1, **p480),
        # One turn of tools/infer_interact_480p.py: the single-clip schedule uses the image list.
        InferenceMode(
            "interact_480p_segment",
            "interact",
            latent_frames=21,
            seed=0,
            interactive=True,
            **dict(
                p480,
                video_frames=161,
                image_repetition=rep480_vid,
                tau_image=0.5,
                tau_video=0.5,
                guidance="cfg",
                guidance_scale=3.0,
                apg_norm_threshold=None,
            ),
        ),
    ]
    return {m.name: m for m in modes}


OFFICIAL_MODES: dict[str, InferenceMode] = _official_modes()


def get_mode(name: str) -> InferenceMode:
    """An official mode by name; ValueError lists the valid names."""
    if name not in OFFICIAL_MODES:
        raise ValueError(f"unknown inference mode {name!r}; valid: {list(OFFICIAL_MODES)}")
    return OFFICIAL_MODES[name]


# ==============================================================================================
# Cost figures (inference.md section 8)
# ==============================================================================================


@dataclass(frozen=True)
class CostModelDims:
    """Transformer sizes for the FLOP estimate (defaults: the official 8B ``infinity_qwen8b``)."""

    depth: int = 36
    embed_dim: int = 4096
    kv_dim: int = 1024  # 8 KV heads x 128
    ffn: int = 16384

    @property
    def linear_params_per_layer(self) -> int:
        c = self.embed_dim
        return 2 * c * c + 2 * c * self.kv_dim + 3 * c * self.ffn  # q, o, k, v, SwiGLU gate/up/down

    @property
    def block_params_total(self) -> int:
        return self.depth * self.linear_params_per_layer

    @property
    def linear_flop_per_token(self) -> int:
        return 2 * self.block_params_total

    @property
    def attn_flop_per_qk_pair(self) -> int:
        return 4 * self.embed_dim * self.depth  # QK^T and PV, 2 FLOP per multiply-add each


@dataclass(frozen=True)
class PlanCost:
    """Token counts and FLOP estimate of one step plan (per CFG branch unless named otherwise)."""

    visual_forward_steps: int
    total_forward_passes: int
    visual_query_tokens: int
    sum_q_times_kv_visual: int
    distinct_latent_tokens: int
    largest_step_query_tokens: int
    share_query_tokens_last_scale: float
    share_query_tokens_top3_scales_per_clip: float
    linear_flop: float
    attention_flop: float
    share_flop_last_scale: float

    @property
    def total_flop(self) -> float:
        return self.linear_flop + self.attention_flop

    def seconds_at(self, flop_per_second: float = 400e12) -> float:
        return self.total_flop / flop_per_second


def plan_cost(
    steps: Sequence[ScaleStep],
    *,
    text_tokens: int = 128,
    condition_tokens: int = 0,
    condition_passes: int = 0,
    batch: int = 2,
    dims: CostModelDims | None = None,
) -> PlanCost:
    """Cost of a step plan, the way inference.md section 8 counts it.

    Linear work: every query token of the text pass, the condition passes and the visual steps.
    Attention work: each visual step's queries x (visual keys + text keys), the text pass
    (text x text), and the condition tokens counted as one block attending themselves and the text
    (the golden estimate's convention; two separate condition passes would be ~0.4% less).
    ``batch`` = 2 with guidance (conditional + unconditional rows).
    """
    if not steps:
        raise ValueError("empty step plan")
    dims = dims or CostModelDims()
    lin, att = dims.linear_flop_per_token, dims.attn_flop_per_qk_pair
    q_total = sum(s.query_tokens for s in steps)
    qk_visual = sum(s.query_tokens * s.visual_kv_tokens for s in steps)
    last_si = steps[-1].si
    k = max(s.si for s in steps if s.clip_id == 0) + 1
    last_steps = [s for s in steps if s.si == last_si]
    clip_last = {s.si: s for s in steps if s.si % k == k - 1}
    _, full_h, full_w = steps[-1].clip_grid

    def step_flop(s: ScaleStep) -> float:
        return batch * (s.query_tokens * lin + att * s.query_tokens * (s.visual_kv_tokens + text_tokens))

    linear = batch * (q_total + text_tokens + condition_tokens) * lin
    attention = (
        batch
        * att
        * (
            qk_visual
            + text_tokens * q_total
            + text_tokens * text_tokens
            + condition_tokens * (condition_tokens + text_tokens)
        )
    )
    return PlanCost(
        visual_forward_steps=len(steps),
        total_forward_passes=len(steps) + 1 + condition_passes,
        visual_query_tokens=q_total,
        sum_q_times_kv_visual=qk_visual,
        distinct_latent_tokens=sum(s.scale[0] for s in clip_last.values()) * full_h * full_w,
        largest_step_query_tokens=max(s.query_tokens for s in steps),
        share_query_tokens_last_scale=sum(s.query_tokens for s in last_steps) / q_total,
        share_query_tokens_top3_scales_per_clip=sum(s.query_tokens for s in steps if s.si % k >= k - 3) / q_total,
        linear_flop=float(linear),
        attention_flop=float(attention),
        share_flop_last_scale=sum(step_flop(s) for s in last_steps) / float(linear + attention),
    )


def mode_cost(mode: InferenceMode, text_tokens: int = 128, dims: CostModelDims | None = None) -> PlanCost:
    """``plan_cost`` of an official mode (its conditions included for the interactive turn)."""
    layout = mode.interactive_layout()
    return plan_cost(
        mode.step_plan(),
        text_tokens=text_tokens,
        condition_tokens=layout.extra_condition_tokens if layout else 0,
        condition_passes=layout.prefix_passes - 1 if layout else 0,
        dims=dims,
    )

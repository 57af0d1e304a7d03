"""Spacetime scale schedules: pure functions over lists of (t, h, w) latent-unit scales.

A schedule is the first-frame pyramid (``K`` scales with t=1) followed by one pyramid of ``K``
scales per video clip (t = latent frames of that clip, at most ``frames_inner_clip``). The clip
layout rules below decide which latent frames each scale covers and which earlier scale it may
attend to (the last, full-resolution scale of the previous clip).
"""

from __future__ import annotations

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

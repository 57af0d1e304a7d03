"""An analytic judge of prompt adherence for the demo domain, and the evaluation report built on it.

:func:`judge_clip` reads colour, shape and direction off the frames of a clip of
:mod:`infinitystar.demo.synthetic` -- no learned model, so its verdict on generated clips means the same
for every checkpoint, and its accuracy on ground-truth clips (:func:`check_judge`) is measured, not assumed.
Per frame it finds the shape as the largest bright blob (brightness = brightest channel, measured above the
frame's median so a grey or noisy background does not count), then:

* colour: mean of the blob's core pixels, each divided by its brightest channel (so a dim or blurred red is
  still (1, 0, 0)), nearest of the six palette colours;
* shape: two moment invariants of the blob's soft mask, both insensitive to blur and to sub-pixel position:
  the skewness of its x and y profiles (a triangle's is ~0.57, a circle's and a square's 0 -- adding blur
  keeps the third cumulant and only grows the variance), and ``E[x^2 y^2] / (E[x^2] E[y^2])`` (1 for an
  axis-aligned square, whose x and y are independent; 2/3 for a disc). Per-frame values are pooled by median
  over the frames where the blob is not cut by a frame edge;
* direction: a least-squares line through the blob's centroid over the frames; the dominant axis and sign of
  its slope, or ``None`` when the shape moves less than :data:`MIN_TRAVEL` of the frame over the clip.

The frame is read as a torus (the demo world wraps): the blob is a connected component with neighbours across the
edges, each frame is rolled so the blob's circular centroid sits at the centre before its moments are taken, and
the centroid track is unwrapped (each step taken modulo the side into (-side/2, side/2]). A clip whose shape stays
inside the frame gets the same verdicts as from a plain-frame analysis. :func:`judge_video` judges each 2 s segment
of a longer video or story, :func:`judge_image_to_video` and :func:`judge_extension` the conditioned tasks, and
:func:`check_judge_all` measures all of them on ground truth of every kind.

:func:`evaluate_pipeline` generates clips for seen and held-out prompts and scores them;
:class:`EvalReport` renders the table (markdown), a json dump and a contact sheet png.
:func:`reconstruction_psnr` measures the tokenizer alone (VAE + multi-scale BSQ) on ground-truth clips.
:func:`evaluate_tasks` runs the tasks of issue 18 (2 s and 6 s text-to-video, stories, image-to-video, extension,
30 s videos and their peak memory) on the held-out triples; :class:`TaskReport` holds its table against the targets.
"""

from __future__ import annotations

import json
import math
import os
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from .. import media
from ..fileio import atomic_write_text, make_folder
from ..train.vae_losses import psnr
from .synthetic import (
    COLOURS,
    DIRECTIONS,
    EVAL_TEMPLATES,
    HELD_OUT,
    NEW_MOTION,
    NEW_SHAPE,
    SEGMENT_FRAMES,
    SHAPES,
    TRAIN_TRIPLES,
    Triple,
    VideoSpec,
    caption,
    read_ground_truth,
    render_clip,
    render_video,
    sample_clips,
    sample_stories,
    sample_videos,
)

__all__ = [
    "GROUPS",
    "JUDGE_KINDS",
    "MAX_JUMP",
    "SEEN_EVAL_TRIPLES",
    "TASKS",
    "TASK_TARGETS",
    "TOKENIZER_PSNR_TARGET",
    "ClipResult",
    "EvalReport",
    "ExtensionJudgement",
    "ImageToVideoJudgement",
    "Judgement",
    "TaskMetric",
    "TaskReport",
    "TaskSample",
    "VideoJudgement",
    "check_judge",
    "check_judge_all",
    "check_tasks",
    "contact_sheet",
    "default_prompts",
    "direction_right",
    "evaluate_pipeline",
    "evaluate_tasks",
    "judge_clip",
    "judge_extension",
    "judge_image",
    "judge_image_to_video",
    "judge_video",
    "measure_peak_memory",
    "parse_prompt",
    "reconstruction_psnr",
    "score",
    "tokenizer_metrics",
]

# A blob must stand this far (in uint8 levels of its brightest channel) above the frame's median.
MIN_CONTRAST = 40.0
# Shapes moving less than this fraction of the frame side over the whole clip have no direction.
MIN_TRAVEL = 0.05
MIN_AREA = 8.0  # pixels of soft mask; less is treated as "nothing there"
# Shape thresholds (see the module docstring for the values each shape gives).
TRIANGLE_SKEW = 0.3
SQUARE_CROSS = 0.85
# A diamond (the square turned 45 degrees, synthetic.NEW_SHAPE: the word a LoRA adapter teaches) has x and y
# anti-correlated in magnitude: E[x^2 y^2] / (E[x^2] E[y^2]) = 0.4, against 2/3 for a disc; halfway between.
DIAMOND_CROSS = 0.54

_PALETTE_NAMES = tuple(COLOURS)
_PALETTE = np.asarray([COLOURS[c] for c in _PALETTE_NAMES], np.float64) / 255.0

GROUPS = ("seen", "held-out")


def _balanced_seen_triples() -> tuple[Triple, ...]:
    """12 training triples, each colour twice, each shape four times, each direction three times (the
    same balance as :data:`HELD_OUT`): triple ``i`` is (colour i mod 6, shape i mod 3, direction i mod 4)."""
    colours = tuple(COLOURS)
    out = tuple((colours[i % 6], SHAPES[i % 3], DIRECTIONS[i % 4]) for i in range(12))
    assert all(t in TRAIN_TRIPLES for t in out)  # none of them is held out (checked in the tests too)
    return out


SEEN_EVAL_TRIPLES: tuple[Triple, ...] = _balanced_seen_triples()


# ---------------------------------------------------------------------------------------------- the judge


@dataclass(frozen=True)
class Judgement:
    """What :func:`judge_clip` sees. An attribute is ``None`` when the clip gives no evidence for it (no
    blob at all; no motion). Confidences are in [0, 1]: the colour's margin between the nearest and the
    second-nearest palette colour, the fraction of frames whose own shape vote agrees, and the share of the
    dominant axis in the velocity."""

    colour: str | None
    shape: str | None
    direction: str | None
    colour_confidence: float = 0.0
    shape_confidence: float = 0.0
    direction_confidence: float = 0.0
    velocity: tuple[float, float] = (0.0, 0.0)  # pixels per frame, x right, y down
    frames_used: int = 0
    features: dict[str, float] = field(default_factory=dict)

    @property
    def triple(self) -> tuple[str | None, str | None, str | None]:
        return self.colour, self.shape, self.direction


def _check_frames(frames: Any, what: str = "judge_clip", min_frames: int = 2) -> np.ndarray:
    arr = np.asarray(frames)
    if arr.dtype != np.uint8 or arr.ndim != 4 or arr.shape[-1] != 3:
        raise ValueError(f"{what} needs uint8 frames [T, H, W, 3], got {arr.dtype} {list(arr.shape)}")
    if arr.shape[0] < min_frames or arr.shape[1] < 8 or arr.shape[2] < 8:
        raise ValueError(f"{what} needs at least {min_frames} frames of at least 8x8 pixels, got {list(arr.shape)}")
    return arr


def _shift_min(labels: np.ndarray) -> np.ndarray:
    """Minimum of each pixel's label and its 4 neighbours' on the torus (per frame: the neighbours of an edge pixel
    are across the opposite edge, so a shape drawn in pieces at both sides is one component)."""
    out = labels.copy()
    _or_min_neighbours(out, labels, np.minimum)
    return out


def _or_min_neighbours(out: np.ndarray, x: np.ndarray, op: np.ufunc) -> None:
    """``out = op(out, each of x's 4 torus neighbours)`` in place, per frame ([T, H, W]); slices, not np.roll, so
    nothing the size of the video is allocated (this is the judge's inner loop)."""
    op(out[:, 1:], x[:, :-1], out=out[:, 1:])
    op(out[:, :1], x[:, -1:], out=out[:, :1])
    op(out[:, :-1], x[:, 1:], out=out[:, :-1])
    op(out[:, -1:], x[:, :1], out=out[:, -1:])
    op(out[:, :, 1:], x[:, :, :-1], out=out[:, :, 1:])
    op(out[:, :, :1], x[:, :, -1:], out=out[:, :, :1])
    op(out[:, :, :-1], x[:, :, 1:], out=out[:, :, :-1])
    op(out[:, :, -1:], x[:, :, :1], out=out[:, :, -1:])


def _largest_blob(mask_THW: np.ndarray, weight_THW: np.ndarray) -> np.ndarray:
    """Per frame, the 4-connected component (on the torus) of ``mask`` with the largest total ``weight``.

    Works on the mask's pixels only (a shape covers a few percent of a frame), as a union-find done in whole-array
    rounds: every pixel points at a root; each round hooks the root of every pixel onto the smallest root among its
    torus neighbours' and then compresses every path, until neighbours share their roots. A component's root ends as
    its first pixel (nothing hooks the smallest index onto a larger one), so ties in weight go to the component whose
    first pixel comes first."""
    T, H, W = mask_THW.shape
    flat = np.flatnonzero(mask_THW)
    blob = np.zeros(T * H * W, bool)
    if not len(flat):
        return blob.reshape(T, H, W)
    n = len(flat)
    where = np.full(T * H * W, -1, np.int64)
    where[flat] = np.arange(n)
    t, rem = np.divmod(flat, H * W)
    y, x = np.divmod(rem, W)
    base = t * H * W
    a_parts, b_parts = [], []
    for ny, nx in (((y + 1) % H, x), (y, (x + 1) % W)):  # each neighbour pair once
        other = where[base + ny * W + nx]
        keep = other >= 0
        a_parts.append(np.nonzero(keep)[0])
        b_parts.append(other[keep])
    ea, eb = np.concatenate(a_parts), np.concatenate(b_parts)
    labels = np.arange(n)
    while True:
        ra, rb = labels[ea], labels[eb]
        differ = ra != rb
        if not differ.any():
            break
        ra, rb = ra[differ], rb[differ]
        np.minimum.at(labels, np.maximum(ra, rb), np.minimum(ra, rb))
        while True:  # compress: every pixel points at its root
            up = labels[labels]
            if np.array_equal(up, labels):
                break
            labels = up
    mass = np.bincount(labels, weights=weight_THW.reshape(-1)[flat], minlength=n)
    roots = np.unique(labels)
    # Per frame, the root of the largest mass (the first such root on a tie): sort by frame, then mass descending.
    order = np.lexsort((roots, -mass[roots], t[roots]))
    frames_sorted = t[roots[order]]
    first = np.r_[True, frames_sorted[1:] != frames_sorted[:-1]]
    best = np.zeros(n, bool)
    best[roots[order[first]]] = True
    blob[flat[best[labels]]] = True
    return blob.reshape(T, H, W)


def _dilate(mask_THW: np.ndarray, radius: int) -> np.ndarray:
    """``mask`` grown by ``radius`` pixels (4-neighbourhood steps, on the torus)."""
    out = mask_THW.copy()
    for _ in range(radius):
        grown = out.copy()
        _or_min_neighbours(grown, out, np.logical_or)
        out = grown
    return out


def _box3_max(v_THW: np.ndarray) -> np.ndarray:
    """Per frame, the maximum of the 3x3 box mean: the brightest level a blob (not one noisy pixel) reaches."""
    p = np.pad(v_THW, ((0, 0), (1, 1), (1, 1)), mode="edge")
    H, W = v_THW.shape[1:]
    box = sum(p[:, i:i + H, j:j + W] for i in range(3) for j in range(3)) / 9.0
    return box.reshape(len(v_THW), -1).max(axis=1)


def _classify_shape(skew: float, cross: float) -> str:
    if skew > TRIANGLE_SKEW:
        return "triangle"
    if cross < DIAMOND_CROSS:
        return NEW_SHAPE
    return "square" if cross > SQUARE_CROSS else "circle"


def _circular_mean(w_TN: np.ndarray) -> np.ndarray:
    """Per frame, the circular mean position of the weights ``w`` on a ring of N pixels (pixel j centred at
    j + 0.5), in [0, N): where a shape is, whichever edges it crosses."""
    n = w_TN.shape[1]
    angle = 2 * np.pi * (np.arange(n) + 0.5) / n
    pos = np.arctan2(w_TN @ np.sin(angle), w_TN @ np.cos(angle)) * n / (2 * np.pi)
    return np.mod(pos, n)


def _torus_step(d: np.ndarray, side: int) -> np.ndarray:
    """Displacements taken modulo ``side`` into (-side/2, side/2]: the shortest way round the torus."""
    return d - side * np.ceil((d - side / 2) / side)


def _unwrap(c: np.ndarray, side: int) -> np.ndarray:
    """A track of torus coordinates made continuous: each step the shortest way round (the shape moves ~1 px per
    frame, far less than half the side, so this is its true path)."""
    if len(c) < 2:
        return c.astype(np.float64)
    return c[0] + np.concatenate([[0.0], np.cumsum(_torus_step(np.diff(c), side))])


@dataclass(frozen=True)
class _Frames:
    """Per-frame measurements of the largest blob of a clip (what every judgement pools over a range of frames)."""

    present: np.ndarray  # bool [T]: a lit blob of at least MIN_AREA
    cut: np.ndarray  # bool [T]: the blob touches one border of an axis but not the opposite one (cut by the frame)
    cx: np.ndarray  # float [T]: centroid on the torus, in [0, W)
    cy: np.ndarray
    skew: np.ndarray
    cross: np.ndarray
    chroma_sum: np.ndarray  # float [T, 3]: sum over the blob's core pixels of each pixel / its brightest channel
    chroma_n: np.ndarray  # int [T]: how many core pixels
    height: int
    width: int


def _measure(arr: np.ndarray) -> _Frames:
    """Find the shape in every frame of ``arr`` (uint8 [T, H, W, 3]) and measure it (see the module docstring).

    The shape's moments are taken after rolling each frame so that the shape's circular centroid sits at the centre:
    a shape drawn in pieces across the edges of the torus is then whole (it is smaller than half the frame), and a
    shape inside the frame is measured exactly as without the roll (moments do not depend on where they are taken).
    """
    T, H, W, _ = arr.shape
    rgb_THW3 = arr.astype(np.float32)
    # Background level: the median of every 3rd pixel (the shape covers well under half of the frame).
    bg_T3 = np.median(rgb_THW3.reshape(T, -1, 3)[:, ::3], axis=1)
    v_THW = np.maximum(np.maximum(rgb_THW3[..., 0], rgb_THW3[..., 1]), rgb_THW3[..., 2])
    bg_T = np.median(v_THW.reshape(T, -1)[:, ::3], axis=1)
    contrast_T = _box3_max(v_THW) - bg_T
    lit_T = contrast_T >= MIN_CONTRAST
    alpha_THW = np.clip((v_THW - bg_T[:, None, None]) / np.maximum(contrast_T, 1.0)[:, None, None], 0.0, 1.0)
    alpha_THW[~lit_T] = 0.0
    blob_THW = _largest_blob(alpha_THW > 0.5, alpha_THW)
    # Moments over the blob grown by 2 px, so its anti-aliased / blurred rim counts, but not distant noise.
    w_THW = alpha_THW * _dilate(blob_THW, 2)
    m0_T = w_THW.sum(axis=(1, 2))
    present_T = lit_T & (m0_T >= MIN_AREA)

    # Colour evidence: core pixels of the blob, each normalised by its brightest channel; summed per frame.
    core_THW = blob_THW & (alpha_THW > 0.6) & present_T[:, None, None]
    counts_T = core_THW.reshape(T, -1).sum(1)
    px_N3 = np.clip(rgb_THW3[core_THW] - np.repeat(bg_T3, counts_T, axis=0), 0, None)
    frame_N = np.repeat(np.arange(T), counts_T)
    keep = px_N3.max(axis=1) > 0
    px_N3, frame_N = px_N3[keep], frame_N[keep]
    norm_N3 = (px_N3 / px_N3.max(axis=1, keepdims=True)).astype(np.float64)
    chroma_T3 = np.stack([np.bincount(frame_N, weights=norm_N3[:, c], minlength=T) for c in range(3)], axis=1)
    chroma_n_T = np.bincount(frame_N, minlength=T)

    # Roll every frame by whole pixels so that the blob's circular centroid lands at the centre.
    shift_x_T = np.rint(W / 2 - _circular_mean(w_THW.sum(axis=1))).astype(np.int64)
    shift_y_T = np.rint(H / 2 - _circular_mean(w_THW.sum(axis=2))).astype(np.int64)
    ix_TW = np.mod(np.arange(W)[None] - shift_x_T[:, None], W)
    iy_TH = np.mod(np.arange(H)[None] - shift_y_T[:, None], H)
    wr_THW = w_THW[np.arange(T)[:, None, None], iy_TH[:, :, None], ix_TW[:, None, :]]

    # Moments of the (rolled) soft mask per frame. All but the cross moment need only the mask's x and y profiles.
    wr_THW = wr_THW.astype(np.float64)
    px_TW, py_TH = wr_THW.sum(axis=1), wr_THW.sum(axis=2)
    ys = np.arange(H, dtype=np.float64) + 0.5
    xs = np.arange(W, dtype=np.float64) + 0.5
    m0 = np.maximum(m0_T, 1e-9)
    cx_T = px_TW @ xs / m0
    cy_T = py_TH @ ys / m0
    dx_TW = xs[None] - cx_T[:, None]
    dy_TH = ys[None] - cy_T[:, None]
    mu20 = np.maximum((px_TW * dx_TW**2).sum(1) / m0, 1e-9)
    mu02 = np.maximum((py_TH * dy_TH**2).sum(1) / m0, 1e-9)
    mu30, mu03 = (px_TW * dx_TW**3).sum(1) / m0, (py_TH * dy_TH**3).sum(1) / m0
    skew_T = np.hypot(mu30 / mu20**1.5, mu03 / mu02**1.5)
    cross_T = np.einsum("thw,th,tw->t", wr_THW, dy_TH**2, dx_TW**2) / m0 / (mu20 * mu02)
    left, right = blob_THW[:, :, 0].any(1), blob_THW[:, :, -1].any(1)
    top, bottom = blob_THW[:, 0].any(1), blob_THW[:, -1].any(1)
    # A blob at both opposite borders continues across them (the torus); at one border only it may be cut off (the
    # frame of an in-frame clip), so its shape and centroid are not trusted where better frames exist.
    cut_T = (left != right) | (top != bottom)
    return _Frames(present_T, cut_T, np.mod(cx_T - shift_x_T, W), np.mod(cy_T - shift_y_T, H), skew_T, cross_T,
                   chroma_T3, chroma_n_T, H, W)


def _track(m: _Frames, t0: int, t1: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(frame indices, unwrapped x, unwrapped y) of the frames of ``t0 .. t1 - 1`` whose measurement is trusted."""
    present = m.present[t0:t1]
    whole = present & ~m.cut[t0:t1]
    use = whole if whole.sum() >= 2 else present
    t_idx = np.nonzero(use)[0]
    return t_idx, _unwrap(m.cx[t0:t1][t_idx], m.width), _unwrap(m.cy[t0:t1][t_idx], m.height)


def _pool(m: _Frames, t0: int, t1: int, *, direction: bool = True) -> Judgement:
    """The judgement of frames ``t0 .. t1 - 1`` from their per-frame measurements."""
    present = m.present[t0:t1]
    n = t1 - t0
    if not present.any():
        return Judgement(None, None, None)
    colour, colour_conf = None, 0.0
    count = int(m.chroma_n[t0:t1][present].sum())
    if count:
        chroma = m.chroma_sum[t0:t1][present].sum(axis=0) / count
        chroma = chroma / max(chroma.max(), 1e-6)
        d = np.linalg.norm(_PALETTE - chroma[None], axis=1)
        order = np.argsort(d)
        colour = _PALETTE_NAMES[order[0]]
        colour_conf = float(np.clip(d[order[1]] - d[order[0]], 0.0, 1.0))

    t_idx, ux, uy = _track(m, t0, t1)
    skew_u, cross_u = m.skew[t0:t1][t_idx], m.cross[t0:t1][t_idx]
    skew, cross = float(np.median(skew_u)), float(np.median(cross_u))
    shape = _classify_shape(skew, cross)
    votes = [_classify_shape(float(s), float(c)) for s, c in zip(skew_u, cross_u)]
    shape_conf = sum(v == shape for v in votes) / len(votes)

    heading, dir_conf, velocity = None, 0.0, (0.0, 0.0)
    if direction and len(t_idx) >= 2:
        vx = float(np.polyfit(t_idx, ux, 1)[0])
        vy = float(np.polyfit(t_idx, uy, 1)[0])
        velocity = (vx, vy)
        travel = math.hypot(vx, vy) * (n - 1)
        if travel >= MIN_TRAVEL * min(m.height, m.width):
            horizontal = abs(vx) >= abs(vy)
            heading = ("right" if vx > 0 else "left") if horizontal else ("down" if vy > 0 else "up")
            dir_conf = max(abs(vx), abs(vy)) / (abs(vx) + abs(vy))
    return Judgement(colour, shape, heading, colour_conf, float(shape_conf), float(dir_conf), velocity,
                     len(t_idx), {"skew": skew, "cross": cross})


def judge_clip(frames: Any) -> Judgement:
    """Colour, shape and direction of the one shape in a clip (uint8 RGB ``[T, H, W, 3]``), on the torus: a shape
    drawn in pieces across the edges is measured whole, and its direction comes from its unwrapped track."""
    arr = _check_frames(frames)
    return _pool(_measure(arr), 0, len(arr))


def judge_image(image: Any) -> Judgement:
    """Colour and shape of the one shape in an image (uint8 RGB ``[H, W, 3]`` or a PIL image); no direction."""
    arr = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image)
    if arr.ndim != 3:
        raise ValueError(f"judge_image needs one uint8 image [H, W, 3], got {arr.dtype} {list(arr.shape)}")
    arr = _check_frames(arr[None], "judge_image", 1)
    return _pool(_measure(arr), 0, 1, direction=False)


@dataclass(frozen=True)
class VideoJudgement:
    """:func:`judge_video`'s verdict: one :class:`Judgement` per segment, and colour / shape over the whole video
    (a whole-video direction would mean nothing for a story, so there is none)."""

    segments: tuple[Judgement, ...]
    colour: str | None
    shape: str | None
    colour_confidence: float = 0.0
    shape_confidence: float = 0.0
    segment_frames: int = SEGMENT_FRAMES

    @property
    def directions(self) -> tuple[str | None, ...]:
        return tuple(j.direction for j in self.segments)

    def holds(self, colour: str | None, shape: str | None) -> bool:
        """Whether every segment shows ``colour`` and ``shape`` (neither None)."""
        return colour is not None and shape is not None and all(
            j.colour == colour and j.shape == shape for j in self.segments)


def _check_segments(n_frames: int, segment_frames: int, what: str) -> int:
    """The number of whole segments in ``n_frames`` frames; a ValueError unless it is ``1 + segment_frames * k``."""
    if not isinstance(segment_frames, int) or segment_frames < 1:
        raise ValueError(f"segment_frames must be a positive integer, got {segment_frames!r}")
    if n_frames < segment_frames + 1 or (n_frames - 1) % segment_frames:
        raise ValueError(f"{what} needs 1 + {segment_frames} * k frames (k >= 1 whole segments), got {n_frames}")
    return (n_frames - 1) // segment_frames


def _video_judgement(m: _Frames, n_frames: int, segment_frames: int) -> VideoJudgement:
    segments = tuple(_pool(m, k * segment_frames, (k + 1) * segment_frames + 1)
                     for k in range((n_frames - 1) // segment_frames))
    whole = _pool(m, 0, n_frames, direction=False)
    return VideoJudgement(segments, whole.colour, whole.shape, whole.colour_confidence, whole.shape_confidence,
                          segment_frames)


def judge_video(frames: Any, segment_frames: int = SEGMENT_FRAMES) -> VideoJudgement:
    """Colour, shape and direction per segment of a video of ``1 + segment_frames * k`` frames (uint8
    ``[T, H, W, 3]``), plus colour and shape over the whole video.

    Segment k is frames ``k * segment_frames .. (k + 1) * segment_frames`` inclusive: the frame at a boundary
    belongs to both (the step into it is the earlier segment's, the step out of it the later one's), so a segment
    is judged on the same 33 frames as a clip of the demo model. The frames are measured once; each segment pools
    its own range."""
    arr = _check_frames(frames, "judge_video")
    _check_segments(len(arr), segment_frames, "judge_video")
    return _video_judgement(_measure(arr), len(arr), segment_frames)


@dataclass(frozen=True)
class ImageToVideoJudgement:
    """Does an image-to-video output keep its image's colour and shape (judged from the image alone) in every
    segment?"""

    image: Judgement
    video: VideoJudgement

    @property
    def keeps_colour(self) -> bool:
        return self.image.colour is not None and all(j.colour == self.image.colour for j in self.video.segments)

    @property
    def keeps_shape(self) -> bool:
        return self.image.shape is not None and all(j.shape == self.image.shape for j in self.video.segments)

    @property
    def ok(self) -> bool:
        return self.keeps_colour and self.keeps_shape


def judge_image_to_video(image: Any, frames: Any, segment_frames: int = SEGMENT_FRAMES) -> ImageToVideoJudgement:
    """The colour and shape of ``image`` (uint8 ``[H, W, 3]`` or PIL) against those of every segment of
    ``frames``."""
    return ImageToVideoJudgement(judge_image(image), judge_video(frames, segment_frames))


# The jump allowed at an extension's boundary, as a fraction of the frame side (4 px at 64). What it must allow: the
# generated motion lagging or leading the given one by one frame at the top speed (1.1 px: a causal video VAE's first
# new latent frame may repeat the last given frame), plus the judge's centroid error on decoded frames: on VAE round
# trips of ground-truth torus videos by the shipped demo VAE (trained before the world wrapped) the per-frame error
# is 0.46 px in the median and the jump measured on them at most 2.3 px over 24 videos. 1.1 + 2.3 = 3.4, rounded up.
# What it catches: a restart elsewhere (a restart at a uniformly random place lands within 4 px with probability
# pi 4^2 / 64^2 = 1.2 %). A reversal is caught by the direction check, a stall is not a jump.
MAX_JUMP = 4.0 / 64
# Frames after the boundary whose centroids are compared with the extrapolated motion: one latent frame of the demo
# model's VAE (time stride 4), the first thing the model generates.
JUMP_FRAMES = 4


@dataclass(frozen=True)
class ExtensionJudgement:
    """Does the generated part of an extended video continue the given video: the same colour and shape, the given
    video's last direction in every generated segment, and no jump at the boundary?"""

    given: VideoJudgement
    video: VideoJudgement
    given_segments: int
    jump_px: float | None  # median torus distance of the first generated centroids from the extrapolated motion
    max_jump_px: float

    @property
    def generated(self) -> tuple[Judgement, ...]:
        return self.video.segments[self.given_segments:]

    @property
    def same_colour(self) -> bool:
        return self.given.colour is not None and all(j.colour == self.given.colour for j in self.generated)

    @property
    def same_shape(self) -> bool:
        return self.given.shape is not None and all(j.shape == self.given.shape for j in self.generated)

    @property
    def same_direction(self) -> bool:
        last = self.given.segments[-1].direction
        return last is not None and all(j.direction == last for j in self.generated)

    @property
    def no_jump(self) -> bool:
        return self.jump_px is not None and self.jump_px <= self.max_jump_px

    @property
    def ok(self) -> bool:
        return self.same_colour and self.same_shape and self.same_direction and self.no_jump


def judge_extension(given_frames: Any, frames: Any, segment_frames: int = SEGMENT_FRAMES,
                    max_jump: float = MAX_JUMP) -> ExtensionJudgement:
    """How well ``frames`` (the whole extended video: the given part, then the generated one) continue
    ``given_frames`` (``1 + segment_frames * c`` frames: the given video itself, not its re-decoding).

    The jump: a least-squares line through the unwrapped centroid track of the given video's last segment gives
    its velocity and where it is at the last given frame; extrapolated over the first :data:`JUMP_FRAMES` generated
    frames, it is compared with the centroids seen there as a distance on the torus. ``jump_px`` is the median of
    those distances (None when nothing is seen there); at most ``max_jump`` times the frame side passes."""
    given = _check_frames(given_frames, "judge_extension (given_frames)")
    arr = _check_frames(frames, "judge_extension (frames)")
    c = _check_segments(len(given), segment_frames, "judge_extension (given_frames)")
    _check_segments(len(arr), segment_frames, "judge_extension (frames)")
    if len(arr) <= len(given):
        raise ValueError(f"judge_extension needs more frames ({len(arr)}) than the given video has ({len(given)})")
    if given.shape[1:] != arr.shape[1:]:
        raise ValueError(f"given frames of {list(given.shape[1:3])} px and frames of {list(arr.shape[1:3])} px "
                         f"differ in size")
    mg, mv = _measure(given), _measure(arr)
    H, W = given.shape[1:3]
    last = len(given) - 1
    t_idx, ux, uy = _track(mg, last - segment_frames, last + 1)
    ahead = np.arange(last + 1, min(last + 1 + JUMP_FRAMES, len(arr)))
    ahead = ahead[mv.present[ahead]]
    jump = None
    if len(t_idx) >= 2 and len(ahead):
        t_abs = t_idx + last - segment_frames
        fx, fy = np.polyfit(t_abs, ux, 1), np.polyfit(t_abs, uy, 1)
        dx = _torus_step(mv.cx[ahead] - np.polyval(fx, ahead), W)
        dy = _torus_step(mv.cy[ahead] - np.polyval(fy, ahead), H)
        jump = float(np.median(np.hypot(dx, dy)))
    return ExtensionJudgement(_video_judgement(mg, len(given), segment_frames),
                              _video_judgement(mv, len(arr), segment_frames), c, jump, float(max_jump * min(H, W)))


# ---------------------------------------------------------------------------------------------- prompts


_COLOUR_WORDS = {c: c for c in COLOURS}
_SHAPE_WORDS = {s: s for s in (*SHAPES, NEW_SHAPE)}
_DIRECTION_WORDS = {
    "left": "left", "leftward": "left", "leftwards": "left",
    "right": "right", "rightward": "right", "rightwards": "right",
    "up": "up", "upward": "up", "upwards": "up",
    "down": "down", "downward": "down", "downwards": "down",
    "still": NEW_MOTION,  # the word a LoRA adapter can teach (synthetic.STILL_TEMPLATES); no template has another
}


def direction_right(judged: str | None, truth: str) -> bool:
    """Whether a judged direction is the true one; a shape standing still (:data:`NEW_MOTION`) is judged to have
    none (it travels less than :data:`MIN_TRAVEL`)."""
    return judged is None if truth == NEW_MOTION else judged == truth


def parse_prompt(prompt: str) -> Triple:
    """(colour, shape, direction) named by a demo prompt or caption; a ``<<<t=2s>>>`` prefix is ignored.

    Raises ``ValueError`` naming the prompt when it names none or more than one of any of them.
    """
    words = re.findall(r"[a-z]+", re.sub(r"<<<.*?>>>", " ", prompt.lower()))
    found = []
    for what, vocab in (("colour", _COLOUR_WORDS), ("shape", _SHAPE_WORDS), ("direction", _DIRECTION_WORDS)):
        hits = sorted({vocab[w] for w in words if w in vocab})
        if len(hits) != 1:
            raise ValueError(f"prompt {prompt!r} names {len(hits)} {what}s ({', '.join(hits) or 'none'}); "
                             f"a demo prompt names exactly one")
        found.append(hits[0])
    return found[0], found[1], found[2]


def default_prompts(template: int = 0) -> dict[str, list[str]]:
    """The evaluation prompts: 12 seen triples (:data:`SEEN_EVAL_TRIPLES`) and the 12 held-out ones."""
    return {"seen": [caption(t, template) for t in SEEN_EVAL_TRIPLES],
            "held-out": [caption(t, template) for t in HELD_OUT]}


# ---------------------------------------------------------------------------------------------- scoring


def score(judgements: Sequence[Judgement], truths: Sequence[Sequence[str]]) -> dict[str, float]:
    """Fractions right per attribute, and all three right, of judgements against ground-truth triples."""
    if len(judgements) != len(truths) or not truths:
        raise ValueError(f"score needs as many judgements as truths (at least one), got {len(judgements)} "
                         f"and {len(truths)}")
    n = len(truths)
    right = np.array([[j.colour == t[0], j.shape == t[1], direction_right(j.direction, t[2])]
                      for j, t in zip(judgements, truths)])
    return {"colour": float(right[:, 0].mean()), "shape": float(right[:, 1].mean()),
            "direction": float(right[:, 2].mean()), "all": float(right.all(axis=1).mean()), "n": n}


def check_judge(n_clips: int = 200, seed: int = 12345, size: int = 64, frames: int = 33,
                split: str = "train") -> tuple[dict[str, float], list[tuple[Triple, Judgement]]]:
    """The judge's accuracy on ``n_clips`` ground-truth clips rendered in memory; also the misses."""
    clips = sample_clips(n_clips, seed, split, size, frames)
    judgements = [judge_clip(render_clip(c.spec, size, frames)) for c in clips]
    truths = [c.spec.triple for c in clips]
    misses = [(t, j) for t, j in zip(truths, judgements) if j.triple != t]
    return score(judgements, truths), misses


JUDGE_KINDS: tuple[str, ...] = ("plain-2s", "plain-6s", "story", "wrapped", "i2v", "extension", "h264")
# What each kind scores: per segment (colour, shape, direction) or per video.
_KIND_ATTRIBUTES = {
    "i2v": ("image colour", "image shape", "kept"),
    "extension": ("colour", "shape", "direction", "no jump", "continues"),
}
_SEGMENT_ATTRIBUTES = ("colour", "shape", "direction")


def _wrapped_specs(n: int, seed: int, size: int) -> list[VideoSpec]:
    """``n`` one-segment videos whose shape is split across the frame's edges at the middle frame: its centre at
    the middle frame lies within a quarter of its size of a vertical edge (case 0), a horizontal edge (1) or a
    corner (2), so it moves across or along the seam; case 3 is a corner at the first frame."""
    out = []
    for i, v in enumerate(sample_videos(n, seed, "train", (1,), size)):
        spec = v.spec
        rng = np.random.default_rng([seed, 5, i])
        near = rng.uniform(-spec.size / 4, spec.size / 4, 2)
        anywhere = rng.uniform(0, size, 2)
        case = i % 4
        cx = near[0] if case in (0, 2, 3) else anywhere[0]
        cy = near[1] if case in (1, 2, 3) else anywhere[1]
        t = 0 if case == 3 else SEGMENT_FRAMES // 2
        x_t, y_t = spec.position(t)
        start = (float(spec.start[0] + cx - x_t), float(spec.start[1] + cy - y_t))
        out.append(replace(spec, start=start))
    return out


def _story_specs(n: int, seed: int, size: int) -> list[VideoSpec]:
    """Stories of the training and the held-out split in turn (the held-out ones turn around a held-out triple, as
    the story task's do), the first ones that hold at least ``n`` segments."""
    train = sample_stories(n, seed, "train", (2, 3), size)
    held = sample_stories(n, seed, "heldout", (3,), size)
    out: list[VideoSpec] = []
    for a, b in zip(train, held):
        for st in (a, b):
            if sum(sp.segments for sp in out) < n:
                out.append(st.spec)
    return out


def _h264_round_trip(videos: Sequence[np.ndarray]) -> list[np.ndarray]:
    """``videos`` through H.264 at crf 0 (lossless in YUV 4:2:0, as make-demo-data writes them) and back, as one
    file: one encoder start for all of them, and the same per-frame conversion as one file each."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="judge-h264-") as tmp:
        path = media.write_video(np.concatenate(list(videos)), Path(tmp) / "all.mp4", fps=16, crf=0)
        back, _ = media.read_video(path)
    cuts = np.cumsum([len(v) for v in videos])[:-1]
    return np.split(back, cuts)


def _score_segments(kind: str, items: Sequence[tuple[VideoSpec, np.ndarray]], acc: dict, misses: list) -> None:
    for i, (spec, frames) in enumerate(items):
        vj = judge_video(frames)
        for k, (truth, j) in enumerate(zip(spec.triples(), vj.segments)):
            right = (j.colour == truth[0], j.shape == truth[1], direction_right(j.direction, truth[2]))
            acc.setdefault(kind, []).append(right)
            if not all(right):
                misses.append({"kind": kind, "video": i, "segment": k, "truth": truth, "judged": j.triple})


def check_judge_all(n: int = 200, seed: int = 12345, kinds: Sequence[str] = JUDGE_KINDS,
                    size: int = 64) -> tuple[dict[str, dict[str, float]], list[dict[str, Any]]]:
    """The judge's accuracy on ground truth of every kind the task evaluation meets, about ``n`` items each.

    Kinds: 'plain-2s' (one-segment videos), 'plain-6s' (three segments, scored per segment), 'story' (2-3
    segments changing direction, per segment; :func:`_story_specs`), 'wrapped' (shapes split across the edges,
    :func:`_wrapped_specs`), 'i2v' (image = frame 0 of a one- or two-segment video, frames = the video: the image's
    own colour and shape right, and kept),
    'extension' (given = the first segment of a two-segment video, frames = the whole video: colour, shape,
    direction, no jump, all four) and 'h264' (held-out three-segment videos through an H.264 crf 0 round trip, per
    segment). Per-segment kinds render videos until they hold at least ``n`` segments.

    Returns ``({kind: {attribute: fraction right, 'n': count}}, misses)``.
    """
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive integer, got {n!r}")
    unknown = [k for k in kinds if k not in JUDGE_KINDS]
    if unknown:
        raise ValueError(f"unknown judge check kind(s) {', '.join(map(repr, unknown))}; valid: "
                         f"{', '.join(JUDGE_KINDS)}")
    rows: dict[str, list[tuple[bool, ...]]] = {}
    misses: list[dict[str, Any]] = []
    for kind in kinds:
        if kind == "plain-2s":
            specs = [v.spec for v in sample_videos(n, seed, "train", (1,), size)]
        elif kind == "plain-6s":
            specs = [v.spec for v in sample_videos(-(-n // 3), seed + 1, "train", (3,), size)]
        elif kind == "story":
            specs = _story_specs(n, seed + 2, size)
        elif kind == "wrapped":
            specs = _wrapped_specs(n, seed + 3, size)
        if kind in ("plain-2s", "plain-6s", "story", "wrapped"):
            _score_segments(kind, [(s, render_video(s, size)) for s in specs], rows, misses)
        elif kind == "h264":
            specs = [v.spec for v in sample_videos(-(-n // 3), seed + 4, "heldout", (3,), size)]
            videos = _h264_round_trip([render_video(s, size) for s in specs])
            _score_segments(kind, list(zip(specs, videos)), rows, misses)
        elif kind == "i2v":
            for i, v in enumerate(sample_videos(n, seed + 5, "train", (1, 2), size)):
                frames = render_video(v.spec, size)
                j = judge_image_to_video(frames[0], frames)
                right = (j.image.colour == v.spec.colour, j.image.shape == v.spec.shape, j.ok)
                rows.setdefault(kind, []).append(right)
                if not all(right):
                    misses.append({"kind": kind, "video": i, "truth": v.spec.triples()[0],
                                   "judged": (j.image.colour, j.image.shape, None), "kept": j.ok})
        elif kind == "extension":
            for i, v in enumerate(sample_videos(n, seed + 6, "train", (2,), size)):
                frames = render_video(v.spec, size)
                j = judge_extension(frames[: SEGMENT_FRAMES + 1], frames)
                truth = v.spec.triples()[1]
                g = j.generated[0]
                right = (g.colour == truth[0], g.shape == truth[1], g.direction == truth[2], j.no_jump, j.ok)
                rows.setdefault(kind, []).append(right)
                if not all(right):
                    misses.append({"kind": kind, "video": i, "truth": truth, "judged": g.triple, "jump_px": j.jump_px})
    out = {}
    for kind, r in rows.items():
        arr = np.asarray(r, bool)
        names = _KIND_ATTRIBUTES.get(kind, _SEGMENT_ATTRIBUTES)
        out[kind] = {**{a: float(arr[:, i].mean()) for i, a in enumerate(names)}, "n": len(arr)}
    return out, misses


def reconstruction_psnr(pipe: Any, jsonl: str | os.PathLike, n_clips: int | None = None) -> dict[str, Any]:
    """Tokenizer fidelity on the clips of a demo jsonl (e.g. ``heldout.jsonl``): each clip's frames as read
    from its file against ``pipe.reconstruct`` of them (VAE encode, multi-scale BSQ bits, decode) at the
    pipeline's default size (the file's frames are resized to it first when they differ).

    Returns ``{"psnr_db": mean over clips, "min_db", "max_db", "clips", "frames", "by_frames", "data"}``; PSNR
    is over every frame and channel of a clip, peak 255; ``by_frames`` maps each clip length (frames) to
    ``{"psnr_db", "min_db", "clips"}`` of the clips of that length.
    """
    records = read_ground_truth(jsonl)
    if n_clips is not None:
        if n_clips < 1:
            raise ValueError(f"n_clips must be >= 1, got {n_clips}")
        records = records[:n_clips]
    if not records:
        raise ValueError(f"{jsonl} lists no clips")
    values, lengths = [], []
    for path, _ in records:
        frames, _ = media.read_video(path, fps=pipe.config.fps)
        recon = np.asarray(pipe.reconstruct(path, output_type="np"))  # at the pipeline's default size
        if recon.shape[1:3] != frames.shape[1:3]:  # compare at the size the tokenizer saw
            frames = media.resize_and_center_crop(frames, *recon.shape[1:3])
        pair = [torch.from_numpy(np.ascontiguousarray(a))[None] for a in (recon, frames[: len(recon)])]
        values.append(psnr(*pair, value_range=(0, 255)).item())
        lengths.append(len(recon))
    by_frames = {}
    for n in sorted(set(lengths)):
        v = [x for x, k in zip(values, lengths, strict=True) if k == n]
        by_frames[n] = {"psnr_db": float(np.mean(v)), "min_db": float(np.min(v)), "clips": len(v)}
    return {"psnr_db": float(np.mean(values)), "min_db": float(np.min(values)), "max_db": float(np.max(values)),
            "clips": len(values), "frames": sorted(by_frames), "by_frames": by_frames, "data": str(jsonl)}


def tokenizer_metrics(reconstruction: dict[str, Any]) -> list[TaskMetric]:
    """:func:`reconstruction_psnr`'s result as report rows against the issue's tokenizer target
    (:data:`TOKENIZER_PSNR_TARGET` dB), one per clip length and one over all clips."""
    rows = [TaskMetric("tokenizer", f"PSNR, {n}-frame held-out clips", r["psnr_db"], TOKENIZER_PSNR_TARGET,
                       r["clips"], "dB") for n, r in reconstruction["by_frames"].items()]
    rows.append(TaskMetric("tokenizer", "PSNR, all held-out clips", reconstruction["psnr_db"], TOKENIZER_PSNR_TARGET,
                           reconstruction["clips"], "dB"))
    return rows


# ---------------------------------------------------------------------------------------------- the report


@dataclass
class ClipResult:
    """One generated clip: its prompt, group, seed, the truth the prompt names, the judge's verdict and a
    few frames for the contact sheet."""

    prompt: str
    group: str
    seed: int
    truth: Triple
    judgement: Judgement
    thumbs: np.ndarray  # uint8 [k, H, W, 3]
    seconds: float = 0.0

    @property
    def right(self) -> tuple[bool, bool, bool]:
        j = self.judgement
        return j.colour == self.truth[0], j.shape == self.truth[1], direction_right(j.direction, self.truth[2])


def _pick_frames(frames_THW3: np.ndarray, k: int) -> np.ndarray:
    idx = np.unique(np.linspace(0, len(frames_THW3) - 1, k).round().astype(int))
    return np.ascontiguousarray(frames_THW3[idx])


def contact_sheet(rows: Sequence[tuple[str, np.ndarray]], path: str | os.PathLike, *, scale: int | None = None,
                  label_height: int = 14) -> Path:
    """A png grid: one row per clip, its label above its frames (uint8 ``[k, H, W, 3]``), written atomically.

    Frames are enlarged by ``scale`` (nearest neighbour; default: enough for rows of at least 96 px).
    """
    if not rows:
        raise ValueError("contact_sheet needs at least one row")
    h = max(r[1].shape[1] for r in rows)
    w = max(r[1].shape[2] for r in rows)
    if scale is None:
        scale = max(1, math.ceil(96 / h))
    k = max(len(r[1]) for r in rows)
    gap = 2
    cell_w, cell_h = w * scale, h * scale
    sheet_w = max(k * (cell_w + gap) + gap, 360)
    sheet_h = len(rows) * (label_height + cell_h + gap) + gap
    sheet = Image.new("RGB", (sheet_w, sheet_h), (40, 40, 40))
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default()
    y = gap
    for label, thumbs in rows:
        draw.text((gap, y), label, fill=(230, 230, 230), font=font)
        y += label_height
        for i, f in enumerate(thumbs):
            img = Image.fromarray(f).resize((f.shape[1] * scale, f.shape[0] * scale), Image.NEAREST)
            sheet.paste(img, (gap + i * (cell_w + gap), y))
        y += cell_h + gap
    return media.write_image(np.asarray(sheet), path)


@dataclass
class EvalReport:
    """Scores of generated clips per group ('seen', 'held-out'), with everything needed to redo the table."""

    results: list[ClipResult]
    settings: dict[str, Any] = field(default_factory=dict)
    # :func:`reconstruction_psnr` of the model's tokenizer, when measured.
    reconstruction: dict[str, Any] | None = None

    def summary(self) -> dict[str, dict[str, float]]:
        """Per group (and 'all'): n, and the fractions right for colour, shape, direction and all three."""
        out = {}
        groups = [g for g in GROUPS if any(r.group == g for r in self.results)]
        groups += sorted({r.group for r in self.results} - set(groups))
        for g in [*groups, "all"]:
            rs = [r for r in self.results if g in ("all", r.group)]
            if rs:
                out[g] = score([r.judgement for r in rs], [r.truth for r in rs])
        return out

    def table(self) -> str:
        """The summary as a markdown table."""
        lines = ["| prompts | clips | colour | shape | direction | all three |", "|---|---:|---:|---:|---:|---:|"]
        for g, s in self.summary().items():
            lines.append(f"| {g} | {s['n']} | {s['colour']:.1%} | {s['shape']:.1%} | {s['direction']:.1%} | "
                         f"{s['all']:.1%} |")
        return "\n".join(lines)

    def per_prompt_table(self) -> str:
        lines = ["| group | prompt | clips | colour | shape | direction | judged as (first clip) |",
                 "|---|---|---:|---:|---:|---:|---|"]
        seen: dict[tuple[str, str], list[ClipResult]] = {}
        for r in self.results:
            seen.setdefault((r.group, r.prompt), []).append(r)
        for (g, p), rs in seen.items():
            s = score([r.judgement for r in rs], [r.truth for r in rs])
            j = rs[0].judgement
            lines.append(f"| {g} | {p} | {len(rs)} | {s['colour']:.0%} | {s['shape']:.0%} | {s['direction']:.0%} | "
                         f"{j.colour} {j.shape} {j.direction} |")
        return "\n".join(lines)

    def to_markdown(self) -> str:
        cfg = ", ".join(f"{k}={v}" for k, v in self.settings.items())
        rec = ""
        if self.reconstruction is not None:
            r = self.reconstruction
            rec = (f"Tokenizer reconstruction (VAE + BSQ bits) of {r['clips']} clips of {r['data']}: "
                   f"{r['psnr_db']:.2f} dB PSNR (clips from {r['min_db']:.2f} to {r['max_db']:.2f} dB).\n\n")
        return (f"# Demo evaluation\n\n{cfg}\n\n{self.table()}\n\n{rec}## Per prompt\n\n{self.per_prompt_table()}\n\n"
                "Scored by the analytic judge of `infinitystar.demo.evaluate` (colour, shape and direction read "
                "off the frames).\n")

    def to_json(self) -> dict[str, Any]:
        clips = []
        for r in self.results:
            j = asdict(r.judgement)
            clips.append({"prompt": r.prompt, "group": r.group, "seed": r.seed, "truth": list(r.truth),
                          "judged": j, "right": list(r.right), "seconds": r.seconds})
        out = {"settings": self.settings, "summary": self.summary(), "clips": clips}
        if self.reconstruction is not None:
            out["reconstruction"] = self.reconstruction
        return out

    def save(self, out_dir: str | os.PathLike) -> dict[str, Path]:
        """Write ``report.md``, ``report.json`` and ``contact_sheet.png`` into ``out_dir``; returns their paths."""
        out = Path(out_dir)
        make_folder(out, "report folder")
        paths = {"markdown": out / "report.md", "json": out / "report.json", "contact_sheet": out / "contact_sheet.png"}
        atomic_write_text(paths["markdown"], self.to_markdown())
        atomic_write_text(paths["json"], json.dumps(self.to_json(), indent=2) + "\n")
        rows = []
        for r in self.results:
            j = r.judgement
            marks = " ".join(f"{a}{'+' if ok else '-'}" for a, ok in zip("csd", r.right))
            rows.append((f"[{r.group}] {r.prompt} (seed {r.seed}) -> {j.colour} {j.shape} {j.direction} ({marks})",
                         r.thumbs))
        contact_sheet(rows, paths["contact_sheet"])
        return paths


def _group_prompts(prompts: Mapping[str, Sequence[str]] | Sequence[str] | None) -> list[tuple[str, str, Triple]]:
    """(group, prompt, truth) for each prompt; a plain list is grouped by whether its triple is held out."""
    if prompts is None:
        prompts = default_prompts()
    items: list[tuple[str, str]] = []
    if isinstance(prompts, Mapping):
        items = [(g, p) for g, ps in prompts.items() for p in ps]
    else:
        if isinstance(prompts, str):
            raise ValueError("prompts must be a list of prompts or a {group: prompts} mapping, not one string")
        for p in prompts:
            items.append(("held-out" if parse_prompt(p) in HELD_OUT else "seen", p))
    if not items:
        raise ValueError("no prompts to evaluate")
    return [(g, p, parse_prompt(p)) for g, p in items]


def evaluate_pipeline(pipe: Any, prompts: Mapping[str, Sequence[str]] | Sequence[str] | None = None,
                      n_per_prompt: int = 4, seed: int = 0, *, num_frames: int = 33, thumbs: int = 6,
                      clips_dir: str | os.PathLike | None = None, progress: bool = False,
                      on_clip: Callable[[ClipResult], None] | None = None, **call_kwargs: Any) -> EvalReport:
    """Generate ``n_per_prompt`` clips per prompt with ``pipe`` and judge each.

    ``prompts``: ``{group: [prompt, ...]}`` or a list (grouped into 'seen' / 'held-out' by
    :data:`~infinitystar.demo.synthetic.HELD_OUT`); default :func:`default_prompts`. Clip ``j`` of every
    prompt uses seed ``seed + j``, so prompts are compared on the same seeds. ``clips_dir`` also saves every
    clip as mp4. Extra keyword arguments go to ``pipe(...)`` (e.g. ``guidance_scale``, ``aspect``).
    """
    if not isinstance(n_per_prompt, int) or n_per_prompt < 1:
        raise ValueError(f"n_per_prompt must be a positive integer, got {n_per_prompt!r}")
    items = _group_prompts(prompts)
    results = []
    for pi, (group, prompt, truth) in enumerate(items):
        for j in range(n_per_prompt):
            t0 = time.perf_counter()
            out = pipe(prompt, num_frames=num_frames, seed=seed + j, output_type="np", progress=progress,
                       **call_kwargs)
            frames = np.asarray(out.frames)
            seconds = time.perf_counter() - t0
            if clips_dir is not None:
                media.write_video(frames, Path(clips_dir) / f"{pi:03d}_{j:02d}.mp4", fps=out.fps)
            res = ClipResult(prompt, group, seed + j, truth, judge_clip(frames), _pick_frames(frames, thumbs),
                             seconds)
            results.append(res)
            if on_clip is not None:
                on_clip(res)
    settings = {"model": getattr(getattr(pipe, "config", None), "name", type(pipe).__name__),
                "clips_per_prompt": n_per_prompt, "seed": seed, "num_frames": num_frames,
                "prompts": len(items), **{k: v for k, v in call_kwargs.items() if isinstance(v, (int, float, str))}}
    return EvalReport(results, settings)


# ---------------------------------------------------------------------------------------------- tasks (issue 18)

# The tasks of ``infinitystar evaluate --tasks``, each on the 12 held-out triples.
TASKS: tuple[str, ...] = ("t2v-2s", "t2v-6s", "story", "i2v", "extension", "long")
# (task, metric) -> the target for it (a fraction). Metrics without a target are reported for information.
TASK_TARGETS: dict[tuple[str, str], float] = {
    ("t2v-2s", "colour"): 0.98,
    ("t2v-2s", "shape"): 0.90,
    ("t2v-2s", "direction"): 0.98,
    ("t2v-6s", "direction per segment"): 0.85,
    ("t2v-6s", "colour and shape in every segment"): 0.90,
    ("story", "direction per segment"): 0.80,
    ("i2v", "keeps colour and shape"): 0.90,
    ("extension", "continues"): 0.85,
    ("long", "segments with a moving object"): 1.0,
}
LONG_SECONDS = 30  # the long task's video, and the length whose peak memory is compared with SHORT_SECONDS'
SHORT_SECONDS = 6
# "The same peak memory": a 30 s video may add its own output (2 bytes per value, see _memory_comparison) and
# allocator slack, not a copy of itself per decoded clip. 5 % of the 6 s peak is twice what the output needs at 64x64.
LONG_MEMORY_RATIO = 1.05
TOKENIZER_PSNR_TARGET = 30.0  # dB, mean over the held-out clips of each length (VAE + BSQ bits + decode)
SEGMENT_SECONDS = 2  # one segment of the demo world (SEGMENT_FRAMES at 16 fps)


def check_tasks(tasks: str | Sequence[str]) -> tuple[str, ...]:
    """Task names from a list or a comma-separated string, in :data:`TASKS` order; a one-line ValueError names an
    unknown one."""
    names = [t.strip() for t in tasks.split(",")] if isinstance(tasks, str) else [str(t).strip() for t in tasks]
    names = [t for t in names if t]
    unknown = [t for t in names if t not in TASKS]
    if unknown:
        raise ValueError(f"unknown task{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))}; valid: "
                         f"{', '.join(TASKS)}")
    if not names:
        raise ValueError(f"no task given; valid: {', '.join(TASKS)}")
    return tuple(t for t in TASKS if t in names)


@dataclass
class TaskSample:
    """One generated video of a task: what was asked, what the judge saw, and its scores.

    ``scores`` maps a metric to (hits, count): a per-video check is (0 or 1, 1), a per-segment one counts segments.
    ``judged`` is the judged (colour, shape, direction) of every segment."""

    task: str
    prompts: tuple[str, ...]
    truth: tuple[Triple, ...]  # the (colour, shape, direction) each segment should show
    seed: int
    seconds: float  # generation time of this video
    scores: dict[str, tuple[int, int]]
    judged: list[tuple[str | None, str | None, str | None]]
    thumbs: np.ndarray  # uint8 [k, H, W, 3]: a few frames per segment
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"task": self.task, "prompts": list(self.prompts), "truth": [list(t) for t in self.truth],
                "seed": self.seed, "seconds": self.seconds, "scores": {k: list(v) for k, v in self.scores.items()},
                "judged": [list(j) for j in self.judged], **self.extra}


@dataclass(frozen=True)
class TaskMetric:
    """One row of the report's table. ``value`` None: not measured (``note`` says why)."""

    task: str
    metric: str
    value: float | None
    target: float | None = None
    n: int = 0
    unit: str = "fraction"  # "fraction", "s", "MiB" or "ratio"
    note: str = ""
    at_most: bool = False  # the target is an upper bound (a memory ratio), not a lower one

    @property
    def met(self) -> bool | None:
        if self.target is None or self.value is None:
            return None
        return self.value <= self.target if self.at_most else self.value >= self.target

    def shown(self) -> str:
        if self.value is None:
            return "n/a"
        if self.unit == "fraction":
            return f"{self.value:.1%} ({round(self.value * self.n)}/{self.n})"
        return f"{self.value:.2f} {self.unit}" if self.unit != "ratio" else f"{self.value:.3f}"


def _memory_code() -> str:
    """The child process of :func:`measure_peak_memory`: load the model named by a run name, reset the peak resident
    set where Linux allows it (writing 5 to ``/proc/self/clear_refs`` resets the high-water mark ``ru_maxrss``
    reads), generate one video with clips streamed, and print as one json line the peak before the reset (loading),
    the peak of the generation (at the end, and when the last clip was handed over, i.e. before the output is
    assembled) and CUDA's."""
    return (
        "import json, resource, sys\n"
        "import numpy as np, torch\n"
        "from infinitystar.demo import load_pipeline, model_from_run_name\n"
        "a = json.loads(sys.argv[1])\n"
        "unit = 1 if sys.platform == 'darwin' else 1024\n"
        "def peak():\n"
        "    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * unit\n"
        "model, preset = model_from_run_name(a['model'], None)\n"
        "pipe = load_pipeline(model, preset, device=a['device'], precision=a['precision'])\n"
        "load = peak()\n"
        "try:\n"
        "    with open('/proc/self/clear_refs', 'w') as f:\n"
        "        f.write('5')\n"
        "    reset = True\n"
        "except OSError:\n"
        "    reset = False\n"
        "if torch.cuda.is_available():\n"
        "    torch.cuda.reset_peak_memory_stats()\n"
        "clips = []\n"
        "out = pipe(a['prompt'], seconds=a['seconds'], seed=a['seed'], stream_clips=True,\n"
        "           callback_on_clip_end=lambda i, f: clips.append(peak()), progress=False)\n"
        "frames = np.asarray(out.frames)\n"
        "cuda = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None\n"
        "print('PEAK ' + json.dumps({'rss_bytes': peak(), 'rss_clips_bytes': clips[-1], 'load_bytes': load,\n"
        "                            'reset': reset, 'cuda_bytes': cuda, 'frames': list(frames.shape)}))\n"
    )


def measure_peak_memory(model: str, seconds: float, prompt: str, *, seed: int = 0, device: str = "cpu",
                        precision: str | None = None, timeout: float = 1800.0) -> dict[str, Any]:
    """Peak memory of generating one ``seconds`` video in a fresh process (``sys.executable``): the process's
    peak resident set (``ru_maxrss``), reset after loading where Linux allows it (``reset``; otherwise the peak of
    loading may hide that of generating), and, on CUDA, ``torch.cuda.max_memory_allocated`` of the generation.

    ``model``: a run name as :func:`infinitystar.demo.run_model_name` writes it (a model folder, the demo model's
    id, or ``random:<preset>``). Returns ``{"rss_mib", "rss_clips_mib", "load_mib", "reset", "cuda_mib", "frames",
    "seconds"}``: ``rss_clips_mib`` is the peak when the last clip was handed over, before the output is assembled;
    ``load_mib`` the peak of loading the model."""
    import subprocess
    import sys

    import infinitystar

    arg = json.dumps({"model": model, "device": device, "precision": precision, "prompt": prompt,
                      "seconds": seconds, "seed": seed})
    env = dict(os.environ)
    src = str(Path(infinitystar.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = src + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    proc = subprocess.run([sys.executable, "-c", _memory_code(), arg], capture_output=True, text=True, env=env,
                          timeout=timeout, check=False)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("PEAK ")]
    if proc.returncode != 0 or not lines:
        tail = " ".join((proc.stderr or proc.stdout).strip().splitlines()[-1:])[:300]
        raise RuntimeError(f"the {seconds:g} s memory probe of {model} failed (exit {proc.returncode}): {tail}")
    data = json.loads(lines[-1][5:])
    cuda = data["cuda_bytes"]
    return {"rss_mib": data["rss_bytes"] / 2**20, "rss_clips_mib": data["rss_clips_bytes"] / 2**20,
            "load_mib": data["load_bytes"] / 2**20, "reset": data["reset"],
            "cuda_mib": None if cuda is None else cuda / 2**20, "frames": data["frames"], "seconds": seconds}


def _segment_thumbs(frames: np.ndarray, segment_frames: int, per_segment: int) -> np.ndarray:
    """``per_segment`` frames evenly spread over each segment (its first frame included), then the last frame."""
    n_seg = max(1, (len(frames) - 1) // segment_frames)
    idx = [k * segment_frames + int(round(i * segment_frames / per_segment))
           for k in range(n_seg) for i in range(per_segment)]
    idx = sorted({min(i, len(frames) - 1) for i in idx} | {len(frames) - 1})
    return np.ascontiguousarray(frames[idx])


def _hit(ok: bool) -> tuple[int, int]:
    return int(bool(ok)), 1


def _count(flags: Sequence[bool]) -> tuple[int, int]:
    return int(sum(bool(f) for f in flags)), len(flags)


def _truth_specs(seed: int, side: int) -> dict[Triple, VideoSpec]:
    """A ground-truth one-segment video of each held-out triple for ``seed``: the first round of
    :func:`~infinitystar.demo.synthetic.sample_videos` of the held-out split is one video of each."""
    return {v.spec.triples()[0]: v.spec for v in sample_videos(len(HELD_OUT), seed, "heldout", (1,), side)}


def _story_directions(seed: int, index: int) -> tuple[str, ...]:
    """The directions of story ``index`` about held-out triple ``index mod 12``: the held-out direction in the
    middle, two other directions around it (those of the held-out split's stories, so deterministic by seed)."""
    return sample_stories(index + 1, seed, "heldout", (3,))[index].spec.directions


@dataclass
class TaskReport:
    """Scores of generated videos per task, the table of metrics against the issue's targets, peak memory."""

    samples: list[TaskSample]
    metrics: list[TaskMetric]
    settings: dict[str, Any] = field(default_factory=dict)
    memory: dict[str, Any] | None = None

    def metric(self, task: str, name: str) -> TaskMetric:
        for m in self.metrics:
            if m.task == task and m.metric == name:
                return m
        raise KeyError(f"no metric {name!r} of task {task!r}")

    def table(self) -> str:
        lines = ["| task | metric | value | target | met? |", "|---|---|---:|---:|---|"]
        for m in self.metrics:
            target = "" if m.target is None else (f"{m.target:.0%}" if m.unit == "fraction" else
                                                  f"{'≤' if m.at_most else '≥'} {m.target:g}")
            met = {True: "yes", False: "**no**", None: ""}[m.met]
            note = f" ({m.note})" if m.note else ""
            lines.append(f"| {m.task} | {m.metric}{note} | {m.shown()} | {target} | {met} |")
        return "\n".join(lines)

    def per_video_table(self) -> str:
        lines = ["| task | prompt(s) | seed | judged per segment | scores | seconds |", "|---|---|---:|---|---|---:|"]
        for s in self.samples:
            judged = "; ".join(" ".join(str(x) for x in j) for j in s.judged)
            scores = ", ".join(f"{k} {h}/{c}" for k, (h, c) in s.scores.items())
            lines.append(f"| {s.task} | {' / '.join(s.prompts)} | {s.seed} | {judged} | {scores} | {s.seconds:.1f} |")
        return "\n".join(lines)

    def to_markdown(self) -> str:
        cfg = ", ".join(f"{k}={v}" for k, v in self.settings.items())
        mem = ""
        if self.memory is not None:
            mem = f"## Peak memory, {SHORT_SECONDS} s against {LONG_SECONDS} s\n\n{self.memory.get('summary', '')}\n\n"
        return (f"# Demo task evaluation\n\n{cfg}\n\n{self.table()}\n\n{mem}"
                f"## Per video\n\n{self.per_video_table()}\n\n"
                "Scored by the analytic judge of `infinitystar.demo.evaluate` (colour, shape and direction read off "
                "the frames per 2 s segment, on the torus).\n")

    def to_json(self) -> dict[str, Any]:
        return {"settings": self.settings,
                "metrics": [{**asdict(m), "met": m.met} for m in self.metrics],
                "samples": [s.to_json() for s in self.samples], "memory": self.memory}

    def save(self, out_dir: str | os.PathLike) -> dict[str, Path]:
        """Write ``report.md``, ``report.json`` and one ``contact_<task>.png`` per task (rows = videos, a few frames
        per segment) into ``out_dir``; returns the paths."""
        out = Path(out_dir)
        make_folder(out, "report folder")
        paths = {"markdown": out / "report.md", "json": out / "report.json"}
        atomic_write_text(paths["markdown"], self.to_markdown())
        atomic_write_text(paths["json"], json.dumps(self.to_json(), indent=2) + "\n")
        for task in TASKS:
            rows = []
            for s in (s for s in self.samples if s.task == task):
                judged = "; ".join(" ".join(str(x) for x in j) for j in s.judged)
                rows.append((f"{' / '.join(s.prompts)} (seed {s.seed}) -> {judged}", s.thumbs))
            if rows:
                paths[f"contact_{task}"] = contact_sheet(rows, out / f"contact_{task}.png")
        return paths


def _metrics(task: str, samples: Sequence[TaskSample]) -> list[TaskMetric]:
    names: list[str] = []
    for s in samples:
        names += [k for k in s.scores if k not in names]
    out = []
    for name in names:
        hits = sum(s.scores[name][0] for s in samples if name in s.scores)
        count = sum(s.scores[name][1] for s in samples if name in s.scores)
        out.append(TaskMetric(task, name, hits / count if count else None, TASK_TARGETS.get((task, name)), count))
    times = [s.seconds for s in samples]
    out.append(TaskMetric(task, "seconds per video", float(np.mean(times)), None, len(times), "s"))
    return out


@dataclass
class _TaskRun:
    """What every task's generation shares: the pipeline, its frame size, the keyword arguments of every call."""

    pipe: Any
    height: int
    width: int
    call_kwargs: dict[str, Any]
    progress: bool

    def truth_frames(self, spec: VideoSpec) -> np.ndarray:
        """A ground-truth video at the pipeline's size (rendered on a torus of the larger side, then cropped)."""
        side = max(self.height, self.width)
        frames = render_video(spec, side)
        if (self.height, self.width) == (side, side):
            return frames
        return media.resize_and_center_crop(frames, self.height, self.width)

    def generate(self, prompt: str, seed: int, **kwargs: Any) -> tuple[np.ndarray, float]:
        """``pipe(prompt, ...)``'s frames and the seconds the call took."""
        t0 = time.perf_counter()
        out = self.pipe(prompt, seed=seed, output_type="np", progress=self.progress, **kwargs, **self.call_kwargs)
        return np.asarray(out.frames), time.perf_counter() - t0


def _task_t2v(run: _TaskRun, task: str, t: Triple, prompt: str, seed: int) -> TaskSample:
    seconds = {"t2v-2s": SEGMENT_SECONDS, "t2v-6s": SHORT_SECONDS, "long": LONG_SECONDS}[task]
    # The long video streams its clips (each decoded while the next is generated), as a long request should.
    stream = {"stream_clips": True, "callback_on_clip_end": lambda k, f: None} if task == "long" else {}
    frames, dt = run.generate(prompt, seed, seconds=seconds, **stream)
    vj = judge_video(frames)
    directions = _count([d == t[2] for d in vj.directions])
    holds = _hit(vj.holds(t[0], t[1]))
    if task == "t2v-2s":
        j0 = vj.segments[0]
        scores = {"colour": _hit(j0.colour == t[0]), "shape": _hit(j0.shape == t[1]),
                  "direction": _hit(j0.direction == t[2])}
    elif task == "t2v-6s":
        scores = {"direction per segment": directions, "colour and shape in every segment": holds}
    else:
        moving = _count([g.colour is not None and g.direction is not None for g in vj.segments])
        scores = {"segments with a moving object": moving, "direction per segment": directions,
                  "colour and shape in every segment": holds}
    return TaskSample(task, (prompt,), (t,) * len(vj.segments), seed, dt, scores, [g.triple for g in vj.segments],
                      _segment_thumbs(frames, SEGMENT_FRAMES, 2 if task == "long" else 4))


def _task_story(run: _TaskRun, t: Triple, prompts: tuple[str, ...], truth: tuple[Triple, ...],
                seed: int) -> TaskSample:
    kwargs = {k: v for k, v in run.call_kwargs.items() if k in ("guidance_scale", "aspect")}
    t0 = time.perf_counter()
    out = run.pipe.interactive(list(prompts), seed=seed, output_type="np", progress=run.progress, **kwargs)
    dt = time.perf_counter() - t0
    frames = np.asarray(out.frames)
    seg = run.pipe.config.frames_per_clip  # a story's segment is one clip of the model
    vj = judge_video(frames, seg)
    scores = {"direction per segment": _count([g.direction == tr[2] for g, tr in zip(vj.segments, truth)]),
              "colour and shape in every segment": _hit(vj.holds(t[0], t[1]))}
    return TaskSample("story", prompts, truth, seed, dt, scores, [g.triple for g in vj.segments],
                      _segment_thumbs(frames, seg, 4))


def _task_i2v(run: _TaskRun, t: Triple, prompt: str, seed: int, spec: VideoSpec) -> TaskSample:
    image = run.truth_frames(spec)[0]
    frames, dt = run.generate(prompt, seed, image=Image.fromarray(image), seconds=SEGMENT_SECONDS)
    ij = judge_image_to_video(image, frames)
    scores = {"keeps colour and shape": _hit(ij.ok), "keeps colour": _hit(ij.keeps_colour),
              "keeps shape": _hit(ij.keeps_shape),
              "direction per segment": _count([d == t[2] for d in ij.video.directions])}
    thumbs = np.concatenate([image[None], _segment_thumbs(frames, SEGMENT_FRAMES, 4)])
    return TaskSample("i2v", (prompt,), (t,) * len(ij.video.segments), seed, dt, scores,
                      [g.triple for g in ij.video.segments], thumbs,
                      {"image_judged": [ij.image.colour, ij.image.shape]})


def _task_extension(run: _TaskRun, t: Triple, prompt: str, seed: int, spec: VideoSpec) -> TaskSample:
    given = run.truth_frames(spec)
    # The tensor form of video= ([3, T, H, W] in [-1, 1]): kept frame for frame, no file and no resampling.
    frames, dt = run.generate(prompt, seed, video=media.frames_to_tensor(given), seconds=2 * SEGMENT_SECONDS)
    ej = judge_extension(given, frames)
    scores = {"continues": _hit(ej.ok), "same colour": _hit(ej.same_colour), "same shape": _hit(ej.same_shape),
              "same direction": _hit(ej.same_direction), "no jump": _hit(ej.no_jump)}
    return TaskSample("extension", (prompt,), (t,) * len(ej.video.segments), seed, dt, scores,
                      [g.triple for g in ej.video.segments], _segment_thumbs(frames, SEGMENT_FRAMES, 4),
                      {"jump_px": ej.jump_px, "max_jump_px": ej.max_jump_px})


def evaluate_tasks(pipe: Any, tasks: str | Sequence[str] = TASKS, n_per_prompt: int = 1, seed: int = 0, *,
                   limit: int | None = None, memory_model: str | None = None, long_prompts: int | None = None,
                   progress: bool = False, on_sample: Callable[[TaskSample], None] | None = None,
                   **call_kwargs: Any) -> TaskReport:
    """Generate videos of every task in ``tasks`` (:data:`TASKS`) for the 12 held-out triples and judge them.

    Prompt of triple i, video j: caption template ``EVAL_TEMPLATES[(i + j) % 2]``, seed ``seed + j``;
    ``limit`` keeps the first ``limit`` triples. The tasks:

    * ``t2v-2s``: ``pipe(prompt, seconds=2)``; colour, shape and direction of the clip;
    * ``t2v-6s``: ``pipe(prompt, seconds=6)``; direction per segment, and colour and shape in every segment;
    * ``story``: ``pipe.interactive([p0, p1, p2])`` (segment 0 from p0) with directions ``[a, d, b]`` around the
      held-out direction d (:func:`_story_directions`); each segment's direction (an interactive model only:
      otherwise reported as not measured);
    * ``i2v``: ``pipe(prompt, image=frame 0 of a ground-truth video of the triple)``; does every segment keep the
      image's colour and shape (:func:`judge_image_to_video`);
    * ``extension``: the first 2 s of a ground-truth video (as a ``[3, T, H, W]`` tensor in [-1, 1]) extended to
      4 s; :func:`judge_extension`;
    * ``long``: ``pipe(prompt, seconds=30, stream_clips=True)`` for the first ``long_prompts`` triples (default
      all); every segment shows an object that moves. With ``memory_model`` (a run name, see
      :func:`measure_peak_memory`) also the peak memory of a 6 s and a 30 s video, each in a fresh process.

    Every video records its generation time. Extra keyword arguments go to every ``pipe`` call (e.g.
    ``guidance_scale``). ``on_sample`` receives each judged video as soon as it is done.
    """
    names = check_tasks(tasks)
    if not isinstance(n_per_prompt, int) or n_per_prompt < 1:
        raise ValueError(f"n_per_prompt must be a positive integer, got {n_per_prompt!r}")
    if not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    triples = list(HELD_OUT)
    if limit is not None:
        if not isinstance(limit, int) or limit < 1:
            raise ValueError(f"limit must be a positive integer, got {limit!r}")
        triples = triples[:limit]
    if long_prompts is not None and (not isinstance(long_prompts, int) or long_prompts < 1):
        raise ValueError(f"long_prompts must be a positive integer, got {long_prompts!r}")
    cfg = pipe.config
    _, _, (height, width) = pipe.resolve_size(aspect=call_kwargs.get("aspect"))
    run = _TaskRun(pipe, height, width, dict(call_kwargs), progress)
    samples: list[TaskSample] = []
    metrics: list[TaskMetric] = []
    memory = None

    def prompt_of(t: Triple, i: int, j: int) -> str:
        return caption(t, EVAL_TEMPLATES[(i + j) % len(EVAL_TEMPLATES)])

    for task in names:
        if task == "story" and "interactive" not in pipe.capabilities.tasks:
            name = "direction per segment"
            metrics.append(TaskMetric(task, name, None, TASK_TARGETS[(task, name)],
                                      note=f"model {cfg.name!r} is not interactive"))
            continue
        done = []
        for j in range(n_per_prompt):
            s = seed + j
            specs = _truth_specs(s, max(height, width)) if task in ("i2v", "extension") else {}
            for i, t in enumerate(triples):
                if task == "long" and long_prompts is not None and i >= long_prompts:
                    break
                if task in ("t2v-2s", "t2v-6s", "long"):
                    sample = _task_t2v(run, task, t, prompt_of(t, i, j), s)
                elif task == "story":
                    truth = tuple((t[0], t[1], d) for d in _story_directions(s, j * len(HELD_OUT) + HELD_OUT.index(t)))
                    sample = _task_story(run, t, tuple(prompt_of(tr, i, j) for tr in truth), truth, s)
                elif task == "i2v":
                    sample = _task_i2v(run, t, prompt_of(t, i, j), s, specs[t])
                else:
                    sample = _task_extension(run, t, prompt_of(t, i, j), s, specs[t])
                done.append(sample)
                if on_sample is not None:
                    on_sample(sample)
        samples += done
        metrics += _metrics(task, done)
        if task == "long" and memory_model is not None:
            memory = _memory_comparison(pipe, memory_model, prompt_of(triples[0], 0, 0), seed, height, width)
            metrics += memory.pop("metrics")
    settings = {"model": getattr(cfg, "name", type(pipe).__name__), "tasks": ",".join(names),
                "videos_per_prompt": n_per_prompt, "seed": seed, "prompts": len(triples),
                **{k: v for k, v in call_kwargs.items() if isinstance(v, (int, float, str))}}
    return TaskReport(samples, metrics, settings, memory)


def _memory_comparison(pipe: Any, model: str, prompt: str, seed: int, height: int, width: int) -> dict[str, Any]:
    """Peak memory of a SHORT_SECONDS and a LONG_SECONDS video, each in a fresh process, and what the longer one
    adds because its output is longer.

    The generation loop's own memory does not grow with the length (one clip's K/V context, the VAE's causal cache).
    The output does: each finished clip is held as its uint8 frames (1 byte a value) and at the end they are joined
    into the returned uint8 video (1 byte); the latent the output also returns grows by 64 float32 channels per
    latent frame. So the longer video may add 2 bytes per extra output value plus the latent's growth; the rest of
    the difference is the allocator's. The target, a peak at most LONG_MEMORY_RATIO times the short one's, leaves
    room for that: at 64 x 64 the 30 s output adds about 9.5 MiB to a peak of about 430 MiB (2 %)."""
    device = str(pipe.device)
    precision = getattr(pipe, "precision", None)
    short = measure_peak_memory(model, SHORT_SECONDS, prompt, seed=seed, device=device, precision=precision)
    long = measure_peak_memory(model, LONG_SECONDS, prompt, seed=seed, device=device, precision=precision)
    cfg = pipe.config
    extra_frames = long["frames"][0] - short["frames"][0]
    values = extra_frames * height * width * 3
    stride = cfg.vae.space_stride  # pixels per latent cell
    latent_cells = (extra_frames // cfg.vae.time_stride) * (height // stride) * (width // stride)
    latent_bytes = latent_cells * cfg.quantizer.embed_dim * 4
    explained = (values * 2 + latent_bytes) / 2**20
    diff = long["rss_mib"] - short["rss_mib"]
    loop_diff = long["rss_clips_mib"] - short["rss_clips_mib"]
    loop_explained = values / 2**20
    out_mib = long["frames"][0] * height * width * 3 / 2**20
    what = ("after loading the model (the peak reset once it is loaded)" if short["reset"] and long["reset"] else
            "including loading the model (the peak could not be reset: loading may hide generation)")
    summary = (
        f"Peak resident memory of one video, each in a fresh process, {what}: {short['rss_mib']:.1f} MiB for "
        f"{SHORT_SECONDS} s "
        f"({short['frames'][0]} frames), {long['rss_mib']:.1f} MiB for {LONG_SECONDS} s ({long['frames'][0]} frames): "
        f"ratio {long['rss_mib'] / short['rss_mib']:.3f}, difference {diff:.1f} MiB. The {LONG_SECONDS} s output is "
        f"{out_mib:.1f} MiB as uint8 frames. What the longer output holds: 2 bytes per extra value (the streamed "
        f"clips' uint8 frames and the joined uint8 video) plus the latent's growth: {explained:.1f} MiB; "
        f"the remaining {diff - explained:.1f} MiB is not the output "
        f"(allocator slack, or growth in the loop). Before the output is assembled (peak when the last clip was handed "
        f"over) the difference is {loop_diff:.1f} MiB, of which the streamed uint8 clips explain "
        f"{loop_explained:.1f} MiB.")
    if short["cuda_mib"] is not None and long["cuda_mib"] is not None:
        summary += f" CUDA peak allocated: {short['cuda_mib']:.1f} MiB against {long['cuda_mib']:.1f} MiB."
    metrics = [
        TaskMetric("long", f"peak RSS {SHORT_SECONDS} s", short["rss_mib"], None, 1, "MiB"),
        TaskMetric("long", f"peak RSS {LONG_SECONDS} s", long["rss_mib"], None, 1, "MiB"),
        TaskMetric("long", f"peak RSS ratio {LONG_SECONDS} s / {SHORT_SECONDS} s", long["rss_mib"] / short["rss_mib"],
                   LONG_MEMORY_RATIO, 1, "ratio", at_most=True),
        TaskMetric("long", "peak RSS difference", diff, None, 1, "MiB"),
        TaskMetric("long", "of which the longer output's in-memory forms", explained, None, 1, "MiB"),
    ]
    if long["cuda_mib"] is not None:
        metrics.append(TaskMetric("long", f"CUDA peak {LONG_SECONDS} s", long["cuda_mib"], None, 1, "MiB"))
    return {"short": short, "long": long, "difference_mib": diff, "explained_mib": explained,
            "loop_difference_mib": loop_diff, "output_uint8_mib": out_mib, "summary": summary, "metrics": metrics}

"""The demo domain: procedurally rendered, captioned clips of one coloured shape moving in a straight line.

Every clip shows one shape (circle, square, triangle) of one pure colour (red, green, blue, yellow, white,
magenta) on black, moving left, right, up or down at constant speed from a random start, for 33 frames at
16 fps (2 s -- the reference's duration mapping gives ``<<<t=2s>>>`` and exactly 33 sampled frames). The
domain is small enough for a demo model trained on one GPU to learn, and simple enough for
:mod:`infinitystar.demo.evaluate` to judge colour, shape and direction analytically from the frames.

Twelve (colour, shape, direction) triples, :data:`HELD_OUT`, never occur in the training split: a model
that draws them right has composed attributes it only saw apart. Every colour, shape and direction, and
every (colour, shape) pair but none of the held-out triples, still occur in training.

:func:`make_dataset` writes real mp4 files plus a jsonl in the reference's metadata format (training
spec 2.1: ``video_path``, ``begin_frame_id``, ``end_frame_id``, ``fps``, ``tarsier2_caption`` and
optionally ``MiniCPM_V_2_6_caption``), so the ordinary data pipeline and commands consume it. ``video_path``
is relative to the jsonl's folder. The extra ``demo`` field (ignored by the reference's loader) records the
ground truth of each clip.

Everything is deterministic by seed: clip ``i`` of a split depends only on ``(seed, split, i)`` and the
clip size, so a larger dataset starts with the clips of a smaller one.

**The torus world** (what the demo model is trained on; ``make-demo-data``'s default): the frame is a torus, so a
shape leaving one edge re-enters at the opposite one and a direction means the same at every moment of a video of
any length. A video (:class:`VideoSpec`, :func:`render_video`) is the first frame plus 1 to 3 *segments* of
:data:`SEGMENT_FRAMES` frames (one clip of the demo model each: 2 s), the shape moving at one constant speed from a
start anywhere on the torus. A plain video keeps one direction; a *story* changes direction at every segment
boundary and has one caption per segment. :func:`make_videos` writes plain videos (``{split}.jsonl``) and
:func:`make_stories` stories in the reference's interactive data layout (``stories/<id>/prompt.txt``, one caption
per line, line 0 describing the reference video ``0000_refine_720p.mp4``: the first frame and segment 0) plus the
whole story ``story.mp4`` and ``{split}_stories.jsonl`` (training rows with ``segment_captions``). No held-out
triple occurs in any training video or in any segment of a training story.
"""

from __future__ import annotations

import itertools
import json
import math
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from .. import media
from ..fileio import atomic_write_text, make_folder

__all__ = [
    "ALL_TRIPLES",
    "SEGMENT_FRAMES",
    "WORLD",
    "DemoStory",
    "DemoVideo",
    "VideoSpec",
    "make_stories",
    "make_videos",
    "read_videos",
    "render_video",
    "sample_stories",
    "sample_videos",
    "torus_coverage",
    "video_frames",
    "CAPTION_TEMPLATES",
    "COLOURS",
    "DIRECTIONS",
    "DIRECTION_VECTORS",
    "EVAL_TEMPLATES",
    "HELD_OUT",
    "SHAPES",
    "STILL_TEMPLATES",
    "NEW_MOTION",
    "NEW_MOTION_TRIPLES",
    "NEW_SHAPE",
    "NEW_SHAPE_TRIPLES",
    "NEW_WORDS",
    "SPLITS",
    "VIDEO_SPLITS",
    "TRAIN_TRIPLES",
    "ClipSpec",
    "DemoClip",
    "caption",
    "count_triples",
    "make_dataset",
    "read_ground_truth",
    "render_clip",
    "sample_clips",
    "shape_coverage",
    "triples_for_split",
]

Triple = tuple[str, str, str]  # (colour, shape, direction)

# Pure, fully saturated colours: after an H.264 round trip or a VAE they are still far apart when each
# pixel is divided by its brightest channel (the judge's colour space).
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (255, 0, 0),
    "green": (0, 255, 0),
    "blue": (0, 0, 255),
    "yellow": (255, 255, 0),
    "white": (255, 255, 255),
    "magenta": (255, 0, 255),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
DIRECTIONS: tuple[str, ...] = ("left", "right", "up", "down")
# A motion the demo model never saw, the other word a LoRA adapter can be taught: standing still (speed 0). Unlike a
# new shape or colour, the frozen VAE draws it as well as it draws any moving shape (every frame of it is a frame of
# the base world), so what the adapter must learn is the transformer's part alone. Split ``"still"`` draws its 18
# triples (NEW_MOTION_TRIPLES); its captions come from :data:`STILL_TEMPLATES`.
NEW_MOTION = "still"
# Unit motion per direction in image coordinates (x right, y down).
DIRECTION_VECTORS: dict[str, tuple[int, int]] = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1),
                                                  NEW_MOTION: (0, 0)}

ALL_TRIPLES: tuple[Triple, ...] = tuple(itertools.product(COLOURS, SHAPES, DIRECTIONS))
# Held out of all training data (the DEMO MODEL issue, part 2): 12 of the 72 triples, two per colour,
# four per shape, three per direction.
HELD_OUT: tuple[Triple, ...] = (
    ("red", "triangle", "up"),
    ("green", "circle", "left"),
    ("blue", "square", "down"),
    ("yellow", "triangle", "right"),
    ("white", "circle", "up"),
    ("magenta", "square", "left"),
    ("red", "square", "right"),
    ("green", "triangle", "down"),
    ("blue", "circle", "right"),
    ("yellow", "square", "up"),
    ("white", "triangle", "left"),
    ("magenta", "circle", "down"),
)
TRAIN_TRIPLES: tuple[Triple, ...] = tuple(t for t in ALL_TRIPLES if t not in set(HELD_OUT))
SPLITS: tuple[str, ...] = ("train", "heldout")
# A shape the demo model never saw, for teaching it a new word with a LoRA adapter (``demo.lora``): a square turned
# 45 degrees. Renderable everywhere, never in the base world's splits; split ``"diamond"`` draws its 24 triples.
NEW_SHAPE = "diamond"
NEW_SHAPE_TRIPLES: tuple[Triple, ...] = tuple(itertools.product(COLOURS, (NEW_SHAPE,), DIRECTIONS))
NEW_MOTION_TRIPLES: tuple[Triple, ...] = tuple(itertools.product(COLOURS, SHAPES, (NEW_MOTION,)))
# The words demo.lora (train-demo-lora --word) can teach; each is also the split that renders it.
NEW_WORDS: tuple[str, ...] = (NEW_MOTION, NEW_SHAPE)
VIDEO_SPLITS: tuple[str, ...] = (*SPLITS, NEW_SHAPE, NEW_MOTION)  # a split's seed is its index: append only

# Caption templates. Placeholders: {colour}, {shape}, {dir} (left/right/up/down) and {towards}
# ("to the left", "to the right", "upwards", "downwards"). Colour and shape words never vary (a small
# model learns them from few examples); verbs and direction phrasing do. No template contains another
# palette colour, shape or direction word, so :func:`infinitystar.demo.evaluate.parse_prompt` reads every
# caption back unambiguously ("black" is not a palette colour).
CAPTION_TEMPLATES: tuple[str, ...] = (
    "a {colour} {shape} moving {dir}",
    "a {colour} {shape} slides {towards}",
    "a {colour} {shape} moves {towards} on a black background",
    "a {colour} {shape} travelling {dir} in a straight line",
    "a single {colour} {shape} drifts {towards} at a steady speed",
    "the {colour} {shape} glides {towards} across the frame",
    "{colour} {shape} going {dir}",
    "a {colour} {shape} heading {dir} against black",
)
# Templates for evaluation prompts ("held-out-safe"): they are also training templates, so a held-out
# prompt differs from the training captions only by its attribute combination, never by its wording.
EVAL_TEMPLATES: tuple[str, ...] = CAPTION_TEMPLATES[:2]
_TOWARDS = {"left": "to the left", "right": "to the right", "up": "upwards", "down": "downwards"}
# Captions of the new motion (the direction templates would read "moving still"): template index i of
# :func:`caption` picks ``STILL_TEMPLATES[i % 4]``, so every caller that draws an index of CAPTION_TEMPLATES works.
STILL_TEMPLATES: tuple[str, ...] = (
    "a {colour} {shape} standing still",
    "a {colour} {shape} stays still on a black background",
    "a single {colour} {shape} keeping still",
    "the {colour} {shape} holds still in its place",
)

# Geometry, as fractions of the frame side (64 px -> shapes of 16-24 px, 19-35 px of travel). The shape
# stays entirely inside the frame for the whole clip, so its colour, shape and centroid are never cut.
_SIZE_RANGE = (0.25, 0.375)
_TRAVEL_RANGE = (0.30, 0.55)
_SUBROWS = 16  # anti-aliasing: exact horizontal coverage on 16 thin rows per pixel row


def caption(triple: Triple, template: int | str = 0) -> str:
    """The caption of ``triple`` with template ``template`` (an index into :data:`CAPTION_TEMPLATES` or a
    template string)."""
    colour, shape, direction = _checked_triple(triple)
    if isinstance(template, int):
        if not 0 <= template < len(CAPTION_TEMPLATES):
            raise ValueError(f"caption template index {template} out of range 0..{len(CAPTION_TEMPLATES) - 1}")
        template = (STILL_TEMPLATES[template % len(STILL_TEMPLATES)] if direction == NEW_MOTION
                    else CAPTION_TEMPLATES[template])
    return template.format(colour=colour, shape=shape, dir=direction, towards=_TOWARDS.get(direction, direction))


def _checked_triple(triple: Sequence[str]) -> Triple:
    if len(triple) != 3:
        raise ValueError(f"a demo triple is (colour, shape, direction), got {triple!r}")
    colour, shape, direction = triple
    if colour not in COLOURS:
        raise ValueError(f"unknown colour {colour!r}; valid: {', '.join(COLOURS)}")
    if shape not in SHAPES and shape != NEW_SHAPE:
        raise ValueError(f"unknown shape {shape!r}; valid: {', '.join(SHAPES)} (and {NEW_SHAPE})")
    if direction not in DIRECTIONS and direction != NEW_MOTION:
        raise ValueError(f"unknown direction {direction!r}; valid: {', '.join(DIRECTIONS)} (and {NEW_MOTION})")
    return colour, shape, direction


def triples_for_split(split: str) -> tuple[Triple, ...]:
    """The triples a split draws from: the 60 training triples, the 12 held-out ones, or a new word's (the 24 of
    the diamond, the 18 of standing still)."""
    if split == "train":
        return TRAIN_TRIPLES
    if split == "heldout":
        return HELD_OUT
    if split == NEW_SHAPE:
        return NEW_SHAPE_TRIPLES
    if split == NEW_MOTION:
        return NEW_MOTION_TRIPLES
    raise ValueError(f"unknown split {split!r}; valid: {', '.join(VIDEO_SPLITS)}")


# ---------------------------------------------------------------------------------------------- rendering


@dataclass(frozen=True)
class ClipSpec:
    """Everything that defines one clip. Positions are the centre of the shape's bounding box in pixel
    coordinates (pixel ``(row i, column j)`` covers ``[j, j+1) x [i, i+1)``); ``size`` is the side of the
    square, the diameter of the circle, and both base and height of the triangle (apex up)."""

    colour: str
    shape: str
    direction: str
    size: float
    start: tuple[float, float]  # (x, y) at frame 0
    speed: float  # pixels per frame

    @property
    def triple(self) -> Triple:
        return self.colour, self.shape, self.direction

    def position(self, t: float) -> tuple[float, float]:
        dx, dy = DIRECTION_VECTORS[self.direction]
        return self.start[0] + dx * self.speed * t, self.start[1] + dy * self.speed * t


def _half_width(shape: str, dy: np.ndarray, half: float) -> np.ndarray:
    """Half-width of the shape at vertical offset ``dy`` from its centre (negative outside it)."""
    if shape == "circle":
        return np.sqrt(np.clip(half * half - dy * dy, 0.0, None)) - (np.abs(dy) > half)
    if shape == "square":
        return np.where(np.abs(dy) <= half, half, -1.0)
    if shape == "triangle":
        # Apex at (0, -half), base from (-half, half) to (half, half): the half-width grows linearly downwards.
        return np.where(np.abs(dy) <= half, (dy + half) / 2, -1.0)
    if shape == NEW_SHAPE:  # corners at (0, +-half) and (+-half, 0): as wide as it is tall, like the square
        return np.where(np.abs(dy) <= half, half - np.abs(dy), -1.0)
    raise ValueError(f"unknown shape {shape!r}; valid: {', '.join(SHAPES)}")


def shape_coverage(shape: str, cx: float, cy: float, size: float, height: int, width: int,
                   subrows: int = _SUBROWS) -> np.ndarray:
    """Fraction of each pixel covered by the shape, float32 ``[height, width]`` in [0, 1].

    Each pixel row is cut into ``subrows`` thin rows; in each, the shape is one horizontal interval whose
    overlap with every pixel is computed exactly, so edges are anti-aliased without staircase error
    horizontally and to ``1 / (2 * subrows)`` px vertically. Only the shape's bounding box is computed.
    """
    cov_HW = np.zeros((height, width), np.float32)
    half = size / 2
    x0, x1 = max(0, int(np.floor(cx - half))), min(width, int(np.ceil(cx + half)))
    y0, y1 = max(0, int(np.floor(cy - half))), min(height, int(np.ceil(cy + half)))
    if x1 <= x0 or y1 <= y0:
        return cov_HW
    offs = (np.arange(subrows, dtype=np.float64) + 0.5) / subrows
    dy = (np.arange(y0, y1)[:, None] + offs[None, :]).reshape(-1) - cy  # [rows * subrows]
    hw = _half_width(shape, dy, half)[:, None]
    left = np.arange(x0, x1, dtype=np.float64)[None, :]  # pixel j spans [j, j + 1)
    overlap = np.clip(np.minimum(left + 1, cx + hw) - np.maximum(left, cx - hw), 0.0, 1.0)
    cov_HW[y0:y1, x0:x1] = overlap.reshape(y1 - y0, subrows, x1 - x0).mean(axis=1)
    return cov_HW


# Upper bounds of make-demo-data, checked before anything is rendered: a typo (--size 100000) is one line, not an
# attempt to allocate hundreds of GiB. A clip is rendered whole in memory (uint8), hence the byte cap.
MAX_SIZE = 1024
MAX_FRAMES = 1025
MAX_CLIPS = 1_000_000
MAX_CLIP_BYTES = 1 << 30


def check_clip_shape(size: int, frames: int) -> None:
    """One-line ValueError unless a ``frames``-frame ``size`` x ``size`` clip is within the bounds above."""
    if not isinstance(size, int) or not 16 <= size <= MAX_SIZE:
        raise ValueError(f"clip size must be 16..{MAX_SIZE} pixels, got {size}")
    if not isinstance(frames, int) or not 2 <= frames <= MAX_FRAMES:
        raise ValueError(f"a clip needs 2..{MAX_FRAMES} frames (2 to show motion), got {frames}")
    clip_bytes = frames * size * size * 3
    if clip_bytes > MAX_CLIP_BYTES:
        raise ValueError(f"a {frames}-frame {size}x{size} clip takes {clip_bytes / 2**30:.1f} GiB in memory while "
                         f"it is rendered; the limit is {MAX_CLIP_BYTES >> 30} GiB (fewer frames or a smaller size)")


def render_clip(spec: ClipSpec, size: int = 64, frames: int = 33) -> np.ndarray:
    """The clip of ``spec`` as uint8 RGB frames ``[frames, size, size, 3]``: the shape's pure colour times
    its anti-aliased coverage, on black."""
    check_clip_shape(size, frames)
    rgb = np.asarray(COLOURS[spec.colour], np.float32)
    out_THW3 = np.empty((frames, size, size, 3), np.uint8)
    for t in range(frames):
        cx, cy = spec.position(t)
        cov_HW = shape_coverage(spec.shape, cx, cy, spec.size, size, size)
        out_THW3[t] = np.rint(cov_HW[..., None] * rgb).astype(np.uint8)
    return out_THW3


def _sample_spec(rng: np.random.Generator, triple: Triple, size: int, frames: int) -> ClipSpec:
    """Random size, speed and a start position from which the whole straight path stays in frame."""
    colour, shape, direction = triple
    side = rng.uniform(*_SIZE_RANGE) * size
    # Range of the centre along either axis with the shape inside the frame and a 1-pixel black margin
    # (the border rows and columns stay black, so the whole shape is always visible).
    lo, hi = side / 2 + 1.0, size - side / 2 - 1.0
    travel = min(rng.uniform(*_TRAVEL_RANGE) * size, hi - lo - 1.0)
    speed = travel / (frames - 1)
    along = rng.uniform(lo, hi - travel)  # the end of the path nearer to the origin of the moving axis
    across = rng.uniform(lo, hi)
    dx, dy = DIRECTION_VECTORS[direction]
    if dx:
        x = along if dx > 0 else along + travel
        start = (x, across)
    else:
        y = along if dy > 0 else along + travel
        start = (across, y)
    return ClipSpec(colour, shape, direction, float(side), (float(start[0]), float(start[1])), float(speed))


# ---------------------------------------------------------------------------------------------- sampling


@dataclass(frozen=True)
class DemoClip:
    """One clip of a split: its index, its spec, and two captions from different templates."""

    index: int
    split: str
    spec: ClipSpec
    caption: str
    alt_caption: str


def _split_seed(split: str) -> int:
    return VIDEO_SPLITS.index(split) if split in VIDEO_SPLITS else -1


def _triple_order(seed: int, split: str, n: int) -> list[Triple]:
    """``n`` triples in balanced rounds: each round is a fresh permutation of the split's triples, so
    counts differ by at most one, and the first rounds do not depend on ``n``."""
    triples = triples_for_split(split)
    rng = np.random.default_rng([seed, _split_seed(split), 0])
    order: list[Triple] = []
    while len(order) < n:
        order.extend(triples[i] for i in rng.permutation(len(triples)))
    return order[:n]


def sample_clips(n_clips: int, seed: int, split: str = "train", size: int = 64, frames: int = 33) -> list[DemoClip]:
    """The first ``n_clips`` clips of ``split`` for ``seed`` (specs and captions; nothing is rendered)."""
    if not isinstance(n_clips, int) or n_clips < 1:
        raise ValueError(f"n_clips must be a positive integer, got {n_clips!r}")
    if not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    if n_clips > MAX_CLIPS:
        raise ValueError(f"at most {MAX_CLIPS} clips per split, got {n_clips}")
    check_clip_shape(size, frames)
    clips = []
    for i, triple in enumerate(_triple_order(seed, split, n_clips)):
        rng = np.random.default_rng([seed, _split_seed(split), 1, i])
        spec = _sample_spec(rng, triple, size, frames)
        t1, t2 = rng.choice(len(CAPTION_TEMPLATES), size=2, replace=False)
        clips.append(DemoClip(i, split, spec, caption(triple, int(t1)), caption(triple, int(t2))))
    return clips


# ---------------------------------------------------------------------------------------------- writing


def _record(clip: DemoClip, video_rel: str, size: int, frames: int, fps: int, seed: int) -> dict:
    """One jsonl row in the reference's format (training spec 2.1) plus the ``demo`` ground truth."""
    spec = clip.spec
    return {
        "video_path": video_rel,
        "begin_frame_id": 0,
        "end_frame_id": frames,  # exclusive: the clip is frames [0, frames)
        "fps": float(fps),
        "tarsier2_caption": clip.caption,
        # The reference picks one of the two captions uniformly each epoch when this one is present.
        "MiniCPM_V_2_6_caption": clip.alt_caption,
        "width": size,
        "height": size,
        "demo": {
            "split": clip.split, "seed": seed, "index": clip.index, **{k: v for k, v in asdict(spec).items()},
        },
    }


def make_dataset(out_dir: str | os.PathLike, n_clips: int, seed: int, size: int = 64, frames: int = 33,
                 fps: int = 16, split: str = "train", crf: int = 0) -> Path:
    """Render ``n_clips`` in-frame clips of ``split`` ('train', 'heldout', 'diamond' or 'still') under ``out_dir``.

    Writes ``out_dir/videos/{split}_{i:06d}.mp4`` (H.264 via :func:`infinitystar.media.write_video`;
    ``crf=0`` is lossless in YUV 4:2:0, so colours survive the codec) and ``out_dir/{split}.jsonl`` (one
    record per clip, see :func:`_record`; ``video_path`` relative to ``out_dir``). Every file is written
    atomically. Returns the jsonl path.
    """
    if split not in VIDEO_SPLITS:
        raise ValueError(f"unknown split {split!r}; valid: {', '.join(VIDEO_SPLITS)}")
    if not isinstance(fps, int) or fps < 1:
        raise ValueError(f"fps must be a positive integer, got {fps!r}")
    clips = sample_clips(n_clips, seed, split, size, frames)
    root = Path(out_dir)
    make_folder(root / "videos", "data folder")
    rows = []
    for clip in clips:
        rel = f"videos/{split}_{clip.index:06d}.mp4"
        media.write_video(render_clip(clip.spec, size, frames), root / rel, fps=fps, crf=crf)
        rows.append(json.dumps(_record(clip, rel, size, frames, fps, seed)))
    jsonl = root / f"{split}.jsonl"
    atomic_write_text(jsonl, "".join(r + "\n" for r in rows))
    return jsonl


def _ground_truth_rows(jsonl: str | os.PathLike) -> Iterator[tuple[Path, dict]]:
    """(absolute video path, ``demo`` ground truth) of every row of a jsonl written by make-demo-data."""
    path = Path(jsonl)
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        rec = json.loads(line)
        demo = rec.get("demo")
        if not isinstance(demo, dict):
            raise ValueError(f"{path}:{n}: record has no 'demo' ground truth (not written by make-demo-data?)")
        yield path.parent / rec["video_path"], demo


def read_ground_truth(jsonl: str | os.PathLike) -> list[tuple[Path, Triple]]:
    """(absolute video path, triple) for each record of a jsonl written by make-demo-data."""
    out = []
    for video, demo in _ground_truth_rows(jsonl):
        # A torus-world row holds a direction per segment; its triple is the first segment's (a plain video's only).
        direction = demo["direction"] if "direction" in demo else (demo.get("directions") or [None])[0]
        out.append((video, _checked_triple((demo["colour"], demo["shape"], direction))))
    return out


def count_triples(clips: Iterable[DemoClip]) -> dict[Triple, int]:
    """How many clips show each triple."""
    counts: dict[Triple, int] = {}
    for c in clips:
        counts[c.spec.triple] = counts.get(c.spec.triple, 0) + 1
    return counts


# ---------------------------------------------------------------------------------------------- the torus world

# The world the demo model learns: objects on a torus, videos of whole segments (recorded in every row's ``demo``).
WORLD = "torus"
# Frames per segment after the first frame: one clip of the demo model (8 latent frames x 4), 2 s at 16 fps.
SEGMENT_FRAMES = 32
# The longest video make-demo-data renders: within its frame bound (MAX_FRAMES = 1 + 32 * 32).
MAX_SEGMENTS = (MAX_FRAMES - 1) // SEGMENT_FRAMES
# Speed as the fraction of the frame side travelled per segment: 0.6 .. 1.1 px per frame at 64 px.
_SEGMENT_TRAVEL = (0.30, 0.55)


def video_frames(segments: int) -> int:
    """Frames of a video of ``segments`` segments: the first frame plus ``SEGMENT_FRAMES`` per segment."""
    if not isinstance(segments, int) or not 1 <= segments <= MAX_SEGMENTS:
        raise ValueError(f"a video has 1..{MAX_SEGMENTS} segments, got {segments!r}")
    return 1 + SEGMENT_FRAMES * segments


@dataclass(frozen=True)
class VideoSpec:
    """One video of the torus world: a shape moving at ``speed`` pixels per frame from ``start`` (its centre at frame
    0), in ``directions[k]`` during segment k (frames ``32k + 1 .. 32(k + 1)``: the step from frame t-1 to t
    belongs to the segment of frame t). Positions are unwrapped; the renderer wraps them onto the torus."""

    colour: str
    shape: str
    size: float
    start: tuple[float, float]
    speed: float
    directions: tuple[str, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "directions", tuple(self.directions))
        for d in self.directions:
            _checked_triple((self.colour, self.shape, d))
        video_frames(len(self.directions))  # checks the count

    @property
    def segments(self) -> int:
        return len(self.directions)

    @property
    def frames(self) -> int:
        return video_frames(self.segments)

    def direction_at(self, t: int) -> str:
        """Direction of the step from frame ``t - 1`` to frame ``t`` (t >= 1)."""
        if t < 1:
            raise ValueError(f"frame {t} has no step before it")
        return self.directions[min((t - 1) // SEGMENT_FRAMES, self.segments - 1)]

    def position(self, t: float) -> tuple[float, float]:
        """Unwrapped centre at frame ``t`` (a float: sub-frame positions interpolate the straight pieces)."""
        x, y = self.start
        done = 0.0
        for k, d in enumerate(self.directions):
            end = float(SEGMENT_FRAMES * (k + 1)) if k < self.segments - 1 else math.inf
            step = min(t, end) - done
            if step <= 0:
                break
            dx, dy = DIRECTION_VECTORS[d]
            x, y = x + dx * self.speed * step, y + dy * self.speed * step
            done += step
        return x, y

    def triples(self) -> tuple[Triple, ...]:
        """(colour, shape, direction) of every segment."""
        return tuple((self.colour, self.shape, d) for d in self.directions)


def torus_coverage(shape: str, cx: float, cy: float, size: float, side: int) -> np.ndarray:
    """:func:`shape_coverage` on a ``side`` x ``side`` torus: the centre taken modulo the side, and the pieces of a
    shape that crosses an edge drawn at the opposite one (the periodic copies; they never overlap, the shape being
    smaller than the frame)."""
    cx, cy = cx % side, cy % side
    cov = np.zeros((side, side), np.float32)
    half = size / 2
    for ox in (-side, 0, side):
        if cx + ox + half <= 0 or cx + ox - half >= side:
            continue
        for oy in (-side, 0, side):
            if cy + oy + half <= 0 or cy + oy - half >= side:
                continue
            cov += shape_coverage(shape, cx + ox, cy + oy, size, side, side)
    return np.minimum(cov, 1.0)


def render_video(spec: VideoSpec, size: int = 64) -> np.ndarray:
    """The video of ``spec`` on a ``size`` x ``size`` torus: uint8 RGB ``[frames, size, size, 3]``."""
    check_clip_shape(size, spec.frames)
    if spec.size >= size:
        raise ValueError(f"a shape of {spec.size:g} px does not fit a {size} px torus")
    rgb = np.asarray(COLOURS[spec.colour], np.float32)
    out = np.empty((spec.frames, size, size, 3), np.uint8)
    for t in range(spec.frames):
        cx, cy = spec.position(t)
        out[t] = np.rint(torus_coverage(spec.shape, cx, cy, spec.size, size)[..., None] * rgb).astype(np.uint8)
    return out


def _torus_spec(rng: np.random.Generator, colour: str, shape: str, directions: Sequence[str], size: int) -> VideoSpec:
    side = rng.uniform(*_SIZE_RANGE) * size
    speed = rng.uniform(*_SEGMENT_TRAVEL) * size / SEGMENT_FRAMES
    start = (float(rng.uniform(0, size)), float(rng.uniform(0, size)))
    return VideoSpec(colour, shape, float(side), start, float(speed), tuple(directions))


@dataclass(frozen=True)
class DemoVideo:
    """One plain video of a split: its spec and two captions from different templates (one direction throughout)."""

    index: int
    split: str
    spec: VideoSpec
    caption: str
    alt_caption: str


@dataclass(frozen=True)
class DemoStory:
    """One story of a split: its spec and one caption per segment."""

    index: int
    split: str
    spec: VideoSpec
    captions: tuple[str, ...]


def _check_counts(name: str, counts: Sequence[int], lowest: int) -> tuple[int, ...]:
    counts = tuple(counts)
    if not counts or any(not isinstance(c, int) or not lowest <= c <= MAX_SEGMENTS for c in counts):
        raise ValueError(f"{name} must be segment counts in {lowest}..{MAX_SEGMENTS}, got {list(counts)}")
    return counts


def _check_sampling(n: int, seed: int) -> None:
    if not isinstance(n, int) or n < 1 or n > MAX_CLIPS:
        raise ValueError(f"the number of videos must be an integer in 1..{MAX_CLIPS}, got {n!r}")
    if not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")


def sample_videos(n: int, seed: int, split: str = "train", segments: Sequence[int] = (1, 2, 3),
                  size: int = 64) -> list[DemoVideo]:
    """The first ``n`` plain videos of ``split`` (triples balanced as :func:`sample_clips`; the segment count drawn
    uniformly from ``segments``); nothing is rendered."""
    _check_sampling(n, seed)
    counts = _check_counts("segments", segments, 1)
    check_clip_shape(size, video_frames(max(counts)))  # before any folder is made or frame rendered
    out = []
    for i, (colour, shape, direction) in enumerate(_triple_order(seed, split, n)):
        rng = np.random.default_rng([seed, _split_seed(split), 2, i])
        k = int(counts[int(rng.integers(len(counts)))])
        spec = _torus_spec(rng, colour, shape, (direction,) * k, size)
        t1, t2 = rng.choice(len(CAPTION_TEMPLATES), size=2, replace=False)
        triple = (colour, shape, direction)
        out.append(DemoVideo(i, split, spec, caption(triple, int(t1)), caption(triple, int(t2))))
    return out


def _pairs() -> tuple[tuple[str, str], ...]:
    return tuple(itertools.product(COLOURS, SHAPES))


def _allowed_directions(colour: str, shape: str) -> tuple[str, ...]:
    """The directions of (colour, shape) that training may show: all but its held-out one."""
    return tuple(d for d in DIRECTIONS if (colour, shape, d) not in HELD_OUT)


def _story_directions(rng: np.random.Generator, allowed: Sequence[str], k: int) -> list[str]:
    """``k`` directions from ``allowed``, each different from the one before (a change at every boundary)."""
    dirs = [str(allowed[int(rng.integers(len(allowed)))])]
    while len(dirs) < k:
        choices = [d for d in allowed if d != dirs[-1]]
        dirs.append(str(choices[int(rng.integers(len(choices)))]))
    return dirs


def sample_stories(n: int, seed: int, split: str = "train", segments: Sequence[int] = (2, 3),
                   size: int = 64) -> list[DemoStory]:
    """The first ``n`` stories of ``split``; nothing is rendered.

    'train': (colour, shape) pairs in balanced rounds, the segment count drawn from ``segments``, directions drawn
    from the pair's non-held-out ones, each different from the previous. 'heldout': story ``i`` is about held-out
    triple ``i mod 12`` (c, s, d): three segments ``[a, d, b]`` (the held-out direction in the middle; ``a`` and
    ``b`` non-held-out, each different from d).
    """
    _check_sampling(n, seed)
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; valid: {', '.join(SPLITS)}")
    counts = _check_counts("story segments", segments, 2)
    check_clip_shape(size, video_frames(3 if split == "heldout" else max(counts)))  # held-out stories have 3
    order_rng = np.random.default_rng([seed, _split_seed(split), 3])
    pairs = _pairs()
    order: list[tuple[str, str]] = []
    while len(order) < n:
        order.extend(pairs[i] for i in order_rng.permutation(len(pairs)))
    out = []
    for i in range(n):
        rng = np.random.default_rng([seed, _split_seed(split), 4, i])
        if split == "train":
            colour, shape = order[i]
            k = int(counts[int(rng.integers(len(counts)))])
            dirs = _story_directions(rng, _allowed_directions(colour, shape), k)
        else:
            colour, shape, held = HELD_OUT[i % len(HELD_OUT)]
            outer = [d for d in _allowed_directions(colour, shape) if d != held]
            dirs = [str(outer[int(rng.integers(len(outer)))]), held, str(outer[int(rng.integers(len(outer)))])]
        spec = _torus_spec(rng, colour, shape, dirs, size)
        templates = rng.integers(len(CAPTION_TEMPLATES), size=len(dirs))
        out.append(DemoStory(i, split, spec, tuple(caption(t, int(j)) for t, j in zip(spec.triples(), templates))))
    return out


def _ground_truth(spec: VideoSpec, split: str, seed: int, index: int, **extra) -> dict:
    return {"world": WORLD, "split": split, "seed": seed, "index": index, "colour": spec.colour, "shape": spec.shape,
            "size": spec.size, "start": list(spec.start), "speed": spec.speed, "directions": list(spec.directions),
            "segments": spec.segments, **extra}


def _video_row(rel: str, spec: VideoSpec, size: int, fps: int, captions: Sequence[str]) -> dict:
    return {"video_path": rel, "begin_frame_id": 0, "end_frame_id": spec.frames, "fps": float(fps),
            "tarsier2_caption": captions[0], **({"MiniCPM_V_2_6_caption": captions[1]} if len(captions) > 1 else {}),
            "width": size, "height": size}


def _check_fps(fps: int) -> None:
    if not isinstance(fps, int) or fps < 1:
        raise ValueError(f"fps must be a positive integer, got {fps!r}")


def make_videos(out_dir: str | os.PathLike, n: int, seed: int, split: str = "train",
                segments: Sequence[int] = (1, 2, 3), size: int = 64, fps: int = 16, crf: int = 0) -> Path:
    """Render ``n`` plain torus videos of ``split`` into ``out_dir/videos/{split}_{i:06d}.mp4`` and write
    ``out_dir/{split}.jsonl`` (reference rows plus the ``demo`` ground truth: spec, segments, world). Atomic files;
    returns the jsonl."""
    if split not in VIDEO_SPLITS:
        raise ValueError(f"unknown split {split!r}; valid: {', '.join(VIDEO_SPLITS)}")
    _check_fps(fps)
    videos = sample_videos(n, seed, split, segments, size)
    root = Path(out_dir)
    make_folder(root / "videos", "data folder")
    rows = []
    for v in videos:
        rel = f"videos/{split}_{v.index:06d}.mp4"
        media.write_video(render_video(v.spec, size), root / rel, fps=fps, crf=crf)
        row = _video_row(rel, v.spec, size, fps, (v.caption, v.alt_caption))
        row["demo"] = _ground_truth(v.spec, split, seed, v.index)
        rows.append(json.dumps(row))
    jsonl = root / f"{split}.jsonl"
    atomic_write_text(jsonl, "".join(r + "\n" for r in rows))
    return jsonl


# The reference's interactive layout: a story folder holds its prompts and its reference video under these names.
STORY_PROMPTS = "prompt.txt"
STORY_REFERENCE = "0000_refine_720p.mp4"
STORY_VIDEO = "story.mp4"


def make_stories(out_dir: str | os.PathLike, n: int, seed: int, split: str = "train",
                 segments: Sequence[int] = (2, 3), size: int = 64, fps: int = 16, crf: int = 0) -> Path:
    """Render ``n`` stories of ``split`` in the reference's interactive layout.

    Under ``out_dir/stories/{split}_{i:06d}/``: ``prompt.txt`` (one caption per segment), ``0000_refine_720p.mp4``
    (the reference video: the first frame and segment 0) and ``story.mp4`` (the whole story); plus
    ``out_dir/{split}_stories.jsonl``, one training row per story with ``segment_captions``. Atomic files; returns
    the jsonl."""
    _check_fps(fps)
    stories = sample_stories(n, seed, split, segments, size)
    root = Path(out_dir)
    rows = []
    for st in stories:
        rel = f"stories/{split}_{st.index:06d}"
        folder = make_folder(root / rel, "story folder")
        frames = render_video(st.spec, size)
        media.write_video(frames, folder / STORY_VIDEO, fps=fps, crf=crf)
        media.write_video(frames[: video_frames(1)], folder / STORY_REFERENCE, fps=fps, crf=crf)
        atomic_write_text(folder / STORY_PROMPTS, "".join(c + "\n" for c in st.captions))
        row = _video_row(f"{rel}/{STORY_VIDEO}", st.spec, size, fps, st.captions[:1])
        row["segment_captions"] = list(st.captions)
        row["demo"] = _ground_truth(st.spec, split, seed, st.index, story=rel)
        rows.append(json.dumps(row))
    jsonl = root / f"{split}_stories.jsonl"
    atomic_write_text(jsonl, "".join(r + "\n" for r in rows))
    return jsonl


def read_videos(jsonl: str | os.PathLike) -> list[tuple[Path, VideoSpec]]:
    """(absolute video path, spec) of every row of a jsonl written by :func:`make_videos`, :func:`make_stories` or
    :func:`make_dataset` (a one-clip row is a one-segment spec; its in-frame path never wraps)."""
    out = []
    for video, demo in _ground_truth_rows(jsonl):
        directions = demo.get("directions") or [demo["direction"]]
        spec = VideoSpec(demo["colour"], demo["shape"], float(demo["size"]), tuple(demo["start"]),
                         float(demo["speed"]), tuple(directions))
        out.append((video, spec))
    return out

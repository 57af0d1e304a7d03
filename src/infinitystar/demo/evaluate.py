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
  over the frames where the blob does not touch the border;
* direction: a least-squares line through the blob's centroid over the frames; the dominant axis and sign of
  its slope, or ``None`` when the shape moves less than :data:`MIN_TRAVEL` of the frame over the clip.

:func:`evaluate_pipeline` generates clips for seen and held-out prompts and scores them;
:class:`EvalReport` renders the table (markdown), a json dump and a contact sheet png.
:func:`reconstruction_psnr` measures the tokenizer alone (VAE + multi-scale BSQ) on ground-truth clips.
"""

from __future__ import annotations

import json
import math
import os
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
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
    HELD_OUT,
    SHAPES,
    TRAIN_TRIPLES,
    Triple,
    caption,
    read_ground_truth,
    render_clip,
    sample_clips,
)

__all__ = [
    "GROUPS",
    "SEEN_EVAL_TRIPLES",
    "ClipResult",
    "EvalReport",
    "Judgement",
    "check_judge",
    "contact_sheet",
    "default_prompts",
    "evaluate_pipeline",
    "judge_clip",
    "parse_prompt",
    "reconstruction_psnr",
    "score",
]

# A blob must stand this far (in uint8 levels of its brightest channel) above the frame's median.
MIN_CONTRAST = 40.0
# Shapes moving less than this fraction of the frame side over the whole clip have no direction.
MIN_TRAVEL = 0.05
MIN_AREA = 8.0  # pixels of soft mask; less is treated as "nothing there"
# Shape thresholds (see the module docstring for the values each shape gives).
TRIANGLE_SKEW = 0.3
SQUARE_CROSS = 0.85

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


def _check_frames(frames: Any) -> np.ndarray:
    arr = np.asarray(frames)
    if arr.dtype != np.uint8 or arr.ndim != 4 or arr.shape[-1] != 3:
        raise ValueError(f"judge_clip needs uint8 frames [T, H, W, 3], got {arr.dtype} {list(arr.shape)}")
    if arr.shape[0] < 2 or arr.shape[1] < 8 or arr.shape[2] < 8:
        raise ValueError(f"judge_clip needs at least 2 frames of at least 8x8 pixels, got {list(arr.shape)}")
    return arr


def _shift_min(labels: np.ndarray, big: int) -> np.ndarray:
    """Minimum of each pixel's label and its 4 neighbours' (per frame; out of frame counts as ``big``)."""
    out = labels.copy()
    np.minimum(out[:, 1:], labels[:, :-1], out=out[:, 1:])
    np.minimum(out[:, :-1], labels[:, 1:], out=out[:, :-1])
    np.minimum(out[:, :, 1:], labels[:, :, :-1], out=out[:, :, 1:])
    np.minimum(out[:, :, :-1], labels[:, :, 1:], out=out[:, :, :-1])
    return out


def _largest_blob(mask_THW: np.ndarray, weight_THW: np.ndarray) -> np.ndarray:
    """Per frame, the 4-connected component of ``mask`` with the largest total ``weight``."""
    T, H, W = mask_THW.shape
    big = T * H * W
    # Each mask pixel's label is the flat index of a pixel of its component; it only ever decreases.
    labels = np.where(mask_THW, np.arange(T * H * W).reshape(T, H, W), big)
    lookup = np.append(labels.reshape(-1), big)  # label -> that pixel's label (big -> big)
    while True:
        new = np.where(mask_THW, _shift_min(labels, big), big)
        # Pointer jumping: take the label of the pixel my label names (same component, label <= mine),
        # so labels travel far in one step and the loop ends after a few passes, not one per pixel of width.
        lookup[:-1] = new.reshape(-1)
        new = lookup[new]
        if np.array_equal(new, labels):
            break
        labels = new
    flat = labels.reshape(-1)
    inside = flat < big
    mass = np.bincount(flat[inside], weights=weight_THW.reshape(-1)[inside], minlength=T * H * W)
    best_T = mass.reshape(T, H * W).argmax(axis=1) + np.arange(T) * H * W
    return labels == best_T[:, None, None]


def _dilate(mask_THW: np.ndarray, radius: int) -> np.ndarray:
    out = mask_THW.copy()
    for _ in range(radius):
        grown = out.copy()
        grown[:, 1:] |= out[:, :-1]
        grown[:, :-1] |= out[:, 1:]
        grown[:, :, 1:] |= out[:, :, :-1]
        grown[:, :, :-1] |= out[:, :, 1:]
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
    return "square" if cross > SQUARE_CROSS else "circle"


def judge_clip(frames: Any) -> Judgement:
    """Colour, shape and direction of the one shape in a clip (uint8 RGB ``[T, H, W, 3]``)."""
    arr = _check_frames(frames)
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
    if not present_T.any():
        return Judgement(None, None, None)

    # Colour: core pixels of the blob, each normalised by its brightest channel.
    core_THW = blob_THW & (alpha_THW > 0.6) & present_T[:, None, None]
    px_N3 = np.clip(rgb_THW3[core_THW] - np.repeat(bg_T3, core_THW.reshape(T, -1).sum(1), axis=0), 0, None)
    px_N3 = px_N3[px_N3.max(axis=1) > 0]
    colour, colour_conf = None, 0.0
    if len(px_N3):
        chroma = (px_N3 / px_N3.max(axis=1, keepdims=True)).mean(axis=0)
        chroma = chroma / max(chroma.max(), 1e-6)
        d = np.linalg.norm(_PALETTE - chroma[None], axis=1)
        order = np.argsort(d)
        colour = _PALETTE_NAMES[order[0]]
        colour_conf = float(np.clip(d[order[1]] - d[order[0]], 0.0, 1.0))

    # Moments of the soft mask per frame.
    ys = np.arange(H, dtype=np.float64)[None, :, None] + 0.5
    xs = np.arange(W, dtype=np.float64)[None, None, :] + 0.5
    m0 = np.maximum(m0_T, 1e-9)
    cx_T = (w_THW * xs).sum(axis=(1, 2)) / m0
    cy_T = (w_THW * ys).sum(axis=(1, 2)) / m0
    dx = xs - cx_T[:, None, None]
    dy = ys - cy_T[:, None, None]

    def moment(a: np.ndarray) -> np.ndarray:
        return (w_THW * a).sum(axis=(1, 2)) / m0

    mu20, mu02 = np.maximum(moment(dx**2), 1e-9), np.maximum(moment(dy**2), 1e-9)
    skew_T = np.hypot(moment(dx**3) / mu20**1.5, moment(dy**3) / mu02**1.5)
    cross_T = moment(dx**2 * dy**2) / (mu20 * mu02)
    edge_T = blob_THW[:, 0].any(1) | blob_THW[:, -1].any(1) | blob_THW[:, :, 0].any(1) | blob_THW[:, :, -1].any(1)
    whole_T = present_T & ~edge_T
    use_T = whole_T if whole_T.sum() >= 2 else present_T

    skew, cross = float(np.median(skew_T[use_T])), float(np.median(cross_T[use_T]))
    shape = _classify_shape(skew, cross)
    votes = [_classify_shape(float(s), float(c)) for s, c in zip(skew_T[use_T], cross_T[use_T])]
    shape_conf = sum(v == shape for v in votes) / len(votes)

    direction, dir_conf, velocity = None, 0.0, (0.0, 0.0)
    t_idx = np.nonzero(use_T)[0]
    if len(t_idx) >= 2:
        vx = float(np.polyfit(t_idx, cx_T[t_idx], 1)[0])
        vy = float(np.polyfit(t_idx, cy_T[t_idx], 1)[0])
        velocity = (vx, vy)
        travel = math.hypot(vx, vy) * (T - 1)
        if travel >= MIN_TRAVEL * min(H, W):
            horizontal = abs(vx) >= abs(vy)
            direction = ("right" if vx > 0 else "left") if horizontal else ("down" if vy > 0 else "up")
            dir_conf = max(abs(vx), abs(vy)) / (abs(vx) + abs(vy))
    return Judgement(colour, shape, direction, colour_conf, float(shape_conf), float(dir_conf), velocity,
                     int(use_T.sum()), {"skew": skew, "cross": cross})


# ---------------------------------------------------------------------------------------------- prompts


_COLOUR_WORDS = {c: c for c in COLOURS}
_SHAPE_WORDS = {s: s for s in SHAPES}
_DIRECTION_WORDS = {
    "left": "left", "leftward": "left", "leftwards": "left",
    "right": "right", "rightward": "right", "rightwards": "right",
    "up": "up", "upward": "up", "upwards": "up",
    "down": "down", "downward": "down", "downwards": "down",
}


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
    right = np.array([[j.colour == t[0], j.shape == t[1], j.direction == t[2]] for j, t in zip(judgements, truths)])
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


def reconstruction_psnr(pipe: Any, jsonl: str | os.PathLike, n_clips: int | None = None) -> dict[str, Any]:
    """Tokenizer fidelity on the clips of a demo jsonl (e.g. ``heldout.jsonl``): each clip's frames as read
    from its file against ``pipe.reconstruct`` of them (VAE encode, multi-scale BSQ bits, decode) at the
    pipeline's default size (the file's frames are resized to it first when they differ).

    Returns ``{"psnr_db": mean over clips, "min_db", "max_db", "clips", "frames", "data"}``; PSNR is over
    every frame and channel of a clip, peak 255.
    """
    records = read_ground_truth(jsonl)
    if n_clips is not None:
        if n_clips < 1:
            raise ValueError(f"n_clips must be >= 1, got {n_clips}")
        records = records[:n_clips]
    if not records:
        raise ValueError(f"{jsonl} lists no clips")
    values, frames_per_clip = [], set()
    for path, _ in records:
        frames, _ = media.read_video(path, fps=pipe.config.fps)
        recon = np.asarray(pipe.reconstruct(path, output_type="np"))  # at the pipeline's default size
        if recon.shape[1:3] != frames.shape[1:3]:  # compare at the size the tokenizer saw
            frames = media.resize_and_center_crop(frames, *recon.shape[1:3])
        pair = [torch.from_numpy(np.ascontiguousarray(a))[None] for a in (recon, frames[: len(recon)])]
        values.append(psnr(*pair, value_range=(0, 255)).item())
        frames_per_clip.add(len(recon))
    return {"psnr_db": float(np.mean(values)), "min_db": float(np.min(values)), "max_db": float(np.max(values)),
            "clips": len(values), "frames": sorted(frames_per_clip), "data": str(jsonl)}


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
        return j.colour == self.truth[0], j.shape == self.truth[1], j.direction == self.truth[2]


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

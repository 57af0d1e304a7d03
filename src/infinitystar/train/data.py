"""Training data: jsonl records, clip sampling, resolution buckets and captions.

Records use the reference's jsonl format (training.md 2.1), one JSON object per line:

* video: ``video_path``, ``begin_frame_id``, ``end_frame_id`` (native frames, end exclusive), ``fps``
  (native; only used for the clip's duration and start time), ``tarsier2_caption`` (optional
  ``MiniCPM_V_2_6_caption``: each epoch picks one of the two uniformly), optional ``quality_prompt``.
  A generic ``caption``/``text`` is accepted when neither caption field is present (our extension).
  ``width``/``height``/``h_div_w`` are ignored: the bucket comes from the decoded frames.
* image: ``image_path``, ``text`` (short caption), ``long_caption``; at least one of them non-empty.

A row that cannot be used (not JSON, missing or mistyped field, empty range, no caption) is logged with
``file:line`` and the reason, counted in :class:`ParseStats`, and skipped: it never reaches a worker.

Durations (training.md 2.2/2.3): ``real = (end - begin) / fps``; mapped to whole seconds ``int(real)``,
dropped below ``min_seconds``, clamped to (or, with ``drop_long_video``, dropped above) ``max_seconds``.
A clip of ``D`` seconds is ``16 D + 1`` frames sampled by timestamp from ``begin / fps`` (``media.read_video``),
i.e. ``4 D + 1`` latent frames. The training fps, the scale pyramid (pixel budget, scales per clip, clip length) and
the VAE stride are the pipeline's (:class:`~infinitystar.config.PipelineConfig`), passed beside the ``DataConfig``.

Captions (``draw_caption``) and every other draw of a record in an epoch come from a generator seeded by
``(seed, epoch, record uid)`` (``record_generator``), so they do not depend on the rank, the worker or where a run
was resumed (the reference seeds from the wall clock and draws dropout from the same Python RNG on every rank,
training.md 8.6/12.3). The dataset over the cached latents is ``train.dataset``.
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from infinitystar.config import ConfigError, PipelineConfig
from infinitystar.generation.schedules import (
    SPATIAL_STRIDE,
    Scale,
    h_div_w_templates,
    latent_frames,
    nearest_h_div_w_template,
    resolution_bucket,
    spatial_ladder,
    video_scale_schedule,
)
from infinitystar.text import maybe_truncate_sentences, training_caption, word_tokens
from infinitystar.train.config import DataConfig

logger = logging.getLogger(__name__)

__all__ = [
    "Bucket",
    "ParseStats",
    "Record",
    "RecordError",
    "bucket_for_size",
    "bucket_for_template",
    "bucket_sizes",
    "caption_words",
    "draw_caption",
    "load_records",
    "map_duration",
    "parse_record",
    "read_jsonl",
    "record_generator",
    "resolve_jsonl_files",
    "sample_frame_count",
    "sample_schedule",
]

# Paths containing this hold already-cut clips: their frame ids are rebased to start at 0 (reference quirk).
_CUT_CLIP_MARKER = "/vdataset/clip"
_VIDEO_CAPTION_FIELDS = ("tarsier2_caption", "MiniCPM_V_2_6_caption")
_GENERIC_CAPTION_FIELDS = ("caption", "text")


def caption_words(jsonl: str | os.PathLike) -> list[str]:
    """The words (``text.word_tokens``) of every caption of a reference-format jsonl: the video caption fields, the
    generic ones and a story's ``segment_captions``. A closed-vocabulary text encoder knows these after training."""
    words: set[str] = set()
    for line in Path(jsonl).read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        row = json.loads(line)
        if not isinstance(row, dict):
            continue
        for key in (*_VIDEO_CAPTION_FIELDS, *_GENERIC_CAPTION_FIELDS):
            if isinstance(row.get(key), str):
                words.update(word_tokens(row[key]))
        segments = row.get("segment_captions")
        if isinstance(segments, list):
            words.update(w for c in segments if isinstance(c, str) for w in word_tokens(c))
    return sorted(words)


class RecordError(ValueError):
    """A jsonl row that cannot be used; the message starts with ``file:line``."""


# ----------------------------------------------------------------------------------------------
# Records
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Record:
    """One usable row: a video clip or an image.

    ``path`` is absolute. For videos ``begin_frame``/``end_frame`` are native frame ids (end
    exclusive), ``seconds`` the mapped whole-second duration and ``num_frames = fps * seconds + 1`` the
    frames sampled at the training rate; images have ``seconds = None`` and ``num_frames = 1``.
    ``captions`` are the candidate captions (videos: tarsier2 and MiniCPM when present; images: the
    short ``text`` then ``long_caption``, either may be empty). ``source`` is ``file:line``.
    ``segment_captions``: a *story* video (interactive training), one caption per clip after the first frame
    (the ``segment_captions`` field; the demo's ``make-demo-data --stories`` writes it); empty otherwise.
    """

    kind: Literal["video", "image"]
    path: str
    source: str
    captions: tuple[str, ...]
    quality_prompt: str = ""
    begin_frame: int = 0
    end_frame: int = 1
    native_fps: float = 0.0
    seconds: int | None = None
    num_frames: int = 1
    segment_captions: tuple[str, ...] = ()

    @property
    def is_story(self) -> bool:
        return bool(self.segment_captions)

    @property
    def start_time(self) -> float:
        """Seconds from the video's start to the clip's first frame."""
        return self.begin_frame / self.native_fps if self.kind == "video" else 0.0

    @property
    def latent_frames(self) -> int:
        return 1 if self.kind == "image" else latent_frames(self.num_frames)


@dataclass
class ParseStats:
    """What :func:`load_records` saw: rows read and why rows were left out."""

    files: int = 0
    lines: int = 0
    blank: int = 0
    videos: int = 0
    images: int = 0
    bad: int = 0
    too_short: int = 0
    too_long: int = 0
    clamped: int = 0
    bad_rows: list[str] = field(default_factory=list)  # "file:line: reason" of each bad row

    @property
    def records(self) -> int:
        return self.videos + self.images


def resolve_jsonl_files(patterns: Sequence[str]) -> list[Path]:
    """Expand files, folders (every ``*.jsonl`` below) and glob patterns into a sorted, unique list.

    A pattern that matches nothing raises ``FileNotFoundError`` naming it (a silent empty dataset would
    only show up as a zero-length epoch much later).
    """
    out: set[Path] = set()
    for pattern in patterns:
        p = Path(pattern)
        if p.is_dir():
            found = [Path(f) for f in glob.glob(str(p / "**" / "*.jsonl"), recursive=True)]
        elif p.is_file():
            found = [p]
        else:
            found = [Path(f) for f in glob.glob(pattern, recursive=True) if Path(f).is_file()]
        if not found:
            raise FileNotFoundError(f"jsonl pattern {pattern!r} matches no file")
        out.update(Path(os.path.abspath(f)) for f in found)
    return sorted(out)


def map_duration(real_seconds: float, config: DataConfig) -> tuple[int | None, str]:
    """Whole-second training duration of a clip of ``real_seconds``: ``(seconds, status)``.

    ``status`` is ``"ok"``, ``"clamped"`` (longer than ``max_seconds``, cut to it), ``"too_short"`` or
    ``"too_long"`` (dropped; ``seconds`` is None then).
    """
    mapped = int(real_seconds)  # duration_resolution = 1 s; int() truncates like the reference
    if mapped < config.min_seconds:
        return None, "too_short"
    if mapped > config.max_seconds:
        if config.drop_long_video:
            return None, "too_long"
        return config.max_seconds, "clamped"
    return mapped, "ok"


def sample_frame_count(seconds: int, fps: int = 16) -> int:
    """Frames sampled for a clip of ``seconds`` whole seconds: ``fps * seconds + 1`` (5 s -> 81)."""
    if seconds < 0:
        raise ValueError(f"seconds must be >= 0, got {seconds}")
    return fps * seconds + 1


def _text_field(row: dict[str, Any], name: str, where: str, required: bool = False) -> str:
    value = row.get(name)
    if value is None:
        if required:
            raise RecordError(f"{where}: missing field {name!r}")
        return ""
    if not isinstance(value, str):
        raise RecordError(f"{where}: field {name!r} must be a string, got {type(value).__name__} {value!r}")
    return value.strip()


def _int_field(row: dict[str, Any], name: str, where: str) -> int:
    if name not in row:
        raise RecordError(f"{where}: missing field {name!r}")
    value = row[name]
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value != int(value):
        raise RecordError(f"{where}: field {name!r} must be an integer, got {value!r}")
    return int(value)


def _resolve_path(value: str, base: Path) -> str:
    p = Path(os.path.expanduser(value))
    return os.path.abspath(p if p.is_absolute() else base / p)


def _segment_captions(row: dict[str, Any], where: str) -> tuple[str, ...]:
    """A story's ``segment_captions`` (one non-empty string per clip, at least two), or () when absent."""
    value = row.get("segment_captions")
    if value is None:
        return ()
    if not isinstance(value, list) or len(value) < 2 or not all(isinstance(c, str) and c.strip() for c in value):
        raise RecordError(f"{where}: field 'segment_captions' must be a list of at least two non-empty strings "
                          f"(one per clip of the story), got {str(value)[:80]}")
    return tuple(c.strip() for c in value)


def parse_record(row: Any, where: str, config: DataConfig, pipeline: PipelineConfig,
                 base_dir: Path) -> tuple[Record | None, str]:
    """One decoded jsonl row -> ``(record, status)``; raises :class:`RecordError` for a bad row.

    ``status`` is the duration status of :func:`map_duration` (``record`` is None when the clip is
    dropped for its length). Clips are sampled at ``pipeline.fps``; ``base_dir`` resolves relative paths.
    """
    if not isinstance(row, dict):
        raise RecordError(f"{where}: a record must be a JSON object, got {type(row).__name__}")
    if "video_path" in row:
        raw_path = _text_field(row, "video_path", where, required=True)
        if not raw_path:
            raise RecordError(f"{where}: empty 'video_path'")
        begin = _int_field(row, "begin_frame_id", where)
        end = _int_field(row, "end_frame_id", where)
        fps = row.get("fps")
        if isinstance(fps, bool) or not isinstance(fps, int | float) or not math.isfinite(fps) or fps <= 0:
            raise RecordError(f"{where}: field 'fps' must be a positive number, got {fps!r}")
        if _CUT_CLIP_MARKER in raw_path:
            begin, end = 0, end - begin
        if begin < 0 or end <= begin:
            raise RecordError(f"{where}: frame range must satisfy 0 <= begin_frame_id < end_frame_id, "
                              f"got {begin}..{end}")
        captions = tuple(c for c in (_text_field(row, f, where) for f in _VIDEO_CAPTION_FIELDS) if c)
        if not captions:
            captions = tuple(c for c in (_text_field(row, f, where) for f in _GENERIC_CAPTION_FIELDS) if c)[:1]
        if not captions:
            raise RecordError(f"{where}: no caption (need a non-empty 'tarsier2_caption', "
                              f"'MiniCPM_V_2_6_caption', 'caption' or 'text')")
        segments = _segment_captions(row, where)
        seconds, status = map_duration((end - begin) / float(fps), config)
        if seconds is None:
            return None, status
        record = Record(kind="video", path=_resolve_path(raw_path, base_dir), source=where, captions=captions,
                        quality_prompt=_text_field(row, "quality_prompt", where), begin_frame=begin, end_frame=end,
                        native_fps=float(fps), seconds=seconds,
                        num_frames=sample_frame_count(seconds, pipeline.fps), segment_captions=segments)
        if segments and record.latent_frames != 1 + pipeline.frames_inner_clip * len(segments):
            clips = (record.latent_frames - 1) / pipeline.frames_inner_clip
            raise RecordError(f"{where}: {len(segments)} segment_captions for a story of {clips:g} clips "
                              f"({seconds} s at {pipeline.fps} fps, {pipeline.frames_inner_clip}-latent-frame clips; "
                              f"max_seconds={config.max_seconds})")
        return record, status
    if "image_path" in row:
        raw_path = _text_field(row, "image_path", where, required=True)
        if not raw_path:
            raise RecordError(f"{where}: empty 'image_path'")
        short, long = _text_field(row, "text", where), _text_field(row, "long_caption", where)
        if not short and not long:
            raise RecordError(f"{where}: image record without caption (need a non-empty 'text' or 'long_caption')")
        return Record(kind="image", path=_resolve_path(raw_path, base_dir), source=where, captions=(short, long),
                      quality_prompt=_text_field(row, "quality_prompt", where)), "ok"
    raise RecordError(f"{where}: neither 'video_path' nor 'image_path' (keys: {sorted(row)[:10]})")


def read_jsonl(path: Path, config: DataConfig, pipeline: PipelineConfig,
               stats: ParseStats | None = None) -> list[Record]:
    """Every usable record of one jsonl file; bad rows are logged (``file:line: reason``) and skipped."""
    stats = stats if stats is not None else ParseStats()
    base = Path(config.video_root) if config.video_root else path.parent
    records: list[Record] = []
    stats.files += 1
    with open(path, encoding="utf-8", errors="replace") as f:
        for lineno, line in enumerate(f, start=1):
            stats.lines += 1
            where = f"{path}:{lineno}"
            if not line.strip():
                stats.blank += 1
                continue
            try:
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as err:
                    raise RecordError(f"{where}: not valid JSON ({err.msg} at column {err.colno})") from None
                record, status = parse_record(row, where, config, pipeline, base)
            except RecordError as err:
                stats.bad += 1
                stats.bad_rows.append(str(err))
                logger.warning("skipping bad row %s", err)
                continue
            if status == "clamped":
                stats.clamped += 1
            elif status in ("too_short", "too_long"):
                setattr(stats, status, getattr(stats, status) + 1)
                continue
            if record is None:  # pragma: no cover - parse_record returns None only with those statuses
                continue
            if config.media != "both" and record.kind != config.media:
                continue
            stats.videos += record.kind == "video"
            stats.images += record.kind == "image"
            records.append(record)
    return records


def load_records(config: DataConfig, pipeline: PipelineConfig) -> tuple[list[Record], ParseStats]:
    """All records of ``config.jsonl`` (files in sorted order, rows in file order), sampled at the pipeline's fps,
    and the parse counts."""
    if not config.jsonl:
        raise ConfigError("DataConfig.jsonl is empty: give at least one jsonl file, folder or glob pattern")
    if pipeline.fps % pipeline.vae.time_stride:
        raise ConfigError(f"pipeline {pipeline.name!r}: fps ({pipeline.fps}) must be a multiple of the VAE time "
                          f"stride ({pipeline.vae.time_stride}) so whole training seconds map to whole latent frames")
    stats = ParseStats()
    records: list[Record] = []
    for path in resolve_jsonl_files(config.jsonl):
        records.extend(read_jsonl(path, config, pipeline, stats))
    if stats.bad:
        logger.warning("%d bad row(s) skipped in %d jsonl file(s)", stats.bad, stats.files)
    return records, stats


# ----------------------------------------------------------------------------------------------
# Resolution buckets and schedules
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Bucket:
    """A resolution bucket: the h/w template key and the target pixel size (16 x the last grid)."""

    template: float
    height: int
    width: int

    @property
    def latent_hw(self) -> tuple[int, int]:
        return self.height // SPATIAL_STRIDE, self.width // SPATIAL_STRIDE


def _ladder(template: float, pipeline: PipelineConfig) -> tuple[tuple[int, int], ...]:
    return spatial_ladder(template)[:pipeline.scales_per_clip]


def bucket_for_size(height: int, width: int, pipeline: PipelineConfig) -> Bucket:
    """The bucket of a picture of ``height x width`` pixels: nearest h/w template, its last grid x 16.

    Uses ``schedules.resolution_bucket`` for the released pixel budgets; with the pipeline's ``num_scales``
    (small models) the target is the last of the first ``num_scales`` grids.
    """
    if not (isinstance(height, int) and isinstance(width, int) and height > 0 and width > 0):
        raise ValueError(f"picture size must be positive integers, got {height!r}x{width!r}")
    if pipeline.num_scales is None:
        template, (h, w) = resolution_bucket(height, width, pipeline.pn)
        return Bucket(template, h, w)
    return bucket_for_template(nearest_h_div_w_template(height / width), pipeline)


def bucket_for_template(template: float, pipeline: PipelineConfig) -> Bucket:
    """The bucket of an h/w template key (its last grid x 16)."""
    gh, gw = _ladder(template, pipeline)[-1]
    return Bucket(template, gh * SPATIAL_STRIDE, gw * SPATIAL_STRIDE)


def bucket_sizes(pipeline: PipelineConfig) -> set[tuple[int, int]]:
    """Pixel (height, width) of every bucket of the pipeline (short ladders share sizes across templates)."""
    return {(b.height, b.width) for b in (bucket_for_template(t, pipeline) for t in h_div_w_templates())}


def sample_schedule(bucket: Bucket, latent_frames: int, pipeline: PipelineConfig) -> list[Scale]:
    """The full space-time pyramid (training.md 3.1) of a latent with ``latent_frames`` frames in ``bucket``."""
    image = [(1, h, w) for h, w in _ladder(bucket.template, pipeline)]
    return video_scale_schedule(image, latent_frames, pipeline.frames_inner_clip)


# ----------------------------------------------------------------------------------------------
# Randomness and captions
# ----------------------------------------------------------------------------------------------


def record_generator(seed: int, epoch: int, uid: str, purpose: str = "caption") -> torch.Generator:
    """A generator that depends only on ``(seed, epoch, record uid, purpose)``: never on rank, worker or order."""
    digest = hashlib.sha256(f"{seed}\0{epoch}\0{uid}\0{purpose}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))


def draw_caption(record: Record, config: DataConfig, generator: torch.Generator) -> str:
    """The record's training caption for one epoch (training.md 2.6), drawn from ``generator``.

    Videos: tarsier2 vs MiniCPM uniformly (when both exist), sentence truncation with probability
    ``short_caption_prob``, ``' ' + quality_prompt``, then the ``<<<t=Ns>>>`` prefix. Images: the short
    caption with probability ``short_caption_prob`` (the other one when one is empty), the same sentence
    truncation, never a duration prefix.
    """
    trunc_p = config.short_caption_prob if config.sentence_truncation else 0.0
    if record.kind == "video":
        caps = record.captions
        caption = caps[0] if len(caps) == 1 else caps[int(torch.randint(0, len(caps), (), generator=generator))]
        return training_caption(caption, duration_s=record.seconds if config.duration_prefix else None,
                                quality_prompt=record.quality_prompt or None, short_cap_prob=trunc_p,
                                generator=generator)
    short, long = record.captions
    if not short:
        caption = long
    elif not long:
        caption = short
    else:
        caption = short if float(torch.rand((), generator=generator)) < config.short_caption_prob else long
    caption = maybe_truncate_sentences(caption, trunc_p, generator)
    return f"{caption} {record.quality_prompt}" if record.quality_prompt else caption

"""Training data: jsonl records, clip sampling, resolution buckets, captions, and the latent dataset.

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
i.e. ``4 D + 1`` latent frames.

The dataset (:class:`LatentDataset`) reads the latents that ``infinitystar extract-features``
cached (``train.features``); records without a cache are counted and left out (or encoded online when
a VAE is given). Order and randomness are functions of ``(seed, epoch, record)`` only:

* each epoch is one global permutation seeded by ``seed + epoch`` (the same on every rank), then
  sharded by *record* ``perm[rank::world_size]`` and cut to the same length on every rank;
* caption choice, sentence truncation and condition dropout of a record in an epoch come from a
  generator seeded by ``(seed, epoch, record uid)``, so they do not depend on the rank, the worker or
  where a run was resumed (the reference seeds from the wall clock and draws dropout from the same
  Python RNG on every rank, training.md 8.6/12.3);
* :class:`DataPosition` ``(epoch, index)`` is the next sample of this rank; a resumed run that starts
  there yields exactly the samples the interrupted run would have yielded.
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from infinitystar.config import ConfigError, DataConfig
from infinitystar.schedules import (
    SPATIAL_STRIDE,
    nearest_h_div_w_template,
    resolution_bucket,
    spatial_ladder,
    video_scale_schedule,
)
from infinitystar.text import guidance_dropout_mask, maybe_truncate_sentences, training_caption

logger = logging.getLogger(__name__)

Scale = tuple[int, int, int]

__all__ = [
    "Bucket",
    "DataPosition",
    "DataSample",
    "LatentDataset",
    "ParseStats",
    "Record",
    "RecordError",
    "bucket_for_size",
    "bucket_for_template",
    "bucket_sizes",
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

    @property
    def start_time(self) -> float:
        """Seconds from the video's start to the clip's first frame."""
        return self.begin_frame / self.native_fps if self.kind == "video" else 0.0

    @property
    def latent_frames(self) -> int:
        return 1 if self.kind == "image" else 1 + (self.num_frames - 1) // 4


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


def parse_record(row: Any, where: str, config: DataConfig, base_dir: Path) -> tuple[Record | None, str]:
    """One decoded jsonl row -> ``(record, status)``; raises :class:`RecordError` for a bad row.

    ``status`` is the duration status of :func:`map_duration` (``record`` is None when the clip is
    dropped for its length). ``base_dir`` resolves relative paths.
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
        seconds, status = map_duration((end - begin) / float(fps), config)
        if seconds is None:
            return None, status
        return Record(kind="video", path=_resolve_path(raw_path, base_dir), source=where, captions=captions,
                      quality_prompt=_text_field(row, "quality_prompt", where), begin_frame=begin, end_frame=end,
                      native_fps=float(fps), seconds=seconds,
                      num_frames=sample_frame_count(seconds, config.fps)), status
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


def read_jsonl(path: Path, config: DataConfig, stats: ParseStats | None = None) -> list[Record]:
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
                record, status = parse_record(row, where, config, base)
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


def load_records(config: DataConfig) -> tuple[list[Record], ParseStats]:
    """All records of ``config.jsonl`` (files in sorted order, rows in file order) and the parse counts."""
    if not config.jsonl:
        raise ConfigError("DataConfig.jsonl is empty: give at least one jsonl file, folder or glob pattern")
    stats = ParseStats()
    records: list[Record] = []
    for path in resolve_jsonl_files(config.jsonl):
        records.extend(read_jsonl(path, config, stats))
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


def _ladder(template: float, config: DataConfig) -> tuple[tuple[int, int], ...]:
    from infinitystar.schedules import num_scales_for_pn

    k = config.num_scales if config.num_scales is not None else num_scales_for_pn(config.pn)
    return spatial_ladder(template)[:k]


def bucket_for_size(height: int, width: int, config: DataConfig) -> Bucket:
    """The bucket of a picture of ``height x width`` pixels: nearest h/w template, its last grid x 16.

    Uses ``schedules.resolution_bucket`` for the released pixel budgets; with ``num_scales`` (small
    test models) the target is the last of the first ``num_scales`` grids.
    """
    if not (isinstance(height, int) and isinstance(width, int) and height > 0 and width > 0):
        raise ValueError(f"picture size must be positive integers, got {height!r}x{width!r}")
    if config.num_scales is None:
        template, (h, w) = resolution_bucket(height, width, config.pn)
        return Bucket(template, h, w)
    template = nearest_h_div_w_template(height / width)
    gh, gw = _ladder(template, config)[-1]
    return Bucket(template, gh * SPATIAL_STRIDE, gw * SPATIAL_STRIDE)


def bucket_for_template(template: float, config: DataConfig) -> Bucket:
    """The bucket of an h/w template key (its last grid x 16)."""
    gh, gw = _ladder(template, config)[-1]
    return Bucket(template, gh * SPATIAL_STRIDE, gw * SPATIAL_STRIDE)


def bucket_sizes(config: DataConfig) -> set[tuple[int, int]]:
    """Pixel (height, width) of every bucket of the config (short test ladders share sizes across templates)."""
    from infinitystar.schedules import h_div_w_templates

    return {(b.height, b.width) for b in (bucket_for_template(t, config) for t in h_div_w_templates())}


def sample_schedule(bucket: Bucket, latent_frames: int, config: DataConfig) -> list[Scale]:
    """The full space-time pyramid (training.md 3.1) of a latent with ``latent_frames`` frames in ``bucket``."""
    image = [(1, h, w) for h, w in _ladder(bucket.template, config)]
    return video_scale_schedule(image, latent_frames, config.frames_inner_clip)


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


# ----------------------------------------------------------------------------------------------
# Dataset over cached latents
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DataPosition:
    """The next sample of one rank: ``index`` into the rank's order of ``epoch``. Save it, restore it."""

    epoch: int = 0
    index: int = 0

    def __post_init__(self) -> None:
        if self.epoch < 0 or self.index < 0:
            raise ValueError(f"DataPosition needs epoch >= 0 and index >= 0, got ({self.epoch}, {self.index})")

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "index": self.index}

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> DataPosition:
        try:
            return cls(int(state["epoch"]), int(state["index"]))
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"not a DataPosition state dict: {state!r} ({err})") from None


@dataclass
class DataSample:
    """One training sample.

    ``latent_CTHW`` is the cached latent ``[64, pt, h, w]`` (float32, already cut to ``pt`` frames);
    ``schedule`` its full scale pyramid; ``caption`` the processed caption of this epoch; ``drop_text``
    whether the trainer should replace its text by the unconditional rows (condition dropout, drawn per
    sample from the seed). ``position`` is this sample's place; a checkpoint taken after training on it
    stores :attr:`next_position`.
    """

    latent_CTHW: torch.Tensor
    schedule: list[Scale]
    caption: str
    drop_text: bool
    record: Record
    bucket: Bucket
    cache_file: str | None
    position: DataPosition

    @property
    def next_position(self) -> DataPosition:
        return DataPosition(self.position.epoch, self.position.index + 1)


@dataclass(frozen=True)
class _Skipped:
    position: DataPosition
    reason: str


def _identity(x: Any) -> Any:
    return x


class LatentDataset:
    """Cached latents of the records of a :class:`DataConfig`, in a seeded order, sharded by rank.

    ``feature_tag`` selects which extraction to read when the cache holds several (VAE identity and
    posterior mode, see ``train.features.feature_tag``); None accepts the only one present. ``vae``
    (optional) encodes records without a cache online (slow; for small experiments).

    Use :meth:`iterate` (optionally from a saved :class:`DataPosition`) for a stream of
    :class:`DataSample`; ``len(ds)`` is the number of samples per rank per epoch.
    """

    def __init__(
        self,
        config: DataConfig,
        *,
        rank: int = 0,
        world_size: int = 1,
        feature_tag: str | None = None,
        vae: torch.nn.Module | None = None,
        records: Sequence[Record] | None = None,
    ) -> None:
        from infinitystar.train.features import FeatureIndex, clip_key

        if not (isinstance(world_size, int) and world_size >= 1 and isinstance(rank, int) and 0 <= rank < world_size):
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        self.config, self.rank, self.world_size, self.vae = config, rank, world_size, vae
        if records is None:
            records, self.stats = load_records(config)
        else:
            self.stats = ParseStats(videos=sum(r.kind == "video" for r in records),
                                    images=sum(r.kind == "image" for r in records))
        if not config.cache_dir and vae is None:
            raise ConfigError("DataConfig.cache_dir is empty and no VAE was given: nothing to read latents from")
        index = FeatureIndex.scan(config.cache_dir, config) if config.cache_dir else None
        if index is not None and feature_tag is None:
            tags = index.tags()
            if len(tags) > 1:
                raise ConfigError(f"the cache {config.cache_dir} holds latents of several extractions {sorted(tags)}; "
                                  "pass feature_tag to choose one")
            feature_tag = next(iter(tags), None)
        self.feature_tag = feature_tag
        self.records: list[Record] = []
        self.cache_files: list[str | None] = []
        self.missing_cache = 0
        for rec in records:
            entry = index.find(clip_key(rec), rec.num_frames, feature_tag) if index is not None else None
            if entry is None and vae is None:
                self.missing_cache += 1
                continue
            self.records.append(rec)
            self.cache_files.append(str(entry.path) if entry is not None else None)
        if self.missing_cache:
            logger.warning("%d of %d record(s) have no cached latent in %s and are left out (run "
                           "`infinitystar extract-features`)", self.missing_cache, len(records), config.cache_dir)
        if len(self.records) < world_size:
            raise ValueError(f"{len(self.records)} usable record(s) for {world_size} rank(s): every rank needs at "
                             f"least one ({self.missing_cache} without cache, {self.stats.bad} bad rows)")
        self.skipped = 0
        self._order_cache: tuple[int, list[int]] | None = None

    # -- order ------------------------------------------------------------------------------------

    def _uid(self, i: int) -> str:
        rec = self.records[i]
        return f"{rec.path}|{rec.begin_frame}|{rec.end_frame}|{rec.source}"

    def epoch_order(self, epoch: int) -> list[int]:
        """Record indices of this rank's samples in ``epoch`` (the same length on every rank)."""
        cached = self._order_cache
        if cached is not None and cached[0] == epoch:
            return cached[1]
        order = self._mixed(record_generator(self.config.seed, epoch, "", "epoch-order"))
        per_rank = len(order) // self.world_size
        if per_rank == 0:
            raise ValueError(f"epoch {epoch} has {len(order)} sample(s) for {self.world_size} rank(s)")
        mine = order[self.rank::self.world_size][:per_rank]
        self._order_cache = (epoch, mine)
        return mine

    def _mixed(self, gen: torch.Generator) -> list[int]:
        frac = self.config.image_fraction
        if frac is None:
            return torch.randperm(len(self.records), generator=gen).tolist()
        videos = [i for i, r in enumerate(self.records) if r.kind == "video"]
        images = [i for i, r in enumerate(self.records) if r.kind == "image"]
        if frac > 0 and not images:
            raise ValueError(f"image_fraction={frac} but no image record is usable")
        if frac < 1 and not videos:
            raise ValueError(f"image_fraction={frac} but no video record is usable")
        n_img = len(images) if frac == 1 else round(frac / (1 - frac) * len(videos))
        picked = []
        while len(picked) < n_img:  # images repeated (each pass reshuffled) or subsampled to reach the fraction
            picked += [images[j] for j in torch.randperm(len(images), generator=gen).tolist()]
        pool = (videos if frac < 1 else []) + picked[:n_img]
        return [pool[j] for j in torch.randperm(len(pool), generator=gen).tolist()]

    def __len__(self) -> int:
        return len(self.epoch_order(0))  # the same every epoch

    # -- samples ----------------------------------------------------------------------------------

    def load_latent(self, i: int) -> tuple[torch.Tensor, Bucket]:
        """The latent ``[64, pt, h, w]`` of record ``i`` (cut to its ``pt``) and its bucket."""
        from infinitystar.train.features import encode_record, load_cached_latent

        rec, path = self.records[i], self.cache_files[i]
        if path is not None:
            latent, bucket = load_cached_latent(path, self.config)
        else:
            assert self.vae is not None
            latent, bucket = encode_record(self.vae, rec, self.config)
        return latent[:, : rec.latent_frames].contiguous(), bucket

    def sample(self, epoch: int, index: int) -> DataSample:
        """Sample ``index`` of this rank in ``epoch`` (raises on an unreadable latent)."""
        order = self.epoch_order(epoch)
        if not 0 <= index < len(order):
            raise IndexError(f"index {index} out of range for {len(order)} samples per epoch")
        i = order[index]
        rec = self.records[i]
        latent, bucket = self.load_latent(i)
        gen = record_generator(self.config.seed, epoch, self._uid(i))
        caption = draw_caption(rec, self.config, gen)
        drop = bool(guidance_dropout_mask(1, self.config.cond_dropout,
                                          record_generator(self.config.seed, epoch, self._uid(i), "dropout"))[0])
        return DataSample(latent, sample_schedule(bucket, latent.shape[1], self.config), caption, drop, rec, bucket,
                          self.cache_files[i], DataPosition(epoch, index))

    def _try_sample(self, epoch: int, index: int) -> DataSample | _Skipped:
        try:
            return self.sample(epoch, index)
        except (ValueError, OSError, RuntimeError) as err:
            return _Skipped(DataPosition(epoch, index), f"{self.records[self.epoch_order(epoch)[index]].source}: {err}")

    def iterate(self, start: DataPosition | None = None, *, epochs: int | None = None,
                num_workers: int | None = None) -> Iterator[DataSample]:
        """Samples from ``start`` on, epoch after epoch (``epochs`` = how many to run to the end of; None = forever).

        With ``num_workers > 0`` a ``DataLoader`` decodes in worker processes; samples still come in
        index order. A sample whose latent cannot be read is logged with its record's ``file:line`` and
        skipped (its index is consumed, so resuming stays exact).
        """
        pos = start or DataPosition()
        workers = self.config.num_workers if num_workers is None else num_workers
        last_epoch = None if epochs is None else pos.epoch + epochs - 1
        while last_epoch is None or pos.epoch <= last_epoch:
            for item in self._epoch_items(pos.epoch, pos.index, workers):
                if isinstance(item, _Skipped):
                    self.skipped += 1
                    logger.warning("skipping sample %s: %s", item.position, item.reason)
                    continue
                yield item
            pos = DataPosition(pos.epoch + 1, 0)

    def _epoch_items(self, epoch: int, start: int, workers: int) -> Iterator[DataSample | _Skipped]:
        n = len(self.epoch_order(epoch))
        if workers <= 0:
            for index in range(start, n):
                yield self._try_sample(epoch, index)
            return
        loader = torch.utils.data.DataLoader(_EpochStream(self, epoch, start, n), batch_size=None,
                                             num_workers=workers, collate_fn=_identity)
        yield from loader

    def state_dict(self, position: DataPosition) -> dict[str, Any]:
        """What a checkpoint stores to resume the stream exactly (checked by :meth:`resume_position`)."""
        return {**position.state_dict(), "seed": self.config.seed, "world_size": self.world_size,
                "num_records": len(self.records)}

    def resume_position(self, state: dict[str, Any]) -> DataPosition:
        """The saved position, after checking that seed, world size and record count still match."""
        for key, mine in (("seed", self.config.seed), ("world_size", self.world_size),
                          ("num_records", len(self.records))):
            if key in state and state[key] != mine:
                raise ValueError(f"cannot resume the data stream exactly: checkpoint has {key}={state[key]}, "
                                 f"this run has {key}={mine}")
        return DataPosition.from_state_dict(state)


class _EpochStream(torch.utils.data.IterableDataset):
    """Worker w yields indices start + w, start + w + W, ...: the DataLoader's round robin restores index order."""

    def __init__(self, dataset: LatentDataset, epoch: int, start: int, stop: int) -> None:
        self.dataset, self.epoch, self.start, self.stop = dataset, epoch, start, stop

    def __iter__(self) -> Iterator[DataSample | _Skipped]:
        info = torch.utils.data.get_worker_info()
        wid, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        for index in range(self.start + wid, self.stop, nw):
            yield self.dataset._try_sample(self.epoch, index)

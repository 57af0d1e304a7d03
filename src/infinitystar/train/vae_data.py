"""Pixel clips for VAE training: find media files, sample fixed-length clips at a given fps and size.

Sources (``list_media``) may be folders (scanned recursively), ``.jsonl`` files in the reference's
record format (``video_path`` or ``image_path``; ``begin_frame_id``/``end_frame_id``/``fps`` restrict a
video to that window; relative paths are relative to the jsonl), ``.txt`` lists (one path per line,
``#`` comments, relative to the list) and single files. Media kinds:

* videos (mp4, webm, mov, ...): frames are sampled by timestamp at the training fps (``media.read_video``);
* images (png, jpg, webp): a still clip (the image repeated ``num_frames`` times);
* ``.npy`` uint8 arrays ``[T, H, W, 3]`` (or ``[H, W, 3]``): frames taken as already at the training fps
  (lossless, fast; handy for procedurally generated data).

Every clip goes through the reference's pixel transform (cover-resize + centre crop, [-1, 1]).

A dataset is any object with ``sample(rng: numpy.random.Generator) -> Tensor`` returning one clip
(3, T, H, W) in [-1, 1]; the trainer draws each step's batch from a generator seeded by (seed, step),
so a resumed run sees exactly the clips an uninterrupted run would.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
from torch import Tensor

from infinitystar.media import (
    IMAGE_SUFFIXES,
    VIDEO_READ_SUFFIXES,
    MediaError,
    frames_to_tensor,
    probe_video,
    read_image,
    read_video,
    resize_and_center_crop,
)

logger = logging.getLogger(__name__)

ARRAY_SUFFIXES = (".npy",)
MEDIA_SUFFIXES = (*VIDEO_READ_SUFFIXES, *IMAGE_SUFFIXES, *ARRAY_SUFFIXES)


class ClipDataset(Protocol):
    def sample(self, rng: np.random.Generator) -> Tensor:
        """One clip (3, T, H, W) in [-1, 1]."""
        ...


@dataclass(frozen=True)
class MediaItem:
    """One source: a file and, for videos, the time window (seconds) clips are drawn from."""

    path: Path
    kind: str  # "video", "image" or "array"
    start: float = 0.0
    end: float | None = None  # None = the end of the file


def _kind(path: Path) -> str | None:
    suffix = path.suffix.lower()
    if suffix in ARRAY_SUFFIXES:
        return "array"
    if suffix in IMAGE_SUFFIXES:
        return "image"
    if suffix in VIDEO_READ_SUFFIXES:
        return "video"
    return None


def _item(path: Path, where: str) -> MediaItem:
    kind = _kind(path)
    if kind is None:
        raise MediaError(f"{where}: {path} is not a supported media file (suffixes: {', '.join(MEDIA_SUFFIXES)})")
    if not path.is_file():
        raise FileNotFoundError(f"{where}: media file {path} does not exist")
    return MediaItem(path, kind)


def _jsonl_item(path: Path, line: str, where: str) -> MediaItem:
    """One reference-format jsonl row -> its media item; a bad row raises ValueError/FileNotFoundError/MediaError
    naming ``where`` (file:line)."""
    try:
        row = json.loads(line)
    except json.JSONDecodeError as err:
        raise ValueError(f"{where}: not a JSON object ({err})") from None
    if not isinstance(row, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(row).__name__}")
    key = "video_path" if "video_path" in row else "image_path" if "image_path" in row else None
    if key is None or not isinstance(row[key], str) or not row[key]:
        raise ValueError(f"{where}: the record has no 'video_path' or 'image_path' string")
    media = Path(row[key])
    media = media if media.is_absolute() else path.parent / media
    item = _item(media, where)
    if key == "video_path" and "begin_frame_id" in row and "fps" in row:
        try:
            fps = float(row["fps"])
            begin = int(row["begin_frame_id"])
            end = int(row["end_frame_id"]) if "end_frame_id" in row else None
        except (TypeError, ValueError) as err:
            raise ValueError(f"{where}: bad begin_frame_id/end_frame_id/fps ({err})") from None
        if not fps > 0 or begin < 0 or (end is not None and end <= begin):
            raise ValueError(f"{where}: bad clip range begin_frame_id={begin}, end_frame_id={end}, fps={fps}")
        item = MediaItem(item.path, item.kind, begin / fps, None if end is None else end / fps)
    return item


def _list_item(path: Path, line: str, where: str) -> MediaItem:
    media = Path(line)
    return _item(media if media.is_absolute() else path.parent / media, where)


def _read_rows(path: Path, parse: Callable[[Path, str, str], MediaItem], bad_rows: list[str]) -> list[MediaItem]:
    """The items of a jsonl or txt list; each bad row is logged (``file:line: reason``), kept in ``bad_rows`` and
    skipped, as the transformer's data reader does (one bad row never stops a run over thousands)."""
    items = []
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"{path} is not UTF-8 text (byte {err.start} is not)") from None
    for n, line in enumerate(text.splitlines(), 1):
        entry = line.split("#", 1)[0].strip() if parse is _list_item else line.strip()
        if not entry:
            continue
        try:
            items.append(parse(path, entry, f"{path}:{n}"))
        except (ValueError, FileNotFoundError) as err:  # MediaError is a ValueError
            bad_rows.append(str(err))
            logger.warning("skipping bad row %s", err)
    return items


def list_media(sources: Sequence[str | Path], bad_rows: list[str] | None = None) -> list[MediaItem]:
    """Every media item of the given folders / jsonl / txt lists / files, in a stable (sorted) order.

    Bad rows of a jsonl or txt list are skipped, logged and appended to ``bad_rows`` (when given); a source that is
    itself missing or empty, or no usable item at all, is an error."""
    bad_rows = [] if bad_rows is None else bad_rows
    items: list[MediaItem] = []
    for src in sources:
        p = Path(src)
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and _kind(f) is not None)
            if not found:
                raise ValueError(f"folder {p} holds no media files ({', '.join(MEDIA_SUFFIXES)})")
            items += [MediaItem(f, _kind(f) or "") for f in found]
        elif p.suffix.lower() == ".jsonl":
            if not p.is_file():
                raise FileNotFoundError(f"jsonl file {p} does not exist")
            items += _read_rows(p, _jsonl_item, bad_rows)
        elif p.suffix.lower() == ".txt":
            if not p.is_file():
                raise FileNotFoundError(f"file list {p} does not exist")
            items += _read_rows(p, _list_item, bad_rows)
        else:
            items.append(_item(p, "data"))
    if bad_rows:
        logger.warning("%d bad row(s) skipped", len(bad_rows))
    if not items:
        first = f" ({len(bad_rows)} bad rows; the first: {bad_rows[0]})" if bad_rows else ""
        raise ValueError(f"no media found in {[str(s) for s in sources]}{first}")
    return items


class MediaClipDataset:
    """Clips of ``num_frames`` frames at ``fps``, ``height`` x ``width``, drawn uniformly over items and start times.

    ``cache_decoded`` keeps each source's decoded, resized frames (uint8) in memory after first use:
    much faster for small data sets, unbounded memory for large ones.
    """

    def __init__(self, items: Sequence[MediaItem], *, num_frames: int, fps: float, height: int, width: int,
                 cache_decoded: bool = False) -> None:
        if not items:
            raise ValueError("MediaClipDataset needs at least one media item")
        self.items = list(items)
        self.num_frames, self.fps, self.height, self.width = num_frames, float(fps), height, width
        self.cache_decoded = cache_decoded
        self._frames: dict[int, np.ndarray] = {}  # decoded+resized sources (cache_decoded)
        self._lengths: dict[int, int] = {}  # frames available at self.fps

    def __len__(self) -> int:
        return len(self.items)

    # --- sources -------------------------------------------------------------------------------

    def _resize(self, frames_THW3: np.ndarray) -> np.ndarray:
        if frames_THW3.shape[1:3] == (self.height, self.width):
            return np.ascontiguousarray(frames_THW3)
        return resize_and_center_crop(np.ascontiguousarray(frames_THW3), self.height, self.width)

    def _load_array(self, item: MediaItem) -> np.ndarray:
        try:
            arr = np.load(item.path, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError) as err:
            raise MediaError(f"cannot read array clip {item.path}: {err}") from None
        if arr.ndim == 3:
            arr = arr[None]
        if arr.dtype != np.uint8 or arr.ndim != 4 or arr.shape[-1] != 3 or 0 in arr.shape:
            raise MediaError(f"{item.path}: .npy clips must be uint8 [T, H, W, 3] or [H, W, 3], "
                             f"got {arr.dtype} {tuple(arr.shape)}")
        return arr

    def _available(self, i: int) -> int:
        """Frames of item ``i`` at the training fps (1 for images)."""
        if i in self._lengths:
            return self._lengths[i]
        item = self.items[i]
        if item.kind == "image":
            n = 1
        elif item.kind == "array":
            n = self._load_array(item).shape[0]
        elif self.cache_decoded:
            n = self._decoded(i).shape[0]
        else:
            end = item.end
            if end is None:
                info = probe_video(item.path)
                if info.duration is None:
                    raise MediaError(f"{item.path}: the container gives no duration; use cache_decoded=True")
                end = info.duration
            n = max(0, math.ceil((end - item.start) * self.fps - 1e-6))
        self._lengths[i] = n
        return n

    def _decoded(self, i: int) -> np.ndarray:
        if i not in self._frames:
            item = self.items[i]
            frames, _ = read_video(item.path, fps=self.fps, start_time=item.start)
            if item.end is not None:
                frames = frames[: max(1, math.ceil((item.end - item.start) * self.fps - 1e-6))]
            self._frames[i] = self._resize(frames)
        return self._frames[i]

    # --- clips ---------------------------------------------------------------------------------

    def clip(self, i: int, rng: np.random.Generator) -> Tensor:
        """A clip of item ``i`` starting at a random frame; (3, T, H, W) float32 in [-1, 1]."""
        item, n_out = self.items[i], self.num_frames
        if item.kind == "image":
            frame = self._resize(np.asarray(read_image(item.path))[None])
            return frames_to_tensor(np.repeat(frame, n_out, axis=0))
        n = self._available(i)
        if n < n_out:
            raise MediaError(f"{item.path} holds {n} frames at {self.fps:g} fps (window from {item.start:g} s), "
                             f"fewer than num_frames={n_out}; lower num_frames or drop the file")
        first = int(rng.integers(0, n - n_out + 1))
        if item.kind == "array":
            frames = self._resize(np.asarray(self._load_array(item)[first:first + n_out]))
        elif self.cache_decoded:
            frames = self._decoded(i)[first:first + n_out]
        else:
            frames, _ = read_video(item.path, fps=self.fps, max_frames=n_out, start_time=item.start + first / self.fps,
                                   end_tolerance=0.5 / self.fps)
            if frames.shape[0] < n_out:
                raise MediaError(f"{item.path}: got {frames.shape[0]} of {n_out} frames from "
                                 f"t={item.start + first / self.fps:.3f} s")
            frames = self._resize(frames)
        return frames_to_tensor(frames)

    def sample(self, rng: np.random.Generator) -> Tensor:
        return self.clip(int(rng.integers(0, len(self.items))), rng)


__all__ = ["ARRAY_SUFFIXES", "ClipDataset", "MEDIA_SUFFIXES", "MediaClipDataset", "MediaItem", "list_media"]

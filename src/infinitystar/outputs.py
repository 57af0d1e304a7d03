"""What a run wrote and how to make it again: the :class:`RunRecord` every output carries.

A generated file alone does not say which prompt, seed and settings made it; two runs of one prompt write two
files that look alike. So every front door (the CLI, the web page) writes its output through
:func:`save_output_with_record`, which stores the run's :class:`RunRecord` three ways:

* in the file itself: a png ``tEXt`` chunk named ``infinitystar``, or the mp4 container's ``comment`` tag (the mp4
  muxer keeps only the tags it knows; ``comment`` survives a write/read round trip), both holding the record's JSON;
* beside it, as ``<stem>.json`` (easy to read, to diff, and to pass to ``infinitystar generate --from-json``).

:func:`read_record` reads it back from either; :func:`default_output_name` names an output by time, prompt and seed
so that runs never collide and can be told apart in a folder listing.

Layer: on :mod:`infinitystar.media` and :mod:`infinitystar.fileio` only (the layer of ``checkpoints`` and
``generation``, below ``pipeline``); it knows nothing of pipelines, so the front doors fill the record in.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import unicodedata
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from . import __version__
from .fileio import atomic_write_json
from .media import FramesLike, read_image_text, read_video_metadata, write_image, write_video

__all__ = [
    "PNG_TEXT_KEY",
    "RECORD_SUFFIXES",
    "TASKS",
    "VIDEO_METADATA_KEY",
    "RunRecord",
    "default_output_name",
    "now_iso",
    "output_name",
    "read_record",
    "record_path",
    "save_output_with_record",
]

TASKS = ("text-to-image", "text-to-video", "image-to-video", "video-extension", "interactive")
PNG_TEXT_KEY = "infinitystar"  # the png tEXt keyword holding the record's JSON
VIDEO_METADATA_KEY = "comment"  # the mp4 container tag holding it (one the mp4 muxer keeps)
# Files that can carry a record inside them: png (text chunk) and mp4 (container tag).
RECORD_SUFFIXES = (".png", ".mp4")
_SLUG_CHARS = 40


def _now_iso() -> str:
    return datetime.now().astimezone().isoformat(timespec="seconds")


@dataclass(frozen=True, kw_only=True)
class RunRecord:
    """Everything needed to tell a run apart from others and to run it again (keyword-only fields).

    ``model`` names the weights: a folder as given, ``"infinitystar-demo"`` (the shipped demo model) or
    ``"random:<preset>"`` (random weights of a preset). ``height``/``width``/``num_frames``/``fps`` describe the
    output as written; ``aspect``/``resolution``/``guidance_scale`` are the request (None: the model's default).
    ``device`` is where the sampling ran (the same seed gives the same output on the same device only).
    ``input_image``/``input_video``: the conditioning files as given. ``prompts``: interactive runs only, one prompt
    per segment (``prompt`` is then the first). ``version`` and ``created`` (ISO time) default to now and this
    package.
    """

    prompt: str
    negative_prompt: str | None = None
    seed: int
    task: str
    num_frames: int
    fps: int
    height: int
    width: int
    guidance_scale: float | None = None
    aspect: str | None = None
    resolution: str | None = None
    model: str
    preset: str | None = None
    precision: str | None = None
    memory_mode: str = "plain"
    device: str = "cpu"
    version: str = __version__
    created: str = field(default_factory=_now_iso)
    input_image: str | None = None
    input_video: str | None = None
    prompts: tuple[str, ...] | None = None
    # LoRA adapters as given (``PATH[:SCALE]``, the CLI's --lora); None: none.
    loras: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        for name in ("prompts", "loras"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, tuple):
                object.__setattr__(self, name, tuple(value))  # a list is accepted; stored hashable
        for f in dataclasses.fields(self):
            _check_type(f.name, getattr(self, f.name))
        if self.task not in TASKS:
            raise ValueError(f"run record: task {self.task!r} is not one of {', '.join(TASKS)}")
        for name in ("num_frames", "fps", "height", "width"):
            if getattr(self, name) < 1:
                raise ValueError(f"run record: {name} must be >= 1, got {getattr(self, name)}")
        if self.task == "interactive" and not self.prompts:
            raise ValueError("run record: an interactive run needs its prompts (one per segment)")
        _created_time(self.created)

    def to_dict(self) -> dict[str, Any]:
        """The record as plain JSON types (``prompts`` as a list)."""
        d = dataclasses.asdict(self)
        if d["prompts"] is not None:
            d["prompts"] = list(d["prompts"])
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> RunRecord:
        """The record of ``d`` (as :meth:`to_dict` writes it); unknown or missing keys and wrong types raise a
        one-line ValueError that names them."""
        if not isinstance(d, Mapping):
            raise ValueError(f"run record must be a JSON object, got {type(d).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"run record: unknown keys {', '.join(map(repr, unknown))}; known: "
                             f"{', '.join(sorted(names))}")
        required = sorted(f.name for f in dataclasses.fields(cls)
                          if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING)
        missing = [k for k in required if k not in d]
        if missing:
            raise ValueError(f"run record: missing keys {', '.join(map(repr, missing))}")
        try:
            return cls(**d)
        except TypeError as e:  # pragma: no cover - keys are checked above
            raise ValueError(f"run record: {e}") from e


# What each field may hold: JSON round trips turn tuples into lists and ints stay ints, floats may be ints.
_FIELD_TYPES: dict[str, tuple[type, ...]] = {
    "seed": (int,), "num_frames": (int,), "fps": (int,), "height": (int,), "width": (int,),
    "guidance_scale": (int, float, type(None)),
    "prompts": (tuple, type(None)), "loras": (tuple, type(None)),
}


def _check_type(name: str, value: Any) -> None:
    want = _FIELD_TYPES.get(name)
    if want is None:  # every other field: text, or None where the field allows it
        optional = name not in ("prompt", "task", "model", "memory_mode", "device", "version", "created")
        want = (str, type(None)) if optional else (str,)
    if isinstance(value, bool) or not isinstance(value, want):
        kinds = " or ".join("null" if t is type(None) else t.__name__ for t in want)
        raise ValueError(f"run record: {name} must be {kinds}, got {value!r}")
    if name in ("prompts", "loras") and value is not None and not all(isinstance(p, str) for p in value):
        raise ValueError(f"run record: {name} must be a list of strings, got {list(value)!r}")
    if name == "guidance_scale" and value is not None and not math.isfinite(value):
        raise ValueError(f"run record: guidance_scale must be finite, got {value!r}")


def _created_time(created: str) -> datetime:
    try:
        return datetime.fromisoformat(created)
    except ValueError as e:
        raise ValueError(f"run record: created {created!r} is not an ISO time (YYYY-mm-ddTHH:MM:SS)") from e


# ----------------------------------------------------------------------------------------------
# names
# ----------------------------------------------------------------------------------------------


def _slug(text: str, limit: int = _SLUG_CHARS) -> str:
    """Lower-case ASCII words of ``text`` joined by ``-``, cut at a word boundary to at most ``limit`` characters."""
    ascii_text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode("ascii")
    words = re.findall(r"[a-z0-9]+", ascii_text.lower())
    slug = ""
    for word in words:
        candidate = f"{slug}-{word}" if slug else word
        if len(candidate) > limit:
            if not slug:  # one word longer than the limit: cut the word
                slug = word[:limit]
            break
        slug = candidate
    return slug or "untitled"


def default_output_name(record: RunRecord, ext: str) -> str:
    """``<YYYYmmdd-HHMMSS>_<prompt slug, <= 40 chars>_s<seed>.<ext>``: the time of ``record.created`` (as written
    there), the prompt's lower-case ASCII words joined by ``-`` (``untitled`` when none), the seed.

    ``ext`` with or without its dot (``"mp4"``, ``".png"``). Two runs of one prompt differ in time or seed, and a
    folder listing sorts by time.
    """
    return output_name(record.prompt, record.seed, record.created, ext)


def output_name(prompt: str, seed: int, created: str, ext: str) -> str:
    """:func:`default_output_name` from its parts, for a front door that names the file before the run has a
    complete record (``created``: an ISO time)."""
    ext = ext.lstrip(".")
    if not ext or not re.fullmatch(r"[A-Za-z0-9]+", ext):
        raise ValueError(f"output extension must be letters/digits like 'mp4' or 'png', got {ext!r}")
    stamp = _created_time(created).strftime("%Y%m%d-%H%M%S")
    return f"{stamp}_{_slug(prompt)}_s{seed}.{ext}"


def now_iso() -> str:
    """The current local time as a record's ``created`` (ISO, seconds, with the UTC offset)."""
    return _now_iso()


def record_path(path: str | os.PathLike) -> Path:
    """The ``<stem>.json`` beside an output file, where its record is written."""
    return Path(path).with_suffix(".json")


# ----------------------------------------------------------------------------------------------
# writing and reading
# ----------------------------------------------------------------------------------------------


def _check_output_path(path: Path, overwrite: bool) -> None:
    if path.suffix.lower() not in RECORD_SUFFIXES:
        raise ValueError(f"cannot write {path} with its run record: use {' or '.join(RECORD_SUFFIXES)}")
    if overwrite:
        return
    for p in (path, record_path(path)):
        if p.exists():
            raise FileExistsError(f"{p} already exists (overwrite=True / --overwrite replaces it)")


def save_output_with_record(frames: FramesLike, path: str | os.PathLike, record: RunRecord, *, fps: float,
                            overwrite: bool = False,
                            progress: Callable[[int, int], None] | None = None) -> Path:
    """Write ``frames`` to ``path`` (png: one frame; mp4: a video) with ``record`` inside, and ``<stem>.json``.

    Both files are written atomically (the media first, then the JSON). An existing ``path`` or ``<stem>.json`` is
    refused with a one-line FileExistsError naming it unless ``overwrite``. ``progress(done, total)`` is called as
    the file is written (mp4: per encoded frame; png: ``(0, 1)`` then ``(1, 1)``); an exception it raises aborts
    the write and leaves nothing at ``path``. Returns ``path``.
    """
    p = Path(path)
    _check_output_path(p, overwrite)
    data = record.to_dict()
    text = json.dumps(data, ensure_ascii=True)  # ASCII: valid in a png tEXt chunk (Latin-1) and any mp4 tag
    if p.suffix.lower() == ".png":
        if progress is not None:
            progress(0, 1)
        write_image(frames, p, text={PNG_TEXT_KEY: text})
        if progress is not None:
            progress(1, 1)
    else:
        write_video(frames, p, fps, metadata={VIDEO_METADATA_KEY: text}, progress=progress)
    atomic_write_json(record_path(p), data)
    return p


def _parse(text: str, source: str) -> RunRecord:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{source}: not a run record (invalid JSON: {e})") from e
    try:
        return RunRecord.from_dict(data)
    except ValueError as e:
        raise ValueError(f"{source}: {e}") from e


def read_record(path: str | os.PathLike) -> RunRecord:
    """The :class:`RunRecord` of an output: from ``path`` itself when it is the ``.json``, else from the
    ``<stem>.json`` beside it, else from the file's own metadata (png text chunk / mp4 ``comment`` tag).

    A missing file raises FileNotFoundError; a file without a record, or a broken one, a one-line ValueError.
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"run record: no such file {p}")
    if p.suffix.lower() == ".json":
        return _parse(p.read_text(encoding="utf-8"), str(p))
    beside = record_path(p)
    if beside.is_file():
        return _parse(beside.read_text(encoding="utf-8"), str(beside))
    suffix = p.suffix.lower()
    if suffix == ".png":
        text = read_image_text(p).get(PNG_TEXT_KEY)
    elif suffix == ".mp4":
        text = read_video_metadata(p).get(VIDEO_METADATA_KEY)
    else:
        raise ValueError(f"{p}: run records live in .json, .png and .mp4 files, not {p.suffix or 'this file'}")
    if text is None:
        raise ValueError(f"{p} holds no infinitystar run record (and there is no {beside.name} beside it)")
    return _parse(text, str(p))

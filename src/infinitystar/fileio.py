"""Atomic file writes: a temp file next to the target, fsync, then ``os.replace``.

Every file the project writes (weights, configs, logs' companions, media, reports) goes through here, so an
interrupted or failed write never leaves a half-written file at the target path, and never a temp file behind.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a fresh temp path next to ``path``; on success fsync it and ``os.replace`` it onto ``path``.

    The temp file lives in the same directory so the final rename is atomic (same filesystem); it is hidden
    (leading dot) and keeps the target's suffix so format detection by name still works. On any exception,
    including KeyboardInterrupt, the temp file is removed and ``path`` is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for _ in range(100):
        tmp = path.with_name(f".{path.stem}.{secrets.token_hex(6)}.tmp{path.suffix}")
        try:
            # O_EXCL: never clobber another writer's temp file; mode 0o666 & ~umask like a plain open().
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            break
        except FileExistsError:
            continue
    else:  # pragma: no cover - 100 collisions of 48 random bits
        raise OSError(f"could not create a temporary file next to {path}")
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_output(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def atomic_write_json(path: str | os.PathLike, obj: Any, indent: int | None = 2) -> None:
    atomic_write_text(path, json.dumps(obj, indent=indent))


__all__ = ["atomic_output", "atomic_write_json", "atomic_write_text"]

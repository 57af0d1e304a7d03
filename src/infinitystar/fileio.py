"""Atomic file writes: a temp file next to the target, fsync, then ``os.replace``.

Every file the project writes (weights, configs, logs' companions, media, reports) goes through here, so an
interrupted or failed write never leaves a half-written file at the target path. A temp file left by a process
that was killed outright (``kill -9``, a power cut: no ``finally`` runs) is removed by the next write into the same
folder: temp names carry the writer's process id, and only those of processes that no longer exist are removed.
A full disk is one :class:`DiskFullError` naming the disk, what is free and what the write needed.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

# ".<target stem>.<pid>-<12 hex>.tmp<target suffix>": hidden, keeps the suffix (format detection by name).
_TEMP_NAME = re.compile(r"^\..*\.(\d+)-[0-9a-f]{12}\.tmp[^/]*$")
_swept: set[Path] = set()  # folders already swept by this process (a sweep lists the folder once)
# Below this much free space after a failed write, the failure is taken to be the full disk (a writer library may
# report ENOSPC in its own words, e.g. safetensors or torch's zip writer).
_NEARLY_FULL = 1 << 20


class DiskFullError(OSError):
    """No space left for a write; the message names the disk (its mount point), the free and the needed bytes."""

    def __init__(self, message: str) -> None:
        super().__init__(errno.ENOSPC, message)

    def __str__(self) -> str:
        return str(self.strerror)


def make_folder(path: str | os.PathLike, what: str = "folder") -> Path:
    """``mkdir -p path``, with one clear error when a file stands where a folder must be (the path itself or one of
    its parents): ``NotADirectoryError`` naming that file."""
    p = Path(path)
    try:
        p.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        culprit = next((q for q in (p, *p.parents) if q.exists() and not q.is_dir()), p)
        raise NotADirectoryError(errno.ENOTDIR, f"cannot use {p} as the {what}: {culprit} is a file, not a "
                                                "folder") from None
    return p


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def sweep_stale_temp_files(folder: str | os.PathLike) -> list[Path]:
    """Remove the temp files of interrupted writes in ``folder`` whose writer process is gone; returns them."""
    removed = []
    with contextlib.suppress(OSError):
        for entry in os.scandir(folder):
            m = _TEMP_NAME.match(entry.name)
            if m and entry.is_file(follow_symlinks=False) and not _pid_alive(int(m.group(1))):
                with contextlib.suppress(OSError):
                    os.unlink(entry.path)
                    removed.append(Path(entry.path))
    return removed


def _mount_point(path: Path) -> Path:
    p = path.resolve()
    while not os.path.ismount(p) and p != p.parent:
        p = p.parent
    return p


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**27 else f"{n / 2**20:.1f} MiB"


def check_free_space(path: str | os.PathLike, needed: int) -> None:
    """Raise :class:`DiskFullError` when the disk of ``path``'s folder has fewer than ``needed`` bytes free."""
    folder = Path(path).parent
    free = shutil.disk_usage(folder).free
    if free < needed:
        raise DiskFullError(f"not enough space on {_mount_point(folder)} to write {path}: {_gib(needed)} needed, "
                            f"{_gib(free)} free")


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike, *, size_hint: int | None = None) -> Iterator[Path]:
    """Yield a fresh temp path next to ``path``; on success fsync it and ``os.replace`` it onto ``path``.

    The temp file lives in the same directory so the final rename is atomic (same filesystem); it is hidden
    (leading dot) and keeps the target's suffix so format detection by name still works. On any exception,
    including KeyboardInterrupt, the temp file is removed and ``path`` is untouched. ``size_hint``: the bytes the
    write will take, checked against the free space before anything is written. The result has the mode a plain
    ``open()`` gives (0o666 less the umask) whatever the writer library chose for its own file.
    """
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(errno.EISDIR, f"cannot write {path}: it is a folder")
    make_folder(path.parent, "output folder")
    folder = path.parent.resolve()
    if folder not in _swept:
        sweep_stale_temp_files(folder)
        _swept.add(folder)
    if size_hint is not None:
        check_free_space(path, size_hint)
    for _ in range(100):
        tmp = path.with_name(f".{path.stem}.{os.getpid()}-{secrets.token_hex(6)}.tmp{path.suffix}")
        try:
            # O_EXCL: never clobber another writer's temp file; mode 0o666 & ~umask like a plain open().
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            break
        except FileExistsError:
            continue
        except PermissionError:
            # The temp name means nothing to the user: name the destination and its folder.
            raise PermissionError(errno.EACCES, f"cannot write {path}: no permission to create files in "
                                                f"{path.parent}") from None
    else:  # pragma: no cover - 100 collisions of 48 random bits
        raise OSError(f"could not create a temporary file next to {path}")
    mode = tmp.stat().st_mode & 0o777
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, mode)  # some writers (safetensors) replace the file with one of mode 0600
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        if isinstance(exc, Exception) and not isinstance(exc, DiskFullError):
            full = isinstance(exc, OSError) and exc.errno == errno.ENOSPC
            with contextlib.suppress(OSError):
                full = full or shutil.disk_usage(path.parent).free < _NEARLY_FULL
            if full:
                free = shutil.disk_usage(path.parent).free
                need = f"{_gib(size_hint)} needed, " if size_hint else ""
                raise DiskFullError(f"disk full: {_mount_point(path.parent)} could not take {path} ({need}"
                                    f"{_gib(free)} free)") from exc
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    data = text.encode("utf-8")
    with atomic_output(path, size_hint=len(data)) as tmp:
        tmp.write_bytes(data)


def atomic_write_json(path: str | os.PathLike, obj: Any, indent: int | None = 2) -> None:
    atomic_write_text(path, json.dumps(obj, indent=indent))


__all__ = ["DiskFullError", "atomic_output", "atomic_write_json", "atomic_write_text", "check_free_space",
           "make_folder", "sweep_stale_temp_files"]

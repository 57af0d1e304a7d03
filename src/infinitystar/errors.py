"""The command line's error boundary: how every failure of a command reaches the person who ran it.

* a known kind of failure (bad input, a missing or unreadable file, a full disk, a device that is not there, a
  missing optional package, not enough memory) is one line, ``infinitystar CMD: error: <what, naming the subject>``,
  exit 2;
* anything else is a bug or an unforeseen fault: one line naming it and the path of a log file that holds the
  traceback (``--debug`` prints the traceback instead), exit 1;
* Ctrl+C is one line, ``infinitystar CMD: interrupted``, exit 130 (128 + SIGINT, as shells report it); every file
  the project writes is atomic, so nothing partial is left behind.

Sits beside ``fileio`` (stdlib and torch only), so the CLI and the web page share one classification.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

import torch

__all__ = ["EXIT_INTERNAL", "EXIT_INTERRUPTED", "EXIT_USER", "USER_ERRORS", "describe", "log_traceback", "run_command"]

EXIT_USER = 2
EXIT_INTERNAL = 1
EXIT_INTERRUPTED = 130

# What a user's input or machine causes (ConfigError, MediaError, UnicodeError, DiskFullError and the file errors
# are subclasses of these). torch.OutOfMemoryError is a RuntimeError, named here so no other RuntimeError is taken
# for bad input.
USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, OSError, KeyError, ImportError, MemoryError,
                                                torch.OutOfMemoryError)


def describe(exc: BaseException) -> str:
    """One line for a user error: its message, with the hint a bare message would lack."""
    if isinstance(exc, torch.OutOfMemoryError):
        first = str(exc).splitlines()[0] if str(exc) else ""
        return (f"the GPU ran out of memory ({first}); try a smaller memory mode (--memory-mode block_offload or "
                "smallest), a shorter video or a lower resolution")
    if isinstance(exc, MemoryError):
        return ("not enough host memory for this request" + (f" ({exc})" if str(exc) else "") +
                "; try a shorter video, a lower resolution or fewer clips")
    if isinstance(exc, KeyError):
        return f"unknown name {exc}"
    if isinstance(exc, OSError) and exc.filename and str(exc.filename) not in str(exc.strerror or ""):
        return f"{exc.strerror or exc}: {exc.filename}"
    if isinstance(exc, OSError) and exc.strerror and not exc.filename:
        return " ".join(str(exc.strerror).split())  # without Python's "[Errno N]" prefix
    text = " ".join(str(exc).split()) or type(exc).__name__  # one line, whatever the message held
    return text


def _log_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "infinitystar" / "errors"


def log_traceback(command: str, exc: BaseException) -> Path:
    """Write ``exc``'s traceback to a new log file and return its path (the system temp folder if the cache folder
    cannot be written)."""
    text = "".join(traceback.format_exception(exc))
    name = f"{time.strftime('%Y%m%d-%H%M%S')}-{command}-{os.getpid()}.log"
    header = f"infinitystar {command}, argv {sys.argv!r}\n\n"
    for folder in (_log_dir(), Path(tempfile.gettempdir()) / "infinitystar-errors"):
        try:
            folder.mkdir(parents=True, exist_ok=True)
            path = folder / name
            path.write_text(header + text, encoding="utf-8")
            return path
        except OSError:
            continue
    raise OSError("no folder to write the error log to")  # pragma: no cover - both the cache and /tmp unwritable


def run_command(command: str, func, *, debug: bool = False) -> int:
    """Run ``func()`` (a command's body, returning its exit code) inside the boundary; returns the exit code.

    Warnings print as one line each too (``infinitystar CMD: warning: ...``), without Python's source excerpt."""

    def one_line(message, category, filename, lineno, file=None, line=None):
        print(f"infinitystar {command}: warning: {' '.join(str(message).split())}", file=file or sys.stderr)

    try:
        with warnings.catch_warnings():
            if not debug:
                warnings.showwarning = one_line
            return int(func() or 0)
    except KeyboardInterrupt:
        print(f"infinitystar {command}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except USER_ERRORS as exc:
        if debug:
            traceback.print_exception(exc)
        print(f"infinitystar {command}: error: {describe(exc)}", file=sys.stderr)
        return EXIT_USER
    except Exception as exc:
        if debug:
            traceback.print_exception(exc)
            print(f"infinitystar {command}: internal error: {type(exc).__name__}", file=sys.stderr)
            return EXIT_INTERNAL
        where = log_traceback(command, exc)
        first = " ".join(str(exc).split())[:300]
        print(f"infinitystar {command}: internal error: {type(exc).__name__}: {first} (traceback in {where}; "
              "--debug prints it)", file=sys.stderr)
        return EXIT_INTERNAL

"""The run folder both trainers write: its file names and the JSON-lines log.

A run folder holds ``train_config.json`` (the run's config as nested plain data), ``train_log.jsonl``
(one JSON object per line, each with an ``"event"``: ``"start"``, ``"resume"``, ``"step"``, ``"checkpoint"``,
``"end"``; a step record carries ``"step"`` (the steps done), ``"loss"``, ``"lr"``, ``"grad_norm"`` and
``"step_time_s"`` plus the trainer's own metrics) and ``checkpoints/step_XXXXXXXX`` (``train.checkpointing``).
Only the main rank writes.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

from infinitystar.fileio import atomic_write_json, atomic_write_text

CONFIG_FILE = "train_config.json"
LOG_FILE = "train_log.jsonl"
CHECKPOINT_DIR = "checkpoints"


def append_record(path: str | os.PathLike, record: dict[str, Any]) -> None:
    """Append one record (a line of JSON) to a run log, creating its folder."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    with open(p, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()


def read_log(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The records of a ``train_log.jsonl`` (a last line cut by a kill is ignored)."""
    out = []
    p = Path(path)
    if not p.is_file():
        return out
    for line in p.read_text(encoding="utf-8").splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def step_losses(path: str | os.PathLike) -> dict[int, float]:
    """``{step: loss}`` from a run's log; a step logged twice (before a kill and after resuming) keeps its
    last record."""
    return {r["step"]: r["loss"] for r in read_log(path) if r.get("event") == "step"}


def drop_steps_after(path: str | os.PathLike, step: int) -> None:
    """Drop the records after ``step`` (and a line cut short by a crash): a run resumed from ``step`` logs those
    steps again, so its step records read as one uninterrupted run's."""
    p = Path(path)
    if not p.is_file():
        return
    kept = [r for r in read_log(p) if r.get("step", 0) <= step]
    atomic_write_text(p, "".join(json.dumps(r) + "\n" for r in kept))


def write_config(run_dir: str | os.PathLike, config_dict: dict[str, Any]) -> None:
    atomic_write_json(Path(run_dir) / CONFIG_FILE, config_dict)


def read_config(run_dir: str | os.PathLike) -> dict[str, Any]:
    p = Path(run_dir) / CONFIG_FILE
    if not p.is_file():
        raise FileNotFoundError(f"{run_dir} is not a training run folder (no {CONFIG_FILE})")
    return json.loads(p.read_text(encoding="utf-8"))


def report_skipped_checkpoints(skipped: list[tuple[Path, str]]) -> None:
    """One stderr line per damaged checkpoint a resume passed over (newest first), so the user knows what was
    lost and why; the ``resume`` log record lists them too."""
    for path, why in skipped:
        print(f"note: skipped checkpoint {path}: {why}", file=sys.stderr)

"""Training checkpoints with ``torch.distributed.checkpoint`` (DCP): written atomically, pruned, resumed.

Layout of a run's checkpoint folder::

    checkpoints/
      step_00000200/          complete: DCP shards (one file per rank) + .metadata + complete.json
      step_00000400.tmp/      a save in progress, or one interrupted by a crash: never read

A save writes everything into ``step_{N:08d}.tmp``: every rank its DCP shard (model, optimizer,
optional EMA), then rank 0 writes ``complete.json`` (step, per-rank data positions and RNG states)
and renames the folder to ``step_{N:08d}``. The rename is atomic on POSIX file systems, so a folder
without the ``.tmp`` suffix is always complete; a crash at any point leaves at most a ``.tmp``
folder, which :func:`latest_checkpoint` ignores and the next save of that step replaces. Only the
newest ``keep_last_k`` complete checkpoints are kept.

Resume: DCP loads the model and optimizer *sharded* (each rank reads its own slices; the world size
may even change), :func:`torch.distributed.checkpoint.state_dict.set_state_dict` puts them in place,
and ``complete.json`` restores the step, the data position and the RNG states of this rank.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import random
import re
import shutil
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)

from infinitystar.fileio import atomic_write_json

from . import safe_dcp
from .distributed import DistInfo, barrier, broadcast_object, gather_objects

COMPLETE_FILE = "complete.json"
_STEP_DIR = re.compile(r"^step_(\d{8})$")


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


# ----------------------------------------------------------------------------------------------
# RNG states as JSON
# ----------------------------------------------------------------------------------------------


def _tensor_b64(t: torch.Tensor) -> str:
    return base64.b64encode(t.cpu().numpy().tobytes()).decode("ascii")


def _b64_tensor(s: str) -> torch.Tensor:
    return torch.from_numpy(np.frombuffer(base64.b64decode(s), dtype=np.uint8).copy())


def capture_rng_state(generators: dict[str, torch.Generator] | None = None) -> dict[str, Any]:
    """Python, numpy, torch CPU (and CUDA) RNG states plus named generators, JSON-serialisable."""
    py_version, py_state, py_gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state: dict[str, Any] = {
        "python": [py_version, list(py_state), py_gauss],
        "numpy": [np_name, np.asarray(np_keys).tolist(), int(np_pos), int(np_has_gauss), float(np_gauss)],
        "torch": _tensor_b64(torch.get_rng_state()),
        "cuda": [_tensor_b64(s) for s in torch.cuda.get_rng_state_all()] if torch.cuda.is_available() else [],
        "generators": {k: _tensor_b64(g.get_state()) for k, g in (generators or {}).items()},
    }
    return state


def restore_rng_state(state: dict[str, Any], generators: dict[str, torch.Generator] | None = None) -> None:
    version, py_state, gauss = state["python"]
    random.setstate((version, tuple(py_state), gauss))
    name, keys, pos, has_gauss, np_gauss = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, np_gauss))
    torch.set_rng_state(_b64_tensor(state["torch"]))
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([_b64_tensor(s) for s in state["cuda"]])
    for key, gen in (generators or {}).items():
        if key not in state.get("generators", {}):
            raise ValueError(f"checkpoint holds no state for generator {key!r} "
                             f"(it has {sorted(state.get('generators', {}))})")
        gen.set_state(_b64_tensor(state["generators"][key]))


# ----------------------------------------------------------------------------------------------
# Finding checkpoints
# ----------------------------------------------------------------------------------------------


def complete_checkpoints(ckpt_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """``(step, folder)`` of every complete checkpoint, oldest first (``.tmp`` folders are never listed)."""
    root = Path(ckpt_dir)
    if not root.is_dir():
        return []
    out = []
    for p in root.iterdir():
        m = _STEP_DIR.match(p.name)
        if m and p.is_dir() and (p / COMPLETE_FILE).is_file():
            out.append((int(m.group(1)), p))
    return sorted(out)


def latest_checkpoint(ckpt_dir: str | os.PathLike) -> Path | None:
    found = complete_checkpoints(ckpt_dir)
    return found[-1][1] if found else None


def checkpoint_problem(path: str | os.PathLike) -> str | None:
    """Why checkpoint folder ``path`` cannot be loaded (None when it can): ``complete.json`` readable with its step,
    the metadata readable (safely), and every byte range the metadata names present in its shard file. Reads
    metadata and file sizes only, so every checkpoint of a run can be checked in well under a second."""
    p = Path(path)
    if not p.is_dir():
        return f"{p} is not a folder" if p.exists() else f"{p} does not exist"
    try:
        record = json.loads((p / COMPLETE_FILE).read_text())
        int(record["step"])
    except FileNotFoundError:
        return f"it is not a complete checkpoint (no {COMPLETE_FILE})"
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return f"its {COMPLETE_FILE} is unreadable ({type(exc).__name__})"
    try:
        meta = safe_dcp.read_metadata(p)
    except FileNotFoundError:
        return "its .metadata is missing"
    except (OSError, ValueError) as exc:
        return str(exc).splitlines()[0]
    sizes: dict[str, int] = {}
    for info in (meta.storage_data or {}).values():
        name = str(info.relative_path)
        if name not in sizes:
            shard = p / name
            sizes[name] = shard.stat().st_size if shard.is_file() else -1
        if sizes[name] < 0:
            return f"its shard {name} is missing"
        if info.offset + info.length > sizes[name]:
            return f"its shard {name} is truncated ({sizes[name]} bytes, needs {info.offset + info.length})"
    return None


def resume_checkpoint(ckpt_dir: str | os.PathLike, resume: str) -> tuple[Path | None, list[tuple[Path, str]]]:
    """The checkpoint a run resumes from, and the (folder, reason) of each newer one skipped as unloadable.

    ``"none"``: none. ``"auto"``: the newest complete checkpoint of ``ckpt_dir`` that :func:`checkpoint_problem`
    finds loadable, skipping damaged newer ones; when every one is damaged, a ValueError (starting over would
    overwrite them). Anything else is a checkpoint folder, checked the same way. Called before a run writes
    anything into its folder, so a bad ``--resume`` leaves the run as it was.
    """
    if resume == "none":
        return None, []
    if resume != "auto":
        why = checkpoint_problem(resume)
        if why is not None:
            raise ValueError(f"cannot resume from {resume}: {why}")
        return Path(resume), []
    skipped: list[tuple[Path, str]] = []
    for _, path in reversed(complete_checkpoints(ckpt_dir)):
        why = checkpoint_problem(path)
        if why is None:
            return path, skipped
        skipped.append((path, why))
    if skipped:
        raise ValueError(f"every checkpoint in {ckpt_dir} is damaged (newest: {skipped[0][0].name}: {skipped[0][1]}); "
                         "resume from a copy with --resume PATH, or start over with --resume none")
    return None, []


def read_complete(path: str | os.PathLike) -> dict[str, Any]:
    """The ``complete.json`` of a checkpoint folder (error if the folder is not a complete checkpoint)."""
    p = Path(path) / COMPLETE_FILE
    if not p.is_file():
        raise FileNotFoundError(f"{path} is not a complete checkpoint (no {COMPLETE_FILE})")
    return json.loads(p.read_text())


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


# ----------------------------------------------------------------------------------------------
# Save / load
# ----------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _quiet_single_process():
    # DCP warns that it "assumes a single process" whenever no process group exists; that is the intent here.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"torch.distributed is disabled, unavailable or uninitialized")
        yield


# Further (module, optimizer) pairs a run trains beside its model, by name (the VAE trainer's discriminator).
Parts = dict[str, tuple[nn.Module, "torch.optim.Optimizer | None"]]


def _options(trainable_only: bool, strict: bool = True) -> StateDictOptions:
    # A LoRA run saves and restores its adapter only: the frozen base weights come from the base model every time.
    return StateDictOptions(ignore_frozen_params=trainable_only, strict=strict)


def _state(model: nn.Module, optimizer: torch.optim.Optimizer | None,
           ema: dict[str, torch.Tensor] | None, parts: Parts | None = None,
           trainable_only: bool = False) -> dict[str, Any]:
    if optimizer is not None:
        model_sd, optim_sd = get_state_dict(model, optimizer, options=_options(trainable_only))
    else:
        model_sd, optim_sd = get_model_state_dict(model, options=_options(trainable_only)), None
    state: dict[str, Any] = {"model": model_sd}
    if optim_sd is not None:
        state["optim"] = optim_sd
    if ema is not None:
        state["ema"] = ema
    for name, (module, opt) in (parts or {}).items():
        state[name] = _state(module, opt, None)
    return state


def _keep_saved_optimizer_state(state: dict[str, Any], saved: set[str], prefix: str = "") -> bool:
    """Drop from ``state`` the optimizer entries of parameters the checkpoint holds none for; True if any.

    An optimizer keeps no state for a parameter that never had a gradient (a module kept only for its key names,
    a discriminator before its first step); after loading it must have none either, exactly as the saved run."""
    dropped = False
    optim = state.get("optim")
    if optim is not None:
        kept = {fqn: v for fqn, v in optim["state"].items()
                if any(k.startswith(f"{prefix}optim.state.{fqn}.") for k in saved)}
        dropped = len(kept) < len(optim["state"])
        optim["state"] = kept
    for name, sub in state.items():
        if name not in ("model", "optim", "ema") and isinstance(sub, dict):
            dropped = _keep_saved_optimizer_state(sub, saved, f"{prefix}{name}.") or dropped
    return dropped


def _set_state(model: nn.Module, optimizer: torch.optim.Optimizer | None, state: dict[str, Any],
               parts: Parts | None = None, strict: bool = True, trainable_only: bool = False) -> None:
    if optimizer is not None:
        # strict=False lets parameters without saved optimizer state keep none (see _keep_saved_optimizer_state);
        # DCP has already checked that every requested entry, the model's included, was in the checkpoint.
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"],
                       options=_options(trainable_only, strict and not trainable_only))
    else:
        set_model_state_dict(model, state["model"], options=_options(trainable_only, not trainable_only))
    for name, (module, opt) in (parts or {}).items():
        _set_state(module, opt, state[name], strict=strict)


def save_checkpoint(
    ckpt_dir: str | os.PathLike,
    step: int,
    info: DistInfo,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    *,
    ema: dict[str, torch.Tensor] | None = None,
    data_position: Any = None,
    extra: dict[str, Any] | None = None,
    generators: dict[str, torch.Generator] | None = None,
    keep_last_k: int | None = None,
    parts: Parts | None = None,
    trainable_only: bool = False,
) -> Path:
    """Collective: every rank calls it. Writes ``step_{step:08d}`` atomically and prunes old checkpoints.

    ``data_position`` (JSON-serialisable) and the RNG states are stored per rank; ``extra`` (rank 0's) is
    stored as is (e.g. the config, the sample counter). ``parts``: further named (module, optimizer) pairs.
    Replicated state (data parallel without sharding) is written once. ``trainable_only`` leaves the frozen
    parameters out (a LoRA run: its base weights are never written).
    """
    root = Path(ckpt_dir)
    final = root / step_dir_name(step)
    tmp = root / (step_dir_name(step) + ".tmp")
    if info.is_main:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():  # an earlier interrupted save of the same step
            shutil.rmtree(tmp)
        tmp.mkdir()
    barrier(info)
    with _quiet_single_process():
        dcp.save(_state(model, optimizer, ema, parts, trainable_only), checkpoint_id=str(tmp),
                 no_dist=not info.distributed)
    per_rank = gather_objects({"data_position": data_position, "rng": capture_rng_state(generators)}, info)
    if info.is_main:
        record = {"step": int(step), "world_size": info.world_size,
                  "data_positions": [r["data_position"] for r in per_rank],
                  "rng": [r["rng"] for r in per_rank], "extra": extra or {}}
        atomic_write_json(tmp / COMPLETE_FILE, record)
        _fsync_dir(tmp)
        if final.exists():  # re-saving a step (e.g. a resumed run that saves the same step again)
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(root)
        if keep_last_k is not None:
            prune_checkpoints(root, keep_last_k)
    barrier(info)
    return final


def prune_checkpoints(ckpt_dir: str | os.PathLike, keep_last_k: int) -> list[Path]:
    """Delete all but the newest ``keep_last_k`` complete checkpoints; returns the deleted folders."""
    if keep_last_k < 1:
        raise ValueError(f"keep_last_k must be >= 1, got {keep_last_k}")
    found = complete_checkpoints(ckpt_dir)
    doomed = [p for _, p in found[:-keep_last_k]]
    for p in doomed:
        # Rename first so a crash mid-delete leaves no half-deleted folder that looks complete.
        trash = p.with_name(p.name + ".deleting.tmp")
        os.replace(p, trash)
        shutil.rmtree(trash)
    return doomed


def load_checkpoint(
    path: str | os.PathLike,
    info: DistInfo,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    *,
    ema: dict[str, torch.Tensor] | None = None,
    generators: dict[str, torch.Generator] | None = None,
    restore_rng: bool = True,
    parts: Parts | None = None,
    trainable_only: bool = False,
) -> dict[str, Any]:
    """Collective: load model/optimizer (and EMA, in place) from a complete checkpoint; return ``complete.json``
    with ``data_position`` set to this rank's entry."""
    record = broadcast_object(read_complete(path) if info.is_main else None, info)
    if record["world_size"] != info.world_size:
        raise ValueError(f"checkpoint {path} was written by {record['world_size']} processes, this run has "
                         f"{info.world_size}: the per-rank data positions and RNG states cannot be mapped; resume with "
                         f"{record['world_size']} processes, or start a new run (another out_dir, or --resume none)")
    state = _state(model, optimizer, ema, parts, trainable_only)
    saved = set(safe_dcp.read_metadata(path).state_dict_metadata)
    partial = _keep_saved_optimizer_state(state, saved)
    with _quiet_single_process():
        safe_dcp.load(state, path, no_dist=not info.distributed)
    _set_state(model, optimizer, state, parts, strict=not partial, trainable_only=trainable_only)
    if restore_rng:
        restore_rng_state(record["rng"][info.rank], generators)
    record = dict(record)
    record["data_position"] = record["data_positions"][info.rank]
    return record


def load_model_weights(path: str | os.PathLike, model: nn.Module, *, use_ema: bool = False,
                       trainable_only: bool = False) -> None:
    """Load the (unsharded) model weights of a training checkpoint into a plain module, in one process.

    DCP reassembles the full tensors from however many ranks wrote them. ``use_ema`` loads the EMA
    weights instead (error if the run kept none).
    """
    read_complete(path)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    target = {k: v for k, v in model.state_dict().items() if not trainable_only or k in trainable}
    key = "ema" if use_ema else "model"
    state = {key: target}
    try:
        with _quiet_single_process():
            safe_dcp.load(state, path, no_dist=True)
    except safe_dcp.UnsafeCheckpointError:
        raise
    except Exception as exc:  # DCP raises a generic CheckpointException listing the missing keys
        raise ValueError(f"cannot load {key!r} weights from {path}: {exc}") from exc
    model.load_state_dict(state[key], strict=not trainable_only)

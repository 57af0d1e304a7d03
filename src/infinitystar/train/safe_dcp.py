"""Reading distributed checkpoints (DCP) without executing code from the files.

Why: ``torch.distributed.checkpoint``'s file reader unpickles the checkpoint's ``.metadata`` with plain ``pickle``,
and its default load planner reads every non-tensor entry (optimizer hyper-parameters, counters) with
``torch.load(weights_only=False)``. A run folder is a file someone can hand you (or a shared disk someone else can
write), so a crafted ``.metadata`` or shard would run any command on ``export`` or a resuming ``train``.

What is done instead, and why it is enough:

* ``.metadata`` goes through :class:`MetadataUnpickler`, which resolves only the globals a DCP metadata file is made
  of: the metadata dataclasses of ``torch.distributed.checkpoint`` (and the file reader's ``_StorageInfo``),
  ``torch.Size``, torch dtypes and layouts, and ``pathlib`` paths. Unpickling executes code only through the
  globals it resolves (a ``REDUCE`` calls one, ``BUILD`` sets attributes of an object of an admitted class); every
  admitted global is a constructor of inert data, so no sequence of opcodes can reach ``os.system``, ``eval`` or
  any other callable. Anything else fails in one line naming the global and the file.
* non-tensor entries go through ``torch.load(weights_only=True)`` (:class:`SafeLoadPlanner`), torch's own
  allow-list unpickler for tensors and plain containers, which is all the trainers store there.
* tensor data was already read with ``weights_only=True`` by torch's reader.
"""

from __future__ import annotations

import io
import os
import pathlib
import pickle
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import metadata as dcp_metadata
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.filesystem import _StorageInfo

__all__ = ["MetadataUnpickler", "SafeFileSystemReader", "SafeLoadPlanner", "UnsafeCheckpointError", "load",
           "read_metadata"]


class UnsafeCheckpointError(pickle.UnpicklingError, ValueError):
    """A checkpoint file asked for more than plain data; it was refused and nothing in it was run."""

_METADATA_MODULE = "torch.distributed.checkpoint.metadata"
_ALLOWED: dict[tuple[str, str], Any] = {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"): _StorageInfo,
    ("torch", "Size"): torch.Size,
    ("torch.serialization", "_get_layout"): torch.serialization._get_layout,
    ("pathlib", "PosixPath"): pathlib.PosixPath,
    ("pathlib", "PurePosixPath"): pathlib.PurePosixPath,
    ("pathlib", "WindowsPath"): pathlib.PureWindowsPath,  # read as a pure path: never touches the file system
    ("pathlib", "PureWindowsPath"): pathlib.PureWindowsPath,
}


class MetadataUnpickler(pickle.Unpickler):
    """An unpickler that admits only the types a DCP ``.metadata`` file is made of (see the module docstring)."""

    def __init__(self, file: io.BufferedIOBase, source: str) -> None:
        super().__init__(file)
        self.source = source

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED:
            return _ALLOWED[(module, name)]
        if module == _METADATA_MODULE:
            obj = getattr(dcp_metadata, name, None)
            if isinstance(obj, type) and obj.__module__ == _METADATA_MODULE:
                return obj  # the metadata dataclasses and enums: inert records
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise UnsafeCheckpointError(f"{self.source} is not a plain checkpoint metadata file: it references "
                                     f"{module}.{name}, which a checkpoint never needs (refused, nothing was run)")


class SafeFileSystemReader(dcp.FileSystemReader):
    """``FileSystemReader`` whose ``.metadata`` goes through :class:`MetadataUnpickler`."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> dcp_metadata.Metadata:
        path = self._get_metadata_path(kwargs.get("rank"))
        with self.fs.create_stream(path, "rb") as stream:
            try:
                metadata = MetadataUnpickler(stream, str(path)).load()
            except UnsafeCheckpointError:
                raise
            except Exception as exc:  # truncated or garbage bytes
                raise ValueError(f"{path} is not a readable checkpoint metadata file ({type(exc).__name__}: "
                                 f"{exc})") from exc
        if not isinstance(metadata, dcp_metadata.Metadata):
            raise ValueError(f"{path} does not hold checkpoint metadata (found {type(metadata).__name__})")
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = dcp_metadata.StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class SafeLoadPlanner(dcp.DefaultLoadPlanner):
    """``DefaultLoadPlanner`` that reads non-tensor entries with ``torch.load(weights_only=True)`` (the parent's
    ``load_bytes`` with only the unpickler changed)."""

    def load_bytes(self, read_item: Any, value: io.BytesIO) -> None:
        fqn = read_item.dest_index.fqn
        try:
            obj = torch.load(value, weights_only=True)
        except pickle.UnpicklingError as exc:
            lines = str(exc).splitlines()
            why = next((ln.strip() for ln in lines if "Unsupported global" in ln), lines[0] if lines else "")
            raise UnsafeCheckpointError(f"checkpoint entry {fqn!r} holds more than plain data (refused, nothing "
                                        f"was run): {why}") from None
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[fqn], obj)
        else:
            self.state_dict[fqn] = obj


def read_metadata(path: str | os.PathLike) -> dcp_metadata.Metadata:
    """The checkpoint's metadata, read safely."""
    return SafeFileSystemReader(str(path)).read_metadata()


def load(state: dict[str, Any], path: str | os.PathLike, *, no_dist: bool) -> None:
    """``dcp.load`` of ``state`` from the checkpoint folder ``path`` with the safe reader and planner.

    The metadata is read once first, outside DCP, so that a refused or broken file is its own one-line error
    rather than DCP's multi-rank report; a refusal during the load is unwrapped the same way."""
    read_metadata(path)
    try:
        dcp.load(state, storage_reader=SafeFileSystemReader(str(path)), planner=SafeLoadPlanner(), no_dist=no_dist)
    except CheckpointException as exc:
        for failure in exc.failures.values():
            inner = failure[0] if isinstance(failure, tuple) else failure  # (exception, stack) per rank
            if isinstance(inner, UnsafeCheckpointError):
                raise UnsafeCheckpointError(str(inner)) from None
        raise

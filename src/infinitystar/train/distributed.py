"""Process groups, the device mesh, FSDP2 and activation checkpointing, applied from outside the model.

``torchrun`` sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``;
:func:`init_distributed` reads them (gloo on CPU, nccl on CUDA). Without them it runs a single
process with no process group at all, so the trainer, the tests and the export work the same way
without ``torchrun``.

The mesh has one named dimension today, ``"dp"`` (data parallel, FSDP shards over it). Ulysses
sequence parallelism would add an ``"sp"`` dimension, ``init_device_mesh(dev, (dp, sp),
mesh_dim_names=("dp", "sp"))``: FSDP would shard over ``mesh["dp"]`` only, the data would be
sharded by the dp coordinate (all sp ranks of a group read the same sample, and share its seed) and
the attention's all-to-all would run over ``mesh["sp"]``. :class:`DistInfo` already separates the
two notions (``dp_rank``/``dp_size`` vs ``rank``/``world_size``) so the data and seed code need no
change then.

Both trainers start here (:func:`init_distributed`). The model stays a plain ``nn.Module``:
:func:`apply_activation_checkpointing` replaces each block by
a non-reentrant ``checkpoint_wrapper`` and :func:`apply_fsdp` calls ``fully_shard`` on every block,
then on the root (whose parameters are the embeddings, the unconditional text, the final norm and
the heads). No collective is written here: FSDP2 does the parameter all-gathers and gradient
reduce-scatters, and metrics use ``torch.distributed`` collectives directly. The VAE trainer's models are
small: :func:`apply_ddp` keeps them whole on every rank.
"""

from __future__ import annotations

import datetime
import os
import random
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointImpl, checkpoint_wrapper
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method
from torch.nn.parallel import DistributedDataParallel

SEED_MODULUS = 2**63 - 1


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits. Single-process runs have ``world_size == 1`` and ``mesh is None``."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    mesh: Any = None  # torch.distributed.device_mesh.DeviceMesh with a "dp" dimension, or None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def dp_rank(self) -> int:
        """Data-parallel coordinate: which slice of the global batch this process reads."""
        return self.mesh.get_local_rank("dp") if self.mesh is not None else 0

    @property
    def dp_size(self) -> int:
        return self.mesh.size(self.mesh.mesh_dim_names.index("dp")) if self.mesh is not None else 1


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None:
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer") from None


def init_distributed(device: str = "auto", timeout_s: float = 1800.0) -> DistInfo:
    """Join the torchrun process group if there is one and build the ``("dp",)`` mesh.

    ``device``: ``"auto"`` (CUDA if available, else CPU), ``"cpu"`` or ``"cuda"``. Each CUDA rank uses
    ``cuda:LOCAL_RANK``. A process group initialised by the caller is reused as is.
    """
    world = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", 0)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'auto', 'cpu' or 'cuda', got {device!r}")
    if device == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("device 'cuda' was requested but CUDA is not available")
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    if world == 1 and not dist.is_initialized():
        return DistInfo(0, 1, 0, dev, None)
    if not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    rank, world = dist.get_rank(), dist.get_world_size()
    mesh = init_device_mesh(dev.type, (world,), mesh_dim_names=("dp",))
    return DistInfo(rank, world, local_rank, dev, mesh)


def shutdown_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier(info: DistInfo) -> None:
    if info.distributed:
        dist.barrier()


def rank_seed(base_seed: int, dp_rank: int) -> int:
    """Seed of the process-wide RNGs of one data-parallel rank (shared by its future sp group).

    The reference seeds every rank identically, which correlates caption dropout and scale subsets
    across GPUs (training spec 8.6); here each dp rank gets its own stream.
    """
    return (int(base_seed) * 1_000_003 + int(dp_rank)) % SEED_MODULUS


def seed_process(seed: int) -> None:
    """Seed python, numpy and torch (all devices) of this process."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def apply_activation_checkpointing(model: nn.Module) -> None:
    """Recompute each transformer block in backward (non-reentrant ``checkpoint_wrapper``), in place.

    The wrapper is transparent for state dicts (its prefix is stripped), so checkpoints and exports
    keep the plain parameter names.
    """
    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, nn.ModuleList):
        raise ValueError(f"{type(model).__name__} has no `blocks` ModuleList to checkpoint")
    for i, block in enumerate(blocks):
        blocks[i] = checkpoint_wrapper(block, checkpoint_impl=CheckpointImpl.NO_REENTRANT)


def apply_ddp(module: nn.Module, info: DistInfo, *, find_unused_parameters: bool = False) -> nn.Module:
    """``DistributedDataParallel`` over every rank when there are several (rank 0's initial weights broadcast,
    gradients averaged in backward); the module itself in one process. For models small enough to keep whole on
    every rank (the VAE trainer's). ``gradient_as_bucket_view`` spares a copy of every gradient."""
    if not info.distributed:
        return module
    ids = [info.device.index] if info.device.type == "cuda" else None
    return DistributedDataParallel(module, device_ids=ids, find_unused_parameters=find_unused_parameters,
                                   gradient_as_bucket_view=True)


def mixed_precision_policy(param_dtype: torch.dtype | None, reduce_dtype: torch.dtype = torch.float32) -> Any:
    """FSDP2 policy: ``param_dtype=None`` keeps fp32 parameters (the reference: fp32 master weights under bf16
    autocast); ``torch.bfloat16`` all-gathers bf16 parameters and reduces gradients in ``reduce_dtype``."""
    return MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)


def apply_fsdp(model: nn.Module, mesh: Any, mixed_precision: Any = None,
               forward_methods: tuple[str, ...] = ("forward_packed",)) -> nn.Module:
    """Shard ``model`` with FSDP2 over the mesh's ``"dp"`` dimension: one unit per block, then the root.

    ``forward_methods`` are the model's entry points other than ``forward`` (the training forward is
    ``forward_packed``): they get FSDP's pre/post-forward hooks so the root's parameters are gathered.
    Unused parameters (e.g. a head no scale of this rank's batch selects) still take part in the
    gradient reduce-scatter with zeros, so ranks whose batches use different heads stay in step.
    """
    dp_mesh = mesh["dp"] if mesh is not None and mesh.mesh_dim_names is not None else mesh
    mp = mixed_precision if mixed_precision is not None else MixedPrecisionPolicy()
    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, nn.ModuleList):
        raise ValueError(f"{type(model).__name__} has no `blocks` ModuleList to shard")
    for i, block in enumerate(blocks):
        # The last block's parameters are needed again at once by backward: keep them gathered.
        fully_shard(block, mesh=dp_mesh, mp_policy=mp, reshard_after_forward=i < len(blocks) - 1)
    fully_shard(model, mesh=dp_mesh, mp_policy=mp, reshard_after_forward=False)
    for name in forward_methods:
        register_fsdp_forward_method(model, name)
    # forward_packed returns logits that are views (unflatten); the loss only reads them, never in place.
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")
    model.set_reduce_scatter_unused_params(True)  # type: ignore[operator]
    return model


def all_reduce_sum(values: list[float], info: DistInfo) -> list[float]:
    """Sum a few float64 scalars over all ranks (metrics); identity in a single process."""
    if not info.distributed:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=info.device if info.device.type == "cuda" else "cpu")
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.cpu().tolist()


def gather_objects(obj: Any, info: DistInfo) -> list[Any]:
    """Every rank's ``obj`` (picklable) on every rank, in rank order; ``[obj]`` in a single process."""
    if not info.distributed:
        return [obj]
    out: list[Any] = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, info: DistInfo) -> Any:
    """Rank 0's ``obj`` on every rank."""
    if not info.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]

"""Block-level offload: the transformer's blocks live in host memory and visit the GPU a group at a time.

:class:`BlockOffload` keeps one (pinned) host copy of every block's weights and puts a group of ``group_size``
consecutive blocks on the device only around its forward: forward hooks on the blocks load the group when its first
block is called and release it after its last block has run. On CUDA the copies run on a side stream, from pinned
memory, without blocking the host, and the next group is copied while the current one computes, so a pass costs
about ``max(compute, transfer)``. At most two groups are on the device at any time (the running one and the
prefetched one). Nothing is rounded or recomputed: a forward with offload computes exactly what the plain model
computes on the device.

Inference only (the hooks swap tensors under autograd's feet). Cast or quantize the blocks *before* attaching; move
or cast them again only after :meth:`BlockOffload.detach`.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils._python_dispatch import is_traceable_wrapper_subclass

HOST = torch.device("cpu")


def _map_tensor(t: torch.Tensor, fn: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """``fn`` applied to a plain tensor, or to each inner tensor of a wrapper subclass (torchao's quantized weights
    keep int8/fp8 data and scales inside one outer tensor), rebuilt into the same subclass."""
    if is_traceable_wrapper_subclass(t):
        names, meta = t.__tensor_flatten__()
        inner = {n: _map_tensor(getattr(t, n), fn) for n in names}
        return type(t).__tensor_unflatten__(inner, meta, t.size(), t.stride())
    return fn(t.detach())


def _held_bytes(t: torch.Tensor) -> int:
    if is_traceable_wrapper_subclass(t):
        names, _ = t.__tensor_flatten__()
        return sum(_held_bytes(getattr(t, n)) for n in names)
    return t.numel() * t.element_size()


@dataclass
class _Slot:
    """One parameter or buffer of a block and its host copy."""

    module: nn.Module
    name: str
    kind: str  # "param" (plain: swapped through .data), "subclass" (tensor subclass parameter), "buffer"
    host: torch.Tensor  # what the module holds while the block is released (for "subclass": an nn.Parameter)

    def current(self) -> torch.Tensor:
        return (self.module._buffers if self.kind == "buffer" else self.module._parameters)[self.name]

    def holds_host(self) -> bool:
        """Whether the module still holds the host copy (not something cast or moved behind the offload's back)."""
        cur = self.current()
        if self.kind != "param":
            return cur is self.host
        return (cur.dtype == self.host.dtype and cur.device == self.host.device
                and cur.data_ptr() == self.host.data_ptr())

    def install(self, t: torch.Tensor) -> None:
        if self.kind == "param":
            # Plain tensors: swap the storage the Parameter points at; no copy either way, and the Parameter object
            # (what `blocks.parameters()` yields) stays the same.
            p = self.module._parameters[self.name]
            try:
                p.data = t
            except RuntimeError:  # a tensor type `.data` cannot take (e.g. detaching onto the meta device)
                self.module._parameters[self.name] = nn.Parameter(t, p.requires_grad)
        elif self.kind == "subclass":
            # Tensor subclasses (torchao Int8Tensor/Float8Tensor): `.data =` only swaps the empty outer wrapper and
            # leaves the inner int8 data and scales where they were, so register a new Parameter at module level.
            self.module._parameters[self.name] = t if isinstance(t, nn.Parameter) else nn.Parameter(t, False)
        else:
            self.module._buffers[self.name] = t


class BlockOffload:
    """Keep the blocks' weights in host memory and move them onto ``device`` a group of ``group_size`` blocks at a
    time while they run; on CUDA the next group is copied on a side stream while the current one computes.

    ``pin_memory`` None pins the host copies when ``device`` is CUDA (asynchronous copies need pinned memory).
    On a CPU ``device`` a load is a real copy (a clone) of the host weights, so the load/install/release path is
    the one a GPU runs and the bookkeeping (:meth:`resident_blocks`, :attr:`max_resident_blocks`) decides it.

    Usage: ``off = BlockOffload(model.blocks, "cuda", 4).attach()``; run the model as usual; ``off.detach()``.
    """

    def __init__(self, blocks: nn.ModuleList, device: torch.device | str, group_size: int = 4, *,
                 prefetch: bool = True, pin_memory: bool | None = None) -> None:
        if not isinstance(blocks, nn.ModuleList) or len(blocks) == 0:
            raise ValueError("BlockOffload needs a non-empty nn.ModuleList of blocks")
        if not (isinstance(group_size, int) and group_size >= 1):
            raise ValueError(f"block offload group_size must be an int >= 1, got {group_size!r}")
        device = torch.device(device)
        if device.type == "cuda":
            if not torch.cuda.is_available():
                raise ValueError(f"block offload to {device} needs CUDA, which this machine does not have")
            if device.index is None:
                device = torch.device("cuda", torch.cuda.current_device())
        elif device.type != "cpu":
            raise ValueError(f"block offload supports cuda and cpu devices, got {device}")
        self.blocks = blocks
        self.device = device
        self.group_size = group_size
        self.prefetch = prefetch
        self.pin_memory = device.type == "cuda" if pin_memory is None else pin_memory
        if self.pin_memory and not torch.cuda.is_available():
            raise ValueError("pin_memory=True needs CUDA (pinned host memory), which this machine does not have")
        n = len(blocks)
        self.groups: list[range] = [range(s, min(s + group_size, n)) for s in range(0, n, group_size)]
        self._group_of = [i // group_size for i in range(n)]
        self._slots: list[list[_Slot]] = []  # per block
        self._resident: dict[int, list[torch.Tensor]] = {}  # group -> its device tensors (slot order)
        self._ready: dict[int, torch.cuda.Event] = {}  # group -> copy finished (recorded on the side stream)
        self._released: list[torch.cuda.Event] = []  # compute finished with groups released since the last load
        self._stream: torch.cuda.Stream | None = None
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self.max_resident_blocks = 0

    # ------------------------------------------------------------------ public

    @property
    def attached(self) -> bool:
        return bool(self._handles)

    def attach(self) -> BlockOffload:
        """Move the blocks' weights to (pinned) host memory and hook the blocks; returns self."""
        if self.attached:
            raise RuntimeError("BlockOffload is already attached")
        if any(p.requires_grad for p in self.blocks.parameters()):
            raise ValueError("block offload is inference-only: call blocks.requires_grad_(False) before attaching")
        seen: set[int] = set()
        slots: list[list[_Slot]] = []
        for i, blk in enumerate(self.blocks):
            block_slots = []
            for mod in blk.modules():
                tensors = [(n, p, "param") for n, p in mod._parameters.items() if p is not None]
                tensors += [(n, b, "buffer") for n, b in mod._buffers.items() if b is not None]
                for name, t, kind in tensors:
                    if id(t) in seen:
                        raise ValueError(f"block {i} shares tensor {name!r} with another block; "
                                         "block offload needs each block to own its weights")
                    seen.add(id(t))
                    if kind == "param" and is_traceable_wrapper_subclass(t):
                        kind = "subclass"
                    host = _map_tensor(t, self._to_host)
                    block_slots.append(_Slot(mod, name, kind, nn.Parameter(host, False) if kind == "subclass"
                                             else host))
            slots.append(block_slots)
        self._slots = slots
        for block_slots in slots:
            for s in block_slots:
                s.install(s.host)
        if self.device.type == "cuda":
            self._stream = torch.cuda.Stream(self.device)
        self.max_resident_blocks = 0
        for i, blk in enumerate(self.blocks):
            self._handles.append(blk.register_forward_pre_hook(functools.partial(self._pre_hook, i)))
            self._handles.append(blk.register_forward_hook(functools.partial(self._post_hook, i)))
        return self

    def detach(self, device: torch.device | str | None = None) -> None:
        """Remove the hooks and leave every block's weights on ``device`` (default: the offload device) as plain
        module state, ready for use without offload."""
        if not self.attached:
            return
        for h in self._handles:
            h.remove()
        self._handles = []
        target = self.device if device is None else torch.device(device)
        if self._stream is not None:
            self._stream.synchronize()  # no copy may still be writing what is about to be dropped
        for g in list(self._resident):
            self._release(g)
        self._released.clear()
        for block_slots in self._slots:
            for s in block_slots:
                s.install(_map_tensor(s.host, lambda t: t.to(target)))
        self._slots = []
        self._stream = None

    def resident_blocks(self) -> list[int]:
        """Indices of the blocks whose weights are on the device now."""
        return sorted(i for g in self._resident for i in self.groups[g])

    def device_bytes_per_group(self) -> int:
        """Bytes the largest group's weights take on the device (two groups are resident at most)."""
        return max(sum(self._block_bytes(i) for i in grp) for grp in self.groups)

    # ------------------------------------------------------------------ moving

    def _block_bytes(self, i: int) -> int:
        if self._slots:
            return sum(_held_bytes(s.host) for s in self._slots[i])
        blk = self.blocks[i]
        return sum(_held_bytes(t) for t in (*blk.parameters(), *blk.buffers()))

    def _to_host(self, t: torch.Tensor) -> torch.Tensor:
        t = t.to(HOST)
        return t.pin_memory() if self.pin_memory else t

    def _copy_context(self) -> contextlib.AbstractContextManager:
        return torch.cuda.stream(self._stream) if self._stream is not None else contextlib.nullcontext()

    def _load(self, g: int) -> None:
        """Copy group ``g`` onto the device (on CUDA: asynchronously on the side stream) and install it."""
        if self._stream is not None:
            # Throttle the host to the GPU: the groups released so far must be done computing before their memory
            # can be reused for this copy; without this the host, running ahead, would allocate group after group
            # while the GPU still holds the released ones (freed memory with pending uses is not reusable).
            for ev in self._released:
                ev.synchronize()
            compute = torch.cuda.current_stream(self.device)

            def to_device(t: torch.Tensor) -> torch.Tensor:
                d = t.to(self.device, non_blocking=True)
                # Allocated on the side stream but read by the compute stream: tell the caching allocator, so the
                # memory is not handed out again before the compute stream is done with it.
                d.record_stream(compute)
                return d
        else:
            def to_device(t: torch.Tensor) -> torch.Tensor:
                return t.to(self.device, copy=True)
        self._released.clear()
        for i in self.groups[g]:
            for s in self._slots[i]:
                if not s.holds_host():
                    raise RuntimeError(f"block {i} was moved or cast while block offload was attached "
                                       f"({s.name} is {s.current().dtype} on {s.current().device}); detach first")
        tensors = []
        with self._copy_context():
            for i in self.groups[g]:
                for s in self._slots[i]:
                    tensors.append(_map_tensor(s.host, to_device))
            if self._stream is not None:
                ev = torch.cuda.Event()
                ev.record(self._stream)
                self._ready[g] = ev
        # Installed now, used only after the compute stream waited on the copy (see _enter).
        k = 0
        for i in self.groups[g]:
            for s in self._slots[i]:
                s.install(tensors[k])
                k += 1
        self._resident[g] = tensors
        self.max_resident_blocks = max(self.max_resident_blocks, len(self.resident_blocks()))

    def _release(self, g: int) -> None:
        """Point group ``g``'s modules back at the host copies (no device-to-host copy) and drop its device tensors."""
        for i in self.groups[g]:
            for s in self._slots[i]:
                cur = s.current()
                if cur.device != self.device or cur.dtype != s.host.dtype:
                    raise RuntimeError(f"block {i} was moved or cast while block offload was attached "
                                       f"({s.name} is {cur.dtype} on {cur.device}); detach first")
                s.install(s.host)
        del self._resident[g]
        self._ready.pop(g, None)
        if self._stream is not None:
            ev = torch.cuda.Event()
            ev.record(torch.cuda.current_stream(self.device))
            self._released.append(ev)

    def _enter(self, g: int) -> None:
        """Make group ``g`` the running one: release any stale group, load ``g`` if it was not prefetched, and make
        the compute stream wait for its copy."""
        keep = {g, self._next(g)} if self.prefetch else {g}
        for stale in [r for r in self._resident if r not in keep]:
            self._release(stale)
        if g not in self._resident:
            self._load(g)
        ev = self._ready.pop(g, None)
        if ev is not None:
            torch.cuda.current_stream(self.device).wait_event(ev)

    def _next(self, g: int) -> int:
        # After the last group: the first one, for the next pass (generation runs many passes).
        return (g + 1) % len(self.groups)

    # ------------------------------------------------------------------ hooks

    def _pre_hook(self, i: int, _module: nn.Module, _args) -> None:
        g = self._group_of[i]
        # A group starts (its first block), or a block runs whose group is absent or not yet waited for (a block
        # called on its own, or after an exception cut a pass short).
        if i == self.groups[g][0] or g not in self._resident or g in self._ready:
            self._enter(g)

    def _post_hook(self, i: int, _module: nn.Module, _args, _output) -> None:
        g = self._group_of[i]
        grp = self.groups[g]
        nxt = self._next(g)
        # Prefetch once the group's first block is queued: the copy overlaps the rest of the group's compute, and
        # the GPU has that block's work queued while the host waits in _load for the previous group to finish.
        if i == grp[0] and self.prefetch and nxt != g and nxt not in self._resident:
            self._load(nxt)
        if i == grp[-1] and g in self._resident and not (self.prefetch and nxt == g):
            self._release(g)


__all__ = ["BlockOffload"]

"""Weight-only int8 / fp8 quantization of the transformer blocks' linear layers (torchao).

Only the blocks' ``nn.Linear`` weights are rounded (q, k, v, o, gate, up, down: 7 per block, ~all of an 8B
model's bytes); the embeddings, ``text_proj`` and the heads stay float32, as the reference computes them in
float32. Activations keep their dtype: the quantized weight is expanded to the activation dtype inside each matmul
and the per-row scale applied to the product, so the blocks still run in bf16 on a GPU and float32 on the CPU.

torchao is an optional dependency (``pip install 'infinitystar[quant]'``); it is imported lazily, inside the
functions that need it, so importing :mod:`infinitystar` never pays for it (nor prints its import noise).
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import sys
from collections.abc import Iterator
from typing import Literal

import torch
from torch import nn
from torch.utils._python_dispatch import is_traceable_wrapper_subclass

QuantMethod = Literal["int8", "fp8"]
QUANT_METHODS = ("int8", "fp8")
FP8_MIN_CAPABILITY = (8, 9)  # Ada / Hopper: the first GPUs with float8 tensor cores

# What importing torchao 0.18 logs through `logging` on a machine without its CUDA extensions or with a newer torch:
# "Failed to load ..._C_*.so" (logger "torchao") and an Enum pytree deprecation (logger "torch.utils._pytree").
_NOISY_IMPORT_LOGGERS = ("torchao", "torch.utils._pytree")


def torchao_available() -> bool:
    """Whether torchao is installed (without importing it)."""
    return "torchao" in sys.modules or importlib.util.find_spec("torchao") is not None


@contextlib.contextmanager
def _quiet_import() -> Iterator[None]:
    """Raise the import-time loggers of torchao to ERROR while it is first imported (they only report optional
    kernels that this weight-only path does not use), then restore their levels."""
    loggers = [logging.getLogger(name) for name in _NOISY_IMPORT_LOGGERS]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _torchao_quantization(method: str):
    """``torchao.quantization`` (imported quietly), or one ImportError line naming the extra to install."""
    if not torchao_available():
        raise ImportError(f"memory mode {method!r} needs torchao: pip install 'infinitystar[quant]'")
    with _quiet_import():
        import torchao.quantization as tq
    return tq


def fp8_supported(device: torch.device | str) -> bool:
    """Whether ``device`` is a CUDA GPU of compute capability 8.9 or newer (float8 matmuls)."""
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return False
    return torch.cuda.get_device_capability(device) >= FP8_MIN_CAPABILITY


def _describe_capability(device: torch.device) -> str:
    if device.type != "cuda":
        return f"device {device} is not a CUDA GPU"
    if not torch.cuda.is_available():
        return f"device {device} is not available (no CUDA)"
    major, minor = torch.cuda.get_device_capability(device)
    return f"device {device} has compute capability {major}.{minor}"


def _weight_kind(weight: torch.Tensor) -> str | None:
    """"int8" / "fp8" for a torchao quantized weight, None for a plain tensor (torchao not imported: plain)."""
    if not is_traceable_wrapper_subclass(weight) or "torchao" not in sys.modules:
        return None
    tq = sys.modules.get("torchao.quantization")
    if tq is None:
        return None
    if isinstance(weight, tq.Int8Tensor):
        return "int8"
    if isinstance(weight, tq.Float8Tensor):
        return "fp8"
    return None


def _block_linears(blocks: nn.Module) -> list[nn.Linear]:
    return [m for m in blocks.modules() if isinstance(m, nn.Linear)]


def _default_device(blocks: nn.Module) -> torch.device:
    for p in blocks.parameters():
        return p.device
    return torch.device("cpu")


def quantize_blocks(blocks: nn.Module, method: QuantMethod, *, device: torch.device | str | None = None) -> int:
    """Weight-only quantize every ``nn.Linear`` inside ``blocks`` in place; returns the number of layers quantized.

    ``int8``: symmetric per-output-row int8 (torchao ``Int8WeightOnlyConfig``), scale ``absmax/127`` per row.
    ``fp8``: float8 e4m3 per row (``Float8WeightOnlyConfig``), only on a GPU of compute capability >= 8.9.
    ``device``: where the blocks will run (checked for fp8; default: where their weights are); when given, torchao
    moves each linear there before quantizing it (faster on a GPU).
    Pass only the transformer's ``blocks``; quantize before attaching a :class:`~.offload.BlockOffload`.
    """
    if method not in QUANT_METHODS:
        raise ValueError(f"quantization method must be one of {list(QUANT_METHODS)}, got {method!r}")
    target = torch.device(device) if device is not None else _default_device(blocks)
    if method == "fp8" and not fp8_supported(target):
        raise ValueError(f"memory mode 'fp8' needs a CUDA GPU of compute capability "
                         f"{FP8_MIN_CAPABILITY[0]}.{FP8_MIN_CAPABILITY[1]} or newer; {_describe_capability(target)}")
    tq = _torchao_quantization(method)
    already = is_quantized(blocks)
    if already is not None:
        raise ValueError(f"the blocks are already quantized ({already}); reload the float weights to re-quantize")
    # No process-wide inductor settings behind the caller's back (torchao's default); a caller that compiles opts in.
    config_cls = tq.Int8WeightOnlyConfig if method == "int8" else tq.Float8WeightOnlyConfig
    config = config_cls(set_inductor_config=False)
    count = 0

    def only_plain_linears(module: nn.Module, _fqn: str) -> bool:
        nonlocal count
        chosen = isinstance(module, nn.Linear) and not is_traceable_wrapper_subclass(module.weight)
        count += chosen
        return chosen

    with torch.no_grad():
        tq.quantize_(blocks, config, filter_fn=only_plain_linears, device=device)
    return count


def is_quantized(blocks: nn.Module) -> str | None:
    """``"int8"`` / ``"fp8"`` when the blocks' linear weights are torchao quantized tensors, else None."""
    for lin in _block_linears(blocks):
        kind = _weight_kind(lin.weight)
        if kind is not None:
            return kind
    return None


def _held_bytes(t: torch.Tensor) -> int:
    """Bytes of a tensor's own data; for a wrapper subclass, the sum over its inner tensors (data, scales, ...)."""
    if is_traceable_wrapper_subclass(t):
        names, _ = t.__tensor_flatten__()
        return sum(_held_bytes(getattr(t, n)) for n in names)
    return t.numel() * t.element_size()


def quantized_weight_bytes(blocks: nn.Module) -> int:
    """Bytes held by the quantized linear weights of ``blocks`` (int8/fp8 data + per-row scales + zero points);
    0 when nothing is quantized. Biases and norms are not counted."""
    return sum(_held_bytes(lin.weight) for lin in _block_linears(blocks) if _weight_kind(lin.weight) is not None)


__all__ = ["FP8_MIN_CAPABILITY", "QUANT_METHODS", "fp8_supported", "is_quantized", "quantize_blocks",
           "quantized_weight_bytes", "torchao_available"]

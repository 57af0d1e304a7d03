"""What this machine's CPU computes natively, measured once: the precision a CPU run defaults to.

bf16 on a CPU is only worth it where the CPU has bf16 instructions (x86 ``avx512_bf16``/``amx_bf16``, Arm ``bf16``):
there a bf16 matmul runs several times faster than float32 (AMX: ~4x on the matmuls of this project's models).
Elsewhere PyTorch emulates it, and a bf16 matmul crawls (measured 0.7 GFLOP/s against 35 GFLOP/s per core in
float32 on a 2-core machine without AVX-512). So :func:`cpu_precision` chooses bf16 only where the CPU reports native
bf16 *and* a short matmul micro-benchmark (float32 against bf16, the same shapes, this process's thread count)
shows bf16 at least :data:`BF16_MIN_SPEEDUP` times faster; anything else is fp32. The flags alone are not enough: a
library can still take an emulated path (oneDNN capped by ``ONEDNN_MAX_CPU_ISA``, an old build).

The measurement takes ~0.1 s and runs once per machine: its result is kept in
``$XDG_CACHE_HOME/infinitystar/cpu_precision.json`` (default ``~/.cache``), keyed by what it depends on (CPU model and
flags, torch version, threads, the ISA-capping environment variables), and in memory for the process.
``INFINITYSTAR_CPU_PRECISION=fp32|bf16|auto`` overrides the choice (the test suite pins fp32, so that its numbers do
not depend on the machine CI lands on).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .fileio import atomic_write_json

ENV_VAR = "INFINITYSTAR_CPU_PRECISION"
CHOICES = ("auto", "fp32", "bf16")
# bf16 must beat float32 by this factor in the micro-benchmark to be chosen (it also costs accuracy).
BF16_MIN_SPEEDUP = 1.3
# Environment variables that change which kernels PyTorch's CPU backends take.
_ISA_ENV = ("ONEDNN_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY", "DNNL_MAX_CPU_ISA")
_NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16", "bf16")  # x86 (/proc/cpuinfo "flags"), Arm ("Features")


@dataclass(frozen=True)
class CPUPrecision:
    """The precision CPU runs default to, and why (one line, for logs and the front doors)."""

    precision: str  # "fp32" or "bf16"
    reason: str
    fp32_gflops: float | None = None  # the micro-benchmark's figures, when it ran
    bf16_gflops: float | None = None


def _cpuinfo() -> tuple[str, frozenset[str]]:
    """(CPU model name, feature flags) from /proc/cpuinfo; ("", {}) where there is none."""
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return platform.processor(), frozenset()
    model, flags = "", set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip().lower()
        if key in ("model name", "cpu model") and not model:
            model = value.strip()
        elif key in ("flags", "features") and not flags:
            flags = set(value.split())
    return model or platform.processor(), frozenset(flags)


def native_bf16_features() -> tuple[str, ...]:
    """The CPU's bf16 instruction sets (empty: none, bf16 would be emulated)."""
    _, flags = _cpuinfo()
    found = tuple(f for f in _NATIVE_BF16_FLAGS if f in flags)
    if not found and platform.machine().lower() in ("x86_64", "amd64"):
        # No /proc/cpuinfo (another OS): ask torch's own CPU probe.
        probe = getattr(torch.cpu, "_is_avx512_bf16_supported", None)
        if probe is not None and probe():
            found = ("avx512_bf16",)
    return found


def matmul_gflops(dtype: torch.dtype, n: int = 512, min_seconds: float = 0.03) -> float:
    """Measured GFLOP/s of an ``n``-cube ``torch.mm`` in ``dtype`` on the CPU with this process's threads."""
    a = torch.randn(n, n).to(dtype)
    b = torch.randn(n, n).to(dtype)
    torch.mm(a, b)  # warm-up: first-call dispatch and kernel selection
    reps, start = 0, time.perf_counter()
    while True:
        torch.mm(a, b)
        reps += 1
        elapsed = time.perf_counter() - start
        if elapsed >= min_seconds:  # an emulated bf16 stops after its first (slow) call
            break
    return 2 * n ** 3 * reps / elapsed / 1e9


def _signature() -> str:
    model, flags = _cpuinfo()
    parts = [model, ",".join(sorted(flags)), torch.__version__, str(torch.get_num_threads()),
             *(f"{k}={os.environ.get(k, '')}" for k in _ISA_ENV)]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def cache_path() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(root) / "infinitystar" / "cpu_precision.json"


def _read_cache(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}  # none yet, unreadable or corrupt: measure again (and rewrite it)
    return data if isinstance(data, dict) else {}


def _from_cache(entry: object) -> CPUPrecision | None:
    if not isinstance(entry, dict):
        return None
    try:
        choice = CPUPrecision(**entry)
    except TypeError:
        return None
    return choice if choice.precision in ("fp32", "bf16") and isinstance(choice.reason, str) else None


def measure_cpu_precision() -> CPUPrecision:
    """Decide from the CPU's flags and, where bf16 is native, the micro-benchmark (no cache)."""
    features = native_bf16_features()
    if not features:
        return CPUPrecision("fp32", "fp32: this CPU has no native bf16 (bf16 would be emulated, many times slower)")
    fp32 = matmul_gflops(torch.float32)
    bf16 = matmul_gflops(torch.bfloat16)
    speedup = bf16 / fp32
    measured = f"bf16 matmul {bf16:.0f} GFLOP/s vs fp32 {fp32:.0f} GFLOP/s ({speedup:.1f}x)"
    if speedup >= BF16_MIN_SPEEDUP:
        return CPUPrecision("bf16", f"bf16: native bf16 ({', '.join(features)}), {measured}", fp32, bf16)
    return CPUPrecision("fp32", f"fp32: native bf16 ({', '.join(features)}) but {measured}, under the "
                                f"{BF16_MIN_SPEEDUP}x it must gain", fp32, bf16)


@functools.cache
def _cached_cpu_precision(signature: str) -> CPUPrecision:
    path = cache_path()
    stored = _read_cache(path)
    choice = _from_cache(stored.get(signature))
    if choice is not None:
        return choice
    choice = measure_cpu_precision()
    stored[signature] = asdict(choice)
    with contextlib.suppress(OSError):  # a read-only or full home: the choice still holds for this process
        atomic_write_json(path, stored)
    return choice


def cpu_precision() -> CPUPrecision:
    """The precision CPU runs default to (see the module docstring): ``INFINITYSTAR_CPU_PRECISION`` if set, else the
    measured choice for this machine, from the cache when it was measured before."""
    asked = os.environ.get(ENV_VAR, "auto").strip().lower() or "auto"
    if asked not in CHOICES:
        raise ValueError(f"{ENV_VAR}={asked!r}: expected one of {', '.join(CHOICES)}")
    if asked != "auto":
        return CPUPrecision(asked, f"{asked}: set by {ENV_VAR}")
    return _cached_cpu_precision(_signature())


__all__ = ["BF16_MIN_SPEEDUP", "CPUPrecision", "ENV_VAR", "cache_path", "cpu_precision", "matmul_gflops",
           "measure_cpu_precision", "native_bf16_features"]

"""The default CPU precision: bf16 only where the CPU has native bf16 and a measured matmul shows it faster."""

from __future__ import annotations

import json

import pytest
import torch

from infinitystar import hardware
from infinitystar.config import ConfigError, default_precision


@pytest.fixture
def auto(monkeypatch, tmp_path):
    """The measured choice (not the suite's pinned fp32), with the on-disk cache under tmp_path and no memory of
    earlier calls."""
    monkeypatch.setenv(hardware.ENV_VAR, "auto")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    hardware._cached_cpu_precision.cache_clear()
    yield tmp_path
    hardware._cached_cpu_precision.cache_clear()


def _fake_speeds(monkeypatch, fp32: float, bf16: float) -> list[torch.dtype]:
    calls: list[torch.dtype] = []

    def fake(dtype, **_):
        calls.append(dtype)
        return {torch.float32: fp32, torch.bfloat16: bf16}[dtype]

    monkeypatch.setattr(hardware, "matmul_gflops", fake)
    return calls


def test_no_native_bf16_means_fp32_without_measuring(monkeypatch, auto) -> None:
    monkeypatch.setattr(hardware, "native_bf16_features", lambda: ())
    calls = _fake_speeds(monkeypatch, 100.0, 900.0)
    choice = hardware.cpu_precision()
    assert choice.precision == "fp32" and "no native bf16" in choice.reason
    assert calls == []
    assert default_precision("cpu") == "fp32"


@pytest.mark.parametrize(("bf16", "want"), [(400.0, "bf16"), (110.0, "fp32"), (1.0, "fp32")])
def test_native_bf16_is_chosen_only_when_measured_faster(monkeypatch, auto, bf16, want) -> None:
    monkeypatch.setattr(hardware, "native_bf16_features", lambda: ("amx_bf16",))
    _fake_speeds(monkeypatch, 100.0, bf16)
    choice = hardware.cpu_precision()
    assert choice.precision == want, choice.reason
    assert choice.fp32_gflops == 100.0 and choice.bf16_gflops == bf16
    assert default_precision("cpu") == want
    assert default_precision("cuda") == "bf16" and default_precision("mps") == "fp32"


def test_the_measurement_is_cached_on_disk_and_a_corrupt_cache_is_measured_again(monkeypatch, auto) -> None:
    monkeypatch.setattr(hardware, "native_bf16_features", lambda: ("avx512_bf16",))
    calls = _fake_speeds(monkeypatch, 100.0, 300.0)
    assert hardware.cpu_precision().precision == "bf16"
    assert len(calls) == 2
    stored = json.loads(hardware.cache_path().read_text())
    assert [entry["precision"] for entry in stored.values()] == ["bf16"]

    # A new process (no memory cache) reads the file instead of measuring.
    hardware._cached_cpu_precision.cache_clear()
    assert hardware.cpu_precision().precision == "bf16" and len(calls) == 2

    # The key covers what changes the kernels: another thread count is measured apart.
    threads = torch.get_num_threads()
    torch.set_num_threads(threads + 1)
    try:
        hardware._cached_cpu_precision.cache_clear()
        hardware.cpu_precision()
        assert len(calls) == 4
    finally:
        torch.set_num_threads(threads)

    for junk in ("{not json", "[1, 2]", json.dumps({k: {"precision": "fp64", "reason": "x"} for k in stored})):
        hardware.cache_path().write_text(junk)
        hardware._cached_cpu_precision.cache_clear()
        assert hardware.cpu_precision().precision == "bf16"
    assert len(calls) == 10  # each bad file measured again (and rewritten)
    assert json.loads(hardware.cache_path().read_text())


def test_environment_override_and_its_bad_value(monkeypatch) -> None:
    monkeypatch.setenv(hardware.ENV_VAR, "bf16")
    assert hardware.cpu_precision().precision == "bf16" and default_precision("cpu") == "bf16"
    monkeypatch.setenv(hardware.ENV_VAR, "fp16")
    with pytest.raises(ConfigError, match="INFINITYSTAR_CPU_PRECISION='fp16': expected one of auto, fp32, bf16"):
        default_precision("cpu")


def test_real_measurement_and_flags_are_consistent() -> None:
    """On this machine, whatever it is: the micro-benchmark measures a positive rate, and a CPU without bf16 flags is
    never given bf16."""
    assert hardware.matmul_gflops(torch.float32, n=128, min_seconds=0.005) > 0
    choice = hardware.measure_cpu_precision()
    if not hardware.native_bf16_features():
        assert choice.precision == "fp32" and choice.bf16_gflops is None
    else:
        assert choice.bf16_gflops is not None and choice.fp32_gflops is not None
        assert (choice.precision == "bf16") == (choice.bf16_gflops >= hardware.BF16_MIN_SPEEDUP * choice.fp32_gflops)

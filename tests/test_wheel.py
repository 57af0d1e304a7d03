"""Packaging: the wheel holds everything the commands read (demo weights, the demo recipe's configs), and ./dev
says what it installs on its first run.

The wheel test builds from a copy of the source tree (so no build/ or egg-info appears in the checkout), installs
the wheel with ``pip install --no-deps --target`` and runs its console script with ``PYTHONPATH`` pointing there
from a folder outside the repository: the dependencies come from this venv, the package only from the wheel.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from infinitystar.outputs import read_record

REPO = Path(__file__).resolve().parents[1]
DEMO_CONFIGS = ("sampling.toml", "transformer.toml", "transformer_stage2.toml", "vae.toml", "vae_decoder.toml")


def _build_wheel(tmp: Path) -> Path:
    src = tmp / "src_copy"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, src / name)
    shutil.copytree(REPO / "src", src / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info", "*.pyc"))
    dist = tmp / "dist"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q",
                    "-w", str(dist), str(src)], check=True, capture_output=True, text=True, timeout=300)
    (wheel,) = dist.glob("infinitystar-*.whl")
    return wheel


@pytest.mark.slow
def test_installed_wheel_generates_and_trains_the_demo(tmp_path):
    wheel = _build_wheel(tmp_path)
    names = set(zipfile.ZipFile(wheel).namelist())
    for cfg in DEMO_CONFIGS:
        assert f"infinitystar/demo/configs/{cfg}" in names
    assert "infinitystar/demo/weights/model_index.json" in names

    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "-q", "--target", str(site),
                    str(wheel)], check=True, capture_output=True, text=True, timeout=300)
    work = tmp_path / "work"  # outside the repository: its src/ is not importable from here
    work.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site), "OMP_NUM_THREADS": "1"}

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(list(args), cwd=work, env=env, capture_output=True, text=True, timeout=300)

    probe = run(sys.executable, "-c", "import infinitystar, infinitystar.demo.recipe as r, infinitystar.train.config "
                "as c; print(infinitystar.__file__); print(r.DEFAULT_CONFIG_DIR); "
                "[c.read_config_file(r.DEFAULT_CONFIG_DIR / n) for n in ('transformer.toml', 'vae.toml')]")
    assert probe.returncode == 0, probe.stderr
    module_file, config_dir = probe.stdout.split()
    assert Path(module_file).is_relative_to(site), module_file
    assert Path(config_dir).is_relative_to(site), config_dir

    script = site / "bin" / "infinitystar"
    gen = run(str(script), "generate", "a red circle moving left", "--frames", "5", "--seed", "7", "--quiet")
    assert gen.returncode == 0, gen.stderr
    (out,) = (work / "outputs").glob("*.mp4")
    assert read_record(out).seed == 7 and read_record(out).model == "infinitystar-demo"

    help_ = run(str(script), "train-demo", "--help")
    assert help_.returncode == 0, help_.stderr
    assert "usage: infinitystar train-demo" in help_.stdout


def _fake_root(tmp_path: Path) -> Path:
    """A copy of ./dev next to a stand-in .venv whose python and console script only log their arguments."""
    root = tmp_path / "clone"
    (root / ".venv" / "bin").mkdir(parents=True)
    shutil.copy2(REPO / "dev", root / "dev")
    (root / "pyproject.toml").write_text("[project]\nname = 'x'\n", encoding="utf-8")
    for name in ("python", "infinitystar"):
        tool = root / ".venv" / "bin" / name
        tool.write_text(f'#!/bin/sh\necho "{name} $*" >> "$(dirname "$0")/calls.log"\n', encoding="utf-8")
        tool.chmod(0o755)
    return root


def test_dev_says_what_it_installs_on_the_first_run_only(tmp_path):
    root = _fake_root(tmp_path)
    first = subprocess.run([str(root / "dev"), "generate", "x"], capture_output=True, text=True, timeout=60)
    assert first.returncode == 0, first.stderr
    lines = first.stderr.strip().splitlines()
    assert 1 <= len(lines) <= 2 and "first run" in lines[0] and "PyTorch" in first.stderr, first.stderr
    calls = (root / ".venv" / "bin" / "calls.log").read_text(encoding="utf-8")
    assert "-m pip install" in calls and "infinitystar generate x" in calls
    again = subprocess.run([str(root / "dev"), "generate", "x"], capture_output=True, text=True, timeout=60)
    assert again.returncode == 0 and again.stderr == "" and again.stdout == ""

"""Shared test fixtures: the golden directory of reference numbers."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
# The reference's numbers ship with the tests (tests/golden, a byte-identical copy of the project's shared golden
# folder; tests/test_golden_copy.py keeps the two from drifting). INFINITYSTAR_GOLDEN points at another copy, e.g.
# one that holds more cases of each kind.
VENDORED_GOLDEN_DIR = REPO_ROOT / "tests" / "golden"
SHARED_GOLDEN_DIR = REPO_ROOT.parent / "shared" / "golden"
GOLDEN_DIR = Path(os.environ.get("INFINITYSTAR_GOLDEN", VENDORED_GOLDEN_DIR))


def golden_cases(kind: str) -> list[Path]:
    """Every case folder under golden/<kind>/ (vae, transformer, interactive, frontend, output), sorted by name."""
    root = GOLDEN_DIR / kind
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir())


@pytest.fixture(autouse=True)
def _deterministic_threads():
    # The golden numbers were produced with 2 threads; keep tests reproducible across machines.
    torch.set_num_threads(2)
    yield


@pytest.fixture
def golden_dir() -> Path:
    if not GOLDEN_DIR.is_dir():
        pytest.fail(f"golden directory {GOLDEN_DIR} is missing (set INFINITYSTAR_GOLDEN)")
    return GOLDEN_DIR

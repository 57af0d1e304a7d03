"""Shared test fixtures: the golden directory of reference numbers."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
GOLDEN_DIR = Path(os.environ.get("INFINITYSTAR_GOLDEN", REPO_ROOT.parent / "shared" / "golden"))


def golden_cases(kind: str) -> list[Path]:
    """Every case folder under golden/<kind>/ (vae or transformer), sorted by name."""
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

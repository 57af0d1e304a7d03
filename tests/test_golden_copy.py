"""The vendored golden data (tests/golden) is the project's shared golden folder, byte for byte.

The copy lets a plain clone run every parity test; this test makes sure it cannot drift from the
reference's numbers where the shared folder exists (the developers' and CI's machines).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from conftest import SHARED_GOLDEN_DIR, VENDORED_GOLDEN_DIR


def _files(root: Path) -> dict[str, Path]:
    return {p.relative_to(root).as_posix(): p for p in root.rglob("*") if p.is_file()}


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_vendored_golden_holds_every_kind():
    # The parity tests discover cases under these folders; an empty copy would make them vacuous.
    for kind in ("vae", "transformer", "interactive", "frontend", "output"):
        cases = [p for p in (VENDORED_GOLDEN_DIR / kind).iterdir() if p.is_dir()]
        assert cases, f"no {kind} case in {VENDORED_GOLDEN_DIR}"
    assert (VENDORED_GOLDEN_DIR / "README.md").is_file()


@pytest.mark.skipif(not SHARED_GOLDEN_DIR.is_dir(), reason=f"{SHARED_GOLDEN_DIR} is absent (a user's clone)")
def test_vendored_golden_equals_shared_golden_file_by_file():
    shared, vendored = _files(SHARED_GOLDEN_DIR), _files(VENDORED_GOLDEN_DIR)
    assert sorted(vendored) == sorted(shared), (
        f"only in tests/golden: {sorted(set(vendored) - set(shared))}; "
        f"only in shared: {sorted(set(shared) - set(vendored))}"
    )
    differ = [name for name in shared if _digest(shared[name]) != _digest(vendored[name])]
    assert not differ, f"tests/golden differs from {SHARED_GOLDEN_DIR} in {differ}"

"""The README's Python runs as written (issue 15: "a fresh clone runs the README's commands as written").

Every ```python block that uses the shipped demo model, and every Python cell of the task table (with the
`pipe = ...` line of its header), is executed in a scratch folder holding the files they name (``first.png``,
``clip.mp4``). Blocks for the 8B models need their download and are not run here.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from infinitystar.media import write_image, write_video

pytestmark = pytest.mark.usefixtures("one_thread")

README = Path(__file__).resolve().parents[1] / "README.md"
TEXT = README.read_text(encoding="utf-8")


def _demo_blocks() -> list[str]:
    blocks = re.findall(r"```python\n(.*?)```", TEXT, flags=re.S)
    return [b for b in blocks if "infinitystar-demo" in b]


def _table_cells() -> tuple[str, list[tuple[str, str]]]:
    header = re.search(r"^\| task \| Python \(`(.*?)`\) \|", TEXT, flags=re.M)
    assert header, "the README's task table lost its header"
    rows = []
    for line in TEXT[header.end():].splitlines()[2:]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        code = re.fullmatch(r"`([^`]*)`(.*)", cells[1])
        if code and "the 8B" not in code.group(2):
            rows.append((cells[0], code.group(1)))
    return header.group(1), rows


@pytest.fixture
def scratch(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rng = np.random.default_rng(0)
    write_image(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8), tmp_path / "first.png")
    write_video(rng.integers(0, 255, (33, 64, 64, 3), dtype=np.uint8), tmp_path / "clip.mp4", fps=16)
    return tmp_path


def test_the_readme_has_runnable_demo_code():
    _, rows = _table_cells()
    assert _demo_blocks() and {name for name, _ in rows} >= {"text-to-image", "text-to-video", "image-to-video",
                                                             "video extension", "long video",
                                                             "interactive story"}


@pytest.mark.parametrize("block", _demo_blocks(), ids=lambda b: b.splitlines()[-1][:40])
def test_readme_python_block_runs(block, scratch):
    exec(compile(block, str(README), "exec"), {})


def test_readme_task_table_runs(scratch):
    setup, rows = _table_cells()
    scope: dict = {}
    exec("from infinitystar import InfinityStarPipeline\n" + setup, scope)
    for name, code in rows:
        result = eval(code, scope)
        frames = result if isinstance(result, list | np.ndarray) else np.asarray(result)
        assert len(frames) >= 1, name

"""Bad inputs through the CLI (issue 16): each one is exit 2 and one line on stderr naming its subject, no traceback,
nothing written where the command would write.

Each row: (id, argv builder, text the line must contain). The builder gets a scratch folder and returns the argv;
files it needs are made there. Rows run in-process through ``infinitystar.cli.main`` (the same code the console
script runs), so the table stays fast.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from infinitystar.cli import main as cli_main
from infinitystar.demo import DEMO_WEIGHTS


def _binary_config(d: Path) -> list[str]:
    (d / "cfg.toml").write_bytes(bytes(range(256)) * 4)
    return ["train", str(d / "cfg.toml")]


def _binary_vae_config(d: Path) -> list[str]:
    (d / "cfg.toml").write_bytes(b"\xff\xfe" + bytes(100))
    return ["train-vae", str(d / "cfg.toml")]


def _huge_vae_clips(d: Path) -> list[str]:
    (d / "cfg.toml").write_text('[data]\npaths = ["x"]\nheight = 65536\nwidth = 65536\n')
    return ["train-vae", str(d / "cfg.toml")]


def _model_with(d: Path, data: bytes) -> Path:
    model = d / "model"
    for src in DEMO_WEIGHTS.rglob("*"):
        if src.is_file():
            dst = model / src.relative_to(DEMO_WEIGHTS)
            dst.parent.mkdir(parents=True, exist_ok=True)
            dst.write_bytes(src.read_bytes())
    (model / "transformer" / "model.safetensors").write_bytes(data)
    return model


def _truncated_safetensors(d: Path) -> list[str]:
    head = (DEMO_WEIGHTS / "transformer" / "model.safetensors").read_bytes()[:50]
    return ["generate", "a red circle", "--model", str(_model_with(d, head)), "-o", str(d / "out" / "x.mp4")]


def _huge_header_safetensors(d: Path) -> list[str]:
    data = (1 << 40).to_bytes(8, "little") + b'{"a":'
    return ["generate", "a red circle", "--model", str(_model_with(d, data)), "-o", str(d / "out" / "x.mp4")]


BAD_INPUTS: list[tuple[str, Callable[[Path], list[str]], str]] = [
    ("binary train config", _binary_config, "cfg.toml is not UTF-8 text"),
    ("binary train-vae config", _binary_vae_config, "cfg.toml is not UTF-8 text"),
    ("65536x65536 VAE clips", _huge_vae_clips, "data.height must be a multiple of 16 in 16..2048, got 65536"),
    ("make-demo-data --size 100000", lambda d: ["make-demo-data", str(d / "out"), "--size", "100000"],
     "clip size must be 16..1024 pixels, got 100000"),
    ("make-demo-data 3 GiB clips", lambda d: ["make-demo-data", str(d / "out"), "--size", "1024", "--frames", "1025"],
     "takes 3.0 GiB in memory"),
    ("truncated safetensors", _truncated_safetensors, "model.safetensors is not a readable safetensors file"),
    ("huge safetensors header", _huge_header_safetensors, "model.safetensors is not a readable safetensors file"),
]


@pytest.mark.parametrize(("builder", "expect"), [row[1:] for row in BAD_INPUTS], ids=[row[0] for row in BAD_INPUTS])
def test_bad_input_is_one_line(builder, expect, tmp_path, capsys):
    argv = builder(tmp_path)
    capsys.readouterr()
    code = cli_main(argv)
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip() and not ln.startswith("note:")]
    assert code == 2, err
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith(f"infinitystar {argv[0]}: error: ") and expect in lines[0], lines[0]
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").rglob("*.*")), "something was written"

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
    before = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.is_file()}
    capsys.readouterr()
    code = cli_main(argv)
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip() and not ln.startswith("note:")]
    assert code == 2, err
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith(f"infinitystar {argv[0]}: error: ") and expect in lines[0], lines[0]
    after = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.is_file()}
    assert after == before, "a file was written or changed"


def _binary_prompts(d: Path) -> list[str]:
    (d / "story.txt").write_bytes(b"\xff\xfe\x00a cat")
    return ["interactive", str(d / "story.txt"), "-o", str(d / "out" / "story.mp4")]


def _output_is_a_folder(d: Path) -> list[str]:
    (d / "out" / "x.mp4").mkdir(parents=True)
    return ["generate", "a red circle moving right", "--frames", "5", "-o", str(d / "out" / "x.mp4"), "--overwrite"]


def _touch(path: Path) -> Path:
    path.write_text("")
    return path


def _bomb_image(d: Path) -> list[str]:
    from test_limits import _png_header_only

    bomb = _png_header_only(d / "bomb.png", 12000, 12000)
    return ["generate", "a red circle moving right", "--image", str(bomb), "-o", str(d / "out" / "x.mp4")]


BOUNDARY_INPUTS: list[tuple[str, Callable[[Path], list[str]], str]] = [
    ("non-UTF-8 prompt", lambda d: ["generate", "\udcff\udcfe red", "--frames", "5"],
     "prompt is not valid text: characters 0-1 are bytes that are not UTF-8"),
    ("a file as --model", lambda d: ["generate", "a red circle", "--model", str(_binary_config(d)[1])],
     "wants a model folder, and"),
    ("make-demo-data into a file", lambda d: ["make-demo-data", str(_touch(d / "afile") / "data"), "--clips", "1"],
     "afile is a file, not a folder"),
    ("--seconds inf", lambda d: ["generate", "a red circle", "--seconds", "inf"], "seconds must be a finite number"),
    ("--seconds 1e9", lambda d: ["generate", "a red circle", "--seconds", "1e9"], "over the limit of 2001 frames"),
    ("--frames 1000001", lambda d: ["generate", "a red circle", "--frames", "1000001"],
     "1000001 frames (62500 s at 16 fps) is over the limit"),
    ("decompression-bomb png", _bomb_image, "image bomb.png is 12000x12000 = 144 megapixels a frame"),
    ("unknown --request-limit", lambda d: ["generate", "a red circle", "--request-limit", "frames=9"],
     "--request-limit 'frames=9': expected NAME=VALUE"),
    ("non-UTF-8 prompts file", _binary_prompts, "story.txt is not UTF-8 text"),
    ("--device bogus", lambda d: ["generate", "a red circle", "--device", "bogus"], "unknown device 'bogus'"),
    ("--device cuda:99", lambda d: ["generate", "a red circle", "--device", "cuda:99"], "device 'cuda:99'"),
    ("output path is a folder", _output_is_a_folder, "x.mp4 is a folder; give a file name"),
]


@pytest.mark.parametrize(("builder", "expect"), [row[1:] for row in BOUNDARY_INPUTS],
                         ids=[row[0] for row in BOUNDARY_INPUTS])
def test_bad_input_through_the_boundary_is_one_line(builder, expect, tmp_path, capsys):
    test_bad_input_is_one_line(builder, expect, tmp_path, capsys)


# ----------------------------------------------------------------------------------------------
# The boundary itself: internal errors, --debug, Ctrl+C, warnings
# ----------------------------------------------------------------------------------------------


def _failing_convert(exc: BaseException):
    def run(_args):
        raise exc
    return run


def test_an_internal_error_is_one_line_with_the_log_file(tmp_path, monkeypatch, capsys):
    import infinitystar.cli as cli

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(cli, "_run_convert", _failing_convert(RuntimeError("kaboom\nsecond line")))
    assert cli_main(["convert", "a.pth", "b.safetensors"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith("infinitystar convert: internal error: RuntimeError: kaboom second line (traceback in ")
    log = Path(err.split("(traceback in ")[1].split(";")[0])
    assert log.parent == tmp_path / "cache" / "infinitystar" / "errors"
    assert "Traceback" in log.read_text() and "kaboom" in log.read_text()
    # --debug, anywhere in the arguments: the traceback on stderr instead of a log file.
    assert cli_main(["convert", "a.pth", "b.safetensors", "--debug"]) == 1
    assert "Traceback (most recent call last)" in capsys.readouterr().err


def test_ctrl_c_is_one_line_and_exit_130(monkeypatch, capsys):
    import infinitystar.cli as cli

    monkeypatch.setattr(cli, "_run_convert", _failing_convert(KeyboardInterrupt()))
    assert cli_main(["convert", "a.pth", "b.safetensors"]) == 130
    assert capsys.readouterr().err == "infinitystar convert: interrupted\n"


def test_a_full_disk_names_the_disk(monkeypatch, capsys):
    import infinitystar.cli as cli
    from infinitystar.fileio import DiskFullError

    monkeypatch.setattr(cli, "_run_convert", _failing_convert(DiskFullError("disk full: /data could not take x "
                                                                            "(1.0 MiB free)")))
    assert cli_main(["convert", "a.pth", "b.safetensors"]) == 2
    assert capsys.readouterr().err == "infinitystar convert: error: disk full: /data could not take x (1.0 MiB free)\n"


def test_warnings_are_one_line(monkeypatch, capsys):
    import warnings

    import infinitystar.cli as cli

    def warn(_args):
        warnings.warn("the prompt has words the model never saw: 'corgi'", UserWarning, stacklevel=1)
        return 0

    monkeypatch.setattr(cli, "_run_convert", warn)
    assert cli_main(["convert", "a.pth", "b.safetensors"]) == 0
    assert capsys.readouterr().err == ("infinitystar convert: warning: the prompt has words the model never saw: "
                                       "'corgi'\n")

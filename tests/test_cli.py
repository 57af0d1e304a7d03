"""The ``infinitystar generate`` / ``interactive`` commands: files that read back, and exit code 2 on bad input.

Runs in-process through ``infinitystar.cli.main`` on the tiny-test preset (random weights), plus one
subprocess run of the installed console script to prove the entry point.
"""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from infinitystar import cli, media
from infinitystar.cli import main
from infinitystar.config import get_preset
from infinitystar.outputs import read_record
from infinitystar.pipeline import InfinityStarPipeline

SIZE = 96
FPS = 16
# Two-latent-frame clips: a segment / clip is 8 frames, so interactive and extension runs stay short; an interactive
# model (``interactive`` needs one), which does every other video task too.
SHORT_CLIPS = dataclasses.replace(get_preset("pipeline", "tiny-test"), name="tiny-short-clips", frames_inner_clip=2,
                                  interactive=True)
CONSOLE_SCRIPT = Path(sys.executable).parent / "infinitystar"


@pytest.fixture(autouse=True)
def _threads():
    # Tiny models on a shared 2-core machine: one intra-op thread is much faster than two that wait on each other.
    torch.set_num_threads(1)
    yield


@pytest.fixture(scope="module")
def short_model(tmp_path_factory) -> Path:
    """A saved pipeline folder (our layout) with 2-latent-frame clips, for --model."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("model") / "tiny-short-clips"
    InfinityStarPipeline.from_preset(SHORT_CLIPS, seed=0).save_pretrained(root)
    return root


def _run(argv: list[str], capsys) -> tuple[int, str, str]:
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _check_video(path: Path, frames: int) -> None:
    info = media.probe_video(path)
    assert (info.width, info.height) == (SIZE, SIZE)
    assert info.fps == pytest.approx(FPS)
    decoded, fps = media.read_video(path)
    assert decoded.shape == (frames, SIZE, SIZE, 3)
    assert fps == pytest.approx(FPS)


def test_generate_video_writes_an_mp4_that_reads_back(tmp_path, capsys):
    out = tmp_path / "clip.mp4"
    code, stdout, err = _run(["generate", "a red ball", "--preset", "tiny-test", "--frames", "17", "-o", str(out),
                              "--seed", "3", "--quiet"], capsys)
    assert code == 0, err
    assert f"wrote {out} (17 frames, 96x96" in stdout
    assert "RANDOM weights" in err
    _check_video(out, 17)


def test_generate_image_writes_a_png(tmp_path, capsys):
    out = tmp_path / "still.png"
    code, stdout, err = _run(["generate", "a red ball", "--preset", "tiny-test", "--frames", "1", "-o", str(out),
                              "--quiet"], capsys)
    assert code == 0, err
    with Image.open(out) as img:
        assert img.format == "PNG" and img.size == (SIZE, SIZE)


# The 17-frame file is read back as exactly its 17 frames: no "using the first ..." / "only whole clips" warning.
@pytest.mark.filterwarnings("error:the conditioning video:UserWarning")
def test_generate_image_to_video_and_extension(tmp_path, capsys, short_model):
    first = tmp_path / "first.png"
    Image.fromarray(np.full((SIZE, SIZE, 3), (200, 40, 40), dtype=np.uint8)).save(first)
    i2v = tmp_path / "i2v.mp4"
    code, _, err = _run(["generate", "a red ball", "--model", str(short_model), "--image", str(first), "--frames",
                         "17", "-o", str(i2v), "--quiet"], capsys)
    assert code == 0, err
    _check_video(i2v, 17)
    # Extend the 17-frame video (2 whole clips) by one clip.
    ext = tmp_path / "ext.mp4"
    code, _, err = _run(["generate", "the ball keeps rolling", "--model", str(short_model), "--video", str(i2v),
                         "--frames", "25", "-o", str(ext), "--quiet"], capsys)
    assert code == 0, err
    _check_video(ext, 25)


def test_interactive_writes_an_mp4(tmp_path, capsys, short_model):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red ball on the floor\n\nthe ball rolls away\n", encoding="utf-8")
    out = tmp_path / "story.mp4"
    code, stdout, err = _run(["interactive", str(prompts), "--model", str(short_model), "-o", str(out),
                              "--save-segments", "--quiet"], capsys)
    assert code == 0, err
    assert "2 segments, 17 frames" in stdout  # segment 0 = 1 + 8 frames, then one 8-frame clip
    _check_video(out, 17)
    _check_video(tmp_path / "story_0000.mp4", 9)
    _check_video(tmp_path / "story_0001.mp4", 8)


@pytest.mark.parametrize(
    ("args", "output", "message"),
    [
        (["generate", "a red ball", "--frames", "10"], "x.mp4", "num_frames must be 1 (an image) or 1 + 4k, got 10"),
        (["generate", "a red ball", "--frames", "17"], "x.png", "must end in .mp4"),
        (["generate", "a red ball", "--frames", "1"], "x.mp4", "must end in .png"),
        (["generate", "", "--frames", "5"], "x.mp4", "prompt must be a non-empty string"),
        (["generate", "a red ball", "--guidance", "0.5"], "x.mp4", "guidance_scale must be >= 1"),
        (["generate", "a red ball", "--resolution", "720p"], "x.mp4", "resolution '720p' is not available"),
        (["generate", "a red ball", "--image", "missing.png"], "x.mp4", "--image missing.png: no such file"),
        (["generate", "a red ball", "--aspect", "banana"], "x.mp4", "banana"),
    ],
    ids=["frames-not-1+4k", "video-to-png", "image-to-mp4", "empty-prompt", "guidance-below-1",
         "resolution-not-in-preset", "missing-image", "bad-aspect"],
)
def test_generate_bad_input_exits_2_and_writes_nothing(tmp_path, capsys, monkeypatch, args, output, message):
    monkeypatch.chdir(tmp_path)
    code, stdout, err = _run([*args, "--preset", "tiny-test", "-o", output, "--quiet"], capsys)
    assert code == 2
    assert "infinitystar generate: error:" in err and message in err, err
    assert list(tmp_path.iterdir()) == []


def test_bad_model_folder_and_corrupt_image(tmp_path, capsys):
    out = tmp_path / "x.mp4"
    code, _, err = _run(["generate", "a red ball", "--model", str(tmp_path / "no_model"), "-o", str(out)], capsys)
    assert code == 2 and "no_model does not exist" in err
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not an image at all")
    code, _, err = _run(["generate", "a red ball", "--preset", "tiny-test", "--image", str(bad), "--frames", "5",
                         "-o", str(out), "--quiet"], capsys)
    assert code == 2 and "broken.png" in err
    assert not out.exists()


def test_interactive_bad_input(tmp_path, capsys):
    out = tmp_path / "story.mp4"
    code, _, err = _run(["interactive", str(tmp_path / "none.txt"), "-o", str(out)], capsys)
    assert code == 2 and "none.txt does not exist" in err
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n", encoding="utf-8")
    code, _, err = _run(["interactive", str(empty), "-o", str(out)], capsys)
    assert code == 2 and "holds no prompt" in err
    prompts = tmp_path / "p.txt"
    prompts.write_text("a\nb\n", encoding="utf-8")
    code, _, err = _run(["interactive", str(prompts), "-o", str(tmp_path / "story.gif"), "--preset", "tiny-test"],
                        capsys)
    assert code == 2 and "story.gif must end in .mp4" in err
    assert not out.exists() and not (tmp_path / "story.gif").exists()


def test_argparse_rejects_unknown_resolution(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["generate", "a red ball", "--resolution", "360p"])
    assert exc.value.code == 2
    assert "360p" in capsys.readouterr().err


def test_console_script_entry_point(tmp_path):
    """The installed ``infinitystar`` script runs ``generate`` end to end in a fresh process."""
    assert CONSOLE_SCRIPT.is_file(), f"console script {CONSOLE_SCRIPT} is not installed (pip install -e .)"
    out = tmp_path / "x.mp4"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([str(CONSOLE_SCRIPT), "generate", "a red ball", "--preset", "tiny-test", "--frames", "5",
                           "-o", str(out), "--quiet"], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    _check_video(out, 5)
    bad = subprocess.run([str(CONSOLE_SCRIPT), "generate", "a red ball", "--preset", "tiny-test", "--frames", "6",
                          "-o", str(tmp_path / "y.mp4"), "--quiet"], capture_output=True, text=True, env=env,
                         timeout=300)
    assert bad.returncode == 2 and "got 6" in bad.stderr
    assert not (tmp_path / "y.mp4").exists()


# ----------------------------------------------------------------------------------------------
# --version, seeds, names, run records, --from-json, --overwrite
# ----------------------------------------------------------------------------------------------

REPO = Path(__file__).resolve().parents[1]
DEMO_PROMPT = "a red circle moving left"


def _pyproject_version() -> str:
    import tomllib

    return tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]["version"]


def test_version_names_the_package_and_torch(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    out = capsys.readouterr().out.strip()
    assert out == f"infinitystar {_pyproject_version()} (torch {torch.__version__})"


def _wrote(stdout: str) -> tuple[Path, int]:
    """The output path and the seed of a ``wrote ...`` line."""
    m = re.search(r"^wrote (\S+) \(.*seed (\d+),", stdout, flags=re.M)
    assert m, stdout
    return Path(m.group(1)), int(m.group(2))


def test_without_seed_a_random_one_is_drawn_named_printed_and_recorded(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    seeds = []
    for _ in range(2):
        code, stdout, err = _run(["generate", DEMO_PROMPT, "--frames", "5", "--quiet"], capsys)
        assert code == 0, err
        out, seed = _wrote(stdout)
        assert 0 <= seed < 2**31
        assert out.parent == Path("outputs")
        assert re.fullmatch(rf"\d{{8}}-\d{{6}}_a-red-circle-moving-left_s{seed}\.mp4", out.name), out.name
        record = read_record(out)
        assert (record.seed, record.prompt, record.model, record.task) == (seed, DEMO_PROMPT, "infinitystar-demo",
                                                                           "text-to-video")
        assert f"run record {out.with_suffix('.json')}" in stdout
        seeds.append(seed)
    assert seeds[0] != seeds[1]  # drawn afresh (equal with probability 2**-31)


def test_seed_is_drawn_from_the_os_entropy_below_2_31(tmp_path, capsys, monkeypatch):
    calls = []
    import infinitystar.pipeline as pipeline_module  # the CLI draws through pipeline.draw_seed

    monkeypatch.setattr(pipeline_module.secrets, "randbelow", lambda n: calls.append(n) or 12345)
    out = tmp_path / "x.mp4"
    code, stdout, err = _run(["generate", DEMO_PROMPT, "--frames", "5", "-o", str(out), "--quiet"], capsys)
    assert code == 0, err
    assert calls == [2**31]
    assert _wrote(stdout) == (out, 12345) and read_record(out).seed == 12345


def test_existing_output_is_refused_before_the_model_loads(tmp_path, capsys, monkeypatch):
    out = tmp_path / "x.mp4"
    out.write_bytes(b"keep me")

    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded before the output check")

    monkeypatch.setattr(cli, "load_pipeline", no_load)
    code, _, err = _run(["generate", DEMO_PROMPT, "-o", str(out), "--quiet"], capsys)
    assert code == 2
    assert err.strip() == f"infinitystar generate: error: {out} already exists; pass --overwrite to replace it"
    assert out.read_bytes() == b"keep me"
    # The record beside it counts too, and interactive checks the same way.
    prompts = tmp_path / "p.txt"
    prompts.write_text("a\nb\n", encoding="utf-8")
    (tmp_path / "story.json").write_text("{}", encoding="utf-8")
    code, _, err = _run(["interactive", str(prompts), "-o", str(tmp_path / "story.mp4")], capsys)
    assert code == 2 and "story.json already exists; pass --overwrite" in err and err.count("\n") == 1


def test_overwrite_replaces_the_output(tmp_path, capsys):
    out = tmp_path / "x.mp4"
    out.write_bytes(b"old")
    code, stdout, err = _run(["generate", DEMO_PROMPT, "--frames", "5", "-o", str(out), "--seed", "4",
                              "--overwrite", "--quiet"], capsys)
    assert code == 0, err
    assert read_record(out).seed == 4
    _check_demo_video(out, 5)


def _check_demo_video(path: Path, frames: int) -> np.ndarray:
    decoded, _ = media.read_video(path)
    assert decoded.shape[0] == frames
    return decoded


def test_from_json_reproduces_the_run_frame_for_frame(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, stdout, err = _run(["generate", DEMO_PROMPT, "--frames", "9", "--guidance", "2", "--quiet"], capsys)
    assert code == 0, err
    first, seed = _wrote(stdout)
    # Same second, same prompt, same seed: the default name moves aside instead of failing or replacing.
    code, stdout, err = _run(["generate", "--from-json", str(first.with_suffix(".json")), "--quiet"], capsys)
    assert code == 0, err
    again, again_seed = _wrote(stdout)
    assert again != first and again_seed == seed
    assert np.array_equal(_check_demo_video(first, 9), _check_demo_video(again, 9))
    a, b = read_record(first).to_dict(), read_record(again).to_dict()
    a.pop("created"), b.pop("created")
    assert a == b and a["guidance_scale"] == 2.0
    # The mp4 alone is a run record too.
    third = tmp_path / "third.mp4"
    code, _, err = _run(["generate", "--from-json", str(first), "-o", str(third), "--quiet"], capsys)
    assert code == 0, err
    assert np.array_equal(_check_demo_video(first, 9), _check_demo_video(third, 9))


def test_from_json_options_given_override_the_file(tmp_path, capsys):
    run = tmp_path / "run.mp4"
    code, _, err = _run(["generate", DEMO_PROMPT, "--frames", "9", "--seed", "11", "-o", str(run), "--quiet"],
                        capsys)
    assert code == 0, err
    out = tmp_path / "changed.mp4"
    code, stdout, err = _run(["generate", "a blue square moving up", "--from-json", str(tmp_path / "run.json"),
                              "--seed", "12", "--frames", "5", "-o", str(out), "--quiet"], capsys)
    assert code == 0, err
    record = read_record(out)
    assert (record.prompt, record.seed, record.num_frames) == ("a blue square moving up", 12, 5)
    _check_demo_video(out, 5)
    # --seconds replaces the recorded frame count too (they are one choice).
    out2 = tmp_path / "seconds.mp4"
    code, _, err = _run(["generate", "--from-json", str(tmp_path / "run.json"), "--seconds", "0.25", "-o", str(out2),
                         "--quiet"], capsys)
    assert code == 0, err
    assert read_record(out2).num_frames == 5 and read_record(out2).seed == 11


def test_from_json_of_a_random_weights_run_reproduces_it(tmp_path, capsys):
    run = tmp_path / "r.mp4"
    code, _, err = _run(["generate", "a red ball", "--preset", "tiny-test", "--frames", "5", "-o", str(run),
                         "--quiet"], capsys)
    assert code == 0, err
    assert read_record(run).model == "random:tiny-test"
    again = tmp_path / "again.mp4"
    code, _, err = _run(["generate", "--from-json", str(tmp_path / "r.json"), "-o", str(again), "--quiet"], capsys)
    assert code == 0, err
    assert np.array_equal(media.read_video(run)[0], media.read_video(again)[0])


def test_interactive_records_its_prompts_and_reproduces(tmp_path, capsys, short_model):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red ball on the floor\nthe ball rolls away\n", encoding="utf-8")
    out = tmp_path / "story.mp4"
    code, stdout, err = _run(["interactive", str(prompts), "--model", str(short_model), "-o", str(out), "--quiet"],
                             capsys)
    assert code == 0, err
    _, seed = _wrote(stdout)
    record = read_record(out)
    assert record.task == "interactive" and record.seed == seed and record.model == str(short_model)
    assert record.prompts == ("a red ball on the floor", "the ball rolls away")
    again = tmp_path / "again.mp4"
    code, _, err = _run(["interactive", "--from-json", str(tmp_path / "story.json"), "-o", str(again), "--quiet"],
                        capsys)
    assert code == 0, err
    assert np.array_equal(media.read_video(out)[0], media.read_video(again)[0])
    # generate cannot redo an interactive run; it says which command can, in one line.
    code, _, err = _run(["generate", "--from-json", str(tmp_path / "story.json")], capsys)
    assert code == 2 and err.count("\n") == 1
    assert "records a interactive run: run it again with infinitystar interactive --from-json" in err


def test_from_json_and_prompt_errors_are_one_line(tmp_path, capsys):
    code, _, err = _run(["generate"], capsys)
    assert code == 2 and "no PROMPT given (or --from-json RUN.json" in err and err.count("\n") == 1
    code, _, err = _run(["generate", "--from-json", str(tmp_path / "none.json")], capsys)
    assert code == 2 and "none.json" in err and err.count("\n") == 1
    bad = tmp_path / "bad.json"
    bad.write_text('{"prompt": "x", "seed": 1, "sampler": "ddim"}', encoding="utf-8")
    code, _, err = _run(["generate", "--from-json", str(bad)], capsys)
    assert code == 2 and "unknown keys 'sampler'" in err and err.count("\n") == 1


def test_writing_a_video_shows_a_progress_bar(tmp_path, capsys):
    out = tmp_path / "x.mp4"
    code, _, err = _run(["generate", DEMO_PROMPT, "--frames", "9", "-o", str(out)], capsys)
    assert code == 0, err
    assert re.search(r"write: 100%\|.*\| 9/9", err), err

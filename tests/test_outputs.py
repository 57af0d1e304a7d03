"""outputs.py: the run record, its names, and the files that carry it (png text chunk, mp4 tag, .json beside).

The record inside a file is checked with Pillow and PyAV directly, not only through :func:`read_record`, so a
writer and a reader that agree on a wrong place would still fail here.
"""

from __future__ import annotations

import json
from pathlib import Path

import av
import numpy as np
import pytest
from PIL import Image

from infinitystar import __version__
from infinitystar.outputs import (
    RunRecord,
    default_output_name,
    read_record,
    record_path,
    save_output_with_record,
)


def _record(**changes) -> RunRecord:
    fields = dict(prompt="A red circle, moving LEFT!", seed=42, task="text-to-video", num_frames=5, fps=16,
                  height=32, width=48, model="infinitystar-demo", created="2025-03-04T05:06:07+01:00")
    return RunRecord(**{**fields, **changes})


def _frames(n: int) -> np.ndarray:
    return np.broadcast_to((np.arange(n) * 20).astype(np.uint8)[:, None, None, None], (n, 32, 48, 3)).copy()


# ----------------------------------------------------------------------------------------------
# the record
# ----------------------------------------------------------------------------------------------


def test_record_round_trips_through_json():
    r = _record(negative_prompt="blurry", guidance_scale=3.0, aspect="1:1", input_image="first.png")
    d = json.loads(json.dumps(r.to_dict()))
    assert RunRecord.from_dict(d) == r
    assert d["seed"] == 42 and d["prompt"] == "A red circle, moving LEFT!" and d["version"] == __version__


def test_interactive_record_keeps_its_prompts_as_a_list_in_json():
    r = _record(task="interactive", prompts=["a cat wakes up", "the cat runs"])
    assert r.prompts == ("a cat wakes up", "the cat runs")  # stored hashable
    d = r.to_dict()
    assert d["prompts"] == ["a cat wakes up", "the cat runs"]
    assert RunRecord.from_dict(json.loads(json.dumps(d))) == r
    with pytest.raises(ValueError, match="interactive run needs its prompts"):
        _record(task="interactive")


@pytest.mark.parametrize(("change", "message"), [
    ({"colour": "red"}, "unknown keys 'colour'"),
    ({"seed": "42"}, "seed must be int, got '42'"),
    ({"seed": True}, "seed must be int"),
    ({"task": "painting"}, "task 'painting' is not one of"),
    ({"num_frames": 0}, "num_frames must be >= 1"),
    ({"guidance_scale": "high"}, "guidance_scale must be"),
    ({"prompts": ["a", 3]}, "prompts must be a list of strings"),
    ({"created": "yesterday"}, "created 'yesterday' is not an ISO time"),
], ids=["unknown-key", "seed-text", "seed-bool", "task", "frames", "guidance", "prompts", "created"])
def test_from_dict_rejects_bad_records_in_one_line(change, message):
    d = {**_record().to_dict(), **change}
    with pytest.raises(ValueError, match=message) as exc:
        RunRecord.from_dict(d)
    assert "\n" not in str(exc.value)


def test_from_dict_names_missing_keys():
    d = _record().to_dict()
    del d["seed"], d["model"]
    with pytest.raises(ValueError, match="missing keys 'model', 'seed'"):
        RunRecord.from_dict(d)


# ----------------------------------------------------------------------------------------------
# names
# ----------------------------------------------------------------------------------------------


def test_default_output_name_time_slug_seed():
    assert default_output_name(_record(), "mp4") == "20250304-050607_a-red-circle-moving-left_s42.mp4"
    assert default_output_name(_record(), ".png") == "20250304-050607_a-red-circle-moving-left_s42.png"


def test_default_output_name_cuts_long_prompts_at_a_word_and_folds_accents():
    long = _record(prompt="a very long prompt about a corgi surfing a giant wave at sunset in hawaii")
    slug = default_output_name(long, "mp4").split("_")[1]
    assert slug == "a-very-long-prompt-about-a-corgi-surfing"  # 40 characters, whole words
    assert len(slug) <= 40
    assert default_output_name(_record(prompt="Café crème"), "mp4").split("_")[1] == "cafe-creme"
    assert default_output_name(_record(prompt="小猫"), "mp4").split("_")[1] == "untitled"
    assert default_output_name(_record(prompt="x" * 60), "mp4").split("_")[1] == "x" * 40


def test_two_runs_differ_in_name_by_seed_or_time():
    names = {default_output_name(_record(seed=s, created=c), "mp4")
             for s in (1, 2) for c in ("2025-03-04T05:06:07", "2025-03-04T05:06:08")}
    assert len(names) == 4


# ----------------------------------------------------------------------------------------------
# files
# ----------------------------------------------------------------------------------------------


def test_mp4_carries_its_record_in_the_comment_tag_and_beside_it(tmp_path):
    r = _record()
    out = save_output_with_record(_frames(5), tmp_path / "run.mp4", r, fps=16)
    assert out == tmp_path / "run.mp4"
    with av.open(str(out)) as container:
        assert json.loads(container.metadata["comment"]) == r.to_dict()
    assert json.loads((tmp_path / "run.json").read_text(encoding="utf-8")) == r.to_dict()
    assert read_record(out) == r and read_record(tmp_path / "run.json") == r
    (tmp_path / "run.json").unlink()
    assert read_record(out) == r  # from the file alone


def test_png_carries_its_record_in_a_text_chunk(tmp_path):
    r = _record(task="text-to-image", num_frames=1, prompt="a lighthouse — at dawn")
    out = save_output_with_record(_frames(1), tmp_path / "still.png", r, fps=16)
    with Image.open(out) as img:
        assert json.loads(img.text["infinitystar"]) == r.to_dict()
    record_path(out).unlink()
    assert read_record(out) == r


def test_existing_outputs_are_refused_unless_overwrite(tmp_path):
    out = tmp_path / "run.mp4"
    out.write_bytes(b"old video")
    with pytest.raises(FileExistsError, match=f"{out} already exists"):
        save_output_with_record(_frames(5), out, _record(), fps=16)
    assert out.read_bytes() == b"old video" and not (tmp_path / "run.json").exists()
    # A record of that name alone is refused too (it would be replaced).
    other = tmp_path / "other.png"
    record_path(other).write_text("{}", encoding="utf-8")
    with pytest.raises(FileExistsError, match="other.json already exists"):
        save_output_with_record(_frames(1), other, _record(task="text-to-image", num_frames=1), fps=16)
    assert not other.exists()
    save_output_with_record(_frames(5), out, _record(), fps=16, overwrite=True)
    assert read_record(out) == _record()


def test_progress_reports_the_write(tmp_path):
    events: list[tuple[int, int]] = []
    save_output_with_record(_frames(7), tmp_path / "v.mp4", _record(), fps=16, progress=lambda *e: events.append(e))
    assert events[0] == (0, 7) and events[-1] == (7, 7)
    assert [d for d, _ in events] == sorted(d for d, _ in events) and {t for _, t in events} == {7}
    events.clear()
    save_output_with_record(_frames(1), tmp_path / "i.png", _record(), fps=16, progress=lambda *e: events.append(e))
    assert events == [(0, 1), (1, 1)]


def test_a_stopped_write_leaves_nothing(tmp_path):
    def stop(done: int, total: int) -> None:
        if done == 3:
            raise InterruptedError("stopped")

    with pytest.raises(InterruptedError):
        save_output_with_record(_frames(7), tmp_path / "v.mp4", _record(), fps=16, progress=stop)
    assert list(tmp_path.iterdir()) == []


def test_unsupported_suffix(tmp_path):
    with pytest.raises(ValueError, match=r"use \.png or \.mp4"):
        save_output_with_record(_frames(3), tmp_path / "v.gif", _record(), fps=16)


def test_read_record_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.mp4"):
        read_record(tmp_path / "nope.mp4")
    plain = tmp_path / "plain.png"
    Image.fromarray(_frames(1)[0]).save(plain)
    with pytest.raises(ValueError, match="holds no infinitystar run record"):
        read_record(plain)
    broken = tmp_path / "broken.json"
    broken.write_text("{not json", encoding="utf-8")
    with pytest.raises(ValueError, match="broken.json: not a run record"):
        read_record(broken)
    wrong = tmp_path / "wrong.json"
    wrong.write_text(json.dumps({**_record().to_dict(), "steps": 3}), encoding="utf-8")
    with pytest.raises(ValueError, match="wrong.json: run record: unknown keys 'steps'"):
        read_record(wrong)


def test_record_path_is_the_stem_json():
    assert record_path(Path("out/a.b.mp4")) == Path("out/a.b.json")

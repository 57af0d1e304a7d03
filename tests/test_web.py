"""The web page's handlers called directly (no server, no browser): checks, messages, results, queue, Stop."""

import dataclasses
import re
import threading
import time

import numpy as np
import pytest

from infinitystar import media, outputs
from infinitystar.pipeline import InfinityStarPipeline, InfinityStarPipelineOutput, ProgressEvent
from infinitystar.web import (
    IMAGE_TO_VIDEO,
    INTERACTIVE,
    MODES,
    TEXT_TO_IMAGE,
    TEXT_TO_VIDEO,
    VIDEO_EXTENSION,
    ProgressTracker,
    WebApp,
    WebRequest,
    scrub_paths,
    size_label,
)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def pipe():
    return InfinityStarPipeline.from_preset("tiny-test")


@pytest.fixture(scope="module")
def demo_pipe():
    from infinitystar.demo import load_pipeline

    return load_pipeline(None, None)


@pytest.fixture
def app(pipe, tmp_path):
    return WebApp(pipe, tmp_path / "out")


def last(app: WebApp, req: WebRequest, **kw):
    updates = list(app.generate(req, **kw))
    assert updates, "generate yielded nothing"
    return updates[-1], updates


def short(**kw) -> WebRequest:
    """The cheapest video request: the shortest length the page offers (1 + 4 frames)."""
    kw.setdefault("seconds", 0.25)
    kw.setdefault("seed", 1)
    return WebRequest(**kw)


def test_text_to_video_gives_an_mp4_with_progress_and_clips(app):
    end, updates = last(app, short(prompt="a red circle moving right"))
    assert end.error is None, end.status
    info = media.probe_video(end.result)
    frames, _ = media.read_video(end.result)
    assert len(frames) == 5 and (info.width, info.height) == (96, 96)
    fractions = [u.progress for u in updates if u.progress is not None]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0 and 0 < fractions[-2] < 1
    # The first frame and the one video clip, each shown as soon as it is decoded, before the result.
    assert len(end.clips) == 2 and end.clips[0].endswith(".png") and end.clips[1].endswith(".mp4")
    assert any(u.clips and u.result is None for u in updates)
    assert "seed 1" in end.status and end.seed == 1


def test_every_stage_shows_in_the_progress(app):
    _, updates = last(app, short(prompt="a red circle moving right"))
    statuses = [u.status for u in updates]
    for words in ("reading the prompt", "scale step 1 of", "decoding, part 1 of", "saving the file"):
        assert any(words in s for s in statuses), (words, statuses)
    # In the pipeline's order: prompt, scale steps, decode, write.
    first = [next(i for i, s in enumerate(statuses) if w in s)
             for w in ("reading the prompt", "scale step", "decoding", "saving the file")]
    assert first == sorted(first)


def test_the_download_is_named_like_the_cli_and_carries_the_run_record(app):
    end, _ = last(app, short(prompt="A Red circle, moving right!", seed=7))
    path, record_file = end.files
    assert path == end.result and record_file.endswith(".json")
    record = outputs.read_record(record_file)
    assert re.fullmatch(r"\d{8}-\d{6}_a-red-circle-moving-right_s7\.mp4", path.rsplit("/", 1)[-1])
    assert path.rsplit("/", 1)[-1] == outputs.default_output_name(record, "mp4")
    assert (record.prompt, record.seed, record.task, record.num_frames, record.height, record.width) == (
        "A Red circle, moving right!", 7, "text-to-video", 5, 96, 96)
    assert record.model == "random:tiny-test"  # WebApp's default for a pipeline made from a preset
    assert outputs.read_record(path) == record  # also inside the mp4 itself


def test_text_to_image_gives_a_png_with_its_record(app):
    end, _ = last(app, WebRequest(prompt="a blue square", mode=TEXT_TO_IMAGE, seed=2))
    assert end.error is None and end.is_image
    assert media.read_image(end.result).size == (96, 96)
    assert end.result.endswith("_a-blue-square_s2.png")
    assert outputs.read_record(end.result).task == "text-to-image"


def test_an_empty_seed_lets_the_pipeline_draw_one_and_the_page_reports_it(app, monkeypatch):
    calls = []

    def spy(self, *args, **kwargs):  # records what the page asks for; no model run needed for that
        calls.append(kwargs)
        seed = 4242 if kwargs["seed"] is None else kwargs["seed"]
        return InfinityStarPipelineOutput(frames=np.zeros((kwargs["num_frames"], 96, 96, 3), np.uint8), fps=16,
                                          seed=seed, seeds=[seed])

    monkeypatch.setattr(type(app.pipe), "__call__", spy)
    end, _ = last(app, short(prompt="a green star", seed=5))
    assert calls[-1]["seed"] == 5 and "seed 5." in end.status and end.seed == 5
    for empty in (None, "", "  "):
        end, updates = last(app, short(prompt="a green star", seed=empty))
        assert calls[-1]["seed"] is None  # the pipeline draws it ...
        assert end.error is None and end.seed == 4242 and "seed 4242." in end.status  # ... and the page shows it
        assert "random seed" in updates[0].status
        assert outputs.read_record(end.files[1]).seed == 4242
    end, _ = last(app, short(prompt="a green star", seed="17"))  # the page's box sends text
    assert calls[-1]["seed"] == 17


def test_image_to_video_and_video_extension(app, tmp_path):
    first = tmp_path / "first.png"
    media.write_image(np.full((40, 60, 3), 200, np.uint8), first)
    end, _ = last(app, short(prompt="it moves", mode=IMAGE_TO_VIDEO, image=str(first)))
    assert end.error is None, end.status
    assert len(media.read_video(end.result)[0]) == 5
    assert outputs.read_record(end.result).input_image == "first.png"  # the name, not the server's path
    src = tmp_path / "src.mp4"
    media.write_video(np.full((5, 96, 96, 3), 90, np.uint8), src, fps=16)
    end, _ = last(app, short(prompt="it goes on", mode=VIDEO_EXTENSION, video=str(src), seconds=0.5))
    assert end.error is None, end.status
    assert len(media.read_video(end.result)[0]) == 9
    assert outputs.read_record(end.result).task == "video-extension"


@pytest.mark.parametrize(
    ("req", "words"),
    [
        (WebRequest(prompt="   "), "prompt is empty"),
        (WebRequest(prompt="x", aspect="3:1"), "supported aspects"),
        (WebRequest(prompt="x", seconds=0), "more than 0 seconds"),
        (WebRequest(prompt="x", seconds=1000), "more than this page allows"),
        (WebRequest(prompt="x", seed=-3), "seed must be between"),
        (WebRequest(prompt="x", seed=1.5), "whole number"),
        (WebRequest(prompt="x", seed="abc"), "whole number"),
        (WebRequest(prompt="x", guidance=0.5), "guidance_scale must be >= 1"),
        (WebRequest(prompt="x", mode=IMAGE_TO_VIDEO), "needs an image"),
        (WebRequest(prompt="x", mode=VIDEO_EXTENSION), "needs a video"),
        (WebRequest(prompt="x", mode="Sketch to video"), "unknown mode"),
    ],
    ids=["empty-prompt", "bad-aspect", "zero-length", "too-long", "negative-seed", "fractional-seed", "text-seed",
         "guidance", "i2v-no-image", "extension-no-video", "mode"],
)
def test_bad_input_is_a_message(app, req, words):
    end, updates = last(app, req)
    assert len(updates) == 1 and end.result is None
    assert words in end.error and end.status.startswith("Error: ")
    assert "Traceback" not in end.status


def test_uploads_that_are_not_media_are_messages_without_server_paths(app, tmp_path):
    uploads = tmp_path / "gradio" / "4f2a9c"  # where Gradio would keep an upload
    uploads.mkdir(parents=True)
    fake_png = uploads / "photo.png"
    fake_png.write_bytes(b"this is not a picture")
    text = uploads / "notes.txt"
    text.write_text("hello")
    fake_mp4 = uploads / "clip.mp4"
    fake_mp4.write_bytes(b"\x00" * 300)
    for req, words in [
        (short(prompt="x", mode=IMAGE_TO_VIDEO, image=str(fake_png)), "photo.png"),
        (short(prompt="x", mode=IMAGE_TO_VIDEO, image=str(text)), ".txt"),
        (short(prompt="x", mode=VIDEO_EXTENSION, video=str(fake_mp4)), "clip.mp4"),
        (short(prompt="x", mode=VIDEO_EXTENSION, video=str(uploads / "gone.mp4")), "gone.mp4"),
    ]:
        end, _ = last(app, req)
        assert end.result is None and words in end.error
        assert str(tmp_path) not in end.error and str(tmp_path) not in end.status
        assert "4f2a9c" not in end.error  # not even the folder's name
    _, message = app.preview_image(str(fake_png))
    assert "photo.png" in message and str(tmp_path) not in message
    end, _ = last(app, short(prompt="after the bad uploads"))
    assert end.error is None and media.probe_video(end.result).width == 96


def test_scrub_paths_keeps_file_names_only():
    msg = ("cannot read image /tmp/gradio/ab12/my photo.png: (cannot identify image file '/tmp/gradio/ab12/my "
           "photo.png'); model C:\\models\\star\\vae.pth; w/h and/or 16:9 stay")
    out = scrub_paths(msg, "/tmp/gradio/ab12/my photo.png")
    assert out == ("cannot read image my photo.png: (cannot identify image file 'my photo.png'); model vae.pth; "
                   "w/h and/or 16:9 stay")


def test_a_failing_pipeline_is_a_message_and_the_server_goes_on(app, monkeypatch):
    real = type(app.pipe).__call__

    def broken(self, *args, **kwargs):
        raise RuntimeError(f"out of memory (simulated) writing {app.output_dir}/x/cache.bin")

    monkeypatch.setattr(type(app.pipe), "__call__", broken)
    end, _ = last(app, short(prompt="x"))
    assert end.result is None and "RuntimeError" in end.error and "simulated" in end.error
    assert str(app.output_dir) not in end.error and "cache.bin" in end.error
    monkeypatch.setattr(type(app.pipe), "__call__", real)
    end, _ = last(app, short(prompt="x"))
    assert end.error is None and end.result


class GatedPipe:
    """``pipe`` whose first scale step waits for :attr:`gate`: what the page sees does not hang on thread timing."""

    def __init__(self, pipe):
        self._pipe = pipe
        self.gate = threading.Event()

    def __getattr__(self, name):
        return getattr(self._pipe, name)

    def __call__(self, *args, progress=None, **kwargs):
        def gated(event: ProgressEvent) -> None:
            progress(event)
            if event.stage == "generate" and event.done == 1:
                assert self.gate.wait(timeout=60), "the test never opened the gate"

        return self._pipe(*args, progress=gated, **kwargs)


def test_stop_between_scale_steps_then_the_next_request_runs(pipe, tmp_path):
    gated = GatedPipe(pipe)
    app = WebApp(gated, tmp_path / "out")
    seen = []
    for up in app.generate(short(prompt="stop me", seconds=1.0), session="alice"):
        seen.append(up)
        if "scale step 1 of" in up.status:
            assert app.cancel("alice") == 1
            gated.gate.set()  # the worker, held after step 1, goes on only now that Stop was pressed
            # The worker ends by itself at its next step, whether or not anyone reads the updates.
            assert app.wait_stopped("alice", timeout=60)
    end = seen[-1]
    assert end.result is None and end.status == "Stopped."
    # Stopped at the first step it checked after Stop: no step after the first one was reported.
    steps = [u.status for u in seen if re.search(r"scale step \d+ of", u.status)]
    assert len(steps) == 1, steps
    assert app.cancel("alice") == 0  # nothing left registered
    end, _ = last(app, short(prompt="after a stop"))
    assert end.error is None and end.result


def slow_decode(monkeypatch, pipe, seconds: float) -> list[int]:
    """Make each VAE decoder chunk of ``pipe`` take ``seconds`` longer; returns the chunks decoded, as reported."""
    chunks: list[int] = []
    real = pipe.vae.decode

    def decode(*args, on_chunk=None, **kwargs):
        def chunk(done: int, total: int) -> None:
            if done:
                time.sleep(seconds)
                chunks.append(done)
            if on_chunk is not None:
                on_chunk(done, total)

        return real(*args, on_chunk=chunk, **kwargs)

    monkeypatch.setattr(pipe.vae, "decode", decode)
    return chunks


def test_stop_during_the_decode_stops_it(pipe, tmp_path, monkeypatch):
    app = WebApp(pipe, tmp_path)
    chunks = slow_decode(monkeypatch, pipe, 0.3)
    seen = []
    t0 = time.perf_counter()
    for up in app.generate(short(prompt="stop the decode", seconds=2.0), session="carol"):
        seen.append(up)
        if "decoding, part 1 of" in up.status:
            total = int(re.search(r"part 1 of (\d+)", up.status).group(1))
            assert app.cancel("carol") == 1
            assert app.wait_stopped("carol", timeout=60)
    assert seen[-1].status == "Stopped." and seen[-1].result is None
    assert total > 2 and max(chunks) < total  # the decode did not run to its end
    assert time.perf_counter() - t0 < 0.3 * total + 30
    assert not any(p.suffix == ".mp4" and not p.name.startswith("clip") for p in tmp_path.rglob("*"))


def test_the_progress_callable_stops_the_pipeline_wherever_it_is(app, monkeypatch):
    """With a stand-in pipeline that reports a long decode: Stop after its first decode event ends the run."""
    reported = []

    def fake(self, *args, progress=None, **kwargs):
        for stage, total in (("encode_prompt", 1), ("generate", 3), ("decode", 50)):
            for done in range(1, total + 1):
                progress(ProgressEvent(stage, done, total))
                reported.append((stage, done))
                time.sleep(0.01)
        return InfinityStarPipelineOutput(frames=np.zeros((5, 96, 96, 3), np.uint8), fps=16, seed=1, seeds=[1])

    monkeypatch.setattr(type(app.pipe), "__call__", fake)
    seen = []
    for up in app.generate(short(prompt="x"), session="dave"):
        seen.append(up)
        if "decoding, part 2 of 50" in up.status:
            app.cancel("dave")
    assert seen[-1].status == "Stopped."
    assert ("decode", 50) not in reported and ("decode", 2) in reported


def test_progress_tracker_is_monotone_and_ends_below_one():
    tracker = ProgressTracker(segments=2)
    fracs = []
    for segment in (1, 2):
        for stage, total in (("encode_prompt", 1), ("generate", 4), ("decode", 2)):
            for done in range(total + 1):  # each stage starts with done=0
                words, frac = tracker.update(ProgressEvent(stage, done, total, clip=segment))
                fracs.append(frac)
        if segment == 1:
            assert words == "segment 1 of 2, decoding, part 2 of 2" and 0.45 < frac < 0.5
    assert words.startswith("segment 2 of 2")
    words, frac = tracker.update(ProgressEvent("write", 1, 1))
    fracs.append(frac)
    assert words == "saving the file"
    assert fracs == sorted(fracs) and fracs[0] == 0 and 0.97 < fracs[-1] < 1.0
    one = ProgressTracker()
    assert one.update(ProgressEvent("generate", 0, 8, clip=1)) == ("starting the scale steps", 0.05 * 0.97)
    words, frac = one.update(ProgressEvent("generate", 4, 8, clip=2))  # a call's clip is not a segment
    assert words == "scale step 4 of 8" and frac == pytest.approx(0.97 * 0.45)


def test_closing_the_handler_stops_the_worker(app):
    gen = app.generate(short(prompt="closed tab", seconds=1.0), session="bob")
    for up in gen:
        if "scale step" in up.status:
            break
    gen.close()  # what the page's Stop (cancels=) and a closed tab do to the running handler
    end, _ = last(app, short(prompt="next"))  # takes the lock: the closed run's worker has let go of it
    assert end.error is None and end.result


def test_two_requests_at_once_both_get_their_results(app):
    results: dict[str, object] = {}

    def run(name: str, seed: int) -> None:
        results[name] = list(app.generate(short(prompt="the same prompt", seed=seed), session=name))[-1]

    threads = [threading.Thread(target=run, args=(n, s)) for n, s in (("a", 1), ("b", 2))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert set(results) == {"a", "b"}
    assert all(r.error is None for r in results.values()), [r.status for r in results.values()]
    assert results["a"].result != results["b"].result


def test_the_same_request_twice_in_one_second_keeps_both_results(app):
    a, _ = last(app, short(prompt="twice", seed=3))
    b, _ = last(app, short(prompt="twice", seed=3))
    assert a.error is None and b.error is None, (a.status, b.status)
    assert a.result != b.result and media.probe_video(a.result).width == 96


def test_interactive_joins_one_clip_per_prompt(pipe, tmp_path):
    # The tiny preset's segments are 20 latent frames (80 frames); a 2-frame clip keeps this test fast.
    from infinitystar.config import replace

    small = InfinityStarPipeline(pipe.transformer, pipe.vae, pipe.text_encoder,
                                 replace(pipe.config, frames_inner_clip=2, interactive=True))
    app = WebApp(small, tmp_path)
    assert INTERACTIVE in app.modes()
    end, updates = last(app, WebRequest(prompt="a cat wakes up", mode=INTERACTIVE, segments="\nthe cat runs\n",
                                        seed=3))
    assert end.error is None, end.status
    assert len(end.clips) == 2 and "2 segment(s)" in end.status
    frames, _ = media.read_video(end.result)
    assert len(frames) == 1 + 2 * 4 + 2 * 4  # segment 0 (first frame + one clip) + one clip
    assert [u.progress for u in updates if u.progress is not None][-1] == 1.0
    assert any("segment 2 of 2" in u.status for u in updates)
    record = outputs.read_record(end.result)
    assert record.task == "interactive" and record.prompts == ("a cat wakes up", "the cat runs")
    # With a video: the video is segment 0, the prompt continues it, then one segment per further line.
    src = tmp_path / "story.mp4"
    media.write_video(np.full((9, 96, 96, 3), 120, np.uint8), src, fps=16)
    end, _ = last(app, WebRequest(prompt="the cat sits", mode=INTERACTIVE, segments="the cat runs", seed=3,
                                  video=str(src)))
    assert end.error is None, end.status
    assert len(end.clips) == 3 and "3 segment(s) (the video first)" in end.status
    assert len(media.read_video(end.result)[0]) == 9 + 2 * 8


def test_modes_the_model_cannot_do_are_not_offered(app):
    caps = app.capabilities
    app.capabilities = dataclasses.replace(caps, tasks=tuple(t for t in caps.tasks if t != "interactive"))
    assert INTERACTIVE not in app.modes() and TEXT_TO_VIDEO in app.modes()
    end, _ = last(app, WebRequest(prompt="a", mode=INTERACTIVE))
    assert "cannot do interactive story" in end.error
    app.capabilities = dataclasses.replace(caps, tasks=("text-to-image",))
    assert app.modes() == [TEXT_TO_IMAGE] and app.default_mode() == TEXT_TO_IMAGE


def test_options_follow_the_model_in_plain_words(app):
    assert app.size_choices() == [("Square, 96x96", "1:1")]
    assert size_label("16:9", 720, 1280) == "Wide (16:9), 1280x720"
    assert size_label("9:16", 1280, 720) == "Tall (9:16), 720x1280"
    assert app.seconds_step == 0.25 and app.num_frames(0.25) == 5 and app.num_frames(1) == 17
    assert app.num_frames(0.3) == 5  # rounded to a length the VAE can make (1 + 4k frames)
    text = app.describe_model()
    assert "tiny-test" in text and "square, 96x96" in text and "pixels" not in text and "M " not in text
    assert app.display_scale() == 2  # 96 px shown at 192 px
    for mode in MODES:
        assert app.mode_hint(mode).endswith(".") and len(app.mode_hint(mode)) < 200
    assert WebApp.length_label(TEXT_TO_IMAGE) is None
    assert "seconds" in WebApp.length_label(TEXT_TO_VIDEO)
    assert "your video included" in WebApp.length_label(VIDEO_EXTENSION)


def test_a_closed_vocabulary_gets_its_words_and_held_out_examples(demo_pipe, tmp_path):
    from infinitystar.demo.evaluate import parse_prompt
    from infinitystar.demo.synthetic import HELD_OUT, TRAIN_TRIPLES

    app = WebApp(demo_pipe, tmp_path)
    hint = app.vocabulary_hint()
    for word in ("red", "magenta", "triangle", "circle", "left", "down"):
        assert word in hint
    groups = dict(app.examples())
    seen, new = groups["Examples"], groups["Combinations it never saw in training"]
    assert seen and new
    assert all(parse_prompt(p) in TRAIN_TRIPLES for p in seen)
    assert all(parse_prompt(p) in HELD_OUT for p in new)
    assert app.display_scale() == 4 and app.size_choices() == [("Square, 64x64", "1:1")]
    assert app.unknown_words(WebRequest(prompt="a purple circle moving right")) == ["purple"]
    _, updates = last(app, WebRequest(prompt="a purple circle moving right", seed="x"))
    assert updates[0].notice is None  # a bad request is an error first
    gen = app.generate(WebRequest(prompt="a purple circle moving right", seconds=0.25))
    first = next(gen)
    gen.close()
    assert "purple" in first.notice


def test_an_open_vocabulary_gets_no_word_list(app):
    if app.capabilities.vocabulary is not None:
        pytest.skip("the tiny preset's encoder has a closed vocabulary")
    assert app.vocabulary_hint() is None and app.examples()[0][0] == "Examples"


def test_page_builds_with_every_widget(app):
    gr = pytest.importorskip("gradio")
    from infinitystar.web import build_blocks, page_css

    blocks = build_blocks(app)
    assert isinstance(blocks, gr.Blocks)
    by_id = {getattr(b, "elem_id", None): b for b in blocks.blocks.values()}
    for wanted in ("prompt", "negative", "mode", "mode-hint", "image", "image-preview", "video", "segments",
                   "seconds", "aspect", "seed", "guidance", "advanced", "generate", "stop", "status", "seed-used",
                   "result-video", "result-image", "download", "clips"):
        assert wanted in by_id
    assert by_id["advanced"].open is False  # negative prompt, seed and guidance are folded away
    assert by_id["seed"].value in ("", None)  # empty: a random seed
    assert by_id["result-video"].autoplay and by_id["result-video"].loop
    assert list(by_id["mode"].choices) == [(m, m) for m in app.modes()]
    assert "image-rendering: pixelated" in page_css(app) and "zoom: 2" in page_css(app)


def test_cli_serve_binds_to_localhost_by_default():
    from infinitystar.cli import build_parser

    args = build_parser().parse_args(["serve"])
    assert (args.host, args.port, args.model) == ("127.0.0.1", 7860, None)
    args = build_parser().parse_args(["serve", "--host", "0.0.0.0", "--port", "8000", "--model", "m"])
    assert (args.host, args.port, args.model) == ("0.0.0.0", 8000, "m")
def test_serve_command_answers_on_localhost_and_stops_on_ctrl_c(tmp_path):
    pytest.importorskip("gradio")
    import signal
    import socket
    import subprocess
    import sys
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "infinitystar.cli", "serve", "--preset", "tiny-test", "--port", str(port),
           "--output-dir", str(tmp_path)]
    # Started with SIGINT ignored, as a script's background job is (the disposition is inherited): serve must
    # still stop on Ctrl+C (before the fix it hung here whenever an earlier test had left SIGINT ignored).
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    watchdog = threading.Timer(120, proc.kill)  # a server that never comes up ends the read loop below
    watchdog.start()
    try:
        lines = []
        for line in proc.stderr:
            lines.append(line)
            if "Ctrl+C stops it" in line:
                break
        assert f"page on http://127.0.0.1:{port}/" in "".join(lines), "".join(lines)
        assert "RANDOM weights" in "".join(lines)
        page = urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=10).read().decode()
        assert "<html" in page.lower()
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 0
        assert "Traceback" not in proc.stderr.read()
    finally:
        watchdog.cancel()
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)


def test_the_page_says_when_the_weights_are_random(pipe, tmp_path):
    from infinitystar.web import weights_note

    assert "Random weights" in weights_note(None, "tiny-test")
    assert weights_note("/models/InfinityStar", None) == ""
    app = WebApp(pipe, tmp_path, note=weights_note(None, "tiny-test"))
    assert "Random weights" in app.describe_model()

"""The web page's handlers called directly (no server, no browser): checks, messages, results, queue, Stop."""

import threading

import numpy as np
import pytest

from infinitystar import media
from infinitystar.pipeline import InfinityStarPipeline, InfinityStarPipelineOutput
from infinitystar.web import (
    IMAGE_TO_VIDEO,
    INTERACTIVE,
    TEXT_TO_IMAGE,
    VIDEO_EXTENSION,
    WebApp,
    WebRequest,
)


@pytest.fixture(scope="module")
def pipe():
    return InfinityStarPipeline.from_preset("tiny-test")


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
    assert "seed 1" in end.status


def test_text_to_image_gives_a_png(app):
    end, _ = last(app, WebRequest(prompt="a blue square", mode=TEXT_TO_IMAGE, seed=2))
    assert end.error is None and end.is_image
    img = media.read_image(end.result)
    assert img.size == (96, 96)


def test_the_seed_reaches_the_pipeline_and_a_random_one_is_reported(app, monkeypatch):
    calls = []

    def spy(self, *args, **kwargs):  # records what the page asks for; no model run needed for that
        calls.append(kwargs)
        return InfinityStarPipelineOutput(frames=np.zeros((kwargs["num_frames"], 96, 96, 3), np.uint8), fps=16)

    monkeypatch.setattr(type(app.pipe), "__call__", spy)
    end, _ = last(app, short(prompt="a green star", seed=5))
    assert calls[-1]["seed"] == 5 and "seed 5." in end.status
    drawn = []
    for _ in range(2):
        end, _ = last(app, short(prompt="a green star", seed=5, random_seed=True))
        drawn.append(calls[-1]["seed"])
        assert end.error is None and f"seed {drawn[-1]}." in end.status
    assert all(0 <= s <= 2**31 - 1 for s in drawn) and drawn[0] != drawn[1]


def test_image_to_video_and_video_extension(app, tmp_path):
    first = tmp_path / "first.png"
    media.write_image(np.full((40, 60, 3), 200, np.uint8), first)
    end, _ = last(app, short(prompt="it moves", mode=IMAGE_TO_VIDEO, image=str(first)))
    assert end.error is None, end.status
    assert len(media.read_video(end.result)[0]) == 5
    src = tmp_path / "src.mp4"
    media.write_video(np.full((5, 96, 96, 3), 90, np.uint8), src, fps=16)
    end, _ = last(app, short(prompt="it goes on", mode=VIDEO_EXTENSION, video=str(src), seconds=0.5))
    assert end.error is None, end.status
    assert len(media.read_video(end.result)[0]) == 9


@pytest.mark.parametrize(
    ("req", "words"),
    [
        (WebRequest(prompt="   "), "prompt is empty"),
        (WebRequest(prompt="x", aspect="3:1"), "supported aspects"),
        (WebRequest(prompt="x", seconds=0), "more than 0 seconds"),
        (WebRequest(prompt="x", seconds=1000), "more than this page allows"),
        (WebRequest(prompt="x", seed=-3), "seed must be between"),
        (WebRequest(prompt="x", seed=1.5), "whole number"),
        (WebRequest(prompt="x", guidance=0.5), "guidance_scale must be >= 1"),
        (WebRequest(prompt="x", mode=IMAGE_TO_VIDEO), "needs an image"),
        (WebRequest(prompt="x", mode=VIDEO_EXTENSION), "needs a video"),
        (WebRequest(prompt="x", mode="Sketch to video"), "unknown mode"),
    ],
    ids=["empty-prompt", "bad-aspect", "zero-length", "too-long", "negative-seed", "fractional-seed", "guidance",
         "i2v-no-image", "extension-no-video", "mode"],
)
def test_bad_input_is_a_message(app, req, words):
    end, updates = last(app, req)
    assert len(updates) == 1 and end.result is None
    assert words in end.error and end.status.startswith("Error: ")
    assert "Traceback" not in end.status


def test_uploads_that_are_not_media_are_messages_and_the_next_request_works(app, tmp_path):
    fake_png = tmp_path / "photo.png"
    fake_png.write_bytes(b"this is not a picture")
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    fake_mp4 = tmp_path / "clip.mp4"
    fake_mp4.write_bytes(b"\x00" * 300)
    for req, words in [
        (short(prompt="x", mode=IMAGE_TO_VIDEO, image=str(fake_png)), "photo.png"),
        (short(prompt="x", mode=IMAGE_TO_VIDEO, image=str(text)), ".txt"),
        (short(prompt="x", mode=VIDEO_EXTENSION, video=str(fake_mp4)), "clip.mp4"),
        (short(prompt="x", mode=VIDEO_EXTENSION, video=str(tmp_path / "gone.mp4")), "gone.mp4"),
    ]:
        end, _ = last(app, req)
        assert end.result is None and words in end.error
    end, _ = last(app, short(prompt="after the bad uploads"))
    assert end.error is None and media.probe_video(end.result).width == 96


def test_a_failing_pipeline_is_a_message_and_the_server_goes_on(app, monkeypatch):
    real = type(app.pipe).__call__

    def broken(self, *args, **kwargs):
        raise RuntimeError("out of memory (simulated)")

    monkeypatch.setattr(type(app.pipe), "__call__", broken)
    end, _ = last(app, short(prompt="x"))
    assert end.result is None and "RuntimeError" in end.error and "simulated" in end.error
    monkeypatch.setattr(type(app.pipe), "__call__", real)
    end, _ = last(app, short(prompt="x"))
    assert end.error is None and end.result


def test_stop_between_scale_steps_then_the_next_request_runs(app):
    seen = []
    for up in app.generate(short(prompt="stop me", seconds=1.0), session="alice"):
        seen.append(up)
        if "scale step 1 of" in up.status:
            assert app.cancel("alice") == 1
            # The worker ends by itself at its next step, whether or not anyone reads the updates.
            assert app.wait_stopped("alice", timeout=60)
    end = seen[-1]
    assert end.result is None and end.status == "Stopped."
    # Stopped at the first step it checked: far fewer steps than the run has.
    steps = [u for u in seen if "scale step" in u.status]
    assert len(steps) < 4
    assert app.cancel("alice") == 0  # nothing left registered
    end, _ = last(app, short(prompt="after a stop"))
    assert end.error is None and end.result


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
        results[name] = list(app.generate(short(prompt=f"request {name}", seed=seed), session=name))[-1]

    threads = [threading.Thread(target=run, args=(n, s)) for n, s in (("a", 1), ("b", 2))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert set(results) == {"a", "b"}
    assert all(r.error is None for r in results.values()), [r.status for r in results.values()]
    assert results["a"].result != results["b"].result


def test_interactive_joins_one_clip_per_prompt(pipe, tmp_path, monkeypatch):
    # The tiny preset's segments are 20 latent frames (80 frames); a 2-frame clip keeps this test fast.
    from infinitystar.config import replace

    small = InfinityStarPipeline(pipe.transformer, pipe.vae, pipe.text_encoder,
                                 replace(pipe.config, frames_inner_clip=2))
    app = WebApp(small, tmp_path)
    end, updates = last(app, WebRequest(prompt="a cat wakes up", mode=INTERACTIVE, segments="\nthe cat runs\n",
                                        seed=3))
    assert end.error is None, end.status
    assert len(end.clips) == 2 and "2 segment(s)" in end.status
    frames, _ = media.read_video(end.result)
    assert len(frames) == 1 + 2 * 4 + 2 * 4  # segment 0 (first frame + one clip) + one clip
    assert [u.progress for u in updates if u.progress is not None][-1] == 1.0
    # With a video: the video is segment 0, the prompt continues it, then one segment per further line.
    src = tmp_path / "story.mp4"
    media.write_video(np.full((9, 96, 96, 3), 120, np.uint8), src, fps=16)
    end, _ = last(app, WebRequest(prompt="the cat sits", mode=INTERACTIVE, segments="the cat runs", seed=3,
                                  video=str(src)))
    assert end.error is None, end.status
    assert len(end.clips) == 3 and "3 segment(s) (the video first)" in end.status
    assert len(media.read_video(end.result)[0]) == 9 + 2 * 8


def test_options_follow_the_preset(app):
    assert app.aspect_choices() == [("1:1 (96x96)", "1:1")]
    assert app.seconds_step == 0.25 and app.num_frames(0.25) == 5 and app.num_frames(1) == 17
    assert app.num_frames(0.3) == 5  # rounded to a length the VAE can make (1 + 4k frames)
    assert "tiny-test" in app.describe_model()


def test_page_builds_with_every_widget(app):
    gr = pytest.importorskip("gradio")
    blocks = __import__("infinitystar.web", fromlist=["build_blocks"]).build_blocks(app)
    assert isinstance(blocks, gr.Blocks)
    ids = {getattr(b, "elem_id", None) for b in blocks.blocks.values()}
    for wanted in ("prompt", "negative", "mode", "image", "video", "segments", "seconds", "aspect", "seed",
                   "random-seed", "guidance", "generate", "stop", "status", "result-video", "result-image",
                   "download", "clips"):
        assert wanted in ids


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

"""A bounded burst of concurrent good and bad requests against the page on 127.0.0.1 (issue 16, item 5).

The page runs as ``infinitystar serve`` runs it (``web.launch`` over the demo model, its queue of 16), and 12 requests
arrive at once over HTTP through Gradio's own client: 6 good ones (short videos and images) and 6 bad ones (an empty
prompt, a mode the model does not have, an unknown size, a bad seed, a missing upload, an over-long prompt). Every
good request must get its own file, every bad one a message without a server path, the server must grow by a bounded
amount of memory, and it must still answer afterwards. The whole test is bounded: 12 requests, 180 s.
"""

from __future__ import annotations

import concurrent.futures
import resource
import socket
from pathlib import Path

import pytest

pytest.importorskip("gradio")
gradio_client = pytest.importorskip("gradio_client")

pytestmark = pytest.mark.usefixtures("one_thread")

DEADLINE_S = 180


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    from infinitystar.demo import load_pipeline, run_model_name
    from infinitystar.web import WebApp, launch

    pipe = load_pipeline(None, None)
    out = tmp_path_factory.mktemp("burst-out")
    app = WebApp(pipe, out, model=run_model_name(None, None))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    blocks = launch(app, "127.0.0.1", port, block=False, quiet=True)
    try:
        yield f"http://127.0.0.1:{port}/", app, out
    finally:
        blocks.close()


def _args(app, prompt="a red circle moving right", mode="Text to video", seconds=None, aspect=None, seed="1",
          image=None):
    sizes = app.size_choices()
    return (prompt, "", mode, app.seconds_step if seconds is None else seconds,
            sizes[0][1] if aspect is None else aspect, seed, app.default_guidance, image, None, "")


def _strings(value) -> list[str]:
    """Every string inside a Gradio client answer (file outputs come as paths or dicts holding them)."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for v in value.values() for s in _strings(v)]
    if isinstance(value, list | tuple):
        return [s for v in value for s in _strings(v)]
    return []


def _status(result) -> str:
    return str(result[0])


def test_a_burst_of_good_and_bad_requests(served, tmp_path):
    url, app, out = served
    client = gradio_client.Client(url, verbose=False)
    missing = str(tmp_path / "nowhere.png")
    good = [_args(app, seed=str(i)) for i in range(4)] + [_args(app, mode="Text to image", seed=str(i))
                                                         for i in range(2)]
    bad = {
        "empty prompt": _args(app, prompt="   "),
        "unknown mode": _args(app, mode="Teleport"),  # (the demo model has every mode: none it lacks)
        "unknown size": _args(app, aspect="17:3"),
        "bad seed": _args(app, seed="not a number"),
        "missing upload": _args(app, mode="Image to video", image=missing),
        "over-long prompt": _args(app, prompt="a red circle " * 400),
    }
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    with concurrent.futures.ThreadPoolExecutor(max_workers=12) as pool:
        jobs = {pool.submit(client.predict, *a, api_name="/on_generate"): ("good", i) for i, a in enumerate(good)}
        jobs.update({pool.submit(client.predict, *a, api_name="/on_generate"): ("bad", name)
                     for name, a in bad.items()})
        done, pending = concurrent.futures.wait(jobs, timeout=DEADLINE_S)
    assert not pending, f"{len(pending)} requests unanswered after {DEADLINE_S} s"
    answers: dict = {}
    for job in done:
        kind, key = jobs[job]
        try:
            answers[(kind, key)] = ("ok", job.result())
        except Exception as exc:  # the client raises for an event that ended in an error message
            answers[(kind, key)] = ("error", str(exc))

    results = set()
    for i in range(len(good)):
        how, result = answers[("good", i)]
        assert how == "ok" and _status(result).startswith("Done"), (i, result)
        paths = [Path(p) for p in _strings(result[2:4]) if p.endswith((".mp4", ".png"))]
        assert len(paths) == 1 and paths[0].is_file(), result
        path = paths[0]
        results.add(path.name)
    assert len(results) == len(good)  # each good request got its own file
    for name in bad:
        how, result = answers[("bad", name)]
        text = _status(result) if how == "ok" else result
        assert "Error" in text or how == "error", (name, text)
        assert str(out) not in text and "/tmp/" not in text, (name, text)  # no server path
    grown_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before) / 1024
    print(f"\nburst: 12 requests answered, peak RSS grew {grown_mib:.0f} MiB")
    assert grown_mib < 1024, f"the server grew by {grown_mib:.0f} MiB for 12 small requests"
    # Still serving.
    after = client.predict(*_args(app, seed="99"), api_name="/on_generate")
    assert _status(after).startswith("Done")

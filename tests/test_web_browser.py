"""The web page end to end in headless Chromium (Debian's ``chromium``, driven by Playwright; no browser download).

The server runs in this process on 127.0.0.1 with a free port, over the model ``infinitystar serve`` loads without
``--model`` (the shipped demo model; random tiny-test weights until it ships). Every request the page makes to
anything but that server is blocked and recorded: the page must work offline.

Without Playwright or Chromium these tests skip, unless INFINITYSTAR_REQUIRE_BROWSER=1 (CI sets it), where they
fail. INFINITYSTAR_WEB_SCREENSHOT=PATH also saves the screenshot there (the README's docs/web.png).
"""

import os
import socket
import sys
import time
from pathlib import Path

import pytest

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

from infinitystar import media  # noqa: E402

CHROMIUM = os.environ.get("INFINITYSTAR_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync", "--no-first-run"]
GENERATE_TIMEOUT_MS = 120_000  # bounded waits everywhere: a hang fails the test, it does not stall the suite


def _require(what: str, ok: bool) -> None:
    if ok:
        return
    if os.environ.get("INFINITYSTAR_REQUIRE_BROWSER") == "1":
        pytest.fail(f"{what} is missing (INFINITYSTAR_REQUIRE_BROWSER=1)")
    pytest.skip(f"{what} is missing")


def _have(module: str) -> bool:
    try:
        __import__(module)
    except ImportError:
        return False
    return True


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    _require("gradio", _have("gradio"))
    from infinitystar.demo import load_pipeline
    from infinitystar.web import WebApp, launch, weights_note

    app = WebApp(load_pipeline(None, None), tmp_path_factory.mktemp("web-out"), note=weights_note(None, None))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    blocks = launch(app, "127.0.0.1", port, block=False, quiet=True)
    try:
        yield f"http://127.0.0.1:{port}/", app
    finally:
        blocks.close()


@pytest.fixture(scope="module")
def browser():
    _require("playwright", _have("playwright"))
    _require(f"Chromium at {CHROMIUM}", Path(CHROMIUM).is_file())
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, timeout=60_000)
        try:
            yield b
        finally:
            b.close()


def _open(browser, url: str):
    """A page in its own context (its own Gradio session), with every non-local request blocked and recorded."""
    context = browser.new_context(viewport={"width": 1200, "height": 1000})
    page = context.new_page()
    page.set_default_timeout(30_000)
    outside: list[str] = []

    def route(r):
        if r.request.url.startswith(url) or r.request.url.startswith(("data:", "blob:")):
            r.continue_()
        else:
            outside.append(r.request.url)
            r.abort()

    page.route("**/*", route)
    page.goto(url)
    page.locator("#generate").wait_for(state="visible")
    return page, outside


def _ask(page, prompt: str, seconds: float, seed: int) -> None:
    page.locator("#prompt textarea").fill(prompt)
    box = page.locator("#seconds input[type=number]")
    box.fill(str(seconds))
    box.press("Enter")
    seed_box = page.locator("#seed input")
    seed_box.fill(str(seed))
    seed_box.press("Tab")


_PLAYS = """async () => {
  const v = document.querySelector('#result-video video');
  v.muted = true;
  await v.play();  // rejects if the browser cannot decode the file
  await new Promise(r => setTimeout(r, 200));
  return {error: v.error ? v.error.code : null, width: v.videoWidth, height: v.videoHeight, paused: v.paused};
}"""


def _wait_for_video(page, previous: str | None = None) -> str:
    page.wait_for_function(
        "(prev) => { const v = document.querySelector('#result-video video');"
        " return v && v.src && v.src !== prev && v.readyState >= 2; }",
        arg=previous or "", timeout=GENERATE_TIMEOUT_MS)
    return page.locator("#result-video video").get_attribute("src")


def _check_mp4(page, src: str, tmp_path: Path, name: str, want_frames: int, size: tuple[int, int]) -> None:
    resp = page.request.get(src)
    assert resp.ok, f"{src}: HTTP {resp.status}"
    body = resp.body()
    assert body[4:8] == b"ftyp", "not an mp4"
    path = tmp_path / name
    path.write_bytes(body)
    info = media.probe_video(path)
    frames, _ = media.read_video(path)
    assert (info.codec, len(frames), (info.height, info.width)) == ("h264", want_frames, size)


def test_type_a_prompt_generate_and_play_the_video(server, browser, tmp_path):
    url, app = server
    page, outside = _open(browser, url)
    seconds = app.seconds_step  # the shortest length the page offers
    _ask(page, "a red circle moving right", seconds, seed=0)
    t0 = time.perf_counter()
    page.locator("#generate").click()
    src = _wait_for_video(page)
    click_to_video = time.perf_counter() - t0
    played = page.evaluate(_PLAYS)
    _, _, size = app.pipe.resolve_size()
    assert played["error"] is None and not played["paused"]
    assert (played["height"], played["width"]) == size
    page.locator("#status").get_by_text("Done in").first.wait_for()
    _check_mp4(page, src, tmp_path, "result.mp4", app.num_frames(seconds), size)
    # The download offers the same file.
    assert page.locator("#download a").first.get_attribute("href")
    page.locator("#clips").scroll_into_view_if_needed()
    shot = tmp_path / "web.png"
    page.screenshot(path=str(shot), full_page=True)
    if os.environ.get("INFINITYSTAR_WEB_SCREENSHOT"):  # the README's picture: a 256-colour png keeps it small
        from PIL import Image

        with Image.open(shot) as im:
            im.convert("RGB").quantize(256).save(os.environ["INFINITYSTAR_WEB_SCREENSHOT"], optimize=True)
    assert outside == [], f"the page reached outside this machine: {outside}"
    print(f"\nweb: click to playable video {click_to_video:.2f} s ({app.pipe.config.name}, "
          f"{app.num_frames(seconds)} frames, {size[1]}x{size[0]})", file=sys.stderr)
    page.context.close()


def test_bad_input_is_a_message_and_the_next_request_works(server, browser, tmp_path):
    url, app = server
    page, outside = _open(browser, url)
    page.locator("#generate").click()  # no prompt
    page.locator("#status").get_by_text("the prompt is empty").first.wait_for()
    _ask(page, "a yellow circle", app.seconds_step, seed=1)
    page.locator("#aspect input").fill("7:1")  # a size the preset cannot do (the box takes any value)
    page.locator("#aspect input").press("Enter")
    page.locator("#generate").click()
    page.locator("#status").get_by_text("is not supported by preset").first.wait_for()
    page.locator("#aspect input").fill(app.aspect_choices()[0][1])
    page.locator("#aspect input").press("Enter")
    # An upload that is not an image (named .png, so the picker's filter lets it through).
    fake = tmp_path / "photo.png"
    fake.write_bytes(b"not a picture at all")
    page.locator("#mode").get_by_text("Image to video").click()
    page.locator("#image input[type=file]").set_input_files(str(fake))
    page.locator("#image").get_by_text("photo.png").first.wait_for()
    page.locator("#generate").click()
    page.locator("#status").get_by_text("cannot read image").first.wait_for()
    assert "Traceback" not in page.content()
    assert page.locator("#result-video video").count() == 0
    page.locator("#mode").get_by_text("Text to video").click()
    page.locator("#generate").click()
    _wait_for_video(page)
    assert outside == []
    page.context.close()


def test_two_people_at_once_both_get_their_video(server, browser, tmp_path):
    url, app = server
    pages = [_open(browser, url) for _ in range(2)]
    seconds = app.seconds_step
    for i, (page, _) in enumerate(pages):
        _ask(page, ["a blue square moving up", "a green triangle moving left"][i], seconds, seed=10 + i)
    t0 = time.perf_counter()
    for page, _ in pages:
        page.locator("#generate").click()
    srcs = [_wait_for_video(page) for page, _ in pages]
    both = time.perf_counter() - t0
    assert srcs[0] != srcs[1]
    _, _, size = app.pipe.resolve_size()
    for i, ((page, outside), src) in enumerate(zip(pages, srcs)):
        _check_mp4(page, src, tmp_path, f"person{i}.mp4", app.num_frames(seconds), size)
        assert outside == []
        page.context.close()
    print(f"\nweb: two requests at once, both videos after {both:.2f} s", file=sys.stderr)


def test_stop_a_running_request_then_generate_again(server, browser):
    url, app = server
    page, outside = _open(browser, url)
    _ask(page, "a purple circle moving down", app.max_seconds, seed=2)  # the longest: still running when stopped
    page.locator("#generate").click()
    page.locator("#status").get_by_text("scale step").first.wait_for(timeout=GENERATE_TIMEOUT_MS)
    page.locator("#stop").click()
    page.locator("#status").get_by_text("Stopped.").first.wait_for()
    assert page.locator("#result-video video").count() == 0
    # The stopped run let go of the model: the next request goes through.
    _ask(page, "a purple circle moving down", app.seconds_step, seed=2)
    page.locator("#generate").click()
    _wait_for_video(page)
    assert outside == []
    page.context.close()

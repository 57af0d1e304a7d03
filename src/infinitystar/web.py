"""A local web page over one :class:`~infinitystar.pipeline.InfinityStarPipeline` (``infinitystar serve``).

Two layers, so the logic is testable without a browser or a server:

* :class:`WebApp` owns the pipeline (loaded once), checks a :class:`WebRequest`, runs the generation in a worker
  thread and yields :class:`WebUpdate` s (status text, finished clips, the result, or an error message). It never
  raises for bad input: every :class:`ValueError` (``MediaError`` and ``ConfigError`` are ones) and
  ``FileNotFoundError`` becomes a message, anything else a one-line "failed" message (the traceback goes to the
  server log only), so the next request finds everything as before.
* :func:`build_blocks` puts a Gradio page on top (the optional extra ``[web]``): a queue with one request at a time
  over the one model, progress while it runs, a Stop button, the result as a video or an image with a download.

The server binds to 127.0.0.1 unless told otherwise (``--host``): the page has no login and every request runs the
model, so whoever can reach the port can use this machine's compute and read what it generates.
"""


import logging
import os
import queue
import random
import signal
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import media
from .demo import load_pipeline, random_weights
from .generation.plan import GenerationPlan

# No calls home from Gradio (analytics, version check); read when gradio is imported, so set before that.
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
log = logging.getLogger(__name__)

TEXT_TO_IMAGE = "Text to image"
TEXT_TO_VIDEO = "Text to video"
IMAGE_TO_VIDEO = "Image to video"
VIDEO_EXTENSION = "Video extension"
INTERACTIVE = "Interactive"
MODES = (TEXT_TO_IMAGE, TEXT_TO_VIDEO, IMAGE_TO_VIDEO, VIDEO_EXTENSION, INTERACTIVE)

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 7860
# Largest seed the page offers and draws: torch.Generator takes 64-bit seeds, but a number field in the browser is
# a JavaScript double, exact only up to 2**53.
MAX_SEED = 2**31 - 1
# Largest upload the server accepts (a conditioning image or video; larger ones are refused before they are read).
MAX_UPLOAD = "200mb"


class Cancelled(Exception):
    """Raised inside the pipeline's step callback when the request was stopped (between two scale steps)."""


@dataclass
class WebRequest:
    """What the page sends. ``seconds`` is the whole length (for a video extension: including the given video)."""

    prompt: str
    mode: str = TEXT_TO_VIDEO
    negative_prompt: str = ""
    seconds: float | None = None
    aspect: str | None = None
    seed: int | float | None = None
    random_seed: bool = False
    guidance: float | None = None
    image: str | None = None  # a file path (an upload)
    video: str | None = None
    segments: str = ""  # interactive: further prompts, one per line (the prompt is the first segment)


@dataclass
class WebUpdate:
    """One step of a request as the page shows it. ``result`` is set only by the last update of a success."""

    status: str
    clips: list[str] = field(default_factory=list)
    result: str | None = None
    is_image: bool = False
    error: str | None = None
    progress: float | None = None  # fraction done, when known


@dataclass
class _Plan:
    """A checked request: what to call on the pipeline and with what."""

    kind: str  # "call" or "interactive"
    kwargs: dict[str, Any]
    seed: int
    total_steps: int
    is_image: bool
    summary: str


class WebApp:
    """The page's logic over one pipeline: options for the widgets, request checks, generation with updates."""

    def __init__(self, pipe: Any, output_dir: str | os.PathLike | None = None, note: str = "") -> None:
        self.pipe = pipe
        self.note = note  # shown under the title, e.g. that the weights are random
        self.output_dir = Path(output_dir) if output_dir else Path(tempfile.mkdtemp(prefix="infinitystar-web-"))
        self.output_dir.mkdir(parents=True, exist_ok=True)
        # One model, one request at a time: the page's queue runs one event at a time anyway; the lock also covers
        # direct calls and a stopped request whose worker is still finishing its current scale step.
        self._lock = threading.Lock()
        self._cancel_flags: dict[str, set[threading.Event]] = {}
        self._workers: dict[str, set[threading.Thread]] = {}
        self._flags_lock = threading.Lock()

    # ------------------------------------------------------------------------------------------
    # What the widgets offer
    # ------------------------------------------------------------------------------------------

    @property
    def fps(self) -> int:
        return int(self.pipe.config.fps)

    @property
    def seconds_step(self) -> float:
        """Lengths are 1 + time_stride*k frames: steps of time_stride / fps seconds (0.25 s at 16 fps)."""
        return self.pipe.config.vae.time_stride / self.pipe.config.fps

    @property
    def default_seconds(self) -> float:
        return float(self.pipe.config.default_seconds)

    @property
    def max_seconds(self) -> float:
        return float(max(4 * self.pipe.config.default_seconds, 4))

    @property
    def default_guidance(self) -> float:
        return float(self.pipe.config.sampling.guidance_scale)

    def aspect_choices(self) -> list[tuple[str, str]]:
        """(label, value) for each aspect the preset can generate, the label naming the pixel size."""
        choices = []
        for aspect in self.pipe.config.aspects:
            try:
                _, _, (h, w) = self.pipe.resolve_size(aspect=aspect)
            except ValueError:
                continue
            choices.append((f"{aspect} ({w}x{h})", aspect))
        return choices

    def describe_model(self) -> str:
        cfg = self.pipe.config
        sizes = ", ".join(label for label, _ in self.aspect_choices())
        text = (f"Model: preset **{cfg.name}** ({cfg.pn} pixels: {sizes}), {cfg.fps} fps, "
                f"default length {cfg.default_seconds} s.")
        return f"{text} {self.note}" if self.note else text

    # ------------------------------------------------------------------------------------------
    # Checks
    # ------------------------------------------------------------------------------------------

    def num_frames(self, seconds: float | None) -> int:
        if seconds is None:
            return self.pipe.num_frames_for(None, None)
        try:
            seconds = float(seconds)
        except (TypeError, ValueError):
            raise ValueError(f"length must be a number of seconds, got {seconds!r}") from None
        if not seconds > 0:
            raise ValueError(f"length must be more than 0 seconds, got {seconds:g}")
        if seconds > self.max_seconds:
            raise ValueError(f"length {seconds:g} s is more than this page allows ({self.max_seconds:g} s)")
        return self.pipe.num_frames_for(None, seconds)  # the pipeline's rounding, so the page shows what it makes

    def _steps_for(self, num_frames: int) -> int:
        """Scale steps of one generation of ``num_frames`` frames (for the progress fraction)."""
        cfg = self.pipe.config
        _, pyramid, _ = self.pipe.resolve_size()
        return GenerationPlan(cfg, num_frames, pyramid, cfg.sampling).num_steps

    def plan(self, req: WebRequest) -> _Plan:
        """Check ``req`` and turn it into pipeline arguments; raises ValueError/FileNotFoundError with a message."""
        if req.mode not in MODES:
            raise ValueError(f"unknown mode {req.mode!r}; choose one of {', '.join(MODES)}")
        prompt = (req.prompt or "").strip()
        if not prompt:
            raise ValueError("the prompt is empty: describe what to generate")
        if req.random_seed or req.seed is None or req.seed == "":
            seed = random.SystemRandom().randint(0, MAX_SEED)
        else:
            try:
                seed = int(req.seed)
            except (TypeError, ValueError):
                raise ValueError(f"seed must be a whole number, got {req.seed!r}") from None
            if seed != req.seed and not isinstance(req.seed, str):
                raise ValueError(f"seed must be a whole number, got {req.seed!r}")
            if not 0 <= seed <= MAX_SEED:
                raise ValueError(f"seed must be between 0 and {MAX_SEED}, got {seed}")
        guidance = None if req.guidance is None else float(req.guidance)
        self.pipe.config.sampling.with_guidance_scale(guidance)  # the one check of the scale, before queueing
        aspect = req.aspect or None
        # The size first: its message names the aspects this preset can do.
        _, _, (height, width) = self.pipe.resolve_size(aspect=aspect)
        negative = (req.negative_prompt or "").strip() or None
        common = dict(aspect=aspect, guidance_scale=guidance, seed=seed)
        size = f"{width}x{height}"
        if req.mode == INTERACTIVE:
            prompts = [prompt] + [line.strip() for line in (req.segments or "").splitlines() if line.strip()]
            video = self._checked_video(req.video) if req.video else None
            if video is not None:
                # interactive() makes the video segment 0 and ignores prompts[0]; on the page the prompt above
                # is the first segment that continues the video.
                prompts = [prompt] + prompts
            # interactive() reports per segment (no step callback): progress counts segments.
            return _Plan("interactive", dict(prompts=prompts, video=video, **common), seed, len(prompts), False,
                         f"{len(prompts)} segment(s){' (the video first)' if video else ''}, {size}, seed {seed}")
        num_frames = 1 if req.mode == TEXT_TO_IMAGE else self.num_frames(req.seconds)
        kwargs: dict[str, Any] = dict(prompt=prompt, negative_prompt=negative, num_frames=num_frames, **common)
        if req.mode == IMAGE_TO_VIDEO:
            if not req.image:
                raise ValueError("image to video needs an image: upload one (png, jpg or webp)")
            kwargs["image"] = self._checked_image(req.image)
        elif req.mode == VIDEO_EXTENSION:
            if not req.video:
                raise ValueError("video extension needs a video: upload one (mp4, webm, mov, ...)")
            kwargs["video"] = self._checked_video(req.video)
        is_image = num_frames == 1
        what = "image" if is_image else f"{num_frames} frames ({(num_frames - 1) / self.fps:g} s)"
        return _Plan("call", kwargs, seed, self._steps_for(num_frames), is_image, f"{what}, {size}, seed {seed}")

    @staticmethod
    def _checked_image(path: str) -> str:
        media.read_image(path)  # MediaError (a ValueError) naming the file if it is not an image
        return path

    @staticmethod
    def _checked_video(path: str) -> str:
        info = media.probe_video(path)  # MediaError if it is not a video
        if not info.width or not info.height:
            raise media.MediaError(f"{Path(path).name} holds no video frames")
        return path

    # ------------------------------------------------------------------------------------------
    # Cancellation
    # ------------------------------------------------------------------------------------------

    def cancel(self, session: str) -> int:
        """Stop the running or waiting requests of ``session``; returns how many were told to stop."""
        with self._flags_lock:
            flags = list(self._cancel_flags.get(session, ()))
        for flag in flags:
            flag.set()
        return len(flags)

    def wait_stopped(self, session: str, timeout: float = 60.0) -> bool:
        """Wait until the generations ``session`` started have ended (a stopped one ends at its next scale step).

        The page's Stop answers only then: Gradio's cancel hits every run of the event in the session, so a new
        run started before that cancel arrives would be cancelled with the old one."""
        deadline = time.monotonic() + timeout
        with self._flags_lock:
            workers = list(self._workers.get(session, ()))
        for worker in workers:
            worker.join(max(0.0, deadline - time.monotonic()))
        return not any(w.is_alive() for w in workers)

    def _register(self, session: str, flag: threading.Event) -> None:
        with self._flags_lock:
            self._cancel_flags.setdefault(session, set()).add(flag)

    def _unregister(self, session: str, flag: threading.Event) -> None:
        with self._flags_lock:
            flags = self._cancel_flags.get(session)
            if flags is not None:
                flags.discard(flag)
                if not flags:
                    del self._cancel_flags[session]

    # ------------------------------------------------------------------------------------------
    # Generation
    # ------------------------------------------------------------------------------------------

    def generate(self, req: WebRequest, session: str = "default",
                 cancel: threading.Event | None = None) -> Iterator[WebUpdate]:
        """Run ``req``, yielding updates; the last one carries the result or the message. Never raises for input.

        Closing the iterator early (the page's Stop, a closed tab) stops the generation at its next scale step.
        """
        cancel = cancel or threading.Event()
        self._register(session, cancel)
        try:
            yield from self._generate(req, cancel, session)
        finally:
            cancel.set()  # a closed iterator (Stop, disconnect) stops the worker too
            self._unregister(session, cancel)

    def _generate(self, req: WebRequest, cancel: threading.Event, session: str) -> Iterator[WebUpdate]:
        try:
            plan = self.plan(req)
        except (ValueError, FileNotFoundError) as exc:
            yield _error(str(exc))
            return
        events: queue.Queue[tuple[str, Any]] = queue.Queue()
        stem = uuid.uuid4().hex[:12]
        worker = threading.Thread(target=self._work, args=(plan, stem, cancel, events, session), daemon=True,
                                  name=f"infinitystar-web-{stem}")
        with self._flags_lock:
            self._workers.setdefault(session, set()).add(worker)
        t0 = time.perf_counter()
        clips: list[str] = []
        step = 0
        yield WebUpdate(status=f"Waiting for the model... ({plan.summary})", progress=0.0)
        worker.start()
        while True:
            kind, value = events.get()  # the worker always ends with done, cancelled or error
            if kind == "started":
                yield WebUpdate(status=f"Generating {plan.summary}...", clips=list(clips), progress=0.0)
            elif kind == "step":
                step += 1
                frac = min(step / plan.total_steps, 0.99)
                yield WebUpdate(status=f"Generating {plan.summary}: scale step {min(step, plan.total_steps)} of "
                                f"{plan.total_steps}", clips=list(clips), progress=frac)
            elif kind == "clip":
                clips.append(value)
                if plan.kind == "interactive":
                    step += 1
                yield WebUpdate(status=f"Clip {len(clips)} done ({plan.summary})", clips=list(clips),
                                progress=min(step / plan.total_steps, 0.99))
            elif kind == "done":
                seconds = time.perf_counter() - t0
                yield WebUpdate(status=f"Done in {seconds:.1f} s: {plan.summary}.", clips=list(clips), result=value,
                                is_image=plan.is_image, progress=1.0)
                return
            elif kind == "cancelled":
                yield WebUpdate(status="Stopped.", clips=list(clips), error="Stopped before the end.")
                return
            elif kind == "error":
                yield _error(value, clips)
                return

    def _work(self, plan: _Plan, stem: str, cancel: threading.Event, events: queue.Queue, session: str) -> None:
        """The worker thread: one pipeline call under the lock; reports through ``events``."""
        try:
            self._work_locked(plan, stem, cancel, events)
        finally:
            with self._flags_lock:
                workers = self._workers.get(session)
                if workers is not None:
                    workers.discard(threading.current_thread())
                    if not workers:
                        del self._workers[session]

    def _work_locked(self, plan: _Plan, stem: str, cancel: threading.Event, events: queue.Queue) -> None:
        try:
            with self._lock:
                if cancel.is_set():
                    raise Cancelled
                events.put(("started", None))
                events.put(("done", self._run_plan(plan, stem, cancel, events)))
        except Cancelled:
            events.put(("cancelled", None))
        except (ValueError, FileNotFoundError) as exc:
            events.put(("error", str(exc)))
        except Exception as exc:  # the server must survive anything a request does; the log gets the traceback
            log.exception("generation failed")
            events.put(("error", f"generation failed ({type(exc).__name__}: {exc}); the server log has details"))

    def _run_plan(self, plan: _Plan, stem: str, cancel: threading.Event, events: queue.Queue) -> str:
        pipe = self.pipe
        fps = pipe.config.fps

        def on_step(_pipe: Any, _event: Any) -> None:
            if cancel.is_set():
                raise Cancelled
            events.put(("step", None))

        def on_clip(index: int, frames: Any) -> None:
            if cancel.is_set():
                raise Cancelled
            one = len(frames) == 1
            path = self.output_dir / f"{stem}_clip{index:03d}.{'png' if one else 'mp4'}"
            media.save_output(frames, path, fps=fps)
            events.put(("clip", str(path)))

        if plan.kind == "interactive":
            # interactive() has no step callback; its segments are its clips (Stop acts between segments).
            result = pipe.interactive(**plan.kwargs, output_type="np", callback_on_segment_end=on_clip,
                                      progress=False)
        else:
            result = pipe(**plan.kwargs, output_type="np", callback_on_step_end=on_step,
                          callback_on_clip_end=None if plan.is_image else on_clip, progress=False)
        if cancel.is_set():
            raise Cancelled
        path = self.output_dir / f"{stem}.{'png' if plan.is_image else 'mp4'}"
        media.save_output(result.frames, path, fps=fps)
        return str(path)


def _error(message: str, clips: list[str] | None = None) -> WebUpdate:
    return WebUpdate(status=f"Error: {message}", clips=list(clips or []), error=message)


# ----------------------------------------------------------------------------------------------
# The Gradio page
# ----------------------------------------------------------------------------------------------

_CSS = "#status p { margin: 0; }"


def _require_gradio():
    try:
        import gradio as gr
    except ImportError:
        raise ImportError("the web page needs Gradio: pip install 'infinitystar[web]'") from None
    return gr


def local_theme():
    """Gradio's default theme with system fonts: the stock one loads its fonts from a font CDN, and the page
    must work with no network beyond this machine."""
    gr = _require_gradio()
    return gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"],
                             font_mono=["ui-monospace", "Consolas", "monospace"])


def build_blocks(app: WebApp):
    """The page (a ``gr.Blocks``, queue configured) over ``app``. Launch it with :func:`launch`."""
    gr = _require_gradio()
    aspects = app.aspect_choices()
    # delete_cache: Gradio's copies of uploads and results older than a day go, checked hourly.
    with gr.Blocks(title="InfinityStar", analytics_enabled=False, delete_cache=(3600, 86400)) as blocks:
        gr.Markdown("# InfinityStar\n" + app.describe_model())
        with gr.Row():
            with gr.Column(scale=1):
                prompt = gr.Textbox(label="Prompt", lines=2, placeholder="a red circle moving right",
                                    elem_id="prompt")
                negative = gr.Textbox(label="Negative prompt", lines=1, elem_id="negative")
                mode = gr.Radio(list(MODES), value=TEXT_TO_VIDEO, label="Mode", elem_id="mode")
                image = gr.File(label="Image (first frame)", file_types=list(media.IMAGE_SUFFIXES), type="filepath",
                                visible=False, elem_id="image")
                video = gr.File(label="Video to continue", file_types=list(media.VIDEO_READ_SUFFIXES),
                                type="filepath", visible=False, elem_id="video")
                segments = gr.Textbox(label="Further segments, one prompt per line (the prompt above is the first; "
                                      "with a video, the video comes first and the prompt above continues it)",
                                      lines=3, visible=False, elem_id="segments")
                seconds = gr.Slider(app.seconds_step, app.max_seconds, value=app.default_seconds,
                                    step=app.seconds_step, label="Length (seconds; for a video extension the whole "
                                    "length)", elem_id="seconds")
                aspect = gr.Dropdown(aspects, value=aspects[0][1] if aspects else None, label="Size (aspect W:H)",
                                     allow_custom_value=True, elem_id="aspect",
                                     info="the sizes this model can generate")
                with gr.Row():
                    seed = gr.Number(value=app.pipe.config.seed, precision=0, minimum=0, maximum=MAX_SEED,
                                     label="Seed", elem_id="seed")
                    random_seed = gr.Checkbox(value=False, label="Random seed", elem_id="random-seed")
                guidance = gr.Slider(1.0, max(10.0, 2 * app.default_guidance), value=app.default_guidance, step=0.5,
                                     label="Guidance (1 = off)", elem_id="guidance")
                with gr.Row():
                    run = gr.Button("Generate", variant="primary", elem_id="generate")
                    stop = gr.Button("Stop", variant="stop", elem_id="stop")
            with gr.Column(scale=1):
                status = gr.Markdown("Ready.", elem_id="status")
                out_video = gr.Video(label="Result", interactive=False, elem_id="result-video", autoplay=False,
                                     loop=True, height=360)
                out_image = gr.Image(label="Result", type="filepath", interactive=False, visible=False,
                                     elem_id="result-image", height=360)
                download = gr.File(label="Download", interactive=False, elem_id="download")
                clips = gr.Gallery(label="Finished clips", columns=4, height=160, elem_id="clips",
                                   interactive=False)

        def on_mode(m: str):
            return (gr.update(visible=m == IMAGE_TO_VIDEO), gr.update(visible=m in (VIDEO_EXTENSION, INTERACTIVE)),
                    gr.update(visible=m == INTERACTIVE), gr.update(visible=m not in (TEXT_TO_IMAGE, INTERACTIVE)))

        mode.change(on_mode, mode, [image, video, segments, seconds], queue=False)

        def on_generate(prompt_v, negative_v, mode_v, seconds_v, aspect_v, seed_v, random_v, guidance_v, image_v,
                        video_v, segments_v, request: gr.Request, progress=gr.Progress()):  # noqa: B008
            req = WebRequest(prompt=prompt_v, mode=mode_v, negative_prompt=negative_v, seconds=seconds_v,
                             aspect=aspect_v, seed=seed_v, random_seed=random_v, guidance=guidance_v,
                             image=image_v, video=video_v, segments=segments_v)
            session = getattr(request, "session_hash", None) or "default"
            for up in app.generate(req, session=session):
                if up.progress is not None and up.error is None:
                    progress(up.progress, desc=up.status)
                if up.error is not None:
                    gr.Warning(up.error, title="Not generated")
                gallery = up.clips or None
                if up.result is None:
                    yield status_only(up.status, gallery)
                elif up.is_image:
                    yield (up.status, gr.update(value=None, visible=False), gr.update(value=up.result, visible=True),
                           up.result, gallery)
                else:
                    yield (up.status, gr.update(value=up.result, visible=True), gr.update(value=None, visible=False),
                           up.result, gallery)

        def status_only(text: str, gallery: list[str] | None):
            return text, gr.skip(), gr.skip(), gr.skip(), gallery

        inputs = [prompt, negative, mode, seconds, aspect, seed, random_seed, guidance, image, video, segments]
        outputs = [status, out_video, out_image, download, clips]
        event = run.click(on_generate, inputs, outputs, concurrency_limit=1, concurrency_id="model",
                          show_progress="full")

        def on_stop(request: gr.Request):
            session = getattr(request, "session_hash", None) or "default"
            if not app.cancel(session):
                return "Nothing to stop."
            return "Stopped." if app.wait_stopped(session) else "Stopping (the current step is still running)..."

        stop.click(on_stop, None, status, cancels=[event], queue=False)
    return blocks


def launch(app: WebApp, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT, *, block: bool = True,
           max_queue: int = 16, quiet: bool = False):
    """Serve the page; returns the Blocks (``block=False``: the server runs in a thread; ``.close()`` stops it)."""
    blocks = build_blocks(app)
    blocks.queue(default_concurrency_limit=1, max_size=max_queue)
    blocks.launch(server_name=host, server_port=port, prevent_thread_lock=not block, share=False, inbrowser=False,
                  show_error=False, quiet=quiet, ssr_mode=False, theme=local_theme(), css=_CSS,
                  allowed_paths=[str(app.output_dir)], footer_links=[], mcp_server=False, pwa=False,
                  max_file_size=MAX_UPLOAD)
    return blocks


def weights_note(model: str | None, preset: str | None) -> str:
    """What the page says about the weights ``load_pipeline(model, preset)`` picks when they are random."""
    if random_weights(model, preset):
        return "**Random weights** (no model given, no demo model shipped): the output is noise."
    return ""


def serve(model: str | None = None, preset: str | None = None, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT,
          device: str = "auto", precision: str | None = None, memory_mode: str = "plain", compile_blocks: bool = False,
          output_dir: str | None = None) -> None:
    """``infinitystar serve``: load the pipeline once (see :func:`load_pipeline` for the device options) and serve
    the page until interrupted."""
    _require_gradio()
    pipe = load_pipeline(model, preset, device=device, precision=precision, memory_mode=memory_mode,
                         compile_blocks=compile_blocks)
    app = WebApp(pipe, output_dir, note=weights_note(model, preset))
    if host not in ("127.0.0.1", "localhost", "::1"):
        print(f"warning: serving on {host}: anyone who can reach this address can run the model and see its "
              "outputs (there is no login)", file=sys.stderr)
    if threading.current_thread() is threading.main_thread():
        # A parent that ignores SIGINT (a script's background job, some test runners) hands that on to this
        # process, and Python then never raises KeyboardInterrupt: Ctrl+C / SIGINT must still stop the server.
        signal.signal(signal.SIGINT, signal.default_int_handler)
    blocks = None
    try:
        blocks = launch(app, host, port, block=False, quiet=True)
        print(f"InfinityStar page on {blocks.local_url} (preset {pipe.config.name}); Ctrl+C stops it",
              file=sys.stderr, flush=True)
        while blocks.is_running:
            time.sleep(0.2)
    except KeyboardInterrupt:  # Ctrl+C, also while the server is still starting: a clean stop, no traceback
        pass
    finally:
        if blocks is not None:
            blocks.close()


__all__ = ["MODES", "Cancelled", "WebApp", "WebRequest", "WebUpdate", "build_blocks", "launch", "local_theme",
           "serve", "weights_note"]

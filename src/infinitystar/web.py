"""A local web page over one :class:`~infinitystar.pipeline.InfinityStarPipeline` (``infinitystar serve``).

Two layers, so the logic is testable without a browser or a server:

* :class:`WebApp` owns the pipeline (loaded once), checks a :class:`WebRequest`, runs the generation in a worker
  thread and yields :class:`WebUpdate` s (status text, finished clips, the result, or an error message). It never
  raises for bad input: every :class:`ValueError` (``MediaError`` and ``ConfigError`` are ones) and
  ``FileNotFoundError`` becomes a message, anything else a one-line "failed" message (the traceback goes to the
  server log only), so the next request finds everything as before. No message names a file by its path on the
  server (:func:`scrub_paths`): the page shows file names only.
* :func:`build_blocks` puts a Gradio page on top (the optional extra ``[web]``): a queue with one request at a time
  over the one model, progress for every stage while it runs, a Stop button that acts within one scale step or
  one decoded chunk, the result as a video or an image with its download (named like the CLI's outputs, the run
  record inside and as a .json beside it).

What the page offers follows the model (:attr:`InfinityStarPipeline.capabilities`): only the modes it can do, its
sizes in plain words, and, for a model with a closed vocabulary (the demo model), the words it knows and example
prompts, held-out ones among them.

The server binds to 127.0.0.1 unless told otherwise (``--host``): the page has no login and every request runs the
model, so whoever can reach the port can use this machine's compute and read what it generates.
"""


import logging
import os
import queue
import re
import signal
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import media, outputs
from .demo import load_pipeline, random_weights, run_model_name
from .demo.evaluate import SEEN_EVAL_TRIPLES
from .demo.synthetic import COLOURS, DIRECTIONS, HELD_OUT, SHAPES, caption
from .pipeline import SEED_LIMIT, ProgressEvent

# No calls home from Gradio (analytics, version check); read when gradio is imported, so set before that.
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
log = logging.getLogger(__name__)

TEXT_TO_IMAGE = "Text to image"
TEXT_TO_VIDEO = "Text to video"
IMAGE_TO_VIDEO = "Image to video"
VIDEO_EXTENSION = "Video extension"
INTERACTIVE = "Interactive story"
MODES = (TEXT_TO_IMAGE, TEXT_TO_VIDEO, IMAGE_TO_VIDEO, VIDEO_EXTENSION, INTERACTIVE)
# The pipeline's task names (``Capabilities.tasks``, ``RunRecord.task``) of the page's modes.
MODE_TASKS = {TEXT_TO_IMAGE: "text-to-image", TEXT_TO_VIDEO: "text-to-video", IMAGE_TO_VIDEO: "image-to-video",
              VIDEO_EXTENSION: "video-extension", INTERACTIVE: "interactive"}

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 7860
# Largest seed the page takes: torch.Generator takes 64-bit seeds, but a number field in the browser is a
# JavaScript double, exact only up to 2**53; 2**31 - 1 is what every tool (and the CLI's drawn seeds) stays under.
MAX_SEED = SEED_LIMIT - 1
# Largest upload the server accepts (a conditioning image or video; larger ones are refused before they are read).
MAX_UPLOAD = "200mb"
# A small result is shown enlarged by a whole factor to about this many CSS pixels, with crisp pixels.
DISPLAY_PIXELS = 256
# Example prompts for a model with an open vocabulary (Flan-T5): any description works.
OPEN_EXAMPLES = ("a corgi surfing a wave at sunset", "a lighthouse on a cliff as waves crash below",
                 "a paper boat drifting down a rainy street", "clouds rolling over snowy mountains, timelapse")


class Cancelled(Exception):
    """Raised inside the pipeline's progress callable when the request was stopped (at the next scale step,
    decoded chunk or written frame)."""


@dataclass
class WebRequest:
    """What the page sends. ``seconds`` is the whole length (for a video extension: including the given video).
    ``seed`` None or empty: a random one (the pipeline draws it and reports it)."""

    prompt: str
    mode: str = TEXT_TO_VIDEO
    negative_prompt: str = ""
    seconds: float | None = None
    aspect: str | None = None
    seed: int | float | str | None = None
    guidance: float | None = None
    image: str | None = None  # a file path (an upload)
    video: str | None = None
    segments: str = ""  # interactive: further prompts, one per line (the prompt is the first segment)


@dataclass
class WebUpdate:
    """One step of a request as the page shows it. ``result`` (the image or video), ``files`` (what the download
    offers: the result and its run record) and ``seed`` are set only by the last update of a success."""

    status: str
    clips: list[str] = field(default_factory=list)
    result: str | None = None
    is_image: bool = False
    error: str | None = None
    progress: float | None = None  # fraction done, when known
    seed: int | None = None
    files: list[str] = field(default_factory=list)
    notice: str | None = None  # a warning that does not stop the run (words the model does not know)


@dataclass
class _Plan:
    """A checked request: what to call on the pipeline and with what, and what its run record says."""

    kind: str  # "call" or "interactive"
    task: str  # a RunRecord task
    kwargs: dict[str, Any]
    segments: int  # interactive: segments (each a clip of the progress); a call: 1
    is_image: bool
    summary: str
    record: dict[str, Any]  # RunRecord fields known before the run


@dataclass
class _Result:
    path: str
    record: str
    seed: int


# ----------------------------------------------------------------------------------------------
# Messages and progress (pure)
# ----------------------------------------------------------------------------------------------

# An absolute path: "/a/b..." or "C:\a\..." with at least two separators, not glued to a word ("and/or", "16:9").
_ABSOLUTE_PATH = re.compile(r"(?<![\w.~/\\-])(?:[A-Za-z]:)?[\\/][^\s'\"`<>|:;,()\[\]{}]*[\\/][^\s'\"`<>|:;,()\[\]{}]*")


def scrub_paths(message: str, *paths: str | os.PathLike | None) -> str:
    """``message`` with every file path shortened to its file name: the page never shows where the server keeps
    uploads, results or models. ``paths`` (the uploads of the request, the output folder) are replaced first,
    whole, so a name with spaces stays whole; then any other absolute path."""
    for p in sorted({str(p) for p in paths if p}, key=len, reverse=True):
        message = message.replace(p, Path(p).name)
    return _ABSOLUTE_PATH.sub(lambda m: re.split(r"[\\/]", m.group(0).rstrip("\\/"))[-1] or "a file", message)


# Each stage's words and its share of one segment's progress (the text encoder is quick, decoding is not).
_STAGES = {"encode_prompt": (0.0, 0.05), "generate": (0.05, 0.85), "decode": (0.85, 1.0)}
_WRITE_FROM = 0.97  # writing the file: the last 3 % of the bar


def _stage_words(event: ProgressEvent) -> str:
    if event.stage == "encode_prompt":
        return "reading the prompt"
    if event.stage == "generate":
        return f"scale step {event.done} of {event.total}" if event.done else "starting the scale steps"
    if event.stage == "decode":
        return f"decoding, part {event.done} of {event.total}" if event.done else "decoding"
    if event.stage == "write":
        return "saving the file"
    return event.stage


class ProgressTracker:
    """Turns the pipeline's :class:`ProgressEvent` s into the page's words and one fraction of the whole request
    that never goes back. An interactive story of ``segments`` segments: each event's ``clip`` is its 1-based
    segment."""

    def __init__(self, segments: int = 1) -> None:
        self.segments = max(1, segments)
        self.fraction = 0.0

    def update(self, event: ProgressEvent) -> tuple[str, float]:
        part = min(event.done / event.total, 1.0) if event.total else 0.0
        segment = min(max((event.clip or 1) - 1, 0), self.segments - 1) if self.segments > 1 else 0
        if event.stage == "write":
            frac = _WRITE_FROM + (1 - _WRITE_FROM) * part
        else:
            lo, hi = _STAGES.get(event.stage, (0.0, 1.0))
            frac = _WRITE_FROM * (segment + lo + (hi - lo) * part) / self.segments
        self.fraction = max(self.fraction, min(frac, 0.99))  # 1.0 only when the result is there
        words = _stage_words(event)
        if self.segments > 1 and event.stage != "write":
            words = f"segment {segment + 1} of {self.segments}, {words}"
        return words, self.fraction


def size_label(aspect: str, height: int, width: int) -> str:
    """A size in plain words: ``Square, 64x64``, ``Wide (16:9), 1280x720``, ``Tall (9:16), 720x1280``."""
    shape = "Square" if height == width else f"Wide ({aspect})" if width > height else f"Tall ({aspect})"
    return f"{shape}, {width}x{height}"


def _knows_demo_domain(vocabulary: set[str]) -> bool:
    """Whether a closed vocabulary holds the demo domain's words (colours, shapes, directions)."""
    return all(w in vocabulary for w in (*COLOURS, *SHAPES, *DIRECTIONS))


class WebApp:
    """The page's logic over one pipeline: options for the widgets, request checks, generation with updates.

    ``model`` and ``preset`` name the weights in each result's run record
    (:func:`~infinitystar.demo.run_model_name`; default: ``random:<preset name>``, right for a pipeline made by
    ``from_preset``).
    """

    def __init__(self, pipe: Any, output_dir: str | os.PathLike | None = None, note: str = "", *,
                 model: str | None = None, preset: str | None = None) -> None:
        self.pipe = pipe
        self.capabilities = pipe.capabilities
        self.note = note  # shown under the title, e.g. that the weights are random
        self.model = model or f"random:{pipe.config.name}"
        self.preset = preset
        self.output_dir = Path(output_dir) if output_dir else Path(tempfile.mkdtemp(prefix="infinitystar-web-"))
        self.output_dir.mkdir(parents=True, exist_ok=True)
        # One model, one request at a time: the page's queue runs one event at a time anyway; the lock also covers
        # direct calls and a stopped request whose worker is still finishing its current step.
        self._lock = threading.Lock()
        self._cancel_flags: dict[str, set[threading.Event]] = {}
        self._workers: dict[str, set[threading.Thread]] = {}
        self._flags_lock = threading.Lock()

    # ------------------------------------------------------------------------------------------
    # What the widgets offer
    # ------------------------------------------------------------------------------------------

    @property
    def fps(self) -> int:
        return int(self.capabilities.fps)

    @property
    def seconds_step(self) -> float:
        """Lengths are 1 + time_stride*k frames: steps of time_stride / fps seconds (0.25 s at 16 fps)."""
        return self.pipe.config.vae.time_stride / self.pipe.config.fps

    @property
    def default_seconds(self) -> float:
        return float(self.pipe.config.default_seconds)

    @property
    def max_seconds(self) -> float:
        """The longest video the page asks for: four default lengths (at least 4 s), or less if the model says so."""
        page = float(max(4 * self.pipe.config.default_seconds, 4))
        model = self.capabilities.max_seconds
        return page if model is None else min(page, float(model))

    @property
    def segment_seconds(self) -> float:
        """Length each further prompt of an interactive story adds."""
        cfg = self.pipe.config
        return cfg.frames_inner_clip * cfg.vae.time_stride / cfg.fps

    @property
    def default_guidance(self) -> float:
        return float(self.pipe.config.sampling.guidance_scale)

    def modes(self) -> list[str]:
        """The page's modes this model can do (``capabilities.tasks``), in the page's order."""
        return [m for m in MODES if MODE_TASKS[m] in self.capabilities.tasks]

    def default_mode(self) -> str:
        modes = self.modes()
        return TEXT_TO_VIDEO if TEXT_TO_VIDEO in modes else modes[0]

    def size_choices(self) -> list[tuple[str, str]]:
        """(label in plain words, aspect) for each size the model can generate."""
        sizes = self.capabilities.sizes
        return [(size_label(a, *sizes[a]), a) for a in self.capabilities.aspects if a in sizes]

    def display_scale(self) -> int:
        """Whole factor a result is shown enlarged by: to about :data:`DISPLAY_PIXELS` for small models (64 px
        -> 4x), 1 (the native size) for big ones."""
        sides = [max(h, w) for h, w in self.capabilities.sizes.values()] or [DISPLAY_PIXELS]
        return max(1, DISPLAY_PIXELS // max(sides))

    def describe_model(self) -> str:
        caps = self.capabilities
        makes = [w for w, tasks in (("images", ("text-to-image",)),
                                    ("videos", ("text-to-video", "image-to-video", "video-extension", "interactive")))
                 if any(t in caps.tasks for t in tasks)]
        sizes = "; ".join(label.lower() for label, _ in self.size_choices())
        text = f"Model **{self.pipe.config.name}**: makes {' and '.join(makes)} ({sizes})"
        if "videos" in makes:
            text += f" at {caps.fps} frames per second, up to {self.max_seconds:g} s long"
        return f"{text}. {self.note}" if self.note else f"{text}."

    def vocabulary_hint(self) -> str | None:
        """The words a closed-vocabulary model knows (None: it reads any text)."""
        vocabulary = self.capabilities.vocabulary
        if vocabulary is None:
            return None
        words = set(vocabulary)
        if _knows_demo_domain(words):
            return (f"This model knows only a few words. Name one colour ({', '.join(COLOURS)}), one shape "
                    f"({', '.join(SHAPES)}) and one direction ({', '.join(DIRECTIONS)}), e.g. "
                    f"*{caption(SEEN_EVAL_TRIPLES[0])}*; other words mean nothing to it.")
        listed = sorted(words)
        more = f" and {len(listed) - 60} more" if len(listed) > 60 else ""
        return f"This model knows only these words: {', '.join(listed[:60])}{more}; other words mean nothing to it."

    def examples(self) -> list[tuple[str, list[str]]]:
        """Groups of (label, example prompts) to click: for the demo domain, seen and held-out combinations."""
        vocabulary = self.capabilities.vocabulary
        if vocabulary is None:
            return [("Examples", list(OPEN_EXAMPLES))]
        if _knows_demo_domain(set(vocabulary)):
            return [("Examples", [caption(t) for t in SEEN_EVAL_TRIPLES[:6]]),
                    ("Combinations it never saw in training", [caption(t) for t in HELD_OUT[:6]])]
        return []

    def mode_hint(self, mode: str) -> str:
        """One sentence on what to give in ``mode``."""
        return {
            TEXT_TO_IMAGE: "Describe a picture; you get one image.",
            TEXT_TO_VIDEO: "Describe what happens; you get a video of the length you choose.",
            IMAGE_TO_VIDEO: "Upload an image and describe what happens next; your image is the first frame.",
            VIDEO_EXTENSION: "Upload a video and describe how it goes on; the result starts with your video.",
            INTERACTIVE: f"Write the story one prompt per line; each adds about {self.segment_seconds:g} s. "
                         "Upload a video to continue it, or leave that empty to start from the first prompt.",
        }.get(mode, "")

    @staticmethod
    def length_label(mode: str) -> str | None:
        """The length field's label in ``mode`` (None: the mode takes no length)."""
        return {TEXT_TO_VIDEO: "Length (seconds)", IMAGE_TO_VIDEO: "Length (seconds)",
                VIDEO_EXTENSION: "Total length (seconds, your video included)"}.get(mode)

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

    @staticmethod
    def checked_seed(seed: Any) -> int | None:
        """The seed the page asks for; None (empty field) asks the pipeline to draw one."""
        if seed is None or (isinstance(seed, str) and not seed.strip()):
            return None
        if isinstance(seed, bool):
            raise ValueError(f"seed must be a whole number, got {seed!r}")
        try:
            value = int(seed)
        except (TypeError, ValueError):
            raise ValueError(f"seed must be a whole number, got {seed!r}") from None
        if value != seed and not isinstance(seed, str):
            raise ValueError(f"seed must be a whole number, got {seed!r}")
        if not 0 <= value <= MAX_SEED:
            raise ValueError(f"seed must be between 0 and {MAX_SEED}, got {value}")
        return value

    def plan(self, req: WebRequest) -> _Plan:
        """Check ``req`` and turn it into pipeline arguments; raises ValueError/FileNotFoundError with a message."""
        if req.mode not in MODES:
            raise ValueError(f"unknown mode {req.mode!r}; choose one of {', '.join(self.modes())}")
        if req.mode not in self.modes():
            raise ValueError(f"this model cannot do {req.mode.lower()}; it offers: {', '.join(self.modes())}")
        prompt = (req.prompt or "").strip()
        if not prompt:
            raise ValueError("the prompt is empty: describe what to generate")
        seed = self.checked_seed(req.seed)
        guidance = None if req.guidance is None else float(req.guidance)
        self.pipe.config.sampling.with_guidance_scale(guidance)  # the one check of the scale, before queueing
        aspect = req.aspect or None
        # The size first: its message names the aspects this preset can do.
        _, _, (height, width) = self.pipe.resolve_size(aspect=aspect)
        negative = (req.negative_prompt or "").strip() or None
        common = dict(aspect=aspect, guidance_scale=guidance, seed=seed)
        size = f"{width}x{height}"
        record = dict(prompt=prompt, negative_prompt=negative, guidance_scale=guidance, aspect=aspect,
                      input_image=None, input_video=None)
        if req.mode == INTERACTIVE:
            prompts = [prompt] + [line.strip() for line in (req.segments or "").splitlines() if line.strip()]
            video = self._checked_video(req.video) if req.video else None
            record.update(prompts=tuple(prompts), input_video=Path(video).name if video else None, negative_prompt=None)
            if video is not None:
                # interactive() makes the video segment 0 and ignores prompts[0]; on the page the prompt above
                # is the first segment that continues the video.
                prompts = [prompt] + prompts
            return _Plan("interactive", "interactive", dict(prompts=prompts, video=video, **common), len(prompts),
                         False, f"{len(prompts)} segment(s){' (the video first)' if video else ''}, {size}", record)
        num_frames = 1 if req.mode == TEXT_TO_IMAGE else self.num_frames(req.seconds)
        kwargs: dict[str, Any] = dict(prompt=prompt, negative_prompt=negative, num_frames=num_frames, **common)
        if req.mode == IMAGE_TO_VIDEO:
            if not req.image:
                raise ValueError("image to video needs an image: upload one (png, jpg or webp)")
            kwargs["image"] = self._checked_image(req.image)
            record["input_image"] = Path(req.image).name
        elif req.mode == VIDEO_EXTENSION:
            if not req.video:
                raise ValueError("video extension needs a video: upload one (mp4, webm, mov, ...)")
            kwargs["video"] = self._checked_video(req.video)
            record["input_video"] = Path(req.video).name
        is_image = num_frames == 1
        what = "image" if is_image else f"{num_frames} frames ({(num_frames - 1) / self.fps:g} s)"
        return _Plan("call", MODE_TASKS[req.mode], kwargs, 1, is_image, f"{what}, {size}", record)

    def unknown_words(self, req: WebRequest) -> list[str]:
        """Words of the request's prompts a closed-vocabulary model does not know (a warning, not an error)."""
        if self.capabilities.vocabulary is None:
            return []
        text = "\n".join([req.prompt or ""] + ([req.segments or ""] if req.mode == INTERACTIVE else []))
        return list(dict.fromkeys(self.capabilities.unknown_words(text)))

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

    def preview_image(self, path: str | None) -> tuple[Any, str | None]:
        """(a small copy of the uploaded image to show, None) or (None, the message why it cannot be read)."""
        if not path:
            return None, None
        try:
            image = media.read_image(path)
        except (ValueError, FileNotFoundError) as exc:
            return None, scrub_paths(str(exc), path, self.output_dir)
        image.thumbnail((512, 512))
        return image, None

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
        """Wait until the generations ``session`` started have ended (a stopped one ends at its next progress
        event: a scale step, a decoded chunk, a written frame).

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

        Closing the iterator early (the page's Stop, a closed tab) stops the generation at its next progress event.
        """
        cancel = cancel or threading.Event()
        self._register(session, cancel)
        try:
            for update in self._generate(req, cancel, session):
                # No message shows where the server keeps files: the uploads' and results' names only.
                update.status = scrub_paths(update.status, req.image, req.video, self.output_dir)
                if update.error is not None:
                    update.error = scrub_paths(update.error, req.image, req.video, self.output_dir)
                yield update
        finally:
            cancel.set()  # a closed iterator (Stop, disconnect) stops the worker too
            self._unregister(session, cancel)

    def _generate(self, req: WebRequest, cancel: threading.Event, session: str) -> Iterator[WebUpdate]:
        try:
            plan = self.plan(req)
        except (ValueError, FileNotFoundError) as exc:
            yield _error(str(exc))
            return
        unknown = self.unknown_words(req)
        notice = f"The model does not know: {', '.join(unknown)}" if unknown else None
        events: queue.Queue[tuple[str, Any]] = queue.Queue()
        stem = uuid.uuid4().hex[:12]
        worker = threading.Thread(target=self._work, args=(plan, stem, cancel, events, session), daemon=True,
                                  name=f"infinitystar-web-{stem}")
        with self._flags_lock:
            self._workers.setdefault(session, set()).add(worker)
        t0 = time.perf_counter()
        clips: list[str] = []
        tracker = ProgressTracker(plan.segments)
        seed_text = "random seed" if plan.kwargs["seed"] is None else f"seed {plan.kwargs['seed']}"
        yield WebUpdate(status=f"Waiting for the model... ({plan.summary}, {seed_text})", progress=0.0,
                        notice=notice)
        worker.start()
        while True:
            kind, value = events.get()  # the worker always ends with done, cancelled or error
            if kind == "started":
                yield WebUpdate(status=f"Generating {plan.summary}...", clips=list(clips), progress=0.0)
            elif kind == "progress":
                words, frac = tracker.update(value)
                yield WebUpdate(status=f"Generating {plan.summary}: {words}", clips=list(clips), progress=frac)
            elif kind == "clip":
                clips.append(value)
                yield WebUpdate(status=f"Clip {len(clips)} done ({plan.summary})", clips=list(clips),
                                progress=tracker.fraction)
            elif kind == "done":
                seconds = time.perf_counter() - t0
                yield WebUpdate(status=f"Done in {seconds:.1f} s: {plan.summary}, seed {value.seed}.",
                                clips=list(clips), result=value.path, is_image=plan.is_image, progress=1.0,
                                seed=value.seed, files=[value.path, value.record])
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

    def _run_plan(self, plan: _Plan, stem: str, cancel: threading.Event, events: queue.Queue) -> _Result:
        pipe = self.pipe
        folder = self.output_dir / stem  # one folder per request: the result keeps the CLI's name for download
        folder.mkdir(parents=True, exist_ok=True)

        def on_progress(event: ProgressEvent) -> None:
            if cancel.is_set():
                raise Cancelled  # aborts the pipeline wherever it is: a scale step, a decoded chunk, a frame
            events.put(("progress", event))

        def on_clip(index: int, frames: Any) -> None:
            if cancel.is_set():
                raise Cancelled
            path = folder / f"clip{index + 1:03d}.{'png' if len(frames) == 1 else 'mp4'}"
            media.save_output(frames, path, fps=self.fps)
            events.put(("clip", str(path)))

        if plan.kind == "interactive":
            result = pipe.interactive(**plan.kwargs, output_type="np", callback_on_segment_end=on_clip,
                                      progress=on_progress)
        else:
            result = pipe(**plan.kwargs, output_type="np", callback_on_clip_end=None if plan.is_image else on_clip,
                          progress=on_progress)
        if cancel.is_set():
            raise Cancelled
        record = self._record(plan, result.frames, int(result.seed))
        path = folder / outputs.default_output_name(record, "png" if plan.is_image else "mp4")
        outputs.save_output_with_record(result.frames, path, record, fps=self.fps,
                                        progress=lambda done, total: on_progress(ProgressEvent("write", done, total)))
        return _Result(str(path), str(outputs.record_path(path)), record.seed)

    def _record(self, plan: _Plan, frames: Any, seed: int) -> outputs.RunRecord:
        pipe = self.pipe
        t, h, w = len(frames), frames[0].shape[0], frames[0].shape[1]
        return outputs.RunRecord(**plan.record, seed=seed, task=plan.task, num_frames=t, fps=self.fps, height=h,
                                 width=w, model=self.model, preset=self.preset, precision=pipe.precision,
                                 memory_mode=pipe.memory_mode.name, device=str(pipe.device))


def _error(message: str, clips: list[str] | None = None) -> WebUpdate:
    return WebUpdate(status=f"Error: {message}", clips=list(clips or []), error=message)


# ----------------------------------------------------------------------------------------------
# The Gradio page
# ----------------------------------------------------------------------------------------------


def page_css(app: WebApp) -> str:
    """The page's style: a small result enlarged by a whole factor with crisp pixels (64 px -> 256 px), a big one at
    its own size (never wider than its column)."""
    scale = app.display_scale()
    css = ["#status p, #seed-used p { margin: 0; }",
           "#result-video video, #result-image img { max-width: 100%; object-fit: contain; display: block; "
           "margin: 0 auto; }"]
    if scale > 1:
        css.append("#result-video video, #result-image img, #clips img, #clips video { image-rendering: pixelated; }")
        css.append(f"#result-video video, #result-image img {{ zoom: {scale}; width: auto !important; "
                   "height: auto !important; }")
    return "\n".join(css)


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


def _session(request: Any) -> str:
    return getattr(request, "session_hash", None) or "default"


def build_blocks(app: WebApp):
    """The page (a ``gr.Blocks``, queue configured) over ``app``. Launch it with :func:`launch`."""
    gr = _require_gradio()
    sizes = app.size_choices()
    first = app.default_mode()
    hint = app.vocabulary_hint()
    # delete_cache: Gradio's copies of uploads and results older than a day go, checked hourly.
    with gr.Blocks(title="InfinityStar", analytics_enabled=False, delete_cache=(3600, 86400)) as blocks:
        gr.Markdown("# InfinityStar\n" + app.describe_model(), elem_id="model")
        with gr.Row():
            with gr.Column(scale=1):
                prompt = gr.Textbox(label="Prompt", lines=2, elem_id="prompt",
                                    placeholder=app.examples()[0][1][0] if app.examples() else "")
                if hint is not None:
                    gr.Markdown(hint, elem_id="vocabulary")
                for i, (label, prompts) in enumerate(app.examples()):
                    gr.Examples([[p] for p in prompts], [prompt], label=label, elem_id=f"examples-{i}")
                mode = gr.Radio(app.modes(), value=first, label="What to make", elem_id="mode")
                mode_hint = gr.Markdown(app.mode_hint(first), elem_id="mode-hint")
                with gr.Group(visible=first == IMAGE_TO_VIDEO) as image_box:
                    image = gr.File(label="Image (the first frame)", file_types=list(media.IMAGE_SUFFIXES),
                                    type="filepath", elem_id="image")
                    preview = gr.Image(label="Your image", type="pil", format="png", interactive=False,
                                       visible=False, elem_id="image-preview", height=200)
                video = gr.File(label="Video to continue", file_types=list(media.VIDEO_READ_SUFFIXES),
                                type="filepath", visible=first in (VIDEO_EXTENSION, INTERACTIVE), elem_id="video")
                segments = gr.Textbox(label="Further segments, one prompt per line (the prompt above is the first)",
                                      lines=3, visible=first == INTERACTIVE, elem_id="segments")
                length = app.length_label(first)
                seconds = gr.Slider(app.seconds_step, app.max_seconds, value=app.default_seconds,
                                    step=app.seconds_step, label=length or "Length (seconds)",
                                    visible=length is not None, elem_id="seconds")
                aspect = gr.Dropdown(sizes, value=sizes[0][1] if sizes else None, label="Size", elem_id="aspect")
                with gr.Accordion("Advanced settings", open=False, elem_id="advanced"):
                    negative = gr.Textbox(label="Negative prompt (what to avoid)", lines=1, elem_id="negative")
                    # A text box: a number field cannot be empty, and empty means "a new random seed".
                    seed = gr.Textbox(value="", label="Seed (empty: a new random one each time)", max_lines=1,
                                      placeholder="random", elem_id="seed")
                    guidance = gr.Slider(1.0, max(10.0, 2 * app.default_guidance), value=app.default_guidance,
                                         step=0.5, label="Guidance (how closely to follow the prompt; 1 = off)",
                                         elem_id="guidance")
                with gr.Row():
                    run = gr.Button("Generate", variant="primary", elem_id="generate")
                    stop = gr.Button("Stop", variant="stop", elem_id="stop")
            with gr.Column(scale=1):
                status = gr.Markdown("Ready.", elem_id="status")
                seed_used = gr.Markdown("", elem_id="seed-used")
                out_video = gr.Video(label="Result", interactive=False, elem_id="result-video", autoplay=True,
                                     loop=True)
                out_image = gr.Image(label="Result", type="filepath", interactive=False, visible=False,
                                     elem_id="result-image")
                download = gr.File(label="Download: the result and its settings (.json)", file_count="multiple",
                                   interactive=False, elem_id="download")
                clips = gr.Gallery(label="Finished clips", columns=4, height=160, elem_id="clips",
                                   interactive=False)

        def on_mode(m: str):
            label = app.length_label(m)
            return (gr.update(visible=m == IMAGE_TO_VIDEO), gr.update(visible=m in (VIDEO_EXTENSION, INTERACTIVE)),
                    gr.update(visible=m == INTERACTIVE),
                    gr.update(visible=label is not None, label=label or "Length (seconds)"), app.mode_hint(m))

        mode.change(on_mode, mode, [image_box, video, segments, seconds, mode_hint], queue=False)

        def on_image(path: str | None):
            shown, message = app.preview_image(path)
            return (gr.update(value=shown, visible=shown is not None),
                    f"Error: {message}" if message else gr.skip())

        image.change(on_image, image, [preview, status], queue=False)

        def on_generate(prompt_v, negative_v, mode_v, seconds_v, aspect_v, seed_v, guidance_v, image_v, video_v,
                        segments_v, request: gr.Request, progress=gr.Progress()):  # noqa: B008
            req = WebRequest(prompt=prompt_v, mode=mode_v, negative_prompt=negative_v, seconds=seconds_v,
                             aspect=aspect_v, seed=seed_v, guidance=guidance_v, image=image_v, video=video_v,
                             segments=segments_v)
            for up in app.generate(req, session=_session(request)):
                if up.progress is not None and up.error is None:
                    progress(up.progress, desc=up.status)
                if up.notice is not None:
                    gr.Warning(up.notice, title="Unknown words")
                if up.error is not None:
                    gr.Warning(up.error, title="Not generated")
                gallery = up.clips or None
                if up.result is None:
                    yield up.status, gr.skip(), gr.skip(), gr.skip(), gr.skip(), gallery
                    continue
                used = f"Seed of this result: **{up.seed}** (enter it under Advanced settings to make it again)"
                shown = (gr.update(value=None, visible=False), gr.update(value=up.result, visible=True))
                if not up.is_image:
                    shown = (gr.update(value=up.result, visible=True), gr.update(value=None, visible=False))
                yield (up.status, used, *shown, up.files, gallery)

        inputs = [prompt, negative, mode, seconds, aspect, seed, guidance, image, video, segments]
        outputs_ = [status, seed_used, out_video, out_image, download, clips]
        event = run.click(on_generate, inputs, outputs_, concurrency_limit=1, concurrency_id="model",
                          show_progress="full")

        def on_stop(request: gr.Request):
            session = _session(request)
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
                  show_error=False, quiet=quiet, ssr_mode=False, theme=local_theme(), css=page_css(app),
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
          output_dir: str | None = None, limits: Sequence[str] = ()) -> None:
    """``infinitystar serve``: load the pipeline once (see :func:`load_pipeline` for the device options) and serve
    the page until interrupted."""
    _require_gradio()
    pipe = load_pipeline(model, preset, device=device, precision=precision, memory_mode=memory_mode, limits=limits,
                         compile_blocks=compile_blocks)
    app = WebApp(pipe, output_dir, note=weights_note(model, preset), model=run_model_name(model, preset),
                 preset=preset)
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


__all__ = ["MODES", "MODE_TASKS", "Cancelled", "ProgressTracker", "WebApp", "WebRequest", "WebUpdate",
           "build_blocks", "launch", "local_theme", "page_css", "scrub_paths", "serve", "size_label",
           "weights_note"]

"""Reading and writing images and videos (PyAV and Pillow only), and the pixel transform.

The models see pixels as float tensors in [-1, 1], RGB, laid out ``[3, T, H, W]`` (a batch adds a
leading ``B``). This module owns every step between files and those tensors:

* images: :func:`read_image` (png/jpg/webp -> RGB PIL image), :func:`load_image_tensor`;
* videos: :func:`probe_video` -> :class:`VideoInfo`, :func:`read_video` (optionally resampled to a
  target fps by frame presentation times), :func:`load_video_tensor`; conditioning clips the reference's way:
  :func:`count_video_frames`, :func:`clip_frame_indices`, :func:`read_video_clip`;
* the reference's pixel transform (spec vae.md 2, training.md 2.5, inference.md 3): PIL LANCZOS resize
  so the picture *covers* the target box, then centre crop -- :func:`resize_and_center_crop`;
* uint8 frames <-> tensors: :func:`frames_to_tensor`, :func:`tensor_to_frames`;
* output: :func:`write_video` (H.264 mp4, optional container tags), :func:`write_image` (png/jpg/webp, optional
  png text chunks), :func:`write_gif`, and :func:`save_output` which picks one by the file suffix;
  :func:`read_video_metadata` and :func:`read_image_text` read the tags back. Every writer is atomic: it writes a temp
  file in the target's directory and ``os.replace``-s it, so an interrupted or failed write never
  leaves a partial file at the target path (and removes its temp file).

Where we differ from the reference, on purpose:

* Frames are written in RGB. The reference flips decoded frames to BGR for OpenCV and flips back
  before ``imageio``; we never leave RGB.
* float -> uint8 truncates by default, exactly as the reference (so on average half a level darker
  than the nearest level); ``tensor_to_frames(x, rounding="round")`` gives the nearest level instead.
* :func:`read_video` samples frames by presentation timestamp (nearest frame to ``start + i/fps``),
  not by the reference's ``linspace`` over frame indices, whose half-open window duplicates frame 0
  of a 16 fps source and drifts by up to two frames on 24 fps sources (training.md 2.4 allows this).
  The conditioning clips of video extension and interactive generation use the reference's rule
  itself (:func:`read_video_clip`), duplicated frame 0 included.
* The "copy decoded frame 1 over frame 0" step of the reference's output path is not done here; it
  belongs to the pipeline (inference.md 2.6), which decides whether to reproduce it.

Errors: a missing file raises ``FileNotFoundError``; every other bad input (unsupported suffix,
unreadable or corrupt file, no video stream, no frames, wrong array shape/dtype, bad fps/size)
raises :class:`MediaError` (a ``ValueError``) whose message names the path or the bad value.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Literal

import av
import numpy as np
import torch
from PIL import Image, ImageOps, PngImagePlugin, UnidentifiedImageError

from .config import limit_hint
from .fileio import atomic_output as _atomic_output

__all__ = [
    "check_input_size",
    "DEFAULT_CRF",
    "DEFAULT_FPS",
    "GIF_SUFFIXES",
    "IMAGE_SUFFIXES",
    "VIDEO_READ_SUFFIXES",
    "VIDEO_WRITE_SUFFIXES",
    "MediaError",
    "VideoInfo",
    "clip_frame_indices",
    "count_video_frames",
    "cover_resize_size",
    "frames_to_tensor",
    "h264_encoder",
    "load_image_tensor",
    "load_video_tensor",
    "probe_video",
    "read_image",
    "read_image_text",
    "read_video",
    "read_video_clip",
    "read_video_metadata",
    "resize_and_center_crop",
    "save_output",
    "tensor_to_frames",
    "write_gif",
    "write_image",
    "write_video",
]

PathLike = str | os.PathLike
# What the writers accept as "frames": uint8 [T,H,W,3] (numpy or torch), one uint8 [H,W,3] frame,
# or a sequence of PIL images / uint8 [H,W,3] arrays.
FramesLike = np.ndarray | torch.Tensor | Image.Image | Sequence[Image.Image | np.ndarray]

DEFAULT_FPS = 16  # the frame rate the models were trained at and generate at
DEFAULT_CRF = 18  # libx264 constant-rate factor: visually near-lossless, ~10x smaller than crf 0

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
GIF_SUFFIXES = (".gif",)
VIDEO_READ_SUFFIXES = (".mp4", ".m4v", ".mov", ".webm", ".mkv", ".avi", ".gif")
VIDEO_WRITE_SUFFIXES = (".mp4", ".m4v", ".mov", ".mkv")
_MUXER_BY_SUFFIX = {".mp4": "mp4", ".m4v": "mp4", ".mov": "mov", ".mkv": "matroska"}
_PIL_FORMAT_BY_SUFFIX = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP", ".gif": "GIF"}

# Tried in order by :func:`h264_encoder`. "h264" is whatever the FFmpeg build registers as its default
# H.264 encoder (libx264 in the PyPI wheels); hardware encoders (nvenc, vaapi, ...) are left out on
# purpose because their presence in the build says nothing about the machine having the hardware.
_H264_CANDIDATES = ("libx264", "h264", "libopenh264")


class MediaError(ValueError):
    """A media file or frame array that cannot be used; the message names the path or value."""


# --------------------------------------------------------------------------------------------- paths


def _checked_input(path: PathLike, suffixes: Sequence[str], kind: str) -> Path:
    """``path`` as a Path after checking that it exists, is a file and has a supported suffix."""
    p = Path(path)
    if p.suffix.lower() not in suffixes:
        raise MediaError(f"unsupported {kind} file suffix {p.suffix!r} for {p}; expected one of {', '.join(suffixes)}")
    if not p.exists():
        raise FileNotFoundError(f"{kind} file not found: {p}")
    if not p.is_file():
        raise MediaError(f"{kind} path {p} is not a regular file")
    return p


def check_input_size(path: PathLike, kind: str, *, max_bytes: int, max_pixels: int) -> None:
    """Refuse an image or video file that is too large to read safely, from its size on disk and the frame size its
    header states, before anything is decoded (a decompression bomb: a small png that decodes to gigapixels)."""
    suffixes = IMAGE_SUFFIXES if kind == "image" else VIDEO_READ_SUFFIXES
    p = _checked_input(path, suffixes, kind)
    size = p.stat().st_size
    if size > max_bytes:
        raise MediaError(f"{kind} file {p.name} is {size / 2**20:.1f} MiB; the limit is {max_bytes / 2**20:.0f} MiB "
                         + limit_hint("max_upload_bytes"))
    if kind == "image":
        try:
            # Header only; PIL's own bomb warning is moot: the size is judged here, with the caller's limit.
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                with Image.open(p) as im:
                    w, h = im.size
        except (OSError, Image.DecompressionBombError) as exc:
            raise MediaError(f"cannot read image {p.name}: {exc}") from None
    else:
        info = probe_video(p)
        w, h = info.width, info.height
    if w * h > max_pixels:
        raise MediaError(f"{kind} {p.name} is {w}x{h} = {w * h / 1e6:.0f} megapixels a frame; the limit is "
                         f"{max_pixels / 1e6:.0f} " + limit_hint("max_upload_pixels"))


def _checked_output(path: PathLike, suffixes: Sequence[str], kind: str) -> Path:
    p = Path(path)
    if p.suffix.lower() not in suffixes:
        raise MediaError(f"cannot write {kind} to {p}: unsupported suffix {p.suffix!r}; "
                         f"expected one of {', '.join(suffixes)}")
    if p.is_dir():
        raise MediaError(f"cannot write {kind} to {p}: it is a directory")
    return p


# -------------------------------------------------------------------------------------------- images


def _pil_to_rgb(img: Image.Image, background: tuple[int, int, int] | None = None) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB.

    Alpha is dropped by default, as the reference's ``cv2.imread(IMREAD_COLOR)`` does; pass
    ``background`` to composite transparent pixels onto that colour instead. 16-bit greyscale is
    scaled to 8 bits (v / 257, rounded) instead of Pillow's clipping conversion.
    """
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        a = np.asarray(img).astype(np.float64)
        a8 = np.clip(np.rint(a / 257.0), 0, 255).astype(np.uint8)
        return Image.fromarray(a8, mode="L").convert("RGB")
    if background is not None and (img.mode in ("RGBA", "LA", "PA", "La", "RGBa")
                                   or (img.mode == "P" and "transparency" in img.info)):
        rgba = img.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (*background, 255))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    return img.convert("RGB")


def read_image(path: PathLike, *, background: tuple[int, int, int] | None = None) -> Image.Image:
    """Read a png/jpg/jpeg/webp file as an RGB PIL image.

    EXIF orientation is applied (as ``cv2.imread`` does in the reference). RGBA/LA/P/L/CMYK/16-bit
    inputs are converted to 8-bit RGB (see :func:`_pil_to_rgb` for alpha). Animated files give their
    first frame. Raises ``FileNotFoundError`` for a missing file and :class:`MediaError` for an
    unsupported suffix or a file Pillow cannot decode (random bytes, a truncated png, ...).
    """
    p = _checked_input(path, IMAGE_SUFFIXES, "image")
    try:
        with Image.open(p) as img:
            img.load()  # decode now: a truncated file fails here, not later in a resize
            oriented = ImageOps.exif_transpose(img)
            return _pil_to_rgb(oriented, background).copy()
    except UnidentifiedImageError as e:
        raise MediaError(f"cannot read image {p}: not a recognised image file ({e})") from e
    except (OSError, SyntaxError, ValueError) as e:  # Pillow reports corrupt/truncated data as OSError/SyntaxError
        raise MediaError(f"cannot read image {p}: corrupt or truncated ({e})") from e


def cover_resize_size(width: int, height: int, target_width: int, target_height: int) -> tuple[int, int]:
    """Size ``(w, h)`` the reference resizes a ``width x height`` picture to before its centre crop.

    Keep the aspect ratio and cover the target box: scale to the target width when the picture is
    relatively taller (``width/height <= target_width/target_height``), else to the target height; the
    other side is truncated with ``int()`` like the reference. The reference's float division can
    truncate the other side to one pixel *below* the target (its crop would then be too small); we
    clamp to the target size instead.
    """
    for name, v in (("width", width), ("height", height), ("target_width", target_width),
                    ("target_height", target_height)):
        if int(v) != v or v < 1:
            raise MediaError(f"{name} must be a positive integer, got {v!r}")
    if width / height <= target_width / target_height:
        return target_width, max(target_height, int(target_width / (width / height)))
    return max(target_width, int(width / height * target_height)), target_height


def _resize_crop_pil(img: Image.Image, height: int, width: int) -> Image.Image:
    rw, rh = cover_resize_size(img.width, img.height, width, height)
    resized = img.resize((rw, rh), resample=Image.Resampling.LANCZOS)
    top, left = (rh - height) // 2, (rw - width) // 2  # floor, as the reference's `// 2` on the array
    return resized.crop((left, top, left + width, top + height))


def resize_and_center_crop(
    frames: np.ndarray | Image.Image, height: int, width: int
) -> np.ndarray | Image.Image:
    """The reference's pixel transform (without the final [-1, 1] mapping), applied per frame.

    LANCZOS-resize so the picture covers ``height x width`` (:func:`cover_resize_size`), then crop the
    centre (offset ``(resized - target) // 2`` on each axis). Accepts a PIL image (returns a PIL image),
    one uint8 frame ``[H, W, 3]`` or uint8 frames ``[T, H, W, 3]`` (returns the same layout).
    """
    cover_resize_size(1, 1, width, height)  # validates the target size
    if isinstance(frames, Image.Image):
        return _resize_crop_pil(_pil_to_rgb(frames), height, width)
    arr = _check_uint8_frames(frames, "resize_and_center_crop input", allow_single=True)
    single = arr.ndim == 3
    arr_THW3 = arr[None] if single else arr
    out_THW3 = np.empty((arr_THW3.shape[0], height, width, 3), dtype=np.uint8)
    for i, frame_HW3 in enumerate(arr_THW3):
        out_THW3[i] = np.asarray(_resize_crop_pil(Image.fromarray(frame_HW3), height, width))
    return out_THW3[0] if single else out_THW3


# -------------------------------------------------------------------------------- frames <-> tensors


def _check_uint8_frames(frames: object, what: str, *, allow_single: bool = False) -> np.ndarray:
    """``frames`` as a uint8 numpy array ``[T, H, W, 3]`` (or ``[H, W, 3]`` when ``allow_single``)."""
    if isinstance(frames, torch.Tensor):
        frames = frames.detach().cpu().numpy()
    if not isinstance(frames, np.ndarray):
        raise MediaError(f"{what} must be a uint8 numpy array [T, H, W, 3], got {type(frames).__name__}")
    ok_ndim = (3, 4) if allow_single else (4,)
    if frames.ndim not in ok_ndim or frames.shape[-1] != 3 or 0 in frames.shape:
        want = "[T, H, W, 3] or [H, W, 3]" if allow_single else "[T, H, W, 3]"
        raise MediaError(f"{what} must have shape {want} (RGB, channels last, non-empty), got {tuple(frames.shape)}")
    if frames.dtype != np.uint8:
        raise MediaError(f"{what} must be uint8, got {frames.dtype} (use tensor_to_frames for float tensors "
                         "in [-1, 1])")
    return frames


def frames_to_tensor(frames: np.ndarray) -> torch.Tensor:
    """uint8 frames ``[T, H, W, 3]`` -> float32 ``[3, T, H, W]`` in [-1, 1].

    Same arithmetic as the reference (``to_tensor``: ``x / 255`` in float32, then ``x + x - 1``), so
    the values match it bit for bit.
    """
    arr_THW3 = np.ascontiguousarray(_check_uint8_frames(frames, "frames"))
    if not arr_THW3.flags.writeable:  # e.g. np.asarray(PIL image); torch.from_numpy warns on read-only memory
        arr_THW3 = arr_THW3.copy()
    x_3THW = torch.from_numpy(arr_THW3).permute(3, 0, 1, 2).float().div(255)
    return x_3THW.add(x_3THW).sub_(1)


def tensor_to_frames(x: torch.Tensor, rounding: Literal["round", "truncate"] = "truncate") -> np.ndarray:
    """Float pixels in [-1, 1], ``[3, T, H, W]`` or ``[1, 3, T, H, W]`` -> uint8 RGB frames ``[T, H, W, 3]``.

    ``v = clamp((x + 1) / 2, 0, 1) * 255`` computed in float32 (the VAE output is not clamped, so the
    clamp matters), then converted to uint8:

    * ``rounding="truncate"`` (default): drop the fraction, exactly the reference's ``.to(uint8)``
      (golden README 15: its frames before the BGR flip);
    * ``rounding="round"``: round half to even (``torch.round``), i.e. the nearest level (on average
      half a level brighter than the reference).

    NaN/inf values raise :class:`MediaError` instead of becoming arbitrary bytes.
    """
    if rounding not in ("round", "truncate"):
        raise MediaError(f"rounding must be 'round' or 'truncate', got {rounding!r}")
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        what = f"{x.dtype} tensor" if isinstance(x, torch.Tensor) else type(x).__name__
        raise MediaError(f"tensor_to_frames expects a float tensor in [-1, 1], got {what}")
    if x.ndim == 5:
        if x.shape[0] != 1:
            raise MediaError(f"tensor_to_frames takes one video; got a batch of {x.shape[0]} "
                             f"(shape {tuple(x.shape)}), pass x[b] for each")
        x = x[0]
    if x.ndim != 4 or x.shape[0] != 3 or 0 in x.shape:
        raise MediaError(f"tensor_to_frames expects [3, T, H, W] or [1, 3, T, H, W], got {tuple(x.shape)}")
    x = x.detach()
    _, t, h, w = x.shape
    out_THW3 = torch.empty((t, h, w, 3), dtype=torch.uint8)
    # A few frames at a time: bounds the float temporaries (a 720p 81-frame video is 0.9 GB in float32)
    # and keeps them in cache; a device tensor is copied to the CPU chunk by chunk too.
    chunk = max(1, (8 << 20) // max(1, 3 * h * w))
    for t0 in range(0, t, chunk):
        x_c = x[:, t0:t0 + chunk].to(device="cpu", dtype=torch.float32)
        if not bool(torch.isfinite(x_c).all()):
            raise MediaError(f"tensor_to_frames: NaN or inf values in frames {t0}..{min(t, t0 + chunk) - 1}")
        v = x_c.add(1).div_(2).clamp_(0, 1).mul_(255)  # the reference's order of operations
        if rounding == "round":
            v.round_()
        out_THW3[t0:t0 + chunk] = v.permute(1, 2, 3, 0)  # float -> uint8 truncates toward zero
    return out_THW3.numpy()


def load_image_tensor(image: PathLike | Image.Image, height: int, width: int) -> torch.Tensor:
    """An image file or PIL image -> float32 ``[3, H, W]`` in [-1, 1] after the reference's transform.

    This is the I2V conditioning input (inference.md 3); add ``[None, :, None]`` for ``[1, 3, 1, H, W]``.
    A file goes through :func:`read_image` (EXIF orientation, RGB); a PIL image is used as given,
    only converted to RGB.
    """
    img = image if isinstance(image, Image.Image) else read_image(image)
    img = _resize_crop_pil(_pil_to_rgb(img), height, width)
    return frames_to_tensor(np.asarray(img)[None])[:, 0]


# --------------------------------------------------------------------------------------- video input


@dataclass(frozen=True)
class VideoInfo:
    """What the container says about a video's first video stream (nothing is decoded).

    ``fps`` is the stream's average frame rate (None if the container gives none); ``duration`` in
    seconds from the stream, else the container (None if unknown); ``num_frames`` as stored in the
    container (None when it does not store one, e.g. webm).
    """

    path: Path
    width: int
    height: int
    fps: float | None
    duration: float | None
    num_frames: int | None
    codec: str


@contextlib.contextmanager
def _open_video(path: Path) -> Iterator[tuple[av.container.InputContainer, av.video.stream.VideoStream]]:
    try:
        container = av.open(str(path), mode="r")
    except av.FFmpegError as e:
        raise MediaError(f"cannot read video {path}: not a readable media file ({e})") from e
    try:
        if not container.streams.video:
            kinds = ", ".join(s.type for s in container.streams) or "none"
            raise MediaError(f"{path} has no video stream (streams: {kinds})")
        yield container, container.streams.video[0]
    finally:
        container.close()


def _stream_rate(stream: av.video.stream.VideoStream) -> Fraction | None:
    for rate in (stream.average_rate, stream.guessed_rate, stream.base_rate):
        if rate:
            return Fraction(rate)
    return None


def probe_video(path: PathLike) -> VideoInfo:
    """Frame size, fps, duration, frame count and codec of a video file, without decoding it."""
    p = _checked_input(path, VIDEO_READ_SUFFIXES, "video")
    with _open_video(p) as (container, stream):
        rate = _stream_rate(stream)
        if stream.duration is not None and stream.time_base is not None:
            duration = float(stream.duration * stream.time_base)
        elif container.duration is not None:
            duration = container.duration / av.time_base
        else:
            duration = None
        return VideoInfo(path=p, width=stream.codec_context.width, height=stream.codec_context.height,
                         fps=float(rate) if rate else None, duration=duration,
                         num_frames=stream.frames or None, codec=stream.codec_context.name)


def _frame_to_rgb(frame: av.VideoFrame, apply_rotation: bool) -> np.ndarray:
    # rgb24 conversion honours the frame's colour tags (matrix, range), so full-range and BT.709
    # sources come out right; untagged video is treated as BT.601 limited range by swscale.
    arr_HW3 = frame.to_ndarray(format="rgb24")
    if apply_rotation:
        rot = frame.rotation or 0  # counter-clockwise degrees from the display matrix
        k = round(rot / 90) % 4
        if k:
            arr_HW3 = np.ascontiguousarray(np.rot90(arr_HW3, k))
    return arr_HW3


def _frame_duration(frame: av.VideoFrame, rate: Fraction | None, fallback: Fraction | None = None) -> Fraction:
    """How long ``frame`` is shown: its own duration when the container stores one (exact for VFR
    video), else one period of the stream's frame rate, else ``fallback`` (or 0)."""
    if frame.duration and frame.time_base is not None:
        return Fraction(frame.duration * frame.time_base)
    if rate:
        return 1 / rate
    return fallback or Fraction(0)


def _timed_frames(container, stream, p: Path, seek_to: Fraction) -> Iterator[tuple[Fraction, av.VideoFrame]]:
    """Decoded frames with their presentation time in seconds relative to the stream start.

    Seeks to the keyframe at or before ``seek_to`` first (when > 0); if the demuxer overshoots (first
    frame after the target), decodes again from the beginning so no wanted frame is skipped.
    """
    tb = stream.time_base
    origin = Fraction(stream.start_time * tb) if stream.start_time is not None and tb is not None else Fraction(0)
    rate = _stream_rate(stream)
    seeked = False
    if seek_to > 0 and tb is not None:
        with contextlib.suppress(av.FFmpegError):
            container.seek(math.floor((seek_to + origin) / tb), stream=stream, backward=True, any_frame=False)
            seeked = True
    count = 0
    last_t: Fraction | None = None
    last_frame: av.VideoFrame | None = None
    try:
        for frame in container.decode(stream):
            if frame.pts is not None and frame.time_base is not None:
                t = Fraction(frame.pts * frame.time_base) - origin
            elif last_t is not None and rate:  # no timestamps: assume a constant rate
                t = last_t + 1 / rate
            elif rate:
                t = count / rate
            else:
                raise MediaError(f"{p}: frames carry no timestamps and the stream has no frame rate")
            if seeked and count == 0 and t > seek_to:
                container.seek(stream.start_time or 0, stream=stream, backward=True, any_frame=False)
                yield from _timed_frames(container, stream, p, Fraction(0))
                return
            count += 1
            last_t, last_frame = t, frame
            yield t, frame
    except av.FFmpegError as e:
        where = f"after t={float(last_t):.3f}s" if last_t is not None else "at the first frame"
        raise MediaError(f"error decoding video {p} {where}: {e}") from e
    # Reached only when decoding ran to the end (a consumer that stops early closes us at `yield`).
    # FFmpeg stops quietly at the end of a file cut short after its index (e.g. a faststart mp4 copied
    # partially), so compare with the duration the stream's index promises: more than two frames
    # missing means the file is truncated, and returning the partial video would be silent data loss.
    if stream.duration is not None and tb is not None and rate and last_t is not None:
        promised_end = Fraction(stream.duration * tb)  # a length: times here are relative to the stream start
        if last_t + _frame_duration(last_frame, rate) < promised_end - 2 / rate:
            raise MediaError(f"video {p} is truncated: decoding stopped at t={float(last_t):.3f}s but the "
                             f"stream's index says it lasts {float(promised_end):.3f}s")


def read_video(
    path: PathLike,
    fps: float | None = None,
    max_frames: int | None = None,
    start_time: float = 0.0,
    *,
    end_tolerance: float = 0.0,
    apply_rotation: bool = True,
) -> tuple[np.ndarray, float]:
    """Decode a video (mp4, webm, mov, mkv, avi, gif) into uint8 RGB frames ``[T, H, W, 3]``.

    Returns ``(frames, fps_out)``.

    * ``fps=None``: every frame whose presentation time is at or after ``start_time`` (up to
      ``max_frames``); ``fps_out`` is the stream's average frame rate.
    * ``fps`` given: resample by time. Output frame ``i`` is the decoded frame whose presentation
      time is nearest to ``t_i = start_time + i / fps`` (a tie -- a target exactly half-way, within one
      tick of the stream's time base -- goes to the earlier frame, i.e. the frame being shown then).
      Targets run while ``t_i`` is before the end of the last frame (its time + its duration), up to
      ``max_frames``. So a 32 fps source read at 16 fps gives every second frame and an 8 fps source
      gives each frame twice. ``fps_out == fps``. A clip of ``n`` frames at ``fps`` spans
      ``(n - 1) / fps`` seconds of start times, so e.g. 81 frames at 16 fps need a video *longer* than
      5 s; a 5.0 s video gives 80. ``end_tolerance`` (seconds) lets targets run that far past the end,
      repeating the last frame (the reference accepts windows up to 0.2 s past the end).

    Times are measured from the stream's first presentation time; ``start_time`` seeks to the
    keyframe before it and decodes forward (no decoding from frame 0). Frames whose container
    stores a display rotation (phone videos) are rotated upright unless ``apply_rotation=False``.
    Raises ``FileNotFoundError`` / :class:`MediaError` (bad suffix, unreadable file, no video
    stream, a decode error, no frame in the requested window).
    """
    p = _checked_input(path, VIDEO_READ_SUFFIXES, "video")
    if fps is not None and not (math.isfinite(fps) and fps > 0):
        raise MediaError(f"fps must be a positive number, got {fps!r}")
    if max_frames is not None and (int(max_frames) != max_frames or max_frames < 1):
        raise MediaError(f"max_frames must be a positive integer or None, got {max_frames!r}")
    if not (math.isfinite(start_time) and start_time >= 0):
        raise MediaError(f"start_time must be a finite number >= 0, got {start_time!r}")
    if not (math.isfinite(end_tolerance) and end_tolerance >= 0):
        raise MediaError(f"end_tolerance must be a finite number >= 0, got {end_tolerance!r}")

    with _open_video(p) as (container, stream):
        stream.thread_type = "AUTO"  # frame + slice threads; decoding order/output is unaffected
        rate = _stream_rate(stream)
        tol = Fraction(stream.time_base) if stream.time_base else Fraction(1, 1_000_000)
        start = Fraction(start_time)
        out: list[np.ndarray] = []
        if fps is None:
            for t, frame in _timed_frames(container, stream, p, start):
                if t >= start - tol:
                    out.append(_frame_to_rgb(frame, apply_rotation))
                    if max_frames is not None and len(out) >= max_frames:
                        break
            if rate is None:
                raise MediaError(f"{p}: the stream reports no frame rate")
            fps_out = float(rate)
        else:
            out = _resample_by_time(_timed_frames(container, stream, p, start), start, Fraction(fps), max_frames,
                                    tol, rate, apply_rotation, Fraction(end_tolerance))
            fps_out = float(fps)
    if out and len({f.shape for f in out}) > 1:
        raise MediaError(f"{p}: the frame size changes within the video ({sorted({f.shape for f in out})})")
    if not out:
        info = probe_video(p)
        raise MediaError(f"{p}: no video frames at or after start_time={start_time}s "
                         f"(duration {info.duration}s, {info.num_frames} frames)")
    return np.stack(out), fps_out


def _resample_by_time(
    timed: Iterator[tuple[Fraction, av.VideoFrame]],
    start: Fraction,
    fps: Fraction,
    max_frames: int | None,
    tol: Fraction,
    rate: Fraction | None,
    apply_rotation: bool,
    end_tolerance: Fraction = Fraction(0),
) -> list[np.ndarray]:
    """Nearest-frame sampling at ``start + i / fps`` over a stream of (time, frame) in display order."""
    step = 1 / fps
    limit = max_frames if max_frames is not None else math.inf
    out: list[np.ndarray] = []
    prev: tuple[Fraction, av.VideoFrame] | None = None
    prev_rgb: np.ndarray | None = None  # converted lazily, once, however often the frame is picked
    cur_rgb: np.ndarray | None = None
    last_gap: Fraction | None = None

    def target(i: int) -> Fraction:
        return start + i * step

    for t, frame in timed:
        cur_rgb = None
        while len(out) < limit and target(len(out)) <= t:
            tgt = target(len(out))
            # Pick the earlier frame unless the current one is strictly nearer (beyond one tick).
            if prev is not None and not (t - tgt < tgt - prev[0] - tol):
                if prev_rgb is None:
                    prev_rgb = _frame_to_rgb(prev[1], apply_rotation)
                out.append(prev_rgb)
            else:
                if cur_rgb is None:
                    cur_rgb = _frame_to_rgb(frame, apply_rotation)
                out.append(cur_rgb)
        if len(out) >= limit:
            break
        if prev is not None:
            last_gap = t - prev[0]
        prev, prev_rgb = (t, frame), cur_rgb
    else:
        # End of stream: targets after the last frame but before its end show the last frame.
        if prev is not None and len(out) < limit:
            end = prev[0] + _frame_duration(prev[1], rate, last_gap) + end_tolerance
            # A target within one tick of the end counts as past it (webm rounds times to milliseconds).
            while len(out) < limit and target(len(out)) < end - tol:
                if prev_rgb is None:
                    prev_rgb = _frame_to_rgb(prev[1], apply_rotation)
                out.append(prev_rgb)
    return out


def load_video_tensor(
    path: PathLike,
    height: int,
    width: int,
    fps: float | None = DEFAULT_FPS,
    max_frames: int | None = None,
    start_time: float = 0.0,
    end_tolerance: float = 0.0,
) -> torch.Tensor:
    """Read, resample, resize/centre-crop and map a video to float32 ``[3, T, H, W]`` in [-1, 1].

    Frames are sampled by timestamp (:func:`read_video`); the reference's conditioning clips (V2V,
    interactive) pick frames by its index rule instead: :func:`read_video_clip`.
    """
    frames_THW3, _ = read_video(path, fps=fps, max_frames=max_frames, start_time=start_time,
                                end_tolerance=end_tolerance)
    return frames_to_tensor(resize_and_center_crop(frames_THW3, height, width))


# ------------------------------------------------------------------------ conditioning clips (reference rule)


def _counted_frames(container, stream, p: Path) -> int:
    """Frames of the stream as the reference's readers count them: the container's stored count (what
    decord's ``len`` and OpenCV's ``CAP_PROP_FRAME_COUNT`` report for mp4/mov), else one per demuxed packet
    (webm and others store none; a video packet holds one frame). Leaves the container at its end."""
    if stream.frames:
        return int(stream.frames)
    try:
        # The demuxer's final flush packet carries no data: only packets with a payload are frames.
        return sum(1 for packet in container.demux(stream) if packet.size)
    except av.FFmpegError as e:
        raise MediaError(f"cannot count the frames of {p}: {e}") from e


def count_video_frames(path: PathLike) -> tuple[int, float]:
    """``(number of frames, frames per second)`` of a video as the reference's clip readers see them.

    The duration they work with is ``num_frames / fps``. Raises :class:`MediaError` for a video without a
    frame rate or without frames.
    """
    p = _checked_input(path, VIDEO_READ_SUFFIXES, "video")
    with _open_video(p) as (container, stream):
        rate = _stream_rate(stream)
        if rate is None:
            raise MediaError(f"{p}: the stream reports no frame rate")
        num_frames = _counted_frames(container, stream, p)
    if num_frames < 1:
        raise MediaError(f"{p}: the video holds no frames")
    return num_frames, float(rate)


def clip_frame_indices(num_frames: int, fps: float, start_sec: float, end_sec: float, count: int) -> np.ndarray:
    """The source frames the reference's ``get_clip(start_sec, end_sec, count)`` returns (int64 ``[count]``).

    ``start = ceil(fps * start_sec)``, ``end = min(ceil(fps * end_sec), num_frames)``, then ``count``
    evenly spaced positions from ``start`` to ``end - 1`` truncated to integers
    (``np.linspace(start, end - 1, count, dtype=int)``): a window holding fewer frames than ``count``
    repeats some (a 16 fps source gives frame 0 twice for 81 frames of 5 s), a fuller one is subsampled
    (30 fps). The float arithmetic is the reference's, so the boundary frames agree with it.
    """
    if int(num_frames) != num_frames or num_frames < 1:
        raise MediaError(f"num_frames must be a positive integer, got {num_frames!r}")
    if int(count) != count or count < 1:
        raise MediaError(f"count must be a positive integer, got {count!r}")
    if not (math.isfinite(fps) and fps > 0):
        raise MediaError(f"fps must be a positive number, got {fps!r}")
    if not (math.isfinite(start_sec) and math.isfinite(end_sec) and 0 <= start_sec < end_sec):
        raise MediaError(f"the clip window must satisfy 0 <= start_sec < end_sec, got [{start_sec!r}, {end_sec!r})")
    start = math.ceil(fps * start_sec)
    end = min(math.ceil(fps * end_sec), int(num_frames))
    if start >= end:
        raise MediaError(f"the window [{start_sec:.3f} s, {end_sec:.3f} s) holds no frame of a video of "
                         f"{num_frames} frames at {fps:g} fps")
    return np.linspace(start, end - 1, int(count), dtype=np.int64)


def read_video_clip(
    path: PathLike, count: int, seconds: float, *, at_end: bool = False, apply_rotation: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """``count`` uint8 RGB frames ``[count, H, W, 3]`` spread over the first (or last) ``seconds`` of a video.

    The conditioning clip of the reference: video extension reads the first 5 s
    (``get_clip(0, 5, 81)``), interactive generation the last 5 s of its reference video
    (``get_clip(duration - 5, duration, 81)`` with ``duration = num_frames / fps``); the frames are the
    ones :func:`clip_frame_indices` names, counted as :func:`count_video_frames` counts them. A video
    shorter than ``seconds`` gives repeated frames when read from the start; read from the end
    (``at_end``) it raises :class:`MediaError`, as the window would start before the video.

    Returns ``(frames, source frame indices)``. Frames are decoded in display order with PyAV and only the
    chosen ones are converted (a repeated frame is the same array twice).
    """
    p = _checked_input(path, VIDEO_READ_SUFFIXES, "video")
    num_frames, fps = count_video_frames(p)
    if not (math.isfinite(seconds) and seconds > 0):
        raise MediaError(f"seconds must be a positive number, got {seconds!r}")
    if at_end:
        duration = num_frames / fps  # the reference's duration, in its float arithmetic
        if duration < seconds:
            raise MediaError(f"{p} lasts {duration:.3f} s ({num_frames} frames at {fps:g} fps); its last "
                             f"{seconds:g} s are needed")
        start_sec, end_sec = duration - seconds, duration
    else:
        start_sec, end_sec = 0.0, seconds
    indices = clip_frame_indices(num_frames, fps, start_sec, end_sec, count)
    return _frames_at(p, indices, apply_rotation), indices


def _frames_at(p: Path, indices: np.ndarray, apply_rotation: bool) -> np.ndarray:
    """The decoded frames at the given display-order indices (sorted, repeats allowed) of video ``p``."""
    wanted = set(indices.tolist())
    last = int(indices.max())
    picked: dict[int, np.ndarray] = {}
    decoded = 0
    with _open_video(p) as (container, stream):
        stream.thread_type = "AUTO"
        for _, frame in _timed_frames(container, stream, p, Fraction(0)):
            if decoded in wanted:
                picked[decoded] = _frame_to_rgb(frame, apply_rotation)
            decoded += 1
            if decoded > last:
                break
    if last not in picked:
        raise MediaError(f"{p}: only {decoded} frames decode, but frame {last} is needed (the container reports "
                         "more frames than it holds)")
    if len({f.shape for f in picked.values()}) > 1:
        raise MediaError(f"{p}: the frame size changes within the video ({sorted({f.shape for f in picked.values()})})")
    return np.stack([picked[i] for i in indices.tolist()])


# -------------------------------------------------------------------------------------- video output


@functools.lru_cache(maxsize=1)
def h264_encoder() -> str:
    """Name of the first H.264 encoder of this PyAV build that opens: libx264, h264, libopenh264.

    The check opens a tiny encoder context, so a codec that is registered but unusable is skipped.
    Raises :class:`MediaError` if none works.
    """
    tried = []
    for name in _H264_CANDIDATES:
        try:
            ctx = av.CodecContext.create(name, "w")
            ctx.width, ctx.height, ctx.pix_fmt = 64, 64, "yuv420p"
            ctx.time_base = Fraction(1, DEFAULT_FPS)
            ctx.open()
            return ctx.codec.name
        except (av.FFmpegError, ValueError) as e:  # unknown codec name -> ValueError subclass
            tried.append(f"{name} ({type(e).__name__}: {e})")
    raise MediaError("no usable H.264 encoder in this PyAV build; tried " + "; ".join(tried))


def _as_uint8_frames(frames: FramesLike, path: Path, *, single_ok: bool) -> np.ndarray:
    """Normalise writer input to a contiguous uint8 ``[T, H, W, 3]`` array; errors name ``path``."""
    what = f"frames for {path}"
    if isinstance(frames, torch.Tensor) and frames.is_floating_point():
        frames = tensor_to_frames(frames)
    if isinstance(frames, Image.Image):
        frames = [frames]
    if isinstance(frames, (list, tuple)):
        if not frames:
            raise MediaError(f"{what}: got an empty sequence (zero frames)")
        arrs = []
        for i, f in enumerate(frames):
            if isinstance(f, Image.Image):
                f = np.asarray(_pil_to_rgb(f))
            f = _check_uint8_frames(f, f"frame {i} of {what}", allow_single=True)
            arrs.append(f if f.ndim == 3 else _only_frame(f, f"frame {i} of {what}"))
        if len({a.shape for a in arrs}) != 1:
            raise MediaError(f"{what}: frames differ in size: {sorted({a.shape for a in arrs})}")
        frames = np.stack(arrs)
    arr = _check_uint8_frames(frames, what, allow_single=single_ok)
    if arr.ndim == 3:
        arr = arr[None]
    return np.ascontiguousarray(arr)


def _only_frame(arr_THW3: np.ndarray, what: str) -> np.ndarray:
    if arr_THW3.shape[0] != 1:
        raise MediaError(f"{what}: expected one frame, got {arr_THW3.shape[0]}")
    return arr_THW3[0]


def write_video(
    frames: FramesLike,
    path: PathLike,
    fps: float = DEFAULT_FPS,
    *,
    crf: int = DEFAULT_CRF,
    preset: str = "medium",
    codec: str | None = None,
    pad_odd: bool = True,
    metadata: Mapping[str, str] | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> Path:
    """Write uint8 RGB frames ``[T, H, W, 3]`` (or PIL images) as an H.264 video (mp4/m4v/mov/mkv).

    * Encoder: ``codec`` or :func:`h264_encoder` (libx264 when present). ``crf`` (0-51, lower is
      better, 0 is lossless in YUV) and ``preset`` apply to libx264; other encoders get a bit rate of
      ~0.25 bit per pixel per frame. libx264 runs with frame threads and without macroblock-tree rate control,
      so the same frames give the same encoded video in every process (a run made again from its record gives the
      same video; with mb-tree it did not, now and then).
    * Pixels: converted to yuv420p with the BT.709 matrix, limited range, and the stream is tagged
      BT.709 so players and :func:`read_video` convert back with the same matrix. 4:2:0 needs even
      sizes: with ``pad_odd`` (default) an odd height/width is padded by one replicated row/column
      (the file is then one pixel larger); with ``pad_odd=False`` odd sizes raise :class:`MediaError`.
    * Timing: constant ``fps`` (presentation time of frame i is i / fps); mp4/mov get "faststart"
      (index at the front, so browsers can start playing before the download ends).
    * Atomic: written to a temp file next to ``path`` and renamed; on failure nothing is left.
    * ``metadata``: container tags (e.g. ``{"comment": ...}``; read back by :func:`read_video_metadata`). The mp4
      muxer keeps only the keys it knows (``comment``, ``description``, ``title``, ...) and drops others.
    * ``progress(done, total)``: called once before the first frame and after each encoded frame (a long video
      takes a while to encode on a CPU; front doors show a bar). An exception it raises aborts the write.

    Returns ``path``.
    """
    p = _checked_output(path, VIDEO_WRITE_SUFFIXES, "video")
    arr_THW3 = _as_uint8_frames(frames, p, single_ok=False)
    if not (isinstance(fps, (int, float, Fraction)) and math.isfinite(fps) and fps > 0):
        raise MediaError(f"fps must be a positive number, got {fps!r} (writing {p})")
    if int(crf) != crf or not 0 <= crf <= 51:
        raise MediaError(f"crf must be an integer in [0, 51], got {crf!r} (writing {p})")
    _, h, w, _ = arr_THW3.shape
    if h % 2 or w % 2:
        if not pad_odd:
            raise MediaError(f"cannot write {p}: H.264 yuv420p needs an even frame size, got {w}x{h} "
                             "(pass pad_odd=True to pad by one pixel)")
        arr_THW3 = np.pad(arr_THW3, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)), mode="edge")
        _, h, w, _ = arr_THW3.shape
    encoder = codec or h264_encoder()
    rate = Fraction(fps).limit_denominator(1_000_000)
    suffix = p.suffix.lower()
    container_options = {"movflags": "+faststart"} if _MUXER_BY_SUFFIX[suffix] in ("mp4", "mov") else {}
    bt709 = av.video.reformatter.Colorspace.ITU709
    limited = av.video.reformatter.ColorRange.MPEG
    with _atomic_output(p) as tmp:
        try:
            with av.open(str(tmp), mode="w", format=_MUXER_BY_SUFFIX[suffix],
                         container_options=container_options) as container:
                for key, value in (metadata or {}).items():
                    container.metadata[key] = value
                stream = container.add_stream(encoder, rate=rate)
                stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
                cc = stream.codec_context
                cc.colorspace, cc.color_range = 1, 1  # AVCOL_SPC_BT709, AVCOL_RANGE_MPEG (limited)
                cc.color_primaries, cc.color_trc = 1, 1  # BT.709 primaries and transfer
                if cc.codec.name == "libx264":
                    # mbtree=0: with x264's macroblock-tree rate control the same frames came out as different bits
                    # in about one process of ten (B-frames up to 15 levels apart), so a run made again from its
                    # record did not give the same video; without it they do (frame threads are deterministic).
                    stream.options = {"crf": str(int(crf)), "preset": preset, "x264-params": "mbtree=0"}
                    cc.thread_type = "FRAME"
                else:
                    stream.bit_rate = max(200_000, int(0.25 * w * h * float(rate)))
                total = len(arr_THW3)
                if progress is not None:
                    progress(0, total)
                for i, frame_HW3 in enumerate(arr_THW3):
                    frame = av.VideoFrame.from_ndarray(frame_HW3, format="rgb24")
                    frame = frame.reformat(format="yuv420p", dst_colorspace=bt709, dst_color_range=limited)
                    frame.pts, frame.time_base = i, 1 / rate
                    container.mux(stream.encode(frame))
                    if progress is not None and i + 1 < total:
                        progress(i + 1, total)
                container.mux(stream.encode(None))  # flush delayed (B-)frames
                if progress is not None:
                    progress(total, total)
        except MediaError:
            raise
        except (av.FFmpegError, ValueError) as e:  # ValueError: e.g. an unknown codec name
            raise MediaError(f"cannot write video {p} with encoder {encoder}: {e}") from e
    return p


def write_image(frame: FramesLike, path: PathLike, *, quality: int = 95, text: Mapping[str, str] | None = None) -> Path:
    """Write one RGB frame (uint8 ``[H, W, 3]``, ``[1, H, W, 3]`` or a PIL image) as png/jpg/webp.

    ``quality`` applies to jpg/webp. ``text``: png only, ``tEXt`` chunks (keyword -> text, Latin-1; read back by
    :func:`read_image_text`). Atomic like :func:`write_video`. Returns ``path``.
    """
    p = _checked_output(path, IMAGE_SUFFIXES, "image")
    arr_THW3 = _as_uint8_frames(frame, p, single_ok=True)
    img = Image.fromarray(_only_frame(arr_THW3, f"write_image {p}"), mode="RGB")
    fmt = _PIL_FORMAT_BY_SUFFIX[p.suffix.lower()]
    kwargs: dict[str, object] = {"quality": int(quality)} if fmt in ("JPEG", "WEBP") else {}
    if text:
        if fmt != "PNG":
            raise MediaError(f"cannot write text chunks to {p}: only png holds them")
        kwargs["pnginfo"] = _png_text(text, p)
    with _atomic_output(p) as tmp:
        img.save(tmp, format=fmt, **kwargs)
    return p


def _png_text(text: Mapping[str, str], p: Path) -> PngImagePlugin.PngInfo:
    info = PngImagePlugin.PngInfo()
    for key, value in text.items():
        try:
            key.encode("latin-1"), value.encode("latin-1")
        except UnicodeEncodeError as e:
            raise MediaError(f"png text chunk {key!r} for {p} must be Latin-1 (escape other characters)") from e
        if not 1 <= len(key) <= 79:
            raise MediaError(f"png text keyword {key!r} for {p} must be 1-79 characters")
        info.add_text(key, value)
    return info


def read_image_text(path: PathLike) -> dict[str, str]:
    """The text chunks (``tEXt``/``zTXt``/``iTXt``) of a png file, keyword -> text (empty for other formats)."""
    p = _checked_input(path, IMAGE_SUFFIXES, "image")
    try:
        with Image.open(p) as img:
            img.load()  # text chunks after the image data are read only when the pixels are
            return dict(getattr(img, "text", {}) or {})
    except (UnidentifiedImageError, OSError) as e:
        raise MediaError(f"cannot read image {p}: {e}") from e


def read_video_metadata(path: PathLike) -> dict[str, str]:
    """The container-level tags of a video file (e.g. ``comment``), key -> value."""
    p = _checked_input(path, VIDEO_READ_SUFFIXES, "video")
    try:
        with av.open(str(p)) as container:
            return dict(container.metadata)
    except av.FFmpegError as e:
        raise MediaError(f"cannot read video {p}: {e}") from e


def _gif_durations_ms(count: int, fps: float) -> list[int]:
    """Per-frame GIF delays: GIF stores centiseconds, so spread the rounding to keep the mean at 1/fps
    (16 fps -> 60, 70, 60, 70 ... ms instead of a uniform 60 ms, i.e. 16.7 fps)."""
    cs = [round((i + 1) * 100 / fps) - round(i * 100 / fps) for i in range(count)]
    return [10 * max(1, c) for c in cs]


def write_gif(frames: FramesLike, path: PathLike, fps: float = DEFAULT_FPS, *, loop: int = 0) -> Path:
    """Write frames as an animated GIF (Pillow), looping ``loop`` times (0 = forever). Atomic.

    Each frame is reduced to its own 256-colour adaptive palette (exact when a frame has at most 256
    colours). Pillow merges consecutive identical frames into one longer frame, so a reader may see
    fewer frames than written while the timing is kept. Returns ``path``.
    """
    p = _checked_output(path, GIF_SUFFIXES, "gif")
    arr_THW3 = _as_uint8_frames(frames, p, single_ok=True)
    if not (math.isfinite(fps) and fps > 0):
        raise MediaError(f"fps must be a positive number, got {fps!r} (writing {p})")
    images = [Image.fromarray(f, mode="RGB") for f in arr_THW3]
    durations = _gif_durations_ms(len(images), fps)
    with _atomic_output(p) as tmp:
        images[0].save(tmp, format="GIF", save_all=True, append_images=images[1:], duration=durations,
                       loop=loop)
    return p


def save_output(frames: FramesLike, path: PathLike, fps: float = DEFAULT_FPS, **kwargs) -> Path:
    """Save generated frames by the suffix of ``path``.

    ``.mp4/.m4v/.mov/.mkv`` -> :func:`write_video`; ``.png/.jpg/.jpeg/.webp`` -> :func:`write_image`
    (exactly one frame); ``.gif`` -> :func:`write_gif`. ``frames`` may also be the decoder's float
    tensor ``[3, T, H, W]`` / ``[1, 3, T, H, W]`` in [-1, 1] (converted by :func:`tensor_to_frames`).
    Extra keyword arguments go to the chosen writer. Unknown suffixes raise :class:`MediaError`.
    """
    p = Path(path)
    suffix = p.suffix.lower()
    if suffix in VIDEO_WRITE_SUFFIXES:
        return write_video(frames, p, fps, **kwargs)
    if suffix in GIF_SUFFIXES:
        return write_gif(frames, p, fps, **kwargs)
    if suffix in IMAGE_SUFFIXES:
        arr_THW3 = _as_uint8_frames(frames, p, single_ok=True)
        if arr_THW3.shape[0] != 1:
            raise MediaError(f"cannot save {arr_THW3.shape[0]} frames to the image file {p}; use .mp4 or .gif, "
                             "or pass one frame")
        return write_image(arr_THW3, p, **kwargs)
    known = VIDEO_WRITE_SUFFIXES + GIF_SUFFIXES + IMAGE_SUFFIXES
    raise MediaError(f"cannot save output to {p}: unknown suffix {p.suffix!r}; expected one of {', '.join(known)}")

"""media.py: image/video reading and writing, timestamp resampling, the pixel transform, errors, atomicity.

Source videos for the reading tests are written here directly with PyAV (not with ``write_video``), so
reading is checked against files whose content the test itself controls. Frame identity survives lossy
codecs by making every frame one flat grey level ``STEP * index``: the decoded frame's mean, divided by
``STEP`` and rounded, gives the index back (codec error on flat frames is ~1 level, far below STEP/2).
"""

from __future__ import annotations

import math
import os
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from PIL import Image, ImageSequence

from infinitystar import media
from infinitystar.media import (
    MediaError,
    cover_resize_size,
    frames_to_tensor,
    load_image_tensor,
    probe_video,
    read_image,
    read_video,
    resize_and_center_crop,
    save_output,
    tensor_to_frames,
    write_gif,
    write_image,
    write_video,
)

STEP = 7  # grey-level spacing between consecutive source frames


def _has_encoder(name: str) -> bool:
    try:
        av.codec.Codec(name, "w")
        return True
    except Exception:
        return False


def _grey_frames(n: int, h: int = 32, w: int = 48, step: int = STEP) -> np.ndarray:
    assert step * (n - 1) <= 255
    return np.broadcast_to((np.arange(n) * step).astype(np.uint8)[:, None, None, None], (n, h, w, 3)).copy()


def _indices(frames_THW3: np.ndarray, step: int = STEP) -> list[int]:
    return [int(round(float(f.mean()) / step)) for f in frames_THW3]


def _pyav_write(path: Path, frames_THW3: np.ndarray, fps: int, codec: str, *, fmt: str | None = None,
                gop: int | None = None, options: dict | None = None, rotation: int | None = None) -> Path:
    """Write frames with PyAV directly (constant rate, pts = index)."""
    _, h, w, _ = frames_THW3.shape
    with av.open(str(path), mode="w", format=fmt) as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        if gop is not None:
            stream.codec_context.gop_size = gop
        if options:
            stream.options = options
        if rotation is not None:
            stream.set_display_rotation(rotation)
        for i, f in enumerate(frames_THW3):
            vf = av.VideoFrame.from_ndarray(np.ascontiguousarray(f), format="rgb24")
            vf.pts, vf.time_base = i, Fraction(1, fps)
            container.mux(stream.encode(vf))
        container.mux(stream.encode(None))
    return path


def _smooth_frames(t: int = 17, h: int = 64, w: int = 96) -> np.ndarray:
    """A smooth RGB pattern (gradients, no wrap-around) that changes over time."""
    yy, xx = np.mgrid[0:h, 0:w]
    frames = [np.stack([40 + 2 * xx, 30 + 3 * yy, np.full_like(xx, 60 + 6 * k)], axis=-1) for k in range(t)]
    return np.stack(frames).astype(np.uint8)


def _dir_listing(d: Path) -> list[str]:
    return sorted(os.listdir(d))


# ------------------------------------------------------------------------------------------- encoder


def test_h264_encoder_is_found_and_usable(tmp_path):
    name = media.h264_encoder()
    assert name in ("libx264", "libopenh264", "h264")
    assert av.codec.Codec(name, "w").type == "video"


# ------------------------------------------------------------------------------------ mp4 round trip


def test_mp4_write_read_round_trip(tmp_path):
    frames = _smooth_frames()
    path = write_video(frames, tmp_path / "out.mp4", fps=16)
    assert path == tmp_path / "out.mp4"

    info = probe_video(path)
    assert (info.width, info.height) == (96, 64)
    assert info.fps == pytest.approx(16.0)
    assert info.num_frames == 17
    assert info.duration == pytest.approx(17 / 16, abs=1 / 16)
    assert info.codec == "h264"

    back, fps = read_video(path)
    assert back.shape == frames.shape and back.dtype == np.uint8
    assert fps == pytest.approx(16.0)
    # Lossy codec (H.264 crf 18, 4:2:0 chroma): on this smooth pattern the error is ~1 level on average.
    # Tolerance: mean |diff| <= 2 levels, max |diff| <= 12 levels (out of 255). The same on every machine: x264's
    # SIMD kernels are bit-exact with its C code (and its threading deterministic), H.264 decoding is bit-exact.
    diff = np.abs(back.astype(np.int16) - frames.astype(np.int16))
    assert diff.mean() <= 2.0, diff.mean()
    assert diff.max() <= 12, diff.max()
    # Frame order kept: the blue level rises by 6 per frame (chroma is the lossiest part: allow 2.5).
    np.testing.assert_allclose(back[..., 2].mean(axis=(1, 2)), 60 + 6 * np.arange(17), atol=2.5)


def test_mp4_lossless_crf0_is_near_exact_and_rgb_not_bgr(tmp_path):
    # Saturated primaries: a BGR mix-up would swap red and blue completely.
    frames = np.zeros((3, 32, 32, 3), np.uint8)
    frames[0, ..., 0] = 255  # red
    frames[1, ..., 1] = 255  # green
    frames[2, ..., 2] = 255  # blue
    path = write_video(frames, tmp_path / "rgb.mp4", fps=16, crf=0)
    back, _ = read_video(path)
    # crf 0 is lossless in YUV; the RGB<->YUV conversion itself costs a few levels.
    assert np.abs(back.astype(int) - frames.astype(int)).max() <= 4
    # The file is BT.709, limited range, and tagged so: luma of pure red is 16 + 219 * 0.2126 = 62.6
    # (BT.601 would give 16 + 219 * 0.299 = 81.5).
    with av.open(str(path)) as container:
        first = next(container.decode(video=0))
        assert (first.colorspace, first.color_range) == (1, 1)  # AVCOL_SPC_BT709, AVCOL_RANGE_MPEG
        plane = first.planes[0]  # the Y plane exactly as decoded (no conversion)
        y_plane = np.frombuffer(bytes(plane), np.uint8).reshape(plane.height, plane.line_size)[:, : plane.width]
    assert abs(float(y_plane.mean()) - 62.6) <= 1.5


def test_full_range_video_is_read_with_its_range(tmp_path):
    # A full-range ("JPEG" range, as phones and MJPEG write) H.264 file: reading it as limited range
    # would stretch the levels (255 clipped, 10 -> 0); honouring the tag brings the colours back.
    frames = np.zeros((2, 32, 32, 3), np.uint8)
    frames[0, ..., 0] = 255
    frames[1] = (10, 240, 128)
    path = tmp_path / "full.mp4"
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=16)
        stream.width, stream.height, stream.pix_fmt = 32, 32, "yuv420p"
        stream.options = {"crf": "0"}
        stream.codec_context.color_range = 2  # AVCOL_RANGE_JPEG
        for i, f in enumerate(frames):
            vf = av.VideoFrame.from_ndarray(f, format="rgb24").reformat(format="yuv420p", dst_color_range="JPEG")
            vf.pts, vf.time_base = i, Fraction(1, 16)
            container.mux(stream.encode(vf))
        container.mux(stream.encode(None))
    back, _ = read_video(path)
    assert np.abs(back.astype(int) - frames.astype(int)).max() <= 4


def test_write_video_accepts_pil_list_and_float_tensor(tmp_path):
    frames = _smooth_frames(t=5, h=32, w=48)
    back, _ = read_video(write_video([Image.fromarray(f) for f in frames], tmp_path / "pil.mp4"))
    assert back.shape == frames.shape
    x = torch.from_numpy(frames).permute(3, 0, 1, 2).float() / 127.5 - 1
    back2, _ = read_video(save_output(x[None], tmp_path / "tensor.mp4"))
    assert back2.shape == frames.shape
    assert np.abs(back2.astype(int) - frames.astype(int)).mean() <= 2.0


def test_odd_size_is_padded_or_rejected(tmp_path):
    frames = _smooth_frames(t=3, h=31, w=45)
    back, _ = read_video(write_video(frames, tmp_path / "odd.mp4"))
    assert back.shape == (3, 32, 46, 3)  # one replicated row and column
    assert np.abs(back[:, :31, :45].astype(int) - frames.astype(int)).mean() <= 2.0
    with pytest.raises(MediaError, match=r"even frame size.*45x31"):
        write_video(frames, tmp_path / "odd2.mp4", pad_odd=False)
    assert not (tmp_path / "odd2.mp4").exists()


def test_overwrite_replaces_existing_file(tmp_path):
    path = tmp_path / "v.mp4"
    write_video(_grey_frames(4), path)
    write_video(_grey_frames(9), path)
    assert read_video(path)[0].shape[0] == 9
    assert _dir_listing(tmp_path) == ["v.mp4"]


# ------------------------------------------------------------------------------------ png / gif / jpg


def test_png_round_trip_exact(tmp_path):
    rng = np.random.default_rng(0)
    frame = rng.integers(0, 256, size=(20, 30, 3), dtype=np.uint8)
    path = write_image(frame, tmp_path / "a.png")
    img = read_image(path)
    assert img.mode == "RGB" and img.size == (30, 20)
    np.testing.assert_array_equal(np.asarray(img), frame)
    # save_output with a single frame [1,H,W,3] goes to the same writer
    np.testing.assert_array_equal(np.asarray(read_image(save_output(frame[None], tmp_path / "b.png"))), frame)


def test_jpg_and_webp_round_trip_close(tmp_path):
    frame = _smooth_frames(t=1)[0]
    for name in ("a.jpg", "a.webp"):
        back = np.asarray(read_image(write_image(frame, tmp_path / name, quality=95)))
        assert back.shape == frame.shape
        assert np.abs(back.astype(int) - frame.astype(int)).mean() <= 2.0, name


def test_gif_round_trip(tmp_path):
    # 6 distinct frames with 4 colours each: the adaptive palette is exact, so pixels come back unchanged.
    frames = np.zeros((6, 24, 40, 3), np.uint8)
    for k in range(6):
        frames[k, :12, :20] = (255, 0, 0)
        frames[k, :12, 20:] = (0, 40 * k, 255)
        frames[k, 12:, :] = (10 * k, 200, 30)
        frames[k, 12:, 5 * k: 5 * k + 5] = (255, 255, 255)
    path = write_gif(frames, tmp_path / "a.gif", fps=16)
    with Image.open(path) as im:
        got = [np.asarray(f.convert("RGB")) for f in ImageSequence.Iterator(im)]
        durations = []
        for f in ImageSequence.Iterator(im):
            durations.append(f.info["duration"])
    assert len(got) == 6
    np.testing.assert_array_equal(np.stack(got), frames)
    # GIF delays are centiseconds; the sum stays at 6/16 s = 375 ms within one centisecond.
    assert all(d % 10 == 0 for d in durations)
    assert abs(sum(durations) - 375) <= 10
    # PyAV reads GIFs too
    back, _ = read_video(path)
    assert back.shape == frames.shape


# --------------------------------------------------------------------------------- webm / mov reading


@pytest.mark.parametrize(
    "suffix,codec,fmt",
    [(".webm", "libvpx-vp9", "webm"), (".webm", "libvpx", "webm"), (".mov", "mpeg4", "mov"),
     (".mov", "libx264", "mov"), (".mkv", "libx264", "matroska")],
)
def test_read_other_containers(tmp_path, suffix, codec, fmt):
    if not _has_encoder(codec):
        pytest.skip(f"PyAV build has no {codec} encoder")
    frames = _grey_frames(12)
    path = _pyav_write(tmp_path / f"src{suffix}", frames, 16, codec, fmt=fmt)
    info = probe_video(path)
    assert (info.width, info.height) == (48, 32)
    assert info.fps == pytest.approx(16.0)
    back, fps = read_video(path)
    assert fps == pytest.approx(16.0)
    assert back.shape == frames.shape
    assert _indices(back) == list(range(12))


# ------------------------------------------------------------------------------ timestamp resampling


def test_32fps_read_at_16fps_takes_every_second_frame(tmp_path):
    path = _pyav_write(tmp_path / "s32.mp4", _grey_frames(32), 32, "libx264")
    back, fps = read_video(path, fps=16)
    assert fps == 16.0
    assert _indices(back) == list(range(0, 32, 2))


def test_32fps_webm_millisecond_timestamps_read_at_16fps(tmp_path):
    # webm stores times in whole milliseconds (31.25 ms frames are rounded), which must not upset the choice.
    if not _has_encoder("libvpx-vp9"):
        pytest.skip("no vp9 encoder")
    path = _pyav_write(tmp_path / "s32.webm", _grey_frames(32), 32, "libvpx-vp9", fmt="webm")
    back, _ = read_video(path, fps=16)
    assert _indices(back) == list(range(0, 32, 2))


def test_8fps_read_at_16fps_duplicates_each_frame(tmp_path):
    # Targets i/16 fall on a frame (even i) or exactly half-way between two (odd i); ties go to the
    # earlier frame (the one on screen at that time), and targets run until the last frame's end (1 s).
    path = _pyav_write(tmp_path / "s8.mp4", _grey_frames(8), 8, "libx264")
    back, fps = read_video(path, fps=16)
    assert fps == 16.0
    assert _indices(back) == [i // 2 for i in range(16)]


def test_end_tolerance_lets_the_last_target_hold_the_last_frame(tmp_path):
    # 5.0 s at 8 fps (40 frames): 81 targets k/16 need t = 5.0 s, exactly the end -> 80 frames by default.
    path = _pyav_write(tmp_path / "s8.mp4", _grey_frames(40, step=6), 8, "libx264")
    assert read_video(path, fps=16, max_frames=81)[0].shape[0] == 80
    back, _ = read_video(path, fps=16, max_frames=81, end_tolerance=0.2)
    assert back.shape[0] == 81
    np.testing.assert_array_equal(back[80], back[79])  # the extra target repeats the last frame
    assert read_video(path, fps=16, end_tolerance=0.2)[0].shape[0] == 84  # targets up to 5.1875 s < 5.2 s


@pytest.mark.parametrize("src_fps", [24, 30])
def test_nearest_frame_to_each_target_time(tmp_path, src_fps):
    n = src_fps  # one second of video
    path = _pyav_write(tmp_path / f"s{src_fps}.mp4", _grey_frames(n, step=8), src_fps, "libx264")
    back, _ = read_video(path, fps=16)
    # Expected, from the rule: target k/16 s; frame j shows at j/src_fps; nearest j, ties to the earlier.
    expected = [math.ceil(Fraction(k * src_fps, 16) - Fraction(1, 2)) for k in range(16)]
    assert _indices(back, step=8) == expected


def test_start_time_and_max_frames_with_seeking(tmp_path):
    # Keyframe every 8 frames so start_time=0.5 s really seeks (to frame 16) instead of decoding from 0.
    frames = _grey_frames(36)
    path = _pyav_write(tmp_path / "s32.mp4", frames, 32, "libx264", gop=8, options={"bf": "2"})
    back, _ = read_video(path, fps=16, start_time=0.5, max_frames=4)
    assert _indices(back) == [16, 18, 20, 22]
    back, fps = read_video(path, start_time=0.5)  # native rate: every frame from t >= 0.5 s
    assert fps == pytest.approx(32.0)
    assert _indices(back) == list(range(16, 36))
    back, _ = read_video(path, max_frames=5)
    assert _indices(back) == [0, 1, 2, 3, 4]
    # A start between two frames: the nearest frame to 0.52 s is frame 17 (0.53125 s), not 16 (0.5 s).
    back, _ = read_video(path, fps=32, start_time=0.52, max_frames=2)
    assert _indices(back) == [17, 18]


def test_display_rotation_is_applied(tmp_path):
    frames = np.zeros((2, 32, 48, 3), np.uint8)
    frames[:, :8, :8] = 255  # marker in the stored frame's top-left corner
    path = _pyav_write(tmp_path / "rot.mp4", frames, 16, "libx264", rotation=90)
    upright, _ = read_video(path)
    # 90 degrees counter-clockwise: the stored 48x32 frame is shown 32 wide, 48 high; top-left -> bottom-left.
    assert upright.shape == (2, 48, 32, 3)
    assert upright[0, 44, 3].min() > 200 and upright[0, 3, 3].max() < 50
    raw, _ = read_video(path, apply_rotation=False)
    assert raw.shape == (2, 32, 48, 3)


# -------------------------------------------------------------------------------- geometry / transform


def test_cover_resize_size_hand_values():
    assert cover_resize_size(1920, 1080, 1280, 720) == (1280, 720)
    assert cover_resize_size(640, 480, 848, 480) == (848, 636)  # taller than 16:9 -> fit width, int(636.0)
    assert cover_resize_size(1000, 200, 100, 100) == (500, 100)  # wider -> fit height
    # The reference's int(144 / (288/224)) is 111 (float error), one row short of the crop; we keep 112.
    assert int(144 / (288 / 224)) == 111
    assert cover_resize_size(288, 224, 144, 112) == (144, 112)
    with pytest.raises(MediaError, match="target_width"):
        cover_resize_size(10, 10, 0, 5)


def test_center_crop_exact_offsets_without_resampling():
    # Height already equals the target height, so the resize is the identity and the crop is exact:
    # 99 wide -> 60 wide starts at (99 - 60) // 2 = 19.
    rng = np.random.default_rng(1)
    src = rng.integers(0, 256, size=(60, 99, 3), dtype=np.uint8)
    out = resize_and_center_crop(src, 60, 60)
    np.testing.assert_array_equal(out, src[:, 19:79])
    # Taller: 40 wide x 91 high into 40x40 -> rows from (91 - 40) // 2 = 25.
    src2 = rng.integers(0, 256, size=(2, 91, 40, 3), dtype=np.uint8)
    np.testing.assert_array_equal(resize_and_center_crop(src2, 40, 40), src2[:, 25:65])


def test_center_crop_marker_lands_where_expected():
    # 300x200 (W x H) image into 100x100: fit height (scale 1/2 -> 150x100), crop columns 25..125.
    src = np.zeros((200, 300, 3), np.uint8)
    src[80:120, 160:200] = (255, 0, 0)  # red block -> resized rows 40..60, cols 80..100 -> cropped cols 55..75
    src[0:40, 0:40] = (0, 255, 0)  # green block in the left margin -> cropped away entirely
    out = resize_and_center_crop(src, 100, 100)
    assert out.shape == (100, 100, 3)
    assert tuple(out[50, 65]) == (255, 0, 0)
    assert out[50, 45].max() < 20 and out[50, 85].max() < 20  # left and right of the block
    assert out[30, 65].max() < 20 and out[70, 65].max() < 20  # above and below
    assert out[..., 1].max() < 20  # the green corner did not survive the crop
    # Same on a PIL image, which returns a PIL image.
    out_pil = resize_and_center_crop(Image.fromarray(src), 100, 100)
    assert isinstance(out_pil, Image.Image) and out_pil.size == (100, 100)
    np.testing.assert_array_equal(np.asarray(out_pil), out)


def test_reference_float_error_case_gives_full_size():
    out = resize_and_center_crop(np.zeros((224, 288, 3), np.uint8), 112, 144)
    assert out.shape == (112, 144, 3)


# ----------------------------------------------------------------------------------- frames <-> tensor


def test_frames_to_tensor_layout_and_values():
    frames = np.zeros((2, 3, 4, 3), np.uint8)
    frames[1, 2, 3] = (0, 128, 255)
    x = frames_to_tensor(frames)
    assert x.shape == (3, 2, 3, 4) and x.dtype == torch.float32
    assert x[0, 1, 2, 3] == -1.0 and x[2, 1, 2, 3] == 1.0
    assert x[1, 1, 2, 3].item() == pytest.approx(128 / 255 * 2 - 1, abs=1e-7)
    assert x[:, 0].eq(-1).all()


def test_tensor_to_frames_rounding_clamp_and_layout():
    x = torch.full((3, 1, 1, 4), -1.0)
    x[0, 0, 0, 0] = 1.0  # -> 255
    x[0, 0, 0, 1] = 5.0  # clamped -> 255
    x[0, 0, 0, 2] = -7.0  # clamped -> 0
    x[0, 0, 0, 3] = 100.6 / 127.5 - 1  # 100.6 -> rounds to 101, truncates to 100
    x[2, 0, 0, 3] = 0.0  # 127.5 -> round half to even 128, truncates to 127
    r = tensor_to_frames(x, rounding="round")
    t = tensor_to_frames(x)  # the default truncates, as the reference's .to(uint8)
    assert r.shape == (1, 1, 4, 3) and r.dtype == np.uint8
    assert list(r[0, 0, :, 0]) == [255, 255, 0, 101]
    assert list(t[0, 0, :, 0]) == [255, 255, 0, 100]
    assert r[0, 0, 3, 2] == 128 and t[0, 0, 3, 2] == 127
    np.testing.assert_array_equal(tensor_to_frames(x[None]), t)  # [1,3,T,H,W]


def test_every_level_survives_frames_tensor_frames():
    levels = np.arange(256, dtype=np.uint8).reshape(1, 16, 16, 1).repeat(3, axis=3)
    x = frames_to_tensor(levels)
    np.testing.assert_array_equal(tensor_to_frames(x, rounding="round"), levels)
    # Truncation (the reference, and the default) loses a level on some values through float error, never more.
    d = levels.astype(int) - tensor_to_frames(x).astype(int)
    assert set(np.unique(d)) <= {0, 1}


def test_tensor_to_frames_bad_inputs():
    with pytest.raises(MediaError, match="batch of 2"):
        tensor_to_frames(torch.zeros(2, 3, 1, 4, 4))
    with pytest.raises(MediaError, match=r"\(4, 1, 4, 4\)"):
        tensor_to_frames(torch.zeros(4, 1, 4, 4))
    with pytest.raises(MediaError, match="NaN"):
        tensor_to_frames(torch.full((3, 1, 2, 2), float("nan")))
    with pytest.raises(MediaError, match="float tensor"):
        tensor_to_frames(torch.zeros(3, 1, 2, 2, dtype=torch.uint8))
    with pytest.raises(MediaError, match="rounding"):
        tensor_to_frames(torch.zeros(3, 1, 2, 2), rounding="floor")


# ------------------------------------------------------------------------------------ image inputs


def test_read_image_converts_modes(tmp_path):
    rgba = np.zeros((4, 6, 4), np.uint8)
    rgba[..., 0] = 200
    rgba[..., 3] = 255
    rgba[0, 0] = (10, 20, 30, 0)  # fully transparent pixel
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    img = read_image(tmp_path / "rgba.png")
    assert img.mode == "RGB"
    assert tuple(np.asarray(img)[0, 0]) == (10, 20, 30)  # alpha dropped, like cv2 IMREAD_COLOR
    assert tuple(np.asarray(img)[1, 1]) == (200, 0, 0)
    assert tuple(np.asarray(read_image(tmp_path / "rgba.png", background=(255, 255, 255)))[0, 0]) == (255, 255, 255)

    grey = np.arange(24, dtype=np.uint8).reshape(4, 6) * 10
    Image.fromarray(grey, "L").save(tmp_path / "l.png")
    np.testing.assert_array_equal(np.asarray(read_image(tmp_path / "l.png")), np.repeat(grey[..., None], 3, 2))

    pal = Image.new("P", (3, 2))
    pal.putpalette([0, 0, 0, 250, 100, 5] + [0] * 762)
    pal.putpixel((2, 1), 1)
    pal.save(tmp_path / "p.png")
    assert tuple(np.asarray(read_image(tmp_path / "p.png"))[1, 2]) == (250, 100, 5)

    deep = np.full((2, 2), 65535, np.uint16)
    deep[0, 0] = 257 * 100
    Image.fromarray(deep).save(tmp_path / "16.png")
    back16 = np.asarray(read_image(tmp_path / "16.png"))
    assert back16[0, 0].tolist() == [100, 100, 100] and back16[1, 1].tolist() == [255, 255, 255]


def test_read_image_applies_exif_orientation(tmp_path):
    arr = np.zeros((10, 20, 3), np.uint8)
    arr[:, :5] = 255  # white left band in the stored pixels
    img = Image.fromarray(arr)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    img.save(tmp_path / "o.jpg", exif=exif, quality=100)
    shown = np.asarray(read_image(tmp_path / "o.jpg"))
    assert shown.shape == (20, 10, 3)  # portrait after orientation
    assert shown[:5].mean() > 200 and shown[-5:].mean() < 50  # the left band is now at the top


def test_load_image_tensor(tmp_path):
    rng = np.random.default_rng(2)
    arr = rng.integers(0, 256, size=(32, 48, 3), dtype=np.uint8)
    Image.fromarray(arr).save(tmp_path / "a.png")
    x = load_image_tensor(tmp_path / "a.png", 32, 48)  # same size: no resampling
    assert x.shape == (3, 32, 48) and x.dtype == torch.float32
    expected = torch.from_numpy(arr).permute(2, 0, 1).float() / 255 * 2 - 1
    torch.testing.assert_close(x, expected, rtol=0, atol=1e-6)
    y = load_image_tensor(Image.fromarray(arr).convert("RGBA"), 16, 16)
    assert y.shape == (3, 16, 16) and y.min() >= -1 and y.max() <= 1


def test_load_video_tensor(tmp_path):
    path = _pyav_write(tmp_path / "v.mp4", _grey_frames(16, h=32, w=64), 32, "libx264")
    x = media.load_video_tensor(path, 16, 16, fps=16)
    assert x.shape == (3, 8, 16, 16)
    levels = ((x.mean(dim=(0, 2, 3)) + 1) * 127.5 / STEP).round().tolist()
    assert levels == list(range(0, 16, 2))


# ------------------------------------------------------------------------------------------- errors


def test_missing_files_name_the_path(tmp_path):
    for fn, name in ((read_image, "no.png"), (read_video, "no.mp4"), (probe_video, "no.webm")):
        with pytest.raises(FileNotFoundError, match=name):
            fn(tmp_path / name)


def test_corrupt_files_raise_media_error(tmp_path):
    junk = tmp_path / "junk.mp4"
    junk.write_bytes(np.random.default_rng(3).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    with pytest.raises(MediaError, match="junk.mp4"):
        read_video(junk)
    with pytest.raises(MediaError, match="junk.mp4"):
        probe_video(junk)

    good = tmp_path / "good.png"
    Image.fromarray(np.random.default_rng(4).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(good)
    truncated = tmp_path / "trunc.png"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(MediaError, match="trunc.png"):
        read_image(truncated)
    notimg = tmp_path / "text.jpg"
    notimg.write_text("hello")
    with pytest.raises(MediaError, match="text.jpg"):
        read_image(notimg)

    # An mp4 cut inside its index (written first: faststart) cannot be opened.
    rng = np.random.default_rng(5)
    whole = write_video(rng.integers(0, 256, (40, 32, 32, 3), dtype=np.uint8), tmp_path / "whole.mp4")
    data = whole.read_bytes()
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(data[:200])
    with pytest.raises(MediaError, match="cut.mp4"):
        read_video(cut)
    # Cut after the index, in the frame data: FFmpeg would quietly return the first part of the video.
    tail_cut = tmp_path / "tail_cut.mp4"
    tail_cut.write_bytes(data[: len(data) * 6 // 10])
    with pytest.raises(MediaError, match=r"tail_cut\.mp4 is truncated"):
        read_video(tail_cut)
    with pytest.raises(MediaError, match="truncated"):
        read_video(tail_cut, fps=16)
    # ...while reading only frames before the cut is fine.
    assert read_video(tail_cut, max_frames=5)[0].shape[0] == 5


def test_file_without_video_stream(tmp_path):
    path = tmp_path / "audio.mp4"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("aac", rate=16000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
        frame.sample_rate, frame.pts = 16000, 0
        container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    with pytest.raises(MediaError, match=r"audio\.mp4 has no video stream \(streams: audio\)"):
        read_video(path)
    with pytest.raises(MediaError, match="no video stream"):
        probe_video(path)


def test_unsupported_suffixes(tmp_path):
    (tmp_path / "a.txt").write_text("x")
    with pytest.raises(MediaError, match=r"'\.txt'"):
        read_video(tmp_path / "a.txt")
    with pytest.raises(MediaError, match=r"'\.txt'"):
        read_image(tmp_path / "a.txt")
    with pytest.raises(MediaError, match=r"unknown suffix '\.xyz'"):
        save_output(_grey_frames(2), tmp_path / "out.xyz")
    with pytest.raises(MediaError, match=r"'\.webm'"):
        write_video(_grey_frames(2), tmp_path / "out.webm")
    with pytest.raises(MediaError, match=r"3 frames to the image file"):
        save_output(_grey_frames(3), tmp_path / "many.png")
    assert _dir_listing(tmp_path) == ["a.txt"]


def test_zero_frames_and_bad_arrays(tmp_path):
    out = tmp_path / "o.mp4"
    with pytest.raises(MediaError, match="zero frames"):
        write_video([], out)
    with pytest.raises(MediaError, match=r"\(0, 8, 8, 3\)"):
        write_video(np.zeros((0, 8, 8, 3), np.uint8), out)
    with pytest.raises(MediaError, match="must be uint8, got float32"):
        write_video(np.zeros((2, 8, 8, 3), np.float32), out)
    with pytest.raises(MediaError, match=r"\(2, 8, 8, 4\)"):
        write_video(np.zeros((2, 8, 8, 4), np.uint8), out)
    with pytest.raises(MediaError, match="frames differ in size"):
        write_video([np.zeros((8, 8, 3), np.uint8), np.zeros((8, 10, 3), np.uint8)], out)
    with pytest.raises(MediaError, match="fps"):
        write_video(_grey_frames(2), out, fps=0)
    with pytest.raises(MediaError, match="must be uint8"):
        frames_to_tensor(np.zeros((1, 4, 4, 3), np.int64))
    assert _dir_listing(tmp_path) == []

    video = _pyav_write(tmp_path / "short.mp4", _grey_frames(8), 16, "libx264")  # 0.5 s
    with pytest.raises(MediaError, match=r"short\.mp4: no video frames at or after start_time=2\.0s"):
        read_video(video, fps=16, start_time=2.0)
    with pytest.raises(MediaError, match="fps"):
        read_video(video, fps=-1)
    with pytest.raises(MediaError, match="max_frames"):
        read_video(video, max_frames=0)


# ---------------------------------------------------------------------------------------- atomicity


def test_failing_video_encode_leaves_nothing(tmp_path):
    target = tmp_path / "v.mp4"
    with pytest.raises(MediaError, match="v.mp4"):
        write_video(_grey_frames(4), target, preset="no-such-preset")  # the encoder refuses to open
    assert _dir_listing(tmp_path) == []


def test_interrupted_video_write_keeps_old_file_and_no_temp(tmp_path, monkeypatch):
    target = tmp_path / "v.mp4"
    write_video(_grey_frames(3), target)
    old_bytes = target.read_bytes()

    real_frame_cls = av.VideoFrame
    calls = {"n": 0}

    class InterruptingFrame:
        @staticmethod
        def from_ndarray(*args, **kwargs):
            calls["n"] += 1
            if calls["n"] == 5:
                raise KeyboardInterrupt  # e.g. Ctrl-C half-way through the file
            return real_frame_cls.from_ndarray(*args, **kwargs)

    monkeypatch.setattr(av, "VideoFrame", InterruptingFrame)
    with pytest.raises(KeyboardInterrupt):
        write_video(_grey_frames(10), target)
    assert calls["n"] == 5
    assert target.read_bytes() == old_bytes
    assert _dir_listing(tmp_path) == ["v.mp4"]


@pytest.mark.parametrize("name,writer", [("a.png", write_image), ("a.gif", write_gif)])
def test_failing_image_write_leaves_nothing(tmp_path, monkeypatch, name, writer):
    def partial_save(self, fp, *args, **kwargs):
        Path(fp).write_bytes(b"partial")  # some bytes reach the disk, then the write fails
        raise OSError("No space left on device")

    monkeypatch.setattr(Image.Image, "save", partial_save)
    frames = _grey_frames(1) if name.endswith(".png") else _grey_frames(3)
    with pytest.raises(OSError, match="No space"):
        writer(frames, tmp_path / name)
    assert _dir_listing(tmp_path) == []


def test_failing_final_rename_leaves_no_temp(tmp_path, monkeypatch):
    def failing_replace(src, dst):
        raise OSError("rename failed")

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match="rename failed"):
        write_video(_grey_frames(2), tmp_path / "v.mp4")
    assert _dir_listing(tmp_path) == []


def test_writers_create_parent_directories(tmp_path):
    path = write_video(_grey_frames(2), tmp_path / "a" / "b" / "v.mp4")
    assert path.is_file()
    assert _dir_listing(path.parent) == ["v.mp4"]


# ----------------------------------------------------------------------------------------- tags and progress


def test_video_metadata_round_trip_read_with_pyav(tmp_path):
    text = '{"prompt": "a red ball \\u00e9", "seed": 7}'
    p = write_video(_grey_frames(3), tmp_path / "tagged.mp4", 16, metadata={"comment": text})
    with av.open(str(p)) as container:  # read with PyAV directly, not with read_video_metadata
        assert container.metadata["comment"] == text
    assert media.read_video_metadata(p)["comment"] == text


def test_video_progress_reports_every_frame_then_the_total(tmp_path):
    events = []
    write_video(_grey_frames(5), tmp_path / "p.mp4", 16, progress=lambda done, total: events.append((done, total)))
    assert events == [(0, 5), (1, 5), (2, 5), (3, 5), (4, 5), (5, 5)]


def test_video_progress_exception_aborts_the_write(tmp_path):
    def stop(done: int, total: int) -> None:
        if done == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_video(_grey_frames(5), tmp_path / "stopped.mp4", 16, progress=stop)
    assert list(tmp_path.iterdir()) == []


def test_png_text_chunks_round_trip_read_with_pillow(tmp_path):
    p = write_image(_grey_frames(1)[0], tmp_path / "t.png", text={"infinitystar": '{"seed": 3}', "other": "x"})
    with Image.open(p) as img:  # Pillow's own reading of the tEXt chunks
        assert img.text == {"infinitystar": '{"seed": 3}', "other": "x"}
    assert media.read_image_text(p) == {"infinitystar": '{"seed": 3}', "other": "x"}
    assert media.read_image_text(write_image(_grey_frames(1)[0], tmp_path / "plain.png")) == {}


def test_image_text_is_png_and_latin1_only(tmp_path):
    frame = _grey_frames(1)[0]
    with pytest.raises(MediaError, match="only png"):
        write_image(frame, tmp_path / "t.jpg", text={"k": "v"})
    with pytest.raises(MediaError, match="Latin-1"):
        write_image(frame, tmp_path / "t.png", text={"k": "snow \u2603"})
    assert list(tmp_path.iterdir()) == []

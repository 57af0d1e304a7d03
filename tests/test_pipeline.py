"""End-to-end generation on the tiny preset with random weights: every task, both folder layouts,
determinism, teacher forcing exactness, cache correctness and bounds, negative prompts, bad input.

Expected values come from the library's lower-level pieces (VAE, multi-scale quantizer, packed
transformer forward) wired together here, never from the pipeline's own code path.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

import infinitystar.pipeline as pipeline_module
from conftest import float32_rounding_tolerance, transformer_rounding_path
from fixtures_text import D_MODEL, tiny_flan_t5_dir  # noqa: F401
from infinitystar import checkpoints
from infinitystar.config import get_preset
from infinitystar.generation import schedules
from infinitystar.generation.sampling import apply_temperature, guide_logits
from infinitystar.pipeline import InfinityStarPipeline, export_to_video
from infinitystar.transformer.model import InfinityStarTransformer
from infinitystar.transformer.rope import rope_table, visual_positions
from infinitystar.transformer.sequence import PackedSample, build_packed_layout
from infinitystar.vae.model import VideoVAE
from infinitystar.vae.multiscale import CodeAccumulator, bits_to_summed_codes, encode_to_bits

TINY = get_preset("pipeline", "tiny-test")
# Two-latent-frame clips: multi-clip schedules stay a few dozen frames long.
SHORT_CLIPS = dataclasses.replace(TINY, name="tiny-short-clips", frames_inner_clip=2)
# ... and a RoPE frame axis that covers only 5 latent frames (first frame + 2 clips), so that a 4-clip video
# runs past it and uses the long-video anchoring.
LONG = dataclasses.replace(SHORT_CLIPS, name="tiny-long",
                           transformer=dataclasses.replace(SHORT_CLIPS.transformer, rope_max_frames=5))
# The same model as an interactive one (pipe.interactive needs config.interactive; in float32 nothing else changes).
SHORT_INTERACTIVE = dataclasses.replace(SHORT_CLIPS, name="tiny-short-interactive", interactive=True)
SIZE = 96  # tiny-test: 6x6 latent at the last scale, 16 pixels per cell
PROMPT = "a red ball bounces on a wooden floor"
# Tokenizer round trips: the pipeline and the test run the same VAE and quantizer calls on the same shapes in one
# process, so they agree bitwise on any machine (deterministic CPU kernels) -- they must: a rounding difference could
# flip a BSQ bit and move pixels by far more than any tolerance; ATOL (~100 float32 ulps of a pixel in [-1, 1]) is
# not what makes them pass. (The cached-steps test compares two different computations and derives its own bound.)
ATOL = 1e-5


def _one_thread() -> None:
    # These models are tiny: on a shared 2-core machine two intra-op threads mostly wait for each other
    # (measured 10-100x slower under load). Results do not depend on the thread count here.
    torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _threads():
    _one_thread()
    yield


@pytest.fixture(scope="module")
def pipe() -> InfinityStarPipeline:
    _one_thread()
    return InfinityStarPipeline.from_preset("tiny-test", seed=0)


@pytest.fixture(scope="module")
def pipe2() -> InfinityStarPipeline:
    _one_thread()
    return InfinityStarPipeline.from_preset(SHORT_CLIPS, seed=1)


@pytest.fixture(scope="module")
def pipe2i() -> InfinityStarPipeline:
    _one_thread()
    return InfinityStarPipeline.from_preset(SHORT_INTERACTIVE, seed=1)


@pytest.fixture(scope="module")
def pipe_long() -> InfinityStarPipeline:
    _one_thread()
    return InfinityStarPipeline.from_preset(LONG, seed=2)


def _smooth_video(frames: int, seed: int) -> torch.Tensor:
    """[3, T, 96, 96] in [-1, 1]: low-frequency noise, upsampled (a plausible picture for a VAE)."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(1, 3, frames, 6, 6, generator=g) * 2 - 1
    return torch.nn.functional.interpolate(low, size=(frames, SIZE, SIZE), mode="trilinear")[0].clamp(-1, 1)


def _pyramid(cfg) -> list[tuple[int, int, int]]:
    """The 1:1 image pyramid of a preset, from the schedule tables (not from the pipeline)."""
    ladder = schedules.spatial_ladder(schedules.nearest_h_div_w_template(1.0))[: cfg.scales_per_clip]
    return [(1, h, w) for h, w in ladder]


def _tokenizer_reconstruction(pipe: InfinityStarPipeline, video_13THW: torch.Tensor) -> torch.Tensor:
    """VAE encode -> multi-scale BSQ bits along the clip schedule -> summed codes -> VAE decode, clamped."""
    cfg = pipe.config
    latent = pipe.vae.encode(video_13THW, sample=False)
    schedule = schedules.video_scale_schedule(_pyramid(cfg), latent.shape[2], cfg.frames_inner_clip)
    reps = schedules.scale_repetitions(schedule, cfg.image_repetition, cfg.video_repetition)
    enc = encode_to_bits(latent, schedule, reps, cfg.quantizer, frames_inner_clip=cfg.frames_inner_clip)
    codes = bits_to_summed_codes(enc.bits, schedule, reps, cfg.quantizer, frames_inner_clip=cfg.frames_inner_clip)
    return pipe.vae.decode(codes).clamp(-1, 1)


def _tokens(x_B64thw: torch.Tensor) -> torch.Tensor:
    return x_B64thw.flatten(2).transpose(1, 2)


def _randomize(module: torch.nn.Module, seed: int) -> None:
    """Every parameter random (norm gains and biases too), so a swapped key cannot hide behind ones and zeros."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05 + (1.0 if p.dim() == 1 else 0.0))


# ----------------------------------------------------------------------------------------------
# 1. Loading: the official download layout and our own
# ----------------------------------------------------------------------------------------------

T5_CFG = dataclasses.replace(TINY, name="tiny-t5", text_encoder="t5")
VAE_MASKS = {  # the official BSQ buffers (2**arange(d), overflowing for d=64): present in the .pth, not learned
    f"{owner}.lfq_{kind}.mask": torch.tensor([2**i if i < 63 else 0 for i in range(d - 1, -1, -1)], dtype=torch.int64)
    for owner in ("quantizer", "quantize") for kind, d in (("semantic", 16), ("detail", 64))
}


@pytest.fixture(scope="module")
def official_root(tmp_path_factory, tiny_flan_t5_dir):  # noqa: F811
    """A tiny stand-in of the official download: sharded transformer, pickled VAE, Flan-T5 folder."""
    _one_thread()
    assert T5_CFG.transformer.text_channels == D_MODEL
    root = tmp_path_factory.mktemp("official")
    torch.manual_seed(11)
    transformer = InfinityStarTransformer(T5_CFG.transformer)
    _randomize(transformer, 12)
    shards = checkpoints.export_official_transformer(transformer, root / "infinitystar_8b_480p_weights",
                                                     max_shard_bytes=64 * 1024)
    vae = VideoVAE(T5_CFG.vae)
    _randomize(vae, 13)
    torch.save({"vae": {**vae.state_dict(), **VAE_MASKS}, "step": 7}, root / "infinitystar_videovae.pth")
    shutil.copytree(tiny_flan_t5_dir, root / "text_encoder" / "flan-t5-xl-official")
    return root, transformer, vae, shards


def test_official_layout_fixture_is_sharded_under_official_names(official_root):
    root, _, _, shards = official_root
    index = json.loads((root / "infinitystar_8b_480p_weights" / "model.safetensors.index.json").read_text())
    assert len(shards) >= 2 and len(set(index["weight_map"].values())) == len(shards)
    assert "cfg_uncond" in index["weight_map"] and "norm_hidden_sates.weight" in index["weight_map"]
    assert any(k.startswith("blocks.0.") for k in index["weight_map"])  # block_chunks=1 -> flat official names


def test_from_pretrained_official_layout_loads_the_saved_weights_and_generates(official_root, tiny_flan_t5_dir):  # noqa: F811
    root, transformer, vae, _ = official_root
    pipe = InfinityStarPipeline.from_pretrained(root, preset=T5_CFG)
    for name, ref in transformer.state_dict().items():
        assert torch.equal(pipe.transformer.state_dict()[name], ref), name
    assert pipe.transformer.state_dict().keys() == transformer.state_dict().keys()
    assert pipe.vae.state_dict().keys() == vae.state_dict().keys()
    for name, ref in vae.state_dict().items():
        assert torch.equal(pipe.vae.state_dict()[name], ref), name
    saved_t5 = checkpoints.load_safetensors(tiny_flan_t5_dir / "model.safetensors")
    loaded_t5 = pipe.text_encoder.model.state_dict()
    encoder_keys = [k for k in saved_t5 if k.startswith("encoder.")]
    assert encoder_keys
    for k in encoder_keys:
        assert torch.equal(loaded_t5[k], saved_t5[k]), k
    out = pipe(PROMPT, num_frames=5, output_type="np", seed=0, progress=False)
    assert out.frames.shape == (5, SIZE, SIZE, 3) and out.frames.dtype == np.uint8
    assert out.frames.std() > 0


def test_save_pretrained_round_trip_t5_pipeline(official_root, tmp_path):
    """Our layout written by save_pretrained loads back (T5 folder included) and generates the same video."""
    root = official_root[0]
    pipe = InfinityStarPipeline.from_pretrained(root, preset=T5_CFG)
    pipe.save_pretrained(tmp_path / "own")
    again = InfinityStarPipeline.from_pretrained(tmp_path / "own")
    assert again.config == pipe.config
    a = pipe(PROMPT, num_frames=5, output_type="pt", seed=4, progress=False).frames
    b = again(PROMPT, num_frames=5, output_type="pt", seed=4, progress=False).frames
    assert torch.equal(a, b)


def test_save_pretrained_round_trip_byte_encoder(pipe2, tmp_path):
    pipe2.save_pretrained(tmp_path / "own")
    again = InfinityStarPipeline.from_pretrained(tmp_path / "own")
    assert again.config == pipe2.config
    a = pipe2(PROMPT, num_frames=9, output_type="pt", seed=5, progress=False).frames
    b = again(PROMPT, num_frames=9, output_type="pt", seed=5, progress=False).frames
    assert torch.equal(a, b)


def test_save_pretrained_round_trip_word_encoder(pipe2, tmp_path):
    from infinitystar.config import replace

    words = InfinityStarPipeline.from_preset(replace(pipe2.config, text_encoder="words"), seed=2)
    words.save_pretrained(tmp_path / "own")
    assert not (tmp_path / "own" / "text_encoder" / "model.safetensors").exists()  # no weights to ship
    again = InfinityStarPipeline.from_pretrained(tmp_path / "own")
    assert again.config.text_encoder == "words"
    a = words(PROMPT, num_frames=9, output_type="pt", seed=5, progress=False).frames
    b = again(PROMPT, num_frames=9, output_type="pt", seed=5, progress=False).frames
    assert torch.equal(a, b)


# ----------------------------------------------------------------------------------------------
# 2. Every task: frame count and size
# ----------------------------------------------------------------------------------------------


def test_text_to_image_writes_a_png(pipe, tmp_path):
    out = pipe(PROMPT, num_frames=1, output_type="np", progress=False)
    assert out.frames.shape == (1, SIZE, SIZE, 3)
    path = export_to_video(out.frames, tmp_path / "image.png", fps=out.fps)
    with Image.open(path) as img:
        assert img.size == (SIZE, SIZE)
        np.testing.assert_array_equal(np.asarray(img.convert("RGB")), out.frames[0])


def test_text_to_video_one_second(pipe):
    out = pipe(PROMPT, seconds=1, output_type="pil", progress=False)
    assert len(out.frames) == 17 and out.frames[0].size == (SIZE, SIZE)
    assert out.latent is not None and tuple(out.latent.shape) == (1, 64, 5, 6, 6)


@pytest.mark.parametrize(("num_frames", "latents"), [(17, 5), (13, 4)], ids=["two-whole-clips", "short-last-clip"])
def test_multi_clip_video_drops_no_frame(pipe2, num_frames, latents):
    clips = []
    out = pipe2(PROMPT, num_frames=num_frames, output_type="pt", progress=False,
                callback_on_clip_end=lambda i, frames: clips.append(frames.shape[1]))
    assert tuple(out.frames.shape) == (3, num_frames, SIZE, SIZE)
    assert out.latent.shape[2] == latents and num_frames == 1 + 4 * (latents - 1)
    assert clips == [1, 8, 4 * (latents - 3)]  # first frame, a whole 2-latent clip, the rest
    assert float(out.frames.abs().max()) <= 1


def test_long_video_past_the_rope_range(pipe_long):
    """Four video clips (9 latent frames) on a model whose RoPE covers 5: every step stays inside the range."""
    steps = []
    out = pipe_long(PROMPT, num_frames=33, output_type="pt", progress=False,
                    callback_on_scale_step=lambda p, ev: steps.append(ev.step))
    assert tuple(out.frames.shape) == (3, 33, SIZE, SIZE)
    assert max(s.clip_id for s in steps) == 4
    assert max(s.frames[1] for s in steps) <= LONG.transformer.rope_max_frames
    # Clips 3 and 4 reuse clip 2's positions exactly.
    by_clip = {c: [(s.rope_scale_index, s.frames) for s in steps if s.clip_id == c] for c in (2, 3, 4)}
    assert by_clip[2] == by_clip[3] == by_clip[4]


def test_image_to_video_frame_count(pipe, tmp_path):
    path = tmp_path / "first.png"
    Image.fromarray(((_smooth_video(1, 3)[:, 0].permute(1, 2, 0) + 1) * 127.5).round().byte().numpy()).save(path)
    out = pipe(PROMPT, image=path, num_frames=9, output_type="np", progress=False)
    assert out.frames.shape == (9, SIZE, SIZE, 3)


def test_arrays_condition_as_the_same_picture_in_a_file_or_a_tensor(pipe, tmp_path):
    """uint8 arrays (what output_type="np" returns) are accepted as image= and video=, meaning the same frames."""
    frames = ((_smooth_video(5, 3).permute(1, 2, 3, 0) + 1) * 127.5).round().byte().numpy()  # [5, H, W, 3]
    path = tmp_path / "first.png"
    Image.fromarray(frames[0]).save(path)
    kw = dict(num_frames=9, output_type="np", progress=False, seed=4)
    assert np.array_equal(pipe(PROMPT, image=frames[0], **kw).frames, pipe(PROMPT, image=path, **kw).frames)
    as_tensor = torch.from_numpy(frames).permute(3, 0, 1, 2).float() / 255 * 2 - 1
    with pytest.warns(UserWarning, match="only whole clips are kept"):  # the 5 frames are less than a clip here
        from_array, from_tensor = pipe(PROMPT, video=frames, **kw).frames, pipe(PROMPT, video=as_tensor, **kw).frames
    assert np.array_equal(from_array, from_tensor)
    with pytest.raises(ValueError, match=r"the image array must be uint8 \[H, W, 3\] RGB, got float32"):
        pipe(PROMPT, image=frames[0].astype(np.float32), **kw)
    with pytest.raises(ValueError, match=r"the video array must be uint8 \[T, H, W, 3\] RGB, got uint8 of shape"):
        pipe(PROMPT, video=frames[0], **kw)


def test_interactive_frame_counts(pipe2i):
    seg_frames = 1 + SHORT_CLIPS.frames_per_clip  # segment 0: first frame + one clip
    out = pipe2i.interactive(["a red ball", "the ball stops", "a cat walks in"], output_type="pt", seed=2,
                            progress=False)
    assert [s.shape[1] for s in out.segments] == [seg_frames, SHORT_CLIPS.frames_per_clip,
                                                  SHORT_CLIPS.frames_per_clip]
    assert tuple(out.frames.shape) == (3, seg_frames + 2 * SHORT_CLIPS.frames_per_clip, SIZE, SIZE)
    assert torch.equal(out.frames[:, :seg_frames], out.segments[0])
    assert torch.equal(out.frames[:, -SHORT_CLIPS.frames_per_clip:], out.segments[2])


def test_interactive_from_a_reference_video(pipe2i):
    video = _smooth_video(13, 8)  # longer than a segment: its last 1 + 8 frames are used
    out = pipe2i.interactive(["a red ball", "the ball stops"], video=video, output_type="pt", seed=2, progress=False)
    assert [s.shape[1] for s in out.segments] == [9, 8]
    # Segment 0 is the VAE round trip of the reference's last segment (no quantization).
    expected = pipe2i.vae.decode(pipe2i.vae.encode(video[None, :, -9:])).clamp(-1, 1)[0]
    assert torch.allclose(out.segments[0], expected, atol=ATOL)


# ----------------------------------------------------------------------------------------------
# 3. Seeds
# ----------------------------------------------------------------------------------------------


def test_same_seed_same_output_different_seed_different(pipe):
    a = pipe(PROMPT, num_frames=5, output_type="np", seed=7, progress=False).frames
    b = pipe(PROMPT, num_frames=5, output_type="np", seed=7, progress=False).frames
    c = pipe(PROMPT, num_frames=5, output_type="np", seed=8, progress=False).frames
    d = pipe(PROMPT, num_frames=5, output_type="np", generator=torch.Generator().manual_seed(7), progress=False).frames
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(a, d)
    assert not np.array_equal(a, c)


# ----------------------------------------------------------------------------------------------
# 4-5. Teacher forcing reproduces the tokenizer's reconstruction
# ----------------------------------------------------------------------------------------------


def test_image_to_video_first_frame_is_the_tokenizer_reconstruction(pipe):
    image = _smooth_video(1, 5)[:, 0]  # [3, H, W]
    events = []
    out = pipe(PROMPT, image=image, num_frames=5, output_type="pt", seed=3, progress=False,
               callback_on_scale_step=lambda p, ev: events.append(ev))
    with torch.no_grad():
        expected = _tokenizer_reconstruction(pipe, image[None, :, None])[0, :, 0]
    err = float((out.frames[:, 0] - expected).abs().max())
    assert err <= ATOL, f"first frame differs from the tokenizer reconstruction by {err}"
    # The image pyramid's steps are forced (2+2+1+1+1+1 = 8), the rest sampled.
    n_image_steps = sum(TINY.image_repetition)
    assert [ev.forced for ev in events] == [True] * n_image_steps + [False] * (len(events) - n_image_steps)
    # Frames after the first are generated, not copies of it.
    assert float((out.frames[:, 1:] - out.frames[:, :1]).abs().max()) > 0.01


def test_reconstruct_is_the_tokenizer_round_trip(pipe2):
    video = _smooth_video(19, 11)  # 19 frames: cut to 17 = 1 + 4*4 (two clips of SHORT_CLIPS)
    out = pipe2.reconstruct(video, output_type="pt")
    with torch.no_grad():
        expected = _tokenizer_reconstruction(pipe2, video[None, :, :17])[0]
    assert out.shape == (3, 17, SIZE, SIZE)
    err = float((out - expected).abs().max())
    assert err <= ATOL, f"reconstruct differs from the tokenizer round trip by {err}"
    frames = pipe2.reconstruct(video[:, :5], output_type="np")
    assert frames.shape == (5, SIZE, SIZE, 3) and frames.dtype == np.uint8
    with pytest.raises(ValueError, match="output_type"):
        pipe2.reconstruct(video, output_type="latent")


@pytest.mark.parametrize(("given", "kept"), [(17, 17), (13, 9)], ids=["whole-clips", "partial-clip-dropped"])
def test_video_extension_reproduces_the_given_clips(pipe2, given, kept):
    video = _smooth_video(given, 6)
    total = kept + SHORT_CLIPS.frames_per_clip
    if kept < given:
        with pytest.warns(UserWarning, match="only whole clips are kept"):
            out = pipe2(PROMPT, video=video, num_frames=total, output_type="pt", seed=1, progress=False)
    else:
        out = pipe2(PROMPT, video=video, num_frames=total, output_type="pt", seed=1, progress=False)
    assert tuple(out.frames.shape) == (3, total, SIZE, SIZE)
    with torch.no_grad():
        expected = _tokenizer_reconstruction(pipe2, video[None, :, :kept])[0]
    err = float((out.frames[:, :kept] - expected).abs().max())
    assert err <= ATOL, f"given frames differ from the tokenizer reconstruction by {err}"
    assert float((out.frames[:, kept:] - out.frames[:, kept - 1:kept]).abs().max()) > 0.01


@pytest.mark.parametrize("file_frames", [17, 16], ids=["17-frames", "16-frames"])
def test_video_extension_from_a_file_uses_the_reference_frame_choice(pipe2, tmp_path, file_frames):
    """A video file conditions extension with the reference's pick: two clips of SHORT_CLIPS are 1 + 2*8 = 17 frames
    over the first 16/16 = 1 s; at 16 fps that window holds frames 0..15 (ceil(16 * 1) = 16 <= file_frames), spread
    as linspace(0, 15, 17) -> 0, 0, 1, ..., 15: frame 0 twice, and a 17th frame of the file is not used."""
    from infinitystar import media

    path = tmp_path / "given.mp4"
    ramp = ((_smooth_video(file_frames, 4).permute(1, 2, 3, 0) + 1) * 127.5).round().byte().numpy()
    media.write_video(ramp, path, fps=SHORT_CLIPS.fps)
    decoded, _ = media.read_video(path)
    assert len(decoded) == file_frames
    used = 17
    decoded = decoded[[0] + list(range(16))]
    total = used + SHORT_CLIPS.frames_per_clip
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "using the first ..." / "only whole clips" warning: every frame is used
        out = pipe2(PROMPT, video=path, num_frames=total, output_type="pt", seed=1, progress=False)
    assert tuple(out.frames.shape) == (3, total, SIZE, SIZE)
    with torch.no_grad():
        expected = _tokenizer_reconstruction(pipe2, media.frames_to_tensor(decoded)[None])[0]
    err = float((out.frames[:, :used] - expected).abs().max())
    assert err <= ATOL, f"given frames differ from the tokenizer reconstruction of the file's frames by {err}"


# ----------------------------------------------------------------------------------------------
# 6. The KV cache computes what a full forward computes
# ----------------------------------------------------------------------------------------------


def test_cached_steps_equal_a_full_recompute(pipe2):
    """Every step of a 3-clip video: the loop's guided logits == guidance over two packed forwards (cond and
    learned-unconditional text) of [text, referenced scale, this scale] under the training segment mask."""
    cfg = pipe2.config
    model = pipe2.transformer
    num_frames = 17
    events = []
    pipe2(PROMPT, num_frames=num_frames, output_type="latent", seed=9, progress=False,
          callback_on_scale_step=lambda p, ev: events.append(ev))
    schedule = schedules.video_scale_schedule(_pyramid(cfg), 5, cfg.frames_inner_clip)
    reps = schedules.scale_repetitions(schedule, cfg.image_repetition, cfg.video_repetition)
    assert len(events) == sum(reps)
    # Each step's input: the running sum of its clip's codes, area-resized (rebuilt from the sampled bits).
    acc = CodeAccumulator(schedule, reps, cfg.quantizer, frames_inner_clip=cfg.frames_inner_clip)
    inputs = [acc.first_input()]
    for ev in events[:-1]:
        inputs.append(acc.add_bits(ev.bits_BthwD))
    last_repeat = {ev.step.si: i for i, ev in enumerate(events) if ev.step.is_last_repeat}
    text, _ = pipe2.encode_prompt(pipe2.build_prompt(PROMPT, num_frames))
    worst = 0.0
    with torch.no_grad():
        for i, ev in enumerate(events):
            step = ev.step
            # The chain of earlier clips' last scales this step sees, directly or through their own context.
            chain: list[int] = []
            ref_sids = step.ref_sids
            while ref_sids:
                chain = [*ref_sids, *chain]
                ref_sids = events[last_repeat[ref_sids[0]]].step.ref_sids
            refs = [last_repeat[r] for r in chain]
            sample = PackedSample(schedule=tuple(schedule), scale_ids=(*chain, step.si),
                                  real_si=(*(events[j].step.rope_scale_index for j in refs), step.rope_scale_index),
                                  text_len=text.shape[0], frames_inner_clip=cfg.frames_inner_clip)
            layout = build_packed_layout([sample], model.cfg)
            x = torch.cat([_tokens(inputs[j]) for j in (*refs, i)], dim=1)
            n = step.query_tokens
            raw = []
            scale = 0.0  # the largest value on the path
            for uncond in (False, True):
                hidden = model.forward_packed(x, [text], layout, uncond=[uncond]).hidden
                raw.append(model.bit_logits(hidden[:, x.shape[1] - n:x.shape[1]], semantic=not step.detail_head))
                scale = max(scale, float(hidden.abs().max()), float(raw[-1].abs().max()))
            logits = apply_temperature(torch.cat(raw), step.tau)
            s = cfg.sampling
            expected = guide_logits(logits.flatten(-2), s.guidance_scale, s.guidance_method, s.apg_norm_threshold)
            got = ev.logits_Bnd2
            assert got.shape == expected.unflatten(-1, (-1, 2)).shape
            # Cached steps and packed forwards round differently (float32_rounding_tolerance on the raw logits, at
            # the scale of the hidden states). Guidance then mixes cond c and uncond u: guided = c + (g-1) * update
            # / tau with the update (c-u), or its part orthogonal to c (moving c's direction moves it by up to
            # 2 |c-u| / |c| per unit), capped, so each raw logit's error is multiplied by at most `gain`.
            c, u = raw[0].flatten(), raw[1].flatten()
            kappa = 1 + 2 * float((c - u).norm() / c.norm())
            gain = (1 + 2 * (s.guidance_scale - 1) * kappa) / step.tau
            tol = gain * float32_rounding_tolerance(scale, transformer_rounding_path(model, layout.seq_len))
            worst = max(worst, float((got - expected.unflatten(-1, (-1, 2))).abs().max()) / tol)
    assert {ev.step.clip_id for ev in events} == {0, 1, 2}
    assert worst <= 1, f"cached and recomputed logits differ by {worst} times the rounding bound"


# ----------------------------------------------------------------------------------------------
# 7. A long video's cache stays bounded
# ----------------------------------------------------------------------------------------------


def _peak_cache_bytes(pipe, num_frames: int, monkeypatch) -> int:
    results = []
    real = pipeline_module.generate_codes

    def spy(*args, **kwargs):
        results.append(real(*args, **kwargs))
        return results[-1]

    monkeypatch.setattr(pipeline_module, "generate_codes", spy)
    pipe(PROMPT, num_frames=num_frames, output_type="latent", seed=0, progress=False)
    assert len(results) == 1
    return results[0].peak_cache_bytes


def test_long_video_cache_does_not_grow_with_clips(pipe_long, monkeypatch):
    cfg = pipe_long.config
    t = cfg.transformer
    # K and V, both guidance rows, every layer, float32.
    per_token = 2 * 2 * t.depth * t.num_kv_heads * t.head_dim * 4
    first = 6 * 6  # the first frame's last scale
    clip = cfg.frames_inner_clip * 6 * 6  # a video clip's last scale
    peaks, text_lens = {}, {}
    for clips in (1, 2, 3, 4, 5):
        frames = 1 + cfg.frames_per_clip * clips
        text_lens[clips] = pipe_long.encode_prompt(pipe_long.build_prompt(PROMPT, frames))[0].shape[0]
        peaks[clips] = _peak_cache_bytes(pipe_long, frames, monkeypatch)
    # While a clip's last scale runs, the cache holds the text, the previous clip's last scale and this one's
    # (stored when a later clip reads it): at most two clip scales, whatever the number of clips.
    assert peaks[1] == per_token * (text_lens[1] + first)
    assert peaks[2] == per_token * (text_lens[2] + first + clip)
    for clips in (3, 4, 5):
        assert peaks[clips] == per_token * (text_lens[clips] + 2 * clip), clips
    assert len(set(text_lens.values())) == 1
    assert peaks[3] == peaks[4] == peaks[5]


# ----------------------------------------------------------------------------------------------
# 8. Negative prompts of any length
# ----------------------------------------------------------------------------------------------

NO_SUFFIX = dataclasses.replace(TINY, name="tiny-no-suffix", quality_suffix="")
NEGATIVES = {"shorter": "ugly", "longer": "blurry, low quality, distorted, watermark, text, jpeg artifacts"}


@pytest.fixture(scope="module")
def pipe_neg() -> InfinityStarPipeline:
    _one_thread()
    return InfinityStarPipeline.from_preset(NO_SUFFIX, seed=3)


def _first_step_raw(model, text_LC, *, negative_LC=None, guidance: bool) -> torch.Tensor:
    """Raw logits of the first scale (zeros input, no visual context) after a text prefill."""
    cfg = model.cfg
    scale = _pyramid(NO_SUFFIX)[0]
    full_hw = _pyramid(NO_SUFFIX)[-1][1:]
    rope = rope_table(visual_positions(scale, 0, 0, full_hw, cfg.text_maxlen), cfg.head_dim, cfg.rope_theta)
    cache = model.new_cache()
    model.prefill_text(text_LC, cache, negative_LC=negative_LC, guidance=guidance)
    x = torch.zeros(1, math.prod(scale), cfg.d_vae)
    return model.step(x, rope, cache, refs=(), semantic=True, batch=2 if guidance else 1)


@pytest.mark.parametrize("which", sorted(NEGATIVES))
def test_negative_prompt_branch_equals_the_negative_prompt_alone(pipe_neg, which):
    prompt = "a red ball"
    text, negative = pipe_neg.encode_prompt(pipe_neg.build_prompt(prompt, 5), NEGATIVES[which])
    assert (negative.shape[0] < text.shape[0]) == (which == "shorter")
    assert negative.shape[0] != text.shape[0]
    model = pipe_neg.transformer
    with torch.no_grad():
        both = _first_step_raw(model, text, negative_LC=negative, guidance=True)
        cond_alone = _first_step_raw(model, text, guidance=False)
        neg_alone = _first_step_raw(model, negative, guidance=False)
    assert float((both[1:2] - neg_alone).abs().max()) <= ATOL
    assert float((both[0:1] - cond_alone).abs().max()) <= ATOL
    # End to end: the pipeline's first guided step is guidance over exactly these two branches.
    events = []
    out = pipe_neg(prompt, NEGATIVES[which], num_frames=5, output_type="np", seed=0, progress=False,
                   callback_on_scale_step=lambda p, ev: events.append(ev))
    assert out.frames.shape == (5, SIZE, SIZE, 3)
    s = NO_SUFFIX.sampling
    tau = events[0].step.tau
    expected = guide_logits(apply_temperature(torch.cat([cond_alone, neg_alone]), tau).flatten(-2),
                            s.guidance_scale, s.guidance_method, s.apg_norm_threshold).unflatten(-1, (-1, 2))
    assert float((events[0].logits_Bnd2 - expected).abs().max()) <= ATOL
    plain = pipe_neg(prompt, num_frames=5, output_type="np", seed=0, progress=False).frames
    assert not np.array_equal(out.frames, plain)


# ----------------------------------------------------------------------------------------------
# 9. Bad input
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"prompt": ""}, "prompt must be a non-empty string"),
        ({"prompt": "   "}, "prompt must be a non-empty string"),
        ({"num_frames": 10}, "num_frames must be 1 .* got 10"),
        ({"num_frames": 0}, "got 0"),
        ({"resolution": "360p"}, "unknown resolution '360p'"),
        ({"resolution": "480p"}, "resolution '480p' is not available with preset 'tiny-test'"),
        ({"height": 100, "width": 100}, "size 100x100 is not one the preset 'tiny-test' generates.*96x96"),
        ({"height": 96}, "give both height and width"),
        ({"image": torch.zeros(3, SIZE, SIZE), "video": torch.zeros(3, 5, SIZE, SIZE)}, "either image= .* or video="),
        ({"image": torch.zeros(3, SIZE, SIZE), "num_frames": 1}, "image-to-video needs num_frames > 1"),
        ({"image": torch.zeros(3, 64, 64)}, r"image tensor of shape \(3, 64, 64\) must be .* 96x96"),
        ({"image": torch.zeros(3, SIZE, SIZE, dtype=torch.uint8)}, r"floating point .* got dtype torch.uint8"),
        ({"image": torch.full((3, SIZE, SIZE), 200.0)}, "must lie in \\[-1, 1\\], got \\[200, 200\\]"),
        ({"video": torch.zeros(3, SIZE, SIZE)}, r"video tensor of shape \(3, 96, 96\) must be \[3, T, H, W\]"),
        ({"video": torch.zeros(3, 9, SIZE, SIZE), "num_frames": 1}, "video extension needs .*num_frames=1"),
        ({"guidance_scale": 0.5}, "guidance_scale must be >= 1.*0.5"),
        ({"output_type": "gif"}, "unknown output_type 'gif'"),
    ],
    ids=["empty-prompt", "blank-prompt", "frames-not-1+4k", "zero-frames", "unknown-resolution",
         "resolution-not-in-preset", "size-not-a-bucket", "height-without-width", "image-and-video",
         "image-to-image", "image-wrong-size", "image-uint8", "image-out-of-range", "video-without-time-axis",
         "extension-to-one-frame", "guidance-below-1", "bad-output-type"],
)
def test_bad_input_raises_naming_the_value(pipe, kwargs, match):
    kwargs = {"prompt": PROMPT, "num_frames": 5, "progress": False, **kwargs}
    with pytest.raises(ValueError, match=match):
        pipe(**kwargs)


def test_extension_with_nothing_left_to_generate(pipe2):
    # 9 frames = 1 + one clip of SHORT_CLIPS: no room for a generated clip after the video's first clip.
    with pytest.raises(ValueError, match=r"requested length \(3 latent frames\) leaves nothing to generate"):
        pipe2(PROMPT, video=torch.zeros(3, 17, SIZE, SIZE), num_frames=9, progress=False)


def test_extension_from_a_longer_video_keeps_the_clips_the_output_leaves_room_for(pipe2):
    """As the reference extends the first 5 s of a 10 s input to a 10 s video: a 17-frame (two-clip) input asked
    for 17 frames keeps its first clip (9 frames) and generates the second."""
    video = _smooth_video(17, 6)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # cutting a longer video to the output's room is not a dropped partial clip
        out = pipe2(PROMPT, video=video, num_frames=17, output_type="pt", seed=1, progress=False)
    assert tuple(out.frames.shape) == (3, 17, SIZE, SIZE)
    with torch.no_grad():
        expected = _tokenizer_reconstruction(pipe2, video[None, :, :9])[0]
    err = float((out.frames[:, :9] - expected).abs().max())
    assert err <= ATOL, f"kept frames differ from the tokenizer reconstruction of the first clip by {err}"


def test_interactive_bad_input(pipe2i):
    with pytest.raises(ValueError, match="at least one prompt"):
        pipe2i.interactive([])
    with pytest.raises(ValueError, match="prompt 1 must be a non-empty string"):
        pipe2i.interactive(["a red ball", " "])
    with pytest.raises(ValueError, match="needs at least 9 frames.*got 5"):
        pipe2i.interactive(["a", "b"], video=torch.zeros(3, 5, SIZE, SIZE))


def test_corrupt_image_file_names_the_path(pipe, tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"this is not a png")
    with pytest.raises(ValueError, match="broken.png"):
        pipe(PROMPT, image=bad, num_frames=5, progress=False)


def test_missing_image_file_names_the_path(pipe, tmp_path):
    with pytest.raises(FileNotFoundError, match="nothere.png"):
        pipe(PROMPT, image=tmp_path / "nothere.png", num_frames=5, progress=False)


def test_missing_or_unknown_model_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="no_such_model"):
        InfinityStarPipeline.from_pretrained(tmp_path / "no_such_model")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="empty is neither a pipeline folder"):
        InfinityStarPipeline.from_pretrained(tmp_path / "empty")


def test_official_layout_missing_pieces(official_root, tmp_path):
    root = official_root[0]
    partial = tmp_path / "partial"
    partial.mkdir()
    shutil.copy(root / "infinitystar_videovae.pth", partial / "infinitystar_videovae.pth")
    with pytest.raises(ValueError, match="transformer folders none"):
        InfinityStarPipeline.from_pretrained(partial, preset=T5_CFG)
    shutil.copytree(root / "infinitystar_8b_480p_weights", partial / "infinitystar_8b_480p_weights")
    with pytest.raises(FileNotFoundError, match="flan-t5-xl-official"):
        InfinityStarPipeline.from_pretrained(partial, preset=T5_CFG)
    with pytest.raises(ValueError, match="unknown official preset 'tiny'"):
        InfinityStarPipeline.from_pretrained(partial, preset="tiny")


def test_export_to_video_rejects_a_bad_suffix(tmp_path):
    frames = np.zeros((5, SIZE, SIZE, 3), dtype=np.uint8)
    with pytest.raises(ValueError, match="out.txt"):
        export_to_video(frames, tmp_path / "out.txt")
    assert not (tmp_path / "out.txt").exists()



def test_pipeline_components_are_frozen_however_they_were_built(pipe2, tmp_path):
    # A preset pipeline and a loaded one must run the same kernels: CPU convolutions pick another kernel (other
    # rounding) when a weight requires grad, even under no_grad, which broke the round-trip equality above.
    pipe2.save_pretrained(tmp_path / "own")
    for pipe in (pipe2, InfinityStarPipeline.from_pretrained(tmp_path / "own")):
        for module in (pipe.transformer, pipe.vae):
            assert not module.training
            assert not any(p.requires_grad for p in module.parameters())


@pytest.mark.parametrize(("num_frames", "exact"), [(17, True), (13, False)], ids=["aligned-clips", "short-last-clip"])
def test_clips_are_decoded_while_the_loop_runs_and_equal_the_whole_decode(pipe2, num_frames, exact):
    """With stream_clips each clip is decoded as soon as its codes are complete (before the next clip's
    first step), the VAE's causal cache carried over: the frames are those of decoding the whole latent after the
    loop -- bit for bit where the clips cut the decoder's chunks where the whole decode does (17 frames: latents
    1 | 2 | 2), else within float32 rounding (13 frames: 1 | 2 | 1 against chunks 2 | 2)."""
    events, clips = [], []
    streamed = pipe2(PROMPT, num_frames=num_frames, output_type="pt", progress=False, seed=3, stream_clips=True,
                     callback_on_scale_step=lambda p, ev: events.append(("step", ev.step.clip_id)),
                     callback_on_clip_end=lambda i, frames: (events.append(("clip", i)), clips.append(frames)))
    events_after, late = [], []
    whole = pipe2(PROMPT, num_frames=num_frames, output_type="pt", progress=False, seed=3,
                  callback_on_scale_step=lambda p, ev: events_after.append("step"),
                  callback_on_clip_end=lambda i, frames: (events_after.append("clip"), late.append(frames)))
    # Without stream_clips the clips come after the loop's last step.
    assert events_after == ["step"] * (len(events_after) - len(late)) + ["clip"] * len(late)
    for i in range(len(clips) - 1):
        assert events.index(("clip", i)) < events.index(("step", i + 1))  # clip i out before clip i+1 starts
    torch.testing.assert_close(torch.cat(clips, dim=1), streamed.frames, atol=0, rtol=0)
    if exact:
        assert torch.equal(streamed.frames, whole.frames)
    else:
        # Decoder outputs of order 1 through ~30 convolutions of <= 27*16 terms: float32 rounding stays far below 1e-4.
        torch.testing.assert_close(streamed.frames, whole.frames, atol=1e-4, rtol=0)

    pipe2.enable_vae_tiling(2)  # tiled decode: no streaming, the clips still arrive (after the decode)
    try:
        tiled_clips = []
        tiled = pipe2(PROMPT, num_frames=num_frames, output_type="pt", progress=False, seed=3, stream_clips=True,
                      callback_on_clip_end=lambda i, frames: tiled_clips.append(frames))
    finally:
        pipe2.set_memory_mode("plain")
    assert torch.equal(torch.cat(tiled_clips, dim=1), tiled.frames)


def test_streamed_clips_are_kept_as_uint8_frames_and_join_to_the_whole_decode(pipe2):
    """np/pil output with stream_clips: each finished clip is held as its uint8 frames (not the decoder's float32,
    so a long video does not hold a float32 copy of itself) and the joined output is the whole decode's frames
    bit for bit (17 frames: the clips cut the decoder's chunks where the whole decode does)."""
    clips = []
    streamed = pipe2(PROMPT, num_frames=17, output_type="np", progress=False, seed=3, stream_clips=True,
                     callback_on_clip_end=lambda i, frames: clips.append(frames))
    whole = pipe2(PROMPT, num_frames=17, output_type="np", progress=False, seed=3)
    assert len(clips) > 1 and all(c.dtype == np.uint8 for c in clips) and streamed.frames.dtype == np.uint8
    assert np.array_equal(np.concatenate(clips), streamed.frames)
    assert np.array_equal(streamed.frames, whole.frames)
    pil = pipe2(PROMPT, num_frames=17, output_type="pil", progress=False, seed=3, stream_clips=True,
                callback_on_clip_end=lambda i, frames: None)
    assert np.array_equal(np.stack([np.asarray(im) for im in pil.frames]), whole.frames)

"""The pipeline on a CUDA GPU (marked ``cuda``: skipped where torch.cuda.is_available() is False).

What tests/test_devices.py checks on the CPU, on the device the users run: generation is seed-deterministic there,
a CPU generator drives a CUDA pipeline, and each exact memory mode (model offload, block offload with its side-stream
prefetch, releasing the text encoder) gives the plain mode's video for the same seed, bit for bit: offloading moves
weights, never changes them, and every kernel sees the same tensors on the same device. The quantized modes are
compared to the plain bf16 video by how far their first scale's logits move (tests/test_memory_quantize.py bounds
that); here they must run end to end and give a finite video of the right shape.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from infinitystar.config import get_preset
from infinitystar.pipeline import InfinityStarPipeline

pytestmark = [pytest.mark.cuda, pytest.mark.usefixtures("one_thread")]

TINY = get_preset("pipeline", "tiny-test")
INTERACTIVE = get_preset("pipeline", "tiny-test-interactive")  # tiny-test as an interactive model (same weights)
PROMPT = "a red ball bounces"
EXACT_MODES = ["model_offload", "block_offload"]


def _pipe(precision: str = "bf16", cfg=TINY) -> InfinityStarPipeline:
    return InfinityStarPipeline.from_preset(cfg, seed=0).set_precision(precision).to("cuda")


def _video(pipe: InfinityStarPipeline, **kwargs) -> np.ndarray:
    kwargs.setdefault("num_frames", 5)
    kwargs.setdefault("seed", 3)
    return pipe(PROMPT, progress=False, **kwargs).frames


@torch.no_grad()
def test_generation_on_cuda_is_seed_deterministic():
    pipe = _pipe()
    assert pipe.device.type == "cuda" and pipe.dtype == torch.bfloat16
    first = _video(pipe)
    np.testing.assert_array_equal(first, _video(pipe))  # same seed, same device: same video
    assert not np.array_equal(first, _video(pipe, seed=4))
    explicit = _video(pipe, seed=None, generator=torch.Generator(device="cuda").manual_seed(3))
    np.testing.assert_array_equal(first, explicit)  # seed= is a generator on the pipeline's device


@torch.no_grad()
def test_cpu_generator_drives_a_cuda_pipeline():
    pipe = _pipe()
    a = _video(pipe, seed=None, generator=torch.Generator().manual_seed(3))
    b = _video(pipe, seed=None, generator=torch.Generator().manual_seed(3))
    np.testing.assert_array_equal(a, b)


@torch.no_grad()
@pytest.mark.parametrize("mode", EXACT_MODES)
def test_exact_memory_modes_give_the_plain_video_on_cuda(mode):
    plain = _pipe()
    want = _video(plain)
    del plain
    story = _pipe(cfg=INTERACTIVE)
    want_story = story.interactive([PROMPT, "it rolls"], seed=1, progress=False).frames
    del story
    pipe = InfinityStarPipeline.from_preset(TINY, seed=0).set_precision("bf16").set_memory_mode(mode, "cuda")
    np.testing.assert_array_equal(_video(pipe), want)
    story = InfinityStarPipeline.from_preset(INTERACTIVE, seed=0).set_precision("bf16").set_memory_mode(mode, "cuda")
    np.testing.assert_array_equal(story.interactive([PROMPT, "it rolls"], seed=1, progress=False).frames, want_story)
    # Between calls the offloaded weights wait in host memory.
    if mode == "model_offload":
        assert next(pipe.transformer.parameters()).device.type == "cpu"
    else:
        assert next(pipe.transformer.blocks.parameters()).device.type == "cpu"
        assert pipe.transformer.uncond_text.device.type == "cuda"  # the small modules stay on the GPU


@torch.no_grad()
@pytest.mark.parametrize("mode", ["int8", "fp8", "smallest"])
def test_quantized_modes_run_on_cuda(mode):
    pytest.importorskip("torchao")
    from infinitystar.memory.quantize import fp8_supported

    if mode == "fp8" and not fp8_supported(torch.device("cuda")):
        pytest.skip("fp8 needs compute capability 8.9+")
    want = _video(_pipe())
    pipe = InfinityStarPipeline.from_preset(TINY, seed=0).set_precision("bf16").set_memory_mode(mode, "cuda")
    got = _video(pipe)
    assert got.shape == want.shape and np.isfinite(got).all()

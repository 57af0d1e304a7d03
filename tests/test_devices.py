"""Devices, dtypes and memory modes of the pipeline, on the CPU with a tiny model.

What a GPU user meets first: ``pipe.to(device/dtype)`` in every form, ``torch_dtype=``, the generator on the device
that samples, one-line errors for a device that is not there, and the memory modes: every exact mode (offloads,
releasing the text encoder) gives the plain mode's video for the same seed. The same on a real GPU is in
tests/test_cuda_pipeline.py (marked ``cuda``).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from infinitystar.cli import main as cli_main
from infinitystar.config import ConfigError, get_preset, precision_for_dtype, resolve_device
from infinitystar.demo import load_pipeline
from infinitystar.memory import MEMORY_MODES, MemoryMode
from infinitystar.pipeline import InfinityStarPipeline

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models

TINY = get_preset("pipeline", "tiny-test")
INTERACTIVE = get_preset("pipeline", "tiny-test-interactive")  # tiny-test as an interactive model (same weights)
PROMPT = "a red ball bounces"
no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error of a machine without CUDA")


def _pipe(cfg=TINY) -> InfinityStarPipeline:
    return InfinityStarPipeline.from_preset(cfg, seed=0)


def _video(pipe: InfinityStarPipeline, **kwargs) -> np.ndarray:
    kwargs.setdefault("num_frames", 5)
    return pipe(PROMPT, seed=3, progress=False, **kwargs).frames


# ----------------------------------------------------------------------------------------------
# to(), torch_dtype, devices
# ----------------------------------------------------------------------------------------------


def test_to_takes_every_form_of_nn_module_to():
    pipe = _pipe()
    assert pipe.to(torch.bfloat16) is pipe
    assert pipe.precision == "bf16" and pipe.dtype == torch.bfloat16
    assert pipe.transformer.blocks[0].mlp.up_proj.weight.dtype == torch.bfloat16
    assert pipe.transformer.detail_head.weight.dtype == torch.float32  # heads stay float32 (the reference's)
    with pytest.warns(UserWarning, match="keep their bf16-rounded values"):
        pipe.to("cpu", torch.float32)
    assert pipe.precision == "fp32" and pipe.dtype == torch.float32
    pipe.to(device="cpu", dtype=torch.bfloat16)
    assert pipe.precision == "bf16" and pipe.device == torch.device("cpu")
    with pytest.raises(ConfigError, match="float16 is not a precision"):
        pipe.to(torch.float16)
    with pytest.raises(TypeError, match="needs a device, a dtype or both"):
        pipe.to()
    with pytest.raises(TypeError, match="unexpected keyword"):
        pipe.to(non_blocking=True)


@torch.no_grad()
def test_bf16_pipeline_generates_after_to_dtype():
    """``pipe.to(torch.bfloat16)`` then a call: it used to crash on mixed dtypes (bf16 blocks, float32 rest)."""
    pipe = _pipe().to(torch.bfloat16)
    out = pipe(PROMPT, num_frames=5, seed=0, progress=False, output_type="pt")
    assert out.frames.dtype == torch.float32 and torch.isfinite(out.frames).all()
    story = _pipe(INTERACTIVE).to(torch.bfloat16)  # the interactive policy: float32 blocks under bf16 autocast
    assert story.interactive([PROMPT, "it rolls"], seed=0, progress=False).frames.shape[0] > 5


def test_from_pretrained_takes_torch_dtype(tmp_path):
    _pipe().save_pretrained(tmp_path)
    pipe = InfinityStarPipeline.from_pretrained(tmp_path, torch_dtype=torch.bfloat16)
    assert pipe.precision == "bf16" and pipe.dtype == torch.bfloat16
    assert InfinityStarPipeline.from_pretrained(tmp_path, torch_dtype=torch.float32).precision == "fp32"
    with pytest.raises(ValueError, match="contradicts"):
        InfinityStarPipeline.from_pretrained(tmp_path, precision="fp32", torch_dtype=torch.bfloat16)


def test_precision_for_dtype_accepts_names_and_dtypes():
    assert precision_for_dtype(torch.bfloat16) == precision_for_dtype("bfloat16") == precision_for_dtype("bf16")
    assert precision_for_dtype(torch.float32) == precision_for_dtype("float32") == "fp32"
    with pytest.raises(ConfigError):
        precision_for_dtype("int4")


def test_resolve_device():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ConfigError, match="unknown device 'banana'"):
        resolve_device("banana")


@no_cuda
def test_cuda_without_a_gpu_is_one_line_everywhere(capsys, tmp_path):
    with pytest.raises(ConfigError, match="no CUDA GPU") as err:
        resolve_device("cuda")
    assert "\n" not in str(err.value)
    pipe = _pipe()
    with pytest.raises(ConfigError, match="no CUDA GPU"):
        pipe.to("cuda")
    with pytest.raises(ConfigError, match="no CUDA GPU"):  # at once, not at generation time
        pipe.enable_model_cpu_offload("cuda")
    assert pipe.device == torch.device("cpu")
    code = cli_main(["generate", PROMPT, "--preset", "tiny-test", "--device", "cuda", "--frames", "5",
                     "-o", str(tmp_path / "x.mp4"), "--quiet"])
    err_text = capsys.readouterr().err
    assert code == 2 and err_text.count("\n") == 1 and "no CUDA GPU" in err_text, err_text
    assert not (tmp_path / "x.mp4").exists()


def test_cli_device_and_dtype_options(capsys, tmp_path):
    out = tmp_path / "x.mp4"
    code = cli_main(["generate", PROMPT, "--preset", "tiny-test", "--device", "cpu", "--dtype", "bfloat16",
                     "--memory-mode", "model_offload", "--frames", "5", "-o", str(out), "--quiet"])
    assert code == 0, capsys.readouterr().err
    assert out.stat().st_size > 0
    with pytest.raises(SystemExit):
        cli_main(["generate", PROMPT, "--dtype", "float16"])
    assert "use bf16 (bfloat16) or fp32 (float32)" in capsys.readouterr().err


def test_load_pipeline_applies_device_precision_and_mode():
    pipe = load_pipeline(None, "tiny-test", device="cpu", precision="bf16", memory_mode="block_offload")
    assert pipe.precision == "bf16" and pipe.memory_mode.name == "block_offload"
    with pytest.raises(ConfigError, match="unknown memory mode 'tiny'"):
        load_pipeline(None, "tiny-test", device="cpu", memory_mode="tiny")


# ----------------------------------------------------------------------------------------------
# Generators
# ----------------------------------------------------------------------------------------------


def test_default_generator_lives_on_the_pipeline_device():
    pipe = _pipe()
    seeded = _video(pipe)
    explicit = pipe(PROMPT, num_frames=5, progress=False,
                    generator=torch.Generator(device=pipe.device).manual_seed(3)).frames
    np.testing.assert_array_equal(seeded, explicit)
    np.testing.assert_array_equal(seeded, _video(pipe))  # same seed, same device: same video


# ----------------------------------------------------------------------------------------------
# Memory modes
# ----------------------------------------------------------------------------------------------

EXACT_MODES = ["model_offload", "block_offload",
               MemoryMode("release-text", release_text_encoder=True),
               MemoryMode("blocks-of-one", offload="block", block_group_size=1)]


@pytest.mark.parametrize("mode", EXACT_MODES, ids=lambda m: m if isinstance(m, str) else m.name)
@torch.no_grad()
def test_exact_memory_modes_give_the_plain_video(mode):
    # The interactive twin of tiny-test: in float32 it computes what tiny-test computes, and it tells stories.
    plain = _pipe(INTERACTIVE)
    image = torch.rand(3, 96, 96) * 2 - 1
    want_t2v, want_i2v = _video(plain), _video(plain, image=image)
    want_story = plain.interactive([PROMPT, "it rolls"], seed=1, progress=False).frames
    pipe = _pipe(INTERACTIVE).set_memory_mode(mode, "cpu")
    assert pipe.memory_mode.exact
    np.testing.assert_array_equal(_video(pipe), want_t2v)
    np.testing.assert_array_equal(_video(pipe, image=image), want_i2v)
    np.testing.assert_array_equal(pipe.interactive([PROMPT, "it rolls"], seed=1, progress=False).frames, want_story)
    # Back to plain: the same again, and the blocks are ordinary modules once more.
    pipe.set_memory_mode("plain")
    np.testing.assert_array_equal(_video(pipe), want_t2v)
    assert not pipe.transformer.blocks[0]._forward_pre_hooks


def test_block_offload_streams_blocks_through_hooks():
    pipe = _pipe().set_memory_mode(MemoryMode("g1", offload="block", block_group_size=1), "cpu")
    assert pipe.transformer.blocks[0]._forward_pre_hooks  # the blocks are streamed, not resident
    _video(pipe)
    depth = len(pipe.transformer.blocks)
    assert pipe._block_offload is not None and pipe._block_offload.max_resident_blocks <= min(depth, 2)


def test_tiled_vae_mode_changes_only_the_decode():
    pipe = _pipe()
    want = pipe(PROMPT, num_frames=5, seed=3, progress=False, output_type="pt")
    pipe.set_memory_mode(MemoryMode("tiled", vae_decode="tiled", vae_tile_size=2), "cpu")
    assert pipe.vae_tile_size == 2 and not pipe.memory_mode.exact
    got = pipe(PROMPT, num_frames=5, seed=3, progress=False, output_type="pt")
    assert torch.equal(got.latent, want.latent)  # the generation itself is untouched
    # The decode went through tiles: 2-cell tiles of a 6x6 latent see zero padding where the frame had neighbours.
    assert got.frames.shape == want.frames.shape and not torch.equal(got.frames, want.frames)
    assert torch.equal(got.frames, pipe.decode_latent(got.latent)[0])


def test_int8_mode_quantizes_the_blocks_and_cannot_be_left_in_place():
    pytest.importorskip("torchao")
    pipe = _pipe().set_memory_mode("int8", "cpu")
    assert pipe.memory_mode.quantize == "int8"
    out = pipe(PROMPT, num_frames=5, seed=3, progress=False, output_type="pt").frames
    assert torch.isfinite(out).all()
    with pytest.raises(ConfigError, match="reload the pipeline"):
        pipe.set_memory_mode("plain")
    with pytest.raises(ConfigError, match="needs a reload"):
        pipe.set_precision("bf16")
    assert pipe.precision == "fp32" and pipe.memory_mode.name == "int8"  # a refused change changes nothing
    pipe.set_memory_mode("smallest", "cpu")  # int8 too: allowed, adds block offload and tiling
    assert torch.isfinite(pipe(PROMPT, num_frames=5, seed=3, progress=False, output_type="pt").frames).all()


def test_memory_mode_names_and_errors():
    assert set(MEMORY_MODES) == {"plain", "model_offload", "block_offload", "int8", "fp8", "smallest"}
    with pytest.raises(ConfigError, match="unknown memory mode 'tiny'; valid: plain"):
        _pipe().set_memory_mode("tiny")
    with pytest.raises(ConfigError, match="block_group_size"):
        MemoryMode(offload="block", block_group_size=0)
    with pytest.raises(ConfigError, match="offload"):
        MemoryMode(offload="disk")

"""Behaviour of the video VAE beyond golden parity: chunking, causality, tiling, sampling, input
validation and checkpoint round trips. Tiny widths (the ``tiny-test`` preset) with seeded random
weights; the depth and code paths are the official ones.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from conftest import float32_rounding_tolerance, layer_reductions, randomized_vae
from infinitystar.checkpoints import (
    convert_vae_checkpoint,
    load_official_vae_state_dict,
    load_state_dict_strict,
    load_vae,
    save_safetensors,
    save_vae,
)
from infinitystar.cli import main as cli_main
from infinitystar.config import VAEConfig, get_preset, replace
from infinitystar.vae.model import VideoVAE, chunk_bounds

MASKS = {
    "quantizer.lfq_semantic.mask": torch.tensor([2**i for i in range(15, -1, -1)], dtype=torch.int64),
    "quantizer.lfq_detail.mask": torch.zeros(64, dtype=torch.int64),
    "quantize.lfq_semantic.mask": torch.tensor([2**i for i in range(15, -1, -1)], dtype=torch.int64),
    "quantize.lfq_detail.mask": torch.zeros(64, dtype=torch.int64),
}


@pytest.fixture(scope="module")
def vae() -> VideoVAE:
    torch.manual_seed(0)
    return randomized_vae(VideoVAE(get_preset("vae", "tiny-test")), seed=1)


def _video(t: int, h: int = 32, w: int = 48, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(1, 3, t, h, w, generator=g) * 2 - 1


def _latent(t: int, h: int = 2, w: int = 3, seed: int = 0) -> torch.Tensor:
    return torch.randn(1, 64, t, h, w, generator=torch.Generator().manual_seed(seed))


def _maxdiff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a - b).abs().max().item()


def _rounding_ratio(vae: VideoVAE, a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| over the float32 rounding bound of the VAE's sums, for a and b computed by the same network on
    inputs reordered in time or batch (chunked vs one shot, prefix vs whole, one item vs a batch). The kernels
    see other shapes and may sum in another order (bitwise equal with AVX-512 kernels, not with AVX2), so <= 1
    is the criterion; a wrong chunk boundary, causal pad or cache moves values by a sizeable fraction of their range.
    """
    scale = max(a.abs().max().item(), b.abs().max().item())
    return _maxdiff(a, b) / float32_rounding_tolerance(scale, layer_reductions(vae))


# ----------------------------------------------------------------------------------------------
# Chunking and causality
# ----------------------------------------------------------------------------------------------


def test_chunk_bounds():
    assert chunk_bounds(17, 8) == [(0, 1), (1, 9), (9, 17)]
    assert chunk_bounds(21, 8) == [(0, 5), (5, 13), (13, 21)]
    assert chunk_bounds(1, 8) == [(0, 1)]
    assert chunk_bounds(5, 2) == [(0, 1), (1, 3), (3, 5)]
    assert chunk_bounds(2, 2) == [(0, 2)]
    assert chunk_bounds(4, 2) == [(0, 2), (2, 4)]


@pytest.mark.parametrize("frames", [1, 5, 13, 17, 21])
def test_chunked_encode_matches_one_shot(vae, frames):
    x = _video(frames)
    with torch.no_grad():
        chunked, one_shot = vae.encode(x), vae.encode(x, chunked=False)
    assert chunked.shape == (1, 64, 1 + (frames - 1) // 4, 2, 3)
    assert _rounding_ratio(vae, chunked, one_shot) <= 1


@pytest.mark.parametrize("latents", [1, 2, 3, 4, 6, 7])
def test_chunked_decode_matches_one_shot(vae, latents):
    """T'=2 included: the reference crashes there (its chunk loop runs zero times)."""
    z = _latent(latents)
    with torch.no_grad():
        chunked, one_shot = vae.decode(z), vae.decode(z, chunked=False)
    assert chunked.shape == (1, 3, 1 + 4 * (latents - 1), 32, 48)
    assert _rounding_ratio(vae, chunked, one_shot) <= 1


def test_other_chunk_sizes_match_one_shot(vae):
    """Odd latent batches and 4-frame encoder batches give the same numbers (chunking is exact)."""
    other = VideoVAE(replace(vae.config, encode_frame_batch=4, decode_latent_batch=3))
    other.load_state_dict(vae.state_dict())
    x, z = _video(21), _latent(6)
    with torch.no_grad():
        assert _rounding_ratio(vae, other.encode(x), vae.encode(x, chunked=False)) <= 1
        assert _rounding_ratio(vae, other.decode(z), vae.decode(z, chunked=False)) <= 1


def test_encoder_is_causal(vae):
    """Encoding the first 1+4k frames gives the first 1+k latents of the long video."""
    x = _video(21)
    with torch.no_grad():
        full = vae.encode(x)
        for k in (0, 1, 2, 4):
            prefix = vae.encode(x[:, :, : 1 + 4 * k])
            assert _rounding_ratio(vae, prefix, full[:, :, : 1 + k]) <= 1
        image = vae.encode(x[:, :, 0])  # 4-D image batch
    assert image.shape == (1, 64, 1, 2, 3)
    assert _rounding_ratio(vae, image, full[:, :, :1]) <= 1


def test_decoder_is_causal(vae):
    z = _latent(6)
    with torch.no_grad():
        full = vae.decode(z)
        for k in (1, 2, 3, 5):
            assert _rounding_ratio(vae, vae.decode(z[:, :, :k]), full[:, :, : 1 + 4 * (k - 1)]) <= 1


def test_batch_items_are_independent(vae):
    x = torch.cat([_video(5, seed=1), _video(5, seed=2)])
    with torch.no_grad():
        both = vae.encode(x)
        assert _rounding_ratio(vae, both[1:], vae.encode(x[1:])) <= 1
        dec = vae.decode(both)
        assert _rounding_ratio(vae, dec[:1], vae.decode(both[:1])) <= 1


# ----------------------------------------------------------------------------------------------
# Posterior sampling
# ----------------------------------------------------------------------------------------------


def test_seeded_sampling_is_reproducible(vae):
    x = _video(5)
    with torch.no_grad():
        a = vae.encode(x, sample=True, generator=torch.Generator().manual_seed(7))
        b = vae.encode(x, sample=True, generator=torch.Generator().manual_seed(7))
        c = vae.encode(x, sample=True, generator=torch.Generator().manual_seed(8))
        mean_latent = vae.encode(x)
        mean, logvar = vae.encode_posterior(x)
        eps = torch.randn(mean.shape, generator=torch.Generator().manual_seed(7))
        explicit = vae.encode(x, noise=eps)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert not torch.equal(a, mean_latent)
    # The draw comes from the given generator, and `noise` is used as eps (the same draw and formula: bitwise).
    assert _maxdiff(a, explicit) <= 1e-6
    assert torch.all(logvar <= 20) and torch.all(logvar >= -30)


# ----------------------------------------------------------------------------------------------
# Tiled decoding
# ----------------------------------------------------------------------------------------------


def test_tile_larger_than_latent_is_untiled(vae):
    z = _latent(3, 4, 6)
    with torch.no_grad():
        assert torch.equal(vae.decode(z, tile_size=6), vae.decode(z))


def test_tiled_decode_close_to_untiled(vae):
    """Tiling is approximate: pixels near a tile border see zero padding instead of neighbours.

    Measured on this random-weight model, one latent frame of 12x16 cells (192x256 px), frame mean
    |x| 0.43, tile 8: overlap 2: mean |diff| 1.2e-2, max 0.85; overlap 4: mean 2.6e-3, max 0.15;
    overlap 6: mean 7.0e-4, max 2.4e-2. (Two latent frames of 24x32 cells, tile 16 / overlap 8: mean
    3.5e-5, max 5.2e-3.) Stated tolerances: overlap 4 mean < 6e-3 and max < 0.3, overlap 6 mean < 2e-3
    and max < 0.1, error falling with the overlap. A misplaced tile or wrong blend weights gives mean
    errors >= 0.05. These errors are the tiling's approximation (zero padding), a property of the weights and
    the input; float rounding (~1e-6 here) moves them by far less than the 2-4x margins, on any machine.
    """
    # Many small convolutions: one thread avoids OpenMP barrier stalls on a shared CPU (the autouse
    # fixture restores 2 threads for the next test).
    torch.set_num_threads(1)
    z = _latent(1, 12, 16, seed=3)
    with torch.no_grad():
        full = vae.decode(z)
        errors = {}
        for overlap in (2, 4, 6):
            tiled = vae.decode(z, tile_size=8, tile_overlap=overlap)
            assert tiled.shape == full.shape
            errors[overlap] = ((tiled - full).abs().mean().item(), _maxdiff(tiled, full))
    assert errors[4][0] < 6e-3 and errors[4][1] < 0.3, errors
    assert errors[6][0] < 2e-3 and errors[6][1] < 0.1, errors
    assert errors[6][0] < errors[4][0] < errors[2][0], errors


def test_tiled_decode_rejects_bad_tiles(vae):
    z = _latent(1, 4, 4)
    with pytest.raises(ValueError, match="tile_size"):
        vae.decode(z, tile_size=0)
    with pytest.raises(ValueError, match="tile_overlap"):
        vae.decode(z, tile_size=2, tile_overlap=2)


# ----------------------------------------------------------------------------------------------
# Input validation
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("shape", "message"),
    [
        ((3, 5, 32, 32), r"3 channels .* got 5 \(shape \(3, 5, 1, 32, 32\)\)"),  # image batch of 5 channels
        ((1, 3, 32), r"got shape \(1, 3, 32\)"),
        ((1, 4, 5, 32, 32), r"3 channels .* got 4"),
        ((1, 3, 6, 32, 32), r"frame count must be 1 \+ 4k .* got 6\. Nearest valid: 5 or 9"),
        ((1, 3, 0, 32, 32), r"got 0\. Nearest valid: 1"),
        ((1, 3, 5, 40, 32), r"height must be a multiple of 16; got 40 .* Nearest valid: 32 or 48"),
        ((1, 3, 5, 32, 8), r"width must be a multiple of 16; got 8 .* Nearest valid: 16"),
    ],
)
def test_bad_video_is_rejected(vae, shape, message):
    with pytest.raises(ValueError, match=message):
        vae.encode(torch.zeros(shape))


def test_bad_latent_and_noise_are_rejected(vae):
    with pytest.raises(ValueError, match=r"64 channels .* got 16"):
        vae.decode(torch.zeros(1, 16, 1, 2, 2))
    with pytest.raises(ValueError, match="got shape"):
        vae.decode(torch.zeros(64, 2, 2))
    x = _video(1)
    with pytest.raises(ValueError, match=r"noise must have the posterior's shape \(1, 64, 1, 2, 3\)"):
        vae.encode(x, noise=torch.zeros(1, 64, 1, 2, 2))
    with pytest.raises(ValueError, match="sample=False"):
        vae.encode(x, generator=torch.Generator())
    with pytest.raises(ValueError, match="integer|floating"):
        vae.encode(torch.zeros(1, 3, 1, 32, 48, dtype=torch.uint8))


# ----------------------------------------------------------------------------------------------
# Checkpoints
# ----------------------------------------------------------------------------------------------


def _official_pth(vae: VideoVAE, path, extra=None) -> None:
    """A file shaped like infinitystar_videovae.pth: {"vae": state dict incl. the mask buffers, ...}."""
    sd = {**vae.state_dict(), **MASKS}
    torch.save({"vae": sd, "step": 123, **(extra or {})}, path)


def _same_outputs(a: VideoVAE, b: VideoVAE) -> None:
    x = _video(5)
    with torch.no_grad():
        za, zb = a.encode(x), b.encode(x)
        assert torch.equal(za, zb)
        assert torch.equal(a.decode(za), b.decode(zb))


def test_official_pth_loads(vae, tmp_path):
    path = tmp_path / "infinitystar_videovae.pth"
    _official_pth(vae, path)
    sd = load_official_vae_state_dict(path)
    assert not any(k.endswith(".mask") for k in sd)
    assert len(sd) == len(vae.state_dict())
    loaded = load_vae(path, vae.config)
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
    assert all(p.device.type == "cpu" for p in loaded.parameters())
    _same_outputs(vae, loaded)


def test_pth_without_vae_entry_is_rejected(vae, tmp_path):
    path = tmp_path / "bad.pth"
    torch.save({"model": vae.state_dict()}, path)
    with pytest.raises(ValueError, match=r"no 'vae' entry; its top-level keys are \[model\]"):
        load_official_vae_state_dict(path)
    torch.save([1, 2], path)
    with pytest.raises(ValueError, match="expected a dict"):
        load_official_vae_state_dict(path)


class _NotAWeight:
    pass


def test_pth_is_never_fully_unpickled(vae, tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"vae": vae.state_dict(), "obj": _NotAWeight()}, path)
    with pytest.raises(ValueError, match="weights-only"):
        load_official_vae_state_dict(path)


def test_missing_unexpected_and_misshaped_keys_are_listed(vae, tmp_path):
    sd = dict(vae.state_dict())
    del sd["decoder.conv_out.conv.bias"]
    sd["encoder.extra.weight"] = torch.zeros(3)
    sd["quantizer.lfq_detail.zero"] = torch.zeros(1)  # only `mask` buffers are dropped
    sd["proj_up.weight"] = torch.zeros(64, 32)
    path = tmp_path / "broken.pth"
    torch.save({"vae": sd}, path)
    with pytest.raises(ValueError) as info:
        load_vae(path, vae.config)
    msg = str(info.value)
    assert "is not a VideoVAE" in msg and str(path) in msg
    assert "missing keys [decoder.conv_out.conv.bias]" in msg
    assert "unexpected keys [encoder.extra.weight, quantizer.lfq_detail.zero]" in msg
    assert "proj_up.weight: expected (64, 64), given (64, 32)" in msg


def test_checkpoint_of_another_size_names_the_shapes(vae, tmp_path):
    path = tmp_path / "tiny.safetensors"
    save_vae(vae, path)
    wider = VAEConfig(block_out_channels=(8, 16, 32, 32, 32))
    with pytest.raises(ValueError) as info:
        load_vae(path, wider)
    msg = str(info.value)
    assert "is not a VideoVAE with block_out_channels=(8, 16, 32, 32, 32)" in msg
    assert "decoder.conv_in.conv.weight: expected (32, 16, 3, 3, 3), given (16, 16, 3, 3, 3)" in msg


def test_load_state_dict_strict_accepts_exact_match(vae):
    other = VideoVAE(vae.config).eval().requires_grad_(False)
    load_state_dict_strict(other, vae.state_dict(), "VideoVAE")
    _same_outputs(vae, other)


def test_safetensors_round_trip(vae, tmp_path):
    path = tmp_path / "out" / "vae.safetensors"
    save_vae(vae, path)
    assert sorted(load_file(str(path))) == sorted(vae.state_dict())
    assert not list(path.parent.glob("*.tmp"))  # the atomic write left no temp file
    loaded = load_vae(path.parent)  # a folder holding vae.safetensors; config read from the metadata
    assert loaded.config == vae.config
    _same_outputs(vae, loaded)


def test_save_safetensors_handles_shared_tensors(tmp_path):
    t = torch.arange(6.0)
    save_safetensors({"a": t, "b": t, "c": t[2:]}, tmp_path / "x.safetensors", metadata={"k": 1})
    back = load_file(str(tmp_path / "x.safetensors"))
    assert torch.equal(back["a"], t) and torch.equal(back["b"], t) and torch.equal(back["c"], t[2:])


def test_convert_and_cli(vae, tmp_path):
    src = tmp_path / "infinitystar_videovae.pth"
    _official_pth(vae, src)
    # The official preset does not fit tiny weights: conversion checks before writing.
    with pytest.raises(ValueError, match="is not a VideoVAE"):
        convert_vae_checkpoint(src, tmp_path / "never.safetensors")
    assert not (tmp_path / "never.safetensors").exists()
    dst = convert_vae_checkpoint(src, tmp_path / "direct.safetensors", vae.config)
    _same_outputs(vae, load_vae(dst))

    out = tmp_path / "cli.safetensors"
    assert cli_main(["convert", str(src), str(out), "--preset", "tiny-test"]) == 0
    assert sorted(load_file(str(out))) == sorted(vae.state_dict())
    loaded = load_vae(out)
    assert loaded.config == get_preset("vae", "tiny-test")
    _same_outputs(vae, loaded)


# ----------------------------------------------------------------------------------------------
# Circular padding (the demo world is a torus)
# ----------------------------------------------------------------------------------------------


def _padded_vae(mode: str) -> VideoVAE:
    return randomized_vae(VideoVAE(replace(get_preset("vae", "tiny-test"), spatial_padding=mode)), seed=1)


def _roll_ratio(vae: VideoVAE, a: torch.Tensor, b: torch.Tensor) -> float:
    return _maxdiff(a, b) / float32_rounding_tolerance(max(a.abs().max().item(), b.abs().max().item()),
                                                       layer_reductions(vae))


def test_circular_vae_commutes_with_torus_shifts():
    """On a torus a shift by one latent cell (16 px) must move the latent by one cell, and back through the decoder:
    every convolution sees the same neighbourhood, wrapped. Zero padding breaks it at the borders (checked too, so
    the property is not vacuous)."""
    video = _video(5)  # 32 x 48 px -> 2 x 3 latent cells
    for mode, equivariant in (("circular", True), ("zeros", False)):
        vae = _padded_vae(mode)
        with torch.no_grad():
            z = vae.encode(video)
            z_shifted = vae.encode(video.roll(16, dims=-1))
            x = vae.decode(z)
            x_shifted = vae.decode(z.roll(1, dims=-2))
        enc = _roll_ratio(vae, z_shifted, z.roll(1, dims=-1))
        dec = _roll_ratio(vae, x_shifted, x.roll(16, dims=-2))
        if equivariant:
            assert enc <= 1 and dec <= 1, (mode, enc, dec)
        else:
            assert enc > 100 and dec > 100, (mode, enc, dec)


def test_padding_mode_keeps_the_checkpoint_layout():
    """The padding is arithmetic, not weights: both modes have the same tensors, so one checkpoint loads in either."""
    circular, zeros = _padded_vae("circular"), _padded_vae("zeros")
    assert {k: v.shape for k, v in circular.state_dict().items()} == {k: v.shape for k, v in zeros.state_dict().items()}
    zeros.load_state_dict(circular.state_dict(), strict=True)
    # Away from the borders the two agree exactly up to rounding (here: the interior of a wide frame's first layer).
    x = _video(1, 32, 48)
    a, b = circular.encoder.conv_in(x), zeros.encoder.conv_in(x)
    assert _maxdiff(a[..., 1:-1, 1:-1], b[..., 1:-1, 1:-1]) < 1e-5
    assert _maxdiff(a, b) > 1e-2


def test_circular_vae_refuses_tiles_and_bad_modes():
    vae = _padded_vae("circular")
    with pytest.raises(ValueError, match="tiled decoding needs a zero-padded VAE"):
        vae.decode(_latent(2, 2, 3), tile_size=1)
    with pytest.raises(ValueError, match="spatial_padding must be 'zeros' or 'circular'"):
        replace(get_preset("vae", "tiny-test"), spatial_padding="reflect")

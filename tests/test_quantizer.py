"""Unit tests of BSQ and the multi-scale residual quantizer on small random tensors (no golden data)."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import float32_rounding_tolerance
from infinitystar.config import QuantizerConfig
from infinitystar.vae.bsq import BSQ, bits_to_codes, bsq_aux_losses, bsq_quantize
from infinitystar.vae.multiscale import (
    CodeAccumulator,
    area_resize,
    bits_to_summed_codes,
    build_steps,
    encode_to_bits,
    parse_repetitions,
    resample_channels_space,
    schedule_repetitions,
)

QC = QuantizerConfig(detail_scale_min_tokens=9)
IMAGE_SCHEDULE = [(1, 1, 1), (1, 2, 2), (1, 3, 3), (1, 4, 4)]
VIDEO_SCHEDULE = IMAGE_SCHEDULE + [(4, 1, 1), (4, 2, 2), (4, 3, 3), (4, 4, 4)]
VIDEO_REPS = [3, 3, 3, 3, 3, 3, 2, 1]


def _latent(t: int = 5, h: int = 4, w: int = 4, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, 64, t, h, w, generator=g) / 8  # per-token norm ~1, like a code


# ---------------------------------------------------------------------------------------------- BSQ


@pytest.mark.parametrize("d", [16, 64])
def test_codes_are_unit_sign_vectors(d):
    x = torch.randn(2, d, 3, 4, 5)
    out = bsq_quantize(x)
    q = out.quantized
    assert q.shape == x.shape and out.bits.shape == (2, 3, 4, 5, d) and out.bits.dtype == torch.uint8
    torch.testing.assert_close(q.norm(dim=1), torch.ones(2, 3, 4, 5), atol=1e-6, rtol=0)
    # Straight-through v + (s - v) with |v| <= 1, |s| = 1/4 or 1/8: within 1/2 ulp(1.25) + 1/2 ulp(0.25) = 7.5e-8 of s.
    torch.testing.assert_close(q.abs(), torch.full_like(q, 1 / math.sqrt(d)), atol=1e-7, rtol=0)
    assert torch.equal(out.bits.permute(0, 4, 1, 2, 3).bool(), x > 0)


@pytest.mark.parametrize("d", [16, 64])
def test_bits_to_codes_inverts_quantize(d):
    x = torch.randn(1, d, 2, 3, 3)
    out = bsq_quantize(x)
    codes = bits_to_codes(out.bits)
    torch.testing.assert_close(codes, out.quantized, atol=1e-7, rtol=0)
    # Exact ±1/sqrt(d), unlike the straight-through output.
    assert set(codes.unique().tolist()) <= {-1 / math.sqrt(d), 1 / math.sqrt(d)}
    assert torch.equal(bsq_quantize(codes).bits, out.bits)


def test_zero_maps_to_minus_one_and_gradient_passes_straight_through():
    x = torch.zeros(1, 16, 1, 1, 1)
    x[0, 3] = 1.0
    out = bsq_quantize(x)
    assert out.bits.flatten().tolist() == [0, 0, 0, 1] + [0] * 12
    x = torch.randn(1, 16, 1, 2, 2, requires_grad=True)
    bsq_quantize(x).quantized.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0  # the gradient of the l2 norm, not zero


def test_bsq_module_checks_width_and_bits_are_validated():
    with pytest.raises(ValueError, match="BSQ\\(16\\)"):
        BSQ(16)(torch.randn(1, 64, 1, 1, 1))
    with pytest.raises(ValueError, match="0/1"):
        bits_to_codes(torch.full((1, 1, 1, 1, 16), 2, dtype=torch.uint8))


def test_aux_losses():
    d = 16
    codes = bits_to_codes(torch.randint(0, 2, (1, 2, 3, 3, d)))
    losses = bsq_aux_losses(codes)
    assert losses.commitment.item() < 1e-12  # already on the codebook
    # Independent formula: the codebook entropy of a batch whose every bit is used both ways equally is d*log 2.
    both = torch.cat([codes, -codes], dim=2)
    torch.testing.assert_close(bsq_aux_losses(both).codebook_entropy, torch.tensor(d * math.log(2)), atol=1e-4,
                               rtol=0)
    x = torch.randn(1, d, 2, 4, 4, requires_grad=True)
    aux = bsq_aux_losses(x)
    v = torch.nn.functional.normalize(x.detach(), dim=1)
    s = torch.where(v > 0, 1.0, -1.0) / math.sqrt(d)
    torch.testing.assert_close(aux.commitment, ((v - s) ** 2).mean(), atol=1e-7, rtol=1e-6)
    assert aux.per_sample_entropy.item() >= 0
    torch.testing.assert_close(aux.entropy_penalty, aux.per_sample_entropy - aux.codebook_entropy)
    aux.aux.backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


# ---------------------------------------------------------------------------------------------- resampling


def test_channel_area_is_mean_of_four_consecutive_channels():
    x = torch.randn(2, 64, 3, 4, 6)
    y = resample_channels_space(x, 16, 2, 3, "area")
    ref = x.reshape(2, 16, 4, 3, 2, 2, 3, 2).mean(dim=(2, 5, 7))
    # Both are means of 16 values, summed in other orders: float32 rounding of a 16-term sum of values <= max |x|.
    torch.testing.assert_close(y, ref, atol=float32_rounding_tolerance(x.abs().max().item(), [16]), rtol=0)


def test_channel_trilinear_interpolates_channels_linearly():
    x = torch.randn(1, 16, 2, 1, 1)
    y = resample_channels_space(x, 64, 1, 1, "trilinear")
    for j in range(64):
        pos = min(max((j + 0.5) / 4 - 0.5, 0.0), 15.0)
        lo = int(math.floor(pos))
        hi = min(lo + 1, 15)
        ref = x[0, lo] * (1 - (pos - lo)) + x[0, hi] * (pos - lo)
        # Two weighted terms, combined in another order (and weights rounded to float32) by the kernel.
        torch.testing.assert_close(y[0, j], ref, atol=float32_rounding_tolerance(x.abs().max().item(), [2]), rtol=0)


def test_same_size_resample_is_identity_and_time_untouched():
    x = torch.randn(1, 64, 5, 4, 4)
    assert resample_channels_space(x, 64, 4, 4, "trilinear") is x
    y = resample_channels_space(x, 64, 2, 2, "area")
    assert y.shape == (1, 64, 5, 2, 2)
    torch.testing.assert_close(y[:, :, 3], resample_channels_space(x[:, :, 3:4], 64, 2, 2, "area")[:, :, 0])
    torch.testing.assert_close(area_resize(x, (5, 2, 2)), y)


# ---------------------------------------------------------------------------------------------- multi-scale


def test_repetition_parsing():
    assert parse_repetitions("[3]*12+[2,1,1]") == [3] * 12 + [2, 1, 1]
    assert parse_repetitions("[3, 3, 2, 1]") == [3, 3, 2, 1]
    assert schedule_repetitions(VIDEO_SCHEDULE, "[3]*4", "[3,3,2,1]") == [3, 3, 3, 3, 3, 3, 2, 1]
    with pytest.raises(ValueError):
        parse_repetitions("[0, 1]")
    with pytest.raises(ValueError, match="video_repetition"):
        schedule_repetitions(VIDEO_SCHEDULE, "[3]*4", "[3]")


def test_round_trip_encode_then_decode():
    latent = _latent()
    enc = encode_to_bits(latent, VIDEO_SCHEDULE, VIDEO_REPS, QC, return_lfq=True)
    assert len(enc.bits) == sum(VIDEO_REPS)
    for step, bits in zip(enc.steps, enc.bits):
        assert bits.shape == (1, *step.scale, QC.bits_for(*step.scale[1:]))
    summed = bits_to_summed_codes(enc.bits, VIDEO_SCHEDULE, VIDEO_REPS, QC)
    assert summed.shape == latent.shape
    torch.testing.assert_close(summed, enc.summed_codes, atol=1e-6, rtol=0)
    # Summing every step's (BSQ output upsampled to the clip) gives the same codes.
    clip0 = sum(resample_channels_space(q, 64, 4, 4, "trilinear") for q, s in zip(enc.quantized, enc.steps)
                if s.clip_id == 0)
    torch.testing.assert_close(clip0, enc.summed_codes[:, :, :1], atol=1e-6, rtol=0)


def test_clips_are_quantized_independently():
    latent = _latent()
    other = latent.clone()
    other[:, :, 0] = torch.randn_like(other[:, :, 0])
    a = encode_to_bits(latent, VIDEO_SCHEDULE, VIDEO_REPS, QC)
    b = encode_to_bits(other, VIDEO_SCHEDULE, VIDEO_REPS, QC)
    assert not all(torch.equal(x, y) for s, x, y in zip(a.steps, a.bits, b.bits) if s.clip_id == 0)
    assert all(torch.equal(x, y) for s, x, y in zip(a.steps, a.bits, b.bits) if s.clip_id == 1)
    assert torch.equal(a.summed_codes[:, :, 1:], b.summed_codes[:, :, 1:])
    assert all(not s.any() for s in a.clip_initial_sums)
    assert [tuple(s.shape) for s in a.clip_initial_sums] == [(1, 64, 1, 1, 1), (1, 64, 4, 1, 1)]


def test_residual_shrinks_with_more_scales():
    schedule = [(1, 1, 1), (1, 2, 2), (1, 4, 4), (1, 8, 8), (1, 16, 16)]
    qc = QuantizerConfig(detail_scale_min_tokens=16)
    # A latent with content at every band (like a real one): noise at each pyramid size, upsampled and summed.
    g = torch.Generator().manual_seed(3)
    latent = sum(
        torch.nn.functional.interpolate(torch.randn(1, 64, 1, s, s, generator=g), size=(1, 16, 16), mode="trilinear")
        for s in (1, 2, 4, 8, 16)
    ) / 8
    enc = encode_to_bits(latent, schedule, [1] * len(schedule), qc)
    acc = CodeAccumulator(schedule, [1] * len(schedule), qc)
    errors = []
    for bits in enc.bits:  # the running sum after each scale = decoding a truncated pyramid
        acc.add_bits(bits)
        errors.append((latent - acc.summed_codes).norm().item() / latent.norm().item())
    assert all(b < a for a, b in zip(errors, errors[1:])), errors
    assert errors[-1] < 0.5, errors
    # More repetitions of the full-size scale keep reducing the residual.
    err_reps = []
    for r in (1, 3):
        enc = encode_to_bits(latent, schedule, [1, 1, 1, 1, r], qc)
        err_reps.append((latent - enc.summed_codes).norm().item())
    assert err_reps[1] < err_reps[0]


def test_accumulator_matches_batch_reconstruction_and_encoder_inputs():
    latent = _latent(seed=5)
    enc = encode_to_bits(latent, VIDEO_SCHEDULE, VIDEO_REPS, QC, return_inputs=True)
    acc = CodeAccumulator(VIDEO_SCHEDULE, VIDEO_REPS, QC)
    x = acc.first_input()
    assert not x.any() and x.shape == (1, 64, 1, 1, 1)
    for k, (step, bits) in enumerate(zip(enc.steps, enc.bits)):
        assert enc.inputs is not None
        torch.testing.assert_close(x, enc.inputs[k], atol=1e-6, rtol=0, msg=f"input of step {k}")
        x = acc.add_bits(bits)
        if step.ends_clip and k + 1 < len(enc.steps):
            assert not x.any() and x.shape == (1, 64, *enc.steps[k + 1].scale)  # a new clip starts at zeros
    assert x is None and acc.done
    torch.testing.assert_close(acc.summed_codes, bits_to_summed_codes(enc.bits, VIDEO_SCHEDULE, VIDEO_REPS, QC),
                               atol=0, rtol=0)
    with pytest.raises(ValueError, match="already"):
        acc.add_bits(enc.bits[-1])


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="spatial size"):
        encode_to_bits(torch.zeros(1, 64, 5, 4, 5), VIDEO_SCHEDULE, VIDEO_REPS, QC)
    with pytest.raises(ValueError, match="frames"):
        encode_to_bits(torch.zeros(1, 64, 6, 4, 4), VIDEO_SCHEDULE, VIDEO_REPS, QC)
    with pytest.raises(ValueError, match="channels"):
        encode_to_bits(torch.zeros(1, 32, 5, 4, 4), VIDEO_SCHEDULE, VIDEO_REPS, QC)
    with pytest.raises(ValueError, match="repetition"):
        build_steps(VIDEO_SCHEDULE, [1, 2], QC)
    acc = CodeAccumulator(IMAGE_SCHEDULE, [1, 1, 1, 1], QC)
    with pytest.raises(ValueError, match="expects bits of shape"):
        acc.add_bits(torch.zeros(1, 1, 1, 1, 64, dtype=torch.uint8))

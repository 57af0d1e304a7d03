"""Bitwise spherical quantization (BSQ): a parameter-free quantizer of d-channel vectors to d bits.

A vector is projected onto the unit sphere and every channel is replaced by its sign, scaled by
1/sqrt(d) so the code stays on the sphere. Bit k of a token is channel k of the code (> 0 -> 1).
There is no learned codebook, so the whole quantizer is a handful of pure functions.

Numerics follow the reference exactly where it matters for bit-exact residual chains:
* the l2 norm is taken over the channel axis of a channels-last copy, with an eps of 1e-12;
* the sign of exact zeros is -1;
* the quantized output is computed in the straight-through form ``v + (s - v).detach()``, which
  equals ``s`` only up to about one ulp, and later residuals are computed from that value.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

# Bits are stored compactly; callers that need class indices (cross-entropy) use ``.long()``.
BIT_DTYPE = torch.uint8

_NORM_EPS = 1e-12  # F.normalize's default, as in the reference


@dataclass
class BSQOutput:
    """Result of quantizing x (B, d, t, h, w).

    ``quantized`` (B, d, t, h, w) float32 is the straight-through code (±1/sqrt(d) within an ulp);
    ``bits`` (B, t, h, w, d) uint8 0/1; ``normalized`` (B, t, h, w, d) the unit-sphere projection.
    """

    quantized: Tensor
    bits: Tensor
    normalized: Tensor


def _check_5d(x: Tensor, name: str) -> None:
    if x.dim() != 5:
        raise ValueError(f"{name} must be 5-D, got shape {tuple(x.shape)}")


def l2_normalize(x: Tensor, dim: int = -1) -> Tensor:
    """x / max(||x||_2, 1e-12) along ``dim`` (projection onto the unit sphere)."""
    return F.normalize(x, p=2.0, dim=dim, eps=_NORM_EPS)


def bsq_quantize(x_BdThw: Tensor) -> BSQOutput:
    """Quantize every (t, h, w) position of ``x`` (B, d, t, h, w) to d bits.

    Runs in float32 whatever the input dtype (the reference disables autocast here).
    """
    _check_5d(x_BdThw, "BSQ input")
    d = x_BdThw.shape[1]
    # Channels last and contiguous: the norm is reduced over a contiguous axis, as the reference does.
    v_BthwD = l2_normalize(x_BdThw.float().permute(0, 2, 3, 4, 1).contiguous(), dim=-1)
    with torch.autocast(device_type=v_BthwD.device.type, enabled=False):
        sign = torch.where(v_BthwD > 0, 1.0, -1.0).to(v_BthwD.dtype)
        s_BthwD = sign / math.sqrt(d)
        # Straight-through estimator, in exactly this form: later residuals are computed from q.
        q_BthwD = v_BthwD + (s_BthwD - v_BthwD).detach()
    bits = (q_BthwD > 0).to(BIT_DTYPE)
    return BSQOutput(quantized=q_BthwD.permute(0, 4, 1, 2, 3), bits=bits, normalized=v_BthwD)


def bits_to_codes(bits_BthwD: Tensor) -> Tensor:
    """Bit labels (B, t, h, w, d) -> codes (B, d, t, h, w) = l2norm(2*bits - 1) = exactly ±1/sqrt(d)."""
    _check_5d(bits_BthwD, "bit labels")
    if bits_BthwD.is_floating_point():
        bad = (bits_BthwD != 0) & (bits_BthwD != 1)
    else:
        bad = (bits_BthwD < 0) | (bits_BthwD > 1)
    if bool(bad.any()):
        raise ValueError("bit labels must be 0/1")
    signs = bits_BthwD.float() * 2.0 - 1.0
    return l2_normalize(signs, dim=-1).permute(0, 4, 1, 2, 3)


class BSQ(torch.nn.Module):
    """Module wrapper (no parameters) for code that wants a quantizer object of a fixed width."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        if dim <= 0:
            raise ValueError(f"BSQ dim must be > 0, got {dim}")
        self.dim = dim

    def forward(self, x_BdThw: Tensor) -> BSQOutput:
        if x_BdThw.dim() != 5 or x_BdThw.shape[1] != self.dim:
            raise ValueError(f"BSQ({self.dim}) expects (B, {self.dim}, t, h, w), got {tuple(x_BdThw.shape)}")
        return bsq_quantize(x_BdThw)

    def extra_repr(self) -> str:
        return f"dim={self.dim}"


# ---------------------------------------------------------------------------------------------
# Training-only auxiliary losses (VAE training; the released tokenizer is frozen).


@dataclass
class BSQAuxLosses:
    per_sample_entropy: Tensor
    codebook_entropy: Tensor
    entropy_penalty: Tensor
    commitment: Tensor
    aux: Tensor


def _binary_entropy(prob: Tensor) -> Tensor:
    """Entropy over the last axis of a probability tensor [..., 2]: -sum p log(p + 1e-8)."""
    return -(prob * torch.log(prob + 1e-8)).sum(-1)


def bsq_aux_losses(
    x_BdThw: Tensor,
    *,
    inv_temperature: float = 100.0,
    gamma0: float = 1.0,
    gamma: float = 1.0,
    zeta: float = 1.0,
    entropy_weight: float = 0.1,
    commitment_weight: float = 0.25,
) -> BSQAuxLosses:
    """The reference BSQ's training losses for input x (B, d, t, h, w).

    The soft assignment of each bit is p = sigmoid(-4 v / sqrt(d) * inv_temperature) for value 0 (the
    reference's convention; the distance to the -1/sqrt(d) code shrinks as v grows negative).
    ``per_sample_entropy`` is summed over bits and averaged over tokens (low = confident bits);
    ``codebook_entropy`` is the entropy of the token-averaged bit probabilities, summed over bits
    (high = every bit used both ways). ``aux = commitment_weight * commit + zeta * penalty / inv_temperature
    * entropy_weight``, where penalty = gamma0 * per_sample - gamma * codebook.
    """
    _check_5d(x_BdThw, "BSQ input")
    d = x_BdThw.shape[1]
    out = bsq_quantize(x_BdThw)
    v_ND = out.normalized.reshape(-1, d)
    q_ND = out.quantized.permute(0, 2, 3, 4, 1).reshape(-1, d)
    p_ND = torch.sigmoid(-4.0 * v_ND / math.sqrt(d) * inv_temperature)
    prob_ND2 = torch.stack([p_ND, 1.0 - p_ND], dim=-1)
    per_sample = _binary_entropy(prob_ND2).sum(-1).mean()
    codebook = _binary_entropy(prob_ND2.mean(0)).sum()
    penalty = gamma0 * per_sample - gamma * codebook
    commit = ((v_ND - q_ND.detach()) ** 2).mean()
    aux = commitment_weight * commit + (zeta * penalty / inv_temperature) * entropy_weight
    return BSQAuxLosses(per_sample, codebook, penalty, commit, aux)

"""Turning the transformer's bit logits into bits: temperature, guidance (CFG / APG), sampling.

Pure functions, no module state. The bit heads emit, per token, ``2*d`` numbers laid out as
``(d, 2)``: raw head index ``2*j + v`` is the logit of bit ``j`` taking value ``v``. Every
function here takes logits either as ``[..., n, d, 2]`` (``*_Bnd2``) or flattened per token as
``[..., n, 2*d]`` (``*_BnV``); the two are views of each other.

What the reference runs at inference (``ar_infer_infinity_elegant``), per step:

1. ``logits = head(norm(h)).float() * (1 / tau[si])`` for both batch rows (0 = conditional,
   1 = unconditional), see :func:`apply_temperature` (the step plan gives each scale its tau);
2. guidance on the logits: nothing if the guidance scale is 1, else APG (official) or plain CFG, see
   :func:`guide_logits`;
3. one ``softmax`` + ``torch.multinomial`` per bit with the generation's generator, see
   :func:`sample_bits`.

The official scripts also pass ``top_k=900, top_p=0.97``; the active inference function ignores
them (and on two-class bit logits they would change nothing but the degenerate greedy cases), so there is
no top-k/top-p filter here.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch

GuidanceMethod = Literal["apg", "cfg"]


# ----------------------------------------------------------------------------------------------
# Temperature
# ----------------------------------------------------------------------------------------------


def apply_temperature(logits: torch.Tensor, tau: float) -> torch.Tensor:
    """``logits * (1 / tau)`` in float32.

    The reference multiplies by the reciprocal rather than dividing; for tau = 0.4 the two can
    differ in the last bit, so keep the multiplication.
    """
    if not tau > 0:
        raise ValueError(f"temperature tau must be > 0, got {tau}")
    return logits.float() * (1.0 / tau)


# ----------------------------------------------------------------------------------------------
# Guidance
# ----------------------------------------------------------------------------------------------


def _check_pair(cond: torch.Tensor, uncond: torch.Tensor) -> None:
    if cond.shape != uncond.shape:
        raise ValueError(f"cond and uncond logits differ in shape: {tuple(cond.shape)} vs {tuple(uncond.shape)}")
    if cond.dim() < 2:
        raise ValueError(f"guidance needs logits of at least 2 dims [..., n, V], got shape {tuple(cond.shape)}")


def cfg_guidance(cond: torch.Tensor, uncond: torch.Tensor, guidance_scale: float) -> torch.Tensor:
    """Plain classifier-free guidance on logits, in the reference's form ``cfg*c + (1-cfg)*u``.

    (Algebraically ``u + cfg*(c-u)``; the reference's operation order is kept for its rounding.)
    """
    _check_pair(cond, uncond)
    return guidance_scale * cond + (1 - guidance_scale) * uncond


def apg_guidance(
    cond_BnV: torch.Tensor,
    uncond_BnV: torch.Tensor,
    guidance_scale: float,
    norm_threshold: float = 0.05,
    eta: float = 0.0,
) -> torch.Tensor:
    """Adaptive projected guidance ("normalized guidance") on logits, as the reference applies it.

    Per batch row, over the whole ``(n, V)`` slab (every dim after the batch dim):

    1. ``diff = cond - uncond`` (fp32);
    2. if ``norm_threshold > 0``: ``diff *= min(1, norm_threshold / rms(diff))`` with
       ``rms = ||diff||_F / sqrt(n*V)`` (fp32) -- this caps the RMS of the difference;
    3. split ``diff`` into its component parallel to ``cond`` and the orthogonal rest, computed
       in float64 with ``cond`` normalised to unit Frobenius norm (eps 1e-12), cast back to fp32;
    4. ``guided = cond + (cfg - 1) * (orth + eta * par)``.

    The official setting is cfg 34, threshold 0.05, eta 0. The reference's momentum argument is
    accepted and ignored upstream; it is not offered here. Norms and the projection run over every
    dim but the batch dim, so ``[B, n, 2d]`` (the reference's shape) and ``[B, n, d, 2]`` give the
    same result.
    """
    _check_pair(cond_BnV, uncond_BnV)
    cond = cond_BnV.float()
    diff = cond - uncond_BnV.float()
    dims = tuple(range(1, cond.dim()))
    if norm_threshold > 0:
        count = math.prod(diff.shape[1:])
        rms = torch.linalg.vector_norm(diff, ord=2, dim=dims, keepdim=True) / math.sqrt(count)
        diff = diff * torch.minimum(torch.ones_like(rms), norm_threshold / rms)
    cond64 = cond.double()
    unit = cond64 / torch.linalg.vector_norm(cond64, ord=2, dim=dims, keepdim=True).clamp_min(1e-12)
    diff64 = diff.double()
    parallel = (diff64 * unit).sum(dim=dims, keepdim=True) * unit
    orthogonal = diff64 - parallel
    update = orthogonal.float() + eta * parallel.float()
    return cond + (guidance_scale - 1) * update


def guide_logits(
    logits_2nV: torch.Tensor,
    guidance_scale: float,
    method: GuidanceMethod = "apg",
    apg_norm_threshold: float = 0.05,
) -> torch.Tensor:
    """Combine the batch-of-2 logits ``[2, n, V]`` (row 0 cond, row 1 uncond) into ``[1, n, V]``.

    Whether to guide at all is :attr:`~infinitystar.config.SamplingConfig.uses_guidance`'s decision (scale 1: the
    reference runs batch 1 and never computes the unconditional branch); at scale 1 both methods return the
    conditional row exactly.
    """
    if logits_2nV.shape[0] != 2:
        raise ValueError(f"guidance needs a batch of 2 (cond, uncond), got logits of shape {tuple(logits_2nV.shape)}")
    cond, uncond = logits_2nV[0:1], logits_2nV[1:2]
    if method == "apg":
        return apg_guidance(cond, uncond, guidance_scale, norm_threshold=apg_norm_threshold)
    if method == "cfg":
        return cfg_guidance(cond, uncond, guidance_scale)
    raise ValueError(f"unknown guidance method {method!r}; expected 'apg' or 'cfg'")


# ----------------------------------------------------------------------------------------------
# Sampling
# ----------------------------------------------------------------------------------------------


def _as_bit_pairs(logits: torch.Tensor) -> torch.Tensor:
    if logits.dim() < 1 or logits.shape[-1] != 2:
        raise ValueError(f"bit logits must end in a dim of 2 (values 0/1), got shape {tuple(logits.shape)}")
    return logits


def bit_logits_from_flat(logits_BnV: torch.Tensor) -> torch.Tensor:
    """``[..., n, 2d]`` head output -> ``[..., n, d, 2]`` (raw index ``2*j + v`` -> bit j, value v)."""
    if logits_BnV.shape[-1] % 2:
        raise ValueError(f"flat bit logits need an even last dim, got shape {tuple(logits_BnV.shape)}")
    return logits_BnV.unflatten(-1, (logits_BnV.shape[-1] // 2, 2))


def sample_bits(logits_Bnd2: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Draw every bit independently from its two-class softmax; returns int64 bits ``[..., n, d]``.

    Exactly the reference's call: ``softmax`` in fp32 over the value axis, then one
    ``torch.multinomial(probs.view(-1, 2), 1, replacement=True, generator=generator)`` for all bits
    of the step. PyTorch draws the single-sample case as ``argmax(p / E)`` with ``E ~ Exp(1)``
    from the generator, so the same seed, shapes, device and call sequence give the same bits.
    ``generator=None`` draws from the global RNG, as the reference does without a seed. A generator on another
    device than the logits (a CPU generator for CUDA logits) draws on its own device: the probabilities go there
    and the bits come back (``torch.multinomial`` takes only a generator of its input's device).
    """
    logits = _as_bit_pairs(logits_Bnd2).float()
    probs = logits.softmax(dim=-1).reshape(-1, 2)
    if generator is not None and generator.device != probs.device:
        probs = probs.to(generator.device)
    idx = torch.multinomial(probs, 1, replacement=True, generator=generator)
    return idx.to(logits.device).view(logits.shape[:-1])


def advance_like_sample_bits(
    bits_shape: Sequence[int],
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
) -> None:
    """Advance ``generator`` exactly as :func:`sample_bits` does on logits of shape ``[*bits_shape, 2]`` on ``device``.

    For a step whose sample is thrown away (a teacher-forced step the loop does not run): the reference
    still draws there, and every later draw depends on it. ``torch.multinomial(p, 1)`` takes
    ``argmax(p / q)`` with ``q = empty_like(p).exponential_(1, generator)`` (ATen ``multinomial_out``,
    shared by CPU and CUDA), so what it consumes depends on the shape, dtype and device of ``p``, never on
    its values: the same call on uniform logits leaves the generator where the real draw would. (A generator of
    another device draws on its own device, as in :func:`sample_bits`.)
    """
    shape = tuple(int(v) for v in bits_shape)
    if not shape or any(v <= 0 for v in shape):
        raise ValueError(f"bits shape must be non-empty with positive sizes, got {tuple(bits_shape)}")
    sample_bits(torch.zeros((*shape, 2), device=device), generator)


def bits_to_scale_grid(bits_Bnd: torch.Tensor, scale: Sequence[int]) -> torch.Tensor:
    """``[B, n, d]`` bits of one scale -> ``[B, t, h, w, d]`` (tokens are (t, h, w) row-major)."""
    t, h, w = (int(v) for v in scale)
    if bits_Bnd.dim() != 3 or bits_Bnd.shape[1] != t * h * w:
        raise ValueError(f"bits of shape {tuple(bits_Bnd.shape)} do not hold the {t}x{h}x{w} tokens of scale {scale}")
    return bits_Bnd.reshape(bits_Bnd.shape[0], t, h, w, bits_Bnd.shape[-1])

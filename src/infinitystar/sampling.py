"""Turning the transformer's bit logits into bits: temperature, guidance (CFG / APG), sampling.

Pure functions, no module state. The bit heads emit, per token, ``2*d`` numbers laid out as
``(d, 2)``: raw head index ``2*j + v`` is the logit of bit ``j`` taking value ``v``. Every
function here takes logits either as ``[..., n, d, 2]`` (``*_Bnd2``) or flattened per token as
``[..., n, 2*d]`` (``*_BnV``); the two are views of each other.

What the reference runs at inference (``ar_infer_infinity_elegant``), per step:

1. ``logits = head(norm(h)).float() * (1 / tau[si])`` for both batch rows (0 = conditional,
   1 = unconditional), see :func:`apply_temperature` and :func:`tau_per_scale`;
2. guidance on the logits: nothing if ``cfg == 1``, else APG (official) or plain CFG, see
   :func:`guide_logits`;
3. one ``softmax`` + ``torch.multinomial`` per bit with the generation's generator, see
   :func:`sample_bits`.

The official scripts also pass ``top_k=900, top_p=0.97``; the active inference function ignores
them. :func:`filter_top_k_top_p` exists for users who want them, and is off by default.
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


def tau_per_scale(num_scales: int, scales_per_clip: int, tau_image: float, tau_video: float) -> list[float]:
    """The reference's ``tau_list``: ``tau_image`` on the first clip's scales, ``tau_video`` after.

    Indexed by scale index (not by step), so every repetition of a scale uses the same value.
    """
    if num_scales < 0 or scales_per_clip <= 0:
        raise ValueError(f"bad scale counts: num_scales={num_scales}, scales_per_clip={scales_per_clip}")
    for name, tau in (("tau_image", tau_image), ("tau_video", tau_video)):
        if not tau > 0:
            raise ValueError(f"{name} must be > 0, got {tau}")
    return [float(tau_image) if si < scales_per_clip else float(tau_video) for si in range(num_scales)]


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


def cfg_guidance(cond: torch.Tensor, uncond: torch.Tensor, cfg_scale: float) -> torch.Tensor:
    """Plain classifier-free guidance on logits, in the reference's form ``cfg*c + (1-cfg)*u``.

    (Algebraically ``u + cfg*(c-u)``; the reference's operation order is kept for its rounding.)
    """
    _check_pair(cond, uncond)
    return cfg_scale * cond + (1 - cfg_scale) * uncond


def apg_guidance(
    cond_BnV: torch.Tensor,
    uncond_BnV: torch.Tensor,
    cfg_scale: float,
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
    return cond + (cfg_scale - 1) * update


def guide_logits(
    logits_2nV: torch.Tensor,
    cfg_scale: float,
    method: GuidanceMethod = "apg",
    apg_norm_threshold: float = 0.05,
) -> torch.Tensor:
    """Combine the batch-of-2 logits ``[2, n, V]`` (row 0 cond, row 1 uncond) into ``[1, n, V]``.

    ``cfg_scale == 1`` returns the conditional row untouched (the reference then runs batch 1 and
    never computes the unconditional branch).
    """
    if cfg_scale == 1:
        return logits_2nV[0:1]
    if logits_2nV.shape[0] != 2:
        raise ValueError(f"guidance needs a batch of 2 (cond, uncond), got logits of shape {tuple(logits_2nV.shape)}")
    cond, uncond = logits_2nV[0:1], logits_2nV[1:2]
    if method == "apg":
        return apg_guidance(cond, uncond, cfg_scale, norm_threshold=apg_norm_threshold)
    if method == "cfg":
        return cfg_guidance(cond, uncond, cfg_scale)
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


def filter_top_k_top_p(logits: torch.Tensor, top_k: int = 0, top_p: float = 0.0) -> torch.Tensor:
    """Mask (to -inf) all but the ``top_k`` largest and the smallest nucleus of mass ``top_p``, on the last dim.

    ``top_k <= 0`` and ``top_p <= 0`` (or >= 1) disable the respective filter; the most likely
    value always survives. Not used by the official scripts: they pass top_k=900, top_p=0.97,
    which the active inference function ignores (and which are no-ops on two-class bit logits
    anyway, except top_k=1 or a small top_p, which reduce sampling to greedy).
    """
    out = logits.float().clone()
    vocab = out.shape[-1]
    if top_k > 0 and top_k < vocab:
        kth = torch.topk(out, top_k, dim=-1).values[..., -1:]
        out = out.masked_fill(out < kth, float("-inf"))
    if 0 < top_p < 1:
        sorted_logits, order = torch.sort(out, dim=-1, descending=False)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        # Drop the low tail whose mass is <= 1 - top_p; the largest entry is always kept.
        drop_sorted = cumulative <= (1 - top_p)
        drop_sorted[..., -1] = False
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        out = out.masked_fill(drop, float("-inf"))
    return out


def sample_bits(
    logits_Bnd2: torch.Tensor,
    generator: torch.Generator | None = None,
    top_k: int = 0,
    top_p: float = 0.0,
) -> torch.Tensor:
    """Draw every bit independently from its two-class softmax; returns int64 bits ``[..., n, d]``.

    Exactly the reference's call: ``softmax`` in fp32 over the value axis, then one
    ``torch.multinomial(probs.view(-1, 2), 1, replacement=True, generator=generator)`` for all bits
    of the step. PyTorch draws the single-sample case as ``argmax(p / E)`` with ``E ~ Exp(1)``
    from the generator, so the same seed, shapes, device and call sequence give the same bits.
    ``generator=None`` draws from the global RNG, as the reference does without a seed.
    """
    logits = _as_bit_pairs(logits_Bnd2).float()
    if top_k > 0 or 0 < top_p < 1:
        logits = filter_top_k_top_p(logits, top_k, top_p)
    probs = logits.softmax(dim=-1)
    idx = torch.multinomial(probs.reshape(-1, 2), 1, replacement=True, generator=generator)
    return idx.view(logits.shape[:-1])


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
    its values: the same call on uniform logits leaves the generator where the real draw would.
    """
    shape = tuple(int(v) for v in bits_shape)
    if not shape or any(v <= 0 for v in shape):
        raise ValueError(f"bits shape must be non-empty with positive sizes, got {tuple(bits_shape)}")
    sample_bits(torch.zeros((*shape, 2), device=device), generator)


def greedy_bits(logits_Bnd2: torch.Tensor) -> torch.Tensor:
    """The most likely value of every bit (int64 ``[..., n, d]``); ties go to 0."""
    return _as_bit_pairs(logits_Bnd2).argmax(dim=-1)


def bits_to_scale_grid(bits_Bnd: torch.Tensor, scale: Sequence[int]) -> torch.Tensor:
    """``[B, n, d]`` bits of one scale -> ``[B, t, h, w, d]`` (tokens are (t, h, w) row-major)."""
    t, h, w = (int(v) for v in scale)
    if bits_Bnd.dim() != 3 or bits_Bnd.shape[1] != t * h * w:
        raise ValueError(f"bits of shape {tuple(bits_Bnd.shape)} do not hold the {t}x{h}x{w} tokens of scale {scale}")
    return bits_Bnd.reshape(bits_Bnd.shape[0], t, h, w, bits_Bnd.shape[-1])

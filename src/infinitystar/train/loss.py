"""The training objective: per-bit two-class cross-entropy, reduced with the reference's scale weights.

Per token: the mean over its ``d`` bits (16 on semantic scales, 64 on detail scales) of the
2-class cross-entropy, and the bit accuracy ``mean(argmax == label)``. No label smoothing (the
reference's ``label_smooth`` flag is dead on this path).

Trainer reduction (upstream ``sft_trainer.train_step``), over every scale ``s`` of every sample in
the packed sequence:

* ``L_s`` / ``A_s`` = mean token loss / accuracy of the scale;
* ``w_s = n_s`` without reweighting, else
  ``w_s = min(max_reweight_value, (V_full / n_s) ** (1 / (1 + reweight_loss_by_scale))) * n_s``,
  where ``n_s = t*h*w`` of the scale and ``V_full`` = ``t*h*w`` of the **last scale of that
  sample's full schedule** (even when that scale is not among the trained ones);
* the weights are normalised to sum 1 over all scales of all samples in the step, and
  ``final_loss = sum_s w_s L_s``, ``final_acc = sum_s w_s A_s``.

So in a packed step each sample counts in proportion to the total (reweighted) size of its
scales, not equally. The raw weights are formed in float64 (numpy upstream), then cast to the loss
dtype and normalised there, as the reference does.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from infinitystar.config import ConfigError
from infinitystar.generation.schedules import Scale


@dataclass(frozen=True)
class LossWeighting:
    """Scale reweighting of the loss (release scripts: 4 and 40)."""

    # 0 = plain token mean; r > 0 up-weights each token of scale s by (V_full / n_s) ** (1 / (1 + r)).
    reweight_loss_by_scale: float = 4
    # Cap of the per-token up-weighting factor.
    max_reweight_value: float = 40

    def __post_init__(self) -> None:
        if self.reweight_loss_by_scale < 0:
            raise ConfigError(f"loss.reweight_loss_by_scale must be >= 0, got {self.reweight_loss_by_scale}")
        if self.max_reweight_value <= 0:
            raise ConfigError(f"loss.max_reweight_value must be > 0, got {self.max_reweight_value}")


@dataclass
class LossOutput:
    """Everything one training step reports about its loss.

    ``loss_per_scale`` / ``acc_per_scale`` / ``weights`` are in packed-sequence order (sample-major,
    then the sample's selected scales in schedule order).
    """

    final_loss: torch.Tensor  # scalar, differentiable
    final_acc: torch.Tensor  # scalar
    loss_per_scale: torch.Tensor  # [S]
    acc_per_scale: torch.Tensor  # [S]
    weights: torch.Tensor  # [S], sum 1


def bit_loss_per_token(logits_Nd2: torch.Tensor, labels_Nd: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token loss and bit accuracy of one group of tokens with the same bit count ``d``.

    ``logits_Nd2``: ``[..., n, d, 2]`` (last dim = logits of bit value 0 and 1), computed in fp32.
    ``labels_Nd``: ``[..., n, d]`` integer bits. Returns ``(loss [..., n], acc [..., n])``.
    """
    if logits_Nd2.shape[-1] != 2:
        raise ValueError(f"bit logits must end in a dim of 2, got shape {tuple(logits_Nd2.shape)}")
    if labels_Nd.shape != logits_Nd2.shape[:-1]:
        raise ValueError(f"labels of shape {tuple(labels_Nd.shape)} do not match logits {tuple(logits_Nd2.shape)}")
    logits = logits_Nd2.float()
    labels = labels_Nd.long()
    ce = F.cross_entropy(logits.reshape(-1, 2), labels.reshape(-1), reduction="none").view(labels.shape)
    loss = ce.mean(dim=-1)
    acc = (logits.argmax(dim=-1) == labels).float().mean(dim=-1)
    return loss, acc


def raw_scale_weights(
    token_counts: Sequence[int], full_volumes: Sequence[int], weighting: LossWeighting
) -> list[float]:
    """Un-normalised ``w_s`` (float64) for scales of ``token_counts[s]`` tokens whose sample's schedule ends
    in a scale of ``full_volumes[s]`` tokens."""
    if len(token_counts) != len(full_volumes):
        raise ValueError(f"{len(token_counts)} token counts but {len(full_volumes)} full volumes")
    out = []
    for n, v_full in zip(token_counts, full_volumes):
        if n <= 0 or v_full <= 0:
            raise ValueError(f"scale sizes must be positive, got n_s={n}, V_full={v_full}")
        if weighting.reweight_loss_by_scale == 0:
            out.append(float(n))
        else:
            factor = (v_full / n) ** (1.0 / (1.0 + weighting.reweight_loss_by_scale))
            out.append(min(float(weighting.max_reweight_value), factor) * n)
    return out


def scale_weights(
    token_counts: Sequence[int],
    full_volumes: Sequence[int],
    weighting: LossWeighting,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Normalised scale weights ``[S]`` (cast to ``dtype`` first, then divided by their sum in it)."""
    raw = torch.tensor(raw_scale_weights(token_counts, full_volumes, weighting), dtype=dtype, device=device)
    return raw / raw.sum()


def volume(scale: Sequence[int]) -> int:
    return math.prod(int(v) for v in scale)


def reduce_loss(
    loss_per_token_L: torch.Tensor,
    acc_per_token_L: torch.Tensor,
    scales: Sequence[Sequence[int]],
    full_scales: Sequence[Sequence[int]],
    weighting: LossWeighting,
) -> LossOutput:
    """The trainer's reduction over a packed sequence of visual tokens.

    ``scales[s]``: the ``(t, h, w)`` of the s-th scale in packed order; ``full_scales[s]``: the
    last scale of the full schedule of the sample that scale belongs to. The token vectors hold
    exactly ``sum(t*h*w)`` visual tokens (text and padding already removed).
    """
    if len(scales) != len(full_scales):
        raise ValueError(f"{len(scales)} scales but {len(full_scales)} full-schedule scales")
    if not scales:
        raise ValueError("reduce_loss needs at least one scale")
    counts = [volume(s) for s in scales]
    if loss_per_token_L.dim() != 1 or loss_per_token_L.shape[0] != sum(counts):
        raise ValueError(f"loss_per_token of shape {tuple(loss_per_token_L.shape)} does not hold the "
                         f"{sum(counts)} visual tokens of scales {list(map(tuple, scales))}")
    if acc_per_token_L.shape != loss_per_token_L.shape:
        raise ValueError(f"acc_per_token {tuple(acc_per_token_L.shape)} != loss_per_token "
                         f"{tuple(loss_per_token_L.shape)}")
    loss_per_scale = torch.stack([chunk.mean() for chunk in loss_per_token_L.split(counts)])
    acc_per_scale = torch.stack([chunk.mean() for chunk in acc_per_token_L.split(counts)])
    weights = scale_weights(counts, [volume(s) for s in full_scales], weighting,
                            dtype=loss_per_token_L.dtype, device=loss_per_token_L.device)
    return LossOutput(
        final_loss=(loss_per_scale * weights).sum(),
        final_acc=(acc_per_scale * weights).sum(),
        loss_per_scale=loss_per_scale,
        acc_per_scale=acc_per_scale,
        weights=weights,
    )


def packed_scale_lists(
    sample_scales: Sequence[Sequence[Sequence[int]]], sample_full_schedules: Sequence[Sequence[Sequence[int]]]
) -> tuple[list[Scale], list[Scale]]:
    """Flatten per-sample selected scales into the ``(scales, full_scales)`` arguments of :func:`reduce_loss`."""
    if len(sample_scales) != len(sample_full_schedules):
        raise ValueError(f"{len(sample_scales)} samples but {len(sample_full_schedules)} full schedules")
    scales: list[Scale] = []
    full: list[Scale] = []
    for selected, schedule in zip(sample_scales, sample_full_schedules):
        if not schedule:
            raise ValueError("a sample has an empty full schedule")
        last = tuple(int(v) for v in schedule[-1])
        for s in selected:
            scales.append(tuple(int(v) for v in s))  # type: ignore[arg-type]
            full.append(last)  # type: ignore[arg-type]
    return scales, full

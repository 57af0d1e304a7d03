"""One training step of the transformer on a packed sequence of several samples.

Pipeline (training.md sections 3-5):

1. a scale subset is drawn per sample (``train.scale_subsets``: the reference's outcome tables,
   optionally under a token budget when several samples share one sequence);
2. each sample's cached latent is tokenized (the bitwise self-correction tokenizer,
   ``train.self_correction``, run over the whole schedule): per trained scale, the input of its
   randomly chosen repetition ``[1, n_s, 64]``, the clean bit labels ``[1, n_s, d_s]`` and the RoPE
   step index ``real_si`` (:func:`tokenize_sample`, :func:`prepare_packed_batch`);
3. the selected scales of all samples are packed into one sequence
   ``[visual of sample 0, sample 1, ... | texts | pad]`` (``transformer.sequence``) and run through
   the model's training forward; condition dropout replaces a sample's text by the learned
   unconditional rows with probability ``cond_drop_rate``;
4. the per-bit loss is reduced with the reference's scale weights, normalised over every scale of
   every sample in the step (``train.loss``), so samples count in proportion to their weighted
   token mass; then backward, gradient clipping and the optimiser step.

The model stays a plain ``nn.Module``; autocast, clipping and stepping happen here.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from infinitystar.config import QuantizerConfig
from infinitystar.generation.schedules import FRAMES_INNER_CLIP, Scale
from infinitystar.text import guidance_dropout_mask
from infinitystar.train.loss import LossOutput, LossWeighting, bit_loss_per_token, reduce_loss
from infinitystar.train.scale_subsets import ScaleSubsetConfig, plan_packed_step
from infinitystar.train.self_correction import RandomBitFlips, TrainingTokens, tokenize_for_training
from infinitystar.transformer.model import InfinityStarTransformer
from infinitystar.transformer.sequence import ConditionBlock, PackedLayout, PackedSample, build_packed_layout


@dataclass
class TrainSample:
    """One sample's training inputs for the scales ``scale_ids`` of its schedule (in increasing order).

    ``inputs[k]``: ``[1, n, d_vae]`` transformer input of scale ``scale_ids[k]`` (the area-downsampled
    running code sum at its trained repetition, tokens in (t, h, w) order); ``labels[k]``: ``[1, n, d]``
    clean bit labels (any integer dtype); ``real_si[k]``: RoPE step index of that repetition; ``text``:
    ``[L_text, text_channels]`` prompt features. ``schedule`` is the sample's *full* schedule (it fixes
    the clip layout, the RoPE grid and the loss weights); ``frames_inner_clip`` the latent frames of its clips.

    The tasks beyond text-to-video (``train.tasks``): scales ``< loss_from`` are *given*, as image-to-video and
    video extension force them at generation (their inputs carry no self-correction flips and they take no
    loss); ``conditions`` are an interactive turn's condition blocks, each with its tokens ``[1, n, d_vae]``,
    which every scale attends (``transformer.sequence``).
    """

    schedule: tuple[Scale, ...]
    scale_ids: tuple[int, ...]
    inputs: list[torch.Tensor]
    labels: list[torch.Tensor]
    real_si: list[int]
    text: torch.Tensor
    frames_inner_clip: int = FRAMES_INNER_CLIP
    loss_from: int = 0
    conditions: list[tuple[ConditionBlock, torch.Tensor]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.schedule = tuple(tuple(int(v) for v in s) for s in self.schedule)  # type: ignore[misc]
        self.scale_ids = tuple(int(i) for i in self.scale_ids)
        ids = list(self.scale_ids)
        if not ids or ids != sorted(set(ids)) or ids[0] < 0 or ids[-1] >= len(self.schedule):
            raise ValueError(f"TrainSample: scale_ids {ids} must be non-empty increasing indices into "
                             f"{len(self.schedule)} scales")
        n = len(ids)
        if not (len(self.inputs) == len(self.labels) == len(self.real_si) == n):
            raise ValueError(f"TrainSample: {n} scales but {len(self.inputs)} inputs, {len(self.labels)} labels, "
                             f"{len(self.real_si)} real_si entries")
        for si, x, y in zip(ids, self.inputs, self.labels):
            scale = self.schedule[si]
            tokens = math.prod(scale)
            if x.dim() != 3 or tuple(x.shape[:2]) != (1, tokens):
                raise ValueError(f"TrainSample: input of scale {si} {scale} must be [1, {tokens}, C], "
                                 f"got {tuple(x.shape)}")
            if y.dim() != 3 or tuple(y.shape[:2]) != (1, tokens):
                raise ValueError(f"TrainSample: labels of scale {si} {scale} must be [1, {tokens}, d], "
                                 f"got {tuple(y.shape)}")
        if self.text.dim() != 2 or self.text.shape[0] == 0:
            raise ValueError(f"TrainSample: text must be [L_text > 0, channels], got {tuple(self.text.shape)}")
        if not 0 <= self.loss_from <= len(self.schedule) or not any(i >= self.loss_from for i in ids):
            raise ValueError(f"TrainSample: loss_from={self.loss_from} leaves no scale of {ids} with a loss")
        for block, tokens in self.conditions:
            if tokens.dim() != 3 or tuple(tokens.shape[:2]) != (1, block.tokens):
                raise ValueError(f"TrainSample: condition {block.scale} needs tokens [1, {block.tokens}, C], "
                                 f"got {tuple(tokens.shape)}")

    def subset(self, ids: Sequence[int]) -> TrainSample:
        """The same sample restricted to the scales ``ids`` (a subset of ``scale_ids``)."""
        pos = {si: k for k, si in enumerate(self.scale_ids)}
        missing = [i for i in ids if i not in pos]
        if missing:
            raise ValueError(f"scales {missing} are not in this sample (it holds {list(self.scale_ids)})")
        ks = [pos[i] for i in sorted(set(int(i) for i in ids))]
        return TrainSample(self.schedule, tuple(self.scale_ids[k] for k in ks), [self.inputs[k] for k in ks],
                           [self.labels[k] for k in ks], [self.real_si[k] for k in ks], self.text,
                           self.frames_inner_clip, self.loss_from, list(self.conditions))

    @property
    def loss_mask(self) -> list[bool]:
        """Per packed scale: whether it takes a loss (False for the given scales of image-to-video/extension)."""
        return [si >= self.loss_from for si in self.scale_ids]

    @property
    def visual_tokens(self) -> int:
        return sum(math.prod(self.schedule[i]) for i in self.scale_ids)


def tokenize_sample(
    latent_B64THW: torch.Tensor,
    text: torch.Tensor,
    schedule: Sequence[Sequence[int]],
    repetitions: Sequence[int],
    quantizer_config: QuantizerConfig,
    scale_ids: Sequence[int],
    generator: torch.Generator | None = None,
    *,
    bsc_strength: float | Sequence[float] = 0.3,
    frames_inner_clip: int = FRAMES_INNER_CLIP,
) -> TrainSample:
    """Tokenize one cached latent for training the scales ``scale_ids``.

    Draws the trained repetition of every scale uniformly and the bitwise self-correction flips
    (strength ``bsc_strength``, release: 0.3) from ``generator``, then runs the self-correction
    tokenizer over the whole schedule and keeps the trained scales.
    """
    if latent_B64THW.dim() != 5 or latent_B64THW.shape[0] != 1:
        raise ValueError(f"latent must be [1, C, T, H, W] (one sample), got {tuple(latent_B64THW.shape)}")
    gen = generator if generator is not None else torch.default_generator  # None: the global CPU RNG
    selected_repeats = [int(torch.randint(0, int(r), (1,), generator=gen)) for r in repetitions]
    tokens = tokenize_for_training(
        latent_B64THW, schedule, repetitions, selected_repeats, quantizer_config, RandomBitFlips(bsc_strength, gen),
        trained_scales=scale_ids, frames_inner_clip=frames_inner_clip,
    )
    return train_sample_from_tokens(tokens, schedule, text, frames_inner_clip=frames_inner_clip)


def train_sample_from_tokens(tokens: TrainingTokens, schedule: Sequence[Sequence[int]],
                             text: torch.Tensor, *, frames_inner_clip: int = FRAMES_INNER_CLIP,
                             loss_from: int = 0) -> TrainSample:
    """Wrap the self-correction tokenizer's output (one sample, batch 1) as a :class:`TrainSample`."""
    if tokens.x_BLC.shape[0] != 1:
        raise ValueError(f"expected the tokens of one sample (batch 1), got x_BLC {tuple(tokens.x_BLC.shape)}")
    xs = list(tokens.x_BLC.split(tokens.scale_lengths, dim=1))
    return TrainSample(tuple(tuple(int(v) for v in s) for s in schedule), tuple(tokens.scales), xs,
                       list(tokens.gt_bits), list(tokens.real_si), text, frames_inner_clip, loss_from)


def prepare_packed_batch(
    latents: Sequence[torch.Tensor],
    texts: Sequence[torch.Tensor],
    schedules: Sequence[Sequence[Sequence[int]]],
    repetitions: Sequence[Sequence[int]],
    quantizer_config: QuantizerConfig,
    subset_config: ScaleSubsetConfig,
    generator: torch.Generator | None = None,
    *,
    max_tokens: int | None = None,
    bsc_strength: float | Sequence[float] = 0.3,
    frames_inner_clip: int = FRAMES_INNER_CLIP,
) -> list[TrainSample]:
    """Draw every sample's scale subset (within ``max_tokens`` text + visual tokens) and tokenize it."""
    if not (len(latents) == len(texts) == len(schedules) == len(repetitions)):
        raise ValueError(f"got {len(latents)} latents, {len(texts)} texts, {len(schedules)} schedules and "
                         f"{len(repetitions)} repetition lists")
    plan = plan_packed_step(schedules, [int(t.shape[0]) for t in texts], subset_config, generator, max_tokens)
    return [
        tokenize_sample(lat, txt, sched, reps, quantizer_config, ids, generator, bsc_strength=bsc_strength,
                        frames_inner_clip=frames_inner_clip)
        for lat, txt, sched, reps, ids in zip(latents, texts, schedules, repetitions, plan.selected)
    ]


@dataclass
class StepMetrics:
    """What one step reports (all detached, on CPU)."""

    loss: float
    acc: float
    grad_norm: float  # total gradient norm before clipping (nan if no backward)
    # Per packed scale: (sample index, scale index in its schedule, scale, loss, accuracy, weight).
    per_scale: list[tuple[int, int, Scale, float, float, float]]
    visual_tokens: int
    seq_len: int  # padded length of the packed sequence


def pack_inputs(samples: Sequence[TrainSample]) -> tuple[list[PackedSample], torch.Tensor, list[torch.Tensor]]:
    """The layout description, the visual input ``[1, L_vis, C]`` and the label list of a packed sequence."""
    if not samples:
        raise ValueError("a packed step needs at least one sample")
    packed, xs, labels = [], [], []
    for sample in samples:
        packed.append(PackedSample(sample.schedule, sample.scale_ids, tuple(sample.real_si),
                                   int(sample.text.shape[0]), sample.frames_inner_clip,
                                   tuple(block for block, _ in sample.conditions)))
        xs.extend(tokens for _, tokens in sample.conditions)  # a sample's condition blocks precede its scales
        xs.extend(sample.inputs)
        labels.extend(sample.labels)
    return packed, torch.cat(xs, dim=1), labels


def _autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def packed_loss(
    model: InfinityStarTransformer,
    samples: Sequence[TrainSample],
    weighting: LossWeighting,
    *,
    uncond: Sequence[bool] | None = None,
    backend: str = "sdpa",
    autocast_dtype: torch.dtype | None = None,
) -> tuple[LossOutput, PackedLayout]:
    """Forward of one packed sequence and the reduced loss (differentiable ``final_loss``)."""
    device = next(model.parameters()).device
    packed, x_BLC, labels = pack_inputs(samples)
    layout = build_packed_layout(packed, model.cfg)
    texts = [s.text.to(device) for s in samples]
    with _autocast(device, autocast_dtype):
        out = model.forward_packed(x_BLC.to(device), texts, layout, backend=backend, uncond=uncond)
    takes_loss = [m for sample in samples for m in sample.loss_mask]
    losses, accs, scales, full = [], [], [], []
    for k, (logits, y) in enumerate(zip(out.logits, labels, strict=True)):
        if logits.shape[:-1] != y.shape:
            raise ValueError(f"labels of shape {tuple(y.shape)} do not match the head output {tuple(logits.shape)} "
                             "(semantic/detail split of the tokenizer and the model disagree?)")
        if not takes_loss[k]:
            continue  # a given scale: context for the others, as at generation, never a target
        loss, acc = bit_loss_per_token(logits, y.to(device))
        losses.append(loss[0])
        accs.append(acc[0])
        scales.append(layout.scales[k])
        full.append(layout.full_scales[k])
    reduced = reduce_loss(torch.cat(losses), torch.cat(accs), scales, full, weighting)
    return reduced, layout


def train_step(
    model: InfinityStarTransformer,
    optimizer: torch.optim.Optimizer | None,
    samples: Sequence[TrainSample],
    weighting: LossWeighting | None = None,
    *,
    grad_clip: float = 5.0,
    cond_drop_rate: float = 0.0,
    generator: torch.Generator | None = None,
    backend: str = "sdpa",
    autocast_dtype: torch.dtype | None = None,
    backward: bool = True,
    uncond: Sequence[bool] | None = None,
    loss_scale: float = 1.0,
) -> StepMetrics:
    """Forward, loss, backward, clip and step on one packed sequence.

    ``optimizer=None`` (or ``backward=False``) leaves the parameters alone; with ``backward`` the
    gradients are left in ``.grad`` for inspection when no optimizer is given. The optimizer's
    gradients are cleared after stepping (``set_to_none``), as the reference does.

    ``uncond`` gives the condition dropout per sample (e.g. drawn by the data pipeline) instead of
    drawing it here with ``cond_drop_rate``. ``loss_scale`` multiplies the loss before backward only
    (the reported loss is unscaled): the distributed trainer uses it so that the data-parallel average
    of the gradients equals the gradient of one packed step over the global batch. Parameters may be
    FSDP2-sharded (DTensor gradients); the clip then uses the global norm.
    """
    weighting = weighting if weighting is not None else LossWeighting()
    if uncond is None:
        # No draw at rate 0: the generator stream is the same as a run without condition dropout.
        uncond = ([False] * len(samples) if cond_drop_rate == 0
                  else guidance_dropout_mask(len(samples), cond_drop_rate, generator).tolist())
    elif len(uncond) != len(samples):
        raise ValueError(f"uncond has {len(uncond)} entries for {len(samples)} samples")
    reduced, layout = packed_loss(model, samples, weighting, uncond=uncond, backend=backend,
                                  autocast_dtype=autocast_dtype)
    grad_norm = float("nan")
    if backward:
        (reduced.final_loss * loss_scale if loss_scale != 1.0 else reduced.final_loss).backward()
        params = [p for p in model.parameters() if p.grad is not None]
        max_norm = grad_clip if grad_clip > 0 else float("inf")
        norm = nn.utils.clip_grad_norm_(params, max_norm)
        grad_norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
        if optimizer is not None:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    loss_s, acc_s, w_s = (t.detach().cpu().tolist() for t in (reduced.loss_per_scale, reduced.acc_per_scale,
                                                                  reduced.weights))
    per_scale = []  # the scales that take a loss, in packed order
    k = n = 0
    for b, sample in enumerate(samples):
        for si, takes_loss in zip(sample.scale_ids, sample.loss_mask):
            if takes_loss:
                per_scale.append((b, int(si), layout.scales[k], loss_s[n], acc_s[n], w_s[n]))
                n += 1
            k += 1
    return StepMetrics(
        loss=float(reduced.final_loss.detach()), acc=float(reduced.final_acc.detach()), grad_norm=grad_norm,
        per_scale=per_scale, visual_tokens=layout.visual_len, seq_len=layout.seq_len,
    )


def make_optimizer(model: nn.Module, lr: float = 4e-5, betas: tuple[float, float] = (0.9, 0.97),
                   weight_decay: float = 0.0, eps: float = 1e-8) -> torch.optim.AdamW:
    """AdamW with the release settings (lr 4e-5 constant, betas (0.9, 0.97), no weight decay).

    ``fused`` is used where the parameters live on an accelerator (the reference uses fused AdamW).
    """
    params = [p for p in model.parameters() if p.requires_grad]
    fused = bool(params) and params[0].device.type == "cuda"
    return torch.optim.AdamW(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, fused=fused)

"""The autoregressive loop: next-scale prediction in space, next-clip prediction in time.

Everything here works in latent space and owns no I/O: the pipeline encodes prompts and
conditioning media, calls these functions, and decodes the summed codes they return.

One loop serves every task. A task is a step plan (which scale, repeat, RoPE position, head,
temperature each transformer pass uses; see :mod:`infinitystar.generation.plan`) plus an
optional list of *forced* bit labels for the leading steps (image-to-video forces the first-frame
pyramid, video extension the given clips). Per step:

    transformer(text, cached context, this scale's input) -> logits -> 1/tau -> guidance (APG/CFG)
    -> per-bit sampling from the call's generator -> codes -> accumulate -> next input

Only the K/V that later steps can see are kept (the text and, per clip, the previous clip's last
scale), so a long video needs constant cache memory per clip. Forced steps whose K/V nothing reads
are not run through the transformer at all: their bits go straight into the code accumulator, and the
generator is advanced exactly as the reference's (discarded) draw on that step advances it, so every
later sample is the reference's.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..config import QuantizerConfig, SamplingConfig
from ..transformer.attention import KVCache
from ..transformer.model import InfinityStarTransformer
from ..transformer.rope import StepRopeTables, apply_rope, condition_positions, rope_table
from ..vae.multiscale import CodeAccumulator, area_resize
from .plan import StepPlan
from .sampling import (
    advance_like_sample_bits,
    apply_temperature,
    bit_logits_from_flat,
    bits_to_scale_grid,
    guide_logits,
    sample_bits,
)
from .schedules import FRAMES_INNER_CLIP, InteractiveSegmentLayout, Scale, ScaleStep

# Called after every step with (steps done, steps in the plan); the front doors draw it (a tqdm bar, the web page).
ProgressCallback = Callable[[int, int], None]


@dataclass(frozen=True)
class StepEvent:
    """What the loop hands to a per-step callback."""

    index: int
    step: ScaleStep
    bits_BthwD: Tensor
    logits_Bnd2: Tensor | None  # guided logits, sampled from (None for forced steps that were not run)
    forced: bool
    # The logits after 1/tau, before guidance: row 0 conditional, row 1 unconditional when guided (None when
    # not run).
    branches_Bnd2: Tensor | None = None
    # The running sum of codes after this step's bits, (1, 64, T', H, W) over the clips so far (only when the
    # loop was asked to keep it: building it costs a concatenation per step).
    summed_codes_B64THW: Tensor | None = None


@dataclass
class GenerationResult:
    summed_codes: Tensor  # (1, 64, T', H, W): the clips concatenated on t, input of the VAE decoder
    clip_codes: list[Tensor]  # per clip (1, 64, t_clip, H, W)
    bits: list[Tensor] = field(default_factory=list)  # per step (1, t, h, w, d), when kept
    peak_cache_bytes: int = 0
    # True when ``should_stop`` ended the loop early: the codes are those of the steps done (a coarser, possibly
    # shorter video).
    interrupted: bool = False


# ----------------------------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------------------------


def _later_references(steps: Sequence[ScaleStep]) -> list[set[int]]:
    """For each step index i, the scale ids whose cached K/V a step after i reads."""
    needed: list[set[int]] = [set() for _ in steps]
    acc: set[int] = set()
    for i in range(len(steps) - 1, -1, -1):
        needed[i] = set(acc)
        acc |= set(steps[i].ref_sids)
    return needed


def _tokens(x_B64thw: Tensor) -> Tensor:
    """(1, 64, t, h, w) -> (1, t*h*w, 64), tokens in (t, h, w) row-major order."""
    return x_B64thw.flatten(2).transpose(1, 2)


def _position_shift(model: InfinityStarTransformer, d_scale: int, d_frame: int, full_hw: Sequence[int]):
    """A function re-rotating cached keys ``[B, H, L, D]`` by (d_scale, d_frame) on the RoPE scale/frame axes.

    RoPE is a rotation by position x frequency per pair, so adding a rotation by the position difference
    moves every key to its shifted position (height/width unchanged).
    """
    delta = torch.tensor([[d_scale, d_frame, 0, 0]], dtype=torch.long)
    table = rope_table(delta, model.cfg.head_dim, model.cfg.rope_theta)

    def shift(k: Tensor) -> Tensor:
        return apply_rope(k, table.to(k.device))  # one row: broadcast over batch, heads and tokens

    return shift


def _sample_step(logits_Bnd2: Tensor, step: ScaleStep, sampling: SamplingConfig,
                 generator: torch.Generator | None) -> tuple[Tensor, Tensor, Tensor]:
    """Temperature, guidance, one draw: returns (bits (1, t, h, w, d), guided logits, logits after 1/tau)."""
    branches = apply_temperature(logits_Bnd2, step.tau)
    if sampling.uses_guidance:
        flat = guide_logits(branches.flatten(-2), sampling.guidance_scale,
                            sampling.guidance_method, sampling.apg_norm_threshold)  # type: ignore[arg-type]
        logits = bit_logits_from_flat(flat)
    else:
        logits = branches[0:1]
    return bits_to_scale_grid(sample_bits(logits, generator), step.scale), logits, branches


def _skip_draw(model: InfinityStarTransformer, step: ScaleStep, generator: torch.Generator | None,
               device: torch.device) -> None:
    """Advance ``generator`` as :func:`_sample_step` would on this step, for a forced step that is not run.

    The reference samples every step, forced or not, and only then replaces the sample with the given
    bits; the guided logits it samples from are [1, t*h*w, head bits, 2] on the model's device.
    """
    head_bits = model.cfg.detail_bits if step.detail_head else model.cfg.semantic_bits
    advance_like_sample_bits((1, step.query_tokens, head_bits), generator, device=device)


@torch.no_grad()
def generate_codes(
    model: InfinityStarTransformer,
    quantizer: QuantizerConfig,
    text_LC: Tensor,
    schedule: Sequence[Scale],
    plan: StepPlan | Sequence[ScaleStep],
    repetitions: Sequence[int],
    sampling: SamplingConfig,
    *,
    generator: torch.Generator | None = None,
    negative_LC: Tensor | None = None,
    forced_bits: Sequence[Tensor] = (),
    run_forced_steps: bool = False,
    frames_inner_clip: int = FRAMES_INNER_CLIP,
    extra_context: Sequence[Hashable] = (),
    cache: KVCache | None = None,
    on_step: Callable[[StepEvent], None] | None = None,
    on_clip: Callable[[int, Tensor], None] | None = None,
    keep_bits: bool = False,
    on_progress: ProgressCallback | None = None,
    summed_codes_in_events: bool = False,
    should_stop: Callable[[], bool] | None = None,
    reuse_rope_tables: bool = True,
) -> GenerationResult:
    """Run the autoregressive loop over ``steps`` and return the summed codes.

    ``forced_bits[i]`` replaces the sampled bits of step i (teacher forcing: image-to-video, video
    extension). Forced steps are run through the transformer only when a later step reads their K/V,
    or when ``run_forced_steps`` is set (to compare logits with the reference); either way the generator
    is drawn on every step as the reference draws it, so both settings give the same bits.
    ``extra_context`` are cache ids every step attends besides its references and the text (the
    interactive conditions); pass a ``cache`` that already holds them. ``on_clip(clip_id, codes)`` is
    called as each clip's codes are complete (for streaming); ``on_step(event)`` after each step's bits were added
    (with the running sum in ``event.summed_codes_B64THW`` when ``summed_codes_in_events``), then
    ``on_progress(done, total)``. ``should_stop()`` is asked after every step but the last: True ends the loop there
    (diffusers' ``interrupt``) and the result holds the codes of the steps done, ``interrupted`` set.
    ``reuse_rope_tables=False`` rebuilds every step's RoPE table from scratch (:class:`StepRopeTables`; the same
    bits, for benchmarks).
    """
    if not isinstance(plan, StepPlan):
        plan = StepPlan(list(plan))
    steps = plan.steps
    if len(forced_bits) > len(steps):
        raise ValueError(f"{len(forced_bits)} forced steps for a plan of {len(steps)} steps")
    device = next(model.parameters()).device
    batch = 2 if sampling.uses_guidance else 1
    if cache is None:
        cache = model.new_cache()
    if KVCache.TEXT not in cache:
        negative = None if negative_LC is None else negative_LC.to(device)
        model.prefill_text(text_LC.to(device), cache, negative_LC=negative, guidance=batch == 2)
    later = _later_references(steps)
    persistent = {KVCache.TEXT, *extra_context}
    full_hw = tuple(schedule[-1][1:])
    acc = CodeAccumulator(schedule, repetitions, quantizer, device=device, frames_inner_clip=frames_inner_clip)
    ropes = StepRopeTables(model.cfg.head_dim, model.cfg.rope_theta, model.cfg.text_maxlen, device,
                           reuse=reuse_rope_tables)
    x = acc.first_input()
    kept_bits: list[Tensor] = []
    peak = cache.nbytes()
    clips_done = 0
    for i, step in enumerate(steps):
        forced = i < len(forced_bits)
        store_as = step.si if (step.is_last_repeat and step.si in later[i]) else None
        logits = branches = None
        if forced and store_as is None and not run_forced_steps:
            bits = forced_bits[i].to(device)
            _skip_draw(model, step, generator, device)
        else:
            rope = ropes(step.scale, step.rope_scale_index, step.frames[0], full_hw)
            raw = model.step(_tokens(x), rope, cache, refs=(*step.ref_sids, *extra_context), store_as=store_as,
                             semantic=not step.detail_head, batch=batch)
            bits, logits, branches = _sample_step(raw, step, sampling, generator)
            if forced:
                bits = forced_bits[i].to(device)
        if (store_as is not None and plan.anchored_from_clip is not None
                and step.clip_id >= plan.anchored_from_clip - 1 and any(plan.clip_shift)):
            # The next clip runs at this clip's positions: move this context one clip back, where the
            # model saw its context in training.
            cache.map_keys(store_as, _position_shift(model, -plan.clip_shift[0], -plan.clip_shift[1], full_hw))
        peak = max(peak, cache.nbytes())
        cache.keep_only(persistent | later[i])
        x = acc.add_bits(bits.to(torch.uint8) if bits.dtype != torch.uint8 else bits)
        while len(acc.clip_sums) > clips_done:
            if on_clip is not None:
                on_clip(clips_done, acc.clip_sums[clips_done])
            clips_done += 1
        if on_step is not None:
            summed = acc.summed_codes if summed_codes_in_events else None
            on_step(StepEvent(i, step, bits, logits, forced, branches, summed))
        if keep_bits:
            kept_bits.append(bits)
        if on_progress is not None:
            on_progress(i + 1, len(steps))
        if x is None:
            break
        if should_stop is not None and should_stop():
            return GenerationResult(acc.summed_codes, list(acc.clip_sums), kept_bits, peak, interrupted=True)
    return GenerationResult(acc.summed_codes, list(acc.clip_sums), kept_bits, peak)


# ----------------------------------------------------------------------------------------------
# Interactive turns (the ``infinity_star_interact`` schedule)
# ----------------------------------------------------------------------------------------------

SEMANTIC_CONDITION = "semantic_condition"
DETAIL_CONDITION = "detail_condition"


def _check_interactive_inputs(context_B64THW: Tensor, first_frame_B641HW: Tensor,
                              layout: InteractiveSegmentLayout) -> None:
    _, full_h, full_w = layout.schedule[-1]
    want = (layout.context_latent_frames, full_h, full_w)
    if context_B64THW.dim() != 5 or tuple(context_B64THW.shape[2:]) != want:
        raise ValueError(f"interactive context latent must be (1, C, {want[0]}, {full_h}, {full_w}) for this layout, "
                         f"got {tuple(context_B64THW.shape)}")
    if first_frame_B641HW.dim() != 5 or tuple(first_frame_B641HW.shape[2:]) != (1, full_h, full_w):
        raise ValueError(f"interactive first-frame latent must be (1, C, 1, {full_h}, {full_w}), "
                         f"got {tuple(first_frame_B641HW.shape)}")


def interactive_condition_latents(context_B64THW: Tensor, first_frame_B641HW: Tensor,
                                  layout: InteractiveSegmentLayout) -> tuple[Tensor, Tensor]:
    """The two condition blocks of an interactive turn as latents ``(semantic, detail)``, each (1, C, t, h, w).

    * semantic: the previous segment (context frames 1..20) area-downsampled to the grid of clip scale 7;
    * detail: the story's first latent frame + the previous segment's last two frames at full size.

    Generation (:func:`prefill_interactive_conditions`) and training (``train.interactive``) both build them here.
    """
    _check_interactive_inputs(context_B64THW, first_frame_B641HW, layout)
    s0, s1 = layout.semantic_source
    semantic = area_resize(context_B64THW[:, :, s0:s1], layout.semantic_condition_scale)
    detail = torch.cat([first_frame_B641HW, context_B64THW[:, :, list(layout.detail_former_frames)]], dim=2)
    return semantic, detail


@torch.no_grad()
def prefill_interactive_conditions(
    model: InfinityStarTransformer,
    cache: KVCache,
    context_B64THW: Tensor,
    first_frame_B641HW: Tensor,
    layout: InteractiveSegmentLayout,
    *,
    batch: int,
) -> None:
    """Cache the two condition blocks of an interactive turn (after the text, before the steps).

    * semantic: the previous segment (context frames 1..20) area-downsampled to the grid of clip scale 7,
      RoPE scale id 800, frames 1..20;
    * detail: the story's first latent frame + the previous segment's last two frames at full size,
      RoPE scale id 801, frames 0, 19, 20.

    Each pass attends only its own tokens (see the comment at the call).
    """
    full_hw = tuple(layout.schedule[-1][1:])
    semantic, detail = interactive_condition_latents(context_B64THW, first_frame_B641HW, layout)
    for name, x, scale, sid, frames in (
        (SEMANTIC_CONDITION, semantic, layout.semantic_condition_scale, layout.semantic_rope_scale_id,
         layout.semantic_rope_frames),
        (DETAIL_CONDITION, detail, layout.detail_condition_scale, layout.detail_rope_scale_id,
         layout.detail_rope_frames),
    ):
        # visual_positions adds text_maxlen to the scale axis; the condition ids (800, 801) are absolute
        # scale indices of the same axis.
        pos = condition_positions(scale, sid, frames, full_hw, model.cfg.text_maxlen)
        rope = rope_table(pos, model.cfg.head_dim, model.cfg.rope_theta)
        # Each condition sees only its own tokens: the reference concatenates cached K/V only for integer
        # (scale) ids, and these passes are keyed by strings, so neither the text nor the other condition.
        model.step(_tokens(x), rope, cache, refs=(), store_as=name, semantic=True, batch=batch, attend_text=False)


@dataclass
class InteractiveTurn:
    """One interactive turn's latents."""

    result: GenerationResult  # the new clip (result.summed_codes: (1, 64, clip, H, W))
    decode_latent: Tensor  # cat(context[1:], new clip) on t: what the VAE decodes (the new segment is its end)
    next_context: Tensor  # its last context_latent_frames frames: the next turn's context (upstream's summed_codes)


@torch.no_grad()
def run_interactive_turn(
    model: InfinityStarTransformer,
    quantizer: QuantizerConfig,
    text_LC: Tensor,
    context_B64THW: Tensor,
    first_frame_B641HW: Tensor,
    layout: InteractiveSegmentLayout,
    plan: StepPlan | Sequence[ScaleStep],
    repetitions: Sequence[int],
    sampling: SamplingConfig,
    *,
    seed: int,
    on_step: Callable[[StepEvent], None] | None = None,
    on_progress: ProgressCallback | None = None,
    summed_codes_in_events: bool = False,
    should_stop: Callable[[], bool] | None = None,
) -> InteractiveTurn:
    """One interactive turn: text pass, the two condition passes, then the clip's steps, each attending
    [text, semantic condition, detail condition, own]; the generator is a fresh one seeded ``seed`` (the
    reference re-seeds every turn). The callbacks and ``should_stop`` are :func:`generate_codes`'; an interrupted
    turn's ``result.interrupted`` is set and its latents hold a partial clip."""
    device = next(model.parameters()).device
    batch = 2 if sampling.uses_guidance else 1
    cache = model.new_cache()
    model.prefill_text(text_LC.to(device), cache, guidance=batch == 2)
    prefill_interactive_conditions(model, cache, context_B64THW.to(device), first_frame_B641HW.to(device), layout,
                                   batch=batch)
    # On the model's device, as the reference's fresh generator (a CPU generator cannot drive CUDA sampling).
    generator = torch.Generator(device=device).manual_seed(seed)
    clip = layout.frames[1] - layout.frames[0]
    result = generate_codes(model, quantizer, text_LC, layout.schedule, plan, repetitions, sampling,
                            generator=generator, frames_inner_clip=clip, cache=cache,
                            extra_context=(SEMANTIC_CONDITION, DETAIL_CONDITION), on_step=on_step,
                            on_progress=on_progress, summed_codes_in_events=summed_codes_in_events,
                            should_stop=should_stop)
    joined = torch.cat([context_B64THW, result.summed_codes.to(context_B64THW)], dim=2)
    decode_latent = joined[:, :, -layout.decode_latent_frames:]
    return InteractiveTurn(result, decode_latent, decode_latent[:, :, -layout.context_latent_frames:])

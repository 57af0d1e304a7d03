"""The reference's comparison tables, rebuilt from the library's rules: only the tests use them.

golden/scale_schedules.json stores what upstream's ``dynamic_resolution.py`` tabulates (a schedule for every whole
second of a 5 s or 10 s table) and, per official mode, token counts and a FLOP estimate (inference.md section 8).
The library needs none of these tables to generate; they live here so that the tests can check the library's
pyramids, clip layout and step plans against every entry.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from infinitystar.generation.schedules import (
    FPS,
    FRAMES_INNER_CLIP,
    TEMPORAL_STRIDE,
    Scale,
    ScaleStep,
    image_scale_schedule,
    latent_frames,
    num_scales_for_pn,
    pixel_size,
    video_scale_schedule,
    visual_tokens,
)

LATENT_FRAMES_PER_SECOND = FPS // TEMPORAL_STRIDE  # 4: the reference's tables hold whole seconds only


# ----------------------------------------------------------------------------------------------
# Dynamic-resolution tables
# ----------------------------------------------------------------------------------------------


def _table_latent_frames(video_frames: int) -> int:
    # The reference sizes its tables by ``video_frames // 4 + 1`` and asserts whole 20-frame clips.
    whole_clips = TEMPORAL_STRIDE * FRAMES_INNER_CLIP
    if not isinstance(video_frames, int) or video_frames < 1 or (video_frames - 1) % whole_clips:
        raise ValueError(f"table video_frames must be 1 + 80k (81 = 5 s, 161 = 10 s, 241, ...), got {video_frames!r}")
    return latent_frames(video_frames)


def pt2scale_schedule(pn: str, h_div_w_template: float, video_frames: int = 81) -> dict[int, list[Scale]]:
    """The reference's ``pt2scale_schedule``: pt = 1 (image) and every whole second ``pt = 5, 9, ...`` -> schedule."""
    pt_max = _table_latent_frames(video_frames)
    image = image_scale_schedule(pn, h_div_w_template)
    pts = [1, *range(1 + LATENT_FRAMES_PER_SECOND, pt_max + 1, LATENT_FRAMES_PER_SECOND)]
    return {pt: video_scale_schedule(image, pt) for pt in pts}


def max_video_scales(pn: str, video_frames: int = 81) -> int:
    """Length of the table's longest schedule: K x (1 + number of 20-frame clips)."""
    return num_scales_for_pn(pn) * (1 + (_table_latent_frames(video_frames) - 1) // FRAMES_INNER_CLIP)


@dataclass(frozen=True)
class ScheduleTable:
    """One (video_frames, template, pn) entry of the reference's table."""

    pixel: tuple[int, int]
    scales_per_clip: int  # the reference's ``scales_in_one_clip``
    max_video_scales: int
    pt2scale_schedule: dict[int, list[Scale]]
    visual_tokens_per_pt: dict[int, int]


def schedule_table(pn: str, h_div_w_template: float, video_frames: int = 81) -> ScheduleTable:
    table = pt2scale_schedule(pn, h_div_w_template, video_frames)
    return ScheduleTable(
        pixel=pixel_size(pn, h_div_w_template),
        scales_per_clip=num_scales_for_pn(pn),
        max_video_scales=max_video_scales(pn, video_frames),
        pt2scale_schedule=table,
        visual_tokens_per_pt={pt: visual_tokens(s) for pt, s in table.items()},
    )


def rope_scale_table_size(image_repetition: Sequence[int], video_repetition: Sequence[int], max_scales: int,
                          margin: int = 10) -> int:
    """Rows the reference allots on the RoPE scale axis after the text: sum(img) + sum(vid) * video clips + margin."""
    k = len(image_repetition)
    if max_scales % k:
        raise ValueError(f"max_scales={max_scales} is not a multiple of K={k}")
    return sum(image_repetition) + sum(video_repetition) * (max_scales // k - 1) + margin


# ----------------------------------------------------------------------------------------------
# Cost figures (inference.md section 8)
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CostModelDims:
    """Transformer sizes for the FLOP estimate (defaults: the official 8B ``infinity_qwen8b``)."""

    depth: int = 36
    embed_dim: int = 4096
    kv_dim: int = 1024  # 8 KV heads x 128
    ffn: int = 16384

    @property
    def linear_params_per_layer(self) -> int:
        c = self.embed_dim
        return 2 * c * c + 2 * c * self.kv_dim + 3 * c * self.ffn  # q, o, k, v, SwiGLU gate/up/down

    @property
    def block_params_total(self) -> int:
        return self.depth * self.linear_params_per_layer

    @property
    def linear_flop_per_token(self) -> int:
        return 2 * self.block_params_total

    @property
    def attn_flop_per_qk_pair(self) -> int:
        return 4 * self.embed_dim * self.depth  # QK^T and PV, 2 FLOP per multiply-add each


def visual_kv_tokens(step: ScaleStep, schedule: Sequence[Scale], condition_tokens: int = 0) -> int:
    """Visual keys a step attends (text excluded): itself, the scales it references and any conditions."""
    return step.query_tokens + visual_tokens([schedule[r] for r in step.ref_sids]) + condition_tokens


@dataclass(frozen=True)
class PlanCost:
    """Token counts and FLOP estimate of one step plan (per CFG branch unless named otherwise)."""

    visual_forward_steps: int
    total_forward_passes: int
    visual_query_tokens: int
    sum_q_times_kv_visual: int
    distinct_latent_tokens: int
    largest_step_query_tokens: int
    share_query_tokens_last_scale: float
    share_query_tokens_top3_scales_per_clip: float
    linear_flop: float
    attention_flop: float
    share_flop_last_scale: float

    @property
    def total_flop(self) -> float:
        return self.linear_flop + self.attention_flop

    def seconds_at(self, flop_per_second: float) -> float:
        return self.total_flop / flop_per_second


def plan_cost(steps: Sequence[ScaleStep], schedule: Sequence[Scale], *, text_tokens: int = 128,
              condition_tokens: int = 0, condition_passes: int = 0, batch: int = 2,
              dims: CostModelDims | None = None) -> PlanCost:
    """Cost of a step plan the way inference.md section 8 counts it.

    Linear work: every query token of the text pass, the condition passes and the visual steps. Attention work:
    each visual step's queries x (visual keys + text keys), the text pass (text x text), and the condition tokens
    counted as one block attending themselves and the text (the golden estimate's convention). ``batch`` = 2 with
    guidance (conditional + unconditional rows).
    """
    dims = dims or CostModelDims()
    lin, att = dims.linear_flop_per_token, dims.attn_flop_per_qk_pair
    kv = [visual_kv_tokens(s, schedule, condition_tokens) for s in steps]
    q_total = sum(s.query_tokens for s in steps)
    qk_visual = sum(s.query_tokens * n for s, n in zip(steps, kv))
    k = max(s.si for s in steps if s.clip_id == 0) + 1
    last_si = steps[-1].si
    last = [(s, n) for s, n in zip(steps, kv) if s.si == last_si]
    clip_ends = {s.si: s for s in steps if s.si % k == k - 1}
    _, full_h, full_w = schedule[-1]
    linear = batch * (q_total + text_tokens + condition_tokens) * lin
    attention = batch * att * (qk_visual + text_tokens * q_total + text_tokens * text_tokens
                               + condition_tokens * (condition_tokens + text_tokens))
    last_flop = sum(batch * (s.query_tokens * lin + att * s.query_tokens * (n + text_tokens)) for s, n in last)
    return PlanCost(
        visual_forward_steps=len(steps),
        total_forward_passes=len(steps) + 1 + condition_passes,
        visual_query_tokens=q_total,
        sum_q_times_kv_visual=qk_visual,
        distinct_latent_tokens=sum(s.scale[0] for s in clip_ends.values()) * full_h * full_w,
        largest_step_query_tokens=max(s.query_tokens for s in steps),
        share_query_tokens_last_scale=sum(s.query_tokens for s, _ in last) / q_total,
        share_query_tokens_top3_scales_per_clip=sum(s.query_tokens for s in steps if s.si % k >= k - 3) / q_total,
        linear_flop=float(linear),
        attention_flop=float(attention),
        share_flop_last_scale=last_flop / float(linear + attention),
    )

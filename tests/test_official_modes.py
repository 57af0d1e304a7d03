"""The pipeline presets reproduce the reference's official inference modes (golden/scale_schedules.json ``modes``).

The official settings are stated once, as the pipeline presets. For every mode the golden file records, the preset
with that mode's pixel budget (and interactive or not) is found, the production plan object (``GenerationPlan``, or
``InteractivePlan`` for a turn of the interactive model) is built from it for the mode's template, length and
teacher forcing, and every recorded field and step is compared: schedule, repetitions, taus, guidance,
semantic/detail thresholds, and per step the RoPE scale index, scale, references, frames, head, quantizer, tau and
teacher forcing. The token counts and FLOP estimate are recomputed from the same steps.
"""

from __future__ import annotations

import functools
import json
import re

import pytest

from conftest import GOLDEN_DIR
from infinitystar.config import PipelineConfig, get_preset, list_presets
from infinitystar.generation.plan import GenerationPlan, InteractivePlan, frames_of_clips, resolve_size
from infinitystar.generation.schedules import (
    first_full_spatial_size_scale_index,
    pixel_frames,
    scales_per_clip,
    uses_detail_lfq,
    visual_tokens,
)
from reference_tables import CostModelDims, plan_cost, visual_kv_tokens


@functools.lru_cache(maxsize=1)
def _modes() -> dict:
    return json.loads((GOLDEN_DIR / "scale_schedules.json").read_text())["modes"]


@functools.lru_cache(maxsize=1)
def _model_dims() -> CostModelDims:
    g = json.loads((GOLDEN_DIR / "scale_schedules.json").read_text())["model_dims_for_estimate"]
    return CostModelDims(depth=g["depth"], embed_dim=g["embed_dim"], kv_dim=g["kv_dim"], ffn=g["ffn"])


def _is_interactive(mode: dict) -> bool:
    # Only a turn of the interactive model attends condition tokens besides the text.
    return mode["extra_condition_tokens"] is not None


def _preset_for(mode: dict) -> PipelineConfig:
    """The one pipeline preset with the mode's pixel budget (full pyramid) and interactivity."""
    found = [cfg for cfg in (get_preset("pipeline", n) for n in list_presets("pipeline"))
             if cfg.pn == mode["pn"] and cfg.num_scales is None and cfg.interactive == _is_interactive(mode)]
    assert len(found) == 1, f"{len(found)} presets for pn {mode['pn']} (interactive={_is_interactive(mode)})"
    return found[0]


@functools.cache
def _plan(name: str) -> tuple[PipelineConfig, tuple[int, int], GenerationPlan | InteractivePlan]:
    """(preset, pixel size, plan) of golden mode ``name``."""
    mode = _modes()[name]
    cfg = _preset_for(mode)
    template, pyramid, size = resolve_size(cfg, h_div_w=mode["h_div_w_template"])
    assert template == mode["h_div_w_template"], name
    if _is_interactive(mode):
        return cfg, size, InteractivePlan(cfg, tuple(pyramid), cfg.sampling)
    plan = GenerationPlan(cfg, pixel_frames(mode["latent_frames"], cfg.vae.time_stride), tuple(pyramid), cfg.sampling)
    gt_leak = mode["gt_leak"]  # upstream: -1 = nothing forced, else K * (1 + whole clips of the given video)
    if gt_leak > 0:
        k = len(pyramid)
        assert gt_leak % k == 0, f"{name}: gt_leak {gt_leak} is not whole clips of {k} scales"
        plan = plan.with_condition(frames_of_clips(cfg, gt_leak // k - 1))
    return cfg, size, plan


def _schedule(plan: GenerationPlan | InteractivePlan) -> list:
    return list(plan.layout.schedule) if isinstance(plan, InteractivePlan) else plan.schedule


def _condition_tokens(plan: GenerationPlan | InteractivePlan) -> int | None:
    if not isinstance(plan, InteractivePlan):
        return None
    return visual_tokens([plan.layout.semantic_condition_scale, plan.layout.detail_condition_scale])


def _parse_guidance(text: str) -> tuple[str, float, float | None]:
    # e.g. "APG cfg=34 norm_threshold=0.05 eta=0", "APG cfg=34 (assumed)", "CFG cfg=3"
    m = re.match(r"(APG|CFG) cfg=([\d.]+)(?: norm_threshold=([\d.]+))?", text)
    assert m, text
    return m.group(1).lower(), float(m.group(2)), float(m.group(3)) if m.group(3) else None


MODE_NAMES = list(_modes()) if (GOLDEN_DIR / "scale_schedules.json").is_file() else []


def test_golden_modes_present():
    assert MODE_NAMES, "golden/scale_schedules.json lists no modes"


@pytest.mark.parametrize("name", MODE_NAMES)
def test_preset_settings_match_mode(name):
    mode = _modes()[name]
    cfg, size, plan = _plan(name)
    schedule = _schedule(plan)
    assert list(size) == mode["pixel_hw"]
    assert [list(s) for s in schedule] == mode["scale_schedule"]
    assert len(schedule) == mode["num_scales"]
    assert scales_per_clip(schedule) == mode["scales_per_clip"] == mode["tower_split_index"]
    assert first_full_spatial_size_scale_index(schedule) == mode["first_full_spatial_size_scale_index"]
    assert list(cfg.image_repetition) == mode["image_scale_repetition"]
    assert list(cfg.video_repetition) == mode["video_scale_repetition"]
    assert (cfg.sampling.tau_image, cfg.sampling.tau_video) == (mode["tau_image"], mode["tau_video"])
    method, scale, threshold = _parse_guidance(mode["guidance"])
    assert (cfg.sampling.guidance_method, cfg.sampling.guidance_scale) == (method, scale)
    assert cfg.sampling.uses_guidance  # every official mode runs the unconditional branch (batch 2)
    if threshold is not None:
        assert cfg.sampling.apg_norm_threshold == threshold
    assert cfg.transformer.semantic_scales == mode["semantic_scales"]
    assert cfg.transformer.detail_scale_min_tokens == mode["detail_scale_min_tokens"]
    assert cfg.quantizer.detail_scale_min_tokens == mode["detail_scale_min_tokens"]
    forced = 0 if isinstance(plan, InteractivePlan) else plan.forced_scales
    assert forced == max(mode["gt_leak"], 0)
    assert _condition_tokens(plan) == mode["extra_condition_tokens"]
    assert plan.steps.anchored_from_clip is None  # official lengths fit the model's RoPE range


@pytest.mark.parametrize("name", MODE_NAMES)
def test_preset_steps_match_mode(name):
    mode = _modes()[name]
    _, _, plan = _plan(name)
    schedule = _schedule(plan)
    steps = plan.steps.steps
    cond = _condition_tokens(plan) or 0
    assert len(steps) == len(mode["steps"]) == mode["visual_forward_steps"]
    for step, ref in zip(steps, mode["steps"]):
        where = f"{name} si {ref['si']} repeat {ref['repeat']}"
        assert (step.si, step.repeat) == (ref["si"], ref["repeat"]), where
        assert step.rope_scale_index == ref["rope_scale_index"], where
        assert list(step.scale) == ref["scale"], where
        assert step.query_tokens == ref["query_tokens"], where
        assert visual_kv_tokens(step, schedule, cond) == ref["visual_kv_tokens_excl_text"], where
        assert list(step.ref_sids) == ref["ref_sids"], where
        assert list(step.frames) == ref["frames"], where
        head = "detail" if step.detail_head else "semantic"
        assert f"{head}({step.bits} bits/token)" == ref["head"], where
        lfq = "detail" if step.detail_lfq else "semantic"
        assert lfq == ref["lfq"], where
        assert step.detail_lfq == uses_detail_lfq(step.scale, mode["detail_scale_min_tokens"]), where
        assert step.tau == ref["tau"], where
        assert step.teacher_forced == ref["teacher_forced"], where
    # Only the last repeat of each scale is cached.
    last = {s.si: s for s in steps}
    assert all(s.is_last_repeat == (last[s.si] is s) for s in steps)


@pytest.mark.parametrize("name", MODE_NAMES)
def test_preset_cost_matches_mode(name):
    mode = _modes()[name]
    _, _, plan = _plan(name)
    interactive = isinstance(plan, InteractivePlan)
    cost = plan_cost(plan.steps.steps, _schedule(plan), condition_tokens=_condition_tokens(plan) or 0,
                     condition_passes=plan.layout.prefix_passes - 1 if interactive else 0, dims=_model_dims())
    assert cost.visual_forward_steps == mode["visual_forward_steps"]
    assert cost.total_forward_passes == mode["total_forward_passes_incl_text_and_conditions"]
    assert cost.visual_query_tokens == mode["visual_query_tokens_total_per_cfg_branch"]
    assert 2 * cost.visual_query_tokens == mode["visual_query_tokens_total_with_cfg_batch2"]
    assert cost.sum_q_times_kv_visual == mode["sum_q_times_kv_visual_only_per_branch"]
    assert cost.distinct_latent_tokens == mode["distinct_latent_tokens_final_code_volume"]
    assert cost.largest_step_query_tokens == mode["largest_step_query_tokens"]
    # Ratios of the same integer counts the reference summed: equal up to float division rounding.
    assert cost.share_query_tokens_last_scale == pytest.approx(mode["share_of_query_tokens_in_last_video_scale"],
                                                               rel=1e-12)
    assert cost.share_query_tokens_top3_scales_per_clip == pytest.approx(
        mode["share_of_query_tokens_in_top3_scales_of_each_clip"], rel=1e-12)
    flop = mode["flop_estimate"]  # stored rounded to the digits compared here
    assert round(cost.linear_flop / 1e15, 2) == flop["linear_PFLOP"]
    assert round(cost.attention_flop / 1e15, 2) == flop["attention_PFLOP"]
    assert round(cost.total_flop / 1e15, 2) == flop["total_PFLOP"]
    assert round(cost.share_flop_last_scale, 3) == flop["share_last_scale"]
    assert round(cost.seconds_at(400e12), 1) == flop["seconds_at_400_TFLOPs_sustained"]

"""The generation loop's plan for long videos: positions stay inside the trained RoPE range, exactly."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from infinitystar.config import SamplingConfig, get_preset
from infinitystar.generation.loop import _position_shift, generate_codes
from infinitystar.generation.plan import plan_steps
from infinitystar.generation.schedules import scale_repetitions, spatial_ladder, video_scale_schedule
from infinitystar.transformer.attention import KVCache
from infinitystar.transformer.model import InfinityStarTransformer
from infinitystar.transformer.rope import rope_table, visual_positions

FIC = 2  # latent frames per clip: short clips keep the test fast


def _plan(n_clips: int, rope_max_frames: int):
    cfg = get_preset("pipeline", "tiny-test")
    pyramid = [(1, h, w) for h, w in spatial_ladder(1.0)[: cfg.scales_per_clip]]
    schedule = video_scale_schedule(pyramid, 1 + FIC * n_clips, FIC)
    plan = plan_steps(schedule, image_repetition=cfg.image_repetition, video_repetition=cfg.video_repetition,
                      semantic_scales=cfg.transformer.semantic_scales,
                      detail_scale_min_tokens=cfg.transformer.detail_scale_min_tokens, sampling=SamplingConfig(),
                      frames_inner_clip=FIC, rope_max_frames=rope_max_frames)
    return cfg, schedule, plan


def test_in_range_plan_is_the_reference_plan():
    _, _, plan = _plan(2, rope_max_frames=1 + 2 * FIC)
    assert plan.anchored_from_clip is None
    assert [s.frames[0] for s in plan.steps if s.clip_id == 2][0] == 1 + FIC


def test_clips_past_the_rope_range_reuse_the_last_covered_clip_positions():
    cfg, schedule, plan = _plan(4, rope_max_frames=1 + 2 * FIC)  # clips 1 and 2 covered
    assert plan.anchored_from_clip == 3
    by_clip = {c: [(s.rope_scale_index, s.frames) for s in plan.steps if s.clip_id == c] for c in range(5)}
    assert by_clip[3] == by_clip[2] and by_clip[4] == by_clip[2]
    assert max(s.frames[1] for s in plan.steps) <= 1 + 2 * FIC
    # One video clip back: the repetitions of a clip on the scale axis, FIC frames on the frame axis.
    assert plan.clip_shift == (sum(cfg.video_repetition), FIC)


def test_shifting_cached_keys_equals_computing_them_at_the_shifted_positions():
    cfg = dataclasses.replace(get_preset("pipeline", "tiny-test"))
    torch.manual_seed(0)
    model = InfinityStarTransformer(cfg.transformer).eval()
    cache = KVCache(model.cfg.depth)
    model.prefill_text(torch.randn(5, model.cfg.text_channels), cache, guidance=False)
    x = torch.randn(1, FIC * 16, model.cfg.d_vae)
    scale, full = (FIC, 4, 4), (4, 4)

    def rope(real_si: int, frame_ss: int) -> torch.Tensor:
        pos = visual_positions(scale, real_si, frame_ss, full, model.cfg.text_maxlen)
        return rope_table(pos, model.cfg.head_dim, model.cfg.rope_theta)

    with torch.no_grad():
        model.step(x, rope(20, 5), cache, refs=(), store_as="late", batch=1)
        model.step(x, rope(13, 3), cache, refs=(), store_as="early", batch=1)
    cache.map_keys("late", _position_shift(model, -7, -2, full))
    # Layer 0's keys depend only on the input and its position: the shifted keys are the keys at the shifted
    # positions. (Deeper layers also depend on where the scale sat relative to the text, which the shift does
    # not redo; see plan_steps.)
    (k_late,), (v_late,) = cache.get(0, ["late"])
    (k_early,), (v_early,) = cache.get(0, ["early"])
    # Keys: rotations by float32 angles pos * freq (integer positions <= 84 here, freqs 1, 0.1, 0.01, 0.001): the
    # late and early angles round by <= 1/2 ulp(8.4) = 4.8e-7 each (the freq-1 angles are exact), the shift's by
    # less, and each rotation adds ~2 unit roundoffs: |k| <= 3 times ~1.3e-6 rad is <= 4e-6, under 1e-5.
    # Values carry no rotation: the same input through the same kernels, so they agree bitwise.
    torch.testing.assert_close(k_late, k_early, atol=1e-5, rtol=0)
    torch.testing.assert_close(v_late, v_early, atol=0, rtol=0)
    # Without the shift they differ: the test can fail.
    model.step(x, rope(20, 5), cache, refs=(), store_as="late2", batch=1)
    assert (cache.get(0, ["late2"])[0][0] - k_early).abs().max() > 1e-2


@pytest.mark.parametrize("n_clips", [3, 4])
def test_long_generation_runs_past_the_rope_range(n_clips):
    cfg, schedule, plan = _plan(n_clips, rope_max_frames=1 + 2 * FIC)
    torch.manual_seed(0)
    model = InfinityStarTransformer(cfg.transformer).eval()
    reps = scale_repetitions(schedule, cfg.image_repetition, cfg.video_repetition)
    out = generate_codes(model, cfg.quantizer, torch.randn(4, model.cfg.text_channels), schedule, plan, reps,
                         cfg.sampling, generator=torch.Generator().manual_seed(0), frames_inner_clip=FIC)
    assert out.summed_codes.shape[2] == 1 + FIC * n_clips
    assert len(out.clip_codes) == 1 + n_clips


def test_step_rope_tables_are_the_per_step_tables_bit_for_bit() -> None:
    """Reused per (scale, first frame), only the scale-axis angles recomputed per repetition: every table equals the
    one built from scratch, on a non-square schedule (the half-to-even height rounding) and two first frames."""
    from infinitystar.transformer.rope import StepRopeTables

    full_hw, head_dim, text_maxlen = (5, 8), 64, 96
    tables = StepRopeTables(head_dim, 10000.0, text_maxlen)
    real_si = 0
    for frame_ss in (0, 1, 0):  # the third pass hits the cache of the first
        for scale in [(1, 2, 3), (1, 5, 8), (4, 2, 3), (4, 5, 8)]:
            for _ in range(3):  # repetitions: same scale, later scale-axis position
                want = rope_table(visual_positions(scale, real_si, frame_ss, full_hw, text_maxlen), head_dim, 10000.0)
                got = tables(scale, real_si, frame_ss, full_hw)
                assert torch.equal(got, want), (scale, real_si, frame_ss)
                real_si += 1
    assert len(tables._tables) == 8
    # The reused table is not shared: changing one step's table leaves the next one right.
    first = tables((1, 2, 3), 500, 0, full_hw)
    first.zero_()
    want = rope_table(visual_positions((1, 2, 3), 501, 0, full_hw, text_maxlen), head_dim, 10000.0)
    assert torch.equal(tables((1, 2, 3), 501, 0, full_hw), want)

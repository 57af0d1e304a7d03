"""Training step: the scale-subset sampler (reference outcome tables, token budget, seeding).

The model-level tests (loss falls under AdamW; packed step == weighted combination of the samples)
are further below and need the transformer.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from conftest import GOLDEN_DIR
from infinitystar.train.scale_subsets import (
    VAR_LEN_PROB_480P,
    VAR_LEN_PROB_720P,
    ScaleSubsetConfig,
    outcome_table,
    plan_packed_step,
    remap_refs,
    sample_scale_subset,
    valid_outcomes,
)


def _official_schedule(frames_key: str, pn: str, pt: int, template: str = "0.562") -> list[tuple[int, int, int]]:
    tables = json.loads((GOLDEN_DIR / "scale_schedules.json").read_text())["tables"]
    entry = tables["infinity_elegant_clip20frames_v2"][frames_key][template][pn]
    return [tuple(s) for s in entry["pt2scale_schedule"][str(pt)]]


def _tokens(schedule, indices) -> int:
    return sum(math.prod(schedule[i]) for i in indices)


@pytest.mark.parametrize(
    ("pn", "expected_tokens", "probs"),
    [
        # training.md section 3.3, 16:9, drop_720p_last_scale=1.
        ("0.40M", [3899, 7919, 17919, 29439, 38559, 39719], [40, 30, 20, 6, 3, 1]),
        ("0.90M", [7499, 11519, 21519, 33039, 42159, 43319], [60, 20, 10, 6, 2, 1]),
    ],
)
def test_release_outcome_tables_match_spec(pn, expected_tokens, probs):
    schedule = _official_schedule("video_frames=81", pn, 21)
    prob_list = VAR_LEN_PROB_480P if pn == "0.40M" else VAR_LEN_PROB_720P
    outcomes, p = valid_outcomes(len(schedule), len(schedule) // 2, prob_list, drop_720p_last_scale=True)
    assert [_tokens(schedule, o) for o in outcomes] == expected_tokens
    assert p == pytest.approx([x / sum(probs) for x in probs])
    for o in outcomes:  # every outcome carries its clips' context scales
        remap_refs(schedule, sorted(o))


def test_ten_second_table_and_max_tokens():
    schedule = _official_schedule("video_frames=161", "0.40M", 41)
    sc = len(schedule) // 3
    outcomes, p = valid_outcomes(len(schedule), sc, VAR_LEN_PROB_480P)
    assert len(outcomes) == 11 and p == pytest.approx([x / 220 for x in VAR_LEN_PROB_480P])
    assert max(_tokens(schedule, o) for o in outcomes) == 65190  # "max ~65 k visual tokens"
    for o in outcomes:
        remap_refs(schedule, sorted(o))


def test_out_of_range_outcomes_are_dropped_and_images_train_everything():
    # 480p with drop_720p_last_scale=0 names scale sc+14 = 28, beyond the 28-scale schedule.
    table = outcome_table(28, 14, drop_720p_last_scale=False)
    outcomes, p = valid_outcomes(28, 14, VAR_LEN_PROB_720P, drop_720p_last_scale=False)
    assert len(table) == 7 and len(outcomes) == 6 and [27] not in outcomes
    assert sum(p) == pytest.approx(1.0)
    image = [(1, h, h) for h in (1, 2, 3, 4)]
    assert sample_scale_subset(image, ScaleSubsetConfig()) == [0, 1, 2, 3]


def test_sampler_reproducible_by_seed_and_follows_probabilities():
    schedule = _official_schedule("video_frames=81", "0.40M", 21)
    cfg = ScaleSubsetConfig()

    def draw(seed: int) -> list[tuple[int, ...]]:
        g = torch.Generator().manual_seed(seed)
        return [tuple(sample_scale_subset(schedule, cfg, g)) for _ in range(400)]

    a, b, c = draw(0), draw(0), draw(1)
    assert a == b and a != c
    outcomes, probs = valid_outcomes(len(schedule), 14, cfg.var_len_prob)
    counts = [a.count(tuple(o)) for o in outcomes]
    # 400 draws: each frequency within 5 standard errors of its probability.
    for n, p in zip(counts, probs):
        assert abs(n / 400 - p) <= 5 * math.sqrt(p * (1 - p) / 400) + 1e-9


def test_token_budget_is_respected():
    schedule = _official_schedule("video_frames=81", "0.40M", 21)
    cfg = ScaleSubsetConfig()
    g = torch.Generator().manual_seed(3)
    for budget in (3899, 10000, 20000, 30000):
        for _ in range(50):
            subset = sample_scale_subset(schedule, cfg, g, max_tokens=budget)
            assert _tokens(schedule, subset) <= budget
    # Nothing in the table fits: the longest fitting prefix.
    # Image scales hold 1, 6, 8, 15, 28, 32, 45, ... tokens: 90 fit in 100, 135 do not.
    assert sample_scale_subset(schedule, cfg, g, max_tokens=100) == [0, 1, 2, 3, 4, 5]
    with pytest.raises(ValueError, match="budget"):
        sample_scale_subset(schedule, cfg, g, max_tokens=0)


def test_packed_plan_respects_budget_and_seed():
    s480 = _official_schedule("video_frames=81", "0.40M", 21)
    s_img = _official_schedule("video_frames=81", "0.40M", 1)
    cfg = ScaleSubsetConfig()
    for seed in range(20):
        plan = plan_packed_step([s480, s480, s_img], [40, 60, 30], cfg, torch.Generator().manual_seed(seed),
                                max_tokens=40000)
        assert plan.total_tokens <= 40000
        assert plan.total_tokens == sum(plan.visual_tokens) + 130
        again = plan_packed_step([s480, s480, s_img], [40, 60, 30], cfg, torch.Generator().manual_seed(seed),
                                 max_tokens=40000)
        assert again == plan
    with pytest.raises(ValueError, match="exhausted"):
        plan_packed_step([s_img], [50], cfg, max_tokens=40)


def test_selected_without_context_raises():
    schedule = _official_schedule("video_frames=81", "0.40M", 21)
    with pytest.raises(ValueError, match="context"):
        remap_refs(schedule, [0, 20])

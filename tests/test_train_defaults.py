"""Training defaults that follow the model: the scale-subset table of the release script for the pipeline's pn.

Expected tables are typed from training.md section 9 (``--video_var_len_prob`` of train_480p.sh / train_720p.sh),
and the outcome probabilities from the p(480p) / p(720p) columns of section 3.3.
"""

from __future__ import annotations

import dataclasses
import json

import pytest

from conftest import GOLDEN_DIR
from infinitystar.config import ConfigError, get_preset
from infinitystar.train.config import DataConfig, ModelConfig, TrainConfig, load_config, with_overrides
from infinitystar.train.scale_subsets import ScaleSubsetConfig, valid_outcomes
from infinitystar.train.trainer import scale_subset_config

SCRIPT_720P = (60, 20, 10, 6, 2, 1, 1)
SCRIPT_480P = (40, 30, 20, 6, 3, 1, 60, 40, 12, 6, 2)
# training.md 3.3, 5 s 16:9, drop_720p_last_scale=1: the six outcomes' probabilities as printed (3 decimals).
SPEC_P_720P = (0.606, 0.202, 0.101, 0.061, 0.020, 0.010)
SPEC_P_480P = (0.40, 0.30, 0.20, 0.06, 0.03, 0.01)


@pytest.mark.parametrize(("preset", "table"), [
    ("official-720p", SCRIPT_720P),
    ("official-480p", SCRIPT_480P),
    ("interactive-480p", SCRIPT_480P),
    ("tiny-test", SCRIPT_480P),  # no script for 0.06M: the 480p table (the one with 10 s outcomes)
])
def test_default_table_follows_the_pipeline_pn(preset, table):
    cfg = TrainConfig()
    assert cfg.scale_subsets.var_len_prob is None  # "the pipeline's", resolved when the pipeline is known
    subsets = scale_subset_config(cfg, get_preset("pipeline", preset))
    assert subsets.var_len_prob == tuple(float(p) for p in table)
    assert subsets.drop_720p_last_scale and subsets.var_len


def test_an_explicit_table_wins_and_bad_tables_fail():
    cfg = TrainConfig(scale_subsets=ScaleSubsetConfig(var_len_prob=(1, 2, 3, 4, 5, 6)))
    assert scale_subset_config(cfg, get_preset("pipeline", "official-720p")).var_len_prob == (1, 2, 3, 4, 5, 6)
    with pytest.raises(ConfigError, match="var_len_prob"):
        ScaleSubsetConfig(var_len_prob=(0, 0))
    with pytest.raises(ConfigError, match="var_len_prob"):
        ScaleSubsetConfig(var_len_prob=(-1, 2))


def test_config_files_without_a_table_follow_the_pipeline(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('[model]\npipeline = "official-720p"\n[data]\nmax_seconds = 5\n', encoding="utf-8")
    cfg = load_config(TrainConfig, str(path))
    assert cfg.scale_subsets.var_len_prob is None
    assert scale_subset_config(cfg, get_preset("pipeline", cfg.model.pipeline)).var_len_prob == SCRIPT_720P
    # A saved run config (JSON, None as null) reads back the same.
    saved = tmp_path / "run.json"
    saved.write_text(json.dumps(dataclasses.asdict(cfg)), encoding="utf-8")
    assert load_config(TrainConfig, str(saved)) == cfg


@pytest.mark.parametrize(("preset", "spec_p"), [("official-720p", SPEC_P_720P), ("official-480p", SPEC_P_480P)])
def test_outcome_probabilities_of_the_default_match_the_spec(preset, spec_p):
    pipe_cfg = get_preset("pipeline", preset)
    tables = json.loads((GOLDEN_DIR / "scale_schedules.json").read_text())["tables"]
    entry = tables["infinity_elegant_clip20frames_v2"]["video_frames=81"]["0.562"][pipe_cfg.pn]
    schedule = entry["pt2scale_schedule"]["21"]  # 5 s, 16:9
    subsets = scale_subset_config(TrainConfig(), pipe_cfg)
    _, probs = valid_outcomes(len(schedule), pipe_cfg.scales_per_clip, subsets.var_len_prob,
                              subsets.drop_720p_last_scale)
    assert probs == pytest.approx(spec_p, abs=5e-4)  # the spec prints 3 decimals


def test_a_table_too_short_for_the_longest_clip_fails_at_the_start():
    ten_720 = TrainConfig(model=ModelConfig(pipeline="official-720p"), data=DataConfig(max_seconds=10))
    # 10 s = 41 latent frames = first frame + 2 clips: 11 outcomes (training.md 3.3), the 720p table has 7.
    with pytest.raises(ConfigError, match="var_len_prob has 7 entries but 10 s clips .* have 11"):
        scale_subset_config(ten_720, get_preset("pipeline", "official-720p"))
    # The same clips train with the 480p table, or with var_len off.
    ten_480 = TrainConfig(model=ModelConfig(pipeline="official-480p"), data=DataConfig(max_seconds=10))
    assert len(scale_subset_config(ten_480, get_preset("pipeline", "official-480p")).var_len_prob) == 11
    off = with_overrides(ten_720, {"scale_subsets.var_len": False})
    assert not scale_subset_config(off, get_preset("pipeline", "official-720p")).var_len

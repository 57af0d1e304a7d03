"""Scale schedules against golden/scale_schedules.json (the reference's dynamic_resolution.py, dumped).

Every table entry (both video_frames values, every template, every pn, every pt) is compared with what the
functions compute from the rules (the whole-table builders live beside the tests, in reference_tables.py). The
official modes are checked against the pipeline presets in test_official_modes.py.
"""

from __future__ import annotations

import functools
import json
import math

import pytest

import reference_tables as R
from conftest import GOLDEN_DIR
from infinitystar.generation import schedules as S

JSON_PATH = GOLDEN_DIR / "scale_schedules.json"


@functools.lru_cache(maxsize=1)
def golden() -> dict:
    return json.loads(JSON_PATH.read_text()) if JSON_PATH.is_file() else {}


def _table_params() -> list:
    tables = golden().get("tables", {}).get("infinity_elegant_clip20frames_v2", {})
    return [
        pytest.param(vf_key, template, id=f"{vf_key}-{template}")
        for vf_key, per_template in tables.items()
        for template in per_template
    ]


def test_golden_file_present(golden_dir):
    assert (golden_dir / "scale_schedules.json").is_file()
    assert _table_params()


# ----------------------------------------------------------------------------------------------
# Global constants
# ----------------------------------------------------------------------------------------------


def test_base_constants():
    g = golden()
    assert list(S.BASE_LEVELS) == g["base_levels"]
    assert list(S.BASE_H_DIV_W) == g["base_h_div_w_list"]  # exact: 100/116 etc.
    assert dict(S.PN_NUM_SCALES) == g["total_pixels2scales"]


def test_cost_model_dims():
    g = golden()["model_dims_for_estimate"]
    dims = R.CostModelDims(depth=g["depth"], embed_dim=g["embed_dim"], kv_dim=g["kv_dim"], ffn=g["ffn"])
    assert dims == R.CostModelDims()  # the defaults are the official 8B sizes
    assert dims.linear_params_per_layer == g["linear_params_per_layer"]
    assert dims.block_params_total == g["block_params_total"]
    assert dims.linear_flop_per_token == g["linear_flop_per_token"]
    assert dims.attn_flop_per_qk_pair == g["attn_flop_per_qk_pair"]


def test_template_keys_match_golden():
    for vf_key, per_template in golden()["tables"]["infinity_elegant_clip20frames_v2"].items():
        assert [str(k) for k in S.h_div_w_templates()] == list(per_template), vf_key


# ----------------------------------------------------------------------------------------------
# Every table entry
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("vf_key,template", _table_params())
def test_table_entry(vf_key, template):
    video_frames = int(vf_key.split("=")[1])
    per_pn = golden()["tables"]["infinity_elegant_clip20frames_v2"][vf_key][template]
    assert set(per_pn) == set(S.PN_NUM_SCALES)
    for pn, entry in per_pn.items():
        where = f"{vf_key} template {template} pn {pn}"
        table = R.schedule_table(pn, float(template), video_frames)
        assert list(table.pixel) == entry["pixel"], where
        assert list(S.pixel_size(pn, float(template))) == entry["pixel"], where
        assert table.scales_per_clip == entry["scales_in_one_clip"] == S.num_scales_for_pn(pn), where
        assert table.max_video_scales == entry["max_video_scales"] == R.max_video_scales(pn, video_frames), where
        expected = entry["pt2scale_schedule"]
        got = table.pt2scale_schedule
        assert [str(pt) for pt in got] == list(expected), where
        for pt, sched in got.items():
            assert [list(s) for s in sched] == expected[str(pt)], f"{where} pt {pt}"
            # the general whole-second builder gives the same list (pt = 1 + 4 * seconds)
            assert S.build_scale_schedule(pn, float(template), 1 + 4 * (pt - 1)) == sched, f"{where} pt {pt}"
            assert S.first_full_spatial_size_scale_index(sched) == entry["scales_in_one_clip"] - 1, where
        assert {str(pt): n for pt, n in table.visual_tokens_per_pt.items()} == entry["visual_tokens_per_pt"], where
        assert len(got[max(got)]) == entry["max_video_scales"], where


def test_interactive_layout():
    # The released interactive model: 0.40M, 16:9 (template 0.562), 20-frame clips; golden mode notes below.
    layout = S.interactive_layout_for(S.image_scale_schedule("0.40M", 0.562))
    assert layout.schedule == tuple((20, h, w) for _, h, w in S.image_scale_schedule("0.40M", 0.562))
    # golden notes: semantic condition [20, 6, 11] (rope frames 1..20, scale id 800) + detail condition
    # (3, 30, 53) (rope frames 0, 19, 20, scale id 801)
    assert layout.semantic_condition_scale == (20, 6, 11)
    assert layout.semantic_rope_frames == tuple(range(1, 21))
    assert layout.semantic_rope_scale_id == 800
    assert layout.detail_condition_scale == (3, 30, 53)
    assert layout.detail_rope_frames == (0, 19, 20)
    assert layout.detail_rope_scale_id == 801
    conditions = [layout.semantic_condition_scale, layout.detail_condition_scale]
    assert S.visual_tokens(conditions) == 20 * 6 * 11 + 3 * 30 * 53  # golden extra_condition_tokens 6090
    assert layout.frames == (0, 20)
    # the previous segment = context frames 1..20, its last two = context frames 19, 20
    assert layout.semantic_source == (1, 21) and layout.detail_former_frames == (19, 20)
    assert (layout.context_latent_frames, layout.decode_latent_frames, layout.output_video_frames) == (21, 40, 80)
    assert layout.prefix_passes == 3  # text, semantic condition, detail condition


# ----------------------------------------------------------------------------------------------
# Unit tests
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "h_div_w,expected",
    [
        (0.571, 0.562),  # what the official scripts request
        (9 / 16, 0.562),
        (16 / 9, 1.777),
        (1.0, 1.0),
        (0.9, 0.861),
        (1e-3, 0.336),
        (100.0, 2.971),
    ],
)
def test_nearest_template(h_div_w, expected):
    assert S.nearest_h_div_w_template(h_div_w) == expected


@pytest.mark.parametrize("bad", [0, -1.0, float("nan"), float("inf")])
def test_nearest_template_rejects(bad):
    with pytest.raises(ValueError):
        S.nearest_h_div_w_template(bad)


def test_spatial_ladder_and_bucket():
    assert S.spatial_ladder(0.562)[-1] == (45, 80)
    with pytest.raises(ValueError, match="0.571"):
        S.spatial_ladder(0.571)  # keys are exact; use nearest_h_div_w_template
    assert S.resolution_bucket(1080, 1920, "0.90M") == (0.562, (720, 1280))
    assert S.resolution_bucket(1920, 1080, "0.40M") == (1.777, (848, 480))
    with pytest.raises(ValueError):
        S.resolution_bucket(0, 10, "0.40M")


def test_parse_aspect_ratio():
    assert S.parse_aspect_ratio("16:9") == 9 / 16
    assert S.parse_aspect_ratio(" 9:16 ") == 16 / 9
    assert S.nearest_h_div_w_template(S.parse_aspect_ratio("1:1")) == 1.0
    for bad in ["16x9", "16", "a:b", "0:9", "16:9:1", ""]:
        with pytest.raises(ValueError):
            S.parse_aspect_ratio(bad)


@pytest.mark.parametrize(
    "text,expected",
    [
        ("[3]*12+[2,1]", [3] * 12 + [2, 1]),
        ("[3]*12+[2,1,1]", [3] * 12 + [2, 1, 1]),
        ("[3]*15", [3] * 15),
        (" [1, 2] * 2 + 3*[4] ", [1, 2, 1, 2, 4, 4, 4]),
        ("[5]", [5]),
    ],
)
def test_parse_repetition(text, expected):
    assert S.parse_repetition(text) == expected


@pytest.mark.parametrize(
    "bad",
    [
        "__import__('os').system('echo pwned')",
        "[3]*12+eval('[1]')",
        "[3]*len('ab')",
        "[x for x in range(3)]",
        "[3]*0",
        "[0]",
        "[-1]",
        "[1.5]",
        "[3",
        "[3]*12+",
        "3",
        "",
        "[]",
    ],
)
def test_parse_repetition_rejects(bad):
    with pytest.raises(ValueError):
        S.parse_repetition(bad)


@pytest.mark.parametrize("frames", [0, 80, 82, 85, 2.0, "81"])
def test_invalid_frame_counts(frames):
    with pytest.raises(ValueError, match="num_frames"):
        S.build_scale_schedule("0.40M", 0.562, frames)


@pytest.mark.parametrize("video_frames", [0, 17, 82, 85, 121])
def test_invalid_table_video_frames(video_frames):
    with pytest.raises(ValueError, match="81"):
        R.pt2scale_schedule("0.40M", 0.562, video_frames)


def test_unknown_pn_and_template():
    with pytest.raises(ValueError, match="0.90M"):
        S.build_scale_schedule("1.0M", 0.562, 81)
    with pytest.raises(ValueError, match="0.336"):
        S.image_scale_schedule("0.40M", 0.5)


def test_whole_second_schedules():
    image = S.image_scale_schedule("0.40M", 0.562)
    assert S.build_scale_schedule("0.40M", 0.562, 1) == image
    six_s = S.build_scale_schedule("0.40M", 0.562, 97)  # 25 latent frames = 1 + 20 + 4
    assert [s[0] for s in six_s] == [1] * 14 + [20] * 14 + [4] * 14
    assert S.latent_frames(161) == 41


def test_semantic_rules_agree_on_all_templates():
    # The head rule and the quantizer rule agree for the released settings on every template (inference.md 1.3).
    for template in S.h_div_w_templates():
        for pn, semantic, min_tokens in [("0.90M", 12, 750), ("0.40M", 11, 350)]:
            sched = S.build_scale_schedule(pn, template, 81)
            flags = S.detail_scale_flags(sched, semantic, min_tokens)
            k = S.num_scales_for_pn(pn)
            assert flags == [si % k >= semantic for si in range(len(sched))]
    with pytest.raises(ValueError, match="disagree"):
        S.detail_scale_flags(S.build_scale_schedule("0.90M", 0.562, 81), 12, 350)


def test_repetitions_and_rope_index():
    sched = S.build_scale_schedule("0.90M", 0.562, 81)
    reps = S.scale_repetitions(sched, [3] * 15, [3] * 12 + [2, 1, 1])
    rope = S.rope_scale_indices(reps)
    assert rope[15][0] == 45 and rope[-1] == [84]  # video clip starts after the 45 image steps
    assert R.rope_scale_table_size([3] * 15, [3] * 12 + [2, 1, 1], 30) == 95  # transformer.md 5.2
    with pytest.raises(ValueError, match="14 entries"):
        S.scale_repetitions(sched, [3] * 14, [3] * 15)


def test_clip_layout_three_clips():
    sched = S.build_scale_schedule("0.40M", 0.562, 161)  # 1 + 20 + 20 latent frames, K = 14
    layout = S.clip_layout(sched)
    assert [(i.frame_ss, i.frame_ee) for i in layout] == [(0, 1)] * 14 + [(1, 21)] * 14 + [(21, 41)] * 14
    assert [i.ref_sids for i in layout] == [()] * 14 + [(13,)] * 14 + [(27,)] * 14
    assert [i.clip_id for i in layout] == [0] * 14 + [1] * 14 + [2] * 14
    all_refs = S.clip_layout(sched, context_from_largest_no=0)
    assert all_refs[30].ref_sids == tuple(range(28))


def test_clip_layout_short_last_clip():
    sched = S.build_scale_schedule("0.40M", 0.562, 97)  # 1 + 20 + 4
    layout = S.clip_layout(sched)
    assert (layout[0].frame_ss, layout[0].frame_ee) == (0, 1)
    assert (layout[14].frame_ss, layout[14].frame_ee) == (1, 21)
    # the short clip still starts at 1 + 20, whatever the previous clip's length
    assert [(i.frame_ss, i.frame_ee) for i in layout[28:]] == [(21, 25)] * 14
    assert all(i.ref_sids == (27,) for i in layout[28:])
    steps = S.build_step_plan(
        sched, image_repetition=[1] * 14, video_repetition=[1] * 14, semantic_scales=11, detail_scale_min_tokens=350
    )
    assert steps[-1].scale == (4, 30, 53) and steps[-1].frames == (21, 25)
    assert math.isclose(steps[-1].tau, 0.4) and steps[0].tau == 1.0

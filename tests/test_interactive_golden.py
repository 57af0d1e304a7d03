"""Parity of one interactive turn with the reference's golden cases (golden README section 13).

Every case folder under golden/interactive/ is one test id. The model is built from the case's config.json and
weights strictly (the transformer golden test's builder), and the turn runs through the production functions the
pipeline's interactive mode calls: ``interactive_layout_for``, ``plan_steps``, ``prefill_interactive_conditions``
and ``run_interactive_turn``. Everything the turn depends on (schedule, repetitions, taus, cfg, seed, the
semantic scale and the detail frames) is read from ``cases.interactive``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import golden_cases
from infinitystar.config import QuantizerConfig, SamplingConfig, get_preset
from infinitystar.generation.loop import (
    DETAIL_CONDITION,
    SEMANTIC_CONDITION,
    StepEvent,
    prefill_interactive_conditions,
    run_interactive_turn,
)
from infinitystar.generation.plan import plan_steps
from infinitystar.generation.schedules import InteractiveSegmentLayout, interactive_layout_for
from infinitystar.transformer.model import InfinityStarTransformer
from infinitystar.vae.multiscale import parse_repetitions, schedule_repetitions
from test_transformer_golden import _build, _maxdiff

CASES = golden_cases("interactive")
P = "interactive."
# Golden README section 13 tolerances.
KV_ATOL = 1e-4
LOGITS_ATOL = 1e-4
CODES_ATOL = 1e-5


def _layout(c: dict) -> InteractiveSegmentLayout:
    ci, oa = c["cases"]["interactive"], c["other_args"]
    schedule = [tuple(s) for s in ci["scale_schedule"]]
    layout = interactive_layout_for(schedule, oa["frames_inner_clip"], semantic_scale_index=ci["semantic_scale_ind"],
                                    detail_frame_inds=ci["detail_frame_inds"])
    assert list(layout.schedule) == schedule
    passes = ci["condition_passes"]
    assert list(layout.semantic_condition_scale) == passes["semantic_condition"]["shape_thw"]
    assert list(layout.detail_condition_scale) == passes["detail_condition"]["shape_thw"]
    return layout


def _sampling(ci: dict) -> SamplingConfig:
    # One guidance scale and (for a single-clip schedule, all image scales) one tau per call.
    assert len(set(ci["cfg_list"])) == 1 and len(set(ci["tau_list"])) == 1, "per-scale cfg/tau are not supported"
    assert ci["use_cfg"] and not ci["use_apg"]
    tau = ci["tau_list"][0]
    return SamplingConfig(guidance_method="cfg", guidance_scale=ci["cfg_list"][0], tau_image=tau, tau_video=tau)


def _text(g: dict, ci: dict) -> torch.Tensor:
    n = int(g[P + "text.lens"][0])
    assert n == ci["text_len"]
    return g[P + "text.kv_compact"][:n]


@pytest.mark.parametrize("case", CASES, ids=lambda p: p.name)
def test_condition_kv(case: Path) -> None:
    """The K/V the semantic and detail passes leave in the cache (rows cond/uncond, K after norm and RoPE)."""
    model, c = _build(case)
    model.eval()
    ci = c["cases"]["interactive"]
    g = load_file(str(case / "case.safetensors"))
    kv = load_file(str(case / "kv_cache.safetensors"))
    layout = _layout(c)
    cache = model.new_cache()
    with torch.no_grad():
        model.prefill_text(_text(g, ci), cache)
        prefill_interactive_conditions(model, cache, g[P + "former_clip_features"], g[P + "first_frame_features"],
                                       layout, batch=2)
    blocks = ci["kv_cache"]["blocks"]
    assert {0, model.cfg.depth - 1} <= set(blocks)
    for b in blocks:
        for name in (SEMANTIC_CONDITION, DETAIL_CONDITION):
            (k,), (v,) = cache.get(b, [name])
            for which, got in (("k", k), ("v", v)):
                d = _maxdiff(got, kv[f"{P}block{b}.{name}.{which}"])
                assert d <= KV_ATOL, f"block {b} {name} {which} differs by {d}"


@pytest.mark.parametrize("case", CASES, ids=lambda p: p.name)
def test_turn(case: Path) -> None:
    """Every step's bits exactly, the stored steps' cond/uncond/guided logits, and the returned summed codes."""
    model, c = _build(case)
    model.eval()
    ci, oa = c["cases"]["interactive"], c["other_args"]
    g = load_file(str(case / "case.safetensors"))
    layout = _layout(c)
    sampling = _sampling(ci)
    schedule = list(layout.schedule)
    plan = plan_steps(schedule, image_repetition=parse_repetitions(oa["image_scale_repetition"]),
                      video_repetition=parse_repetitions(oa["video_scale_repetition"]),
                      semantic_scales=model.cfg.semantic_scales,
                      detail_scale_min_tokens=model.cfg.detail_scale_min_tokens, sampling=sampling,
                      frames_inner_clip=oa["frames_inner_clip"])
    steps = plan.steps
    assert len(steps) == ci["num_steps"] == len(ci["steps"])
    for step, meta in zip(steps, ci["steps"]):
        where = f"step {meta['step']}"
        assert (step.si, step.repeat, list(step.scale)) == (meta["scale_index"], meta["repeat_index"],
                                                            meta["scale"]), where
        assert step.rope_scale_index == meta["real_si (rope scale index)"], where
        assert list(range(*step.frames)) == meta["rope_frames"], where
        assert step.ref_sids == (), where
        assert step.detail_head == (meta["head"] == "head"), where
        assert step.detail_lfq == (meta["lfq"] == "lfq_detail"), where
        assert step.tau == meta["tau"] and sampling.guidance_scale == meta["cfg"], where

    events: list[StepEvent] = []
    reps = schedule_repetitions(schedule, oa["image_scale_repetition"], oa["video_scale_repetition"])
    turn = run_interactive_turn(model, QuantizerConfig(
        embed_dim=model.cfg.d_vae, semantic_dim=oa["semantic_scale_dim"], detail_dim=oa["detail_scale_dim"],
        detail_scale_min_tokens=oa["detail_scale_min_tokens"]), _text(g, ci), g[P + "former_clip_features"],
        g[P + "first_frame_features"], layout, plan, reps, sampling, seed=ci["g_seed"], on_step=events.append)

    assert len(events) == len(steps)
    for ev in events:
        name = f"{P}step{ev.index:02d}"
        want = g[name + ".bits"]
        differing = int((ev.bits_BthwD.to(torch.uint8) != want).sum()) if ev.bits_BthwD.shape == want.shape else -1
        assert differing == 0, f"step {ev.index}: {differing} of {want.numel()} bits differ (-1: shape)"
    for i in ci["logits_stored_for_steps"]:
        name, ev = f"{P}step{i:02d}", events[i]
        assert ev.logits_Bnd2 is not None and ev.branches_Bnd2 is not None
        for got, which in ((ev.branches_Bnd2[0:1], "cond"), (ev.branches_Bnd2[1:2], "uncond"),
                           (ev.logits_Bnd2, "guided")):
            d = _maxdiff(got, g[f"{name}.{which}_logits"])
            assert d <= LOGITS_ATOL, f"step {i} {which} logits differ by {d}"
    d = _maxdiff(turn.next_context, g[P + "summed_codes"])
    assert d <= CODES_ATOL, f"summed codes differ by {d}"
    # What the pipeline decodes: the previous segment followed by the new clip.
    assert turn.decode_latent.shape[2] == layout.decode_latent_frames
    assert torch.equal(turn.decode_latent[:, :, :-layout.frames[1]], g[P + "former_clip_features"][:, :, 1:])


# ----------------------------------------------------------------------------------------------
# Not golden: the condition passes' attention rule on a random toy model
# ----------------------------------------------------------------------------------------------


def test_condition_passes_see_only_themselves() -> None:
    """A condition pass attends neither the text nor the other condition, so its K/V cannot depend on either:
    they are identical with two different prompts cached, and with no text in the cache at all."""
    cfg = get_preset("transformer", "tiny-test")
    torch.manual_seed(0)
    model = InfinityStarTransformer(cfg).eval()
    layout = interactive_layout_for([(1, 1, 1), (1, 2, 2), (1, 3, 4)], frames_inner_clip=3)
    gen = torch.Generator().manual_seed(1)
    former = torch.randn(1, cfg.d_vae, layout.context_latent_frames, 3, 4, generator=gen)
    first = torch.randn(1, cfg.d_vae, 1, 3, 4, generator=gen)

    def conditions(text: torch.Tensor | None) -> list[torch.Tensor]:
        cache = model.new_cache()
        with torch.no_grad():
            if text is not None:
                model.prefill_text(text, cache)
            prefill_interactive_conditions(model, cache, former, first, layout, batch=2)
        return [t for b in range(cfg.depth) for n in (SEMANTIC_CONDITION, DETAIL_CONDITION)
                for t in (*cache.get(b, [n])[0], *cache.get(b, [n])[1])]

    a = conditions(torch.randn(5, cfg.text_channels, generator=gen))
    b = conditions(torch.randn(9, cfg.text_channels, generator=gen))
    alone = conditions(None)
    for x, y, z in zip(a, b, alone):
        assert torch.equal(x, y) and torch.equal(x, z)


def test_interactive_inputs_are_checked() -> None:
    cfg = get_preset("transformer", "tiny-test")
    model = InfinityStarTransformer(cfg).eval()
    layout = interactive_layout_for([(1, 1, 1), (1, 3, 4)], frames_inner_clip=3)
    cache = model.new_cache()
    good = torch.zeros(1, cfg.d_vae, layout.context_latent_frames, 3, 4)
    with pytest.raises(ValueError, match="context latent"):
        prefill_interactive_conditions(model, cache, good[:, :, 1:], good[:, :, :1], layout, batch=2)
    with pytest.raises(ValueError, match="first-frame latent"):
        prefill_interactive_conditions(model, cache, good, good[:, :, :2], layout, batch=2)
    with pytest.raises(ValueError, match="detail_frame_inds"):
        interactive_layout_for([(1, 3, 4)], frames_inner_clip=3, detail_frame_inds=[3])

"""Teacher-forced inference parity (golden README section 12: image-to-video and video extension).

For every transformer case holding ``infer_forced.safetensors`` and every sub-case its config lists, the
production loop (:func:`infinitystar.generation.loop.generate_codes` over the plan of
:func:`infinitystar.generation.plan.plan_steps`) is run with the stored bits of the forced steps and a CPU generator
seeded ``g_seed``. The reference draws from that generator on every step, forced or not, so the free steps'
bits match only when the loop consumes the generator exactly as the reference does: every stored bit must match,
the stored logits within the README's tolerances, and the summed codes. Both loop modes are checked: skipping
the forced steps whose K/V nothing reads (the default) and running every forced step.
"""

from __future__ import annotations

import functools
import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import infinitystar.pipeline as pipeline_module
from conftest import golden_cases
from infinitystar.config import QuantizerConfig, SamplingConfig
from infinitystar.generation.loop import StepEvent, generate_codes
from infinitystar.generation.plan import plan_steps
from infinitystar.generation.sampling import advance_like_sample_bits, sample_bits
from infinitystar.generation.schedules import parse_repetition, scales_per_clip
from infinitystar.pipeline import InfinityStarPipeline
from infinitystar.vae.multiscale import schedule_repetitions
from test_transformer_golden import _build

CASE_FILE = "infer_forced.safetensors"
# Golden README section 12.
BRANCH_ATOL = 1e-4  # cond / uncond logits (after 1/tau)
GUIDED_ATOL = 1e-3  # APG-guided logits (cfg 34 amplifies the branches' rounding ~33x)
CODES_ATOL = 1e-5  # summed codes

FORCED_CASES = [c for c in golden_cases("transformer") if (c / CASE_FILE).is_file()]


def _sub_cases() -> list:
    out = []
    for case in FORCED_CASES:
        config = _section_of(case)
        for sub in config["sub_cases"]:
            out.append(pytest.param(case, sub, id=f"{case.name}-{sub}"))
    return out


def _section_of(case: Path) -> dict:
    """The config section of the forced case, found through the case's ``case_files`` entry."""
    config = json.loads((case / "config.json").read_text())
    section = config
    for key in config["case_files"][CASE_FILE]["config_section"].split("."):
        section = section[key]
    return section


def _sampling(sub: dict, other_args: dict, spc: int, num_scales: int) -> SamplingConfig:
    """The sampler settings of a sub-case; the loop takes one guidance scale and two temperatures."""
    cfgs = {float(v) for v in sub["cfg_list"]}
    assert len(cfgs) == 1, f"the loop applies one guidance scale, the case has {sorted(cfgs)}"
    taus = [float(v) for v in sub["tau_list"]]
    tau_video = taus[spc] if len(taus) > spc else taus[0]
    # The loop's rule (one tau for the first frame's scales, one for every video clip's): the case must follow it.
    assert taus == [taus[0]] * spc + [tau_video] * (num_scales - spc), "tau_list is not tau_image/tau_video per clip"
    return SamplingConfig(guidance_method="apg" if other_args["use_apg"] else "cfg", guidance_scale=cfgs.pop(),
                          apg_norm_threshold=float(other_args["apg_norm_threshold"]), tau_image=taus[0],
                          tau_video=tau_video)


def _run(case: Path, sub_name: str, *, run_forced_steps: bool):
    """Run the production loop on a sub-case; returns (events, result, sub-case config, golden tensors, prefix)."""
    model, config = _build(case)
    model.eval()
    oa = config["other_args"]
    sub = _section_of(case)["sub_cases"][sub_name]
    prefix = config["case_files"][CASE_FILE]["prefix"] + sub_name + "."
    text_prefix = config["case_files"][CASE_FILE]["prefix"] + "text."
    g = load_file(str(case / CASE_FILE))
    schedule = [tuple(s) for s in sub["scale_schedule"]]
    spc = scales_per_clip(schedule)
    assert spc == sub["scales_per_clip"]
    sampling = _sampling(sub, oa, spc, len(schedule))
    plan = plan_steps(schedule, image_repetition=parse_repetition(oa["image_scale_repetition"]),
                      video_repetition=parse_repetition(oa["video_scale_repetition"]),
                      semantic_scales=oa["semantic_scales"], detail_scale_min_tokens=oa["detail_scale_min_tokens"],
                      sampling=sampling, teacher_forced_scales=sub["gt_leak"],
                      frames_inner_clip=oa["frames_inner_clip"], rope_max_frames=model.cfg.rope_max_frames)
    reps = schedule_repetitions(schedule, oa["image_scale_repetition"], oa["video_scale_repetition"])
    # README: num_forced_steps = the repetitions of the first gt_leak scales.
    assert sum(reps[: sub["gt_leak"]]) == sub["num_forced_steps"]
    forced = [g[f"{prefix}step{i:02d}.bits"] for i in range(sub["num_forced_steps"])]
    quant = QuantizerConfig(embed_dim=model.cfg.d_vae, semantic_dim=oa["semantic_scale_dim"],
                            detail_dim=oa["detail_scale_dim"], detail_scale_min_tokens=oa["detail_scale_min_tokens"])
    text = g[text_prefix + "kv_compact"][: int(g[text_prefix + "lens"][0])]
    events: list[StepEvent] = []
    result = generate_codes(model, quant, text, schedule, plan, reps, sampling,
                            generator=torch.Generator().manual_seed(int(sub["g_seed"])), forced_bits=forced,
                            run_forced_steps=run_forced_steps, frames_inner_clip=oa["frames_inner_clip"],
                            on_step=events.append)
    return events, result, sub, g, prefix


def _maxdiff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (tuple(a.shape), tuple(b.shape))
    return (a.float() - b.float()).abs().max().item()


def _check_metadata(ev: StepEvent, meta: dict, context: dict, guidance_scale: float) -> None:
    s = ev.step
    assert ev.index == meta["step"]
    assert (s.si, s.repeat, s.rope_scale_index) == (meta["scale_index"], meta["repeat_index"],
                                                    meta["real_si (rope scale index)"]), f"step {ev.index}"
    assert list(s.scale) == meta["scale"]
    assert s.detail_head == (meta["head"] == "head") and s.detail_lfq == (meta["lfq"] == "lfq_detail")
    assert ev.forced == s.teacher_forced == meta["forced"], f"step {ev.index} forced flag"
    assert math.isclose(s.tau, meta["tau"]) and math.isclose(guidance_scale, meta["cfg"])
    ctx = context[str(s.si)]
    assert (s.clip_id, s.frames, list(s.ref_sids)) == (ctx["clipid"], (ctx["frame_ss"], ctx["frame_ee"]),
                                                       ctx["ref_sids"]), f"step {ev.index} clip context"


@pytest.mark.parametrize("run_forced_steps", [False, True], ids=["skip-unread-forced", "run-every-forced"])
@pytest.mark.parametrize(("case", "sub_name"), _sub_cases())
def test_forced_inference_matches_reference(case: Path, sub_name: str, run_forced_steps: bool) -> None:
    events, result, sub, g, p = _run(case, sub_name, run_forced_steps=run_forced_steps)
    assert len(events) == sub["num_steps"] == len(sub["steps"])
    guidance_scale = float(sub["cfg_list"][0])
    stored = set(sub["logits_stored_for_steps"])
    assert stored and min(stored) >= sub["first_sampled_step"] == sub["num_forced_steps"]
    free_bits = differing = 0
    for ev, meta in zip(events, sub["steps"]):
        _check_metadata(ev, meta, sub["context_info (get_scale_pack_info)"], guidance_scale)
        want = g[f"{p}step{ev.index:02d}.bits"].long()
        got = ev.bits_BthwD.long().cpu()
        assert got.shape == want.shape, f"step {ev.index}"
        if not ev.forced:
            free_bits += want.numel()
            differing += int((got != want).sum())
        else:
            assert torch.equal(got, want), f"forced step {ev.index} did not use the given bits"
        if ev.index in stored:
            assert ev.branches_Bnd2 is not None and ev.logits_Bnd2 is not None
            for row, which in ((0, "cond"), (1, "uncond")):
                d = _maxdiff(ev.branches_Bnd2[row:row + 1], g[f"{p}step{ev.index:02d}.{which}_logits"])
                assert d <= BRANCH_ATOL, f"step {ev.index} {which} logits differ by {d}"
            d = _maxdiff(ev.logits_Bnd2, g[f"{p}step{ev.index:02d}.guided_logits"])
            assert d <= GUIDED_ATOL, f"step {ev.index} guided logits differ by {d}"
    # The free bits follow from the generator's state after every earlier draw: one miscounted draw on a
    # forced step shifts the whole stream and about half of the near-50/50 bits change.
    assert differing == 0, f"{differing}/{free_bits} generated bits differ from the reference"
    assert list(result.summed_codes.shape) == sub["summed_codes_shape"]
    assert _maxdiff(result.summed_codes, g[p + "summed_codes"]) <= CODES_ATOL
    # The skip is real: a forced step runs the transformer only when a later step reads its K/V (or when asked).
    read_later = {r for ev in events for r in ev.step.ref_sids}
    for ev in events:
        ran = ev.logits_Bnd2 is not None
        needed = ev.step.is_last_repeat and ev.step.si in read_later
        assert ran == (not ev.forced or run_forced_steps or needed), f"step {ev.index} ran={ran}"


# ----------------------------------------------------------------------------------------------
# The generator advance that stands in for a skipped step's draw
# ----------------------------------------------------------------------------------------------


def _devices() -> list[str]:
    return ["cpu", *(["cuda"] if torch.cuda.is_available() else [])]


@pytest.mark.parametrize("device", _devices())
def test_advance_leaves_the_generator_where_a_real_draw_does(device: str) -> None:
    # multinomial(p, 1) draws Exp(1) noise shaped like p and takes argmax(p / noise): the generator's consumption
    # depends on the shape only. Very different logits (near-certain and 50/50 bits) must leave equal states.
    shape = (1, 37, 16)
    logits = torch.randn(*shape, 2, generator=torch.Generator().manual_seed(0)).to(device) * 8
    real = torch.Generator(device).manual_seed(11)
    sample_bits(logits, real)
    advanced = torch.Generator(device).manual_seed(11)
    advance_like_sample_bits(shape, advanced, device=device)
    assert torch.equal(real.get_state(), advanced.get_state())
    # ... so the next draw is the same, and it is not the draw of an un-advanced generator.
    nxt = torch.zeros(*shape, 2, device=device)
    fresh = sample_bits(nxt, torch.Generator(device).manual_seed(11))
    a, b = sample_bits(nxt, real), sample_bits(nxt, advanced)
    assert torch.equal(a, b) and not torch.equal(a, fresh)


def test_advance_rejects_a_bad_shape() -> None:
    with pytest.raises(ValueError, match="shape"):
        advance_like_sample_bits((1, 0, 16), torch.Generator())


# ----------------------------------------------------------------------------------------------
# The pipeline's image-to-video path uses the same stream
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pipe() -> InfinityStarPipeline:
    torch.set_num_threads(1)  # a tiny model: one thread is fastest on a shared machine
    return InfinityStarPipeline.from_preset("tiny-test", seed=0)


def test_pipeline_image_to_video_same_latents_whether_forced_steps_are_skipped_or_run(pipe, monkeypatch) -> None:
    torch.set_num_threads(1)
    _, _, (height, width) = pipe.resolve_size()
    image = torch.linspace(0, 40, 3 * height * width).reshape(3, height, width).sin()  # any image in [-1, 1]

    def run() -> tuple[torch.Tensor, list[StepEvent]]:
        events: list[StepEvent] = []
        out = pipe("a red ball", image=image, num_frames=5, output_type="latent", seed=3, progress=False,
                   callback_on_scale_step=lambda _, ev: events.append(ev))
        return out.latent, events

    skipped, skip_events = run()
    monkeypatch.setattr(pipeline_module, "generate_codes",
                        functools.partial(pipeline_module.generate_codes, run_forced_steps=True))
    ran, run_events = run()
    # Not vacuous: the default run skipped some forced steps that the second run executed.
    assert any(ev.forced and ev.logits_Bnd2 is None for ev in skip_events)
    assert all(ev.logits_Bnd2 is not None for ev in run_events)
    # Sampled steps follow the forced ones, so their bits depend on the generator's state after them.
    assert any(not ev.forced for ev in skip_events)
    assert torch.equal(skipped, ran)

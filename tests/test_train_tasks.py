"""Training for every task (train.tasks): image-to-video, video extension and interactive turns, each trained on the
sequence its generation path runs."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from conftest import float32_rounding_tolerance, realistic_transformer, transformer_rounding_path
from infinitystar.config import get_preset
from infinitystar.generation.loop import (
    DETAIL_CONDITION,
    SEMANTIC_CONDITION,
    generate_codes,
    interactive_condition_latents,
    prefill_interactive_conditions,
)
from infinitystar.generation.plan import GenerationPlan, InteractivePlan
from infinitystar.generation.schedules import scale_repetitions, video_scale_schedule
from infinitystar.train.config import DataConfig
from infinitystar.train.data import RecordError, parse_record
from infinitystar.train.dataset import draw_task
from infinitystar.train.loss import LossWeighting, bit_loss_per_token, reduce_loss
from infinitystar.train.self_correction import NoFlips, tokenize_for_training
from infinitystar.train.step import pack_inputs, packed_loss
from infinitystar.train.tasks import given_prefix_sample, given_scale_count, interactive_turn_sample
from infinitystar.transformer.sequence import build_packed_layout
from infinitystar.vae.multiscale import encode_to_bits

pytestmark = pytest.mark.usefixtures("one_thread")

DEMO = get_preset("pipeline", "demo")
PYRAMID = [(1, 1, 1), (1, 2, 2), (1, 3, 3), (1, 4, 4)]
CLIP = DEMO.frames_inner_clip


def _latent(frames: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(1, DEMO.quantizer.embed_dim, frames, 4, 4, generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------------------------- interactive


@pytest.mark.parametrize("turn", [1, 2])
def test_an_interactive_training_turn_gives_the_generation_logits(turn):
    """The packed training sequence of turn ``turn`` and the generation loop's KV-cached turn (the same condition
    passes, plan, RoPE and cache), fed the same clean inputs, give the same logits at every scale."""
    model = realistic_transformer(DEMO.transformer, seed=3)
    story = _latent(1 + 3 * CLIP, seed=turn)
    text = torch.randn(5, DEMO.transformer.text_channels, generator=torch.Generator().manual_seed(9))
    sample = interactive_turn_sample(story, turn, text, DEMO, PYRAMID, torch.Generator().manual_seed(turn),
                                     bsc_strength=0.0, condition_noise=(0.0,))
    packed, x, _ = pack_inputs([sample])
    layout = build_packed_layout(packed, model.cfg)
    with torch.no_grad():
        train = model.forward_packed(x, [text], layout)

    # Generation: the interactive plan's turn, every step's bits forced to the target clip's clean bits, so each
    # step's input is the training input of that scale and repetition.
    plan = InteractivePlan(DEMO, tuple(PYRAMID), DEMO.sampling)
    context = story[:, :, CLIP * (turn - 1): CLIP * turn + 1]
    target = story[:, :, CLIP * turn + 1: CLIP * (turn + 1) + 1]
    bits = encode_to_bits(target, plan.layout.schedule, plan.repetitions, DEMO.quantizer, frames_inner_clip=CLIP).bits
    events = []
    with torch.no_grad():
        cache = model.new_cache()
        model.prefill_text(text, cache, guidance=True)
        prefill_interactive_conditions(model, cache, context, story[:, :, :1], plan.layout, batch=2)
        generate_codes(model, DEMO.quantizer, text, plan.layout.schedule, plan.steps, plan.repetitions, DEMO.sampling,
                       generator=torch.Generator().manual_seed(0), forced_bits=list(bits), run_forced_steps=True,
                       frames_inner_clip=CLIP, cache=cache, extra_context=(SEMANTIC_CONDITION, DETAIL_CONDITION),
                       on_step=events.append)
    assert DEMO.sampling.tau_image == 1.0  # so the loop's conditional branch is the raw logits
    by_step = {(e.step.si, e.step.repeat): e for e in events}
    path = transformer_rounding_path(model, layout.seq_len) + [model.cfg.embed_dim]
    for k, (si, real_si) in enumerate(zip(sample.scale_ids, sample.real_si)):
        [event] = [e for e in events if e.step.si == si and e.step.rope_scale_index == real_si]
        assert event is by_step[(si, event.step.repeat)]
        assert layout.semantic[k] == (not event.step.detail_head)
        generated = event.branches_Bnd2[0:1]
        tol = float32_rounding_tolerance(max(train.hidden.abs().max().item(), generated.abs().max().item()), path)
        assert (train.logits[k] - generated).abs().max() <= tol, f"scale {si}"


def test_an_interactive_turn_without_its_conditions_changes_the_logits():
    """The conditions reach the clip's scales (a check that the equality above is not vacuous)."""
    model = realistic_transformer(DEMO.transformer, seed=3)
    story = _latent(1 + 2 * CLIP, seed=4)
    text = torch.randn(5, DEMO.transformer.text_channels, generator=torch.Generator().manual_seed(9))
    sample = interactive_turn_sample(story, 1, text, DEMO, PYRAMID, torch.Generator().manual_seed(1),
                                     bsc_strength=0.0, condition_noise=(0.0,))
    stripped = replace(sample, conditions=[])
    outs = []
    for s in (sample, stripped):
        packed, x, _ = pack_inputs([s])
        with torch.no_grad():
            outs.append(model.forward_packed(x, [text], build_packed_layout(packed, model.cfg)).logits)
    assert all((a - b).abs().max() > 1e-2 for a, b in zip(*outs))


def test_interactive_turn_sample_layout_and_noise():
    story = _latent(1 + 3 * CLIP, seed=5)
    text = torch.zeros(3, DEMO.transformer.text_channels)
    sample = interactive_turn_sample(story, 2, text, DEMO, PYRAMID, torch.Generator().manual_seed(0),
                                     bsc_strength=0.0, condition_noise=(0.0,))
    assert sample.schedule == tuple((CLIP, h, w) for _, h, w in PYRAMID) and sample.loss_from == 0
    [(sem_block, sem), (det_block, det)] = sample.conditions
    assert sem_block.rope_scale_id == 800 and det_block.rope_scale_id == 801
    assert det_block.frames == (0, CLIP - 1, CLIP)
    # The detail condition: the story's first frame, then the previous segment's (clip 1's) last two frames.
    want = torch.cat([story[:, :, :1], story[:, :, 2 * CLIP - 1: 2 * CLIP + 1]], dim=2)
    assert torch.equal(det, want.flatten(2).transpose(1, 2))
    # The labels are the target clip's (clip 2's) clean bits, not another clip's.
    clean = tokenize_for_training(story[:, :, 2 * CLIP + 1:], sample.schedule, list(DEMO.image_repetition),
                                  [0] * 4, DEMO.quantizer, NoFlips(), frames_inner_clip=CLIP)
    assert torch.equal(sample.labels[0], clean.gt_bits[0])
    # Noise of strength 0.3 x std on the conditions only.
    noisy = interactive_turn_sample(story, 2, text, DEMO, PYRAMID, torch.Generator().manual_seed(0),
                                    bsc_strength=0.0, condition_noise=(0.3,))
    delta = noisy.conditions[1][1] - det
    assert 0.2 * det.std() < delta.std() < 0.4 * det.std()
    assert torch.equal(noisy.labels[0], sample.labels[0])
    with pytest.raises(ValueError, match="turns are 1..2"):
        interactive_turn_sample(story, 3, text, DEMO, PYRAMID, torch.Generator(), condition_noise=(0.0,))


def _forced_summed_codes(model, text, plan_schedule, plan_steps, repetitions, latent, *, interactive_cache=None):
    """The summed codes the generation loop holds after generating ``latent`` (every step forced to its bits)."""
    bits = encode_to_bits(latent, plan_schedule, repetitions, DEMO.quantizer, frames_inner_clip=CLIP).bits
    with torch.no_grad():
        cache = interactive_cache if interactive_cache is not None else model.new_cache()
        if interactive_cache is None:
            model.prefill_text(text, cache, guidance=True)
        extra = (SEMANTIC_CONDITION, DETAIL_CONDITION) if interactive_cache is not None else ()
        result = generate_codes(model, DEMO.quantizer, text, plan_schedule, plan_steps, repetitions, DEMO.sampling,
                                generator=torch.Generator().manual_seed(0), forced_bits=list(bits),
                                frames_inner_clip=CLIP, cache=cache, extra_context=extra)
    return result.summed_codes


def test_interactive_turn_conditions_from_summed_codes_are_what_generation_holds():
    """condition_codes_prob=1: the conditions of turns 1 and 2 equal the ones generation builds from its ``former``
    after generating the story's earlier clips (a text-to-video first segment, then turn 1), which are summed codes,
    not the continuous latent; the labels stay the clean target bits."""
    model = realistic_transformer(DEMO.transformer, seed=3)
    story = _latent(1 + 3 * CLIP, seed=6)
    text = torch.randn(5, DEMO.transformer.text_channels, generator=torch.Generator().manual_seed(9))
    first = GenerationPlan(DEMO, 1 + CLIP * DEMO.vae.time_stride, tuple(PYRAMID), DEMO.sampling)
    former = _forced_summed_codes(model, text, first.schedule, first.steps, first.repetitions,
                                  story[:, :, :CLIP + 1])
    turn_plan = InteractivePlan(DEMO, tuple(PYRAMID), DEMO.sampling)
    with torch.no_grad():
        cache = model.new_cache()
        model.prefill_text(text, cache, guidance=True)
        prefill_interactive_conditions(model, cache, former, former[:, :, :1], turn_plan.layout, batch=2)
    clip1 = _forced_summed_codes(model, text, turn_plan.layout.schedule, turn_plan.steps, turn_plan.repetitions,
                                 story[:, :, CLIP + 1: 2 * CLIP + 1], interactive_cache=cache)
    contexts = {1: former, 2: torch.cat([former, clip1], dim=2)[:, :, -(CLIP + 1):]}
    for turn, context in contexts.items():
        want = interactive_condition_latents(context, former[:, :, :1], turn_plan.layout)
        raw = interactive_turn_sample(story, turn, text, DEMO, PYRAMID, torch.Generator().manual_seed(0),
                                      bsc_strength=0.0, condition_noise=(0.0,))
        coded = interactive_turn_sample(story, turn, text, DEMO, PYRAMID, torch.Generator().manual_seed(0),
                                        bsc_strength=0.0, condition_noise=(0.0,), condition_codes_prob=1.0)
        for (_, got), expected, (_, continuous) in zip(coded.conditions, want, raw.conditions):
            expected = expected.flatten(2).transpose(1, 2)
            assert (got - expected).abs().max() <= 1e-5, f"turn {turn}"
            assert (continuous - expected).abs().max() > 1e-2  # the two forms differ: the check is not vacuous
        assert torch.equal(coded.labels[0], raw.labels[0])


def test_condition_codes_prob_is_validated():
    assert DataConfig(condition_codes_prob=0.5).condition_codes_prob == 0.5
    with pytest.raises(ValueError, match="condition_codes_prob"):
        DataConfig(condition_codes_prob=1.5)


# ----------------------------------------------------------------------------------------------- given prefixes


def _video(clips: int):
    schedule = video_scale_schedule(PYRAMID, 1 + clips * CLIP, CLIP)
    return schedule, scale_repetitions(schedule, DEMO.image_repetition, DEMO.video_repetition)


@pytest.mark.parametrize(("given_clips", "given"), [(0, 4), (1, 8), (2, 12)])
def test_given_scales_are_clean_and_take_no_loss(given_clips, given):
    schedule, reps = _video(3)
    latent = _latent(1 + 3 * CLIP, seed=6)
    assert given_scale_count(schedule, given_clips) == given
    sample = given_prefix_sample(latent, torch.zeros(3, 64), schedule, reps, DEMO.quantizer, given_clips,
                                 torch.Generator().manual_seed(2), bsc_strength=1.0, frames_inner_clip=CLIP)
    assert sample.loss_from == given and sample.loss_mask == [si >= given for si in range(len(schedule))]
    clean = tokenize_for_training(latent, schedule, reps, [0] * len(schedule), DEMO.quantizer, NoFlips(),
                                  frames_inner_clip=CLIP, trained_scales=range(given + 1))
    # The given scales' inputs (and the first generated scale's, whose history is all given) carry no flips ...
    for si in range(given + 1):
        if reps[si] == 1 or si == given:
            assert torch.equal(sample.inputs[si], clean.x_BLC.split(clean.scale_lengths, 1)[si])
    # ... while a later one does (self-correction at strength 1 draws flip rates up to 1 on every step).
    full = tokenize_for_training(latent, schedule, reps, [0] * len(schedule), DEMO.quantizer, NoFlips(),
                                 frames_inner_clip=CLIP)
    last = len(schedule) - 1
    assert not torch.equal(sample.inputs[last], full.x_BLC.split(full.scale_lengths, 1)[last])
    model = realistic_transformer(DEMO.transformer, seed=1)
    reduced, layout = packed_loss(model, [sample], LossWeighting())
    assert reduced.loss_per_scale.shape[0] == len(schedule) - given
    # The given scales' logits get no gradient.
    model.requires_grad_(True)
    packed, x, _ = pack_inputs([sample])
    out = model.forward_packed(x, [sample.text], build_packed_layout(packed, model.cfg))
    for logits in out.logits:
        logits.retain_grad()
    losses = [bit_loss_per_token(out.logits[k], sample.labels[k]) for k in range(given, len(schedule))]
    reduce_loss(torch.cat([l_[0][0] for l_ in losses]), torch.cat([l_[1][0] for l_ in losses]),
                layout.scales[given:], layout.full_scales[given:], LossWeighting()).final_loss.backward()
    assert all(out.logits[k].grad is None or out.logits[k].grad.abs().max() == 0 for k in range(given))
    assert out.logits[given].grad.abs().max() > 0


def test_an_extension_must_leave_a_clip_to_generate():
    schedule, _ = _video(2)
    with pytest.raises(ValueError, match="at least one clip must be generated"):
        given_scale_count(schedule, 2)


# ----------------------------------------------------------------------------------------------- data


def _row(frames: int, **extra) -> dict:
    return {"video_path": "v.mp4", "begin_frame_id": 0, "end_frame_id": frames, "fps": 16,
            "tarsier2_caption": "a red circle moving right", **extra}


def _record(frames: int, **extra):
    cfg = DataConfig(jsonl=("x.jsonl",), max_seconds=6)
    rec, _ = parse_record(json.loads(json.dumps(_row(frames, **extra))), "t.jsonl:1", cfg, DEMO, Path("/d"))
    return rec


def test_story_records_parse_and_check_their_segment_count():
    rec = _record(97, segment_captions=["a red circle moving right", "a red circle moving up",
                                        "a red circle moving left"])
    assert rec.is_story and len(rec.segment_captions) == 3 and rec.latent_frames == 1 + 3 * CLIP
    with pytest.raises(RecordError, match="2 segment_captions for a story of 3 clips"):
        _record(97, segment_captions=["a", "b"])
    with pytest.raises(RecordError, match="at least two non-empty strings"):
        _record(65, segment_captions=["only one"])
    with pytest.raises(RecordError, match="segment_captions"):
        _record(65, segment_captions="not a list")


def test_tasks_are_drawn_per_record_as_configured():
    cfg = DataConfig(jsonl=("x.jsonl",), max_seconds=6, image_to_video_prob=0.2, extension_prob=0.3)
    six, two = _record(97), _record(33)
    story = _record(97, segment_captions=["a", "b", "c"])
    draws = [draw_task(six, cfg, DEMO, torch.Generator().manual_seed(i)) for i in range(2000)]
    share = {t: sum(d[0] == t for d in draws) / len(draws) for t in ("image-to-video", "video-extension")}
    # Binomial(2000, p): 4.5 standard deviations is about 0.04.
    assert abs(share["image-to-video"] - 0.2) < 0.04 and abs(share["video-extension"] - 0.3) < 0.045
    assert {d[1] for d in draws if d[0] == "video-extension"} == {1, 2}
    # A one-clip video cannot be extended; a story is always an interactive turn, its turn 1..clips-1.
    assert all(draw_task(two, cfg, DEMO, torch.Generator().manual_seed(i))[0] != "video-extension"
               for i in range(200))
    turns = {draw_task(story, cfg, DEMO, torch.Generator().manual_seed(i)) for i in range(200)}
    assert {t[0] for t in turns} == {"interactive"} and {t[2] for t in turns} == {1, 2}
    assert draw_task(six, cfg, DEMO, torch.Generator().manual_seed(7)) == draw_task(six, cfg, DEMO,
                                                                                   torch.Generator().manual_seed(7))
    with pytest.raises(ValueError, match="image_to_video_prob \\+ extension_prob"):
        DataConfig(image_to_video_prob=0.6, extension_prob=0.6)
    with pytest.raises(ValueError, match="condition_noise"):
        DataConfig(condition_noise=())


# ----------------------------------------------------------------------------------------------- multi-clip


@pytest.mark.parametrize("clips", [1, 3])
def test_a_multi_clip_training_sample_gives_the_generation_logits(clips):
    """A video of ``clips`` clips: the packed training sequence (each clip at its frames, attending the previous
    clip's last scale) and the generation loop fed the same clean bits give the same logits at every scale."""
    from infinitystar.generation.plan import plan_steps
    from infinitystar.train.step import tokenize_sample

    model = realistic_transformer(DEMO.transformer, seed=4)
    schedule, reps = _video(clips)
    latent = _latent(1 + clips * CLIP, seed=11)
    text = torch.randn(5, DEMO.transformer.text_channels, generator=torch.Generator().manual_seed(2))
    sample = tokenize_sample(latent, text, schedule, reps, DEMO.quantizer, range(len(schedule)),
                             torch.Generator().manual_seed(3), bsc_strength=0.0, frames_inner_clip=CLIP)
    packed, x, _ = pack_inputs([sample])
    layout = build_packed_layout(packed, model.cfg)
    plan = plan_steps(schedule, image_repetition=DEMO.image_repetition, video_repetition=DEMO.video_repetition,
                      semantic_scales=DEMO.transformer.semantic_scales,
                      detail_scale_min_tokens=DEMO.transformer.detail_scale_min_tokens, sampling=DEMO.sampling,
                      frames_inner_clip=CLIP, rope_max_frames=DEMO.transformer.rope_max_frames)
    bits = encode_to_bits(latent, schedule, reps, DEMO.quantizer, frames_inner_clip=CLIP).bits
    events = []
    with torch.no_grad():
        train = model.forward_packed(x, [text], layout)
        generate_codes(model, DEMO.quantizer, text, schedule, plan, reps, DEMO.sampling,
                       generator=torch.Generator().manual_seed(0), forced_bits=list(bits), run_forced_steps=True,
                       frames_inner_clip=CLIP, on_step=events.append)
    assert plan.anchored_from_clip is None or plan.anchored_from_clip > clips  # 3 clips are within the RoPE
    assert DEMO.sampling.tau_image == DEMO.sampling.tau_video == 1.0  # the conditional branch: raw logits
    path = transformer_rounding_path(model, layout.seq_len) + [model.cfg.embed_dim]
    for k, (si, real_si) in enumerate(zip(sample.scale_ids, sample.real_si)):
        [event] = [e for e in events if e.step.si == si and e.step.rope_scale_index == real_si]
        generated = event.branches_Bnd2[0:1]
        tol = float32_rounding_tolerance(max(train.hidden.abs().max().item(), generated.abs().max().item()), path)
        assert (train.logits[k] - generated).abs().max() <= tol, f"scale {si}"


# ----------------------------------------------------------------------------------------------- a run


def test_a_run_trains_every_task_from_written_videos_and_stories(tmp_path):
    """make-demo-data's videos and stories -> extract-features -> train: every task reaches the packed steps."""
    from infinitystar.demo import synthetic as syn
    from infinitystar.pipeline import InfinityStarPipeline
    from infinitystar.train.config import TrainConfig, config_from_dict
    from infinitystar.train.features import extract_features
    from infinitystar.train.runlog import read_log
    from infinitystar.train.trainer import Trainer

    root = tmp_path / "data"
    videos = syn.make_videos(root, 4, seed=0, segments=(2, 3))
    stories = syn.make_stories(root, 3, seed=0)
    data = DataConfig(jsonl=(str(videos), str(stories)), cache_dir=str(tmp_path / "cache"), max_seconds=6,
                      image_to_video_prob=0.3, extension_prob=0.4, cond_dropout=0.0)
    pipe = InfinityStarPipeline.from_preset("demo", seed=0)
    assert extract_features(data, pipe.config, pipe.vae, progress=False).written == 7
    cfg = config_from_dict(TrainConfig, {
        "out_dir": str(tmp_path / "run"), "model": {"pipeline": "demo"}, "training": {"steps": 24, "batch_size": 3},
        "optimizer": {"lr": 1e-3}, "checkpoint": {"every": 24}, "scale_subsets": {"var_len": False},
        "parallelism": {"activation_checkpointing": False, "device": "cpu"}})
    cfg = replace(cfg, data=data)
    # The task of each video is drawn from the record's uid, which holds its (temporary) path, so the draws change
    # from run to run: 24 steps of 3 draw each of the 4 videos about 10 times, 40 draws whose task is text-to-video
    # with p 0.3, image-to-video 0.3, extension 0.4; a task missing from all of them has p <= 3 * 0.7^40 < 1e-5
    # (8 steps, about 14 draws, missed text-to-video in 0.7^14 = 0.7 % of runs, and did once in CI).
    result = Trainer(cfg, progress=False).run()
    assert all(0 < result.losses[s] < 1 for s in range(1, 25))
    steps = [r for r in read_log(tmp_path / "run" / "train_log.jsonl") if r.get("event") == "step"]
    tasks = {t for r in steps for t in r["tasks"]}
    assert tasks == {"text-to-video", "image-to-video", "video-extension", "interactive"}, tasks
    keys = {k for r in steps for k in r["per_scale"]}
    assert {f"turn/s{i:03d}" for i in range(4)} <= keys
    # A 6 s text-to-video sample trains the scales of its third clip (scales 12..15).
    assert any(k.startswith("t06.0s/s015") for k in keys) or any(k.startswith("t04.0s/s011") for k in keys)


def test_a_run_starts_from_float32_weights_whatever_the_host_prefers(tmp_path, monkeypatch):
    """A model folder loads in the host's inference precision (bf16 on a CPU with native bf16); training keeps
    float32 master weights, so the run's base must come in float32 there too."""
    from infinitystar.pipeline import InfinityStarPipeline
    from infinitystar.train.config import TrainConfig, config_from_dict
    from infinitystar.train.trainer import load_base_pipeline

    InfinityStarPipeline.from_preset("tiny-test").save_pretrained(tmp_path / "base")
    monkeypatch.setenv("INFINITYSTAR_CPU_PRECISION", "bf16")
    assert InfinityStarPipeline.from_pretrained(tmp_path / "base").dtype == torch.bfloat16  # the inference default
    cfg = config_from_dict(TrainConfig, {"model": {"pipeline": str(tmp_path / "base")}})
    pipe = load_base_pipeline(cfg)
    assert {p.dtype for p in pipe.transformer.parameters()} == {torch.float32}

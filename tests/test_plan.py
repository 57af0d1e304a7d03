"""The generation plan: one place for frame counts, clip layout, steps and forced steps of a request.

Expected values are worked out by hand from the definitions (causal VAE: 1 + (F - 1) / s latent frames; a
clip of t latent frames decodes to t * s pixel frames after the first frame), not read back from the code.
"""

import json
import warnings

import pytest
import torch

from infinitystar.config import ConfigError, SamplingConfig, get_preset, replace
from infinitystar.generation.loop import generate_codes
from infinitystar.generation.plan import GenerationPlan, InteractivePlan, frames_for_seconds, whole_pixel_frames
from infinitystar.generation.schedules import latent_frames, pixel_frames
from infinitystar.pipeline import InfinityStarPipeline
from infinitystar.transformer.model import InfinityStarTransformer

FIC = 2  # latent frames per clip: 2 * 4 = 8 pixel frames, so a few clips stay tiny


def _cfg():
    return replace(get_preset("pipeline", "tiny-test"), frames_inner_clip=FIC)


def _pyramid(cfg):
    return [(1, k, k) for k in range(1, cfg.scales_per_clip + 1)]  # the tiny preset's 1:1 ladder: 1x1 .. 6x6


@pytest.mark.parametrize("stride, pixel, latent", [(4, 1, 1), (4, 81, 21), (4, 161, 41), (2, 9, 5), (1, 7, 7),
                                                   (8, 17, 3)])
def test_frame_formulas_use_the_given_stride(stride, pixel, latent):
    assert latent_frames(pixel, stride) == latent
    assert pixel_frames(latent, stride) == pixel


def test_frame_formula_rejects_frames_between_latents():
    with pytest.raises(ValueError, match=r"1 \+ 4k"):
        latent_frames(80, 4)
    with pytest.raises(ValueError, match=r"1 \+ 2k"):
        latent_frames(8, 2)
    # The longest encodable prefix: 80 frames -> 77 (1 + 4*19), 81 stays.
    assert (whole_pixel_frames(80, 4), whole_pixel_frames(81, 4), whole_pixel_frames(1, 4)) == (77, 81, 1)


@pytest.mark.parametrize("seconds, frames", [
    (0, 1),  # an image
    (1, 17),  # 16 frames + the first
    (0.25, 5),  # one latent frame
    (0.1, 5),  # 1.6 frames rounds to 0 latent frames; every positive length is at least one
    (1.1, 17),  # 17.6 frames = 4.4 latent frames -> 4
    (1.2, 21),  # 19.2 frames = 4.8 latent frames -> 5
])
def test_seconds_round_to_whole_latent_frames(seconds, frames):
    assert frames_for_seconds(seconds, 16, 4) == frames


def test_pipeline_and_web_page_agree_on_lengths(tmp_path):
    from infinitystar.web import WebApp

    pipe = InfinityStarPipeline.from_preset("tiny-test")
    app = WebApp(pipe, output_dir=tmp_path)
    for seconds, frames in [(0.25, 5), (0.1, 5), (1.1, 17), (1.2, 21), (2, 33)]:
        assert app.num_frames(seconds) == pipe.num_frames_for(None, seconds) == frames
    with pytest.raises(ValueError, match="either num_frames or seconds"):
        pipe.num_frames_for(5, 1.0)


def test_plan_of_a_three_clip_video():
    cfg = _cfg()
    k = cfg.scales_per_clip
    num_frames = 1 + 3 * FIC * cfg.vae.time_stride  # 25 pixel frames = 1 + 3 clips of 2 latent frames
    plan = GenerationPlan(cfg, num_frames, _pyramid(cfg), cfg.sampling)
    assert plan.latent_frames == 1 + 3 * FIC
    assert len(plan.schedule) == 4 * k and [s[0] for s in plan.schedule[::k]] == [1, FIC, FIC, FIC]
    assert plan.clip_pixel_frames == [1, 8, 8, 8]  # sums to the 25 frames asked for
    assert plan.num_clips == 4
    # Steps: every scale repeat is one pass; the tiny preset repeats each clip's first two scales twice.
    assert plan.num_steps == 4 * (2 + 2 + 1 + 1 + 1 + 1)
    assert plan.forced_scales == 0 and plan.forced_latent_frames == 0
    # The first frame's pyramid uses tau_image, the rest tau_video.
    taus = {s.clip_id: s.tau for s in plan.steps.steps}
    assert taus == {0: cfg.sampling.tau_image, 1: cfg.sampling.tau_video, 2: cfg.sampling.tau_video,
                    3: cfg.sampling.tau_video}


def test_forced_steps_of_image_and_video_conditions():
    cfg = _cfg()
    k = cfg.scales_per_clip
    plan = GenerationPlan(cfg, 25, _pyramid(cfg), cfg.sampling)
    image = plan.with_condition(1)
    assert (image.forced_scales, image.forced_latent_frames, image.condition_pixel_frames) == (k, 1, 1)
    assert sum(s.teacher_forced for s in image.steps.steps) == 2 + 2 + 1 + 1 + 1 + 1
    # A 14-frame video holds one whole clip (1 + 8 frames) and 5 frames of a second: the partial clip is dropped.
    video = plan.with_condition(14)
    assert (video.forced_scales, video.forced_latent_frames, video.condition_pixel_frames) == (2 * k, 1 + FIC, 9)
    with pytest.warns(UserWarning, match="only whole clips are kept"):
        video.check_condition()
    # A video as long as the output keeps all but the output's last clip.
    longer = plan.with_condition(25)
    assert longer.condition_clips == 2 and longer.forced_scales == 3 * k
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        longer.check_condition()  # cut short on purpose: no warning
    with pytest.raises(ValueError, match="num_frames > 1"):
        GenerationPlan(cfg, 1, _pyramid(cfg), cfg.sampling, condition_frames=1)


def test_interactive_plan():
    cfg = _cfg()
    turn = InteractivePlan(cfg, tuple(_pyramid(cfg)), cfg.sampling)
    assert turn.clip_pixel_frames == FIC * cfg.vae.time_stride == 8
    assert turn.first_segment_frames == 9
    assert [s[0] for s in turn.layout.schedule] == [FIC] * cfg.scales_per_clip
    assert len(turn.steps.steps) == sum(cfg.image_repetition)


def test_loop_reports_progress_through_the_callback():
    cfg = _cfg()
    torch.manual_seed(0)
    model = InfinityStarTransformer(cfg.transformer).eval()
    plan = GenerationPlan(cfg, 9, _pyramid(cfg), cfg.sampling)
    seen: list[tuple[int, int]] = []
    generate_codes(model, cfg.quantizer, torch.randn(4, cfg.transformer.text_channels), plan.schedule, plan.steps,
                   plan.repetitions, cfg.sampling, generator=torch.Generator().manual_seed(0),
                   frames_inner_clip=FIC, on_progress=lambda done, total: seen.append((done, total)))
    n = plan.num_steps
    assert seen == [(i, n) for i in range(1, n + 1)]


def test_guidance_scale_checked_once_and_one_means_off():
    base = SamplingConfig()
    assert base.with_guidance_scale(None) is base
    assert not base.with_guidance_scale(1).uses_guidance
    assert base.with_guidance_scale(2.5).uses_guidance and base.with_guidance_scale(2.5).guidance_method == "apg"
    with pytest.raises(ConfigError, match=r"guidance_scale must be >= 1 \(1 = no guidance\), got 0.5"):
        base.with_guidance_scale(0.5)
    assert not replace(base, guidance_method="none").uses_guidance


def test_model_index_written_before_the_rename_still_loads(tmp_path):
    pipe = InfinityStarPipeline.from_preset("tiny-test")
    pipe.save_pretrained(tmp_path)
    index_path = tmp_path / "model_index.json"
    index = json.loads(index_path.read_text())
    sampling = index["config"]["sampling"]
    sampling["guidance"] = sampling.pop("guidance_method")  # the old field name
    index_path.write_text(json.dumps(index))
    loaded = InfinityStarPipeline.from_pretrained(tmp_path)
    assert loaded.config == pipe.config

"""The pipeline's public API in diffusers' shape: top-level exports, batches of prompts and videos, seeds, the two
step callbacks and ``interrupt``, progress events (and that raising from them aborts at once), refused diffusers
arguments, ``components``, honest capabilities, the closed vocabulary of the word encoder and the shipped model id.

Expected values come from separate single calls, the VAE and the plan, never from the code path under test.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
from tqdm import tqdm as std_tqdm

import infinitystar.pipeline as pipeline_module
from infinitystar.config import get_preset
from infinitystar.demo import DEMO_MODEL_ID, DEMO_WEIGHTS
from infinitystar.generation.plan import GenerationPlan
from infinitystar.generation.schedules import ScaleStep
from infinitystar.pipeline import (
    DIFFUSERS_ONLY_ARGUMENTS,
    Capabilities,
    InfinityStarPipeline,
    ProgressEvent,
    UnknownWordsWarning,
    read_pipeline_config,
)

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models

TINY = get_preset("pipeline", "tiny-test")
PROMPT = "a red ball bounces"
SIZE = 96


@pytest.fixture(scope="module")
def pipe() -> InfinityStarPipeline:
    torch.set_num_threads(1)
    return InfinityStarPipeline.from_preset(TINY, seed=0)


@pytest.fixture(scope="module")
def story_pipe() -> InfinityStarPipeline:
    torch.set_num_threads(1)
    short = dataclasses.replace(get_preset("pipeline", "tiny-test-interactive"), name="tiny-story",
                                frames_inner_clip=2)
    return InfinityStarPipeline.from_preset(short, seed=0)


def _steps(pipe: InfinityStarPipeline, num_frames: int) -> int:
    _, pyramid, _ = pipe.resolve_size()
    return GenerationPlan(pipe.config, num_frames, pyramid, pipe.config.sampling).num_steps


class Stop(Exception):
    pass


# ----------------------------------------------------------------------------------------------
# Top-level exports, lazily
# ----------------------------------------------------------------------------------------------


def test_top_level_exports_are_the_pipeline_modules_objects():
    import infinitystar
    from infinitystar import (
        MEMORY_MODES,
        Capabilities,
        InfinityStarPipeline,
        InfinityStarPipelineOutput,
        ProgressEvent,
        __version__,
        export_to_video,
        memory,
        pipeline,
    )

    assert InfinityStarPipeline is pipeline.InfinityStarPipeline
    assert InfinityStarPipelineOutput is pipeline.InfinityStarPipelineOutput
    assert (ProgressEvent, Capabilities, export_to_video) == (pipeline.ProgressEvent, pipeline.Capabilities,
                                                               pipeline.export_to_video)
    assert MEMORY_MODES is memory.MEMORY_MODES and "plain" in MEMORY_MODES
    assert isinstance(__version__, str) and __version__.count(".") == 2
    assert set(infinitystar.__all__) >= {"InfinityStarPipeline", "ProgressEvent", "Capabilities", "__version__"}
    assert "InfinityStarPipeline" in dir(infinitystar)
    with pytest.raises(AttributeError, match="has no attribute 'NoSuchThing'"):
        infinitystar.NoSuchThing  # noqa: B018


def test_importing_a_low_module_does_not_import_torch_or_the_pipeline():
    code = ("import sys, infinitystar.fileio, infinitystar; "
            "print(sorted(m for m in ('torch', 'infinitystar.pipeline', 'infinitystar.memory') if m in sys.modules)); "
            "from infinitystar import InfinityStarPipeline; print('infinitystar.pipeline' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split("\n")
    assert out[0] == "[]"
    assert out[1] == "True"  # and the first access imports it


# ----------------------------------------------------------------------------------------------
# diffusers' call shape: several prompts and videos, return_dict, refused arguments, components
# ----------------------------------------------------------------------------------------------


def test_prompts_and_videos_per_prompt_equal_single_calls_with_consecutive_seeds(pipe):
    prompts = ["a red ball", "a blue cube"]
    out = pipe(prompts, num_frames=1, num_videos_per_prompt=2, seed=10, progress=False)
    assert out.seeds == [10, 11, 12, 13] and out.seed == 10
    assert len(out.frames) == 4 and len(out.latent) == 4
    for k, frames in enumerate(out.frames):
        single = pipe(prompts[k // 2], num_frames=1, seed=10 + k, progress=False)
        np.testing.assert_array_equal(frames, single.frames)
        assert torch.equal(out.latent[k], single.latent)
    assert not np.array_equal(out.frames[0], out.frames[1])  # another seed, another image


def test_a_list_of_one_prompt_gives_a_list(pipe):
    out = pipe([PROMPT], num_frames=1, seed=1, progress=False)
    assert isinstance(out.frames, list) and len(out.frames) == 1
    np.testing.assert_array_equal(out.frames[0], pipe(PROMPT, num_frames=1, seed=1, progress=False).frames)


def test_one_generator_per_video(pipe):
    gens = [torch.Generator().manual_seed(5), torch.Generator().manual_seed(9)]
    out = pipe(PROMPT, num_frames=1, num_videos_per_prompt=2, generator=gens, progress=False)
    assert out.seeds == [5, 9]
    np.testing.assert_array_equal(out.frames[1], pipe(PROMPT, num_frames=1, seed=9, progress=False).frames)
    with pytest.raises(ValueError, match="1 generator.* for 2 videos: pass one torch.Generator per video"):
        pipe(PROMPT, num_frames=1, num_videos_per_prompt=2, generator=torch.Generator(), progress=False)
    with pytest.raises(ValueError, match="give seed or generator, not both"):
        pipe(PROMPT, num_frames=1, seed=1, generator=torch.Generator(), progress=False)


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"num_videos_per_prompt": 0}, "num_videos_per_prompt must be an integer >= 1, got 0"),
    ({"prompt": []}, "prompt must be a string or a non-empty list of strings"),
    ({"prompt": ["a", 3]}, "prompt 1 must be a non-empty string, got 3"),
    ({"negative_prompt": ["x", "y"]}, r"negative_prompt must be .* one per prompt \(1\)"),
    ({"seed": -1}, "seed must be an integer"),
    ({"callback_on_step_end_tensor_inputs": ["latents"]}, r"names \['latents'\].*valid: \['bits', 'logits'"),
])
def test_bad_batch_arguments_are_one_line(pipe, kwargs, match):
    kwargs = {"prompt": PROMPT, "num_frames": 1, "progress": False, **kwargs}
    with pytest.raises(ValueError, match=match) as info:
        pipe(**kwargs)
    assert "\n" not in str(info.value)


def test_return_dict_false_gives_a_tuple_of_frames(pipe):
    frames, = pipe(PROMPT, num_frames=1, seed=2, return_dict=False, progress=False)
    np.testing.assert_array_equal(frames, pipe(PROMPT, num_frames=1, seed=2, progress=False).frames)


@pytest.mark.parametrize("name", ["num_inference_steps", "latents", "prompt_embeds", "eta", "guidance_rescale",
                                  "clip_skip", "cross_attention_kwargs", "timesteps", "sigmas"])
def test_diffusers_arguments_that_do_not_apply_say_why(pipe, name):
    with pytest.raises(TypeError) as info:
        pipe(PROMPT, num_frames=1, progress=False, **{name: 1})
    message = str(info.value)
    assert message.startswith(f"{name} does not apply to InfinityStarPipeline: ")
    assert DIFFUSERS_ONLY_ARGUMENTS[name] in message and "\n" not in message


def test_an_unknown_keyword_is_a_clear_type_error(pipe):
    with pytest.raises(TypeError, match="unexpected keyword argument 'num_frame'; did you mean 'num_frames'"):
        pipe(PROMPT, num_frame=1)
    with pytest.raises(TypeError, match="unexpected keyword argument 'zzz'$"):
        pipe(PROMPT, zzz=1)


def test_components_by_name(pipe):
    assert pipe.components == {"transformer": pipe.transformer, "vae": pipe.vae, "text_encoder": pipe.text_encoder}


# ----------------------------------------------------------------------------------------------
# Seeds
# ----------------------------------------------------------------------------------------------


def test_without_a_seed_a_random_one_is_drawn_and_reported(pipe):
    a = pipe(PROMPT, num_frames=1, progress=False)
    b = pipe(PROMPT, num_frames=1, progress=False)
    assert a.seed != b.seed  # equal with probability 2**-31
    assert 0 <= a.seed < pipeline_module.SEED_LIMIT and a.seeds == [a.seed]
    np.testing.assert_array_equal(a.frames, pipe(PROMPT, num_frames=1, seed=a.seed, progress=False).frames)


def test_interactive_reports_its_seed(story_pipe):
    first = story_pipe.interactive([PROMPT, "it stops"], output_type="pt", progress=False)
    assert first.seeds == [first.seed]
    again = story_pipe.interactive([PROMPT, "it stops"], output_type="pt", seed=first.seed, progress=False)
    assert torch.equal(first.frames, again.frames)


# ----------------------------------------------------------------------------------------------
# Step callbacks and interrupt
# ----------------------------------------------------------------------------------------------


def test_callback_on_step_end_has_diffusers_signature_and_the_asked_tensors(pipe):
    calls = []

    def callback(p, step, timestep, callback_kwargs):
        calls.append((p, step, timestep, dict(callback_kwargs)))
        return callback_kwargs

    out = pipe(PROMPT, num_frames=5, seed=4, output_type="latent", progress=False, callback_on_step_end=callback,
               callback_on_step_end_tensor_inputs=["bits", "summed_codes"])
    assert len(calls) == _steps(pipe, 5)
    assert [c[1] for c in calls] == list(range(len(calls)))
    assert all(c[0] is pipe and isinstance(c[2], ScaleStep) for c in calls)
    assert all(set(c[3]) == {"bits", "summed_codes"} for c in calls)
    t, h, w = calls[0][2].scale
    assert calls[0][3]["bits"].shape[:4] == (1, t, h, w)
    # After the last step the running sum is what the call returns.
    assert torch.equal(calls[-1][3]["summed_codes"], out.latent)


def test_callback_tensors_are_read_only_and_a_dict_is_expected(pipe):
    with pytest.raises(ValueError, match="returned a new 'bits': the step tensors are read-only"):
        pipe(PROMPT, num_frames=1, seed=0, progress=False, callback_on_step_end_tensor_inputs=["bits"],
             callback_on_step_end=lambda p, i, t, kw: {"bits": kw["bits"].clone()})
    with pytest.raises(TypeError, match="must return a dict .* got int"):
        pipe(PROMPT, num_frames=1, seed=0, progress=False, callback_on_step_end=lambda p, i, t, kw: 3)


def test_callback_on_scale_step_gets_the_loop_events(pipe):
    events = []
    pipe(PROMPT, num_frames=1, seed=0, progress=False, callback_on_scale_step=lambda p, ev: events.append(ev))
    assert [ev.index for ev in events] == list(range(_steps(pipe, 1)))


def test_interrupt_stops_after_the_step_that_set_it(pipe):
    seen = []

    def callback(p, step, timestep, kw):
        seen.append(kw["summed_codes"])
        if step == 3:
            p.interrupt = True
        return kw

    out = pipe(PROMPT, num_frames=5, seed=1, output_type="latent", num_videos_per_prompt=2, progress=False,
               callback_on_step_end=callback)
    assert len(seen) == 4 and out.interrupted
    assert len(out.latent) == 1 and out.seeds == [1]  # the second video never started
    assert torch.equal(out.latent[0], seen[-1])  # the codes of the four steps done
    # The flag stays set until the next call, which starts by clearing it; diffusers' private name works too.
    assert pipe.interrupt
    full = pipe(PROMPT, num_frames=5, seed=1, output_type="pt", progress=False)
    assert not full.interrupted and full.frames.shape[1] == 5

    def private(p, step, timestep, kw):
        p._interrupt = True
        return kw

    out = pipe(PROMPT, num_frames=5, seed=1, progress=False, callback_on_step_end=private)
    assert out.interrupted and out.frames.shape[1:] == (SIZE, SIZE, 3)


def test_interrupt_during_a_story_keeps_the_segments_done(story_pipe):
    def stop(index, frames):
        story_pipe.interrupt = True

    out = story_pipe.interactive([PROMPT, "it stops", "it rolls"], seed=0, output_type="pt", progress=False,
                                 callback_on_segment_end=stop)
    assert out.interrupted and len(out.segments) == 1


# ----------------------------------------------------------------------------------------------
# Progress
# ----------------------------------------------------------------------------------------------


def _decoder_runs(pipe: InfinityStarPipeline) -> tuple[list[int], object]:
    runs: list[int] = []
    handle = pipe.vae.decoder.register_forward_hook(lambda *_: runs.append(1))
    return runs, handle


def test_progress_events_cover_every_stage(pipe):
    events: list[ProgressEvent] = []
    pipe(PROMPT, "blurry", num_frames=17, seed=0, progress=events.append)
    stages = [e.stage for e in events]
    assert stages == sorted(stages, key=["encode_prompt", "generate", "decode"].index)  # in that order
    encode = [(e.done, e.total) for e in events if e.stage == "encode_prompt"]
    assert encode == [(0, 2), (1, 2), (2, 2)]  # the prompt and the negative prompt
    n = _steps(pipe, 17)
    generate = [e for e in events if e.stage == "generate"]
    assert [(e.done, e.total) for e in generate] == [(i, n) for i in range(n + 1)]
    assert generate[0].clip == 1 and generate[-1].clip == 2  # the first frame, then one (short) video clip
    decode = [(e.done, e.total) for e in events if e.stage == "decode"]
    # 17 frames = 5 latent frames: the decoder's chunks are 1, 2 and 2 latent frames.
    assert decode == [(0, 3), (1, 3), (2, 3), (3, 3)]


@pytest.mark.parametrize("at", [1, 2])
def test_raising_from_progress_aborts_the_decode_at_once(pipe, at):
    seen = []

    def progress(ev: ProgressEvent) -> None:
        if ev.stage == "decode":
            seen.append(ev)
            if len(seen) == at:
                raise Stop

    runs, handle = _decoder_runs(pipe)
    try:
        with pytest.raises(Stop):
            pipe(PROMPT, num_frames=17, seed=0, progress=progress)
    finally:
        handle.remove()
    assert len(seen) == at
    assert len(runs) == at - 1 < 3  # the decoder ran only the chunks reported before the raise


def test_bars_close_when_the_call_fails(pipe, capsys):
    before = len(std_tqdm._instances)

    def fail(p, ev):
        if ev.index == 2:
            raise Stop

    with pytest.raises(Stop):
        pipe(PROMPT, num_frames=5, seed=0, progress=True, callback_on_scale_step=fail)
    assert len(std_tqdm._instances) == before
    pipe(PROMPT, num_frames=5, seed=0, progress=True)
    assert len(std_tqdm._instances) == before
    err = capsys.readouterr().err
    assert "scales" in err and "VAE decode" in err and "text encoder" in err


def test_progress_must_be_a_bool_or_a_callable(pipe):
    with pytest.raises(TypeError, match="progress must be True, False or a callable"):
        pipe(PROMPT, num_frames=1, seed=0, progress="yes")


def test_story_progress_reports_segments(story_pipe):
    events: list[ProgressEvent] = []
    story_pipe.interactive([PROMPT, "it stops"], seed=0, progress=events.append)
    assert {e.clip for e in events} == {1, 2}
    for segment in (1, 2):
        assert {e.stage for e in events if e.clip == segment} == {"encode_prompt", "generate", "decode"}


def test_reconstruct_reports_its_decode(pipe):
    events: list[ProgressEvent] = []
    video = torch.rand(3, 5, SIZE, SIZE) * 2 - 1
    pipe.reconstruct(video, output_type="pt", progress=events.append)
    assert [e.stage for e in events] == ["decode"] * len(events) and events[-1].done == events[-1].total


def test_vae_decode_reports_every_tile_and_chunk_and_decodes_the_same(pipe):
    latent = torch.randn(1, 64, 5, 6, 6)
    reports = []
    with torch.no_grad():
        want = pipe.vae.decode(latent, tile_size=4)
        got = pipe.vae.decode(latent, tile_size=4, on_chunk=lambda d, t: reports.append((d, t)))
    assert torch.equal(got, want)
    # 6 latent cells in tiles of 4 overlapping by 1: 2 x 2 tiles, each decoded in 3 temporal chunks.
    assert reports == [(i, 12) for i in range(13)]


# ----------------------------------------------------------------------------------------------
# Capabilities
# ----------------------------------------------------------------------------------------------


def test_capabilities_of_tiny_test(pipe):
    caps = pipe.capabilities
    assert caps.tasks == ("text-to-image", "text-to-video", "image-to-video", "video-extension")
    assert caps.aspects == ("1:1",) and caps.fps == TINY.fps and caps.max_seconds is None
    assert caps.vocabulary is None and caps.unknown_words("anything at all") == []
    out = pipe(PROMPT, num_frames=1, seed=0, aspect="1:1", progress=False)
    assert out.frames.shape[1:3] == caps.sizes["1:1"]


def test_interactive_needs_an_interactive_model(pipe, story_pipe):
    assert "interactive" in story_pipe.capabilities.tasks
    with pytest.raises(ValueError, match=r"model 'tiny-test' is not interactive \(its tasks: text-to-image, "
                                         r"text-to-video, image-to-video, video-extension\)") as info:
        pipe.interactive([PROMPT, "it stops"])
    assert "\n" not in str(info.value)
    with pytest.raises(ValueError, match="one prompt per segment, not one string"):
        story_pipe.interactive(PROMPT)


def test_aspects_the_model_cannot_split_are_not_offered():
    cfg = dataclasses.replace(TINY, name="tiny-aspects", aspects=("1:1", "16:9", "21:9"))
    pipe = InfinityStarPipeline.from_preset(cfg, seed=0)
    caps = pipe.capabilities
    assert "1:1" in caps.aspects and set(caps.aspects) == set(caps.sizes)
    for aspect in cfg.aspects:
        if aspect in caps.sizes:
            frames = pipe(PROMPT, num_frames=1, seed=0, aspect=aspect, progress=False).frames
            assert frames.shape[1:3] == caps.sizes[aspect]
        else:
            with pytest.raises(ValueError, match="not supported by preset"):
                pipe(PROMPT, num_frames=1, seed=0, aspect=aspect, progress=False)


def test_a_short_rope_axis_limits_the_tasks_and_the_length():
    """Capabilities say what the model does: image only with a one-frame RoPE axis; with five frames (less than one
    20-frame clip after the first) videos up to 4 latent frames after the first, no extension."""
    image_only = InfinityStarPipeline.from_preset(
        dataclasses.replace(TINY, name="tiny-image", transformer=dataclasses.replace(TINY.transformer,
                                                                                     rope_max_frames=1)), seed=0)
    assert image_only.capabilities.tasks == ("text-to-image",) and image_only.capabilities.max_seconds == 0
    assert image_only(PROMPT, num_frames=1, seed=0, progress=False).frames.shape[0] == 1
    with pytest.raises(ValueError, match="RoPE covers 1 latent frames"):
        image_only(PROMPT, num_frames=5, seed=0, progress=False)
    short = InfinityStarPipeline.from_preset(
        dataclasses.replace(TINY, name="tiny-rope5", transformer=dataclasses.replace(TINY.transformer,
                                                                                     rope_max_frames=5)), seed=0)
    caps = short.capabilities
    assert caps.tasks == ("text-to-image", "text-to-video", "image-to-video") and caps.max_seconds == 1.0
    assert short(PROMPT, seconds=caps.max_seconds, seed=0, progress=False).frames.shape[0] == 17
    with pytest.raises(ValueError, match="RoPE covers 5 latent frames"):
        short(PROMPT, seconds=1.5, seed=0, progress=False)


# ----------------------------------------------------------------------------------------------
# The word encoder's vocabulary, the shipped model id
# ----------------------------------------------------------------------------------------------


def test_demo_model_by_its_id_is_the_shipped_folder():
    assert DEMO_MODEL_ID == "infinitystar-demo" and pipeline_module.LOCAL_MODELS[DEMO_MODEL_ID] == DEMO_WEIGHTS
    if not (DEMO_WEIGHTS / "model_index.json").is_file():
        pytest.skip("the demo weights are not shipped in this tree")
    by_id = InfinityStarPipeline.from_pretrained("infinitystar-demo")
    by_folder = InfinityStarPipeline.from_pretrained(DEMO_WEIGHTS)
    assert by_id.config == by_folder.config and by_id.config.name == "demo"
    a, b = by_id.transformer.state_dict(), by_folder.transformer.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert read_pipeline_config("infinitystar-demo") == by_id.config


def test_demo_vocabulary_is_the_words_of_its_training_captions():
    from infinitystar.demo.synthetic import CAPTION_TEMPLATES, TRAIN_TRIPLES, caption

    if not (DEMO_WEIGHTS / "model_index.json").is_file():
        pytest.skip("the demo weights are not shipped in this tree")
    pipe = InfinityStarPipeline.from_pretrained(DEMO_MODEL_ID)
    words = {w for t in TRAIN_TRIPLES for i in range(len(CAPTION_TEMPLATES)) for w in caption(t, i).split()}
    assert set(pipe.capabilities.vocabulary) == words
    assert pipe.capabilities.unknown_words("A Purple circle, moving left") == ["purple", ","]
    with pytest.warns(UserWarning, match=r"not trained on 'purple', 'hexagon'") as record:
        pipe("a purple hexagon moving left", num_frames=1, seed=0, progress=False)
    ours = [w for w in record if "not trained on" in str(w.message)]
    assert len(ours) == 1 and ours[0].filename == __file__  # once per call, pointing at the caller
    assert ours[0].category is UnknownWordsWarning  # its own class: callers that expect it filter exactly it
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pipe("a red circle moving left", num_frames=1, seed=0, progress=False)


def test_vocabulary_survives_save_and_load(tmp_path):
    cfg = dataclasses.replace(TINY, name="tiny-words", text_encoder="words")
    pipe = InfinityStarPipeline.from_preset(cfg, seed=0)
    assert pipe.capabilities.vocabulary is None  # not recorded: an open vocabulary
    pipe.text_encoder.vocabulary = ("red", "ball", "a")
    pipe.save_pretrained(tmp_path / "model")
    assert json.loads((tmp_path / "model" / "text_encoder" / "vocabulary.json").read_text()) == {
        "words": ["a", "ball", "red"]}
    loaded = InfinityStarPipeline.from_pretrained(tmp_path / "model")
    assert loaded.capabilities.vocabulary == ("a", "ball", "red")
    (tmp_path / "model" / "text_encoder" / "vocabulary.json").write_text('{"words": "red"}')
    with pytest.raises(ValueError, match="vocabulary.json: 'words' must be a list"):
        InfinityStarPipeline.from_pretrained(tmp_path / "model")


def test_a_local_folder_named_like_a_model_id_wins_and_a_missing_shipped_model_is_one_line(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    InfinityStarPipeline.from_preset(TINY, seed=0).save_pretrained(tmp_path / "infinitystar-demo")
    assert InfinityStarPipeline.from_pretrained("infinitystar-demo").config.name == "tiny-test"
    monkeypatch.setitem(pipeline_module.LOCAL_MODELS, "infinitystar-demo", tmp_path / "nothing")
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")  # no folder of that name here
    with pytest.raises(FileNotFoundError, match="model 'infinitystar-demo' is not shipped in this installation"):
        InfinityStarPipeline.from_pretrained("infinitystar-demo")


def test_capabilities_is_a_frozen_record():
    caps = Capabilities(("text-to-image",), ("1:1",), {"1:1": (64, 64)}, 16, None, ("red",))
    with pytest.raises(dataclasses.FrozenInstanceError):
        caps.fps = 8
    assert caps.unknown_words("Red red BLUE") == ["blue"]


def test_warnings_of_a_call_point_at_the_caller(pipe):
    # A 7-frame video ends in a partial clip (tiny-test clips are 80 frames: only its first frame is kept).
    video = torch.rand(3, 7, SIZE, SIZE) * 2 - 1
    with pytest.warns(UserWarning, match="only whole clips are kept") as record:
        pipe(PROMPT, video=video, num_frames=5, seed=0, output_type="latent", progress=False)
    assert [w.filename for w in record if "whole clips" in str(w.message)] == [__file__]

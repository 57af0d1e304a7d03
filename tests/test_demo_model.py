"""The shipped demo model (``infinitystar/demo/weights``): it loads, it is what ``generate`` uses without
``--model``, every task runs with it, and its clips pass the analytic judge.

The thresholds asserted here are the demo issue's targets (judge accuracy on held-out triples, tokenizer PSNR on
held-out clips), on a small fixed-seed sample; the full figures are in docs/demo.md.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from infinitystar import media
from infinitystar.cli import main
from infinitystar.config import ConfigError, get_preset, replace
from infinitystar.demo import DEMO_WEIGHTS, load_pipeline, model_world
from infinitystar.demo.evaluate import SEEN_EVAL_TRIPLES, judge_clip, judge_video, reconstruction_psnr
from infinitystar.demo.recipe import RecipeOptions, build_base
from infinitystar.demo.synthetic import HELD_OUT, caption, make_videos, render_video, sample_videos
from infinitystar.pipeline import InfinityStarPipeline

pytestmark = pytest.mark.skipif(not (DEMO_WEIGHTS / "model_index.json").is_file(),
                                reason="the demo weights are not shipped in this tree")

SIZE = 64
FRAMES = 33


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(1)
    yield


@pytest.fixture(scope="module")
def pipe() -> InfinityStarPipeline:
    torch.set_num_threads(1)
    return load_pipeline(None, None)


def test_shipped_weights_are_small_safetensors():
    files = [p for p in DEMO_WEIGHTS.rglob("*") if p.is_file()]
    weights = [p for p in files if p.suffix == ".safetensors"]
    assert {p.parent.name for p in weights} == {"transformer", "vae"}  # the word encoder has no weights
    total = sum(p.stat().st_size for p in files)
    assert total < 20 * 2**20, f"shipped demo weights are {total / 2**20:.1f} MiB"


def test_no_model_means_the_demo_model(pipe):
    # The shipped folder is the demo preset's architecture (only the sampling defaults may differ).
    # The VAE pads circularly from the torus world on; weights of the earlier in-frame world load zero-padded.
    preset = get_preset("pipeline", "demo")
    assert pipe.config.name == "demo"
    world = model_world(DEMO_WEIGHTS)
    assert pipe.config.vae == replace(preset.vae, spatial_padding="circular" if world == "torus" else "zeros")
    for part in ("quantizer", "transformer"):
        assert getattr(pipe.config, part) == getattr(preset, part)
    assert pipe.config.text_encoder == "words"
    assert pipe.num_frames_for(None, None) == FRAMES


def _judged(pipe, triple, seed):
    frames = np.asarray(pipe(caption(triple), seed=seed, output_type="np", progress=False).frames)
    assert frames.shape == (FRAMES, SIZE, SIZE, 3) and frames.dtype == np.uint8
    return judge_clip(frames)


# The targets on held-out triples (colour >= 90 %, shape >= 80 %, direction >= 80 %), checked here on one
# clip of each of the 12 held-out triples and of 12 seen ones (fixed seeds); docs/demo.md gives the figures of the
# full evaluation (4 clips per prompt). False alarms: each fixed-seed clip is judged right on every attribute here
# (12/12), and the targets allow 1 (colour) or 2 misses of 12. Another machine rounds the logits differently (~1e-6),
# which changes a sampled bit only where a uniform draw falls that close to its probability, and the decoder's
# pixels by at most one level (measured with AVX2 and plain kernels); even a clip re-drawn by such a flip misses
# with the full evaluation's rates (<= 2.1 % on held-out 2 s clips), so a false alarm needs two or three such clips.
TARGETS = {"colour": 0.9, "shape": 0.8, "direction": 0.8}


@pytest.fixture(scope="module")
def judged(pipe):
    """{group: [(truth, judgement)]}: one clip per triple of the 12 seen evaluation triples and the 12 held-out."""
    return {group: [(t, _judged(pipe, t, seed=i)) for i, t in enumerate(triples)]
            for group, triples in (("seen", SEEN_EVAL_TRIPLES), ("held-out", HELD_OUT))}


@pytest.mark.parametrize("attr", ["colour", "shape", "direction"])
@pytest.mark.parametrize("group", ["seen", "held-out"])
def test_prompt_adherence_targets(judged, group, attr):
    index = ("colour", "shape", "direction").index(attr)
    right = sum(getattr(j, attr) == truth[index] for truth, j in judged[group])
    assert right / len(judged[group]) >= TARGETS[attr], f"{group}: {attr} right on {right}/{len(judged[group])} clips"


def test_tokenizer_keeps_held_out_videos_recognisable(pipe):
    # What the judge needs from the tokenizer: its round trip of held-out torus videos is judged right on every
    # attribute of every segment.
    for v in sample_videos(6, seed=5, split="heldout", segments=(1, 2)):
        video = torch.from_numpy(render_video(v.spec, SIZE)).permute(3, 0, 1, 2).float() / 127.5 - 1
        judged = judge_video(np.asarray(pipe.reconstruct(video)))
        assert [j.triple for j in judged.segments] == list(v.spec.triples())


def test_tokenizer_reconstructs_held_out_videos_at_30_db(pipe, tmp_path):
    # The first 8 held-out videos (1-3 segments) as make-demo-data stores them (seed 0, lossless H.264 in YUV
    # 4:2:0, the frames every stage trains on), against their tokenizer round trip; issue 18's target is 30 dB at
    # every length (the full figures, 31-32 dB over the 48 held-out videos: docs/demo.md).
    jsonl = make_videos(tmp_path, 8, seed=0, split="heldout")
    assert reconstruction_psnr(pipe, jsonl)["psnr_db"] >= 30.0


def test_cli_generate_without_model_writes_the_demo_clip(tmp_path, capsys):
    out = tmp_path / "x.mp4"
    assert main(["generate", "a blue circle moving right", "-o", str(out)]) == 0
    err = capsys.readouterr().err
    assert "RANDOM" not in err  # the random-weights fallback was not used
    frames, fps = media.read_video(out)
    assert frames.shape == (FRAMES, SIZE, SIZE, 3)
    assert fps == pytest.approx(16)


def test_text_to_image(pipe):
    out = pipe("a yellow square moving up", num_frames=1, seed=0, output_type="np", progress=False)
    frame = np.asarray(out.frames)
    assert frame.reshape(-1, SIZE, SIZE, 3).shape == (1, SIZE, SIZE, 3) and frame.dtype == np.uint8


def test_generation_is_deterministic_by_seed(pipe):
    a = np.asarray(pipe("a red circle moving up", num_frames=1, seed=5, progress=False).frames)
    b = np.asarray(pipe("a red circle moving up", num_frames=1, seed=5, progress=False).frames)
    assert np.array_equal(a, b)


def test_image_to_video_is_conditioned_on_the_image(pipe):
    v = sample_videos(1, seed=7, split="train", segments=(1,))[0]
    first = render_video(v.spec, SIZE)[0]
    prompt = caption(v.spec.triples()[0])
    out = np.asarray(pipe(prompt, image=Image.fromarray(first), seed=0, output_type="np", progress=False).frames)
    plain = np.asarray(pipe(prompt, seed=0, output_type="np", progress=False).frames)
    assert out.shape == plain.shape == (FRAMES, SIZE, SIZE, 3)
    assert not np.array_equal(out, plain)


def test_video_extension_keeps_the_given_clip_and_adds_one(pipe, tmp_path):
    v = sample_videos(1, seed=11, split="train", segments=(1,))[0]
    video = render_video(v.spec, SIZE)
    path = media.write_video(video, tmp_path / "given.mp4", fps=16)
    prompt = caption(v.spec.triples()[0])
    out = np.asarray(pipe(prompt, video=str(path), num_frames=2 * FRAMES - 1, seed=0, output_type="np",
                          progress=False).frames)
    plain = np.asarray(pipe(prompt, num_frames=2 * FRAMES - 1, seed=0, output_type="np", progress=False).frames)
    assert out.shape == (2 * FRAMES - 1, SIZE, SIZE, 3)
    assert not np.array_equal(out[:FRAMES], plain[:FRAMES])


def test_recipe_options_reject_bad_sizes():
    with pytest.raises(ValueError, match="feature_clips"):
        RecipeOptions(clips=10, feature_clips=20)
    with pytest.raises(ValueError, match="workers"):
        RecipeOptions(workers=0)
    with pytest.raises(ValueError, match="processes"):
        RecipeOptions(processes=0)


def test_recipe_second_stage_config_is_a_valid_run_from_the_first_stage(tmp_path):
    """The second transformer stage (demo/configs/transformer_stage2.toml): its TrainConfig validates, starts from
    the first stage's export, keeps the first stage's data table under its own [data], and lists the stories
    ``story_repeats`` times, each copy its own records (their own task and caption draws)."""
    from infinitystar.demo.recipe import DEFAULT_CONFIG_DIR, stage2_config
    from infinitystar.train.config import TrainConfig, config_from_dict, read_config_file

    stories = tmp_path / "stories.jsonl"
    stories.write_text('{"a": 1}\n{"a": 2}\n', encoding="utf-8")
    first_data = {**read_config_file(DEFAULT_CONFIG_DIR / "transformer.toml")["data"], "cache_dir": "/c", "seed": 0}
    raw = stage2_config(DEFAULT_CONFIG_DIR / "transformer_stage2.toml", first_data, tmp_path / "videos.jsonl",
                        stories, tmp_path / "run_stage2", tmp_path / "model_stage1")
    repeats = read_config_file(DEFAULT_CONFIG_DIR / "transformer_stage2.toml")["recipe"]["story_repeats"]
    cfg = config_from_dict(TrainConfig, raw)
    assert cfg.model.pipeline == str(tmp_path / "model_stage1") and cfg.out_dir == str(tmp_path / "run_stage2")
    assert cfg.data.cache_dir == "/c" and cfg.data.max_seconds == first_data["max_seconds"]
    assert cfg.data.seed != 0  # the stage's own draws
    videos, repeated = cfg.data.jsonl
    assert videos == str(tmp_path / "videos.jsonl")
    assert Path(repeated).read_text(encoding="utf-8").splitlines() == ['{"a": 1}', '{"a": 2}'] * repeats
    # Half of the stage's interactive turns are conditioned on summed codes, as generated stories are.
    assert cfg.data.condition_codes_prob == 0.5

    bad = tmp_path / "bad.toml"
    bad.write_text("[recipe]\nstory_repeats = 0\n", encoding="utf-8")
    with pytest.raises(ValueError, match="story_repeats must be an integer >= 1, got 0"):
        stage2_config(bad, first_data, tmp_path / "videos.jsonl", stories, tmp_path / "r", tmp_path / "m")


class _StopAtDecoder(Exception):
    pass


@pytest.mark.parametrize("diamonds", [256, 0])
def test_recipe_gives_the_diamond_videos_to_the_vae_only(tmp_path, monkeypatch, diamonds):
    """make-demo-data is asked for the diamond videos and both VAE stages read them (the transformer's data is the
    captioned videos and stories only). Checked where the decoder stage starts: every command is recorded, none
    run."""
    from infinitystar.demo import recipe
    from infinitystar.train.config import read_config_file

    out, commands = tmp_path / "out", []

    def fake_run(args, log, name, threads=None, processes=1):
        commands.append(list(args))
        if args[0] == "make-demo-data":
            (out / "data").mkdir(parents=True, exist_ok=True)
            for f in ("train.jsonl", "heldout.jsonl", "train_stories.jsonl", "diamond.jsonl"):
                (out / "data" / f).write_text("", encoding="utf-8")
        elif len(commands) == 2:  # the first VAE stage "trains"
            (out / "vae").mkdir()
            (out / "vae" / "vae.safetensors").write_bytes(b"")
        else:
            raise _StopAtDecoder
        return 0.0

    monkeypatch.setattr(recipe, "_run", fake_run)
    with pytest.raises(_StopAtDecoder):
        recipe.run_recipe(out, RecipeOptions(vae_diamond_videos=diamonds))
    make, vae, decoder = commands
    assert make[make.index("--diamond-videos") + 1] == str(diamonds)
    assert vae[:2] == ["train-vae", str(out / "configs" / "vae.json")]
    assert decoder[:2] == ["train-vae", str(out / "configs" / "vae_decoder.json")]
    data = out / "data"
    want = [str(data / "train.jsonl")] + ([str(data / "diamond.jsonl")] if diamonds else [])
    for stage in ("vae.json", "vae_decoder.json"):
        assert read_config_file(out / "configs" / stage)["data"]["paths"] == want
    with pytest.raises(ValueError, match="vae_diamond_videos must be >= 0"):
        RecipeOptions(vae_diamond_videos=-1)


def test_recipe_sampling_defaults_are_written_into_the_model(tmp_path):
    """demo/configs/sampling.toml is a valid SamplingConfig; set_sampling_defaults writes it into a model folder
    (read back by the pipeline), leaves the file alone when it is already there, and refuses an unknown name."""
    from infinitystar.demo.recipe import DEFAULT_CONFIG_DIR, SAMPLING_FILE, set_sampling_defaults
    from infinitystar.pipeline import read_pipeline_config
    from infinitystar.train.config import read_config_file

    values = read_config_file(DEFAULT_CONFIG_DIR / SAMPLING_FILE)["sampling"]
    folder = tmp_path / "m"
    InfinityStarPipeline.from_preset("demo").save_pretrained(folder)
    before = read_pipeline_config(folder)
    assert before.sampling.tau_image != values["tau_image"]  # the change is visible
    set_sampling_defaults(folder, values)
    after = read_pipeline_config(folder)
    assert {k: getattr(after.sampling, k) for k in values} == values
    assert replace(after, sampling=before.sampling) == before  # nothing else changed
    stamp = (folder / "model_index.json").stat().st_mtime_ns
    set_sampling_defaults(folder, values)
    assert (folder / "model_index.json").stat().st_mtime_ns == stamp
    with pytest.raises(TypeError, match="tau"):
        set_sampling_defaults(folder, {"tau": 0.5})


def test_build_base_puts_the_trained_vae_into_the_demo_preset(tmp_path):
    trained = InfinityStarPipeline.from_preset("demo", seed=3)
    trained.save_pretrained(tmp_path / "trained")
    base = InfinityStarPipeline.from_pretrained(build_base(tmp_path / "trained" / "vae" / "model.safetensors",
                                                           tmp_path / "base", seed=0))
    for (k, v), (k2, v2) in zip(base.vae.state_dict().items(), trained.vae.state_dict().items()):
        assert k == k2 and torch.equal(v, v2), k
    # The transformer is the preset's seed-0 initialisation, not the other pipeline's.
    fresh = InfinityStarPipeline.from_preset("demo", seed=0)
    name, weight = next(iter(fresh.transformer.state_dict().items()))
    assert torch.equal(base.transformer.state_dict()[name], weight)
    with pytest.raises((ConfigError, FileNotFoundError, ValueError)):
        build_base(tmp_path / "missing.safetensors", tmp_path / "base2")
    assert not (Path(tmp_path) / "base2" / "model_index.json").exists()

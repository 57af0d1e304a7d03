"""LoRA adapters (transformer.lora): PEFT layout on disk, the pipeline's load/set/fuse API, the CLI's --lora, and
training an adapter with the ordinary trainer."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

pytest.importorskip("peft")

from infinitystar.config import ConfigError  # noqa: E402
from infinitystar.pipeline import InfinityStarPipeline  # noqa: E402
from infinitystar.transformer import lora  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPT = "a red circle moving right"
CALL = dict(num_frames=9, seed=3, output_type="np", progress=False)


def _pipe(seed: int = 0) -> InfinityStarPipeline:
    return InfinityStarPipeline.from_preset("tiny-test", seed=seed)


def _random_adapter(pipe: InfinityStarPipeline, folder, targets=("attention", "mlp", "heads"), seed: int = 1,
                    rank: int = 4, vocabulary=None):
    """An adapter of ``pipe``'s transformer with random A and B (PEFT starts B at 0: no effect), saved to ``folder``."""
    cfg = lora.LoRAConfig(rank=rank, alpha=8.0, targets=targets)
    model = _pipe().transformer  # tiny-test's seed-0 weights: the base the adapter is made for
    identity = lora.base_identity(model)
    lora.add_adapter(model, cfg, "default")
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    lora.save_adapter(folder, model, cfg, base={"name": pipe.config.name, "identity": identity},
                      training={"steps": 0}, vocabulary=vocabulary)
    return cfg


def test_the_adapter_folder_is_peft_s_layout(tmp_path):
    pipe = _pipe()
    _random_adapter(pipe, tmp_path / "a")
    files = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert set(files) == {lora.ADAPTER_WEIGHTS, lora.ADAPTER_CONFIG, lora.ADAPTER_META}
    peft_cfg = json.loads((tmp_path / "a" / lora.ADAPTER_CONFIG).read_text())
    assert peft_cfg["peft_type"] == "LORA" and peft_cfg["r"] == 4 and peft_cfg["lora_alpha"] == 8.0
    from safetensors import safe_open

    with safe_open(str(tmp_path / "a" / lora.ADAPTER_WEIGHTS), framework="pt") as f:
        keys = list(f.keys())  # noqa: SIM118
    assert all(k.startswith("base_model.model.") and (".lora_A." in k or ".lora_B." in k) for k in keys)
    depth = pipe.config.transformer.depth
    assert len(keys) == 2 * (7 * depth + 2)  # A and B of 4 attention + 3 MLP projections per block, 2 heads
    meta = json.loads((tmp_path / "a" / lora.ADAPTER_META).read_text())
    assert meta["base"]["name"] == "tiny-test" and meta["lora"]["rank"] == 4
    # The PEFT reader of another tool finds the same weights under PeftModel's key names.
    import peft

    model = _pipe().transformer
    model = peft.PeftModel(model, peft.LoraConfig(**{k: v for k, v in peft_cfg.items()
                                                     if k in ("r", "lora_alpha", "target_modules")}))
    missing = set(model.state_dict()) - {k.replace(".weight", ".default.weight") for k in keys}
    assert not {k for k in missing if ".lora_" in k}


def test_scale_zero_is_the_base_model_exactly_and_scale_one_changes_it(tmp_path):
    base = _pipe()(PROMPT, **CALL).frames
    pipe = _pipe()
    _random_adapter(pipe, tmp_path / "a")
    name = pipe.load_lora_weights(tmp_path / "a", scale=0.0)
    assert name == "adapter_0" and pipe.lora_adapters == {"adapter_0": 0.0}
    assert np.array_equal(pipe(PROMPT, **CALL).frames, base)
    pipe.set_adapters("adapter_0", 1.0)
    assert not np.array_equal(pipe(PROMPT, **CALL).frames, base)


def test_save_load_gives_the_same_output_and_fused_equals_unfused(tmp_path):
    pipe = _pipe()
    _random_adapter(pipe, tmp_path / "a")
    pipe.load_lora_weights(tmp_path / "a", adapter_name="style")
    again = _pipe()
    again.load_lora_weights(tmp_path / "a", adapter_name="style")
    first = pipe(PROMPT, **CALL).frames
    assert np.array_equal(first, again(PROMPT, **CALL).frames)
    # Fused and unfused step logits agree up to float32 rounding of W + s B A against x W + s (x A) B.
    from conftest import kv_cached_step_logits

    schedule = [(1, 1, 1), (1, 2, 2), (1, 3, 3)]
    unfused = kv_cached_step_logits(pipe.transformer, schedule)
    pipe.fuse_lora()
    fused = kv_cached_step_logits(pipe.transformer, schedule)
    for a, b in zip(unfused, fused):
        # A few ulps of the logits' scale per layer on a 2-block toy model: 1e-4 relative is far above rounding
        # and far below any effect of the adapter (which moves logits by O(1)).
        assert (a - b).abs().max() <= 1e-4 * a.abs().max()
    with pytest.raises(ConfigError, match="unfuse_lora"):
        pipe.load_lora_weights(tmp_path / "a", adapter_name="other")
    pipe.unfuse_lora()
    back = kv_cached_step_logits(pipe.transformer, schedule)
    for a, b in zip(unfused, back):
        assert (a - b).abs().max() <= 1e-4 * a.abs().max()


def test_two_adapters_add_and_set_adapters_chooses(tmp_path):
    pipe = _pipe()
    _random_adapter(pipe, tmp_path / "a", seed=1)
    _random_adapter(pipe, tmp_path / "b", seed=2, targets=("mlp",))
    pipe.load_lora_weights(tmp_path / "a", adapter_name="a")
    only_a = pipe(PROMPT, **CALL).frames
    pipe.load_lora_weights(tmp_path / "b", adapter_name="b", scale=0.5)
    assert pipe.lora_adapters == {"a": 1.0, "b": 0.5}
    both = pipe(PROMPT, **CALL).frames
    assert not np.array_equal(both, only_a)
    pipe.set_adapters(["a"])
    assert np.array_equal(pipe(PROMPT, **CALL).frames, only_a) and pipe.lora_adapters == {"a": 1.0, "b": 0.0}
    with pytest.raises(ValueError, match="no adapter named 'c'"):
        pipe.set_adapters(["c"])


def test_an_adapter_of_another_base_model_is_refused_in_one_line(tmp_path):
    other = _pipe(seed=5)  # same architecture, other weights
    _random_adapter(other, tmp_path / "a")  # made for seed 0's weights, recorded as such
    with pytest.raises(ValueError, match=r"was made for base model 'tiny-test' \(identity [0-9a-f]+\), not for this "
                                         r"pipeline's 'tiny-test' \(identity [0-9a-f]+\)"):
        other.load_lora_weights(tmp_path / "a")
    with pytest.raises(FileNotFoundError, match="has no adapter_model.safetensors"):
        (tmp_path / "empty").mkdir()
        _pipe().load_lora_weights(tmp_path / "empty")
    broken = tmp_path / "broken"
    _random_adapter(_pipe(), broken)
    (broken / lora.ADAPTER_WEIGHTS).write_bytes(b"\x00" * 40)
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        _pipe().load_lora_weights(broken)
    with pytest.raises(ValueError, match="LoRA rank must be an integer >= 1"):
        lora.LoRAConfig(rank=0)
    with pytest.raises(ValueError, match="matches no linear layer"):
        lora.add_adapter(_pipe().transformer, lora.LoRAConfig(targets=("blocks\\.9\\..*",)))


def _unknown_word_warnings(pipe: InfinityStarPipeline) -> list[str]:
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pipe(PROMPT, **CALL)
    return [str(w.message) for w in caught if "was not trained on" in str(w.message)]


def test_an_active_adapter_teaches_the_words_of_its_captions(tmp_path):
    """A closed-vocabulary model warns about a word it never saw; an adapter trained on that word records it, and
    while the adapter is active (weight != 0) the word is known; at weight 0 the warning is back."""
    from infinitystar.text import word_tokens

    pipe = _pipe()
    pipe.text_encoder.vocabulary = tuple(w for w in word_tokens(PROMPT) if w != "circle")
    assert "'circle'" in " ".join(_unknown_word_warnings(pipe))
    _random_adapter(pipe, tmp_path / "a", vocabulary=["circle", "a"])
    assert json.loads((tmp_path / "a" / lora.ADAPTER_META).read_text())["vocabulary"] == ["a", "circle"]
    name = pipe.load_lora_weights(tmp_path / "a")
    assert "circle" in pipe.capabilities.vocabulary and _unknown_word_warnings(pipe) == []
    pipe.set_adapters([name], [0.0])
    assert "circle" not in pipe.capabilities.vocabulary and len(_unknown_word_warnings(pipe)) == 1

    meta = json.loads((tmp_path / "a" / lora.ADAPTER_META).read_text())
    (tmp_path / "a" / lora.ADAPTER_META).write_text(json.dumps({**meta, "vocabulary": "circle"}))
    with pytest.raises(ValueError, match="'vocabulary' must be a list of words"):
        _pipe().load_lora_weights(tmp_path / "a")


# ----------------------------------------------------------------------------------------------- training


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    """8 captioned 1 s clips cached as latents of the tiny-test pipeline's VAE (seed 0, the trainer's base)."""
    from infinitystar.demo.synthetic import make_dataset
    from infinitystar.train.config import DataConfig
    from infinitystar.train.features import extract_features

    root = tmp_path_factory.mktemp("lora_data")
    jsonl = make_dataset(root, n_clips=8, seed=0, size=64, frames=17)
    data = DataConfig(jsonl=(str(jsonl),), cache_dir=str(root / "cache"), max_seconds=0)
    assert extract_features(data, _pipe().config, _pipe().vae, progress=False).written == 8
    return data


def _lora_run(data, out, steps: int, **lora_fields):
    from dataclasses import replace

    from infinitystar.train.config import TrainConfig, config_from_dict

    cfg = config_from_dict(TrainConfig, {
        "out_dir": str(out), "model": {"pipeline": "tiny-test"}, "training": {"steps": steps, "batch_size": 2},
        "optimizer": {"lr": 1e-2}, "checkpoint": {"every": 4, "keep_last_k": 3}, "scale_subsets": {"var_len": False},
        "parallelism": {"activation_checkpointing": False, "device": "cpu"},
        "lora": {"enabled": True, "rank": 4, "alpha": 4.0, **lora_fields}})
    return replace(cfg, data=data)


def test_lora_training_lowers_the_loss_never_writes_the_base_and_resumes_exactly(tiny_data, tmp_path):
    from infinitystar.train import checkpointing
    from infinitystar.train.safe_dcp import read_metadata
    from infinitystar.train.trainer import Trainer, export_run

    straight = Trainer(_lora_run(tiny_data, tmp_path / "a", 12), progress=False)
    base_before = {k: v.clone() for k, v in straight.model.state_dict().items() if ".lora_" not in k}
    trainable = [n for n, p in straight.model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_" in n for n in trainable)
    losses = straight.run().losses
    assert sum(losses[s] for s in range(9, 13)) / 4 < sum(losses[s] for s in range(1, 5)) / 4 - 0.01, losses
    for k, v in straight.model.state_dict().items():  # the base weights did not move
        if ".lora_" not in k:
            assert torch.equal(v, base_before[k]), k
    # The checkpoints hold the adapter and its optimizer state, no base weight.
    ckpt = checkpointing.latest_checkpoint(tmp_path / "a" / "checkpoints")
    keys = set(read_metadata(ckpt).state_dict_metadata)
    model_keys = [k for k in keys if k.startswith("model.")]
    assert len(model_keys) == len(trainable) and all(".lora_" in k for k in model_keys)

    # 8 steps, stop, resume to 12: the same losses and adapter as the straight run.
    Trainer(_lora_run(tiny_data, tmp_path / "b", 8), progress=False).run()
    resumed = Trainer(_lora_run(tiny_data, tmp_path / "b", 12), progress=False)
    assert resumed.step == 8
    again = resumed.run().losses
    assert [again[s] for s in range(9, 13)] == [losses[s] for s in range(9, 13)]
    for (k, v), (k2, v2) in zip(straight.model.state_dict().items(), resumed.model.state_dict().items()):
        assert k == k2 and torch.equal(v, v2), k

    # export writes the adapter folder; the base pipeline loads it and generates with it.
    folder = export_run(tmp_path / "a", tmp_path / "adapter")
    adapter = lora.read_adapter(folder)
    total = sum(p.numel() for p in _pipe().transformer.parameters())
    assert adapter.meta["parameters"] == sum(v.numel() for v in adapter.weights.values()) < total // 10
    pipe = _pipe()
    base = pipe(PROMPT, **CALL).frames
    pipe.load_lora_weights(folder)
    assert not np.array_equal(pipe(PROMPT, **CALL).frames, base)


def test_export_records_the_caption_words_for_a_closed_vocabulary_base(tiny_data, tmp_path):
    """The adapter of a run on a word-encoder base lists the words of the run's captions (and a T5/bytes base none)."""
    from dataclasses import replace

    from infinitystar.text import write_vocabulary
    from infinitystar.train.data import caption_words
    from infinitystar.train.trainer import Trainer, export_run

    base = _pipe()
    base.config = replace(base.config, text_encoder="words")
    base.save_pretrained(tmp_path / "base")
    write_vocabulary(tmp_path / "base" / "text_encoder", ["a", "moving"])
    cfg = _lora_run(tiny_data, tmp_path / "run", 2)
    cfg = replace(cfg, model=replace(cfg.model, pipeline=str(tmp_path / "base")))
    Trainer(cfg, progress=False).run()
    meta = json.loads((export_run(tmp_path / "run", tmp_path / "adapter") / lora.ADAPTER_META).read_text())
    assert meta["vocabulary"] == caption_words(tiny_data.jsonl[0]) and "circle" in meta["vocabulary"]


def test_lora_config_errors_are_one_line():
    from infinitystar.train.config import TrainConfig, config_from_dict

    with pytest.raises(ConfigError, match="lora: LoRA rank must be an integer >= 1"):
        config_from_dict(TrainConfig, {"lora": {"enabled": True, "rank": 0}})
    with pytest.raises(ConfigError, match="an EMA of the adapter is not supported"):
        config_from_dict(TrainConfig, {"lora": {"enabled": True}, "training": {"ema_decay": 0.9}})


# ----------------------------------------------------------------------------------------------- command line


def test_cli_lora_option_scales_records_and_replays(tmp_path, capsys):
    from infinitystar import media
    from infinitystar.cli import main
    from infinitystar.outputs import read_record

    _random_adapter(_pipe(), tmp_path / "a")
    common = ["generate", PROMPT, "--preset", "tiny-test", "--frames", "9", "--seed", "3", "--quiet"]
    assert main([*common, "-o", str(tmp_path / "base.mp4")]) == 0
    assert main([*common, "--lora", f"{tmp_path / 'a'}:0", "-o", str(tmp_path / "zero.mp4")]) == 0
    assert main([*common, "--lora", str(tmp_path / "a"), "-o", str(tmp_path / "one.mp4")]) == 0
    base, zero, one = (media.read_video(tmp_path / f"{n}.mp4")[0] for n in ("base", "zero", "one"))
    assert np.array_equal(base, zero) and not np.array_equal(base, one)
    assert read_record(tmp_path / "one.mp4").loras == (str(tmp_path / "a"),)
    assert main(["generate", "--from-json", str(tmp_path / "one.json"), "-o", str(tmp_path / "again.mp4"),
                 "--quiet"]) == 0
    assert np.array_equal(media.read_video(tmp_path / "again.mp4")[0], one)
    capsys.readouterr()
    assert main([*common, "--lora", str(tmp_path / "missing"), "-o", str(tmp_path / "x.mp4")]) != 0
    err = capsys.readouterr().err
    assert "is not a folder" in err and len(err.strip().splitlines()) == 1
    assert lora.parse_lora_spec("runs/a:0.5") == ("runs/a", 0.5)
    assert lora.parse_lora_spec("C:/x/ad") == ("C:/x/ad", 1.0)


def test_lora_with_fsdp_on_two_processes_matches_one(tiny_data, tmp_path):
    """FSDP2 shards each block's parameters, the frozen base and the adapter alike; the adapter trains as on one
    process and exports from the sharded checkpoint."""
    import os
    import socket
    import subprocess
    import sys
    from dataclasses import asdict
    from pathlib import Path

    from infinitystar.train.runlog import step_losses

    def config(out, batch):
        cfg = asdict(_lora_run(tiny_data, out, 4))
        cfg["training"]["batch_size"] = batch
        cfg["checkpoint"]["every"] = 4
        path = tmp_path / f"{Path(out).name}.json"
        path.write_text(json.dumps(cfg, default=list))
        return path

    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1] / "src") + os.pathsep + env.get("PYTHONPATH", "")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torchrun = str(Path(sys.executable).with_name("torchrun"))
    two_cfg = config(tmp_path / "two", 1)
    two = subprocess.run([torchrun, "--nnodes", "1", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
                          "--master_port", str(port), "-m", "infinitystar.cli", "train", str(two_cfg), "--quiet"],
                         env=env, capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stdout[-2000:] + two.stderr[-2000:]
    one = subprocess.run([sys.executable, "-m", "infinitystar.cli", "train", str(config(tmp_path / "one", 2)),
                          "--quiet"], env=env, capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stdout[-2000:] + one.stderr[-2000:]
    a, b = step_losses(tmp_path / "one" / "train_log.jsonl"), step_losses(tmp_path / "two" / "train_log.jsonl")
    # As the full fine-tune's test (test_trainer.py): one packed sequence of 2 and two of 1 round differently; the
    # losses of 4 steps stay within 1e-5 (~170 float32 ulps of a ~0.69 loss).
    assert sorted(a) == sorted(b) == [1, 2, 3, 4]
    assert all(abs(a[s] - b[s]) <= 1e-5 for s in a), (a, b)
    assert len(list((tmp_path / "two" / "checkpoints" / "step_00000004").glob("*.distcp"))) == 2
    from infinitystar.train.trainer import export_run

    adapter = lora.read_adapter(export_run(tmp_path / "two", tmp_path / "adapter"))
    assert adapter.meta["base"]["identity"] == lora.base_identity(_pipe().transformer)


def test_the_base_identity_ignores_the_precision_the_weights_are_held_in():
    pipe = _pipe()
    fp32 = lora.base_identity(pipe.transformer)
    pipe.set_precision("bf16")
    assert pipe.dtype == torch.bfloat16
    assert lora.base_identity(pipe.transformer) == fp32 != lora.base_identity(_pipe(seed=5).transformer)


def test_the_demo_lora_recipe_reads_the_world_its_base_learned(tmp_path):
    from infinitystar.demo.lora import base_world
    from infinitystar.demo.synthetic import make_dataset, read_ground_truth

    assert base_world(tmp_path) == "in-frame"  # no training_source.json: the earlier world
    (tmp_path / "training_source.json").write_text('{"step": 1, "world": "torus"}', encoding="utf-8")
    assert base_world(tmp_path) == "torus"
    (tmp_path / "training_source.json").write_text("{not json", encoding="utf-8")
    assert base_world(tmp_path) == "in-frame"
    # The in-frame world renders both new words too (the adapter's data for an in-frame base).
    jsonl = make_dataset(tmp_path / "d", 3, seed=0, size=32, frames=5, split="diamond")
    assert [t[1] for _, t in read_ground_truth(jsonl)] == ["diamond"] * 3
    jsonl = make_dataset(tmp_path / "d", 3, seed=0, size=32, frames=5, split="still")
    assert [t[2] for _, t in read_ground_truth(jsonl)] == ["still"] * 3


def test_the_demo_lora_recipe_knows_its_words():
    from infinitystar.demo.evaluate import parse_prompt
    from infinitystar.demo.lora import NEW_WORDS, LoRADemoOptions, new_word_prompts
    from infinitystar.demo.synthetic import triples_for_split

    assert NEW_WORDS == ("still", "diamond") and LoRADemoOptions().word == "still"
    for word in NEW_WORDS:
        prompts = new_word_prompts(word)
        assert [parse_prompt(p) for p in prompts] == list(triples_for_split(word))
        assert all(word in p for p in prompts)
    with pytest.raises(ValueError, match="word must be one of still, diamond, got 'orange'"):
        LoRADemoOptions(word="orange")


@pytest.mark.slow
def test_the_demo_lora_recipe_runs_end_to_end(tmp_path):
    """train-demo-lora on a toy budget: data, features, LoRA training on the shipped model, export, the judge
    before and after (the figures of the full budget are in the README)."""
    from infinitystar.demo import DEMO_WEIGHTS
    from infinitystar.demo.lora import LoRADemoOptions, base_world, run_lora_demo

    if not (DEMO_WEIGHTS / "model_index.json").is_file():
        pytest.skip("the demo weights are not shipped in this tree")
    result = run_lora_demo(tmp_path, LoRADemoOptions(videos=8, replay=8, steps=4, batch_size=2, eval_limit=1,
                                                     eval_clips_per_prompt=1))
    assert result["word"] == "still"  # the default word: a shape that does not move
    for when in ("before", "after"):
        assert set(result[when]) == {"new_word", "old_vocabulary"}
        assert result[when]["new_word"]["still"]["n"] == 1
    assert 0 < result["adapter_parameters"] < result["model_parameters"] // 10
    assert result["adapter_bytes"] < 1 << 20
    assert lora.read_adapter(tmp_path / "adapter").base["name"] == "demo"
    # The adapter's videos are of the world the base learned (the shipped weights: the torus world, or the earlier
    # in-frame one whose rows have one direction and never wrap).
    world = base_world(DEMO_WEIGHTS)
    for name in ("still.jsonl", "train.jsonl"):
        demo = json.loads((tmp_path / "data" / name).read_text().splitlines()[0])["demo"]
        assert (demo.get("world") == "torus") == (world == "torus"), (name, demo)
    again = run_lora_demo(tmp_path, LoRADemoOptions(videos=8, replay=8, steps=4))  # done: read back, not rerun
    assert again == json.loads((tmp_path / "report.json").read_text())

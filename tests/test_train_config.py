"""The training configs (``infinitystar.train.config``): nested sections, one loader, shared sections.

Expected defaults are the ones the docstrings derive from the reference (training spec sections 5 and 9 for the
transformer: AdamW 4e-5, betas (0.9, 0.97), clip 5; the VAE: Adam betas (0.9, 0.95), lr 1e-4, clip 1.0), typed here
rather than read from the code.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import pytest

from infinitystar.config import ConfigError
from infinitystar.train.commands import add_run_arguments, run_overrides
from infinitystar.train.config import (
    OptimizerConfig,
    TrainConfig,
    VAETrainConfig,
    config_from_dict,
    config_to_dict,
    load_config,
    read_config_file,
    with_overrides,
)

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(("cls", "path"), [
    (TrainConfig, "configs/train_tiny.toml"),
    (TrainConfig, "src/infinitystar/demo/configs/transformer.toml"),
    (VAETrainConfig, "src/infinitystar/demo/configs/vae.toml"),
    (VAETrainConfig, "src/infinitystar/demo/configs/vae_decoder.toml"),
])
def test_shipped_configs_load_and_round_trip_through_json(cls, path):
    cfg = load_config(cls, REPO / path)
    # A run folder's train_config.json (nested plain data) reads back to the same config.
    assert config_from_dict(cls, json.loads(json.dumps(config_to_dict(cfg)))) == cfg


def test_each_trainer_keeps_its_own_defaults_in_the_shared_sections(tmp_path):
    t = TrainConfig()
    assert (t.optimizer.lr, t.optimizer.betas, t.optimizer.grad_clip, t.optimizer.min_lr_ratio) == (
        4e-5, (0.9, 0.97), 5.0, 0.0)
    assert (t.checkpoint.every, t.checkpoint.keep_last_k, t.logging.every, t.parallelism.device) == (200, 3, 1, "auto")
    # A VAE file that sets only the learning rate keeps the VAE's betas, clip and floor, not the transformer's.
    path = tmp_path / "vae.toml"
    path.write_text('[model]\nvae_preset = "tiny-test"\n[optimizer]\nlr = 2e-3\n', encoding="utf-8")
    v = load_config(VAETrainConfig, path)
    assert (v.optimizer.lr, v.optimizer.betas, v.optimizer.grad_clip, v.optimizer.min_lr_ratio) == (
        2e-3, (0.9, 0.95), 1.0, 0.1)
    assert (v.checkpoint.every, v.checkpoint.keep_last_k, v.logging.every, v.parallelism.device) == (500, 2, 10, "cpu")


def test_bad_keys_and_values_are_named_with_their_section(tmp_path):
    path = tmp_path / "run.toml"
    cases = [
        ('[optimizer]\nlrr = 1\n', "optimizer.lrr"),           # unknown key, named with its section
        ('[training]\nlr = 1e-3\n', "training.lr"),            # a key in the wrong section
        ('steps = 3\n', "steps"),                              # an old flat key
        ('optimizer = 3\n', "optimizer must be a table"),      # a section that is not a table
        ('[optimizer]\nschedule = "step"\n', "optimizer.schedule"),
        ('[checkpoint]\nevery = 0\n', "checkpoint.every"),
        ('[training]\nsteps = "ten"\n', "training.steps"),
    ]
    for text, message in cases:
        path.write_text(text, encoding="utf-8")
        with pytest.raises(ConfigError, match=message):
            load_config(TrainConfig, path)
    path.write_text("[optimizer\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="is not valid TOML"):
        read_config_file(path)
    (tmp_path / "run.yaml").write_text("a: 1\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="must end in .toml or .json"):
        read_config_file(tmp_path / "run.yaml")
    with pytest.raises(FileNotFoundError, match="missing.toml"):
        read_config_file(tmp_path / "missing.toml")
    # Overrides are validated by their section, like a file's values.
    with pytest.raises(ConfigError, match="optimizer.lr"):
        with_overrides(TrainConfig(), {"optimizer.lr": -1.0})


def test_vae_paths_are_relative_to_the_file_and_overrides_use_dotted_names(tmp_path):
    folder = tmp_path / "cfg"
    folder.mkdir()
    path = folder / "vae.json"
    path.write_text(json.dumps({"out_dir": "run", "model": {"vae_preset": "tiny-test", "init_checkpoint": "w.pth"},
                                "data": {"paths": "clips", "eval_paths": ["/abs/held"]}}), encoding="utf-8")
    cfg = load_config(VAETrainConfig, path, {"training.steps": 7})
    assert cfg.out_dir == str(folder / "run") and cfg.model.init_checkpoint == str(folder / "w.pth")
    assert cfg.data.paths == (str(folder / "clips"),) and cfg.data.eval_paths == ("/abs/held",)
    assert cfg.training.steps == 7
    # The command line's shared arguments name the same fields for both trainers.
    parser = argparse.ArgumentParser()
    add_run_arguments(parser, checkpoint_kind="file")
    args = parser.parse_args(["c.toml", "--steps", "3", "--out-dir", "o", "--device", "cpu", "--resume", "none"])
    assert run_overrides(args) == {"training.steps": 3, "out_dir": "o", "parallelism.device": "cpu"}
    assert args.resume == "none"


def test_one_lr_schedule_for_both_trainers():
    # Warm-up: step s < W runs at lr * (s + 1) / W; then cosine from lr to lr * r over the remaining steps, so the
    # midpoint is the mean of the two ends and the last step (progress 1) reaches the floor.
    opt = OptimizerConfig(lr=2.0, schedule="cosine", warmup_steps=2, min_lr_ratio=0.25)
    assert [opt.lr_at(s, 12) for s in (0, 1)] == [1.0, 2.0]
    assert opt.lr_at(7, 12) == pytest.approx((2.0 + 0.5) / 2)
    assert opt.lr_at(12, 12) == pytest.approx(0.5) and opt.lr_at(50, 12) == pytest.approx(0.5)
    # A quarter of a 10-step run (8 steps after warm-up): lr_low + (lr - lr_low) * (1 + cos(pi / 4)) / 2.
    assert opt.lr_at(4, 10) == pytest.approx(0.5 + 1.5 * (1 + math.cos(math.pi / 4)) / 2)

"""The transformer trainer: loss falls, exact resume after SIGKILL, checkpoints, FSDP2 parity, export.

Data: the synthetic demo clips (``demo.synthetic``) encoded by the tiny-test preset's VAE through the
real feature extraction, one latent frame each (``max_seconds = 0`` keeps the first frame: the 6-scale
image pyramid of 91 tokens), so a step takes a fraction of a second on a loaded CPU. Runs that must be
killed or use two processes are subprocesses of the real CLI (``python -m infinitystar.cli train`` and
``torchrun``), exactly as the README shows.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import adam_step_bound
from infinitystar.config import ConfigError
from infinitystar.train import checkpointing
from infinitystar.train.config import (
    DataConfig,
    OptimizerConfig,
    TrainConfig,
    config_from_dict,
    load_config,
    with_overrides,
)
from infinitystar.train.ema import EMA
from infinitystar.train.runlog import read_log, step_losses
from infinitystar.train.trainer import Trainer, export_run

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable
TORCHRUN = str(Path(sys.executable).with_name("torchrun"))


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> DataConfig:
    """8 captioned clips, cached as latents of the tiny-test pipeline's VAE (seed 0, as the trainer builds it)."""
    from infinitystar.demo.synthetic import make_dataset
    from infinitystar.pipeline import InfinityStarPipeline
    from infinitystar.train.features import extract_features

    root = tmp_path_factory.mktemp("train_data")
    jsonl = make_dataset(root, n_clips=8, seed=0, size=64, frames=17)
    data = DataConfig(jsonl=(str(jsonl),), cache_dir=str(root / "cache"), max_seconds=0)
    pipe = InfinityStarPipeline.from_preset("tiny-test", seed=0)
    stats = extract_features(data, pipe.config, pipe.vae, progress=False)
    assert stats.written == 8, stats.summary()
    return data


def _config(data: DataConfig, out: Path, changes: dict | None = None) -> dict:
    """A run's config as plain data (one dict per section); ``changes`` replace fields by dotted name."""
    cfg = {"out_dir": str(out), "model": {"pipeline": "tiny-test"}, "training": {"steps": 8, "batch_size": 2},
           "optimizer": {"lr": 2e-3}, "checkpoint": {"every": 4, "keep_last_k": 2},
           "scale_subsets": {"var_len": False}, "parallelism": {"activation_checkpointing": False, "device": "cpu"},
           "data": {"jsonl": list(data.jsonl), "cache_dir": data.cache_dir,
                    "max_seconds": data.max_seconds}}
    for dotted, value in (changes or {}).items():
        *sections, key = dotted.split(".")
        table = cfg
        for name in sections:
            table = table.setdefault(name, {})
        table[key] = value
    return cfg


def _train_config(data: DataConfig, out: Path, changes: dict | None = None) -> TrainConfig:
    return dataclasses.replace(config_from_dict(TrainConfig, _config(data, out, changes)), data=data)


def _write_config(path: Path, cfg: dict) -> Path:
    path.write_text(json.dumps(cfg))
    return path


def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO / "src") + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = "1"
    return env


def _cli_train(config: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([PY, "-m", "infinitystar.cli", "train", str(config), "--quiet", *extra], env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _finish(proc: subprocess.Popen, timeout: float = 240) -> str:
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ----------------------------------------------------------------------------------------------
# Config and pure pieces
# ----------------------------------------------------------------------------------------------


def test_config_from_toml_and_unknown_keys(tmp_path):
    good = tmp_path / "run.toml"
    good.write_text('[training]\nsteps = 12\n[optimizer]\nlr = 1e-4\nbetas = [0.9, 0.95]\n'
                    '[data]\njsonl = ["a.jsonl"]\ncache_dir = "c"\n')
    cfg = load_config(TrainConfig, str(good))
    assert (cfg.training.steps, cfg.optimizer.lr, cfg.optimizer.betas, cfg.data.jsonl, cfg.data.cache_dir) == (
        12, 1e-4, (0.9, 0.95), ("a.jsonl",), "c")
    # The reference's optimiser and schedule by default.
    d = TrainConfig()
    o = d.optimizer
    assert (o.betas, o.eps, o.weight_decay, o.schedule, o.warmup_steps, d.training.ema_decay, o.grad_clip) == (
        (0.9, 0.97), 1e-8, 0.0, "constant", 0, 0.0, 5.0)
    bad = tmp_path / "bad.toml"
    bad.write_text("stepz = 3\n")
    with pytest.raises(ConfigError, match="stepz"):
        load_config(TrainConfig, str(bad))
    bad.write_text('[data]\ncache_dri = "x"\n')
    with pytest.raises(ConfigError, match="data.cache_dri"):
        load_config(TrainConfig, str(bad))
    bad.write_text('[training]\nsteps = 3\nlr = 1e-4\n')  # a field in the wrong section is named with its path
    with pytest.raises(ConfigError, match="training.lr"):
        load_config(TrainConfig, str(bad))
    with pytest.raises(ConfigError, match="optimizer.schedule"):
        OptimizerConfig(schedule="step")


def test_example_config_loads_and_data_takes_its_pyramid_from_the_pipeline():
    cfg = load_config(TrainConfig, str(REPO / "configs" / "train_tiny.toml"))
    assert cfg.model.pipeline == "models/tiny-base" and cfg.scale_subsets.var_len is False
    # An older config that still names a pipeline fact in [data] fails naming where the value comes from now.
    with pytest.raises(ConfigError, match=r"^data\.num_scales is no longer .* comes from the pipeline \(model\.pipe"):
        config_from_dict(TrainConfig, {"data": {"num_scales": 6}})


def test_lr_schedule():
    assert [OptimizerConfig(lr=1.0).lr_at(s, 10) for s in (0, 5, 9)] == [1.0, 1.0, 1.0]
    warm = OptimizerConfig(lr=1.0, warmup_steps=4, schedule="linear", min_lr_ratio=0.5)
    # Warmup 1/4 .. 4/4, then linear from 1 to 0.5 over the remaining 6 steps.
    assert [warm.lr_at(s, 10) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert warm.lr_at(7, 10) == pytest.approx(1.0 - 0.5 * 3 / 6)
    cos = OptimizerConfig(lr=2.0, schedule="cosine")
    assert cos.lr_at(5, 10) == pytest.approx(1.0) and cos.lr_at(10, 10) == pytest.approx(0.0)


def test_ema_update_formula():
    lin = torch.nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        lin.weight.fill_(1.0)
    ema = EMA(lin, 0.75)
    for value in (3.0, 5.0):
        with torch.no_grad():
            lin.weight.fill_(value)
        ema.update(lin)
    # 1 -> 0.75*1 + 0.25*3 = 1.5 -> 0.75*1.5 + 0.25*5 = 2.375
    assert ema.state_dict()["weight"].item() == pytest.approx(2.375)


# ----------------------------------------------------------------------------------------------
# Training in this process: the loss falls, checkpoints are pruned, partial saves are ignored
# ----------------------------------------------------------------------------------------------


def test_loss_falls_and_checkpoints_are_kept_and_resumed(tiny_data, tmp_path):
    # One thread: on a shared 2-core machine two OpenMP threads are several times slower for this tiny model.
    torch.set_num_threads(1)
    run = tmp_path / "run"
    cfg = _train_config(tiny_data, run, {"training.steps": 30, "checkpoint.every": 10, "checkpoint.keep_last_k": 2})
    result = Trainer(cfg, progress=False).run()
    losses = [result.losses[s] for s in range(1, 31)]
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    # Random bits give ln 2 = 0.693; the tiny model learns the latents' bit statistics quickly.
    assert losses[0] == pytest.approx(0.693, abs=0.03)
    assert last < first - 0.05, losses
    records = [r for r in read_log(run / "train_log.jsonl") if r.get("event") == "step"]
    assert len(records) == 30 and all(r["samples"] == 2 and r["per_scale"] for r in records)
    assert set(records[-1]["per_scale"]) == {f"t00.0s/s{i:03d}" for i in range(6)}

    # keep_last_k = 2: of 10, 20, 30 only the last two remain.
    ckpts = checkpointing.complete_checkpoints(run / "checkpoints")
    assert [s for s, _ in ckpts] == [20, 30]

    # A save interrupted after writing shards (a .tmp folder) and a folder that lost its marker are ignored.
    ckpt30 = ckpts[-1][1]
    junk = run / "checkpoints" / "step_00000040.tmp"
    junk.mkdir()
    for f in ckpt30.iterdir():
        if f.name != checkpointing.COMPLETE_FILE:
            (junk / f.name).write_bytes(f.read_bytes())
    (run / "checkpoints" / "step_00000050").mkdir()
    assert checkpointing.latest_checkpoint(run / "checkpoints") == ckpt30
    resumed = Trainer(with_overrides(cfg, {"training.steps": 32}), progress=False)
    assert resumed.step == 30 and resumed.resumed_from == 30
    # The resumed model holds the weights of step 30 (exported from the checkpoint by DCP).
    from infinitystar.pipeline import InfinityStarPipeline

    ref = InfinityStarPipeline.from_preset("tiny-test", seed=0).transformer
    checkpointing.load_model_weights(ckpt30, ref)
    for name, p in resumed.model.state_dict().items():
        assert torch.equal(p, ref.state_dict()[name]), name


def test_bad_resume_leaves_the_run_and_damaged_checkpoints_are_skipped(tiny_data, tmp_path, capsys):
    """Issue 16 items 3-4: ``--resume <missing>`` into an existing run fails before the run's saved config is
    touched; a truncated newest checkpoint is skipped (and named) for the newest loadable one."""
    torch.set_num_threads(1)
    run = tmp_path / "run"
    cfg = _train_config(tiny_data, run, {"training.steps": 8, "checkpoint.every": 4, "checkpoint.keep_last_k": 2})
    Trainer(cfg, progress=False).run()
    saved_config = (run / "train_config.json").read_bytes()
    other = with_overrides(cfg, {"optimizer.lr": 0.5})
    with pytest.raises(ValueError, match=r"cannot resume from .*nowhere: .*does not exist"):
        Trainer(other, resume=str(tmp_path / "nowhere"), progress=False)
    assert (run / "train_config.json").read_bytes() == saved_config

    (_, ckpt4), (_, ckpt8) = checkpointing.complete_checkpoints(run / "checkpoints")
    shard = next(f for f in ckpt8.iterdir() if f.suffix == ".distcp")
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    capsys.readouterr()
    resumed = Trainer(with_overrides(cfg, {"training.steps": 10}), progress=False)
    assert resumed.step == 4
    err = capsys.readouterr().err
    assert f"skipped checkpoint {ckpt8}: its shard {shard.name} is truncated" in err
    record = [r for r in read_log(run / "train_log.jsonl") if r.get("event") == "resume"][-1]
    assert record["checkpoint"] == str(ckpt4) and record["skipped"][0]["checkpoint"] == str(ckpt8)

    (ckpt4 / ".metadata").write_bytes(b"")
    with pytest.raises(ValueError, match="every checkpoint in .* is damaged"):
        Trainer(cfg, progress=False)


# ----------------------------------------------------------------------------------------------
# SIGKILL mid-run, then resume: the same later losses as an uninterrupted run
# ----------------------------------------------------------------------------------------------


def test_sigkill_then_resume_gives_identical_losses(tiny_data, tmp_path):
    steps = 16
    full_cfg = _write_config(tmp_path / "full.json", _config(tiny_data, tmp_path / "full", {"training.steps": steps}))
    kill_cfg = _write_config(tmp_path / "kill.json", _config(tiny_data, tmp_path / "kill", {"training.steps": steps}))
    reference = _cli_train(full_cfg)
    victim = _cli_train(kill_cfg)
    first_ckpt = tmp_path / "kill" / "checkpoints" / "step_00000004"
    deadline = time.monotonic() + 180
    while not first_ckpt.is_dir() and victim.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert victim.poll() is None, "the run ended before it could be killed: " + victim.communicate()[0]
    victim.send_signal(signal.SIGKILL)
    victim.communicate()
    assert victim.returncode == -signal.SIGKILL
    killed_at = max(step_losses(tmp_path / "kill" / "train_log.jsonl"), default=0)
    assert killed_at < steps, "killed after the last step"
    ref_out = _finish(reference)
    assert f"trained to step {steps}" in ref_out

    resumed_out = _finish(_cli_train(kill_cfg))  # the same command: --resume auto
    assert f"trained to step {steps}" in resumed_out
    log = read_log(tmp_path / "kill" / "train_log.jsonl")
    resumes = [r for r in log if r.get("event") == "resume"]
    assert len(resumes) == 1 and resumes[0]["step"] >= 4
    ref_losses = step_losses(tmp_path / "full" / "train_log.jsonl")
    got = step_losses(tmp_path / "kill" / "train_log.jsonl")  # the last record of each step wins
    later = range(resumes[0]["step"] + 1, steps + 1)
    # Exact: same data positions, per-sample generators, optimizer state and deterministic CPU kernels.
    assert [got[s] for s in later] == [ref_losses[s] for s in later]
    assert [got[s] for s in range(1, killed_at + 1)] == [ref_losses[s] for s in range(1, killed_at + 1)]


# The moments of a run a SIGKILL can hit, each injected in the victim process itself (the training code is not
# touched): the victim runs the real CLI after patching one function to kill its own process at that moment.
_KILL_HOOKS = {
    # After step 6's log record, between two steps (the step-4 checkpoint is the one to resume from).
    "between steps": ("infinitystar.train.runlog", "append_record",
                      "lambda args, kw: args[1].get('event') == 'step' and args[1].get('step') == 6"),
    # Mid-checkpoint: step 8's shards are written, its complete.json is not (the .tmp folder stays behind).
    "shards written, no marker": ("infinitystar.train.checkpointing", "atomic_write_json",
                                  "lambda args, kw: 'step_00000008' in str(args[0])"),
    # Mid-checkpoint: the marker is written, the folder not yet renamed from .tmp.
    "marker written, not renamed": ("infinitystar.train.checkpointing.os", "replace",
                                    "lambda args, kw: str(args[0]).endswith('step_00000008.tmp')"),
}
_VICTIM = """
import importlib, os, signal, sys
module = importlib.import_module({module!r})
real = getattr(module, {name!r})
when = {when}
def hooked(*args, **kw):
    if when(args, kw):
        os.kill(os.getpid(), signal.SIGKILL)
    return real(*args, **kw)
setattr(module, {name!r}, hooked)
from infinitystar.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.fixture(scope="module")
def reference_run(tiny_data, tmp_path_factory):
    """Step losses of an uninterrupted 12-step run (checkpoints every 4 steps)."""
    root = tmp_path_factory.mktemp("reference_run")
    cfg = _write_config(root / "full.json", _config(tiny_data, root / "full", {"training.steps": 12}))
    _finish(_cli_train(cfg))
    return step_losses(root / "full" / "train_log.jsonl")


@pytest.mark.parametrize("moment", list(_KILL_HOOKS))
def test_sigkill_at_any_moment_then_resume_is_exact(moment, tiny_data, reference_run, tmp_path):
    """Issue 16: kill -9 between steps and at two points inside a checkpoint write; the same command resumes from
    the newest complete checkpoint (step 4 or 8) and every later loss equals the uninterrupted run's."""
    cfg = _write_config(tmp_path / "kill.json", _config(tiny_data, tmp_path / "kill", {"training.steps": 12}))
    module, name, when = _KILL_HOOKS[moment]
    if module.endswith(".os"):  # patch os.replace as the checkpointing module sees it
        module = "os"
    victim = subprocess.run([PY, "-c", _VICTIM.format(module=module, name=name, when=when), "train", str(cfg),
                             "--quiet"], env=_env(), capture_output=True, text=True, timeout=240)
    assert victim.returncode == -signal.SIGKILL, victim.stdout + victim.stderr
    ckpts = tmp_path / "kill" / "checkpoints"
    assert [s for s, _ in checkpointing.complete_checkpoints(ckpts)] == [4]  # 8 never completed
    out = _finish(_cli_train(cfg))
    assert "trained to step 12" in out
    resumes = [r for r in read_log(tmp_path / "kill" / "train_log.jsonl") if r.get("event") == "resume"]
    assert [r["step"] for r in resumes] == [4]
    got = step_losses(tmp_path / "kill" / "train_log.jsonl")
    assert [got[s] for s in range(1, 13)] == [reference_run[s] for s in range(1, 13)]
    assert not list(ckpts.glob("*.tmp")), "the interrupted checkpoint's .tmp folder was left behind"


# ----------------------------------------------------------------------------------------------
# Two processes with FSDP2 (gloo) == one process on the same global batch; then export -> generate
# ----------------------------------------------------------------------------------------------


def test_fsdp_two_processes_match_one_then_export_and_generate(tiny_data, tmp_path):
    steps = 5
    one = _write_config(tmp_path / "one.json", _config(tiny_data, tmp_path / "one", {
        "training.steps": steps, "training.batch_size": 2, "checkpoint.every": 5, "training.ema_decay": 0.5}))
    # Two ranks of one sample each, with activation checkpointing: the same global batch of 2.
    two = _write_config(tmp_path / "two.json", _config(tiny_data, tmp_path / "two", {
        "training.steps": steps, "training.batch_size": 1, "checkpoint.every": 3, "training.ema_decay": 0.5,
        "parallelism.activation_checkpointing": True}))

    def torchrun() -> subprocess.Popen:
        return subprocess.Popen(
            [TORCHRUN, "--nnodes", "1", "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port",
             str(_free_port()), "-m", "infinitystar.cli", "train", str(two), "--quiet"],
            env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    single = _cli_train(one)
    _finish(torchrun())
    _finish(single)
    a = step_losses(tmp_path / "one" / "train_log.jsonl")
    b = step_losses(tmp_path / "two" / "train_log.jsonl")
    # Sharded resume: drop the final checkpoint, run again; FSDP ranks reload their DCP shards of step 3.
    shutil.rmtree(tmp_path / "two" / "checkpoints" / "step_00000005")
    _finish(torchrun())
    log = read_log(tmp_path / "two" / "train_log.jsonl")
    assert [r["step"] for r in log if r.get("event") == "resume"] == [3]
    again = step_losses(tmp_path / "two" / "train_log.jsonl")
    # Exact: the same 2 processes run the same kernels on the same inputs from the restored state, and a sum over 2
    # ranks does not depend on their order.
    assert [again[s] for s in (4, 5)] == [b[4], b[5]]
    assert sorted(a) == sorted(b) == list(range(1, steps + 1))
    # Losses within 1e-5 (~170 float32 ulps of a ~0.69 loss): the packed sequence of 2 and two sequences of 1 run
    # the same arithmetic but round differently (other kernel shapes; FSDP's reduce-scatter sums the gradient in
    # another order). Adam lets rounding move only coordinates whose gradient is at rounding level (see the
    # weights below), and those hardly change the loss to first order; the rest is rounding grown over 5 steps.
    for s in a:
        assert abs(a[s] - b[s]) <= 1e-5, (s, a[s], b[s])
    assert len(list((tmp_path / "two" / "checkpoints" / "step_00000005").glob("*.distcp"))) == 2

    # Export both runs (one process, whatever wrote them) and compare the trained weights.
    from infinitystar.checkpoints import load_safetensors
    from infinitystar.pipeline import InfinityStarPipeline

    out_one = export_run(tmp_path / "one", tmp_path / "export_one")
    proc = subprocess.run([PY, "-m", "infinitystar.cli", "export", str(tmp_path / "two"), str(tmp_path / "export_two")],
                          env=_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    w1 = load_safetensors(out_one / "transformer" / "model.safetensors")
    w2 = load_safetensors(tmp_path / "export_two" / "transformer" / "model.safetensors")
    base = InfinityStarPipeline.from_preset("tiny-test", seed=0).transformer.state_dict()
    assert w1.keys() == w2.keys() == base.keys()
    # Adam divides each gradient by its own running RMS: where a gradient is at rounding level (|g| ~ eps) the
    # rounding differences of the two runs become step differences of up to a whole step, in either direction;
    # elsewhere the steps agree to rounding. Each run's step t moves a coordinate by at most lr_t * rho_t
    # (conftest.adam_step_bound), so no coordinate differs by more than `worst`, which only such coordinates
    # approach; even if 0.1% of the coordinates did, the mean difference would be 1e-3 of it. A wrong batch slice
    # or unsynchronised gradients change the steps of most coordinates: a mean difference of the order of `worst`.
    opt = load_config(TrainConfig, str(one)).optimizer
    worst = 2 * sum(opt.lr_at(t - 1, steps) * adam_step_bound(opt.betas, t) for t in range(1, steps + 1))
    update = max((w1[k] - base[k]).abs().max().item() for k in w1)
    assert update > 1e-3  # training changed the weights
    diffs = torch.cat([(w1[k] - w2[k]).abs().flatten() for k in w1])
    assert diffs.max().item() <= worst and diffs.mean().item() <= 1e-3 * worst, (diffs.max(), diffs.mean(), worst)
    # The EMA export holds different weights (decay 0.5 lags behind the model).
    out_ema = export_run(tmp_path / "two", tmp_path / "export_ema", use_ema=True)
    w_ema = load_safetensors(out_ema / "transformer" / "model.safetensors")
    assert any(not torch.equal(w_ema[k], w2[k]) for k in w2)

    pipe = InfinityStarPipeline.from_pretrained(out_one)
    for k, v in pipe.transformer.state_dict().items():
        assert torch.equal(v, w1[k]), k
    image = pipe("a red circle moving left", num_frames=1, seed=0, progress=False).frames
    assert image.shape == (1, 96, 96, 3) and image.dtype.name == "uint8"


def test_token_budget_limits_the_packed_sequence(tiny_data, tmp_path):
    torch.set_num_threads(1)
    budget = 120  # one caption (~60 bytes) + a prefix of the 91-token pyramid; no room for a second sample
    cfg = _train_config(tiny_data, tmp_path / "run", {"training.steps": 3, "checkpoint.every": 100,
                                                      "training.max_tokens": budget})
    Trainer(cfg, progress=False).run()
    steps = [r for r in read_log(tmp_path / "run" / "train_log.jsonl") if r.get("event") == "step"]
    assert len(steps) == 3
    for r in steps:
        assert r["visual_tokens"] + r["text_tokens"] <= budget
        assert r["samples"] + r["left_out_for_budget"] == 2 and r["left_out_for_budget"] >= 1
        assert r["visual_tokens"] < 91  # the full pyramid does not fit next to the caption: a prefix is trained
    too_small = with_overrides(cfg, {"training.max_tokens": 10, "out_dir": str(tmp_path / "run2")})
    with pytest.raises(ValueError, match="no sample"):
        Trainer(too_small, progress=False).run()

"""VAE training: losses/metrics, the training quantizer, data sources, the loop, resume, export, CLI."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
import torch

from conftest import adam_step_bound
from infinitystar.checkpoints import load_vae
from infinitystar.cli import main as cli_main
from infinitystar.config import ConfigError, QuantizerConfig, get_preset
from infinitystar.generation.schedules import base_ladder
from infinitystar.media import write_image, write_video
from infinitystar.train.config import (
    VAEDataConfig,
    VAEModelConfig,
    VAETrainConfig,
    VAETrainingConfig,
    config_from_dict,
    load_config,
    with_overrides,
)
from infinitystar.train.runlog import read_log
from infinitystar.train.vae_data import MediaClipDataset, list_media
from infinitystar.train.vae_losses import PatchDiscriminator, hinge_d_loss, psnr, ssim, structural_loss
from infinitystar.train.vae_trainer import (
    TrainingQuantizer,
    VAETrainer,
    build_vae,
    list_checkpoints,
    reconstruct,
    to_channels_last,
    train_vae,
    training_schedule,
)
from infinitystar.vae.multiscale import encode_to_bits


@pytest.fixture(autouse=True)
def _one_thread():
    # Training steps at these toy sizes are overhead-bound; on a CPU shared with other jobs one thread
    # avoids OpenMP oversubscription (measured 0.07 s/step vs 0.5-6 s/step with 2 threads).
    # Runs after conftest's 2-thread fixture; results are deterministic for a fixed thread count.
    torch.set_num_threads(1)
    yield


class MovingSquares:
    """One coloured square per clip moving in a straight line over a black background."""

    def __init__(self, frames: int, size: int) -> None:
        self.frames, self.size = frames, size

    def sample(self, rng: np.random.Generator) -> torch.Tensor:
        n = self.size
        x = torch.full((3, self.frames, n, n), -1.0)
        side = int(rng.integers(n // 4, n // 2))
        colour = torch.tensor(rng.uniform(-0.5, 1.0, 3), dtype=torch.float32)
        y0, x0 = rng.integers(0, n - side, 2)
        vy, vx = rng.integers(-2, 3, 2)
        for t in range(self.frames):
            yy = int(np.clip(y0 + vy * t, 0, n - side))
            xx = int(np.clip(x0 + vx * t, 0, n - side))
            x[:, t, yy:yy + side, xx:xx + side] = colour[:, None, None]
        return x


def _config(tmp_path, changes: dict | None = None) -> VAETrainConfig:
    """A small run; ``changes`` replace fields by dotted name (``{"training.steps": 4}``)."""
    base = {"out_dir": str(tmp_path / "run"), "model": {"vae_preset": "tiny-test"},
            "data": {"num_frames": 5, "height": 16, "width": 16}, "training": {"batch_size": 2, "steps": 2},
            "optimizer": {"lr": 2e-3}, "logging": {"every": 1}, "checkpoint": {"every": 1000}}
    return with_overrides(config_from_dict(VAETrainConfig, base), changes or {})


def _steps(path) -> list[dict]:
    """The step records of a run log."""
    return [r for r in read_log(path) if r.get("event") == "step"]


# ---------------------------------------------------------------------------------------------
# Metrics and losses


def test_psnr_known_values_and_range():
    target = torch.zeros(2, 3, 4, 4)
    # [-1, 1] pixels off by 0.1 -> 0.05 on [0, 1] -> MSE 0.0025 -> 10*log10(400) dB.
    assert psnr(target + 0.1, target).item() == pytest.approx(10 * math.log10(400), abs=1e-4)
    # The same images on a [0, 255] scale.
    t255 = torch.full((1, 3, 4, 4), 100.0)
    assert psnr(t255 + 2.55, t255, value_range=(0, 255)).item() == pytest.approx(40.0, abs=1e-4)
    # Per sample, and the prediction is clamped to the range first.
    per = psnr(torch.stack([target[0] + 0.1, target[1] + 0.2]), target, reduction="none")
    assert per.shape == (2,) and per[0] > per[1]
    over = torch.full((1, 3, 2, 2), 1.0)
    assert psnr(over + 5.0, over).item() == math.inf
    with pytest.raises(ValueError, match="shape"):
        psnr(target, target[:1])


def test_ssim_and_structural_loss():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 5, 32, 32, generator=g) * 2 - 1
    assert ssim((x[:, :, 0] + 1) / 2, (x[:, :, 0] + 1) / 2).item() == pytest.approx(1.0, abs=1e-5)
    assert structural_loss(x, x).item() == pytest.approx(0.0, abs=1e-5)
    blurred = torch.nn.functional.avg_pool3d(x, (1, 3, 3), stride=1, padding=(0, 1, 1), count_include_pad=False)
    noisy = x + 0.05 * torch.randn(x.shape, generator=g)
    # Blur destroys more structure than mild noise, although its L1 error is in the same range.
    assert structural_loss(blurred, x) > structural_loss(noisy, x) > 0
    pred = x.clone().requires_grad_(True)
    structural_loss(pred + 0.1 * torch.randn(x.shape, generator=g), x).backward()
    assert pred.grad is not None and torch.isfinite(pred.grad).all() and pred.grad.abs().sum() > 0


def test_patch_discriminator_and_hinge():
    d = PatchDiscriminator(3, channels=8, layers=2)
    logits = d(torch.zeros(2, 3, 5, 32, 32))
    assert logits.shape[:2] == (10, 1)  # one map per frame
    assert hinge_d_loss(torch.full((4,), 2.0), torch.full((4,), -2.0)).item() == 0.0
    assert hinge_d_loss(torch.zeros(4), torch.zeros(4)).item() == pytest.approx(1.0)


# ---------------------------------------------------------------------------------------------
# Training-time quantizer


def test_training_schedule_is_the_official_ladder_for_square_latents():
    official = [hw for hw in base_ladder(1.0)]
    sched = training_schedule(5, 6, 6)
    assert [s[1:] for s in sched[:6]] == official[:6]
    assert sched[:6] == [(1, h, w) for h, w in official[:6]] and sched[6:] == [(4, h, w) for h, w in official[:6]]
    rect = training_schedule(1, 3, 5)
    assert rect[-1] == (1, 3, 5)
    assert all(a[1] <= b[1] and a[2] <= b[2] for a, b in zip(rect, rect[1:]))


def test_training_quantizer_values_match_inference_encoder_and_gradient_is_straight_through():
    qcfg = get_preset("quantizer", "tiny-test")
    g = torch.Generator().manual_seed(1)
    z = (torch.randn(2, 64, 5, 3, 3, generator=g) * 2).requires_grad_(True)
    tq = TrainingQuantizer(qcfg, "[2, 1, 1]")
    out = tq(z)
    sched, reps = tq.schedule(z.shape)
    assert reps == [2, 1, 1] * 2
    ref = encode_to_bits(z.detach(), sched, reps, qcfg).summed_codes
    # Same residual/BSQ helpers on the same tensors: the same bits. The values differ only by the straight-through
    # z + (codes - z), within 1/2 ulp(|codes - z|) + 1/2 ulp(|codes|) < 6e-7 for |z| < 15 (here < 8.4; |codes| < 1).
    torch.testing.assert_close(out.codes.detach(), ref, atol=1e-5, rtol=0)
    assert out.num_steps == 8
    # Straight-through: d(sum of codes * w)/dz = w (aux terms excluded).
    w = torch.randn(out.codes.shape, generator=g)
    (grad,) = torch.autograd.grad((out.codes * w).sum(), z)
    torch.testing.assert_close(grad, w)
    # The BSQ terms are differentiable with respect to the latent.
    (aux_grad,) = torch.autograd.grad(out.aux, z)
    assert aux_grad.abs().sum() > 0 and out.commitment > 0
    # Short clip pyramids (the demo's 8 latent frames): 1 + 2 + 2 latent frames -> three pyramids.
    short = TrainingQuantizer(qcfg, frames_inner_clip=2)
    sched2, reps2 = short.schedule(z.shape)
    assert [s[0] for s in sched2] == [1] * 3 + [2] * 3 + [2] * 3
    ref2 = encode_to_bits(z.detach(), sched2, reps2, qcfg, frames_inner_clip=2).summed_codes
    torch.testing.assert_close(short(z).codes.detach(), ref2, atol=1e-5, rtol=0)
    with pytest.raises(ConfigError, match="quantizer.repetition has 2 entries"):
        TrainingQuantizer(qcfg, [1, 1])(z)


def test_training_quantizer_residual_gradient_goes_through_each_bsq_normalisation():
    qcfg = QuantizerConfig(detail_scale_min_tokens=0)  # every scale uses all 64 channels
    g = torch.Generator().manual_seed(2)
    z = torch.randn(3, 64, 1, 1, 1, generator=g).requires_grad_(True)  # one 1x1 scale: one BSQ step
    out = TrainingQuantizer(qcfg, gradient="residual")(z)
    assert out.num_steps == 1
    torch.testing.assert_close(out.codes.detach(), torch.where(z > 0, 1.0, -1.0).detach() / 8)
    w = torch.randn(out.codes.shape, generator=g)
    (grad,) = torch.autograd.grad((out.codes * w).sum(), z)
    zz = z.detach().clone().requires_grad_(True)
    (want,) = torch.autograd.grad((torch.nn.functional.normalize(zz, dim=1) * w).sum(), zz)
    torch.testing.assert_close(grad, want)
    # Same values as the identity gradient on a multi-scale latent.
    z2 = torch.randn(2, 64, 5, 3, 3, generator=g)
    a = TrainingQuantizer(get_preset("quantizer", "tiny-test"), gradient="residual")(z2).codes
    b = TrainingQuantizer(get_preset("quantizer", "tiny-test"))(z2).codes
    # The same sums; "identity" returns z + (codes - z): within 1/2 ulp(|codes - z|) + 1/2 ulp(|codes|) < 6e-7 of
    # the codes for |z2| < 15 (a standard normal of 5760 values).
    torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


# ---------------------------------------------------------------------------------------------
# Data sources


def test_media_sources_and_clip_sampling(tmp_path):
    rng = np.random.default_rng(0)
    folder = tmp_path / "media"
    folder.mkdir()
    np.save(folder / "a.npy", rng.integers(0, 255, (9, 32, 48, 3), dtype=np.uint8))
    write_image(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8), folder / "b.png")
    write_video(rng.integers(0, 255, (24, 32, 32, 3), dtype=np.uint8), tmp_path / "v.mp4", fps=16)
    (tmp_path / "list.jsonl").write_text(
        json.dumps({"video_path": "v.mp4", "begin_frame_id": 0, "end_frame_id": 16, "fps": 16}) + "\n")
    (tmp_path / "files.txt").write_text("# comment\nmedia/a.npy\n")
    items = list_media([str(folder), str(tmp_path / "list.jsonl"), str(tmp_path / "files.txt")])
    assert [(i.path.name, i.kind) for i in items] == [("a.npy", "array"), ("b.png", "image"), ("v.mp4", "video"),
                                                      ("a.npy", "array")]
    assert items[2].end == pytest.approx(1.0)
    for cache in (False, True):
        ds = MediaClipDataset(items, num_frames=5, fps=16, height=16, width=16, cache_decoded=cache)
        for i in range(len(items)):
            clip = ds.clip(i, np.random.default_rng(i))
            assert clip.shape == (3, 5, 16, 16) and clip.min() >= -1 and clip.max() <= 1
    long = MediaClipDataset(items, num_frames=13, fps=16, height=16, width=16)
    with pytest.raises(ValueError, match="a.npy holds 9 frames"):
        long.clip(0, np.random.default_rng(0))
    # Bad rows are skipped and reported, as the transformer's reader does (issue 16); only no usable item at all
    # is an error.
    (tmp_path / "bad.txt").write_text("missing.mp4\nmedia/a.npy\n")
    (tmp_path / "bad.jsonl").write_text('{"video_path": "v.mp4"}\nnot json\n{"image_path": 3}\n')
    bad_rows: list[str] = []
    kept = list_media([str(tmp_path / "bad.txt"), str(tmp_path / "bad.jsonl")], bad_rows)
    assert [i.path.name for i in kept] == ["a.npy", "v.mp4"]
    assert len(bad_rows) == 3 and "bad.txt:1" in bad_rows[0] and "missing.mp4" in bad_rows[0]
    assert "bad.jsonl:2: not a JSON object" in bad_rows[1] and "bad.jsonl:3" in bad_rows[2]
    with pytest.raises(ValueError, match=r"no media found .*1 bad rows; the first: .*missing\.mp4"):
        (tmp_path / "worse.txt").write_text("missing.mp4\n")
        list_media([str(tmp_path / "worse.txt")])


# ---------------------------------------------------------------------------------------------
# The loop


def test_training_lowers_loss_and_raises_heldout_psnr(tmp_path):
    cfg = _config(tmp_path, {"data.height": 32, "data.width": 32, "training.steps": 24, "optimizer.lr": 3e-3,
                             "data.eval_clips": 4})
    trainer = VAETrainer(cfg, dataset=MovingSquares(5, 32), eval_dataset=MovingSquares(5, 32))
    before = trainer.evaluate()
    result = trainer.run(progress=False)
    losses = [r["loss"] for r in result.history]
    recon = [r["l1"] for r in result.history]
    assert len(losses) == 24
    assert np.mean(losses[-3:]) < 0.6 * np.mean(losses[:3])
    assert np.mean(recon[-3:]) < 0.6 * np.mean(recon[:3])
    assert result.eval_psnr is not None and before is not None
    assert result.eval_psnr > before + 3.0, (before, result.eval_psnr)
    print(f"held-out PSNR {before:.2f} -> {result.eval_psnr:.2f} dB; loss {losses[0]:.3f} -> {losses[-1]:.3f}")
    log = _steps(tmp_path / "run" / "train_log.jsonl")
    assert [r["step"] for r in log] == list(range(1, 25))
    assert log[-1]["eval_psnr"] == pytest.approx(result.eval_psnr)
    assert {"l1", "l2", "perceptual", "commitment", "entropy_penalty", "psnr", "lr"} <= set(log[0])

    # The export reproduces the trained model: same tensors, same reconstructions.
    loaded = load_vae(result.export_path)
    trained_sd = result.model.state_dict()
    assert loaded.state_dict().keys() == trained_sd.keys()
    for k, v in loaded.state_dict().items():
        assert torch.equal(v, trained_sd[k]), k
    # Bitwise: the same weights with the same memory layout and requires_grad flags run the same kernels on the same
    # input. (Otherwise PyTorch may pick other convolution kernels, which round differently and could flip a BSQ
    # bit whose residual is ~0.)
    x = torch.stack([MovingSquares(5, 32).sample(np.random.default_rng(7)) for _ in range(2)])
    if cfg.model.channels_last:
        to_channels_last(loaded)
    with torch.no_grad():
        a = reconstruct(result.model.eval().requires_grad_(False), x, trainer.quantizer)
        b = reconstruct(loaded, x, trainer.quantizer)
    assert torch.equal(a, b)


def test_resume_continues_exactly_like_an_uninterrupted_run(tmp_path):
    kw = {"discriminator.weight": 0.1, "discriminator.channels": 8, "discriminator.layers": 2, "checkpoint.every": 2,
          "checkpoint.keep_last_k": 1}
    data = MovingSquares(5, 16)
    full = train_vae(_config(tmp_path / "a", {"training.steps": 4, **kw}), dataset=data, progress=False)
    first = train_vae(_config(tmp_path / "b", {"training.steps": 2, **kw}), dataset=data, progress=False)
    assert [s for s, _ in list_checkpoints(tmp_path / "b" / "run")] == [2]
    # A crash after step 3 was logged but before its checkpoint, mid-way through writing step 4's line.
    with open(tmp_path / "b" / "run" / "train_log.jsonl", "a") as fh:
        fh.write(json.dumps({"event": "step", "step": 3, "loss": -1.0}) + '\n{"event": "step", "step": 4, "lo')
    resumed = train_vae(_config(tmp_path / "b", {"training.steps": 4, **kw}), dataset=data, progress=False)
    assert [r["step"] for r in first.history] == [1, 2] and [r["step"] for r in resumed.history] == [3, 4]
    assert all(r["gan_d"] > 0 and r["gan_g"] != 0 for r in full.history)  # the GAN really ran
    for key in ("loss", "l1", "perceptual", "bsq_aux", "gan_g", "gan_d", "grad_norm"):
        assert [r[key] for r in full.history[2:]] == [r[key] for r in resumed.history], key
    for k, v in full.model.state_dict().items():
        assert torch.equal(v, resumed.model.state_dict()[k]), k
    assert [s for s, _ in list_checkpoints(tmp_path / "b" / "run")] == [4]  # keep_last_k=1
    log = _steps(tmp_path / "b" / "run" / "train_log.jsonl")
    assert [r["step"] for r in log] == [1, 2, 3, 4] and log[2]["loss"] == resumed.history[0]["loss"]


# ---------------------------------------------------------------------------------------------
# Config and CLI


def test_cli_runs_a_two_step_config(tmp_path, capsys):
    clips = tmp_path / "data" / "clips"
    clips.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(3):
        np.save(clips / f"c{i}.npy", rng.integers(0, 255, (5, 16, 16, 3), dtype=np.uint8))
    cfg = tmp_path / "data" / "vae.toml"
    cfg.write_text('out_dir = "out"\n[model]\nvae_preset = "tiny-test"\n[data]\npaths = ["clips"]\nnum_frames = 5\n'
                   'height = 16\nwidth = 16\n[training]\nsteps = 2\nbatch_size = 2\n[quantizer]\nrepetition = [2]\n')
    assert cli_main(["train-vae", str(cfg), "--quiet"]) == 0
    out = tmp_path / "data" / "out"  # relative paths are relative to the config file
    assert "vae.safetensors" in capsys.readouterr().out
    assert (out / "vae.safetensors").is_file() and (out / "checkpoints" / "step_00000002" / "complete.json").is_file()
    assert [r["step"] for r in _steps(out / "train_log.jsonl")] == [2]
    assert load_vae(out).config == get_preset("vae", "tiny-test")
    saved = json.loads((out / "train_config.json").read_text())
    assert saved["training"]["steps"] == 2 and saved["data"]["paths"] == [str(clips)]

    # Fine-tuning from the export: the architecture comes from its metadata, the weights are its weights.
    tune = VAETrainConfig(model=VAEModelConfig(init_checkpoint=str(out / "vae.safetensors")),
                          data=VAEDataConfig(paths=(str(clips),), num_frames=5, height=16, width=16),
                          training=VAETrainingConfig(steps=1, batch_size=2), out_dir=str(tmp_path / "tune"))
    start = build_vae(tune)
    for k, v in load_vae(out).state_dict().items():
        assert torch.equal(start.state_dict()[k], v), k
    assert train_vae(tune, progress=False).step == 1
    with pytest.raises(ValueError, match="shape mismatches"):
        build_vae(with_overrides(tune, {"model.vae_preset": "official"}))


def test_bad_config_key_is_named(tmp_path, capsys):
    cfg = tmp_path / "vae.toml"
    cfg.write_text('[model]\nvae_preset = "tiny-test"\n[data]\npaths = ["clips"]\n[optimizer]\nlearning_rate = 0.1\n')
    with pytest.raises(ConfigError, match="optimizer.learning_rate"):
        load_config(VAETrainConfig, str(cfg))
    assert cli_main(["train-vae", str(cfg)]) == 2
    assert "learning_rate" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="num_frames must be 1 \\+ 4k"):
        VAEDataConfig(paths=("x",), num_frames=8)
    with pytest.raises(ConfigError, match="unknown vae preset 'nope'"):
        VAEModelConfig(vae_preset="nope")
    with pytest.raises(ConfigError, match="vae_preset .* or init_checkpoint"):
        VAETrainConfig(data=VAEDataConfig(paths=("x",)))


def test_foreground_weight_scales_the_pixel_losses_on_bright_pixels(tmp_path):
    import copy

    cfg = _config(tmp_path, {"loss.foreground_weight": 4.0, "training.batch_size": 2, "loss.l1_weight": 1.0,
                             "loss.l2_weight": 1.0})
    trainer = VAETrainer(cfg, dataset=MovingSquares(5, 16))
    before = copy.deepcopy(trainer.model).eval()
    x = trainer.batch(0)
    record = trainer.train_step(0)
    with torch.no_grad():
        latent = before.encode(x, chunked=False)
        diff = before.decode(trainer.quantizer(latent).codes, chunked=False) - x
    bright = (x.amax(1, keepdim=True) > -0.9).float()  # the square; the black background is -1
    assert 0 < bright.mean() < 0.5
    weight = 1 + 4.0 * bright
    assert record["l2"] == pytest.approx(float((weight * diff**2).mean()), rel=1e-4)
    assert record["l1"] == pytest.approx(float((weight * diff.abs()).mean()), rel=1e-4)
    assert record["l2"] > float((diff**2).mean()) * 1.01  # the weighting is on
    with pytest.raises(ConfigError, match="foreground_threshold"):
        _config(tmp_path, {"loss.foreground_threshold": 1.5})
    with pytest.raises(ConfigError, match="foreground_weight"):
        _config(tmp_path, {"loss.foreground_weight": -1.0})


def test_decoder_only_fine_tune_keeps_the_latents(tmp_path):
    first = train_vae(_config(tmp_path / "a", {"training.steps": 2}), dataset=MovingSquares(5, 16), progress=False)
    cfg = _config(tmp_path / "b", {"training.steps": 3, "model.train_decoder_only": True,
                                   "model.init_checkpoint": str(first.export_path), "data.num_frames": 9})
    trainer = VAETrainer(cfg, dataset=MovingSquares(9, 16))
    start = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    result = trainer.run(progress=False)
    end = result.model.state_dict()
    encoder_side = [k for k in start if k.startswith(("encoder.", "proj_down.", "scale_learnable"))]
    decoder_side = [k for k in start if k.startswith(("decoder.", "proj_up."))]
    assert encoder_side and decoder_side
    for k in encoder_side:
        assert torch.equal(start[k], end[k]), f"{k} changed in a decoder-only run"
    assert sum(not torch.equal(start[k], end[k]) for k in decoder_side) > len(decoder_side) // 2
    # Same latents from the exported model as from the initial one: a transformer trained on them still fits.
    x = MovingSquares(9, 16).sample(np.random.default_rng(3))[None]
    with torch.no_grad():
        assert torch.equal(load_vae(first.export_path).encode(x), load_vae(result.export_path).encode(x))


# ---------------------------------------------------------------------------------------------
# Data parallel under torchrun


def _run_cli(*args: str, nproc: int = 1) -> str:
    import os
    import socket
    import subprocess
    import sys
    from pathlib import Path

    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1] / "src") + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [sys.executable, "-m", "infinitystar.cli", *args]
    if nproc > 1:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", str(nproc),
               "--master_addr", "127.0.0.1", "--master_port", str(port), *cmd[1:]]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def test_two_processes_train_like_one_process_of_the_same_global_batch(tmp_path):
    clips = tmp_path / "clips"
    clips.mkdir()
    data = MovingSquares(5, 16)
    rng = np.random.default_rng(0)
    for i in range(6):
        frames = ((data.sample(rng).permute(1, 2, 3, 0) + 1) * 127.5).round().to(torch.uint8).numpy()
        np.save(clips / f"c{i}.npy", frames)
    # The BSQ entropy term is a statistic of each process's own batch (like BatchNorm without syncing), so it is
    # off here; every other term is a per-pixel or per-sample mean, which the averaged gradients reproduce.
    common = ('[model]\nvae_preset = "tiny-test"\n[data]\npaths = ["clips"]\neval_paths = ["clips"]\neval_clips = 2\n'
              'num_frames = 5\nheight = 16\nwidth = 16\n[optimizer]\nlr = 2e-3\n[logging]\nevery = 1\n'
              '[checkpoint]\nevery = 2\nkeep_last_k = 2\n[loss]\nentropy_weight = 0.0\n[discriminator]\nweight = 0.1\n'
              'lr = 2e-4\nchannels = 8\nlayers = 2\n[parallelism]\nthreads = 1\n')
    (tmp_path / "one.toml").write_text('out_dir = "one"\n' + common + '[training]\nsteps = 4\nbatch_size = 2\n')
    (tmp_path / "two.toml").write_text('out_dir = "two"\n' + common + '[training]\nsteps = 4\nbatch_size = 1\n')
    _run_cli("train-vae", str(tmp_path / "one.toml"), "--quiet")
    out = _run_cli("train-vae", str(tmp_path / "two.toml"), "--quiet", nproc=2)
    assert out.count("wrote ") == 1  # rank 0 reports, writes the log, the checkpoints and the export

    def log(name):
        return _steps(tmp_path / name / "train_log.jsonl")

    one, two = log("one"), log("two")
    assert [r["step"] for r in one] == [r["step"] for r in two] == [1, 2, 3, 4]
    cfg = load_config(VAETrainConfig, str(tmp_path / "one.toml"))
    opt = cfg.optimizer
    assert opt.schedule == "constant" and opt.warmup_steps == 0 and opt.weight_decay == 0  # used below
    # Both runs do the same arithmetic in float32, but batch 2 vs 1 picks other kernels and the gradient mean is
    # summed in another order, so values differ by rounding (~2^-24 relative per operation). Adam divides each
    # gradient by its own running RMS, so a coordinate whose gradient is at rounding level (|g| ~ eps = 1e-8)
    # moves by up to a whole lr-sized step in a direction set by the rounding; every other coordinate moves
    # identically up to rounding. Per coordinate and step, both runs' Adam steps are within lr * rho_t (see
    # conftest.adam_step_bound), so they differ by at most 2 * lr * rho_t.
    # * Pixel, BSQ terms and grad norm (1e-5 relative, ~170 float32 ulps): a coordinate is moved by rounding only
    #   while its gradient is ~0, so it hardly changes that step's terms; on later batches it changes them by about
    #   the mean gradient per coordinate (grad_norm / sqrt(482k weights) ~ 1.5e-3) times its difference (<= 4e-3),
    #   so the bound leaves room for a few such coordinates at their worst case, plus rounding grown over 4 steps.
    # * GAN terms (2e-3, relative above 1): the discriminator's last bias has a gradient that is exactly 0 while
    #   every logit lies in the hinge's linear range (-1, 1) (+0.5/N per fake logit, -0.5/N per real one), so its
    #   Adam steps are pure rounding noise; it shifts every logit, hence gan_g = -mean D(fake), by the same
    #   offset. After the s-1 discriminator updates before step s the offsets differ by at most
    #   sum_t 2 * disc_lr * rho_t (gan_d is 1-Lipschitz in the logits: bounded by the same). disc_lr is set low
    #   enough that this worst case fits the GAN bound on any machine (at disc_lr = lr = 2e-3 it would be 8e-3
    #   by step 3); the rest of the discriminator agrees to rounding.
    pixel_tol, gan_tol = 1e-5, 2e-3
    disc_lr = cfg.discriminator.lr or opt.lr
    tols = {"l1": pixel_tol, "l2": pixel_tol, "perceptual": pixel_tol, "bsq_aux": pixel_tol,
            "grad_norm": pixel_tol, "gan_g": gan_tol, "gan_d": gan_tol}
    # loss = l1_weight * l1 + l2_weight * l2 + perceptual_weight * perceptual + bsq_aux + gan_weight * gan_g
    # (VAETrainer.train_step; bsq_aux already holds the commitment/entropy weights), so its difference is at most
    # the weighted sum of its terms' bounds, plus the rounding of forming the sum in float32 in each run
    # (4 products and 4 sums, each <= 2^-24 of a partial sum <= sum |weight * term|).
    loss_weights = {"l1": cfg.loss.l1_weight, "l2": cfg.loss.l2_weight, "perceptual": cfg.loss.perceptual_weight,
                    "bsq_aux": 1.0, "gan_g": cfg.discriminator.weight}

    def bound(key: str, record: dict) -> float:
        return tols[key] * max(1.0, abs(record[key]))

    for a, b in zip(one, two):
        offset_bound = sum(2 * disc_lr * adam_step_bound(opt.betas, t) for t in range(1, a["step"]))
        assert offset_bound <= gan_tol, offset_bound  # the GAN bound covers the worst case above
        for key in tols:
            assert abs(a[key] - b[key]) <= bound(key, a), (a["step"], key, a[key], b[key])
        loss_bound = sum(w * bound(k, a) for k, w in loss_weights.items())
        loss_bound += 2 * 8 * 2.0**-24 * sum(abs(w * a[k]) for k, w in loss_weights.items())
        assert abs(a["loss"] - b["loss"]) <= loss_bound, (a["step"], a["loss"], b["loss"], loss_bound)
    # 1e-3 dB of PSNR is 2.3e-4 relative MSE, 23x the pixel terms' relative bound.
    assert abs(one[-1]["eval_psnr"] - two[-1]["eval_psnr"]) < 1e-3
    # Weights: each coordinate differs by at most 2 * lr * sum_t rho_t (reached only by the rounding-driven
    # coordinates above); on average by far less: even if 0.1% of the coordinates were rounding-driven and
    # differed by that worst case, the mean difference would be 1e-3 of it. A wrong batch slice or unsynchronised
    # gradients change the Adam steps of most coordinates, i.e. a mean difference of the order of the worst case.
    w1, w2 = load_vae(tmp_path / "one").state_dict(), load_vae(tmp_path / "two").state_dict()
    diffs = torch.cat([(w1[k] - w2[k]).abs().flatten() for k in w1])
    worst = 2 * opt.lr * sum(adam_step_bound(opt.betas, t) for t in range(1, len(one) + 1))
    assert diffs.max().item() <= worst and diffs.mean().item() <= 1e-3 * worst, (diffs.max(), diffs.mean(), worst)

    # Resume under torchrun: both ranks reload rank 0's checkpoint of step 2 and redo steps 3-4 identically.
    shutil.rmtree(tmp_path / "two" / "checkpoints" / "step_00000004")
    _run_cli("train-vae", str(tmp_path / "two.toml"), "--quiet", nproc=2)
    again = log("two")
    assert [r["step"] for r in again] == [1, 2, 3, 4]
    # Exact: the same 2 processes run the same kernels on the same inputs from bitwise-restored state, and a sum
    # over 2 ranks does not depend on their order (float addition is commutative).
    assert [r["loss"] for r in again] == [r["loss"] for r in two]

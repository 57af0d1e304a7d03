"""The ``infinitystar train``, ``train-vae`` and ``export`` subcommands (registered by ``infinitystar.cli``).

One process::

    infinitystar train CONFIG.toml

N processes on one machine (FSDP2; gloo on CPU, nccl on CUDA)::

    torchrun --standalone --nproc_per_node N -m infinitystar.cli train CONFIG.toml

Then ``infinitystar export RUN_DIR OUT_DIR`` and ``infinitystar generate --model OUT_DIR ...``.
"""

from __future__ import annotations

import argparse
import os

from infinitystar.train.config import DEVICES, TrainConfig, VAETrainConfig, load_config
from infinitystar.train.distributed import shutdown_distributed
from infinitystar.train.trainer import export_run, train
from infinitystar.train.vae_trainer import train_vae


def add_train_commands(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "train", help="train or fine-tune the transformer on cached VAE latents",
        description="Train the transformer as CONFIG (TOML or JSON, see infinitystar.train.config.TrainConfig) says. "
        "One process: `infinitystar train CONFIG`; N processes with FSDP2 on one machine: "
        "`torchrun --standalone --nproc_per_node N -m infinitystar.cli train CONFIG`. "
        "Starting the same command again resumes from the newest complete checkpoint.")
    add_run_arguments(p, checkpoint_kind="folder")
    p.set_defaults(func=run_train)
    e = subparsers.add_parser(
        "export", help="write a trained run as a pipeline folder",
        description="Turn a training run folder into a pipeline folder (model_index.json, transformer/, vae/, "
        "text_encoder/) that InfinityStarPipeline.from_pretrained and `infinitystar generate --model` load.")
    e.add_argument("run_dir", metavar="RUN_DIR", help="the run folder (out_dir of the training config)")
    e.add_argument("out_dir", metavar="OUT_DIR", help="the pipeline folder to write")
    e.add_argument("--checkpoint", default=None, metavar="DIR", help="a checkpoint folder (default: the newest)")
    e.add_argument("--ema", action="store_true", help="export the EMA weights (the run must have kept them)")
    e.set_defaults(func=run_export)


def add_train_vae_command(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "train-vae", help="train or fine-tune the video VAE",
        description="Train or fine-tune the video VAE from a VAETrainConfig file (.toml or .json; see "
        "infinitystar.train.config.VAETrainConfig). Starting the same command again resumes from the newest "
        "checkpoint in out_dir; writes train_log.jsonl, checkpoints/ and the final vae.safetensors there. Data "
        "parallel over several processes under torchrun (training.batch_size is per process): torchrun "
        "--standalone --nproc_per_node 2 -m infinitystar.cli train-vae CONFIG")
    add_run_arguments(p, checkpoint_kind="folder")
    p.set_defaults(func=run_train_vae)


def add_run_arguments(p: argparse.ArgumentParser, checkpoint_kind: str) -> None:
    """The arguments both trainers' commands share: the config file, --resume, the overrides, --quiet."""
    p.add_argument("config", metavar="CONFIG", help="training config (.toml or .json)")
    p.add_argument("--resume", default="auto", metavar=f"auto|none|{checkpoint_kind.upper()}",
                   help=f"auto: newest checkpoint of the run folder (default); none: start fresh; or a checkpoint "
                   f"{checkpoint_kind}")
    p.add_argument("--steps", type=int, default=None, help="override the config's training.steps")
    p.add_argument("--out-dir", default=None, help="override the config's out_dir (the run folder)")
    p.add_argument("--device", choices=list(DEVICES), default=None, help="override the config's parallelism.device")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def run_overrides(args: argparse.Namespace) -> dict[str, object]:
    """The dotted config fields the shared arguments replace (see :func:`add_run_arguments`)."""
    pairs = (("training.steps", args.steps), ("out_dir", args.out_dir), ("parallelism.device", args.device))
    return {k: v for k, v in pairs if v is not None}


def run_train(args: argparse.Namespace) -> int:
    cfg = load_config(TrainConfig, args.config, run_overrides(args))
    try:
        result = train(cfg, resume=args.resume, progress=not args.quiet)
    finally:
        shutdown_distributed()
    if result.losses:
        last = max(result.losses)
        print(f"trained to step {result.step} (loss {result.losses[last]:.4f}); {result.samples_per_s:.2f} "
              f"samples/s, {result.tokens_per_s:.0f} tokens/s; run folder {result.run_dir}")
    return 0


def run_train_vae(args: argparse.Namespace) -> int:
    config = load_config(VAETrainConfig, args.config, run_overrides(args))
    try:
        result = train_vae(config, resume=args.resume, progress=not args.quiet)
    finally:
        shutdown_distributed()
    if int(os.environ.get("RANK", "0")) == 0:
        extra = f", eval PSNR {result.eval_psnr:.2f} dB" if result.eval_psnr is not None else ""
        print(f"wrote {result.export_path} (step {result.step}{extra})")
    return 0


def run_export(args: argparse.Namespace) -> int:
    out = export_run(args.run_dir, args.out_dir, checkpoint=args.checkpoint, use_ema=args.ema)
    print(f"wrote {out}")
    return 0

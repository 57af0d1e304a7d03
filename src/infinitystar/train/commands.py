"""The ``infinitystar train`` and ``infinitystar export`` subcommands (registered by ``infinitystar.cli``).

One process::

    infinitystar train CONFIG.toml

N processes on one machine (FSDP2; gloo on CPU, nccl on CUDA)::

    torchrun --standalone --nproc_per_node N -m infinitystar.cli train CONFIG.toml

Then ``infinitystar export RUN_DIR OUT_DIR`` and ``infinitystar generate --model OUT_DIR ...``.
"""

from __future__ import annotations

import argparse


def add_train_commands(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "train", help="train or fine-tune the transformer on cached VAE latents",
        description="Train the transformer as CONFIG (TOML or JSON, see infinitystar.config.TrainConfig) says. "
        "One process: `infinitystar train CONFIG`; N processes with FSDP2 on one machine: "
        "`torchrun --standalone --nproc_per_node N -m infinitystar.cli train CONFIG`. "
        "Starting the same command again resumes from the newest complete checkpoint.")
    p.add_argument("config", metavar="CONFIG", help="training config (.toml or .json)")
    p.add_argument("--resume", default="auto", metavar="auto|none|DIR",
                   help="auto: newest complete checkpoint of the run folder (default); none: start fresh; "
                   "or a checkpoint folder")
    p.add_argument("--steps", type=int, default=None, help="override the config's total number of steps")
    p.add_argument("--output-dir", default=None, help="override the config's run folder")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default=None, help="override the config's device")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run_train)
    e = subparsers.add_parser(
        "export", help="write a trained run as a pipeline folder",
        description="Turn a training run folder into a pipeline folder (model_index.json, transformer/, vae/, "
        "text_encoder/) that InfinityStarPipeline.from_pretrained and `infinitystar generate --model` load.")
    e.add_argument("run_dir", metavar="RUN_DIR", help="the run folder (output_dir of the training config)")
    e.add_argument("out_dir", metavar="OUT_DIR", help="the pipeline folder to write")
    e.add_argument("--checkpoint", default=None, metavar="DIR", help="a checkpoint folder (default: the newest)")
    e.add_argument("--ema", action="store_true", help="export the EMA weights (the run must have kept them)")
    e.set_defaults(func=run_export)


def run_train(args: argparse.Namespace) -> int:
    from infinitystar.config import load_train_config
    from infinitystar.train.distributed import shutdown_distributed
    from infinitystar.train.trainer import train

    overrides = {k: v for k, v in (("steps", args.steps), ("output_dir", args.output_dir), ("device", args.device))
                 if v is not None}
    cfg = load_train_config(args.config, **overrides)
    try:
        result = train(cfg, resume=args.resume, progress=not args.quiet)
    finally:
        shutdown_distributed()
    if result.losses:
        last = max(result.losses)
        print(f"trained to step {result.step} (loss {result.losses[last]:.4f}); {result.samples_per_s:.2f} "
              f"samples/s, {result.tokens_per_s:.0f} tokens/s; run folder {result.run_dir}")
    return 0


def run_export(args: argparse.Namespace) -> int:
    from infinitystar.train.trainer import export_run

    out = export_run(args.run_dir, args.out_dir, checkpoint=args.checkpoint, use_ema=args.ema)
    print(f"wrote {out}")
    return 0

"""Training throughput of the tiny preset: one process vs two processes (FSDP2 over gloo), side by side.

    .venv/bin/python benchmarks/bench_trainer.py [--steps 20] [--batch-size 2] [--seconds 1] [--work DIR]

Data: synthetic demo clips (``demo.synthetic``) encoded by the tiny-test VAE through the real feature
extraction (cached in ``--work`` and reused by later runs). ``--seconds 1`` gives 5 latent frames: the
6-scale image pyramid plus one 4-frame clip, 455 visual tokens per sample, every scale trained
(``var_len = false``); ``--seconds 0`` gives the 91-token image pyramid.

Each configuration runs the real command (``python -m infinitystar.cli train`` or
``torchrun --nproc_per_node 2 -m infinitystar.cli train``) and reads the throughput the trainer logs
over all steps but the first: samples/s and tokens/s (visual + text, padding excluded) of the global
batch, data loading included, logging and checkpointing excluded. One process runs with 1 and with
2 CPU threads, two processes with 1 thread each (on a CPU shared with other work, 2 OpenMP threads
can be much slower than 1: the table shows what this machine does).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def prepare_data(work: Path, clips: int, seconds: int) -> dict:
    from infinitystar.demo.synthetic import make_dataset
    from infinitystar.pipeline import InfinityStarPipeline
    from infinitystar.train.config import DataConfig
    from infinitystar.train.features import extract_features

    root = work / f"data_{clips}clips_{seconds}s"
    jsonl = root / "train.jsonl"
    if not jsonl.is_file():
        make_dataset(root, n_clips=clips, seed=0, size=64, frames=16 * max(seconds, 1) + 1)
    data = DataConfig(jsonl=(str(jsonl),), cache_dir=str(root / "cache"), max_seconds=seconds)
    pipe = InfinityStarPipeline.from_preset("tiny-test", seed=0)  # the pipeline write_config trains
    stats = extract_features(data, pipe.config, pipe.vae, progress=False)
    print(f"data: {stats.summary()}", file=sys.stderr)
    return {"jsonl": list(data.jsonl), "cache_dir": data.cache_dir, "max_seconds": data.max_seconds}


def write_config(path: Path, data: dict, out: Path, steps: int, batch: int, checkpointing: bool) -> Path:
    cfg = {"out_dir": str(out), "model": {"pipeline": "tiny-test"}, "training": {"steps": steps, "batch_size": batch},
           "optimizer": {"lr": 1e-3}, "checkpoint": {"every": 10**6, "keep_last_k": 1},
           "scale_subsets": {"var_len": False},
           "parallelism": {"activation_checkpointing": checkpointing, "device": "cpu"}, "data": data}
    path.write_text(json.dumps(cfg))
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(config: Path, nproc: int, threads: int) -> dict:
    """Train as ``config`` says with ``nproc`` processes of ``threads`` CPU threads each; the logged throughput."""
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"), OMP_NUM_THREADS=str(threads))
    if nproc == 1:
        cmd = [sys.executable, "-m", "infinitystar.cli", "train", str(config), "--quiet", "--resume", "none"]
    else:
        torchrun = str(Path(sys.executable).with_name("torchrun"))
        cmd = [torchrun, "--nnodes", "1", "--nproc_per_node", str(nproc), "--master_addr", "127.0.0.1",
               "--master_port", str(free_port()), "-m", "infinitystar.cli", "train", str(config), "--quiet",
               "--resume", "none"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stdout}\n{proc.stderr}")
    out_dir = Path(json.loads(config.read_text())["out_dir"])
    from infinitystar.train.runlog import read_log

    log = read_log(out_dir / "train_log.jsonl")
    end = [r for r in log if r.get("event") == "end"][-1]
    steps = [r for r in log if r.get("event") == "step"]
    return {"samples_per_s": end["samples_per_s"], "tokens_per_s": end["tokens_per_s"],
            "tokens_per_sample": (steps[-1]["visual_tokens"] + steps[-1]["text_tokens"]) / steps[-1]["samples"],
            "final_loss": steps[-1]["loss"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=2, help="samples per step per process")
    parser.add_argument("--seconds", type=int, default=1, choices=[0, 1, 2], help="clip length (0 = images)")
    parser.add_argument("--clips", type=int, default=8)
    parser.add_argument("--activation-checkpointing", action="store_true")
    parser.add_argument("--work", default="/tmp/infinitystar_bench_trainer")
    args = parser.parse_args()

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    data = prepare_data(work, args.clips, args.seconds)
    b = args.batch_size
    rows = [  # (name, processes, batch per process, threads per process)
        (f"1 process x 1 thread, batch {b}", 1, b, 1),
        (f"1 process x 2 threads, batch {b}", 1, b, 2),
        (f"2 processes x 1 thread FSDP2, batch {b}/rank", 2, b, 1),
    ]
    if b % 2 == 0:
        rows.append((f"2 processes x 1 thread FSDP2, batch {b // 2}/rank", 2, b // 2, 1))
    results = []
    for i, (name, nproc, batch, threads) in enumerate(rows):
        cfg = write_config(work / f"cfg_{i}.json", data, work / f"run_{i}", args.steps, batch,
                           args.activation_checkpointing)
        results.append((name, nproc * batch, run(cfg, nproc, threads)))
    import torch

    print(f"tiny-test preset ({args.seconds} s clips, {args.steps} steps, first step excluded), CPU "
          f"({os.cpu_count()} cores), torch {torch.__version__}, activation checkpointing "
          f"{'on' if args.activation_checkpointing else 'off'}")
    print(f"{'configuration':<46} {'global batch':>12} {'samples/s':>10} {'tokens/s':>10} {'tokens/sample':>14}")
    for name, global_batch, r in results:
        print(f"{name:<46} {global_batch:>12} {r['samples_per_s']:>10.2f} {r['tokens_per_s']:>10.0f} "
              f"{r['tokens_per_sample']:>14.0f}")

if __name__ == "__main__":
    main()

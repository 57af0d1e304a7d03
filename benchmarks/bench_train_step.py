"""Training-step throughput: tokens/s of forward + backward on one packed sequence.

Runs the project's ``train_step`` (packed layout, training forward, reweighted per-bit loss,
backward, grad clip; no optimiser step) on synthetic inputs for two model sizes and prints every
variant side by side with the baseline of the same run:

* baseline: float32 everywhere, dense-mask SDPA attention;
* bf16 autocast around the blocks (the reference's training precision; embeddings, heads and loss
  stay float32 as in the model), dense-mask SDPA;
* on CUDA additionally bf16 + FlexAttention with the block mask (the reference's kernel).

Presets: ``tiny`` is the registry's ``tiny-test`` (the golden case architecture); ``100m`` is a
~100M-parameter model defined here from ``TransformerConfig``. Workloads are official 0.06M
schedules at 1:1: ``image`` (11 scales, 704 visual tokens) or ``video`` (17 frames, 22 scales,
3520 visual tokens), plus a 32-token prompt, padded to a multiple of 128.

    .venv/bin/python benchmarks/bench_train_step.py                 # both presets, image workload
    .venv/bin/python benchmarks/bench_train_step.py --presets tiny --workload video --steps 5
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import torch

from infinitystar.config import TransformerConfig, get_preset, replace
from infinitystar.generation.schedules import build_scale_schedule, uses_detail_lfq
from infinitystar.train.loss import LossWeighting
from infinitystar.train.step import TrainSample, train_step
from infinitystar.transformer.model import InfinityStarTransformer

# ~104M parameters: 12 blocks of width 768 (12 heads of 64, GQA 3:1, SwiGLU 3072), flan-T5-XL text width.
PRESET_100M = TransformerConfig(depth=12, embed_dim=768, num_heads=12, num_kv_heads=4, head_dim=64,
                                mlp_intermediate=3072, text_channels=2048, block_chunks=1, semantic_scales=10,
                                detail_scale_min_tokens=200)


def preset(name: str) -> TransformerConfig:
    if name == "tiny":
        return get_preset("transformer", "tiny-test")
    if name == "100m":
        return PRESET_100M
    raise ValueError(f"unknown preset {name!r}; expected 'tiny' or '100m'")


def synthetic_sample(cfg: TransformerConfig, workload: str, text_len: int, seed: int = 0) -> TrainSample:
    frames = {"image": 1, "video": 17}.get(workload)
    if frames is None:
        raise ValueError(f"unknown workload {workload!r}; expected 'image' or 'video'")
    schedule = build_scale_schedule("0.06M", 1.0, frames)
    g = torch.Generator().manual_seed(seed)
    inputs, labels = [], []
    for scale in schedule:
        n = math.prod(scale)
        bits = cfg.detail_bits if uses_detail_lfq(scale, cfg.detail_scale_min_tokens) else cfg.semantic_bits
        inputs.append(torch.randn(1, n, cfg.d_vae, generator=g) * 0.1)
        labels.append(torch.randint(0, 2, (1, n, bits), generator=g))
    text = torch.randn(text_len, cfg.text_channels, generator=g)
    return TrainSample(schedule, tuple(range(len(schedule))), inputs, labels, list(range(len(schedule))), text)


def time_variant(model: InfinityStarTransformer, sample: TrainSample, backend: str, dtype: torch.dtype | None,
                 steps: int, warmup: int) -> tuple[float, float, int]:
    """Median seconds per forward+backward, the loss of the first step, and the padded sequence length."""
    device = next(model.parameters()).device
    times, first_loss, seq_len = [], float("nan"), 0
    for i in range(warmup + steps):
        model.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        m = train_step(model, None, [sample], LossWeighting(4, 40), backend=backend, autocast_dtype=dtype)
        if device.type == "cuda":
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        if i == 0:
            first_loss, seq_len = m.loss, m.seq_len
        if i >= warmup:
            times.append(dt)
    return statistics.median(times), first_loss, seq_len


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--presets", default="tiny,100m")
    ap.add_argument("--workload", default="image", choices=["image", "video"])
    ap.add_argument("--steps", type=int, default=3, help="timed steps per variant (median reported)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--text-len", type=int, default=32)
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: leave as is)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    variants: list[tuple[str, str, torch.dtype | None]] = [("fp32 sdpa", "sdpa", None),
                                                           ("bf16 sdpa", "sdpa", torch.bfloat16)]
    if device.type == "cuda":
        variants.append(("bf16 flex", "flex", torch.bfloat16))

    print(f"device {device} ({torch.get_num_threads()} CPU threads), torch {torch.__version__}, "
          f"workload {args.workload}, median of {args.steps} steps after {args.warmup} warm-up")
    header = f"{'preset':>6} {'params':>9} {'vis tok':>7} {'seq':>5} | " + " | ".join(
        f"{name:>9} ms vis tok/s" for name, _, _ in variants) + " | speed-up vs fp32"
    print(header)
    for name in args.presets.split(","):
        cfg = preset(name.strip())
        if cfg.text_maxlen < args.text_len:
            cfg = replace(cfg, text_maxlen=args.text_len)
        torch.manual_seed(0)
        model = InfinityStarTransformer(cfg).to(device)
        sample = synthetic_sample(cfg, args.workload, args.text_len)
        results = []
        for _, backend, dtype in variants:
            sec, loss, seq_len = time_variant(model, sample, backend, dtype, args.steps, args.warmup)
            results.append((sec, loss, seq_len))
        vis = sample.visual_tokens
        cells = " | ".join(f"{sec * 1e3:9.1f} {vis / sec:11.0f}" for sec, _, _ in results)
        speedups = ", ".join(f"{results[0][0] / sec:.2f}x" for sec, _, _ in results[1:])
        n_params = sum(p.numel() for p in model.parameters())
        print(f"{name:>6} {n_params / 1e6:8.1f}M {vis:7d} {results[0][2]:5d} | {cells} | {speedups}")
        losses = ", ".join(f"{label} {loss:.4f}" for (label, _, _), (_, loss, _) in zip(variants, results))
        print(f"{'':>6} first-step loss: {losses}")


if __name__ == "__main__":
    main()

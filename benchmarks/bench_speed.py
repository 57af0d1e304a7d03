"""Speed on the CPU: every figure of the CPU path side by side with its former path, measured in one run.

    .venv/bin/python benchmarks/bench_speed.py                      # everything (about 10 minutes on 2 cores)
    .venv/bin/python benchmarks/bench_speed.py --quick              # tiny + medium at 0.06M, short train step
    .venv/bin/python benchmarks/bench_speed.py --parts loop,vae --sizes tiny --schedules 0.06M

Parts (``--parts``, default all):

* ``peak``: the machine's matmul peak in float32 and bf16 (``n``-cube ``torch.mm``, this run, these threads). Every
  "% peak" below divides by the peak of the dtype the row computes in.
* ``loop``: the autoregressive loop (``generate_codes``: text prefill, every step with CFG's batch of 2, sampling)
  of random-weight transformers of three sizes -- ``tiny`` (the golden ``tiny-test``: 4 blocks x 128), ``medium``
  (8 x 512) and ``large`` (12 x 768) -- on the 0.06M and 0.25M 17-frame video schedules (1:1, each scale 3 times but
  the last two: 2 and 1, as the official plans). Columns: forward calls (steps + the text prefill), token rows
  (query tokens x batch, summed over the calls), seconds of the loop, GFLOP (counted: every linear layer and the
  attention's two matmuls over the keys each query sees), GFLOP/s and % of the peak, ms per forward call. Rows:
  ``before`` = the former path (KV cache concatenated per step and layer, RoPE tables rebuilt per step; float32),
  ``fp32`` = today's path in float32, ``bf16`` = today's path in bf16 (only where the CPU has native bf16:
  ``infinitystar.hardware``), ``+compile`` (with ``--compile``) = the chosen dtype with ``torch.compile``d blocks,
  its compilation reported apart as the warm-up.
* ``vae``: the VAE decode of 2 s (33 frames at 64x64) for the demo and tiny-test VAEs (random weights), in frames/s,
  with the former ``conv3d`` path beside the shape-chosen convolution (``infinitystar.vae.layers``).
* ``train``: one training step (forward, per-bit loss, backward; no optimizer) of the medium size on the 0.25M
  17-frame video sequence, attention dense-masked (the former path) against computed over visible blocks only;
  tokens/s and % of the peak, with the FLOPs counted as 3 x the forward's over the *visible* (query, key) pairs.
* ``demo``: the shipped demo model's 2 s and 6 s clips end to end (prompt, loop, decode; ``output_type="np"``), the
  former path against today's, in float32 and in the dtype the pipeline chooses.

Timings are the best of ``--repeats`` after a warm-up. The run waits (up to ``--idle-wait`` s) for the machine to be
idle first: two processes that each start their threads on the same cores slow each other down many times over, so
a figure measured beside another job is not a figure of this code. The load average is printed with the results.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_gpu import generation_work  # noqa: E402 (sibling benchmark script)
from bench_train_step import synthetic_sample  # noqa: E402

from infinitystar import hardware  # noqa: E402
from infinitystar.config import TransformerConfig, get_preset, precision_policy, replace  # noqa: E402
from infinitystar.generation import loop as loop_module  # noqa: E402
from infinitystar.generation.plan import GenerationPlan, resolve_size  # noqa: E402
from infinitystar.generation.schedules import num_scales_for_pn  # noqa: E402
from infinitystar.train.loss import LossWeighting  # noqa: E402
from infinitystar.train.step import train_step  # noqa: E402
from infinitystar.transformer.model import InfinityStarTransformer  # noqa: E402

SIZES = {
    "tiny": get_preset("transformer", "tiny-test"),
    "medium": TransformerConfig(depth=8, embed_dim=512, num_heads=8, num_kv_heads=4, head_dim=64, mlp_intermediate=2048,
                                text_channels=64, block_chunks=1),
    "large": TransformerConfig(depth=12, embed_dim=768, num_heads=12, num_kv_heads=4, head_dim=64,
                               mlp_intermediate=3072, text_channels=64, block_chunks=1),
}
SCHEDULES = ("0.06M", "0.25M")
TEXT_TOKENS = 16
PROMPT = "a blue circle moving right"


# ----------------------------------------------------------------------------------------------
# Machine
# ----------------------------------------------------------------------------------------------


def cpu_description() -> str:
    model, flags = hardware._cpuinfo()
    shown = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile", "bf16", "sve") if f in flags]
    return f"{model or platform.processor()} ({os.cpu_count()} logical CPUs; flags: {' '.join(shown) or 'n/a'})"


def wait_for_idle(max_wait: float, threshold: float = 0.6) -> float:
    """Wait until the 1-minute load average drops under ``threshold`` (or ``max_wait`` s pass); returns it."""
    if not hasattr(os, "getloadavg"):
        return float("nan")
    deadline = time.monotonic() + max_wait
    load = os.getloadavg()[0]
    while load > threshold and time.monotonic() < deadline:
        time.sleep(5)
        load = os.getloadavg()[0]
    return load


def matmul_peak(dtype: torch.dtype, n: int = 1024, seconds: float = 0.5) -> float:
    """GFLOP/s of an ``n``-cube mm (the best of a few timed bursts)."""
    return max(hardware.matmul_gflops(dtype, n=n, min_seconds=seconds / 3) for _ in range(3))


def best_of(call: Callable[[], object], repeats: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        call()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        call()
        times.append(time.perf_counter() - t0)
    return min(times)


@dataclass
class Peaks:
    fp32: float
    bf16: float

    def of(self, precision: str) -> float:
        return self.bf16 if precision == "bf16" else self.fp32


# ----------------------------------------------------------------------------------------------
# The autoregressive loop
# ----------------------------------------------------------------------------------------------


def loop_config(size: str, pn: str):
    """tiny-test's pipeline (bytes text encoder, tiny VAE) with a transformer of ``size`` on the full ``pn`` pyramid."""
    base = get_preset("pipeline", "tiny-test")
    k = num_scales_for_pn(pn)
    reps = (3,) * (k - 2) + (2, 1)
    # Three semantic scales (1x1 .. 3x3, under 16 tokens), detail from 4x4 on: the head and tokenizer rules agree.
    t = replace(SIZES[size], text_maxlen=64, semantic_scales=3, detail_scale_min_tokens=16, rope_max_frames=21)
    return replace(base, transformer=t, pn=pn, num_scales=None, image_repetition=reps, video_repetition=reps)


@contextlib.contextmanager
def former_path(model: InfinityStarTransformer) -> Iterator[None]:
    """The loop as it was: the KV cache concatenated per step and layer, RoPE tables rebuilt for every step (for the
    loop called here and the pipeline's)."""
    from infinitystar import pipeline as pipeline_module

    real = loop_module.generate_codes
    model.kv_cache_preallocate = False

    def former(*args, **kwargs):
        return real(*args, reuse_rope_tables=False, **kwargs)

    loop_module.generate_codes = pipeline_module.generate_codes = former
    try:
        yield
    finally:
        loop_module.generate_codes = pipeline_module.generate_codes = real
        model.kv_cache_preallocate = None


def bench_loop(sizes: list[str], schedules: list[str], peaks: Peaks, repeats: int, use_compile: bool,
               auto_precision: str) -> list[str]:
    lines = [f"{'size':>6} {'schedule':>8} {'path':>9} {'calls':>5} {'rows':>7} {'s':>8} {'GFLOP':>7} {'GFLOP/s':>8} "
             f"{'% peak':>6} {'ms/call':>8} {'speed-up':>8}"]
    print(lines[0], flush=True)
    for pn in schedules:
        for size in sizes:
            cfg = loop_config(size, pn)
            _, pyramid, _ = resolve_size(cfg)
            plan = GenerationPlan(cfg, 17, pyramid, cfg.sampling)
            work = generation_work(cfg, 17, None, TEXT_TOKENS)
            calls = len(plan.steps.steps) + 1
            rows = 2 * (work.visual_tokens + TEXT_TOKENS)
            torch.manual_seed(0)
            model = InfinityStarTransformer(cfg.transformer).eval()
            text = torch.randn(TEXT_TOKENS, cfg.transformer.text_channels)

            def run(model=model, cfg=cfg, plan=plan, text=text):
                g = torch.Generator().manual_seed(0)
                return loop_module.generate_codes(model, cfg.quantizer, text, plan.schedule, plan.steps,
                                                  plan.repetitions, cfg.sampling, generator=g)

            variants: list[tuple[str, str, Callable[[], contextlib.AbstractContextManager]]] = [
                ("before", "fp32", lambda model=model: former_path(model)),
                ("fp32", "fp32", contextlib.nullcontext),
            ]
            if auto_precision == "bf16":
                variants.append(("bf16", "bf16", contextlib.nullcontext))
            base_s = None
            for name, precision, context in variants:
                model.set_precision(precision_policy(precision))
                with context():
                    seconds = best_of(run, repeats)
                base_s = base_s or seconds
                lines.append(_loop_row(size, pn, name, calls, rows, seconds, work.flops, peaks.of(precision), base_s))
            if use_compile:
                model.set_precision(precision_policy(auto_precision))
                model.compile_blocks()
                t0 = time.perf_counter()
                run()
                warmup = time.perf_counter() - t0
                seconds = best_of(run, repeats, warmup=0)
                lines.append(_loop_row(size, pn, "+compile", calls, rows, seconds, work.flops,
                                       peaks.of(auto_precision), base_s) + f"  (compile warm-up {warmup:.1f} s)")
                torch._dynamo.reset()
            print("\n".join(lines[-len(variants) - use_compile:]), flush=True)
    return lines


def _loop_row(size, pn, name, calls, rows, seconds, flops, peak, base_s) -> str:
    gflops = flops / seconds / 1e9
    return (f"{size:>6} {pn:>8} {name:>9} {calls:5d} {rows:7d} {seconds:8.3f} {flops / 1e9:7.1f} {gflops:8.1f} "
            f"{100 * gflops / peak:5.0f}% {1e3 * seconds / calls:8.2f} {base_s / seconds:7.2f}x")


# ----------------------------------------------------------------------------------------------
# VAE decode
# ----------------------------------------------------------------------------------------------


def bench_vae(repeats: int) -> list[str]:
    from infinitystar.pipeline import DEMO_MODEL_ID, InfinityStarPipeline
    from infinitystar.vae import layers

    lines = [f"{'VAE':>9} {'frames':>6} {'path':>7} {'s':>7} {'frames/s':>9} {'speed-up':>8}"]
    demo = InfinityStarPipeline.from_pretrained(DEMO_MODEL_ID, precision="fp32").vae
    tiny = InfinityStarPipeline.from_preset("tiny-test").vae
    for name, vae, hw in (("demo", demo, 4), ("tiny-test", tiny, 4)):
        latent = torch.randn(1, vae.config.embed_dim, 9, hw, hw, generator=torch.Generator().manual_seed(0)) * 0.5
        frames = 1 + 4 * 8
        base = None
        for impl in ("conv3d", "auto"):
            with layers.conv_impl(impl), torch.no_grad():
                seconds = best_of(lambda vae=vae, latent=latent: vae.decode(latent), repeats)
            base = base or seconds
            path = "before" if impl == "conv3d" else "now"
            lines.append(f"{name:>9} {frames:6d} {path:>7} {seconds:7.3f} {frames / seconds:9.1f} "
                         f"{base / seconds:7.2f}x")
    print("\n".join(lines), flush=True)
    return lines


# ----------------------------------------------------------------------------------------------
# Training step
# ----------------------------------------------------------------------------------------------


def visible_pairs(sample, cfg: TransformerConfig) -> tuple[int, int]:
    """(visible (query, key) pairs, padded sequence length) of the sample's packed layout."""
    from infinitystar.train.step import pack_inputs
    from infinitystar.transformer.sequence import build_packed_layout

    layout = build_packed_layout(pack_inputs([sample])[0], cfg)
    seg = layout.segment_ids()
    counts = torch.bincount(seg, minlength=layout.segment_mask.shape[0]).double()
    return int(counts @ layout.segment_mask.double() @ counts), int(seg.shape[0])


def train_flops(cfg: TransformerConfig, seq_len: int, pairs: int) -> float:
    """3 x the forward: linears over every row of the padded sequence, attention over the visible pairs."""
    from infinitystar.memory.estimate import block_linear_shapes

    per_row = cfg.depth * sum(o * i for o, i in block_linear_shapes(cfg))
    forward = 2.0 * seq_len * per_row + 4.0 * pairs * cfg.num_heads * cfg.head_dim * cfg.depth
    return 3 * forward


def bench_train(size: str, pn: str, peaks: Peaks, repeats: int, auto_precision: str) -> list[str]:
    cfg = replace(SIZES[size], text_maxlen=64, semantic_scales=3, detail_scale_min_tokens=16)
    sample = synthetic_sample_for(cfg, pn)
    pairs, seq = visible_pairs(sample, cfg)
    flops = train_flops(cfg, seq, pairs)
    torch.manual_seed(0)
    model = InfinityStarTransformer(cfg)
    lines = [f"train {size} on the {pn} 17-frame video: {seq} tokens, {pairs / seq ** 2:.0%} of the pairs visible, "
             f"{flops / 1e9:.0f} GFLOP per step (3 x forward, visible pairs)",
             f"{'attention':>10} {'dtype':>5} {'s':>7} {'tokens/s':>9} {'GFLOP/s':>8} {'% peak':>6} {'vs dense':>8} "
             f"{'loss':>9}"]
    precisions = ["fp32"] + (["bf16"] if auto_precision == "bf16" else [])
    for precision in precisions:
        dtype = torch.bfloat16 if precision == "bf16" else None
        dense_s = None
        for backend in ("dense", "sdpa"):
            losses = []

            def step(backend=backend, dtype=dtype, losses=losses):
                model.zero_grad(set_to_none=True)
                m = train_step(model, None, [sample], LossWeighting(4, 40), backend=backend, autocast_dtype=dtype)
                losses.append(m.loss)

            # A step at 0.25M takes minutes in fp32: with one repeat, no warm-up (one-time costs are a rounding there).
            seconds = best_of(step, repeats, warmup=0 if repeats == 1 else 1)
            dense_s = dense_s or seconds
            gflops = flops / seconds / 1e9
            name = "dense" if backend == "dense" else "visible"
            lines.append(f"{name:>10} {precision:>5} {seconds:7.2f} {seq / seconds:9.0f} {gflops:8.1f} "
                         f"{100 * gflops / peaks.of(precision):5.0f}% {seconds / dense_s:7.0%} {losses[-1]:9.5f}")
    print("\n".join(lines), flush=True)
    return lines


def synthetic_sample_for(cfg: TransformerConfig, pn: str):
    """bench_train_step's synthetic 17-frame video sample, on the ``pn`` schedule."""
    import bench_train_step

    real = bench_train_step.build_scale_schedule
    bench_train_step.build_scale_schedule = lambda _pn, ratio, frames: real(pn, ratio, frames)
    try:
        return synthetic_sample(cfg, "video", 32)
    finally:
        bench_train_step.build_scale_schedule = real


# ----------------------------------------------------------------------------------------------
# The demo, end to end
# ----------------------------------------------------------------------------------------------


def bench_demo(repeats: int, auto_precision: str) -> list[str]:
    from infinitystar.pipeline import DEMO_MODEL_ID, InfinityStarPipeline
    from infinitystar.vae import layers

    lines = [f"{'demo clip':>9} {'path':>7} {'dtype':>5} {'s':>7} {'decode s':>8} {'speed-up':>8}"]
    variants = [("before", "fp32"), ("now", "fp32")] + ([("now", "bf16")] if auto_precision == "bf16" else [])
    for length in (2, 6):
        base = None
        for path, precision in variants:
            pipe = InfinityStarPipeline.from_pretrained(DEMO_MODEL_ID, precision=precision)
            impl = "conv3d" if path == "before" else "auto"
            context = former_path(pipe.transformer) if path == "before" else contextlib.nullcontext()
            with layers.conv_impl(impl), context:
                total = best_of(lambda pipe=pipe, length=length: pipe(PROMPT, seconds=length, output_type="np",
                                                                      progress=False, seed=0), repeats)
                latent = pipe(PROMPT, seconds=length, output_type="latent", progress=False, seed=0).frames
                decode = best_of(lambda pipe=pipe, latent=latent: pipe.decode_latent(latent), repeats)
            base = base or total
            lines.append(f"{length:>7} s {path:>7} {precision:>5} {total:7.3f} {decode:8.3f} {base / total:7.2f}x")
    print("\n".join(lines), flush=True)
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--parts", default="peak,loop,vae,train,demo")
    parser.add_argument("--sizes", default="tiny,medium,large")
    parser.add_argument("--schedules", default=",".join(SCHEDULES))
    parser.add_argument("--train-size", default="medium", choices=sorted(SIZES))
    parser.add_argument("--train-schedule", default="0.25M", choices=SCHEDULES)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--compile", action="store_true", help="also time torch.compile'd blocks (warm-up apart)")
    parser.add_argument("--quick", action="store_true", help="tiny + medium at 0.06M, the train step at 0.06M")
    parser.add_argument("--idle-wait", type=float, default=120.0, help="seconds to wait for an idle machine")
    args = parser.parse_args()
    if args.quick:
        args.sizes, args.schedules, args.train_schedule = "tiny,medium", "0.06M", "0.06M"
    torch.set_num_threads(args.threads)
    parts = set(args.parts.split(","))

    load = wait_for_idle(args.idle_wait)
    choice = hardware.cpu_precision()
    print(f"CPU: {cpu_description()}")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, 1-min load average {load:.2f} at the start")
    print(f"the pipeline's CPU precision: {choice.reason}")
    peaks = Peaks(matmul_peak(torch.float32), matmul_peak(torch.bfloat16))
    print(f"matmul peak (1024^3 mm): fp32 {peaks.fp32:.0f} GFLOP/s, bf16 {peaks.bf16:.0f} GFLOP/s\n", flush=True)
    auto = choice.precision
    if "loop" in parts:
        bench_loop(args.sizes.split(","), args.schedules.split(","), peaks, args.repeats, args.compile, auto)
        print()
    if "vae" in parts:
        bench_vae(max(args.repeats, 3))
        print()
    if "train" in parts:
        bench_train(args.train_size, args.train_schedule, peaks, args.repeats, auto)
        print()
    if "demo" in parts:
        bench_demo(max(args.repeats, 3), auto)
    if hasattr(os, "getloadavg"):
        print(f"\n1-min load average at the end: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()

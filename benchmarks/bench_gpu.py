"""Speed and GPU memory of one text-to-video generation per preset and memory mode, with random weights.

    PYTHONPATH=src python benchmarks/bench_gpu.py [--preset official-480p,official-720p] [--modes plain,smallest]
                                                  [--seconds 5] [--compile]

Each row builds the pipeline with random weights straight on the device (``random_pipeline_components``: meta
build, materialized in bf16 on CUDA, nothing downloaded, the Flan-T5-XL stand-in for the official presets), applies
the memory mode (``pipe.set_memory_mode``), warms the kernels up with a 5-frame video, then runs one text-to-video call
(the preset's schedule, guidance and KV cache: ``pipe(prompt, seconds=..., output_type="latent")``) and the VAE
decode (``pipe.decode_latent``) separately, with ``torch.cuda.synchronize`` around every timing. Columns:

* ``loop s``: the autoregressive loop alone (the pipeline's ``generate_codes`` call, timed from a wrapper);
  ``decode s``: the VAE decode of the latent;
* ``alloc`` / ``reserved``: ``torch.cuda.max_memory_allocated`` / ``max_memory_reserved`` over the call and the
  decode (reset per row, after the build), GiB; ``est``: the memory model's peak for the mode
  (``infinitystar.memory.estimate``; it leaves out the CUDA context, as ``max_memory_allocated`` does);
* ``tok/s``: visual tokens produced per second of the loop, where the tokens are the sum over the loop's steps of
  the step's query tokens (t*h*w of its scale; every repetition counts; the guidance batch of 2 does not);
* ``TFLOP/s`` and ``% peak``: the generation's FLOPs estimated from the config (2 x the weights a token meets x
  tokens x guidance batch, plus 4 x batch x heads x queries x keys x head_dim per layer for attention, the text
  prefix included) over the loop's seconds, and that against the device's matmul peak measured in the same run
  (bf16 8192^3 ``torch.mm`` on CUDA, float32 1024^3 on a CPU);
* ``vs plain``: the loop's time against the ``plain`` row of the same preset (the baseline).

With ``--compile`` the blocks are ``torch.compile``d and one extra generation of the same length runs first: its
extra time over the measured run is reported as the compile warm-up.

Without a GPU (and without ``--preset``/``--modes``) the script exercises every code path on the ``tiny-test``
preset, 1 s (17 frames), modes plain, model_offload, block_offload and int8, in well under a minute; memory columns
then read "n/a" (the estimate is still printed). Missing torchao only disables the int8/fp8 modes, with a note.
"""

from __future__ import annotations

import argparse
import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from infinitystar.config import PipelineConfig, get_preset
from infinitystar.generation.plan import RESOLUTIONS, GenerationPlan, num_frames_for, resolve_size
from infinitystar.memory import MEMORY_MODES
from infinitystar.memory.estimate import GIB, block_linear_shapes, estimate_memory
from infinitystar.memory.materialize import random_pipeline_components

PROMPT = "a red fox runs through fresh snow at sunrise, the camera follows it"
CPU_PRESET, CPU_MODES, CPU_SECONDS = "tiny-test", ("plain", "model_offload", "block_offload", "int8"), 1.0
GPU_PRESETS, GPU_MODES, GPU_SECONDS = ("official-480p", "official-720p"), ("plain", "smallest"), 5.0


# ----------------------------------------------------------------------------------------------
# Device figures
# ----------------------------------------------------------------------------------------------


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak_flops(device: torch.device, iters: int = 10) -> tuple[float, str]:
    """Measured matmul FLOP/s of ``device`` (bf16 8192^3 on CUDA, float32 1024^3 on a CPU) and what was measured."""
    n, dtype = (8192, torch.bfloat16) if device.type == "cuda" else (1024, torch.float32)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        torch.mm(a, b)
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(iters):
        torch.mm(a, b)
    _sync(device)
    seconds = time.perf_counter() - t0
    return 2 * n ** 3 * iters / seconds, f"{str(dtype).removeprefix('torch.')} {n}^3 mm"


# ----------------------------------------------------------------------------------------------
# Work of one generation, from the config
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Work:
    visual_tokens: int  # sum over steps of the step's query tokens
    flops: float


def generation_work(cfg: PipelineConfig, num_frames: int, resolution: str | None, text_tokens: int) -> Work:
    """Visual tokens and FLOPs of one text-to-video generation (see the module docstring for the definitions)."""
    t = cfg.transformer
    _, pyramid, _ = resolve_size(cfg, resolution=resolution)
    steps = GenerationPlan(cfg, num_frames, pyramid, cfg.sampling).steps.steps
    batch = 2 if cfg.sampling.uses_guidance else 1
    per_token_blocks = t.depth * sum(o * i for o, i in block_linear_shapes(t))
    attn = 4 * batch * t.num_heads * t.head_dim * t.depth  # x queries x keys
    flops = 2.0 * batch * text_tokens * (per_token_blocks + t.text_channels * t.embed_dim)
    flops += attn * text_tokens * text_tokens
    tokens = {s.si: s.query_tokens for s in steps}
    visual = 0
    for s in steps:
        q = s.query_tokens
        bits = t.detail_bits if s.detail_head else t.semantic_bits
        # code_embed runs once on the un-repeated codes; the blocks and the head on the guidance batch.
        flops += 2.0 * q * t.d_vae * t.embed_dim + 2.0 * batch * q * (per_token_blocks + t.embed_dim * 2 * bits)
        flops += attn * q * (text_tokens + sum(tokens[r] for r in s.ref_sids) + q)
        visual += q
    return Work(visual, flops)


# ----------------------------------------------------------------------------------------------
# One row
# ----------------------------------------------------------------------------------------------


class LoopTimer:
    """Wraps the pipeline's ``generate_codes``: times the autoregressive loop and keeps its text length and result."""

    def __init__(self, device: torch.device) -> None:
        import infinitystar.pipeline as pipeline_module

        self.module, self.device = pipeline_module, device
        self.real = pipeline_module.generate_codes
        self.seconds = 0.0
        self.text_tokens = 0
        self.result = None

    @contextlib.contextmanager
    def active(self) -> Iterator[LoopTimer]:
        def timed(*args, **kwargs):
            _sync(self.device)
            t0 = time.perf_counter()
            out = self.real(*args, **kwargs)
            _sync(self.device)
            self.seconds = time.perf_counter() - t0
            self.text_tokens = int(args[2].shape[0])
            self.result = out
            return out

        self.module.generate_codes = timed
        try:
            yield self
        finally:
            self.module.generate_codes = self.real


@dataclass
class Row:
    preset: str
    mode: str
    loop_s: float
    decode_s: float
    alloc: float | None
    reserved: float | None
    estimate: float
    tokens_per_s: float
    tflops: float
    peak_fraction: float
    compile_s: float | None = None
    note: str = ""


def _mode_unavailable(name: str, device: torch.device) -> str | None:
    """Why memory mode ``name`` cannot run here (None if it can)."""
    quant = MEMORY_MODES[name].quantize
    if quant is None:
        return None
    try:
        from infinitystar.memory.quantize import fp8_supported, torchao_available
    except ImportError as exc:  # pragma: no cover - the module imports torchao lazily
        return f"quantization unavailable ({exc})"
    if not torchao_available():
        return "torchao is not installed (pip install 'infinitystar[quant]'): int8/fp8 modes disabled"
    if quant == "fp8" and not fp8_supported(device):
        return "fp8 needs a CUDA GPU of compute capability 8.9+"
    return None


def run_row(preset: str, mode: str, device: torch.device, seconds: float, use_compile: bool,
            peak_flops: float) -> Row:
    from infinitystar.pipeline import InfinityStarPipeline

    cfg = get_preset("pipeline", preset)
    resolution = next((r for r, pn in RESOLUTIONS.items() if pn == cfg.pn), None)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    precision = "bf16" if device.type == "cuda" else "fp32"
    transformer, vae, text = random_pipeline_components(cfg, device, dtype, seed=0)
    pipe = InfinityStarPipeline(transformer, vae, text, cfg).set_precision(precision)
    pipe.set_memory_mode(mode, device=device)
    num_frames = num_frames_for(cfg, None, seconds)
    kw = {"resolution": resolution, "output_type": "latent", "progress": False, "seed": 0}
    timer = LoopTimer(device)
    compile_s = None
    if use_compile:
        pipe.compile_blocks()
        with timer.active():
            _sync(device)
            t0 = time.perf_counter()
            pipe(PROMPT, num_frames=num_frames, **kw)
            _sync(device)
            compile_s = time.perf_counter() - t0
    # Warm-up on the shortest video (the first frame + one latent frame): every kind of step and the decoder's chunks
    # meet their kernels (cuBLAS/oneDNN plans, allocator pools) at a fraction of the measured run's cost.
    warm = pipe(PROMPT, num_frames=1 + cfg.vae.time_stride, **kw)
    pipe.decode_latent(warm.latent)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    with timer.active():
        out = pipe(PROMPT, num_frames=num_frames, **kw)
    _sync(device)
    t0 = time.perf_counter()
    video = pipe.decode_latent(out.latent)
    _sync(device)
    decode_s = time.perf_counter() - t0
    assert torch.isfinite(video).all(), "the decoded video has non-finite values"
    alloc = reserved = None
    if device.type == "cuda":
        alloc = torch.cuda.max_memory_allocated(device) / GIB
        reserved = torch.cuda.max_memory_reserved(device) / GIB
    work = generation_work(cfg, num_frames, resolution, timer.text_tokens)
    est = estimate_memory(cfg, mode, num_frames=num_frames, resolution=resolution, precision=precision,
                          attention="flash", text_tokens=timer.text_tokens)
    if compile_s is not None:
        compile_s -= timer.seconds  # the first run's extra time over the measured loop
    flops_per_s = work.flops / timer.seconds
    del pipe, transformer, vae, text, out, video
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return Row(preset, mode, timer.seconds, decode_s, alloc, reserved, est.peak / GIB,
               work.visual_tokens / timer.seconds, flops_per_s / 1e12, flops_per_s / peak_flops, compile_s)


# ----------------------------------------------------------------------------------------------


def _fmt(v: float | None, spec: str) -> str:
    return "n/a" if v is None else format(v, spec)


def print_table(rows: list[Row]) -> None:
    head = (f"{'preset':<15} {'mode':<14} {'loop s':>8} {'decode s':>9} {'alloc GiB':>10} {'reserved':>9} "
            f"{'est GiB':>8} {'tok/s':>9} {'TFLOP/s':>8} {'% peak':>7} {'vs plain':>9}")
    if any(r.compile_s is not None for r in rows):
        head += f" {'compile s':>10}"
    print(head)
    base = {r.preset: r.loop_s for r in rows if r.mode == "plain"}
    for r in rows:
        vs = f"{r.loop_s / base[r.preset]:.2f}x" if r.preset in base else "n/a"
        line = (f"{r.preset:<15} {r.mode:<14} {r.loop_s:>8.2f} {r.decode_s:>9.2f} {_fmt(r.alloc, '.2f'):>10} "
                f"{_fmt(r.reserved, '.2f'):>9} {r.estimate:>8.2f} {r.tokens_per_s:>9.0f} {r.tflops:>8.3f} "
                f"{100 * r.peak_fraction:>6.1f}% {vs:>9}")
        if r.compile_s is not None:
            line += f" {r.compile_s:>10.1f}"
        print(line + (f"  ({r.note})" if r.note else ""))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default=None, help="comma-separated pipeline presets (default: "
                        f"{','.join(GPU_PRESETS)} on CUDA, {CPU_PRESET} on a CPU)")
    parser.add_argument("--modes", default=None, help=f"comma-separated memory modes of {list(MEMORY_MODES)} "
                        f"(default: {','.join(GPU_MODES)} on CUDA, {','.join(CPU_MODES)} on a CPU)")
    parser.add_argument("--seconds", type=float, default=None,
                        help=f"video length (default {GPU_SECONDS:g} on CUDA, {CPU_SECONDS:g} on a CPU)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the blocks; report the warm-up apart")
    parser.add_argument("--device", default="auto", help="auto (CUDA when present), cuda, cuda:N or cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads on a CPU")
    args = parser.parse_args()

    from infinitystar.config import resolve_device

    device = resolve_device(args.device)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    cuda = device.type == "cuda"
    presets = args.preset.split(",") if args.preset else list(GPU_PRESETS if cuda else (CPU_PRESET,))
    modes = args.modes.split(",") if args.modes else list(GPU_MODES if cuda else CPU_MODES)
    seconds = args.seconds if args.seconds is not None else (GPU_SECONDS if cuda else CPU_SECONDS)
    for name in presets:
        get_preset("pipeline", name)  # one clear error line for a typo, before anything is built
    unknown = [m for m in modes if m not in MEMORY_MODES]
    if unknown:
        parser.error(f"unknown memory mode(s) {unknown}; valid: {', '.join(MEMORY_MODES)}")

    peak, what = matmul_peak_flops(device)
    name = torch.cuda.get_device_name(device) if cuda else f"CPU ({torch.get_num_threads()} threads)"
    print(f"{name}, torch {torch.__version__}; matmul peak {peak / 1e12:.3f} TFLOP/s ({what}); "
          f"{seconds:g} s videos, random weights, prompt of {len(PROMPT)} characters")
    rows = []
    for preset in presets:
        for mode in modes:
            why = _mode_unavailable(mode, device)
            if why is not None:
                print(f"note: skipping {preset}/{mode}: {why}")
                continue
            if args.compile and MEMORY_MODES[mode].offload == "block":
                print(f"note: skipping {preset}/{mode} with --compile: compiled blocks and block offload do not mix")
                continue
            rows.append(run_row(preset, mode, device, seconds, args.compile, peak))
    print()
    print_table(rows)
    print("(loop = the autoregressive loop; tok/s = visual query tokens of all steps, repetitions counted, the "
          "guidance batch not; est = the memory model's peak; % peak = achieved / measured matmul peak)")


if __name__ == "__main__":
    main()

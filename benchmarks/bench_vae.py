"""Time and peak memory of the video VAE: chunked (causal-cache) vs one-shot, encode and decode.

    .venv/bin/python benchmarks/bench_vae.py                      # official size, 17x256x256, 2 threads
    .venv/bin/python benchmarks/bench_vae.py --frames 33 --size 256 --tile-size 8

The model is the OFFICIAL architecture (184.7M parameters) with random weights (speed and memory
do not depend on the values). Every configuration runs in a fresh subprocess, so one
configuration's allocations cannot hide another's.

Memory: ``resource.getrusage(RUSAGE_SELF).ru_maxrss`` is the process's resident-set high-water
mark as the OS sees it: every byte PyTorch's CPU allocator (malloc) really touched, caches and
temporaries included. tracemalloc sees only Python objects, not tensor storage, so it would be
wrong here. The child reads the high-water mark after building the model and the input (model +
input resident) and again after one encode/decode; "peak extra" is the difference, i.e. the
activation memory of the call. The time is one call under ``torch.no_grad``, after a warm-up on a
minimal input (a full-size warm-up run would raise the high-water mark before the measurement).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time


def _child(args: argparse.Namespace) -> None:
    import torch

    from infinitystar.config import get_preset
    from infinitystar.vae.model import VideoVAE

    torch.set_num_threads(args.threads)
    config = get_preset("vae", args.preset)
    with torch.device("meta"):
        model = VideoVAE(config)
    model.to_empty(device="cpu")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("gamma") or name == "scale_learnable_parameters":
                p.fill_(1.0)
            elif name.endswith("bias"):
                p.zero_()
            else:
                p.normal_(0.0, p[0].numel() ** -0.5, generator=g)
    model.eval().requires_grad_(False)

    t, s = args.frames, args.size
    if args.op == "encode":
        x = torch.rand(1, 3, t, s, s, generator=g) * 2 - 1
    else:
        stride = model.config.space_stride
        x = torch.randn(1, model.config.embed_dim, 1 + (t - 1) // model.config.time_stride, s // stride, s // stride,
                        generator=g)
    kwargs = {"chunked": args.mode != "one-shot"}
    if args.mode == "tiled":
        kwargs["tile_size"] = args.tile_size

    # Warm-up on a minimal input (1 frame / 1 latent, 2x2 cells): thread pool and conv-library
    # initialisation is not part of either configuration's cost, and raises the high-water mark
    # only by a few MiB.
    with torch.no_grad():
        if args.op == "encode":
            model.encode(x[:, :, :1, :32, :32], **kwargs)
        else:
            model.decode(x[:, :, :1, :2, :2], chunked=kwargs["chunked"])
    before_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    with torch.no_grad():
        out = model.encode(x, **kwargs) if args.op == "encode" else model.decode(x, **kwargs)
    seconds = time.perf_counter() - t0
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    n_params = sum(p.numel() for p in model.parameters())
    print(json.dumps({
        "seconds": seconds,
        "baseline_mib": before_kb / 1024,
        "peak_mib": peak_kb / 1024,
        "extra_mib": (peak_kb - before_kb) / 1024,
        "in_shape": list(x.shape),
        "out_shape": list(out.shape),
        "params": n_params,
    }))


def _run(op: str, mode: str, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, __file__, "--child", "--op", op, "--mode", mode, "--frames", str(args.frames),
           "--size", str(args.size), "--threads", str(args.threads), "--preset", args.preset,
           "--tile-size", str(args.tile_size or 0)]
    res = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if res.returncode != 0:
        raise RuntimeError(f"{op}/{mode} failed:\n{res.stderr}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--frames", type=int, default=17, help="pixel frames (1 + 4k)")
    ap.add_argument("--size", type=int, default=256, help="square frame size in pixels (multiple of 16)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--preset", default="official", help="VAE preset (default: official)")
    ap.add_argument("--tile-size", type=int, default=0, help="also time a tiled decode with this tile (latent cells)")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--op", choices=["encode", "decode"], help=argparse.SUPPRESS)
    ap.add_argument("--mode", choices=["chunked", "one-shot", "tiled"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        _child(args)
        return

    modes = ["chunked", "one-shot"]
    print(f"VAE preset {args.preset!r}, clip {args.frames}x{args.size}x{args.size}, {args.threads} CPU threads, "
          f"fp32, one fresh process per configuration")
    results = {}
    for op in ("encode", "decode"):
        for mode in modes + (["tiled"] if op == "decode" and args.tile_size else []):
            results[op, mode] = r = _run(op, mode, args)
            print(f"  ran {op:6s} {mode:8s}: {r['seconds']:.1f} s", flush=True)
    any_r = next(iter(results.values()))
    print(f"\nparameters: {any_r['params']:,}; model+input resident before each call ~{any_r['baseline_mib']:.0f} MiB")
    header = f"{'':8s} | {'chunked':>26s} | {'one-shot':>26s}"
    if args.tile_size:
        header += f" | {'chunked+tiled ' + str(args.tile_size):>26s}"
    print(header)
    print(f"{'':8s} | {'time s':>9s} {'peak extra MiB':>16s} | {'time s':>9s} {'peak extra MiB':>16s}")
    for op in ("encode", "decode"):
        row = f"{op:8s}"
        for mode in modes + (["tiled"] if args.tile_size else []):
            r = results.get((op, mode))
            row += " | " + (f"{r['seconds']:9.1f} {r['extra_mib']:16.0f}" if r else f"{'-':>26s}")
        print(row)
    enc, dec = results["encode", "chunked"], results["decode", "chunked"]
    print(f"\nencode {enc['in_shape']} -> {enc['out_shape']}; decode {dec['in_shape']} -> {dec['out_shape']}")


if __name__ == "__main__":
    main()

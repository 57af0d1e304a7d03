"""Generation speed per task and the memory of a long video, for the tiny-test preset (random weights).

    .venv/bin/python benchmarks/bench_generation.py [--threads 1] [--repeats 3]

Part 1 times one pipeline call per task (text-to-image, a 1 s text-to-video, image-to-video, video
extension, a 4-clip long video, a 2-segment interactive video), end to end: prompt encoding, the
autoregressive loop, the VAE decode. Each figure is the median of ``--repeats`` runs after one warm-up.

Part 2 compares long videos of 1, 2, 3 and 4 clips: the peak KV-cache bytes the loop reports
(``GenerationResult.peak_cache_bytes``) and the process's RSS high-water mark (``VmHWM`` from
``/proc/self/status``, read right after the autoregressive loop and again after the VAE decode), each
run in a fresh subprocess so that one run's peak cannot hide another's.
The KV cache stops growing after the third clip (only the previous clip's last scale is kept, see the
note the script prints); the RSS peak is the VAE decode, which grows with the frames the call returns.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import torch

# tiny-test as an interactive model (the interactive task needs one; in float32 it computes what tiny-test does).
PRESET = "tiny-test-interactive"
PROMPT = "a red ball bounces on a wooden floor"


def _pipeline():
    from infinitystar.pipeline import InfinityStarPipeline

    return InfinityStarPipeline.from_preset(PRESET, seed=0)


def _smooth_video(frames: int, size: int, seed: int = 0) -> torch.Tensor:
    """[3, T, size, size] in [-1, 1]: upsampled low-frequency noise (a stand-in conditioning input)."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(1, 3, frames, 6, 6, generator=g) * 2 - 1
    return torch.nn.functional.interpolate(low, size=(frames, size, size), mode="trilinear")[0]


def _tasks(pipe) -> dict[str, tuple[Callable[[], object], int]]:
    """name -> (call, output frames)."""
    cfg = pipe.config
    size = pipe.resolve_size()[2][0]
    clip = cfg.frames_per_clip
    given = _smooth_video(1 + clip, size)  # one whole clip after the first frame
    image = given[:, 0]
    kw = {"output_type": "np", "progress": False, "seed": 0}
    return {
        "t2i (1 frame)": (lambda: pipe(PROMPT, num_frames=1, **kw), 1),
        "t2v 1 s (17 frames)": (lambda: pipe(PROMPT, num_frames=17, **kw), 17),
        "i2v 1 s (17 frames)": (lambda: pipe(PROMPT, image=image, num_frames=17, **kw), 17),
        f"extend {1 + clip} -> {1 + 2 * clip} frames": (
            lambda: pipe(PROMPT, video=given, num_frames=1 + 2 * clip, **kw), 1 + 2 * clip),
        f"long, 4 clips ({1 + 4 * clip} frames)": (lambda: pipe(PROMPT, num_frames=1 + 4 * clip, **kw), 1 + 4 * clip),
        f"interactive, 2 segments ({1 + 2 * clip} frames)": (
            lambda: pipe.interactive([PROMPT, "the ball stops"], output_type="np", progress=False, seed=0),
            1 + 2 * clip),
    }


class _LoopTimer:
    """Wraps the pipeline's ``generate_codes`` to time the autoregressive loop apart from text/VAE work."""

    def __init__(self) -> None:
        import infinitystar.pipeline as pipeline_module

        self.module = pipeline_module
        self.real = pipeline_module.generate_codes
        self.seconds = 0.0
        self.results: list = []
        self.hwm_after_loop_kib = 0

    def __enter__(self) -> _LoopTimer:
        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            out = self.real(*args, **kwargs)
            self.seconds += time.perf_counter() - t0
            self.results.append(out)
            self.hwm_after_loop_kib = _proc_status_kib("VmHWM")  # before the VAE decode that follows
            return out

        self.module.generate_codes = timed
        return self

    def __exit__(self, *exc) -> None:
        self.module.generate_codes = self.real


def time_tasks(repeats: int) -> list[tuple[str, int, float, float, float]]:
    pipe = _pipeline()
    rows = []
    for name, (call, frames) in _tasks(pipe).items():
        call()  # warm-up (allocator, first-call paths)
        times, loop_times = [], []
        for _ in range(repeats):
            with _LoopTimer() as loop:
                t0 = time.perf_counter()
                out = call()
                times.append(time.perf_counter() - t0)
            loop_times.append(loop.seconds)
        got = len(out.frames)  # type: ignore[attr-defined]
        if got != frames:
            raise RuntimeError(f"{name}: expected {frames} frames, got {got}")
        rows.append((name, frames, statistics.median(times), min(times), statistics.median(loop_times)))
    return rows


# ----------------------------------------------------------------------------------------------
# Memory: one fresh process per run
# ----------------------------------------------------------------------------------------------


def _proc_status_kib(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def child_long_video(clips: int) -> dict[str, float]:
    """Run one long video of ``clips`` video clips; report the loop's peak KV cache and the process's peak RSS."""
    pipe = _pipeline()
    frames = 1 + clips * pipe.config.frames_per_clip
    rss_loaded = _proc_status_kib("VmRSS")
    with _LoopTimer() as loop:  # observes the GenerationResult of the pipeline's own call
        t0 = time.perf_counter()
        out = pipe(PROMPT, num_frames=frames, output_type="np", progress=False, seed=0)
        seconds = time.perf_counter() - t0
    assert len(out.frames) == frames and len(loop.results) == 1
    results = loop.results
    return {"clips": clips, "frames": frames, "seconds": seconds, "peak_cache_bytes": results[0].peak_cache_bytes,
            "rss_after_load_kib": rss_loaded, "vm_hwm_after_loop_kib": loop.hwm_after_loop_kib,
            "vm_hwm_kib": _proc_status_kib("VmHWM")}


def measure_memory(clips: int, threads: int) -> dict[str, float]:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    proc = subprocess.run([sys.executable, __file__, "--child-long", str(clips), "--threads", str(threads)],
                          capture_output=True, text=True, env=env, check=False)
    if proc.returncode:
        raise RuntimeError(f"child run ({clips} clips) failed:\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per task after one warm-up (default 3)")
    parser.add_argument("--child-long", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.child_long is not None:
        print(json.dumps(child_long_video(args.child_long)))
        return

    print(f"preset {PRESET} (random weights), torch {torch.__version__}, {args.threads} thread(s), "
          f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}")
    print()
    print(f"{'task':<40} {'frames':>6} {'median s':>9} {'min s':>8} {'ms/frame':>9} {'AR loop s':>10}")
    for name, frames, med, best, loop in time_tasks(args.repeats):
        print(f"{name:<40} {frames:>6} {med:>9.3f} {best:>8.3f} {1000 * med / frames:>9.1f} {loop:>10.3f}")
    print("(AR loop = the transformer's next-scale loop; the rest is VAE encode/decode and text encoding)")

    print()
    clip_counts = (1, 2, 3, 4)
    runs = [measure_memory(n, args.threads) for n in clip_counts]
    print("long video, one fresh process per run")
    print(f"{'':<28}" + "".join(f"{f'{n} clip' + ('s' if n > 1 else ''):>12}" for n in clip_counts) + f"{'4 / 1':>8}")

    def row(label: str, key: str, scale: float, fmt: str) -> None:
        values = [r[key] / scale for r in runs]
        print(f"{label:<28}" + "".join(f"{v:>12{fmt}}" for v in values) + f"{values[-1] / values[0]:>8.2f}")

    row("frames", "frames", 1, ".0f")
    row("seconds", "seconds", 1, ".3f")
    row("peak KV cache (KiB)", "peak_cache_bytes", 1024, ".1f")
    row("RSS after load (MiB)", "rss_after_load_kib", 1024, ".1f")
    row("VmHWM after AR loop (MiB)", "vm_hwm_after_loop_kib", 1024, ".1f")
    row("VmHWM after decode (MiB)", "vm_hwm_kib", 1024, ".1f")
    print("(the KV cache peaks while a clip's last scale runs: text + the previous clip's last scale + its own; the "
          "first video clip reads only the 1-frame image scale, so the plateau starts at 3 clips)")


if __name__ == "__main__":
    main()

"""Generation time of the shipped demo model (what `infinitystar generate` uses without --model).

    .venv/bin/python benchmarks/bench_demo.py [--threads 1] [--repeats 5]

Times one 2 s clip (33 frames of 64x64) end to end -- prompt encoding, the autoregressive loop over the
scale pyramid, the VAE decode -- with the shipped guidance (CFG: two rows per step) beside the baseline
without guidance (guidance_scale=1: one row), plus text-to-image and the tokenizer round trip
(`InfinityStarPipeline.reconstruct`) of one held-out clip. Each figure is the median of ``--repeats`` runs
after one warm-up.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

PROMPT = "a blue circle moving right"


def _median_seconds(call: Callable[[], object], repeats: int) -> tuple[float, float]:
    call()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        call()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default: 1)")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from infinitystar.demo import load_pipeline
    from infinitystar.demo.synthetic import render_clip, sample_clips

    pipe = load_pipeline(None, None)
    cfg = pipe.config
    clip = sample_clips(1, 0, "heldout")[0]
    video = torch.from_numpy(render_clip(clip.spec)).permute(3, 0, 1, 2).float() / 127.5 - 1
    kw = {"output_type": "np", "progress": False, "seed": 0}
    rows = [
        (f"t2v 33 frames, {cfg.sampling.guidance_method.upper()} {cfg.sampling.guidance_scale:g} (shipped default)",
         lambda: pipe(PROMPT, **kw)),
        ("t2v 33 frames, no guidance (baseline)", lambda: pipe(PROMPT, guidance_scale=1, **kw)),
        ("t2i 1 frame (shipped default)", lambda: pipe(PROMPT, num_frames=1, **kw)),
        ("tokenizer round trip, 33 frames", lambda: pipe.reconstruct(video)),
    ]
    print(f"demo model, {torch.get_num_threads()} thread(s), median of {args.repeats} after one warm-up")
    print(f"{'task':<52} {'median s':>9} {'min s':>7}")
    for name, call in rows:
        med, low = _median_seconds(call, args.repeats)
        print(f"{name:<52} {med:>9.3f} {low:>7.3f}")


if __name__ == "__main__":
    main()

"""Teach the demo model a new word with a LoRA adapter: ``infinitystar train-demo-lora OUT_DIR``.

The shipped demo model knows four directions and three shapes. This recipe teaches it a word it never saw with an
adapter on the transformer only, and measures with the demo judge that the new word is followed and the old
vocabulary kept. The word is ``still`` by default (:data:`~infinitystar.demo.synthetic.NEW_MOTION`: a shape that
does not move) or ``diamond`` (:data:`~infinitystar.demo.synthetic.NEW_SHAPE`, a square turned 45 degrees). An
adapter on the transformer can only recombine what the frozen VAE draws: every frame of a still shape is a frame
of the base world, but today's demo VAE never saw a diamond and turns a third of them into circles, so that word is
not learned (README, "Fine-tuning with LoRA").

1. data: ``videos`` 2 s videos of the new word's triples, and ``replay`` 2 s videos of the base world's training
   triples, so the adapter does not trade the old words for the new one;
2. ``extract-features`` with the base model's VAE;
3. ``train`` with a ``[lora]`` section on the base model (its weights frozen);
4. ``export``: the adapter folder (PEFT's layout);
5. the judge, base model and base + adapter on the same seeds: the new word's prompts (each attribute, and all three),
   and the base world's evaluation prompts (seen and held-out triples).

Every stage runs in this process on the CPU; a rerun skips what is done.
"""

from __future__ import annotations

import json
import os
import time
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from ..fileio import atomic_write_json, atomic_write_text
from ..pipeline import InfinityStarPipeline, UnknownWordsWarning
from ..train.config import DataConfig, TrainConfig, config_from_dict
from ..train.features import extract_features
from ..train.trainer import Trainer, export_run
from ..transformer.lora import ADAPTER_META, ADAPTER_WEIGHTS
from . import DEMO_WEIGHTS, model_world
from .evaluate import default_prompts, evaluate_pipeline
from .synthetic import (
    EVAL_TEMPLATES,
    NEW_MOTION,
    NEW_WORDS,
    WORLD,
    caption,
    make_dataset,
    make_videos,
    triples_for_split,
)

__all__ = ["NEW_WORDS", "LoRADemoOptions", "base_world", "new_word_prompts", "run_lora_demo"]


@dataclass(frozen=True)
class LoRADemoOptions:
    """The word and the sizes of the recipe (the defaults are the ones the README reports)."""

    word: str = NEW_MOTION
    videos: int = 384
    replay: int = 384
    steps: int = 1200
    batch_size: int = 4
    lr: float = 2e-3
    rank: int = 8
    eval_clips_per_prompt: int = 2
    # Only the first K prompts of each evaluation group (None: all; a quick check uses a few).
    eval_limit: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if self.word not in NEW_WORDS:
            raise ValueError(f"LoRADemoOptions.word must be one of {', '.join(NEW_WORDS)}, got {self.word!r}")
        for name in ("videos", "steps", "batch_size", "rank", "eval_clips_per_prompt"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"LoRADemoOptions.{name} must be an int >= 1, got {value!r}")
        if self.eval_limit is not None and self.eval_limit < 1:
            raise ValueError(f"LoRADemoOptions.eval_limit must be >= 1 or None, got {self.eval_limit}")
        if self.replay < 0:
            raise ValueError(f"LoRADemoOptions.replay must be >= 0, got {self.replay}")


def new_word_prompts(word: str = NEW_MOTION) -> list[str]:
    """One prompt per triple of the new word (the evaluation templates in turn: template indices 0 and 1)."""
    return [caption(t, i % len(EVAL_TEMPLATES)) for i, t in enumerate(triples_for_split(word))]


def _log(msg: str) -> None:
    print(f"[train-demo-lora {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _scores(pipe: InfinityStarPipeline, opts: LoRADemoOptions) -> dict[str, Any]:
    """Judge accuracy on the new word's prompts and on the base world's evaluation prompts (same seeds)."""
    k = opts.eval_limit
    groups = {opts.word: new_word_prompts(opts.word)[:k]}
    base_world = {g: ps[:k] for g, ps in default_prompts().items()}
    new = evaluate_pipeline(pipe, groups, n_per_prompt=opts.eval_clips_per_prompt, seed=opts.seed + 1000).summary()
    old = evaluate_pipeline(pipe, base_world, n_per_prompt=opts.eval_clips_per_prompt,
                            seed=opts.seed + 1000).summary()
    return {"new_word": new, "old_vocabulary": old}


def base_world(base: str | os.PathLike) -> str:
    """The demo world a base model learned (its ``training_source.json``): ``"torus"``, or ``"in-frame"`` for the
    earlier 2 s world (no world recorded). The adapter's data is drawn from it: new words in an unknown world teach
    the world instead of the word."""
    return WORLD if model_world(base) == WORLD else "in-frame"


def run_lora_demo(out_dir: str | os.PathLike, options: LoRADemoOptions | None = None,
                  base: str | os.PathLike = DEMO_WEIGHTS) -> dict[str, Any]:
    """Run the recipe into ``out_dir`` (resumable) and return the timings and the before/after scores."""
    opts = options or LoRADemoOptions()
    out = Path(out_dir).resolve()
    data, timings = out / "data", {}
    report = out / "report.json"
    if report.is_file():  # a finished run: its figures, nothing loaded or rerun
        return json.loads(report.read_text(encoding="utf-8"))

    t0 = time.perf_counter()
    jsonls = [data / f"{opts.word}.jsonl"] + ([data / "train.jsonl"] if opts.replay else [])
    if not all(p.is_file() for p in jsonls):
        world = base_world(base)
        _log(f"data: {opts.videos} {opts.word} videos + {opts.replay} replay videos of the base world ({world})")
        for split, n in ((opts.word, opts.videos), ("train", opts.replay)):
            if not n:
                continue
            if world == WORLD:
                make_videos(data, n, opts.seed, split=split, segments=(1,))
            else:  # the earlier world: one clip, the object never leaves the frame
                make_dataset(data, n, opts.seed, split=split)
        timings["data"] = time.perf_counter() - t0

    pipe = InfinityStarPipeline.from_pretrained(base)
    data_cfg = DataConfig(jsonl=tuple(str(p) for p in jsonls), cache_dir=str(out / "cache"), max_seconds=2,
                          cond_dropout=0.1, seed=opts.seed)
    marker = out / "cache" / ".complete"
    if not marker.is_file():
        t0 = time.perf_counter()
        _log("extract-features")
        extract_features(data_cfg, pipe.config, pipe.vae, progress=False)
        atomic_write_text(marker, "ok\n")
        timings["extract_features"] = time.perf_counter() - t0

    adapter = out / "adapter"
    if not (adapter / ADAPTER_WEIGHTS).is_file():
        t0 = time.perf_counter()
        cfg = config_from_dict(TrainConfig, {
            "out_dir": str(out / "run"), "model": {"pipeline": str(base)},
            "optimizer": {"lr": opts.lr, "schedule": "cosine", "warmup_steps": 20, "min_lr_ratio": 0.1},
            "training": {"steps": opts.steps, "batch_size": opts.batch_size, "seed": opts.seed},
            "checkpoint": {"every": max(100, opts.steps // 4), "keep_last_k": 1},
            "scale_subsets": {"var_len": False},
            "parallelism": {"activation_checkpointing": False, "device": "cpu"},
            "lora": {"enabled": True, "rank": opts.rank, "alpha": float(opts.rank), "targets": ["attention", "mlp"]}})
        _log(f"train: LoRA rank {opts.rank}, {opts.steps} steps")
        Trainer(replace(cfg, data=data_cfg), progress=False).run()
        export_run(out / "run", adapter)
        timings["train"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    _log("evaluate: base model, then base + adapter")
    model_parameters = sum(p.numel() for p in pipe.transformer.parameters())
    with warnings.catch_warnings():  # the base model does not know the new word: that is the point of "before"
        warnings.simplefilter("ignore", UnknownWordsWarning)
        before = _scores(pipe, opts)
    pipe.load_lora_weights(adapter, adapter_name=opts.word)
    after = _scores(pipe, opts)
    timings["evaluate"] = time.perf_counter() - t0
    meta = json.loads((adapter / ADAPTER_META).read_text(encoding="utf-8"))
    result = {"word": opts.word, "before": before, "after": after, "timings_s": timings,
              "adapter_bytes": (adapter / ADAPTER_WEIGHTS).stat().st_size,
              "adapter_parameters": meta["parameters"], "model_parameters": model_parameters}
    atomic_write_json(report, result)
    return result

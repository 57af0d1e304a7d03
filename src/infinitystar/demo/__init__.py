"""The demo model: its shipped weights, the loader every front door uses, and its small domain.

* this ``__init__`` -- :data:`DEMO_WEIGHTS` (the pipeline folder that ships in the package), :data:`DEMO_MODEL_ID`
  (its public name: ``InfinityStarPipeline.from_pretrained("infinitystar-demo")`` loads it) and
  :func:`load_pipeline`, the one place that decides which weights a front door runs (a model folder, else the
  demo model, else random weights of a preset); ``cli`` and ``web`` both call it;
* ``synthetic`` -- the demo domain: rendered, captioned clips of one coloured shape moving in a line;
* ``evaluate`` -- an analytic judge of those clips and the evaluation report built on it;
* ``recipe`` -- the demo model's whole training recipe (``infinitystar train-demo``);
* ``weights/`` -- the trained demo pipeline folder (``model_index.json`` and one subfolder per component).

May import: ``pipeline`` and everything below it, ``train`` (the recipe and the evaluation's PSNR). Only the front
doors (``cli``, ``web``) import this package. Nothing outside ``config.py`` and this package special-cases the demo
model: to the rest of the code it is an ordinary preset whose weights happen to ship here.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from ..config import RequestLimits, check_precision, precision_policy, resolve_device
from ..hardware import cpu_precision
from ..memory import memory_mode as memory_mode_named
from ..pipeline import DEMO_MODEL_ID, InfinityStarPipeline
from ..transformer.lora import parse_lora_spec, read_adapter

__all__ = ["DEMO_MODEL_ID", "DEMO_WEIGHTS", "FALLBACK_PRESET", "demo_weights_shipped", "load_pipeline",
           "model_from_run_name", "model_world", "random_weights", "run_model_name"]

# The shipped demo pipeline folder (written by ``infinitystar train-demo --ship``).
DEMO_WEIGHTS = Path(__file__).resolve().parent / "weights"
# Its public name, DEMO_MODEL_ID, is pipeline's (``from_pretrained`` resolves it through pipeline.LOCAL_MODELS, which
# cannot import this package); the run records of the front doors name it.
# What load_pipeline runs, with random weights, when neither a model nor a preset is given and no demo is shipped.
FALLBACK_PRESET = "tiny-test"


def demo_weights_shipped() -> bool:
    """Whether the package holds the demo model (a source checkout before ``train-demo --ship`` does not)."""
    return (DEMO_WEIGHTS / "model_index.json").is_file()


def model_world(model_dir: str | os.PathLike) -> str | None:
    """The demo world a model folder learned, as its ``training_source.json`` records it (``"torus"``: the recipe's
    exports and ``ship`` write it), or None when it records none (the earlier in-frame world, or not a demo model)."""
    try:
        info = json.loads((Path(model_dir) / "training_source.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    world = info.get("world") if isinstance(info, dict) else None
    return world if isinstance(world, str) else None


def load_pipeline(model: str | None, preset: str | None, *, device: str = "auto", precision: str | None = None,
                  limits: Sequence[str] = (),
                  memory_mode: str = "plain", compile_blocks: bool = False,
                  loras: Sequence[str] = ()) -> InfinityStarPipeline:
    """The pipeline a front door runs: ``model`` (a folder), else the demo model, else random weights.

    ``preset`` with ``model`` picks the transformer of an official download; without ``model`` it asks for random
    weights of that preset (a note on stderr says the output is noise; on a GPU they are made there, never in host
    memory). ``device``: ``"auto"`` (CUDA when present), ``"cpu"``, ``"cuda"``/``"cuda:N"``; asking for CUDA without
    one fails in one line before anything loads. ``precision`` None follows the device (bf16 on CUDA; on a CPU bf16
    only where it is native and measured faster, fp32 elsewhere; see :meth:`InfinityStarPipeline.set_precision`),
    and a CPU's choice is reported on stderr in one line. ``memory_mode``: a name of
    :data:`~infinitystar.memory.MEMORY_MODES`. ``compile_blocks``: torch.compile the transformer blocks.
    ``limits``: ``NAME=VALUE`` changes of the request limits (:class:`~infinitystar.config.RequestLimits`).
    ``loras``: LoRA adapter folders as ``PATH[:SCALE]``, loaded
    before the memory mode is set.
    """
    dev = resolve_device(device)  # before loading any weights
    mode = memory_mode_named(memory_mode)
    request_limits = RequestLimits().with_overrides(limits)
    adapters = [parse_lora_spec(spec) for spec in loras]
    for path, _ in adapters:
        read_adapter(path)  # a missing or broken adapter fails before any weights load
    if precision is not None:
        check_precision(precision)
    if model is not None:
        pipe = InfinityStarPipeline.from_pretrained(model, preset=preset, precision=precision)
    elif preset is not None:
        print(f"note: preset {preset!r} with RANDOM weights (no --model given): the output is noise", file=sys.stderr)
        if dev.type == "cpu":
            pipe = InfinityStarPipeline.from_preset(preset)
        else:
            dtype = None if precision is None else precision_policy(precision).block_dtype
            pipe = InfinityStarPipeline.from_preset(preset, device=dev, torch_dtype=dtype)
    elif demo_weights_shipped():
        pipe = InfinityStarPipeline.from_pretrained(DEMO_WEIGHTS)
    else:
        print("note: no demo model is shipped yet; using the tiny-test preset with RANDOM weights: the output is "
              "noise, but every stage of the pipeline runs", file=sys.stderr)
        pipe = InfinityStarPipeline.from_preset(FALLBACK_PRESET)
    if precision is not None:
        pipe.set_precision(precision)
    for path, scale in adapters:
        pipe.load_lora_weights(path, scale=scale)
    pipe.set_memory_mode(mode, dev)
    if precision is None and dev.type == "cpu":
        print(f"note: {cpu_precision().reason} (choose with --dtype)", file=sys.stderr)
    if compile_blocks:
        pipe.compile_blocks()
    pipe.limits = request_limits
    return pipe


def random_weights(model: str | None, preset: str | None) -> bool:
    """Whether :func:`load_pipeline` of ``(model, preset)`` picks random weights (its output is then noise)."""
    return model is None and (preset is not None or not demo_weights_shipped())


def run_model_name(model: str | None, preset: str | None) -> str:
    """The run record's ``model`` for what :func:`load_pipeline` of ``(model, preset)`` loads: the folder as given,
    :data:`DEMO_MODEL_ID`, or ``random:<preset>`` (every front door names runs so)."""
    if model is not None:
        return model
    if random_weights(model, preset):
        return f"random:{preset or FALLBACK_PRESET}"
    return DEMO_MODEL_ID


def model_from_run_name(name: str, preset: str | None) -> tuple[str | None, str | None]:
    """``(model, preset)`` for :func:`load_pipeline` that load what a record's ``model`` names (the inverse of
    :func:`run_model_name`)."""
    if name == DEMO_MODEL_ID:
        return None, None
    if name.startswith("random:"):
        return None, name.removeprefix("random:")
    return name, preset

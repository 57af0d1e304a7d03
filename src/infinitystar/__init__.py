"""infinitystar: a clean PyTorch implementation of InfinityStar (arXiv 2511.04675).

What lives where, lowest layer first; each layer imports only from the layers above it in this list
(``tests/test_layering.py`` checks it, and that no two modules import each other, even through others):

* ``fileio`` -- atomic file writes (stdlib only); ``errors`` -- the command line's error boundary (stdlib, torch);
* ``hardware`` -- what the CPU computes natively, measured once: the default CPU precision (on ``fileio``);
* ``config`` -- model and pipeline configs, precision policies, the registry of named presets;
* ``vae/`` (the video VAE and the multi-scale bitwise quantizer), ``transformer/`` (the spacetime transformer,
  attention, RoPE, packed training sequences), ``text`` (text encoders, prompt template), ``media`` (image and
  video read/write) -- each on ``config`` (and ``fileio``) only, never on each other;
* ``checkpoints`` (safetensors I/O, strict loading, official key layouts), ``generation/`` (schedules, the
  plan of a request, sampling, the autoregressive loop) and ``outputs`` (run records in and beside the files) --
  on the models;
* ``memory/`` -- memory modes, block offload, quantization, the memory model (it replays generation plans);
* ``pipeline`` -- :class:`~infinitystar.pipeline.InfinityStarPipeline`: loading, ``check_inputs``, encode, call,
  decode, output formats; owns no math;
* ``train/`` -- both trainers, their configs, data and checkpointing (they export pipelines);
* ``demo/`` -- the shipped demo model, the loader every front door uses, the demo domain and its judge;
* ``web``, then ``cli`` -- the front doors (``cli serve`` starts ``web``); nothing imports them.

A module that imports nothing from the package (``fileio``, ``generation.schedules``, ``generation.sampling``,
``vae.bsq``, ...) is a leaf and may be imported from any layer: that is how ``config``, ``vae`` and ``transformer``
read the pure schedule tables. Imports sit at module top; only optional heavy extras (``gradio``, the Flan-T5 of
``transformers``) are imported where they are used.

This ``__init__`` imports nothing when it runs, so importing one module (``infinitystar.fileio``, say) never pulls
in the rest. The public names below are resolved on first access by a module-level ``__getattr__`` (PEP 562):
``from infinitystar import InfinityStarPipeline`` imports ``pipeline`` (and torch) then, not before.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# Public name -> the module that defines it (imported lazily, on first access).
_EXPORTS = {
    "InfinityStarPipeline": "pipeline",
    "InfinityStarPipelineOutput": "pipeline",
    "ProgressEvent": "pipeline",
    "Capabilities": "pipeline",
    "export_to_video": "pipeline",
    "MEMORY_MODES": "memory",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})

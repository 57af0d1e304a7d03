"""Fitting the model in GPU memory: named memory modes and the mechanisms behind them.

* :mod:`.modes`: :class:`MemoryMode`, the named modes (``plain``, ``model_offload``, ``block_offload``, ``int8``,
  ``fp8``, ``smallest``) a user picks from the pipeline, the CLI or the page;
* :mod:`.offload`: block-level offload of the transformer (groups of blocks moved onto the GPU in turn);
* :mod:`.quantize`: weight-only int8 / fp8 quantization of the transformer's linear layers (torchao);
* :mod:`.estimate`: the memory model, bytes of weights, KV cache and activations computed from the configuration;
* :mod:`.materialize`: random weights built on the meta device and materialized on the target device and dtype
  (an 8B run with nothing downloaded).

Sits above :mod:`infinitystar.generation` (the memory model replays its plans) and below the pipeline, which
applies a mode.
"""

from .modes import MEMORY_MODES, MemoryMode, memory_mode

__all__ = ["MEMORY_MODES", "MemoryMode", "memory_mode"]

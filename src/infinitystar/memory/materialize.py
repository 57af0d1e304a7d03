"""Random weights built on the meta device and materialized on the target device: an 8B run with nothing downloaded.

A module built under ``torch.device("meta")`` has shapes and dtypes but no storage; ``to_empty(device=...)`` then
allocates its storage directly on the target device, where it is initialised. Nothing model-sized ever exists in
host memory, and the transformer blocks are cast to their inference dtype while still on meta, so the device holds
exactly the inference weights (an 8B transformer in bf16: ~16 GiB, never a float32 copy of ~33 GiB).

The values follow each model's own initialisation (the transformer's :meth:`reset_parameters`, the VAE layers'
PyTorch defaults), drawn from a generator seeded by ``seed`` without touching the caller's global RNG state. They
are not the values of a CPU build with the same seed (that one draws PyTorch's default Linear init first): same
structure, same distribution, different numbers.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from ..config import PipelineConfig, TransformerConfig, VAEConfig, precision_policy, resolve_device
from ..text import ByteTextEncoder, RandomT5Encoder, TextEncoder, WordTextEncoder, flan_t5_xl_config
from ..transformer.model import InfinityStarTransformer
from ..vae.layers import RMSNorm3d
from ..vae.model import VideoVAE


@contextlib.contextmanager
def _seeded(device: torch.device, seed: int) -> Iterator[None]:
    """Seed the RNG of ``device`` (and the CPU's) for the duration, restoring the caller's state afterwards."""
    cuda = device.type == "cuda"  # resolve_device gave it an index
    with torch.random.fork_rng(devices=[device.index] if cuda else [], device_type="cuda" if cuda else None):
        torch.manual_seed(seed)
        yield


@torch.no_grad()
def random_transformer(cfg: TransformerConfig, device: torch.device | str, dtype: torch.dtype | None = None,
                       seed: int = 0) -> InfinityStarTransformer:
    """An :class:`InfinityStarTransformer` with the reference's init, allocated straight on ``device``.

    ``dtype`` is the blocks' weight dtype (None: float32); the embeddings, heads and the unconditional text stay
    float32, as the pipeline's precision policies keep them. A bf16 ``dtype`` also sets the blocks' bf16 autocast
    (what ``set_precision(precision_policy("bf16"))`` does).
    """
    dev = resolve_device(device)
    if dtype is not None and dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"random_transformer dtype must be float32, bfloat16 or float16, got {dtype!r}")
    with torch.device("meta"):
        model = InfinityStarTransformer(cfg)
    if dtype is not None:
        model.blocks.to(dtype)  # on meta: only the recorded dtype changes
    model.to_empty(device=dev)
    with _seeded(dev, seed):
        model.reset_parameters()
    if dtype == torch.bfloat16:
        model.block_autocast = torch.bfloat16
    return model


@torch.no_grad()
def _init_vae(vae: VideoVAE) -> None:
    """Every parameter its layer's default init: convs and linears their ``reset_parameters``, norm gains 1,
    the latent scale its configured initial value. A parameter no rule covers is an error, not garbage memory."""
    done: set[int] = set()
    for module in vae.modules():
        if isinstance(module, nn.Conv3d | nn.Linear):
            module.reset_parameters()
        elif isinstance(module, RMSNorm3d):
            module.gamma.fill_(1.0)
        else:
            continue
        done.update(id(p) for p in module.parameters(recurse=False))
    vae.scale_learnable_parameters.fill_(float(vae.config.latent_scale_init))
    done.add(id(vae.scale_learnable_parameters))
    left = [name for name, p in vae.named_parameters() if id(p) not in done]
    if left:
        raise RuntimeError(f"random_vae has no init rule for parameters {left[:5]} (a new layer type?)")
    if any(True for _ in vae.buffers()):
        raise RuntimeError("random_vae: VideoVAE now has buffers, which to_empty leaves uninitialised")


@torch.no_grad()
def random_vae(cfg: VAEConfig, device: torch.device | str, seed: int = 0) -> VideoVAE:
    """A :class:`VideoVAE` with PyTorch's default layer init, allocated straight on ``device`` in float32 (the VAE
    runs in float32 under every precision, as the reference's)."""
    dev = resolve_device(device)
    with torch.device("meta"):
        vae = VideoVAE(cfg)
    vae.to_empty(device=dev)
    with _seeded(dev, seed):
        _init_vae(vae)
    return vae


def random_text_encoder(cfg: PipelineConfig, device: torch.device | str, seed: int = 0,
                        dtype: torch.dtype | None = None) -> TextEncoder:
    """The preset's text encoder with random weights on ``device``.

    ``"bytes"``/``"words"``: the built-in encoders (tiny, float32). ``"t5"``:
    :class:`~infinitystar.text.RandomT5Encoder`, a Flan-T5-XL-shaped encoder (~1.22B parameters) whose width is the
    preset's ``text_channels``; its weights are ``dtype`` (None: float16 on CUDA as the reference loads Flan-T5,
    float32 elsewhere).
    """
    dev = resolve_device(device)
    width, maxlen = cfg.transformer.text_channels, cfg.transformer.text_maxlen
    if cfg.text_encoder in ("bytes", "words"):
        cls_ = ByteTextEncoder if cfg.text_encoder == "bytes" else WordTextEncoder
        return cls_(width, max_length=maxlen, seed=seed).to(dev)
    if dtype is None:
        dtype = torch.float16 if dev.type == "cuda" else torch.float32
    return RandomT5Encoder(flan_t5_xl_config(d_model=width), dev, dtype=dtype, max_length=maxlen, seed=seed)


def random_pipeline_components(cfg: PipelineConfig, device: torch.device | str, dtype: torch.dtype | None = None,
                               seed: int = 0) -> tuple[InfinityStarTransformer, VideoVAE, TextEncoder]:
    """(transformer, VAE, text encoder) of preset ``cfg`` with random weights, materialized on ``device``.

    ``dtype`` is the transformer blocks' dtype; a bf16 ``dtype`` gives the text encoder the bf16 policy's fp16
    weights (the other components stay float32). Give them to ``InfinityStarPipeline(transformer, vae, text, cfg)``.
    Each component draws from its own seed offset, so changing one component's shape leaves the others' values.
    """
    dev = resolve_device(device)
    transformer = random_transformer(cfg.transformer, dev, dtype, seed=seed)
    vae = random_vae(cfg.vae, dev, seed=seed + 1)
    text_dtype = precision_policy("bf16").text_dtype if dtype == torch.bfloat16 else None
    text = random_text_encoder(cfg, dev, seed=seed + 2, dtype=text_dtype)
    return transformer, vae, text


__all__ = ["random_pipeline_components", "random_text_encoder", "random_transformer", "random_vae"]

"""Random weights built on meta and materialized on a device (memory/materialize.py, text.RandomT5Encoder)."""

from __future__ import annotations

import dataclasses
import resource

import pytest
import torch
from torch import nn

from infinitystar.config import get_preset, precision_policy
from infinitystar.memory.estimate import (
    t5_encoder_parameter_count,
    text_encoder_bytes,
    transformer_bytes,
    vae_parameter_count,
)
from infinitystar.memory.materialize import (
    random_pipeline_components,
    random_text_encoder,
    random_transformer,
    random_vae,
)
from infinitystar.pipeline import InfinityStarPipeline
from infinitystar.text import ByteTextEncoder, RandomT5Encoder, flan_t5_xl_config
from infinitystar.transformer.attention import RMSNorm
from infinitystar.transformer.model import InfinityStarTransformer
from infinitystar.vae.layers import RMSNorm3d
from infinitystar.vae.model import VideoVAE

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = get_preset("pipeline", "tiny-test")


def _same_state(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def _layout(m: nn.Module) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    return {k: (tuple(v.shape), v.dtype) for k, v in m.state_dict().items()}


# ----------------------------------------------------------------------------------------------
# Transformer
# ----------------------------------------------------------------------------------------------


def test_transformer_seeded_and_structure_matches_a_normal_build():
    a = random_transformer(TINY.transformer, "cpu", seed=3)
    b = random_transformer(TINY.transformer, "cpu", seed=3)
    c = random_transformer(TINY.transformer, "cpu", seed=4)
    assert _same_state(a, b)
    assert not torch.equal(a.blocks[0].mlp.up_proj.weight, c.blocks[0].mlp.up_proj.weight)
    normal = InfinityStarTransformer(TINY.transformer)
    assert _layout(a) == _layout(normal)
    assert not any(p.is_meta for p in a.parameters())
    # The unconditional rows come from the model's own CPU generator seeded 0 in both builds: equal bit for bit.
    assert torch.equal(a.uncond_text, normal.uncond_text)


def test_transformer_follows_the_reference_init():
    torch.manual_seed(123)
    before = torch.rand(3)
    torch.manual_seed(123)
    model = random_transformer(TINY.transformer, "cpu", seed=0)
    assert torch.equal(torch.rand(3), before), "materializing must not move the caller's global RNG"
    weights = torch.cat([m.weight.flatten() for m in model.modules() if isinstance(m, nn.Linear)])
    # N(0, 0.02) over n ~ 1e5 samples: the sample std's relative standard error is 1/sqrt(2n) < 0.3%; 3% is >10 SE.
    assert weights.numel() > 50_000
    assert abs(weights.std().item() / 0.02 - 1) < 0.03
    assert abs(weights.mean().item()) < 0.02 * 5 / weights.numel() ** 0.5
    for m in model.modules():
        if isinstance(m, nn.Linear) and m.bias is not None:
            assert torch.equal(m.bias, torch.zeros_like(m.bias))
        if isinstance(m, RMSNorm):
            assert torch.equal(m.weight, torch.ones_like(m.weight))


def test_transformer_bf16_blocks_as_the_pipeline_policy_casts_them():
    model = random_transformer(TINY.transformer, "cpu", dtype=torch.bfloat16, seed=0)
    reference = InfinityStarTransformer(TINY.transformer)
    reference.set_precision(precision_policy("bf16"))
    assert _layout(model) == _layout(reference)
    assert {p.dtype for p in model.blocks.parameters()} == {torch.bfloat16}
    assert {p.dtype for n, p in model.named_parameters() if not n.startswith("blocks.")} == {torch.float32}
    assert model.block_autocast == reference.block_autocast == torch.bfloat16


# ----------------------------------------------------------------------------------------------
# VAE
# ----------------------------------------------------------------------------------------------


def test_vae_seeded_layout_and_default_init():
    a, b, c = random_vae(TINY.vae, "cpu", seed=1), random_vae(TINY.vae, "cpu", seed=1), random_vae(TINY.vae, "cpu", 2)
    assert _same_state(a, b)
    assert not _same_state(a, c)
    assert _layout(a) == _layout(VideoVAE(TINY.vae))
    for m in a.modules():
        if isinstance(m, nn.Conv3d | nn.Linear):
            # PyTorch's default init draws weights from U(-1/sqrt(fan_in), 1/sqrt(fan_in)) (kaiming_uniform, a=sqrt(5))
            # and biases likewise: any uninitialised (to_empty) storage would fall outside or be all zeros.
            bound = 1 / (m.weight[0].numel() ** 0.5)
            assert m.weight.abs().max() <= bound and m.weight.abs().max() > 0.5 * bound
            assert m.bias.abs().max() <= bound
        if isinstance(m, RMSNorm3d):
            assert torch.equal(m.gamma, torch.ones_like(m.gamma))
    assert torch.equal(a.scale_learnable_parameters, torch.full((4,), TINY.vae.latent_scale_init))


def test_random_vae_decodes_to_finite_values():
    vae = random_vae(TINY.vae, "cpu", seed=0).eval()
    latent = torch.randn(1, TINY.vae.embed_dim, 2, 3, 3, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        video = vae.decode(latent)
    assert video.shape == (1, 3, 1 + TINY.vae.time_stride, 3 * TINY.vae.space_stride, 3 * TINY.vae.space_stride)
    assert torch.isfinite(video).all()


# ----------------------------------------------------------------------------------------------
# Text encoders
# ----------------------------------------------------------------------------------------------


def test_random_t5_encoder_like_flan_t5():
    cfg = flan_t5_xl_config(d_model=64, num_layers=2)
    enc = RandomT5Encoder(cfg, "cpu", max_length=16, pad_to_max_length=False, seed=0)
    same = RandomT5Encoder(cfg, "cpu", max_length=16, pad_to_max_length=False, seed=0)
    other = RandomT5Encoder(cfg, "cpu", max_length=16, pad_to_max_length=False, seed=1)
    out = enc(["héllo", "a"])
    # Byte tokenizer: one id per UTF-8 byte plus </s> ("é" is two bytes).
    assert out.lens == (7, 2) and out.kv_compact.shape == (9, 64)
    assert out.kv_compact.dtype == torch.float32 and torch.isfinite(out.kv_compact).all()
    assert torch.equal(out.kv_compact, same(["héllo", "a"]).kv_compact)
    assert not torch.equal(out.kv_compact, other(["héllo", "a"]).kv_compact)
    with pytest.warns(UserWarning, match="truncated"):
        assert enc(["x" * 40]).lens == (16,)
    enc.set_precision(precision_policy("bf16"))
    assert {p.dtype for p in enc.model.parameters()} == {torch.float16}
    assert enc.device == torch.device("cpu") and enc.width == 64


def test_random_text_encoder_follows_the_preset():
    byte = random_text_encoder(TINY, "cpu", seed=0)
    assert isinstance(byte, ByteTextEncoder) and byte.width == TINY.transformer.text_channels
    assert byte.max_length == TINY.transformer.text_maxlen
    # The t5 kind at the tiny width (d_model 32, the rest Flan-T5-XL's: ~19M parameters).
    t5_cfg = dataclasses.replace(TINY, text_encoder="t5")
    t5 = random_text_encoder(t5_cfg, "cpu", seed=0)
    assert isinstance(t5, RandomT5Encoder) and t5.width == 32 and t5.max_length == TINY.transformer.text_maxlen
    n = sum(p.numel() for p in t5.model.parameters())
    assert n == t5_encoder_parameter_count(32)
    assert n * 4 == text_encoder_bytes(t5_cfg, "fp32")
    assert torch.isfinite(t5(["a cat"]).kv_compact).all()


# ----------------------------------------------------------------------------------------------
# The pipeline
# ----------------------------------------------------------------------------------------------


def test_random_pipeline_components_generate():
    transformer, vae, text = random_pipeline_components(TINY, "cpu", torch.float32, seed=0)
    again = random_pipeline_components(TINY, "cpu", torch.float32, seed=0)[0]
    assert _same_state(transformer, again)
    pipe = InfinityStarPipeline(transformer, vae, text, TINY)
    out = pipe("a red ball", num_frames=1, output_type="pt", progress=False, seed=0)
    assert out.frames.shape[1] == 1 and torch.isfinite(out.frames).all()


def test_official_8b_builds_on_meta_without_host_memory():
    """The whole 8B + VAE layout 'materialized' on the meta device: the structure the GPU gets, no bytes anywhere."""
    cfg = get_preset("pipeline", "official-720p")
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    model = random_transformer(cfg.transformer, "meta", dtype=torch.bfloat16)
    vae = random_vae(cfg.vae, "meta")
    grown_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before) / 1024
    assert grown_mib < 256, f"host memory grew {grown_mib:.0f} MiB building the 8B on meta"
    assert sum(p.numel() * p.element_size() for p in model.parameters()) == sum(transformer_bytes(cfg.transformer,
                                                                                                 "bfloat16"))
    assert sum(p.numel() for p in vae.parameters()) == vae_parameter_count(cfg.vae)


@pytest.mark.cuda
def test_8b_materializes_on_the_gpu_holding_exactly_the_weights():
    cfg = get_preset("pipeline", "official-720p")
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    transformer, vae, text = random_pipeline_components(cfg, "cuda", torch.bfloat16, seed=0)
    torch.cuda.synchronize()
    grown_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before) / 1024
    held = torch.cuda.memory_allocated() - base
    want = sum(transformer_bytes(cfg.transformer, "bfloat16")) + 4 * vae_parameter_count(cfg.vae) \
        + text_encoder_bytes(cfg, "bf16")
    tensors = sum(1 for _ in transformer.parameters()) + sum(1 for _ in vae.parameters()) \
        + sum(1 for _ in text.model.parameters())
    # The caching allocator rounds each allocation up to a multiple of 512 bytes: at most 512 extra per tensor.
    assert want <= held <= want + 512 * tensors
    assert grown_mib < 2048, f"host memory grew {grown_mib:.0f} MiB (an 8B copy would be > 16000)"
    assert torch.isfinite(text(["a cat"]).kv_compact).all()

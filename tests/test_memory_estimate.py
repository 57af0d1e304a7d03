"""The memory model (memory/estimate.py): exact weights and KV cache against built models and real generations."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from infinitystar.config import ConfigError, get_preset
from infinitystar.generation.loop import generate_codes
from infinitystar.generation.plan import GenerationPlan, num_frames_for
from infinitystar.memory import MEMORY_MODES, MemoryMode
from infinitystar.memory.estimate import (
    GIB,
    block_bytes,
    estimate_memory,
    t5_encoder_parameter_count,
    transformer_parameter_count,
    vae_parameter_count,
)
from infinitystar.pipeline import InfinityStarPipeline
from infinitystar.transformer.model import InfinityStarTransformer
from infinitystar.vae.model import VideoVAE

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = get_preset("pipeline", "tiny-test")


def _module_bytes(m: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in [*m.parameters(), *m.buffers()])


# ----------------------------------------------------------------------------------------------
# Parameter counts and weight bytes
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("preset", ["tiny-test", "demo", "official-720p", "official-480p"])
def test_parameter_counts_equal_built_models(preset):
    cfg = get_preset("pipeline", preset)
    with torch.device("meta"):  # the 8B too: shapes only, no bytes
        transformer, vae = InfinityStarTransformer(cfg.transformer), VideoVAE(cfg.vae)
    assert transformer_parameter_count(cfg.transformer) == sum(p.numel() for p in transformer.parameters())
    assert vae_parameter_count(cfg.vae) == sum(p.numel() for p in vae.parameters())


def test_official_counts_are_the_released_ones():
    # The official state dicts (config docstrings): 8,768,382,112 transformer parameters of which the 4,096 of the
    # dead sos_token are not kept; the VAE's 184,659,383.
    cfg = get_preset("pipeline", "official-720p")
    assert transformer_parameter_count(cfg.transformer) == 8_768_382_112 - 4_096
    assert vae_parameter_count(cfg.vae) == 184_659_383


def test_t5_xl_count_equals_the_transformers_model():
    from transformers import T5EncoderModel

    from infinitystar.text import flan_t5_xl_config

    with torch.device("meta"):
        model = T5EncoderModel(flan_t5_xl_config())
    assert t5_encoder_parameter_count(2048) == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_weight_bytes_equal_a_built_tiny_pipeline(precision):
    pipe = InfinityStarPipeline.from_preset("tiny-test").set_precision(precision)
    est = estimate_memory(TINY, "plain", num_frames=1, precision=precision)
    if precision == "bf16":
        assert {p.dtype for p in pipe.transformer.blocks.parameters()} == {torch.bfloat16}
    assert est.transformer_weights == _module_bytes(pipe.transformer)
    assert est.vae_weights == _module_bytes(pipe.vae)
    assert est.text_encoder_weights == _module_bytes(pipe.text_encoder)  # 257-row table + position buffer


@pytest.mark.parametrize("block_dtype", [torch.float32, torch.bfloat16])
def test_int8_weight_bytes_equal_torchao_layout(block_dtype):
    pytest.importorskip("torchao")
    from infinitystar.memory.quantize import quantize_blocks, quantized_weight_bytes

    model = InfinityStarTransformer(TINY.transformer)
    model.blocks.to(block_dtype)
    quantize_blocks(model.blocks, "int8")
    linear_weights = {id(m.weight) for m in model.blocks.modules() if isinstance(m, nn.Linear)}
    rest = sum(p.numel() * p.element_size() for p in model.parameters() if id(p) not in linear_weights)
    held = rest + quantized_weight_bytes(model.blocks)
    precision = "bf16" if block_dtype == torch.bfloat16 else "fp32"
    assert estimate_memory(TINY, "int8", num_frames=1, precision=precision).transformer_weights == held


# ----------------------------------------------------------------------------------------------
# KV cache: exactly what the loop reports
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("clips", [0, 1, 3])  # an image, one clip, a three-clip long video
def test_kv_cache_equals_the_loops_peak(clips, precision):
    pipe = InfinityStarPipeline.from_preset("tiny-test").set_precision(precision)
    cfg = pipe.config
    num_frames = 1 + clips * cfg.frames_per_clip
    # As the pipeline calls the loop (pipeline.__call__): templated prompt, the preset's plan, the config's sampling.
    text = pipe.text_encoder([pipe.build_prompt("a red ball bounces", num_frames)]).kv_compact
    _, pyramid, _ = pipe.resolve_size()
    plan = GenerationPlan(cfg, num_frames, pyramid, cfg.sampling)
    result = generate_codes(pipe.transformer, cfg.quantizer, text, plan.schedule, plan.steps, plan.repetitions,
                            cfg.sampling, generator=torch.Generator().manual_seed(0),
                            frames_inner_clip=cfg.frames_inner_clip)
    est = estimate_memory(cfg, "plain", num_frames=num_frames, precision=precision, text_tokens=text.shape[0])
    assert est.kv_cache == result.peak_cache_bytes > 0


def test_kv_cache_grows_with_the_prompt():
    short = estimate_memory(TINY, "plain", num_frames=1, precision="fp32", text_tokens=4)
    long = estimate_memory(TINY, "plain", num_frames=1, precision="fp32", text_tokens=5)
    t = TINY.transformer
    # One more text token: K and V of [2 rows, kv_heads, 1, head_dim] float32 in every layer (the text is in the
    # cache at every step, so the peak moves by exactly that).
    assert long.kv_cache - short.kv_cache == t.depth * 2 * 2 * t.num_kv_heads * t.head_dim * 4


# ----------------------------------------------------------------------------------------------
# The modes at 8B: relations that follow from their definitions
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def official_720p():
    cfg = get_preset("pipeline", "official-720p")
    frames = num_frames_for(cfg, None, 5)
    return cfg, {name: estimate_memory(cfg, name, num_frames=frames, resolution="720p") for name in MEMORY_MODES}


def test_mode_relations_at_720p(official_720p):
    cfg, est = official_720p
    plain, model, block, int8, fp8, smallest = (est[n] for n in ("plain", "model_offload", "block_offload", "int8",
                                                                 "fp8", "smallest"))
    assert smallest.peak < int8.peak < plain.peak
    assert smallest.peak < block.peak < model.peak < plain.peak
    # Same weights, only placed differently: offload modes do not change what the components weigh.
    for e in (model, block):
        assert (e.transformer_weights, e.text_encoder_weights, e.vae_weights) == (
            plain.transformer_weights, plain.text_encoder_weights, plain.vae_weights)
    # Plain holds everything at once.
    assert plain.peak == plain.transformer_weights + plain.text_encoder_weights + plain.vae_weights + max(
        plain.kv_cache + plain.transformer_activations, plain.vae_decode_activations, plain.text_encoder_activations)
    # Model offload: one component at a time, the peak is the largest with its own transients.
    assert model.peak == max(model.text_encoder_weights + model.text_encoder_activations,
                             model.transformer_weights + model.kv_cache + model.transformer_activations,
                             model.vae_weights + model.vae_decode_activations)
    # Block offload: two groups of blocks (4 each) beside the float32 small modules.
    blocks = cfg.transformer.depth * block_bytes(cfg.transformer, "bfloat16")
    small = plain.transformer_weights - blocks
    assert block.resident_transformer == small + 2 * 4 * blocks // cfg.transformer.depth
    # int8: 1 byte per block weight + 5 per output row, against 2 in bf16: a bit more than half the blocks' bytes.
    assert 0.5 < (int8.transformer_weights - small) / blocks < 0.51
    assert fp8.transformer_weights < int8.transformer_weights  # no zero point
    # Tiling bounds the decode; quantization and offload leave the KV cache and activations alone.
    assert smallest.vae_decode_activations < plain.vae_decode_activations
    assert {e.kv_cache for e in est.values()} == {plain.kv_cache}
    assert smallest.peak < 24 * GIB  # the goal: the 8B on a 24 GB card
    assert "GiB" in plain.table() and len(plain.table().splitlines()) == 9


def test_math_attention_adds_the_score_matrix():
    cfg = get_preset("pipeline", "official-480p")
    frames = num_frames_for(cfg, None, 5)
    flash = estimate_memory(cfg, "plain", num_frames=frames, attention="flash")
    math = estimate_memory(cfg, "plain", num_frames=frames, attention="math")
    assert math.transformer_activations > flash.transformer_activations
    assert math.kv_cache == flash.kv_cache and math.transformer_weights == flash.transformer_weights


def test_release_text_encoder_frees_its_weights_while_generating():
    cfg = get_preset("pipeline", "official-480p")
    frames = num_frames_for(cfg, None, 5)
    keep = estimate_memory(cfg, "plain", num_frames=frames)
    release = estimate_memory(cfg, MemoryMode("release", release_text_encoder=True), num_frames=frames)
    # The prompt's encoding (the only phase with the encoder on the GPU either way) is far below the loop and the
    # decode at 8B, so the peak drops by exactly the encoder's weights.
    assert keep.text_encoder_weights + keep.text_encoder_activations < keep.kv_cache + keep.transformer_activations
    assert keep.peak - release.peak == keep.text_encoder_weights


def test_bad_inputs_fail_with_one_clear_line():
    with pytest.raises(ConfigError, match="unknown memory mode 'tiny'"):
        estimate_memory(TINY, "tiny", num_frames=1)
    with pytest.raises(ConfigError, match="attention must be one of"):
        estimate_memory(TINY, "plain", num_frames=1, attention="flex")
    with pytest.raises(ConfigError, match="text_tokens must be in 1..64"):
        estimate_memory(TINY, "plain", num_frames=1, text_tokens=65)
    with pytest.raises(ValueError, match="not available with preset"):
        estimate_memory(get_preset("pipeline", "official-480p"), "plain", num_frames=1, resolution="720p")

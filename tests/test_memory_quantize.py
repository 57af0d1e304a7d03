"""Weight-only quantization of the transformer blocks: what is rounded, how the quantized forward relates to the
int8 weights it holds (a fake-quant reference built here from the int8 data and scales), how far it moves the
logits, and how many bytes it keeps."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from conftest import float32_rounding_tolerance, realistic_transformer, transformer_rounding_path
from infinitystar.config import TransformerConfig, get_preset
from infinitystar.memory.quantize import (
    fp8_supported,
    is_quantized,
    quantize_blocks,
    quantized_weight_bytes,
    torchao_available,
)
from infinitystar.transformer.model import InfinityStarTransformer

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = get_preset("transformer", "tiny-test")
BLOCK_LINEARS = ("attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.o_proj", "mlp.gate_proj", "mlp.up_proj",
                 "mlp.down_proj")


def _model(cfg: TransformerConfig = TINY, seed: int = 0) -> InfinityStarTransformer:
    """Weights of realistic scale (N(0,1)/sqrt(fan_in), norms around 1), no gradients."""
    return realistic_transformer(cfg, seed).requires_grad_(False)


def _step_logits(model: InfinityStarTransformer, device: str = "cpu") -> torch.Tensor:
    """Prefill a 6-token text, then one cached 2x2 step: ``[2, 4, d, 2]`` logits (cond and uncond rows)."""
    cfg = model.cfg
    gen = torch.Generator().manual_seed(1)
    text = torch.randn(6, cfg.text_channels, generator=gen).to(device)
    codes = torch.randn(1, 4, cfg.d_vae, generator=gen).to(device)
    cache = model.new_cache()
    with torch.no_grad():
        model.prefill_text(text, cache)
        return model.step(codes, model.step_rope((1, 2, 2), 0, 0, (2, 2)), cache)


def _block_linears(model: InfinityStarTransformer) -> list[tuple[str, nn.Linear]]:
    return [(n, m) for n, m in model.blocks.named_modules() if isinstance(m, nn.Linear)]


torchao = pytest.importorskip("torchao")


def test_only_the_block_linears_are_quantized() -> None:
    model = _model()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    assert torchao_available() and is_quantized(model.blocks) is None
    assert quantize_blocks(model.blocks, "int8") == 7 * TINY.depth
    assert is_quantized(model.blocks) == "int8"
    names = {n for n, _ in _block_linears(model)}
    assert names == {f"{i}.{lin}" for i in range(TINY.depth) for lin in BLOCK_LINEARS}
    for _, lin in _block_linears(model):
        assert type(lin.weight).__name__ == "Int8Tensor" and lin.weight.qdata.dtype == torch.int8
    quantized = {f"blocks.{n}.weight" for n in names}
    for n, p in model.named_parameters():
        if n in quantized:
            continue
        # Everything else (embeddings, text_proj, heads, norms, uncond text) untouched, still float32 Parameters.
        assert type(p) is nn.Parameter and p.dtype == torch.float32 and torch.equal(p, before[n]), n


def test_quantized_forward_equals_its_fake_quant_reference() -> None:
    model = _model()
    quantize_blocks(model.blocks, "int8")
    # The reference: the same model with each block linear weight replaced by qdata * scale, computed here from the
    # int8 data and per-row scales the quantized weight holds, run as plain float32 linears.
    fake = _model()
    with torch.no_grad():
        for (name, qlin), (_, lin) in zip(_block_linears(model), _block_linears(fake)):
            w = qlin.weight
            assert w.scale.shape == (lin.out_features, 1), name
            lin.weight.copy_(w.qdata.float() * w.scale)
    got, expected = _step_logits(model), _step_logits(fake)
    # Same values, other rounding: the quantized linear sums x*q (exact integers q) and scales the sum, the reference
    # rounds q*scale first and sums x*(q*scale). That is one more rounding per product in each linear (as many as
    # its fan-in, so the linears' reductions count twice) on top of summing in another order; the rest of the
    # model is the same computation.
    seq = 6 + 4
    path = transformer_rounding_path(model, seq) + [lin.in_features for _, lin in _block_linears(fake)]
    scale = float(expected.abs().max())
    tol = float32_rounding_tolerance(scale, path)
    assert float((got - expected).abs().max()) <= tol


def _weight_rounding_bound(model: InfinityStarTransformer, logits: torch.Tensor, step: float = 1 / 254) -> float:
    """A loose bound on how far rounding the block linears' weights moves the logits.

    Each weight moves by at most ``step * absmax_row`` (int8: half a step of absmax/127, ``step = 1/254``), so a
    row of K weights moves by at most ``rho_row = step * absmax_row * sqrt(K) / ||W_row||`` of its norm, and a
    linear's output by at most ``rho`` (the largest rho_row) of what it would be along that row. Inside a block at
    most 3 linears sit in series on any path (q/k -> scores -> v -> o: 3; gate/up -> down: 2); the blocks compound
    through the residual stream, so the final hidden state moves by at most ``(1 + rho)^(3 depth) - 1`` of its
    size, the RMSNorm and the head carry that relative change to the logits, and a factor 2 covers the norm's
    division and the softmax reweighting to first order. Scaled by the largest logit.
    """
    rho = 0.0
    for _, lin in _block_linears(model):
        w = lin.weight.float()
        absmax = w.abs().amax(dim=1)
        rho = max(rho, float((step * absmax * math.sqrt(w.shape[1]) / w.norm(dim=1)).max()))
    return 2 * ((1 + rho) ** (3 * model.cfg.depth) - 1) * float(logits.abs().max())


def test_int8_moves_the_logits_by_a_bounded_amount() -> None:
    plain = _model()
    expected = _step_logits(plain)
    bound = _weight_rounding_bound(plain, expected)
    quantized = _model()
    quantize_blocks(quantized.blocks, "int8")
    diff = float((_step_logits(quantized) - expected).abs().max())
    assert diff <= bound
    # ... and the rounding really happened: far beyond float32 noise.
    floor = float32_rounding_tolerance(float(expected.abs().max()), transformer_rounding_path(plain, 10))
    assert diff > 10 * floor


def test_quantized_weight_bytes_roughly_halve_bf16() -> None:
    model = _model()
    shapes = [(lin.out_features, lin.in_features) for _, lin in _block_linears(model)]
    quantize_blocks(model.blocks, "int8")
    # int8 data (1 byte per weight), a float32 scale and an int8 zero point (0 for symmetric int8) per output row.
    expected = sum(n * k + 4 * n + n for n, k in shapes)
    assert quantized_weight_bytes(model.blocks) == expected
    bf16 = sum(2 * n * k for n, k in shapes)
    # Per-row overhead 5 bytes over K >= 128 weights per row: at most 5/256 above one half.
    assert 0.5 < quantized_weight_bytes(model.blocks) / bf16 <= 0.5 + 5 / (2 * 128)
    assert quantized_weight_bytes(_model().blocks) == 0


def test_bad_requests_fail_with_one_line(monkeypatch) -> None:
    model = _model()
    import infinitystar.memory.quantize as quantize_module

    with monkeypatch.context() as m:
        m.setattr(quantize_module, "torchao_available", lambda: False)
        with pytest.raises(ImportError, match=r"memory mode 'int8' needs torchao: pip install 'infinitystar\[quant\]'"):
            quantize_blocks(model.blocks, "int8")
    if not fp8_supported("cpu"):
        with pytest.raises(ValueError, match=r"'fp8' needs a CUDA GPU of compute capability 8\.9.*device cpu"):
            quantize_blocks(model.blocks, "fp8")
    with pytest.raises(ValueError, match="must be one of"):
        quantize_blocks(model.blocks, "int4")
    quantize_blocks(model.blocks, "int8")
    with pytest.raises(ValueError, match="already quantized"):
        quantize_blocks(model.blocks, "int8")


BF16_UNIT_ROUNDOFF = 2.0**-8  # 8 significant bits
BF16_ROUNDINGS_PER_BLOCK = 16  # stored tensors of a block: 2 norms, q/k/v, q/k norms, rope, attention, o, 2 adds, ...


def _bf16_tolerance(model: InfinityStarTransformer, reference: torch.Tensor, spread: float = 6.0) -> float:
    """How far a bf16-autocast run may drift from the float32 run of the same (quantized) weights.

    Matmuls and reductions accumulate in float32 on both CPU and GPU, so the bf16 error is one rounding (relative
    2^-8) of every tensor a block stores; these independent errors add in quadrature along the path (Higham's
    probabilistic model, as conftest's float32 tolerance), relative to the scale of the logits compared.
    """
    n = BF16_ROUNDINGS_PER_BLOCK * model.cfg.depth
    return spread * math.sqrt(2) * BF16_UNIT_ROUNDOFF * float(reference.abs().max()) * math.sqrt(n)


def test_int8_blocks_run_with_bf16_activations() -> None:
    # The blocks run under bf16 autocast on a GPU; the int8 weights expand to the activation dtype inside the matmul.
    model = _model()
    quantize_blocks(model.blocks, "int8")
    reference = _step_logits(model)
    model.blocks.to(torch.bfloat16)  # the norms; the int8 weights keep their data and scales
    model.block_autocast = torch.bfloat16
    assert type(model.blocks[0].attn.q_proj.weight).__name__ == "Int8Tensor"
    got = _step_logits(model)
    assert got.dtype == torch.float32 and torch.isfinite(got).all()
    assert float((got - reference).abs().max()) <= _bf16_tolerance(model, reference)


@pytest.mark.cuda
@pytest.mark.parametrize("method", ["int8", "fp8"])
def test_quantized_step_on_cuda_bf16(method: str) -> None:
    if method == "fp8" and not fp8_supported("cuda"):
        pytest.skip("fp8 needs compute capability 8.9")
    plain = _model().to("cuda")
    plain.blocks.to(torch.bfloat16)
    plain.block_autocast = torch.bfloat16
    expected = _step_logits(plain, "cuda")
    quantized = copy.deepcopy(plain)
    # Quantized on the CPU and moved to the GPU for int8 (the weights survive the move); on the GPU for fp8.
    if method == "int8":
        quantized.blocks.to("cpu")
        assert quantize_blocks(quantized.blocks, method) == 7 * TINY.depth
        quantized.blocks.to("cuda")
    else:
        assert quantize_blocks(quantized.blocks, method, device="cuda") == 7 * TINY.depth
    assert is_quantized(quantized.blocks) == method
    got = _step_logits(quantized, "cuda")
    assert torch.isfinite(got).all()
    # Per-weight rounding: int8 half a step of absmax/127 (the loose bound of the CPU test); fp8 e4m3 keeps 3
    # mantissa bits, a relative error of at most 2^-4 per weight, so at most 2^-4 * absmax (subnormals near zero
    # err by less in absolute terms). Both on top of bf16 rounding of the two runs (the bf16 test's tolerance, twice).
    bound = _weight_rounding_bound(plain, expected, 1 / 254 if method == "int8" else 2.0**-4)
    bound += 2 * _bf16_tolerance(plain, expected)
    assert float((got - expected).abs().max()) <= bound

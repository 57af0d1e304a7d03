"""benchmarks/bench_lora_memory.py: trainable counts against hand counts and PEFT's own adapter, the per-block
activation formula against the tensors autograd really saves, and the script's main on the tiny-test preset."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from infinitystar.config import get_preset, replace
from infinitystar.transformer.model import InfinityStarTransformer


def _load_bench():
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_lora_memory.py"
    spec = importlib.util.spec_from_file_location("bench_lora_memory", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file executes
    spec.loader.exec_module(module)
    return module


bench = _load_bench()
TINY = get_preset("transformer", "tiny-test")


def _methods() -> dict[str, object]:
    return {m.name: m for m in bench.METHODS}


def test_lora_trainable_counts_of_the_tiny_model_by_hand():
    # tiny-test: C = 128, 4 query heads and 2 kv heads of 32, SwiGLU 512, depth 4.
    # attention per block: q 128->128, k 128->64, v 128->64, o 128->128: r * (256 + 192 + 192 + 256) = 896 r
    # mlp per block: gate 128->512, up 128->512, down 512->128: r * 3 * 640 = 1920 r
    shapes = bench.model_shapes(TINY)
    m = _methods()
    attn16 = bench.method_states(shapes, m["lora r16 attn"], 2)
    both64 = bench.method_states(shapes, m["lora r64 attn+mlp"], 2)
    assert attn16.trainable == 16 * 896 * 4
    assert both64.trainable == 64 * (896 + 1920) * 4
    full = bench.method_states(shapes, m["full"], 2)
    assert full.trainable == sum(p.numel() for p in InfinityStarTransformer(TINY).parameters())


def test_lora_trainable_count_matches_peft():
    pytest.importorskip("peft")
    from infinitystar.transformer.lora import LoRAConfig, add_adapter

    model = InfinityStarTransformer(TINY)
    add_adapter(model, LoRAConfig(rank=16, targets=("attention", "mlp")))
    peft_count = sum(p.numel() for p in model.parameters() if p.requires_grad)
    shapes = bench.model_shapes(TINY)
    assert bench.method_states(shapes, _methods()["lora r16 attn+mlp"], 2).trainable == peft_count


def _saved_bytes(block: nn.Module, cfg, tokens: int) -> int:
    """Bytes of the distinct storages autograd saves for one block forward under bf16 autocast (inputs excluded)."""
    x = torch.randn(1, tokens, cfg.embed_dim, requires_grad=True)
    rope = torch.zeros(2, tokens, cfg.head_dim // 2)
    rope[0] = 1.0
    inputs = {x.untyped_storage().data_ptr(), rope.untyped_storage().data_ptr()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        key = t.untyped_storage().data_ptr()
        if key not in inputs:
            seen[key] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.autocast("cpu", torch.bfloat16):
        block(x, rope, None, "sdpa")
    return sum(seen.values())


@pytest.mark.parametrize("targets", [None, ("attention", "mlp"), ("attention",)])
def test_block_recompute_formula_matches_autograd(targets):
    # kv heads = query heads: the CPU attention kernel would otherwise save k/v repeated to the query heads,
    # where the CUDA flex kernel keeps them at the kv heads.
    cfg = replace(TINY, num_kv_heads=TINY.num_heads)
    torch.manual_seed(0)
    model = InfinityStarTransformer(cfg)
    block = model.blocks[0]
    linears = {n: (m.in_features, m.out_features) for n, m in block.named_modules() if isinstance(m, nn.Linear)}
    rank, adapted = 0, ()
    if targets is not None:
        pytest.importorskip("peft")
        from infinitystar.transformer.lora import LoRAConfig, add_adapter

        rank = 8
        names = add_adapter(model, LoRAConfig(rank=rank, targets=targets))
        adapted = [n.split(".", 2)[2] for n in names if n.startswith("blocks.0.")]
    # The slope over two lengths: weight copies (per block, not per token) cancel; byte counts are exact.
    per_token = (_saved_bytes(block, cfg, 256) - _saved_bytes(block, cfg, 128)) / 128
    expected = bench.block_recompute_bytes_per_token(cfg, linears, base_trains=targets is None, adapted=adapted,
                                                     rank=rank)
    assert per_token == expected


def test_main_on_the_tiny_preset(capsys):
    results = bench.main(["--preset", "tiny-test", "--pn", "0.06M", "--batch", "1", "2", "--fsdp", "4", "--json"])
    printed = json.loads(capsys.readouterr().out)
    assert set(printed["presets"]) == {"tiny-test"}
    methods = results["presets"]["tiny-test"]["methods"]
    assert set(methods) == set(_methods())
    full, lora = methods["full"], methods["lora r16 attn+mlp"]
    assert full["fraction"] == 1.0 and 0 < lora["fraction"] < 0.5
    assert lora["bytes"]["weights"] < full["bytes"]["weights"]
    for m in methods.values():
        for key in ("one_gpu", "fsdp4"):
            assert m[key][2]["bytes"] > m[key][1]["bytes"]  # two samples hold more than one
            fits = m[key][1]["fits_gib"]
            assert fits == [c for c in bench.CAPACITIES_GIB if c >= min(fits, default=10**9)]  # bigger GPUs fit too
    assert full["fsdp4"][1]["bytes"] < full["one_gpu"][1]["bytes"]  # the fp32 states are sharded 4 ways
    # A 4-block model of width 128 at 0.06M is far below a 24 GiB card.
    assert all(m["one_gpu"][1]["fits_gib"] == [24, 48, 80] for m in methods.values())


@pytest.mark.parametrize("argv, words", [
    (["--preset", "no-such-model", "--pn", "0.40M"], "no-such-model"),
    (["--preset", "tiny-test"], "--pn"),
    (["--preset", "tiny-test", "--pn", "9M"], "9M"),
    (["--batch", "0"], "--batch"),
])
def test_bad_arguments_fail_in_one_line(argv, words, capsys):
    with pytest.raises(SystemExit):
        bench.main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert words in err[-1]

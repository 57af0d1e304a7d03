"""Block offload: the hooked model computes bit for bit what the plain one computes, and at most two groups of
blocks are on the device at any time (on the CPU the "device" copy is a real clone, so the residency seen here is
what decides loading and releasing)."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import realistic_transformer
from infinitystar.config import TransformerConfig, get_preset, replace
from infinitystar.memory.offload import BlockOffload
from infinitystar.transformer.model import InfinityStarTransformer
from infinitystar.transformer.sequence import PackedSample, build_packed_layout

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = get_preset("transformer", "tiny-test")
FIVE = replace(TINY, depth=5, block_chunks=1)  # with group_size 2: groups [0, 1], [2, 3], [4] (an uneven last group)


def _model(cfg: TransformerConfig, seed: int = 0) -> InfinityStarTransformer:
    """Weights of realistic scale (N(0,1)/sqrt(fan_in), norms around 1), no gradients (offload is inference-only)."""
    return realistic_transformer(cfg, seed).requires_grad_(False)


def _inputs(cfg: TransformerConfig, device: str = "cpu"):
    gen = torch.Generator().manual_seed(1)
    text = torch.randn(6, cfg.text_channels, generator=gen).to(device)
    codes = [torch.randn(1, n, cfg.d_vae, generator=gen).to(device) for n in (1, 4)]
    return text, codes


def _generate(model: InfinityStarTransformer, text: torch.Tensor, codes: list[torch.Tensor]) -> list[torch.Tensor]:
    """Prefill and two KV-cached steps (the second attends to the first): three passes through every block."""
    cache = model.new_cache()
    out = []
    with torch.no_grad():
        model.prefill_text(text, cache)
        for k, (c, hw) in enumerate(zip(codes, [(1, 1), (2, 2)])):
            rope = model.step_rope((1, *hw), k, 0, (2, 2))
            out.append(model.step(c, rope, cache, refs=tuple(range(k)), store_as=k))
    return out


def _packed(model: InfinityStarTransformer, cfg: TransformerConfig) -> torch.Tensor:
    sample = PackedSample([(1, 1, 1), (1, 2, 2)], range(2), [0, 1], text_len=5)
    layout = build_packed_layout([sample], cfg)
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(1, layout.visual_len, cfg.d_vae, generator=gen)
    text = torch.randn(5, cfg.text_channels, generator=gen)
    with torch.no_grad():
        return model.forward_packed(x, [text], layout).hidden


def _watch(model: InfinityStarTransformer, off: BlockOffload, device: torch.device) -> list[str]:
    """Hooks (registered after the offload's, so they run after it) that note every residency violation."""
    problems: list[str] = []
    limit = 2 * off.group_size

    def pre(i, module, _args):
        resident = off.resident_blocks()
        if i not in resident:
            problems.append(f"block {i} runs while not resident ({resident})")
        if any(p.device != device for p in module.parameters()):
            problems.append(f"block {i} runs with weights off {device}")
        if len(resident) > limit:
            problems.append(f"{len(resident)} blocks resident before block {i}")

    def post(i, _module, _args, _out):
        if len(off.resident_blocks()) > limit:
            problems.append(f"{len(off.resident_blocks())} blocks resident after block {i}")

    for i, blk in enumerate(model.blocks):
        blk.register_forward_pre_hook(lambda m, a, i=i: pre(i, m, a))
        blk.register_forward_hook(lambda m, a, o, i=i: post(i, m, a, o))
    return problems


@pytest.mark.parametrize("cfg,group,prefetch", [(FIVE, 2, True), (FIVE, 2, False), (TINY, 1, True),
                                                (TINY, 4, True)])
def test_offload_computes_exactly_the_plain_model(cfg, group, prefetch) -> None:
    model = _model(cfg)
    text, codes = _inputs(cfg)
    expected = _generate(model, text, codes)
    expected_packed = _packed(model, cfg)
    # Unpinned CPU host copies share the original storage: released blocks must point at exactly these again.
    host_ptr = {name: p.data_ptr() for name, p in model.blocks.named_parameters()}
    off = BlockOffload(model.blocks, "cpu", group, prefetch=prefetch).attach()
    assert off.attached and off.resident_blocks() == []
    problems = _watch(model, off, torch.device("cpu"))
    got = _generate(model, text, codes)
    got_packed = _packed(model, cfg)
    for a, b in zip(got, expected):
        assert torch.equal(a, b)
    assert torch.equal(got_packed, expected_packed)
    assert problems == []
    n_groups = math.ceil(cfg.depth / group)
    # Two groups at once (running + prefetched) with prefetch, one without; never more.
    assert off.max_resident_blocks == min(cfg.depth, (2 if prefetch and n_groups > 1 else 1) * group)
    # After a pass only the first group (prefetched for the next pass) remains.
    first = list(range(min(group, cfg.depth)))
    assert off.resident_blocks() == (first if prefetch else [])
    for name, p in model.blocks.named_parameters():
        resident = int(name.split(".")[0]) in off.resident_blocks()
        # Resident blocks hold a copy (a load really happened); released ones the host tensor again (no copy back).
        assert (p.data_ptr() != host_ptr[name]) == resident, name


def test_detach_restores_a_plain_module() -> None:
    model = _model(FIVE)
    text, codes = _inputs(FIVE)
    expected = _generate(model, text, codes)
    off = BlockOffload(model.blocks, "cpu", 2).attach()
    _generate(model, text, codes)
    off.detach()
    assert not off.attached and off.resident_blocks() == []
    assert all(not blk._forward_pre_hooks and not blk._forward_hooks for blk in model.blocks)
    assert all(type(p) is torch.nn.Parameter and p.device.type == "cpu" for p in model.blocks.parameters())
    for a, b in zip(_generate(model, text, codes), expected):
        assert torch.equal(a, b)
    # Detached blocks are ordinary again: a cast now sticks (while attached it would be refused).
    model.blocks.to(torch.float64)
    assert next(model.blocks.parameters()).dtype == torch.float64


def test_offload_refuses_what_it_cannot_do() -> None:
    model = _model(TINY)
    with pytest.raises(ValueError, match="inference-only"):
        BlockOffload(model.blocks.requires_grad_(True), "cpu", 2).attach()
    model.requires_grad_(False)
    with pytest.raises(ValueError, match="group_size"):
        BlockOffload(model.blocks, "cpu", 0)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="needs CUDA"):
            BlockOffload(model.blocks, "cuda", 2)
    off = BlockOffload(model.blocks, "cpu", 2).attach()
    with pytest.raises(RuntimeError, match="already attached"):
        off.attach()
    # Casting while attached would be undone silently by the next load of the host copies; it is refused instead.
    model.blocks.to(torch.float64)
    text, codes = _inputs(TINY)
    with pytest.raises(RuntimeError, match="moved or cast while block offload was attached"):
        _generate(model, text, codes)


def test_offload_of_int8_quantized_blocks_is_exact() -> None:
    pytest.importorskip("torchao")
    from infinitystar.memory.quantize import quantize_blocks

    model = _model(FIVE)
    assert quantize_blocks(model.blocks, "int8") == 7 * FIVE.depth
    text, codes = _inputs(FIVE)
    expected = _generate(model, text, codes)
    q_ptr = {name: m.weight.qdata.data_ptr() for name, m in model.blocks.named_modules()
             if isinstance(m, torch.nn.Linear)}
    off = BlockOffload(model.blocks, "cpu", 2).attach()
    problems = _watch(model, off, torch.device("cpu"))
    got = _generate(model, text, codes)
    for a, b in zip(got, expected):
        assert torch.equal(a, b)
    assert problems == [] and off.max_resident_blocks == 4
    for name, m in model.blocks.named_modules():
        if isinstance(m, torch.nn.Linear):
            assert type(m.weight).__name__ == "Int8Tensor" and isinstance(m.weight, torch.nn.Parameter)
            # The int8 data itself is copied in and released (not only the outer wrapper).
            resident = int(name.split(".")[0]) in off.resident_blocks()
            assert (m.weight.qdata.data_ptr() != q_ptr[name]) == resident, name
    off.detach()
    for a, b in zip(_generate(model, text, codes), expected):
        assert torch.equal(a, b)


def test_device_bytes_per_group_counts_the_largest_group() -> None:
    model = _model(FIVE)
    block_bytes = sum(p.numel() * p.element_size() for p in model.blocks[0].parameters())
    assert BlockOffload(model.blocks, "cpu", 2).device_bytes_per_group() == 2 * block_bytes
    assert BlockOffload(model.blocks, "cpu", 3).attach().device_bytes_per_group() == 3 * block_bytes


@pytest.mark.cuda
def test_offload_on_cuda_is_exact_and_saves_memory() -> None:
    cfg = TransformerConfig(depth=6, embed_dim=256, num_heads=4, num_kv_heads=2, head_dim=64, mlp_intermediate=1024,
                            text_channels=32, block_chunks=1, semantic_scales=10, detail_scale_min_tokens=200)
    group = 2
    dev = torch.device("cuda")
    model = _model(cfg).to(dev)
    model.blocks.to(torch.bfloat16)
    model.block_autocast = torch.bfloat16
    text, codes = _inputs(cfg, "cuda")
    _generate(model, text, codes)  # warm-up (cuBLAS handles, workspace)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    expected = _generate(model, text, codes)
    torch.cuda.synchronize()
    peak_plain = torch.cuda.max_memory_allocated()
    block_bytes = sum(p.numel() * p.element_size() for p in model.blocks[0].parameters())

    off = BlockOffload(model.blocks, dev, group).attach()
    assert all(p.device.type == "cpu" and p.is_pinned() for p in model.blocks.parameters())
    _generate(model, text, codes)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    got = _generate(model, text, codes)
    torch.cuda.synchronize()
    peak_off = torch.cuda.max_memory_allocated()
    for a, b in zip(got, expected):
        assert torch.equal(a, b)
    assert off.max_resident_blocks <= 2 * group
    # Both runs allocate the same activations and KV cache in the same order (the same kernels on the same data);
    # the plain run also holds all `depth` blocks, the offloaded one at most 2 groups (running + prefetched, the
    # host waiting for a released group's compute before reusing its memory). So the peaks differ by at least
    # (depth - 2 * group) blocks; 10% slack for the allocator's 512-byte rounding and peaks of activations that
    # fall at slightly different moments.
    assert peak_plain - peak_off >= (cfg.depth - 2 * group) * block_bytes * 0.9, (peak_plain, peak_off, block_bytes)
    off.detach()
    assert all(p.device == torch.device("cuda", torch.cuda.current_device()) for p in model.blocks.parameters())
    for a, b in zip(_generate(model, text, codes), expected):
        assert torch.equal(a, b)


def test_buffers_travel_with_their_blocks() -> None:
    model = _model(FIVE)
    for i, blk in enumerate(model.blocks):
        blk.attn.register_buffer("probe", torch.full((3,), float(i)))
    host_ptr = [blk.attn.probe.data_ptr() for blk in model.blocks]
    seen: dict[int, tuple[int, float]] = {}

    def note(i, module, _args) -> None:  # a pre-hook returning a value would replace the block's inputs
        seen.setdefault(i, (module.attn.probe.data_ptr(), float(module.attn.probe[0])))

    BlockOffload(model.blocks, "cpu", 2).attach()
    for i, blk in enumerate(model.blocks):  # after attach: runs after the offload's own pre-hook
        blk.register_forward_pre_hook(lambda m, a, i=i: note(i, m, a))
    text, codes = _inputs(FIVE)
    _generate(model, text, codes)
    # While its block runs, each buffer is a device copy holding the same values; afterwards the host one again.
    assert all(seen[i][0] != host_ptr[i] and seen[i][1] == i for i in range(FIVE.depth))
    assert [blk.attn.probe.data_ptr() == host_ptr[i] for i, blk in enumerate(model.blocks)] == [False] * 2 + [True] * 3

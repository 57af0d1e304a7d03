"""Transformer unit tests: attention backends, the 8B key layout, checkpoint I/O, and bad input."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from conftest import GOLDEN_DIR, float32_rounding_tolerance, realistic_transformer, transformer_rounding_path
from infinitystar.checkpoints import (
    OFFICIAL_INDEX_NAME,
    export_official_transformer,
    load_official_transformer,
    load_transformer,
    official_transformer_shapes,
    save_transformer,
    transformer_state_dict_from_official,
    transformer_state_dict_to_official,
)
from infinitystar.config import ConfigError, TransformerConfig, get_preset, mlp_intermediate_size, replace
from infinitystar.generation.schedules import clip_layout
from infinitystar.transformer.attention import SegmentMask, attend
from infinitystar.transformer.model import InfinityStarTransformer
from infinitystar.transformer.sequence import PackedSample, build_packed_layout

TINY = get_preset("transformer", "tiny-test")
IMAGE = [(1, 1, 1), (1, 2, 2), (1, 4, 4)]
VIDEO = IMAGE + [(2, 1, 1), (2, 2, 2), (2, 4, 4)]


def _model(cfg: TransformerConfig = TINY, seed: int = 0) -> InfinityStarTransformer:
    """A model with weights of realistic scale (N(0,1)/sqrt(fan_in), non-trivial norms and biases)."""
    return realistic_transformer(cfg, seed)


def _two_samples() -> tuple[list[PackedSample], torch.Tensor, list[torch.Tensor]]:
    samples = [PackedSample(IMAGE, range(3), [0, 2, 4], text_len=5),
               PackedSample(VIDEO, range(6), [1, 2, 3, 5, 6, 7], text_len=7)]
    gen = torch.Generator().manual_seed(1)
    n_vis = sum(t * h * w for s in samples for t, h, w in (s.schedule[i] for i in s.scale_ids))
    x = torch.randn(1, n_vis, TINY.d_vae, generator=gen) * 0.1
    texts = [torch.randn(s.text_len, TINY.text_channels, generator=gen) for s in samples]
    return samples, x, texts


# ----------------------------------------------------------------------------------------------
# Attention
# ----------------------------------------------------------------------------------------------


def test_layout_of_two_packed_samples() -> None:
    samples, _, _ = _two_samples()
    layout = build_packed_layout(samples, TINY)
    # 3 + 6 visual scales, 2 texts, pad: 21 + 63 visual + 12 text = 96 -> 128.
    assert layout.segment_lengths == [1, 4, 16, 1, 4, 16, 2, 8, 32, 5, 7, 32]
    assert layout.seq_len == 128 and layout.pad_len == 32
    m = layout.segment_mask
    # Sample 1's video scales (segments 6..8) see themselves, sample 1's text (10) and its last image scale (5).
    for s in (6, 7, 8):
        assert m[s].nonzero().flatten().tolist() == [5, s, 10]
    # Image scales see only themselves and their own text; never the other sample.
    assert m[1].nonzero().flatten().tolist() == [1, 9]
    assert m[4].nonzero().flatten().tolist() == [4, 10]
    assert m[9].nonzero().flatten().tolist() == [9] and m[10].nonzero().flatten().tolist() == [10]
    assert not m[11].any() and not m[:, 11].any()
    # Padding rows of the RoPE table are zero; the first video scale of sample 1 sits at frame 1.
    assert not layout.rope[:, 96:].any()


# Eager flex_attention warns that it is unfused; eager is deliberate on CPU (compiled flex crashes there).
EAGER_FLEX = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")


@EAGER_FLEX
def test_sdpa_and_flex_agree_on_packed_sequence() -> None:
    samples, x, texts = _two_samples()
    layout = build_packed_layout(samples, TINY)
    model = _model()
    with torch.no_grad():
        a = model.forward_packed(x, texts, layout, backend="sdpa")
        b = model.forward_packed(x, texts, layout, backend="flex")
    assert torch.isfinite(a.hidden).all()
    # Two kernels for the same attention: they differ by float32 rounding along every layer's sums plus, per block,
    # the attention's own (scores over head_dim, softmax and weighted sum over the sequence).
    tol = float32_rounding_tolerance(a.hidden.abs().max().item(), transformer_rounding_path(model, layout.seq_len))
    assert (a.hidden - b.hidden).abs().max() <= tol
    for la, lb in zip(a.logits, b.logits):
        assert (la - lb).abs().max() <= tol
    # Padding rows attend to nothing: zero attention output, and with bias-free blocks zero hidden state.
    assert a.hidden[0, layout.seq_len - layout.pad_len:].abs().max() == 0


@EAGER_FLEX
def test_attend_backends_match_dense_reference_including_blind_rows() -> None:
    gen = torch.Generator().manual_seed(3)
    seg = torch.tensor([0] * 40 + [1] * 50 + [2] * 38)  # 128 tokens, segment 2 sees nothing
    rule = torch.tensor([[True, True, False], [False, True, False], [False, False, False]])
    mask = SegmentMask(seg, rule)
    q = torch.randn(1, 4, 128, 16, generator=gen)
    k = torch.randn(1, 2, 128, 16, generator=gen)
    v = torch.randn(1, 2, 128, 16, generator=gen)
    out_sdpa = attend(q, k, v, mask, "sdpa")
    out_flex = attend(q, k, v, mask, "flex")
    # Independent reference: explicit softmax over the visible keys, kv head = query head // 2.
    ref = torch.zeros_like(q)
    for h in range(4):
        for i in range(128):
            vis = rule[seg[i], seg]
            if vis.any():
                w = torch.softmax(q[0, h, i] @ k[0, h // 2, vis].T / 4.0, dim=-1)
                ref[0, h, i] = w @ v[0, h // 2, vis]
    # Rounding of one attention: scores over the head dim, softmax and weighted sum over the 128 keys.
    tol = float32_rounding_tolerance(v.abs().max().item(), [16, 128, 128])
    assert (out_sdpa - ref).abs().max() <= tol
    assert (out_flex - ref).abs().max() <= tol
    assert out_sdpa[..., 90:, :].abs().max() == 0
    # The dense path keeps gradients finite although some rows see no key.
    q.requires_grad_(True)
    attend(q, k, v, mask, "sdpa").sum().backward()
    assert torch.isfinite(q.grad).all()


def test_packed_forward_matches_kv_cached_steps() -> None:
    """The packed mask and the inference cache implement the same visibility rule."""
    sample = PackedSample(VIDEO, range(6), range(6), text_len=7)
    layout = build_packed_layout([sample], TINY)
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(1, layout.visual_len, TINY.d_vae, generator=gen) * 0.1
    text = torch.randn(7, TINY.text_channels, generator=gen)
    model = _model()
    # Same visibility, other shapes (one packed sequence vs a step per scale): equal up to float32 rounding.
    path = transformer_rounding_path(model, layout.seq_len)
    with torch.no_grad():
        packed = model.forward_packed(x, [text], layout)
        tol = float32_rounding_tolerance(packed.hidden.abs().max().item(), path)  # the largest value on the path
        cache = model.new_cache()
        model.prefill_text(text, cache, guidance=False)
        info = clip_layout(VIDEO)
        start = 0
        for si, scale in enumerate(VIDEO):
            n = math.prod(scale)
            rope = model.step_rope(scale, si, info[si].frame_ss, VIDEO[-1][1:])
            logits = model.step(x[:, start:start + n], rope, cache, refs=info[si].ref_sids, store_as=si,
                                semantic=layout.semantic[si], batch=1)
            assert (logits - packed.logits[si]).abs().max() <= tol, f"scale {si}"
            start += n
        cache.keep_only({cache.TEXT, 2})
        assert sorted(map(str, cache.keys())) == ["2", "text"]


# ----------------------------------------------------------------------------------------------
# Official 8B layout
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("preset", ["official-8b-720p", "official-8b-480p", "interactive-480p"])
def test_8b_presets_match_official_keys(preset: str) -> None:
    keys_file = GOLDEN_DIR / "transformer_8b_keys.json"
    if not keys_file.is_file():
        pytest.fail(f"{keys_file} is missing")
    ref = json.loads(keys_file.read_text())
    res = "480p" if "480p" in preset else "720p"
    cfg = get_preset("transformer", preset)
    shapes = official_transformer_shapes(cfg)
    want = {k: tuple(v["shape"]) for k, v in ref[res]["keys"].items()}
    assert shapes == want
    assert sum(math.prod(s) for s in shapes.values()) == 8_768_382_112 == ref[res]["num_parameters"]
    with torch.device("meta"):
        model = InfinityStarTransformer(cfg)
    assert model.num_parameters() == 8_768_382_112 - cfg.embed_dim  # minus the dead sos_token
    assert mlp_intermediate_size(4096, 4) == cfg.mlp_intermediate == 16384


def test_mlp_rounding_is_half_to_even() -> None:
    assert mlp_intermediate_size(160, 4) == 512  # 2.5 -> 2
    assert mlp_intermediate_size(512, 3.55) == 1792
    assert mlp_intermediate_size(5632, 3.4) == 19200


# ----------------------------------------------------------------------------------------------
# Checkpoints
# ----------------------------------------------------------------------------------------------


def test_official_mapping_round_trip_and_block_chunks() -> None:
    model = _model()
    official = transformer_state_dict_to_official(model.state_dict(), TINY)
    assert "block_chunks.1.module.1.attn.q_proj.weight" in official  # block 3 = chunk 1, module 1
    assert "norm_hidden_sates.weight" in official and "semantic_head2.bias" in official
    assert set(official) == set(official_transformer_shapes(TINY))
    back = transformer_state_dict_from_official(official, TINY)
    assert back.keys() == model.state_dict().keys()
    flat = replace(TINY, block_chunks=1)
    assert "blocks.3.mlp.down_proj.weight" in transformer_state_dict_to_official(model.state_dict(), flat)


def test_sharded_official_folder_round_trip(tmp_path: Path) -> None:
    model = _model()
    shards = export_official_transformer(model, tmp_path, max_shard_bytes=300_000)
    assert len(shards) >= 2
    index = json.loads((tmp_path / OFFICIAL_INDEX_NAME).read_text())
    assert set(index["weight_map"]) == set(official_transformer_shapes(TINY))
    loaded = load_official_transformer(tmp_path, TINY).eval()
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    samples, x, texts = _two_samples()
    layout = build_packed_layout(samples, TINY)
    with torch.no_grad():
        a = model.forward_packed(x, texts, layout).logits
        b = loaded.forward_packed(x, texts, layout).logits
    assert all(torch.equal(u, w) for u, w in zip(a, b))
    bf = load_official_transformer(tmp_path, TINY, block_dtype=torch.bfloat16)
    assert bf.blocks[0].attn.q_proj.weight.dtype == torch.bfloat16
    assert bf.detail_head.weight.dtype == torch.float32


def test_own_format_round_trip(tmp_path: Path) -> None:
    model = _model(seed=7)
    save_transformer(model, tmp_path / "t.safetensors")
    loaded = load_transformer(tmp_path / "t.safetensors")
    assert loaded.cfg == TINY
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k


_PEAK_SCRIPT = textwrap.dedent("""
    import json, sys, torch
    from infinitystar.checkpoints import load_official_transformer
    from infinitystar.config import TransformerConfig

    def peak_kib():  # VmHWM: this process's peak RSS (ru_maxrss would inherit the parent's across exec)
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1])

    cfg = TransformerConfig(**json.loads(sys.argv[2]))
    dtype = getattr(torch, sys.argv[3])
    before = peak_kib()
    model = load_official_transformer(sys.argv[1], cfg, block_dtype=dtype)
    after = peak_kib()
    print(json.dumps({"delta_bytes": (after - before) * 1024,
                      "model_bytes": sum(p.numel() * p.element_size() for p in model.parameters())}))
""")


@pytest.mark.parametrize("block_dtype", ["float32", "bfloat16"])
def test_sharded_load_peak_memory_stays_near_one_copy(tmp_path: Path, block_dtype: str) -> None:
    """Peak RSS growth while loading a 256 MB sharded checkpoint, measured in a fresh process.

    Streaming shard by shard keeps it near the size of the loaded model; reading everything first and
    converting afterwards would need the fp32 file plus the converted copy (1.5x for bf16 blocks)."""
    cfg = TransformerConfig(depth=4, embed_dim=1024, num_heads=8, num_kv_heads=8, head_dim=128,
                            mlp_intermediate=4096, text_channels=64, block_chunks=2)
    model = InfinityStarTransformer(cfg)
    export_official_transformer(model, tmp_path, max_shard_bytes=32 * 1024**2)
    file_bytes = sum(p.numel() * 4 for p in model.parameters())
    del model
    cfg_json = json.dumps({k: getattr(cfg, k) for k in cfg.__dataclass_fields__})
    proc = subprocess.run([sys.executable, "-c", _PEAK_SCRIPT, str(tmp_path), cfg_json, block_dtype],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    delta, loaded = report["delta_bytes"], report["model_bytes"]
    print(f"peak RSS growth {delta / 2**20:.1f} MiB for {loaded / 2**20:.1f} MiB of weights ({block_dtype} blocks)")
    assert delta >= 0.8 * loaded, report  # the measurement does see the weights
    assert delta <= loaded + 0.25 * file_bytes, report  # one copy + at most one shard in flight


# ----------------------------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------------------------


def test_checkpoint_of_another_size_is_rejected_with_shapes(tmp_path: Path) -> None:
    export_official_transformer(_model(), tmp_path)
    bigger = replace(TINY, embed_dim=256, num_heads=8)
    with pytest.raises(ValueError, match=r"q_proj\.weight: expected \(256, 256\), given \(128, 128\)"):
        load_official_transformer(tmp_path, bigger)
    deeper = replace(TINY, depth=6, block_chunks=2)
    with pytest.raises(ValueError, match=r"missing keys \[block_chunks\.0\.module\.2\."):
        load_official_transformer(tmp_path, deeper)


def test_missing_and_unexpected_official_keys_are_listed() -> None:
    sd = transformer_state_dict_to_official(_model().state_dict(), TINY)
    sd.pop("head.bias")
    sd["lvl_embed.weight"] = torch.zeros(3)
    with pytest.raises(ValueError, match=r"missing keys \[head\.bias\].*unexpected keys \[lvl_embed\.weight\]"):
        transformer_state_dict_from_official(sd, TINY)


def test_wrong_text_width_is_rejected() -> None:
    samples, x, texts = _two_samples()
    layout = build_packed_layout(samples, TINY)
    model = _model()
    bad = [texts[0], torch.zeros(7, 16)]
    with pytest.raises(ValueError, match=r"\[tokens, 32\].*\(7, 16\)"):
        model.forward_packed(x, bad, layout)
    with pytest.raises(ValueError, match=r"\(7, 16\)"):
        model.prefill_text(torch.zeros(7, 16), model.new_cache())


def test_schedule_beyond_rope_frames_is_rejected() -> None:
    clip = [(20, 1, 1), (20, 2, 2)]
    schedule = [(1, 1, 1), (1, 2, 2)] + clip + clip  # clip 2 covers latent frames 21..40
    sample = PackedSample(schedule, range(6), range(6), text_len=3)
    with pytest.raises(ValueError, match=r"latent frame 40.*only 21 latent frames"):
        build_packed_layout([sample], TINY)
    build_packed_layout([sample], replace(TINY, rope_max_frames=41))  # the 10 s (480p) reach


def test_scale_without_its_reference_is_rejected() -> None:
    sample = PackedSample(VIDEO, [0, 1, 3], [0, 1, 3], text_len=3)  # video scale 3 needs scale 2
    with pytest.raises(ValueError, match=r"scale 3 attends scale 2"):
        build_packed_layout([sample], TINY)


@pytest.mark.parametrize(("changes", "message"), [
    ({"head_dim": 48}, r"head_dim \* num_heads = 48 \* 4 = 192 != embed_dim 128"),
    ({"num_kv_heads": 3}, r"num_heads 4 is not a multiple of num_kv_heads 3"),
    ({"embed_dim": 2016, "num_heads": 16, "head_dim": 126}, r"head_dim 126.*divisible by 4"),
    ({"depth": 5}, r"depth 5 is not a multiple of block_chunks 2"),
])
def test_config_validation_names_bad_values(changes: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        replace(TINY, **changes)

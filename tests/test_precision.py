"""The inference precision policy: "fp32", or "bf16" = the reference's (inference.md 2.1 and 5, transformer.md 11).

bf16 casts exactly the transformer blocks (and Flan-T5 to fp16) and runs them under bf16 autocast; everything else
stays float32. The default follows the device: bf16 on CUDA (moved or offloaded there), fp32 elsewhere.
"""

from __future__ import annotations

import copy
import dataclasses
import shutil
import warnings

import pytest
import torch

from fixtures_text import D_MODEL, tiny_flan_t5_dir  # noqa: F401
from infinitystar import checkpoints
from infinitystar.cli import build_parser
from infinitystar.config import ConfigError, PrecisionPolicy, default_precision, get_preset, precision_policy
from infinitystar.demo import load_pipeline
from infinitystar.pipeline import InfinityStarPipeline
from infinitystar.text import FlanT5Encoder
from infinitystar.transformer.attention import KVCache
from infinitystar.transformer.model import InfinityStarTransformer
from infinitystar.vae.model import VideoVAE

TINY = get_preset("pipeline", "tiny-test")
T5_CFG = dataclasses.replace(TINY, name="tiny-t5", text_encoder="t5")
PROMPT = "a red ball bounces"
# bf16 keeps 8 significant bits: round-to-nearest has a relative error of at most 2^-8 per rounding.
BF16_UNIT_ROUNDOFF = 2.0 ** -8


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models


def _randomize_unit_gain(model: torch.nn.Module, seed: int) -> None:
    """Weights of fan-in gain 1 (the init's N(0, 0.02) makes every block branch ~0.1 of the residual, so a
    broken bf16 block would barely show in the logits); norm gains near 1, biases near 0."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=g) / p.shape[-1] ** 0.5)
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1 + (1.0 if "norm" in name else 0.0))


def _tiny_pipe(cfg=TINY, seed: int = 0) -> InfinityStarPipeline:
    pipe = InfinityStarPipeline.from_preset(cfg, seed=seed)
    _randomize_unit_gain(pipe.transformer, seed + 1)
    return pipe


def _param_dtypes(module: torch.nn.Module) -> dict[str, torch.dtype]:
    return {name: p.dtype for name, p in module.named_parameters()}


# ----------------------------------------------------------------------------------------------
# The policy itself
# ----------------------------------------------------------------------------------------------


def test_policies_are_the_reference_scripts():
    t2v = precision_policy("bf16")  # infer_video_{720p,480p}.py: bf16=1, T5 fp16, all under bf16 autocast
    assert (t2v.block_dtype, t2v.block_autocast_dtype) == (torch.bfloat16, torch.bfloat16)
    assert (t2v.text_dtype, t2v.text_autocast_dtype) == (torch.float16, torch.bfloat16)
    inter = precision_policy("bf16", interactive=True)  # infer_interact_480p.py: bf16=0, T5 encodes outside autocast
    assert (inter.block_dtype, inter.block_autocast_dtype) == (torch.float32, torch.bfloat16)
    assert (inter.text_dtype, inter.text_autocast_dtype) == (torch.float16, None)
    fp32 = precision_policy("fp32", interactive=True)
    assert (fp32.block_dtype, fp32.block_autocast_dtype, fp32.text_dtype, fp32.text_autocast_dtype) == (
        torch.float32, None, torch.float32, None)
    assert default_precision("cuda") == "bf16" and default_precision("cpu") == "fp32"
    assert default_precision("mps") == "fp32"


@pytest.mark.parametrize("bad", ["fp16", "BF16", "", 16, torch.bfloat16])
def test_bad_precision_is_one_clear_error(bad, tmp_path):
    with pytest.raises(ConfigError, match=r"precision must be one of \['fp32', 'bf16'\]"):
        precision_policy(bad)
    pipe = _tiny_pipe()
    with pytest.raises(ConfigError, match="precision must be one of"):
        pipe.set_precision(bad)
    assert pipe.precision == "fp32" and _param_dtypes(pipe.transformer)["blocks.0.attn.q_proj.weight"] == torch.float32
    # Checked before anything is read: a folder that does not exist is not even looked at.
    with pytest.raises(ConfigError, match="precision must be one of"):
        InfinityStarPipeline.from_pretrained(tmp_path / "absent", precision=bad)
    with pytest.raises(ConfigError, match="precision must be one of"):
        load_pipeline(None, "tiny-test", precision=bad)
    with pytest.raises(ConfigError, match="PrecisionPolicy.block_weights"):
        PrecisionPolicy("bf16", block_weights="int8")


def test_cli_precision_flag():
    parser = build_parser()
    args = parser.parse_args(["generate", "x", "--precision", "bf16"])
    assert args.precision == "bf16"
    assert parser.parse_args(["interactive", "p.txt"]).precision is None
    with pytest.raises(SystemExit):
        parser.parse_args(["generate", "x", "--precision", "fp16"])
    pipe = load_pipeline(None, "tiny-test", device="cpu", precision="bf16")  # explicit bf16 sticks on the CPU
    assert pipe.precision == "bf16"
    assert _param_dtypes(pipe.transformer)["blocks.0.mlp.up_proj.weight"] == torch.bfloat16


# ----------------------------------------------------------------------------------------------
# What bf16 casts
# ----------------------------------------------------------------------------------------------


def test_bf16_casts_exactly_the_blocks():
    pipe = _tiny_pipe()
    pipe.set_precision("bf16")
    assert pipe.precision == "bf16"
    dtypes = _param_dtypes(pipe.transformer)
    blocks = {n for n in dtypes if n.startswith("blocks.")}
    assert blocks and all(dtypes[n] == torch.bfloat16 for n in blocks)
    rest = set(dtypes) - blocks  # uncond_text, text_proj, code_embed, final_norm, both heads
    assert {"uncond_text", "text_proj.weight", "code_embed.weight", "final_norm.weight", "detail_head.weight",
            "semantic_head.weight"} <= rest
    assert all(dtypes[n] == torch.float32 for n in rest), {n: dtypes[n] for n in rest}
    assert all(p.dtype == torch.float32 for p in pipe.vae.parameters())
    assert all(p.dtype == torch.float32 for p in pipe.text_encoder.parameters())  # the byte encoder: fp32 always
    assert pipe.transformer.block_autocast == torch.bfloat16
    with pytest.warns(UserWarning, match="bf16-rounded"):
        pipe.set_precision("fp32")
    assert all(d == torch.float32 for d in _param_dtypes(pipe.transformer).values())
    assert pipe.transformer.block_autocast is None


def test_interactive_bf16_keeps_fp32_blocks_under_bf16_autocast():
    cfg = dataclasses.replace(TINY, name="tiny-interactive", interactive=True)
    pipe = _tiny_pipe(cfg).set_precision("bf16")
    assert all(d == torch.float32 for d in _param_dtypes(pipe.transformer).values())
    assert pipe.transformer.block_autocast == torch.bfloat16
    # The residual stream, hence the cached keys/values, is bf16 (the reference's autocast-projected prefix).
    cache = pipe.transformer.new_cache()
    text = torch.randn(5, TINY.transformer.text_channels)
    pipe.transformer.prefill_text(text, cache)
    k, v = cache.get(0, [KVCache.TEXT])
    assert k[0].dtype == v[0].dtype == torch.bfloat16


def _record(model: InfinityStarTransformer) -> list[tuple[str, tuple, dict, torch.Tensor | None]]:
    """Record every prefill/step call of ``model`` (inputs and outputs), to replay them on another model."""
    calls: list[tuple[str, tuple, dict, torch.Tensor | None]] = []
    for name in ("prefill_text", "step"):
        original = getattr(model, name)

        def wrapper(*args, _name=name, _original=original, **kwargs):
            out = _original(*args, **kwargs)
            calls.append((_name, args, kwargs, None if out is None else out.detach().clone()))
            return out

        setattr(model, name, wrapper)
    return calls


def _replay(model: InfinityStarTransformer, calls) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The same calls on ``model`` with a fresh cache: (recorded logits, replayed logits) per step."""
    cache = model.new_cache()
    pairs = []
    for name, args, kwargs, out in calls:
        args = tuple(cache if isinstance(a, KVCache) else a for a in args)
        kwargs = {k: cache if isinstance(v, KVCache) else v for k, v in kwargs.items()}
        again = getattr(model, name)(*args, **kwargs)
        if out is not None:
            pairs.append((out, again))
    return pairs


@torch.no_grad()
def test_bf16_generation_is_finite_and_its_logits_stay_close_to_fp32():
    pipe = _tiny_pipe(seed=3)
    fp32_model = copy.deepcopy(pipe.transformer)
    pipe.set_precision("bf16")
    calls = _record(pipe.transformer)
    out = pipe(PROMPT, num_frames=5, seed=0, output_type="pt", progress=False)
    assert torch.isfinite(out.frames).all() and torch.isfinite(out.latent).all()
    pairs = _replay(fp32_model, calls)  # every step of the bf16 run, its exact inputs, in float32
    assert len(pairs) > 10
    bf16 = torch.cat([a.flatten() for a, _ in pairs])
    fp32 = torch.cat([b.flatten() for _, b in pairs])
    assert bf16.dtype == fp32.dtype == torch.float32 and torch.isfinite(bf16).all()
    rel = float((bf16 - fp32).norm() / fp32.norm())
    # Bound: every bf16 rounding on the way from the embedded tokens to the final norm adds a relative error of at
    # most 2^-8. Per block: the stream cast, 2 norm outputs, q/k/v, q/k norms, 2 RoPE roundings, attention, o_proj,
    # a residual add, gate/up, silu, the product, down_proj, a residual add (15) plus the bf16-rounded weights of
    # the 7 projections (7): 22 per block; plus the final norm's bf16 output. With unit-gain weights nothing
    # amplifies a relative error, so linear worst-case accumulation bounds it.
    n_roundings = 22 * TINY.transformer.depth + 1
    bound = n_roundings * BF16_UNIT_ROUNDOFF
    # Tighter, statistical: independent roundings, each uniform in +-2^-8, add up to an rms of 2^-8 * sqrt(n / 3);
    # 4 of those.
    likely = 4 * BF16_UNIT_ROUNDOFF * (n_roundings / 3) ** 0.5
    print(f"bf16 vs fp32 logits: relative Frobenius error {rel:.2e} (bounds {likely:.2e} / {bound:.2e}, "
          f"{len(pairs)} steps)")
    assert 0 < rel < likely < bound
    # A sharper sanity check on the same numbers: the error is of the order of a few roundings, not more.
    assert rel > BF16_UNIT_ROUNDOFF / 16  # the blocks really ran in bf16 (an fp32 run would give ~1e-7)


# ----------------------------------------------------------------------------------------------
# The default follows the device
# ----------------------------------------------------------------------------------------------


def _pretend_cuda(monkeypatch) -> None:
    """Make the pipeline believe a GPU is present: under model offload nothing moves to it before work starts."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)


def test_default_follows_the_device_and_an_explicit_choice_sticks(monkeypatch):
    pipe = _tiny_pipe()
    assert pipe.precision == "fp32"  # on the CPU
    _pretend_cuda(monkeypatch)
    pipe.enable_model_cpu_offload("cuda")  # no GPU needed: the weights stay on the CPU until they work
    assert pipe.precision == "bf16"
    assert _param_dtypes(pipe.transformer)["blocks.1.attn.o_proj.weight"] == torch.bfloat16
    assert next(pipe.transformer.parameters()).device.type == "cpu"
    with pytest.warns(UserWarning, match="bf16-rounded"):
        pipe.set_memory_mode("plain", "cpu")
    assert pipe.precision == "fp32"
    assert _param_dtypes(pipe.transformer)["blocks.1.attn.o_proj.weight"] == torch.float32

    pipe.set_precision("fp32")
    pipe.enable_model_cpu_offload("cuda")
    assert pipe.precision == "fp32"  # asked for: the device does not override it
    pipe.set_precision("bf16")
    pipe.set_memory_mode("plain", "cpu")
    assert pipe.precision == "bf16"
    with pytest.warns(UserWarning, match="bf16-rounded"):
        pipe.set_precision(None)  # back to following the device (the CPU here)
    assert pipe.precision == "fp32"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@torch.no_grad()
def test_cuda_default_is_bf16_and_generates():
    pipe = _tiny_pipe().to("cuda")
    assert pipe.precision == "bf16"
    assert _param_dtypes(pipe.transformer)["blocks.0.attn.q_proj.weight"] == torch.bfloat16
    out = pipe(PROMPT, num_frames=5, seed=0, output_type="pt", progress=False)
    assert torch.isfinite(out.frames).all()


# ----------------------------------------------------------------------------------------------
# Flan-T5 and loading
# ----------------------------------------------------------------------------------------------


@torch.no_grad()
def test_flan_t5_follows_the_policy(tiny_flan_t5_dir):  # noqa: F811
    enc = FlanT5Encoder.from_pretrained(tiny_flan_t5_dir)
    ref = enc([PROMPT]).kv_compact
    enc.set_precision(precision_policy("bf16"))
    assert {p.dtype for p in enc.model.parameters()} == {torch.float16}
    assert enc.autocast_dtype == torch.bfloat16
    low = enc([PROMPT]).kv_compact
    assert low.dtype == torch.float32 and torch.isfinite(low).all() and not torch.equal(low, ref)
    enc.set_precision(precision_policy("bf16", interactive=True))
    assert enc.autocast_dtype is None and {p.dtype for p in enc.model.parameters()} == {torch.float16}
    enc.set_precision(precision_policy("fp32"))
    assert {p.dtype for p in enc.model.parameters()} == {torch.float32} and enc.autocast_dtype is None


@pytest.fixture(scope="module")
def official_root(tmp_path_factory, tiny_flan_t5_dir):  # noqa: F811
    """A tiny stand-in of the official download (sharded transformer, VAE .pth, Flan-T5 folder)."""
    assert T5_CFG.transformer.text_channels == D_MODEL
    root = tmp_path_factory.mktemp("official-precision")
    torch.manual_seed(5)
    transformer = InfinityStarTransformer(T5_CFG.transformer)
    _randomize_unit_gain(transformer, 6)
    checkpoints.export_official_transformer(transformer, root / "infinitystar_8b_480p_weights")
    torch.save({"vae": VideoVAE(T5_CFG.vae).state_dict()}, root / "infinitystar_videovae.pth")
    shutil.copytree(tiny_flan_t5_dir, root / "text_encoder" / "flan-t5-xl-official")
    return root, transformer


@torch.no_grad()
def test_from_pretrained_bf16_reads_blocks_as_bf16(official_root):
    root, transformer = official_root
    pipe = InfinityStarPipeline.from_pretrained(root, preset=T5_CFG, precision="bf16")
    assert pipe.precision == "bf16"
    loaded = pipe.transformer.state_dict()
    for name, ref in transformer.state_dict().items():
        want = ref.to(torch.bfloat16) if name.startswith("blocks.") else ref  # round-to-nearest-even, as upstream
        assert loaded[name].dtype == want.dtype and torch.equal(loaded[name], want), name
    assert {p.dtype for p in pipe.text_encoder.model.parameters()} == {torch.float16}
    assert pipe.text_encoder.autocast_dtype == torch.bfloat16
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no bf16 -> fp32 round trip happened on the way
        out = pipe(PROMPT, num_frames=5, seed=0, output_type="pt", progress=False)
    assert torch.isfinite(out.frames).all()
    # Default (None) on the CPU: float32 as stored.
    plain = InfinityStarPipeline.from_pretrained(root, preset=T5_CFG)
    assert plain.precision == "fp32"
    assert all(p.dtype == torch.float32 for p in plain.transformer.parameters())


def test_own_layout_round_trip_with_precision(tmp_path):
    pipe = _tiny_pipe()
    pipe.save_pretrained(tmp_path / "p")
    loaded = InfinityStarPipeline.from_pretrained(tmp_path / "p", precision="bf16")
    assert loaded.precision == "bf16"
    assert _param_dtypes(loaded.transformer)["blocks.0.mlp.down_proj.weight"] == torch.bfloat16
    assert _param_dtypes(loaded.transformer)["code_embed.weight"] == torch.float32

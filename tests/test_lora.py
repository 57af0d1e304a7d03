"""LoRA adapters (transformer.lora): PEFT layout on disk, the pipeline's load/set/fuse API, the CLI's --lora, and
training an adapter with the ordinary trainer."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

pytest.importorskip("peft")

from infinitystar.config import ConfigError  # noqa: E402
from infinitystar.pipeline import InfinityStarPipeline  # noqa: E402
from infinitystar.transformer import lora  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPT = "a red circle moving right"
CALL = dict(num_frames=9, seed=3, output_type="np", progress=False)


def _pipe(seed: int = 0) -> InfinityStarPipeline:
    return InfinityStarPipeline.from_preset("tiny-test", seed=seed)


def _random_adapter(pipe: InfinityStarPipeline, folder, targets=("attention", "mlp", "heads"), seed: int = 1,
                    rank: int = 4):
    """An adapter of ``pipe``'s transformer with random A and B (PEFT starts B at 0: no effect), saved to ``folder``."""
    cfg = lora.LoRAConfig(rank=rank, alpha=8.0, targets=targets)
    model = _pipe().transformer  # tiny-test's seed-0 weights: the base the adapter is made for
    identity = lora.base_identity(model)
    lora.add_adapter(model, cfg, "default")
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    lora.save_adapter(folder, model, cfg, base={"name": pipe.config.name, "identity": identity},
                      training={"steps": 0})
    return cfg


def test_the_adapter_folder_is_peft_s_layout(tmp_path):
    pipe = _pipe()
    _random_adapter(pipe, tmp_path / "a")
    files = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert set(files) == {lora.ADAPTER_WEIGHTS, lora.ADAPTER_CONFIG, lora.ADAPTER_META}
    peft_cfg = json.loads((tmp_path / "a" / lora.ADAPTER_CONFIG).read_text())
    assert peft_cfg["peft_type"] == "LORA" and peft_cfg["r"] == 4 and peft_cfg["lora_alpha"] == 8.0
    from safetensors import safe_open

    with safe_open(str(tmp_path / "a" / lora.ADAPTER_WEIGHTS), framework="pt") as f:
        keys = list(f.keys())  # noqa: SIM118
    assert all(k.startswith("base_model.model.") and (".lora_A." in k or ".lora_B." in k) for k in keys)
    depth = pipe.config.transformer.depth
    assert len(keys) == 2 * (7 * depth + 2)  # A and B of 4 attention + 3 MLP projections per block, 2 heads
    meta = json.loads((tmp_path / "a" / lora.ADAPTER_META).read_text())
    assert meta["base"]["name"] == "tiny-test" and meta["lora"]["rank"] == 4
    # The PEFT reader of another tool finds the same weights under PeftModel's key names.
    import peft

    model = _pipe().transformer
    model = peft.PeftModel(model, peft.LoraConfig(**{k: v for k, v in peft_cfg.items()
                                                     if k in ("r", "lora_alpha", "target_modules")}))
    missing = set(model.state_dict()) - {k.replace(".weight", ".default.weight") for k in keys}
    assert not {k for k in missing if ".lora_" in k}


def test_scale_zero_is_the_base_model_exactly_and_scale_one_changes_it(tmp_path):
    base = _pipe()(PROMPT, **CALL).frames
    pipe = _pipe()
    _random_adapter(pipe, tmp_path / "a")
    name = pipe.load_lora_weights(tmp_path / "a", scale=0.0)
    assert name == "adapter_0" and pipe.lora_adapters == {"adapter_0": 0.0}
    assert np.array_equal(pipe(PROMPT, **CALL).frames, base)
    pipe.set_adapters("adapter_0", 1.0)
    assert not np.array_equal(pipe(PROMPT, **CALL).frames, base)


def test_save_load_gives_the_same_output_and_fused_equals_unfused(tmp_path):
    pipe = _pipe()
    _random_adapter(pipe, tmp_path / "a")
    pipe.load_lora_weights(tmp_path / "a", adapter_name="style")
    again = _pipe()
    again.load_lora_weights(tmp_path / "a", adapter_name="style")
    first = pipe(PROMPT, **CALL).frames
    assert np.array_equal(first, again(PROMPT, **CALL).frames)
    # Fused and unfused step logits agree up to float32 rounding of W + s B A against x W + s (x A) B.
    from conftest import kv_cached_step_logits

    schedule = [(1, 1, 1), (1, 2, 2), (1, 3, 3)]
    unfused = kv_cached_step_logits(pipe.transformer, schedule)
    pipe.fuse_lora()
    fused = kv_cached_step_logits(pipe.transformer, schedule)
    for a, b in zip(unfused, fused):
        # A few ulps of the logits' scale per layer on a 2-block toy model: 1e-4 relative is far above rounding
        # and far below any effect of the adapter (which moves logits by O(1)).
        assert (a - b).abs().max() <= 1e-4 * a.abs().max()
    with pytest.raises(ConfigError, match="unfuse_lora"):
        pipe.load_lora_weights(tmp_path / "a", adapter_name="other")
    pipe.unfuse_lora()
    back = kv_cached_step_logits(pipe.transformer, schedule)
    for a, b in zip(unfused, back):
        assert (a - b).abs().max() <= 1e-4 * a.abs().max()


def test_two_adapters_add_and_set_adapters_chooses(tmp_path):
    pipe = _pipe()
    _random_adapter(pipe, tmp_path / "a", seed=1)
    _random_adapter(pipe, tmp_path / "b", seed=2, targets=("mlp",))
    pipe.load_lora_weights(tmp_path / "a", adapter_name="a")
    only_a = pipe(PROMPT, **CALL).frames
    pipe.load_lora_weights(tmp_path / "b", adapter_name="b", scale=0.5)
    assert pipe.lora_adapters == {"a": 1.0, "b": 0.5}
    both = pipe(PROMPT, **CALL).frames
    assert not np.array_equal(both, only_a)
    pipe.set_adapters(["a"])
    assert np.array_equal(pipe(PROMPT, **CALL).frames, only_a) and pipe.lora_adapters == {"a": 1.0, "b": 0.0}
    with pytest.raises(ValueError, match="no adapter named 'c'"):
        pipe.set_adapters(["c"])


def test_an_adapter_of_another_base_model_is_refused_in_one_line(tmp_path):
    other = _pipe(seed=5)  # same architecture, other weights
    _random_adapter(other, tmp_path / "a")  # made for seed 0's weights, recorded as such
    with pytest.raises(ValueError, match=r"was made for base model 'tiny-test' \(identity [0-9a-f]+\), not for this "
                                         r"pipeline's 'tiny-test' \(identity [0-9a-f]+\)"):
        other.load_lora_weights(tmp_path / "a")
    with pytest.raises(FileNotFoundError, match="has no adapter_model.safetensors"):
        (tmp_path / "empty").mkdir()
        _pipe().load_lora_weights(tmp_path / "empty")
    broken = tmp_path / "broken"
    _random_adapter(_pipe(), broken)
    (broken / lora.ADAPTER_WEIGHTS).write_bytes(b"\x00" * 40)
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        _pipe().load_lora_weights(broken)
    with pytest.raises(ValueError, match="LoRA rank must be an integer >= 1"):
        lora.LoRAConfig(rank=0)
    with pytest.raises(ValueError, match="matches no linear layer"):
        lora.add_adapter(_pipe().transformer, lora.LoRAConfig(targets=("blocks\\.9\\..*",)))

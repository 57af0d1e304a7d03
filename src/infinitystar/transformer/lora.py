"""Low-rank adapters (LoRA) on the transformer's linear layers, built with PEFT, saved in PEFT's layout.

* :class:`LoRAConfig` -- rank, alpha, dropout and the layers to adapt: group names (:data:`TARGET_GROUPS`:
  ``attention`` = q/k/v/o projections, ``mlp`` = gate/up/down, ``heads`` = the two bit heads) or regular
  expressions matched against whole module names (``blocks\\.(0|1)\\.attn\\.q_proj``).
* :func:`add_adapter` injects one named adapter into a plain :class:`InfinityStarTransformer` with
  ``peft.inject_adapter_in_model`` (no wrapper class: the model keeps its type, names and methods; PEFT wraps each
  targeted ``nn.Linear`` in place). The base weights are frozen; only the adapter's ``lora_A``/``lora_B`` train.
* :func:`save_adapter` writes a folder in PEFT's layout -- ``adapter_model.safetensors`` (keys
  ``base_model.model.<module>.lora_A.weight``, as ``PeftModel.save_pretrained`` writes them) and
  ``adapter_config.json`` (PEFT's ``LoraConfig``) -- plus ``infinitystar_adapter.json``: the base model's identity
  (:func:`base_identity`), rank, alpha, targets and the training settings. :func:`read_adapter` reads it back and
  :func:`check_base` refuses an adapter made for another base model in one line naming both.
* :func:`set_adapter_scales`, :func:`fuse_adapters`, :func:`unfuse_adapters`: which adapters are active and with
  what weight, and merging them into the base weights (diffusers' ``set_adapters``/``fuse_lora``/``unfuse_lora``).

``peft`` is an optional extra (``pip install 'infinitystar[lora]'``); importing this module does not need it, using
an adapter does (one-line error naming the extra).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..fileio import atomic_output, atomic_write_json, make_folder

__all__ = ["ADAPTER_CONFIG", "ADAPTER_META", "ADAPTER_WEIGHTS", "TARGET_GROUPS", "AdapterFile", "LoRAConfig",
           "adapter_layers", "adapter_names", "adapter_vocabulary", "add_adapter", "base_identity", "check_base",
           "fuse_adapters", "load_adapter_weights", "parse_lora_spec", "read_adapter", "save_adapter",
           "set_adapter_scales", "target_module_names", "trainable_state_dict", "unfuse_adapters"]

ADAPTER_WEIGHTS = "adapter_model.safetensors"  # PEFT's names
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_META = "infinitystar_adapter.json"  # ours: base identity, training settings
_PEFT_PREFIX = "base_model.model."  # PeftModel.save_pretrained's key prefix

# Module-name suffixes of each group (the names of transformer.model / transformer.attention).
TARGET_GROUPS: dict[str, tuple[str, ...]] = {
    "attention": ("attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.o_proj"),
    "mlp": ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"),
    "heads": ("semantic_head", "detail_head"),
}


@dataclass(frozen=True)
class LoRAConfig:
    """One adapter's shape. ``alpha / rank`` scales its output (PEFT's ``lora_alpha``); ``targets`` are group
    names of :data:`TARGET_GROUPS` or regular expressions that match whole module names."""

    rank: int = 16
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple[str, ...] = ("attention", "mlp")

    def __post_init__(self) -> None:
        targets = (self.targets,) if isinstance(self.targets, str) else tuple(self.targets)
        object.__setattr__(self, "targets", targets)
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"LoRA rank must be an integer >= 1, got {self.rank!r}")
        if not isinstance(self.alpha, int | float) or not self.alpha > 0:
            raise ValueError(f"LoRA alpha must be > 0, got {self.alpha!r}")
        if not isinstance(self.dropout, int | float) or not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {self.dropout!r}")
        if not targets or not all(isinstance(t, str) and t for t in targets):
            raise ValueError(f"LoRA targets must be non-empty names or patterns, got {list(targets)}")
        for t in targets:
            if t not in TARGET_GROUPS:
                try:
                    re.compile(t)
                except re.error as err:
                    raise ValueError(f"LoRA target {t!r} is neither a group ({', '.join(TARGET_GROUPS)}) nor a "
                                     f"regular expression ({err})") from None


def _peft() -> Any:
    try:
        import peft
    except ImportError:
        raise ImportError("LoRA adapters need PEFT: pip install 'infinitystar[lora]' (or pip install peft)") from None
    return peft


def _linear_names(model: nn.Module) -> list[str]:
    """Names of the model's ``nn.Linear`` layers (the base layer's name when PEFT already wrapped one)."""
    return sorted({name.removesuffix(".base_layer") for name, module in model.named_modules()
                   if isinstance(module, nn.Linear) and ".lora_" not in name})


def target_module_names(model: nn.Module, targets: Sequence[str]) -> list[str]:
    """The full names of the linear layers ``targets`` select (each target must select at least one)."""
    names = _linear_names(model)
    chosen: set[str] = set()
    for t in targets:
        if t in TARGET_GROUPS:
            hit = [n for n in names if any(n == s or n.endswith("." + s) for s in TARGET_GROUPS[t])]
        else:
            rx = re.compile(t)
            hit = [n for n in names if rx.fullmatch(n)]
        if not hit:
            raise ValueError(f"LoRA target {t!r} matches no linear layer of the transformer (e.g. {names[:3]})")
        chosen.update(hit)
    return sorted(chosen)


def base_identity(model: nn.Module) -> str:
    """A short fingerprint of the *base* weights (adapters excluded, fused or not fused as they are now): a hash of
    every base parameter's name, shape and a strided sample of its values rounded to bf16 (so a float32 and a bf16
    copy of the same weights agree). Two fine-tunes of one architecture differ; the same weights loaded anywhere
    agree. Cheap even for the 8B (a sample per tensor)."""
    h = hashlib.sha256()
    for name, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
        if ".lora_" in name:
            continue
        base_name = name.replace(".base_layer.", ".")
        flat = p.detach().reshape(-1)
        step = max(1, flat.numel() // 64)
        # Rounded to bf16: the same weights held in float32 (training) or bf16 (inference) give one identity.
        sample = flat[::step][:64].to("cpu", torch.bfloat16).to(torch.float32)
        h.update(f"{base_name}:{tuple(p.shape)}\0".encode())
        h.update(sample.numpy().tobytes())
    return h.hexdigest()[:16]


def adapter_layers(model: nn.Module) -> list[Any]:
    """PEFT's LoRA layers inside ``model`` (empty when no adapter was added)."""
    peft = _peft()
    return [m for m in model.modules() if isinstance(m, peft.tuners.lora.LoraLayer)]


def adapter_names(model: nn.Module) -> list[str]:
    names: set[str] = set()
    for layer in adapter_layers(model):
        names.update(layer.lora_A.keys())
    return sorted(names)


def add_adapter(model: nn.Module, cfg: LoRAConfig, adapter_name: str = "default") -> list[str]:
    """Inject adapter ``adapter_name`` of shape ``cfg`` into ``model``; freezes every base weight. Returns the
    adapted module names."""
    peft = _peft()
    if adapter_name in adapter_names(model):
        raise ValueError(f"the transformer already has an adapter named {adapter_name!r}")
    names = target_module_names(model, cfg.targets)
    lcfg = peft.LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=names,
                           bias="none")
    # Every base weight frozen, before and after (PEFT leaves the other adapters' trainability to the caller).
    model.requires_grad_(False)
    with warnings.catch_warnings():
        # Several named adapters in one model are the point here (diffusers' set_adapters), not an accident.
        warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
        peft.inject_adapter_in_model(lcfg, model, adapter_name=adapter_name)
    for layer in adapter_layers(model):
        if adapter_name in layer.lora_A:
            for p in (*layer.lora_A[adapter_name].parameters(), *layer.lora_B[adapter_name].parameters()):
                p.requires_grad_(True)
    return names


def trainable_state_dict(model: nn.Module, adapter_name: str = "default") -> dict[str, torch.Tensor]:
    """The adapter's weights in PEFT's layout (``base_model.model.<module>.lora_A.weight``)."""
    peft = _peft()
    sd = peft.get_peft_model_state_dict(model, adapter_name=adapter_name)
    return {_PEFT_PREFIX + k: v.detach().contiguous() for k, v in sd.items()}


@dataclass
class AdapterFile:
    """An adapter folder read back: its shape, weights (PEFT keys, no prefix) and our metadata."""

    path: Path
    config: LoRAConfig
    target_modules: list[str]
    weights: dict[str, torch.Tensor]
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def base(self) -> Mapping[str, Any]:
        return self.meta.get("base", {})


def save_adapter(folder: str | os.PathLike, model: nn.Module, cfg: LoRAConfig, *, adapter_name: str = "default",
                 base: Mapping[str, Any], training: Mapping[str, Any] | None = None,
                 vocabulary: Sequence[str] | None = None) -> Path:
    """Write adapter ``adapter_name`` of ``model`` to ``folder`` in PEFT's layout plus ``infinitystar_adapter.json``
    (``base``: the base model's ``name`` and ``identity``; ``training``: the run's settings; ``vocabulary``: the
    words of its training captions, for a base with a closed-vocabulary text encoder). Atomic files."""
    from safetensors.torch import save_file

    peft = _peft()
    out = make_folder(folder, "adapter folder")
    weights = {k: v.to("cpu") for k, v in trainable_state_dict(model, adapter_name).items()}
    targets = sorted({k[len(_PEFT_PREFIX):].rsplit(".lora_", 1)[0] for k in weights})
    with atomic_output(out / ADAPTER_WEIGHTS) as tmp:
        save_file(weights, str(tmp), metadata={"format": "pt"})
    lcfg = peft.LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=targets,
                           bias="none", base_model_name_or_path=str(base.get("name", "")))
    peft_json = lcfg.to_dict()
    peft_json = {k: (sorted(v) if isinstance(v, set) else v) for k, v in peft_json.items()}
    atomic_write_json(out / ADAPTER_CONFIG, json.loads(json.dumps(peft_json, default=str)))
    atomic_write_json(out / ADAPTER_META, {"format": 1, "base": dict(base), "lora": asdict(cfg),
                                           "target_modules": targets, "parameters": sum(v.numel() for v in
                                                                                        weights.values()),
                                           "training": dict(training or {}),
                                           **({"vocabulary": sorted(set(vocabulary))} if vocabulary is not None
                                              else {})})
    return out


def adapter_vocabulary(adapter: AdapterFile) -> tuple[str, ...]:
    """The words the adapter was trained on (``vocabulary`` of its JSON; empty when not recorded)."""
    words = adapter.meta.get("vocabulary") or []
    if not isinstance(words, list) or not all(isinstance(w, str) for w in words):
        raise ValueError(f"LoRA adapter {adapter.path}: {ADAPTER_META} 'vocabulary' must be a list of words")
    return tuple(words)


def read_adapter(folder: str | os.PathLike) -> AdapterFile:
    """Read an adapter folder written by :func:`save_adapter` (or by PEFT: then without base identity)."""
    from safetensors import safe_open

    root = Path(folder)
    if not root.is_dir():
        raise FileNotFoundError(f"LoRA adapter {root} is not a folder (want {ADAPTER_WEIGHTS} + {ADAPTER_CONFIG})")
    for name in (ADAPTER_WEIGHTS, ADAPTER_CONFIG):
        if not (root / name).is_file():
            raise FileNotFoundError(f"LoRA adapter folder {root} has no {name}")
    try:
        peft_json = json.loads((root / ADAPTER_CONFIG).read_text(encoding="utf-8"))
        meta = json.loads((root / ADAPTER_META).read_text(encoding="utf-8")) if (root / ADAPTER_META).is_file() \
            else {}
    except (ValueError, UnicodeDecodeError) as err:
        raise ValueError(f"LoRA adapter {root}: unreadable JSON ({err})") from None
    if peft_json.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"LoRA adapter {root}: {ADAPTER_CONFIG} describes a {peft_json.get('peft_type')} adapter")
    targets = peft_json.get("target_modules") or []
    if isinstance(targets, str):
        raise ValueError(f"LoRA adapter {root}: target_modules is a pattern ({targets!r}); this loader wants the "
                         f"module names")
    try:
        cfg = LoRAConfig(rank=int(peft_json["r"]), alpha=float(peft_json["lora_alpha"]),
                         dropout=float(peft_json.get("lora_dropout", 0.0)),
                         targets=tuple(re.escape(t) for t in sorted(targets)) or ("attention",))
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError(f"LoRA adapter {root}: bad {ADAPTER_CONFIG} ({err})") from None
    weights: dict[str, torch.Tensor] = {}
    try:
        with safe_open(str(root / ADAPTER_WEIGHTS), framework="pt") as f:  # tensors only: nothing can execute
            for key in f.keys():  # noqa: SIM118 - a safe_open handle, not a dict
                weights[key[len(_PEFT_PREFIX):] if key.startswith(_PEFT_PREFIX) else key] = f.get_tensor(key)
    except Exception as err:  # safetensors raises its own error types for truncated or foreign files
        raise ValueError(f"LoRA adapter {root}: {ADAPTER_WEIGHTS} is not a readable safetensors file ({err})") \
            from None
    if not weights or not all(".lora_A." in k or ".lora_B." in k for k in weights):
        raise ValueError(f"LoRA adapter {root}: {ADAPTER_WEIGHTS} holds no lora_A/lora_B weights")
    return AdapterFile(root, cfg, sorted(targets), weights, meta)


def check_base(adapter: AdapterFile, name: str, identity: str) -> None:
    """One line unless ``adapter`` was made for this base model (same identity); an adapter without a recorded
    base (written by PEFT elsewhere) is accepted on its shapes."""
    base = adapter.base
    if base and base.get("identity") != identity:
        raise ValueError(f"LoRA adapter {adapter.path} was made for base model {base.get('name')!r} (identity "
                         f"{base.get('identity')}), not for this pipeline's {name!r} (identity {identity})")


def load_adapter_weights(model: nn.Module, adapter: AdapterFile, adapter_name: str) -> None:
    """Inject ``adapter`` under ``adapter_name`` and load its weights; shapes are checked by name."""
    peft = _peft()
    add_adapter(model, adapter.config, adapter_name)
    expected = peft.get_peft_model_state_dict(model, adapter_name=adapter_name)
    missing = sorted(set(expected) - set(adapter.weights))
    extra = sorted(set(adapter.weights) - set(expected))
    if missing or extra:
        raise ValueError(f"LoRA adapter {adapter.path} does not fit this transformer: {len(missing)} missing "
                         f"weights (e.g. {missing[:2]}), {len(extra)} unknown (e.g. {extra[:2]})")
    for k, v in adapter.weights.items():
        if tuple(v.shape) != tuple(expected[k].shape):
            raise ValueError(f"LoRA adapter {adapter.path}: {k} has shape {tuple(v.shape)}, this transformer wants "
                             f"{tuple(expected[k].shape)}")
    peft.set_peft_model_state_dict(model, adapter.weights, adapter_name=adapter_name)
    model.requires_grad_(False)


def set_adapter_scales(model: nn.Module, scales: Mapping[str, float]) -> None:
    """Activate exactly the adapters of ``scales``, each with that weight (1 = as trained, 0 = no effect)."""
    known = adapter_names(model)
    unknown = [n for n in scales if n not in known]
    if unknown:
        raise ValueError(f"no adapter named {unknown[0]!r}; loaded: {', '.join(known) or 'none'}")
    for layer in adapter_layers(model):
        layer.set_adapter(list(scales))
        for name, scale in scales.items():
            if name in layer.lora_A:
                layer.set_scale(name, float(scale))
    model.requires_grad_(False)  # set_adapter marks the active adapters trainable; inference wants none


def fuse_adapters(model: nn.Module) -> None:
    """Merge the active adapters (at their scales) into the base weights."""
    for layer in adapter_layers(model):
        layer.merge(safe_merge=True)


def unfuse_adapters(model: nn.Module) -> None:
    """Undo :func:`fuse_adapters` (the base weights come back up to float rounding of the add and subtract)."""
    for layer in adapter_layers(model):
        layer.unmerge()


def parse_lora_spec(spec: str) -> tuple[str, float]:
    """``PATH[:SCALE]`` (the CLI's ``--lora``) -> ``(path, scale)``; the scale defaults to 1. A last ``:``-part that
    is not a number belongs to the path."""
    path, sep, tail = spec.rpartition(":")
    if sep:
        try:
            return path, float(tail)
        except ValueError:
            pass
    if not spec:
        raise ValueError("--lora needs a folder: --lora PATH or --lora PATH:SCALE")
    return spec, 1.0

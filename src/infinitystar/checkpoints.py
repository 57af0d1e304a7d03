"""Checkpoint I/O: safetensors load/save, strict loading, and the official-checkpoint adapters.

Loading is strict everywhere: a missing, unexpected or wrongly shaped key is an error that lists
the keys (the reference loads with ``strict=False``, which would hide a wrong checkpoint). The only
keys ever dropped are named explicitly (the VAE's quantizer ``mask`` buffers, which carry no
information). Pickled official checkpoints are read with ``torch.load(weights_only=True)`` only.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from .config import TransformerConfig, VAEConfig, config_from_dict, config_to_dict
from .fileio import atomic_output, atomic_write_json, make_folder
from .transformer.model import InfinityStarTransformer
from .vae.model import VideoVAE

# ----------------------------------------------------------------------------------------------
# Generic helpers (reusable for every model)
# ----------------------------------------------------------------------------------------------


def _preview(items: list[str], limit: int = 20) -> str:
    shown = ", ".join(items[:limit])
    more = f", ... ({len(items) - limit} more)" if len(items) > limit else ""
    return f"[{shown}{more}]"


def _mismatch_report(missing: list[str], unexpected: list[str], mismatched: list[str]) -> str:
    """'missing keys [...]; unexpected keys [...]; shape mismatches [...]' (the non-empty parts)."""
    parts = []
    if missing:
        parts.append(f"missing keys {_preview(missing)}")
    if unexpected:
        parts.append(f"unexpected keys {_preview(unexpected)}")
    if mismatched:
        parts.append(f"shape mismatches {_preview(mismatched)}")
    return "; ".join(parts)


def state_dict_mismatches(
    module: nn.Module, state_dict: Mapping[str, Tensor]
) -> tuple[list[str], list[str], list[str]]:
    """(missing keys, unexpected keys, 'key: expected (..) given (..)' shape mismatches) vs ``module``."""
    expected = module.state_dict()
    missing = sorted(k for k in expected if k not in state_dict)
    unexpected = sorted(k for k in state_dict if k not in expected)
    mismatched = sorted(
        f"{k}: expected {tuple(expected[k].shape)}, given {tuple(state_dict[k].shape)}"
        for k in expected
        if k in state_dict and tuple(expected[k].shape) != tuple(state_dict[k].shape)
    )
    return missing, unexpected, mismatched


def load_state_dict_strict(
    module: nn.Module, state_dict: Mapping[str, Tensor], what: str, *, source: str | None = None, assign: bool = False
) -> None:
    """Load ``state_dict`` into ``module`` requiring exactly the same keys and shapes.

    Raises ``ValueError("checkpoint <source> is not a <what>: missing keys [...], unexpected keys
    [...], shape mismatches [...]")``. ``assign=True`` adopts the given tensors (for modules built on
    the meta device).
    """
    missing, unexpected, mismatched = state_dict_mismatches(module, state_dict)
    name = f"checkpoint {source}" if source else "checkpoint"
    if missing or unexpected or mismatched:
        raise ValueError(f"{name} is not a {what}: " + _mismatch_report(missing, unexpected, mismatched))
    check_finite(state_dict, name)
    module.load_state_dict(dict(state_dict), strict=True, assign=assign)


def nonfinite_tensors(state_dict: Mapping[str, Tensor]) -> dict[str, int]:
    """Name -> count of NaN/inf values, for every floating-point tensor that has any."""
    bad = {}
    for key, t in state_dict.items():
        if not t.is_floating_point() or t.device.type == "meta" or t.numel() == 0:
            continue
        # A float32 sum is finite iff every value is (NaN and inf propagate; weights never sum past 3e38) and
        # allocates nothing model-sized: loading stays at one copy of the weights. Only a bad tensor is counted.
        if not torch.isfinite(t.sum(dtype=torch.float32)):
            n = int((~torch.isfinite(t)).sum())
            if n:
                bad[key] = n
    return bad


def check_finite(state_dict: Mapping[str, Tensor], what: str) -> None:
    """Refuse weights with NaN or inf (a diverged run, a corrupted file): they would only fail later, deep inside
    sampling, or be copied on. The error names the tensors."""
    bad = nonfinite_tensors(state_dict)
    if bad:
        listed = ", ".join(f"{k} ({n} values)" for k, n in list(bad.items())[:5])
        more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
        raise ValueError(f"{what} has NaN/inf weights: {listed}{more}")


def load_safetensors(path: str | os.PathLike) -> dict[str, Tensor]:
    """All tensors of a safetensors file (on CPU); a clear error if the file is missing or not safetensors."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"safetensors file {path} does not exist")
    try:
        return load_file(str(path), device="cpu")
    except Exception as exc:  # safetensors raises its own error types
        raise ValueError(f"{path} is not a readable safetensors file: {exc}") from exc


def read_safetensors_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The string metadata stored in a safetensors header (empty dict if none)."""
    with open_safetensors(path) as f:
        return dict(f.metadata() or {})


@contextlib.contextmanager
def open_safetensors(path: str | os.PathLike, device: str | None = None) -> Iterator[Any]:
    """``safe_open`` with its errors (a truncated file, a bad or huge header, not safetensors at all) turned
    into one ValueError naming the file; a missing file is a FileNotFoundError naming it."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"safetensors file {p} does not exist" if not p.exists() else f"{p} is not a file")
    kwargs = {} if device is None else {"device": device}
    try:
        handle = safe_open(str(p), framework="pt", **kwargs)
    except Exception as exc:  # safetensors raises its own error types
        raise ValueError(f"{p} is not a readable safetensors file: {exc}") from None
    with handle as f:
        yield f


def save_safetensors(
    state_dict: Mapping[str, Tensor], path: str | os.PathLike, metadata: Mapping[str, str] | None = None
) -> None:
    """Write ``state_dict`` to ``path`` atomically (temp file in the same folder, then ``os.replace``).

    Tensors are moved to CPU and made contiguous; tensors sharing storage are cloned (safetensors
    refuses aliases).
    """
    path = Path(path)
    check_finite({k: v for k, v in state_dict.items() if isinstance(v, Tensor)}, f"the state dict for {path}")
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, Tensor] = {}
    seen_storages: set[int] = set()
    for k, v in state_dict.items():
        if not isinstance(v, Tensor):
            raise ValueError(f"cannot save {k!r}: not a tensor ({type(v).__name__})")
        t = v.detach().to("cpu").contiguous()
        storage = t.untyped_storage().data_ptr()
        if t.numel() and storage in seen_storages:
            t = t.clone()
        seen_storages.add(storage)
        tensors[k] = t
    meta = {str(k): str(v) for k, v in (metadata or {}).items()}
    size = sum(t.numel() * t.element_size() for t in tensors.values())
    with atomic_output(path, size_hint=size) as tmp:
        save_file(tensors, str(tmp), metadata=meta)


def torch_load_weights_only(path: str | os.PathLike) -> Any:
    """``torch.load`` restricted to tensors and plain containers (never an unrestricted unpickle)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file {path} does not exist")
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:
        # torch's message is a page long and suggests weights_only=False, which is exactly what is never done here.
        found = re.search(r"(Unsupported [^.\n]*|Trying to load unsupported [^.\n]*|[^.\n]*(?:invalid|truncated|"
                          r"corrupt|zip)[^.\n]*)", str(exc), flags=re.I)
        why = found.group(1).strip() if found else type(exc).__name__
        raise ValueError(f"{path} is not a PyTorch checkpoint that can be read safely (weights-only: tensors and "
                         f"plain data): {why[:200]}") from None


# ----------------------------------------------------------------------------------------------
# Video VAE
# ----------------------------------------------------------------------------------------------

VAE_FORMAT = "infinitystar-vae"
# The reference's BSQ quantizer registers an int64 `mask` buffer per codebook, twice (`quantizer`
# and its alias `quantize`). They hold 2**arange(d) (overflowing for d=64) and nothing learned.
_VAE_MASK_KEY = re.compile(r"^(quantizer|quantize)\.[^.]+\.mask$")


def is_vae_quantizer_mask_key(key: str) -> bool:
    return _VAE_MASK_KEY.match(key) is not None


def drop_vae_quantizer_masks(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The state dict without the quantizer mask buffers (only those; everything else is kept)."""
    return {k: v for k, v in state_dict.items() if not is_vae_quantizer_mask_key(k)}


def load_official_vae_state_dict(path: str | os.PathLike) -> dict[str, Tensor]:
    """Read the official ``infinitystar_videovae.pth``: its ``["vae"]`` dict minus the mask buffers."""
    ckpt = torch_load_weights_only(path)
    if not isinstance(ckpt, Mapping):
        raise ValueError(f"checkpoint {path} holds a {type(ckpt).__name__}, expected a dict with a 'vae' entry")
    if "vae" not in ckpt:
        top = _preview(sorted(map(str, ckpt)))
        raise ValueError(f"checkpoint {path} has no 'vae' entry; its top-level keys are {top}")
    sd = ckpt["vae"]
    if not isinstance(sd, Mapping) or not all(isinstance(v, Tensor) for v in sd.values()):
        raise ValueError(f"checkpoint {path}: 'vae' is not a dict of tensors (got {type(sd).__name__})")
    return drop_vae_quantizer_masks(sd)


def _resolve_vae_file(path_or_dir: str | os.PathLike) -> Path:
    path = Path(path_or_dir)
    if path.is_file():
        return path
    if not path.is_dir():
        raise FileNotFoundError(f"VAE checkpoint {path} does not exist")
    preferred = path / "vae.safetensors"
    if preferred.is_file():
        return preferred
    candidates = sorted(p for p in path.iterdir() if p.suffix in (".safetensors", ".pth", ".pt"))
    if len(candidates) != 1:
        raise ValueError(
            f"cannot choose the VAE checkpoint in {path}: expected vae.safetensors or exactly one "
            f".safetensors/.pth file, found {[p.name for p in candidates]}"
        )
    return candidates[0]


def _read_vae_state_dict(path: Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    if path.suffix == ".safetensors":
        return drop_vae_quantizer_masks(load_safetensors(path)), read_safetensors_metadata(path)
    return load_official_vae_state_dict(path), {}


def _vae_config_from_metadata(meta: Mapping[str, str]) -> VAEConfig | None:
    raw = meta.get("config")
    if meta.get("format") != VAE_FORMAT or raw is None:
        return None
    return config_from_dict(VAEConfig, json.loads(raw))


def load_vae(path_or_dir: str | os.PathLike, config: VAEConfig | None = None) -> VideoVAE:
    """Build a ``VideoVAE`` (eval mode, fp32, no grad) from the official .pth or our safetensors.

    ``config`` defaults to the one stored by ``convert_vae_checkpoint``/``save_vae``, else the
    official preset. The model is built on the meta device and adopts the checkpoint's tensors, so
    nothing is randomly initialised.
    """
    path = _resolve_vae_file(path_or_dir)
    sd, meta = _read_vae_state_dict(path)
    config = config or _vae_config_from_metadata(meta) or VAEConfig()
    with torch.device("meta"):
        model = VideoVAE(config)
    sd = {k: (v.float() if v.is_floating_point() else v) for k, v in sd.items()}
    what = (
        f"VideoVAE with block_out_channels={config.block_out_channels}, layers_per_block={config.layers_per_block}, "
        f"latent_channels={config.latent_channels}"
    )
    load_state_dict_strict(model, sd, what, source=str(path), assign=True)
    return model.eval().requires_grad_(False)


def save_vae(model: VideoVAE, path: str | os.PathLike, metadata: Mapping[str, str] | None = None) -> None:
    """Save a ``VideoVAE`` as safetensors under the official key names, with its config in the metadata."""
    meta = {"format": VAE_FORMAT, "config": json.dumps(config_to_dict(model.config)), **(metadata or {})}
    save_safetensors(model.state_dict(), path, metadata=meta)


def convert_vae_checkpoint(src_pth: str | os.PathLike, dst_safetensors: str | os.PathLike,
                           config: VAEConfig | None = None) -> Path:
    """Official pickled ``.pth`` -> safetensors (official key names, masks dropped), after a strict load check."""
    model = load_vae(src_pth, config)
    save_vae(model, dst_safetensors, metadata={"source": Path(src_pth).name})
    return Path(dst_safetensors)


# ----------------------------------------------------------------------------------------------
# Transformer: official key names <-> ours, sharded official folders, our own files
# ----------------------------------------------------------------------------------------------

TRANSFORMER_FORMAT = "infinitystar-transformer"
OFFICIAL_INDEX_NAME = "model.safetensors.index.json"
# The official state dict carries a [1, 1, C] `sos_token` that no forward ever reads (the first-scale
# input is word_embed's bias). It is accepted (shape-checked) and dropped on load, written as zeros on export.
OFFICIAL_DEAD_KEYS = ("sos_token",)

# Our top-level names -> official ones (everything else maps one to one below the block prefix).
_TOP_TO_OFFICIAL = {
    "uncond_text": "cfg_uncond",
    "code_embed.": "word_embed.",
    "final_norm.": "norm_hidden_sates.",  # sic: the official spelling
    "detail_head.": "head.",
    "semantic_head.": "semantic_head2.",
    "text_proj.": "text_proj.",
}
_BLOCK_TO_OFFICIAL = {"attn_norm.": "input_layernorm.", "mlp_norm.": "post_attention_layernorm.",
                      "attn.": "attn.", "mlp.": "mlp."}
_OUR_BLOCK = re.compile(r"^blocks\.(\d+)\.(.+)$")
_OFFICIAL_CHUNKED = re.compile(r"^block_chunks\.(\d+)\.module\.(\d+)\.(.+)$")
_OFFICIAL_FLAT = re.compile(r"^blocks\.(\d+)\.(.+)$")


def _swap_prefix(name: str, table: Mapping[str, str]) -> str | None:
    for src, dst in table.items():
        if name == src or (src.endswith(".") and name.startswith(src)):
            return dst + name[len(src):]
    return None


def transformer_key_to_official(key: str, config: Any) -> str:
    """Our parameter name -> the official one (``block_chunks.{c}.module.{j}.`` when block_chunks > 1)."""
    m = _OUR_BLOCK.match(key)
    if m:
        i, rest = int(m.group(1)), m.group(2)
        sub = _swap_prefix(rest, _BLOCK_TO_OFFICIAL)
        if sub is None or not 0 <= i < config.depth:
            raise KeyError(f"no official name for transformer key {key!r}")
        if config.block_chunks == 1:
            return f"blocks.{i}.{sub}"
        per = config.blocks_per_chunk
        return f"block_chunks.{i // per}.module.{i % per}.{sub}"
    out = _swap_prefix(key, _TOP_TO_OFFICIAL)
    if out is None:
        raise KeyError(f"no official name for transformer key {key!r}")
    return out


def transformer_key_from_official(key: str, config: Any) -> str | None:
    """Official name -> ours; ``None`` for the dead keys (``sos_token``); ``KeyError`` for unknown names."""
    if key in OFFICIAL_DEAD_KEYS:
        return None
    m = _OFFICIAL_CHUNKED.match(key)
    per = config.blocks_per_chunk
    if m and config.block_chunks > 1:
        c, j, rest = int(m.group(1)), int(m.group(2)), m.group(3)
        if j >= per:
            raise KeyError(f"official key {key!r}: chunk module index {j} >= {per} blocks per chunk")
        i = c * per + j
    else:
        m = _OFFICIAL_FLAT.match(key) if config.block_chunks == 1 else None
        i, rest = (int(m.group(1)), m.group(2)) if m else (-1, "")
    if i >= 0:
        inverse = {v: k for k, v in _BLOCK_TO_OFFICIAL.items()}
        sub = _swap_prefix(rest, inverse)
        if sub is None:
            raise KeyError(f"unknown official transformer key {key!r}")
        return f"blocks.{i}.{sub}"
    out = _swap_prefix(key, {v: k for k, v in _TOP_TO_OFFICIAL.items()})
    if out is None:
        raise KeyError(f"unknown official transformer key {key!r}")
    return out


def official_transformer_shapes(config: Any) -> dict[str, tuple[int, ...]]:
    """Every official key and its shape for ``config`` (built on the meta device, so free for the 8B)."""
    with torch.device("meta"):
        model = InfinityStarTransformer(config)
    shapes = {transformer_key_to_official(k, config): tuple(v.shape) for k, v in model.state_dict().items()}
    shapes["sos_token"] = (1, 1, config.embed_dim)
    return shapes


def _check_official_shapes(given: Mapping[str, tuple[int, ...]], config: Any, source: str) -> None:
    expected = official_transformer_shapes(config)
    missing = sorted(k for k in expected if k not in given)
    unexpected = sorted(k for k in given if k not in expected)
    mismatched = sorted(f"{k}: expected {expected[k]}, given {tuple(given[k])}"
                        for k in expected if k in given and tuple(given[k]) != expected[k])
    if missing or unexpected or mismatched:
        raise ValueError(f"checkpoint {source} is not an official transformer of depth {config.depth}, width "
                         f"{config.embed_dim}, {config.num_heads}/{config.num_kv_heads} heads, MLP "
                         f"{config.mlp_intermediate}, text width {config.text_channels}: "
                         + _mismatch_report(missing, unexpected, mismatched))


def transformer_state_dict_from_official(state_dict: Mapping[str, Tensor], config: Any,
                                         source: str = "<state dict>") -> dict[str, Tensor]:
    """Strictly checked official state dict -> ours (dead keys dropped)."""
    _check_official_shapes({k: tuple(v.shape) for k, v in state_dict.items()}, config, source)
    out = {}
    for k, v in state_dict.items():
        ours = transformer_key_from_official(k, config)
        if ours is not None:
            out[ours] = v
    return out


def transformer_state_dict_to_official(state_dict: Mapping[str, Tensor], config: Any) -> dict[str, Tensor]:
    """Our state dict -> official names, plus the dead ``sos_token`` (zeros) so the key set is complete."""
    out = {transformer_key_to_official(k, config): v for k, v in state_dict.items()}
    ref = next(iter(state_dict.values()))
    out["sos_token"] = torch.zeros(1, 1, config.embed_dim, dtype=torch.float32, device=ref.device)
    return out


def official_shard_files(path: str | os.PathLike) -> list[Path]:
    """The safetensors files of an official transformer: a single file, a folder with
    ``model.safetensors.index.json`` (HF sharded layout), or a folder with exactly one ``.safetensors``."""
    path = Path(path)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise FileNotFoundError(f"transformer checkpoint {path} does not exist")
    index = path / OFFICIAL_INDEX_NAME
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError) as exc:
            raise ValueError(f"{index} is not a safetensors index (needs a 'weight_map'): {exc}") from exc
        files = [path / name for name in dict.fromkeys(weight_map.values())]
        absent = [str(f) for f in files if not f.is_file()]
        if absent:
            raise FileNotFoundError(f"{index} names shard files that do not exist: {absent}")
        return files
    candidates = sorted(path.glob("*.safetensors"))
    if len(candidates) != 1:
        raise ValueError(f"cannot find the transformer weights in {path}: expected {OFFICIAL_INDEX_NAME} or "
                         f"exactly one .safetensors file, found {[p.name for p in candidates]}")
    return candidates


def load_official_transformer(
    path: str | os.PathLike,
    config: Any,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    block_dtype: torch.dtype | None = None,
):
    """Build an ``InfinityStarTransformer`` from official weights (one file or a sharded folder).

    Keys and shapes of every shard are checked from the headers first (a checkpoint of another size
    fails before any data is read). Then shards are read one at a time through ``safe_open`` (memory
    mapped) and each tensor is converted and kept, so peak memory stays near one copy of the weights.
    ``block_dtype`` applies to the blocks only: the pipeline passes its precision policy's (bf16 for
    ``precision="bf16"``, as the reference casts its blocks), so the weights are never held in float32 first.
    """
    files = official_shard_files(path)
    shapes: dict[str, tuple[int, ...]] = {}
    owner: dict[str, Path] = {}
    for f in files:
        with open_safetensors(f) as handle:
            names = handle.keys()  # a safe_open handle is not iterable itself
            for k in names:
                if k in owner:
                    raise ValueError(f"key {k!r} appears in both {owner[k].name} and {f.name}")
                shapes[k] = tuple(handle.get_slice(k).get_shape())
                owner[k] = f
    _check_official_shapes(shapes, config, str(path))
    ours: dict[str, Tensor] = {}
    for f in files:
        with open_safetensors(f, device="cpu") as handle:
            names = handle.keys()
            for k in names:
                name = transformer_key_from_official(k, config)
                if name is None:
                    continue
                want = block_dtype if (block_dtype is not None and name.startswith("blocks.")) else dtype
                # copy=True: get_tensor may return a view into the memory map (unaligned, and keeping the
                # file mapped); an owned, aligned copy gives the same kernels, hence bitwise the same outputs.
                ours[name] = handle.get_tensor(k).to(device=device, dtype=want, copy=True)
    with torch.device("meta"):
        model = InfinityStarTransformer(config)
    load_state_dict_strict(model, ours, "InfinityStarTransformer", source=str(path), assign=True)
    return model


def export_official_transformer(model: nn.Module, out_dir: str | os.PathLike,
                                max_shard_bytes: int = 5 * 1024**3) -> list[Path]:
    """Write the model in the official layout: shards ``model-0000k-of-0000n.safetensors`` under official
    names plus ``model.safetensors.index.json`` (written last, atomically)."""
    config = model.cfg
    sd = transformer_state_dict_to_official(model.state_dict(), config)
    out_dir = Path(out_dir)
    make_folder(out_dir, "model folder")
    groups: list[list[str]] = [[]]
    size = 0
    for k, v in sd.items():
        nbytes = v.numel() * v.element_size()
        if groups[-1] and size + nbytes > max_shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(k)
        size += nbytes
    n = len(groups)
    weight_map: dict[str, str] = {}
    paths = []
    for i, keys in enumerate(groups):
        name = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        save_safetensors({k: sd[k] for k in keys}, out_dir / name, metadata={"format": "pt"})
        weight_map.update({k: name for k in keys})
        paths.append(out_dir / name)
    index = {"metadata": {"total_size": sum(v.numel() * v.element_size() for v in sd.values())},
             "weight_map": weight_map}
    atomic_write_json(out_dir / OFFICIAL_INDEX_NAME, index)
    return paths


def save_transformer(model: nn.Module, path: str | os.PathLike, metadata: Mapping[str, str] | None = None) -> None:
    """Save under our own key names, with the config in the safetensors metadata."""
    meta = {"format": TRANSFORMER_FORMAT, "config": json.dumps(config_to_dict(model.cfg)), **(metadata or {})}
    save_safetensors(model.state_dict(), path, metadata=meta)


def load_transformer(path: str | os.PathLike, config: Any = None, *, device: torch.device | str = "cpu"):
    """Load a file written by :func:`save_transformer` (config from its metadata unless given)."""
    meta = read_safetensors_metadata(path)
    if config is None:
        if meta.get("format") != TRANSFORMER_FORMAT or "config" not in meta:
            raise ValueError(f"{path} carries no transformer config in its metadata; pass config=")
        config = config_from_dict(TransformerConfig, json.loads(meta["config"]))
    sd = {k: v.to(device) for k, v in load_safetensors(path).items()}
    with torch.device("meta"):
        model = InfinityStarTransformer(config)
    load_state_dict_strict(model, sd, f"InfinityStarTransformer with {config}", source=str(path), assign=True)
    return model

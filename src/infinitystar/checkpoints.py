"""Checkpoint I/O: safetensors load/save, strict loading, and the official-checkpoint adapters.

Loading is strict everywhere: a missing, unexpected or wrongly shaped key is an error that lists
the keys (the reference loads with ``strict=False``, which would hide a wrong checkpoint). The only
keys ever dropped are named explicitly (the VAE's quantizer ``mask`` buffers, which carry no
information). Pickled official checkpoints are read with ``torch.load(weights_only=True)`` only.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

if TYPE_CHECKING:
    from infinitystar.config import VAEConfig
    from infinitystar.vae.model import VideoVAE

# ----------------------------------------------------------------------------------------------
# Generic helpers (reusable for every model)
# ----------------------------------------------------------------------------------------------


def _preview(items: list[str], limit: int = 20) -> str:
    shown = ", ".join(items[:limit])
    more = f", ... ({len(items) - limit} more)" if len(items) > limit else ""
    return f"[{shown}{more}]"


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
    if missing or unexpected or mismatched:
        parts = []
        if missing:
            parts.append(f"missing keys {_preview(missing)}")
        if unexpected:
            parts.append(f"unexpected keys {_preview(unexpected)}")
        if mismatched:
            parts.append(f"shape mismatches {_preview(mismatched)}")
        name = f"checkpoint {source}" if source else "checkpoint"
        raise ValueError(f"{name} is not a {what}: " + "; ".join(parts))
    module.load_state_dict(dict(state_dict), strict=True, assign=assign)


def load_safetensors(path: str | os.PathLike) -> dict[str, Tensor]:
    """All tensors of a safetensors file (on CPU); a clear error if the file is missing or not safetensors."""
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"safetensors file {path} does not exist")
    try:
        return load_file(str(path), device="cpu")
    except Exception as exc:  # safetensors raises its own error types
        raise ValueError(f"{path} is not a readable safetensors file: {exc}") from exc


def read_safetensors_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The string metadata stored in a safetensors header (empty dict if none)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})


def save_safetensors(
    state_dict: Mapping[str, Tensor], path: str | os.PathLike, metadata: Mapping[str, str] | None = None
) -> None:
    """Write ``state_dict`` to ``path`` atomically (temp file in the same folder, then ``os.replace``).

    Tensors are moved to CPU and made contiguous; tensors sharing storage are cloned (safetensors
    refuses aliases).
    """
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, Tensor] = {}
    seen: set[tuple[int, int]] = set()
    for k, v in state_dict.items():
        if not isinstance(v, Tensor):
            raise ValueError(f"cannot save {k!r}: not a tensor ({type(v).__name__})")
        t = v.detach().to("cpu").contiguous()
        ident = (t.untyped_storage().data_ptr(), t.storage_offset()) if t.numel() else (id(t), 0)
        if ident in seen:
            t = t.clone()
        seen.add(ident)
        tensors[k] = t
    meta = {str(k): str(v) for k, v in (metadata or {}).items()}
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=meta)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def torch_load_weights_only(path: str | os.PathLike) -> Any:
    """``torch.load`` restricted to tensors and plain containers (never an unrestricted unpickle)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file {path} does not exist")
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ValueError(f"{path} could not be read as a weights-only PyTorch checkpoint: {exc}") from exc


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
    from infinitystar.config import VAEConfig, config_from_dict

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
    from infinitystar.config import VAEConfig
    from infinitystar.vae.model import VideoVAE

    path = _resolve_vae_file(path_or_dir)
    sd, meta = _read_vae_state_dict(path)
    config = config or _vae_config_from_metadata(meta) or VAEConfig()
    with torch.device("meta"):
        model = VideoVAE(config)
    sd = {k: (v.float() if v.is_floating_point() else v) for k, v in sd.items()}
    load_state_dict_strict(model, sd, f"VideoVAE with {config}", source=str(path), assign=True)
    return model.eval().requires_grad_(False)


def save_vae(model: VideoVAE, path: str | os.PathLike, metadata: Mapping[str, str] | None = None) -> None:
    """Save a ``VideoVAE`` as safetensors under the official key names, with its config in the metadata."""
    from infinitystar.config import config_to_dict

    meta = {"format": VAE_FORMAT, "config": json.dumps(config_to_dict(model.config)), **(metadata or {})}
    save_safetensors(model.state_dict(), path, metadata=meta)


def convert_vae_checkpoint(src_pth: str | os.PathLike, dst_safetensors: str | os.PathLike,
                           config: VAEConfig | None = None) -> Path:
    """Official pickled ``.pth`` -> safetensors (official key names, masks dropped), after a strict load check."""
    model = load_vae(src_pth, config)
    save_vae(model, dst_safetensors, metadata={"source": Path(src_pth).name})
    return Path(dst_safetensors)

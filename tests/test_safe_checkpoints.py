"""Loading a run folder never executes code (issue 16, item 1): DCP's ``.metadata`` and its non-tensor entries.

Each test plants a payload whose unpickling would create a marker file, in a real checkpoint written by
``save_checkpoint``, then loads it the way ``train --resume`` (``load_checkpoint``) and ``export``
(``load_model_weights``) do: the load must fail in one line naming the file or entry, and the marker must not exist.
A clean checkpoint still loads exactly (the trainer tests check resumes bit for bit).
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path

import pytest
import torch
from torch import nn

from infinitystar.train import safe_dcp
from infinitystar.train.checkpointing import load_checkpoint, load_model_weights, save_checkpoint
from infinitystar.train.distributed import DistInfo
from infinitystar.train.safe_dcp import UnsafeCheckpointError

INFO = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


class _Payload:
    """Unpickling it calls ``Path.touch(marker)``: stands for any callable an attacker would name."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def _checkpoint(tmp_path: Path) -> tuple[Path, nn.Module]:
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(2, 4)).sum().backward()
    opt.step()
    return save_checkpoint(tmp_path / "ckpts", 1, INFO, model, opt), model


def _fresh() -> tuple[nn.Module, torch.optim.Optimizer]:
    model = nn.Linear(4, 3)
    return model, torch.optim.AdamW(model.parameters(), lr=5.0)


def test_clean_checkpoint_loads_through_the_safe_reader(tmp_path):
    path, saved = _checkpoint(tmp_path)
    model, opt = _fresh()
    load_checkpoint(path, INFO, model, opt, restore_rng=False)
    assert torch.equal(model.weight, saved.weight)
    assert opt.param_groups[0]["lr"] == 1e-3  # a non-tensor entry, read with weights_only=True
    plain = nn.Linear(4, 3)
    load_model_weights(path, plain)
    assert torch.equal(plain.bias, saved.bias)


def test_planted_metadata_payload_is_refused(tmp_path):
    path, _ = _checkpoint(tmp_path)
    marker = tmp_path / "pwned"
    # A metadata file that is an ordinary Metadata object wrapped around the payload (a crafted file can be any
    # pickle; this one would pass every later check if the payload were allowed to run).
    meta = safe_dcp.read_metadata(path)
    meta.planner_data = _Payload(marker)
    (path / ".metadata").write_bytes(pickle.dumps(meta))
    with pytest.raises(UnsafeCheckpointError, match=r"\.metadata is not a plain checkpoint metadata file: it "
                       r"references pathlib\..*touch"):
        load_model_weights(path, nn.Linear(4, 3))
    model, opt = _fresh()
    with pytest.raises(UnsafeCheckpointError, match="nothing was run"):
        load_checkpoint(path, INFO, model, opt, restore_rng=False)
    assert not marker.exists()


def test_planted_payload_in_a_non_tensor_entry_is_refused(tmp_path):
    """Replace the bytes of the optimizer's ``lr`` entry in the shard by a pickled payload of the same framing."""
    path, _ = _checkpoint(tmp_path)
    marker = tmp_path / "pwned"
    meta = safe_dcp.read_metadata(path)
    key = next(k for k in meta.state_dict_metadata if k.endswith("param_groups.0.lr"))
    info = next(v for idx, v in meta.storage_data.items() if idx.fqn == key)
    shard = path / info.relative_path
    data = bytearray(shard.read_bytes())
    buf = io.BytesIO()
    torch.save(_Payload(marker), buf)
    payload = buf.getvalue()
    # Put the payload where the entry was and point the metadata at it (end of the shard).
    offset = len(data)
    data += payload
    shard.write_bytes(bytes(data))
    meta.storage_data = {idx: (type(v)(v.relative_path, offset, len(payload), v.transform_descriptors)
                               if idx.fqn == key else v) for idx, v in meta.storage_data.items()}
    (path / ".metadata").write_bytes(pickle.dumps(meta))
    model, opt = _fresh()
    with pytest.raises(UnsafeCheckpointError, match="param_groups.0.lr.*nothing was run"):
        load_checkpoint(path, INFO, model, opt, restore_rng=False)
    assert not marker.exists()


def test_garbage_metadata_is_one_clear_error(tmp_path):
    path, _ = _checkpoint(tmp_path)
    (path / ".metadata").write_bytes(b"\x80\x05garbage")
    with pytest.raises(ValueError, match=r"\.metadata is not a readable checkpoint metadata file"):
        load_model_weights(path, nn.Linear(4, 3))


# ----------------------------------------------------------------------------------------------
# NaN/inf weights (issue 16, item 5): refused at load and at save, named
# ----------------------------------------------------------------------------------------------


def test_nonfinite_weights_are_refused_at_load_and_save(tmp_path):
    from safetensors.torch import save_file

    from infinitystar.checkpoints import load_transformer, save_transformer
    from infinitystar.config import get_preset
    from infinitystar.transformer.model import InfinityStarTransformer

    cfg = get_preset("transformer", "tiny-test")
    model = InfinityStarTransformer(cfg)
    good = tmp_path / "good.safetensors"
    save_transformer(model, good)
    assert load_transformer(good, cfg) is not None
    with torch.no_grad():
        model.blocks[1].mlp.up_proj.weight[0, :3] = float("nan")
        model.detail_head.bias[0] = float("inf")
    with pytest.raises(ValueError, match=r"NaN/inf weights: .*blocks\.1\.mlp\.up_proj\.weight \(3 values\)"):
        save_transformer(model, tmp_path / "bad.safetensors")
    assert not (tmp_path / "bad.safetensors").exists()
    # A file that holds them anyway (written by another tool): the load names the tensors.
    from infinitystar.checkpoints import read_safetensors_metadata

    bad = tmp_path / "planted.safetensors"
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(bad), metadata=read_safetensors_metadata(good))
    with pytest.raises(ValueError, match=r"planted\.safetensors has NaN/inf weights: .*detail_head\.bias \(1 values\)"):
        load_transformer(bad, cfg)


# ----------------------------------------------------------------------------------------------
# Every other load path (issue 16, item 1): a planted payload never runs
# ----------------------------------------------------------------------------------------------


def test_pickled_checkpoint_payload_is_refused_by_convert(tmp_path, capsys):
    """``convert`` and the official VAE ``.pth`` go through ``torch.load(weights_only=True)``."""
    from infinitystar.cli import main as cli_main

    marker = tmp_path / "pwned"
    evil = tmp_path / "infinitystar_videovae.pth"
    torch.save({"state_dict": _Payload(marker)}, evil)
    assert cli_main(["convert", str(evil), str(tmp_path / "out.safetensors")]) == 2
    err = capsys.readouterr().err
    assert "is not a PyTorch checkpoint that can be read safely" in err and "Unsupported global" in err
    assert not marker.exists() and not (tmp_path / "out.safetensors").exists()


def test_pickled_npy_clip_is_refused(tmp_path):
    """VAE training reads ``.npy`` clips with ``allow_pickle=False``: an object array is refused unread."""
    import numpy as np

    from infinitystar.train.vae_data import MediaClipDataset, list_media

    marker = tmp_path / "pwned"
    clip = tmp_path / "clip.npy"
    np.save(clip, np.array([_Payload(marker)], dtype=object), allow_pickle=True)
    ds = MediaClipDataset(list_media([str(clip)]), num_frames=1, fps=16, height=16, width=16)
    with pytest.raises(ValueError, match="clip.npy"):
        ds.clip(0, np.random.default_rng(0))
    assert not marker.exists()

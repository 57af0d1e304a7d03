"""Parity of the video VAE with the reference (golden README sections 4, 8, 9).

Every case folder under golden/vae/ is one test id. The model is built from the case's
``config.json`` and its ``weights.safetensors`` is loaded through ``load_vae`` (strict, quantizer
mask buffers dropped). The multi-scale quantizer tensors of the case are checked by the
quantizer's own tests (see ``QUANTIZER_TENSORS``); every other tensor must be checked here.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import GOLDEN_DIR, golden_cases
from infinitystar.checkpoints import load_vae
from infinitystar.config import VAEConfig, get_preset
from infinitystar.vae.model import VideoVAE

VAE_ATOL = 1e-4  # golden README section 9: "VAE encoder/decoder outputs atol 1e-4"
ARGS_KEY = "vae_constructor_args (full Namespace as used)"

# Tensors of a VAE case that belong to the multi-scale BSQ tokenizer (tested in the quantizer tests).
QUANTIZER_TENSORS = re.compile(r"^(step\d+\..*|clip\d+\.initial_summed_code|summed_codes|decoded_from_summed_codes)$")
VAE_TENSORS = {
    "input_video",
    "posterior_eps",
    "encoder_out",
    "posterior_mean",
    "posterior_logvar_clamped",
    "z_sample",
    "latent",
    "decoded_from_latent",
    "decoded_from_latent_clamped_by_video_encode",
}

# The reference's quantizer buffers that our model deliberately does not keep (they hold
# 2**arange(d), no learned values; `quantize` is an alias of `quantizer`).
OFFICIAL_MASK_BUFFERS = {
    "quantizer.lfq_semantic.mask",
    "quantizer.lfq_detail.mask",
    "quantize.lfq_semantic.mask",
    "quantize.lfq_detail.mask",
}

CASES = golden_cases("vae")


def vae_config_from_case(case_dir: Path) -> VAEConfig:
    """Build our config from the reference constructor Namespace, refusing settings we do not implement."""
    args = json.loads((case_dir / "config.json").read_text())[ARGS_KEY]
    supported = {
        "norm_type": "rms",
        "down_block_mode": "dc",
        "up_block_mode": "dc",
        "down_layer": "3d-dc",
        "up_layer": "3d-dc",
        "pad_mode": "constant",
        "use_feat_proj": 2,
        "use_quant_conv": False,
        "use_post_quant_conv": False,
    }
    for key, value in supported.items():
        if key in args:
            assert args[key] == value, f"{case_dir.name}: {key}={args[key]!r} is not implemented (only {value!r})"
    return VAEConfig(
        in_channels=args["in_channels"],
        out_channels=args["out_channels"],
        block_out_channels=tuple(args["block_out_channels"]),
        layers_per_block=args["layers_per_block"],
        latent_channels=args["latent_channels"],
        spatial_compression=tuple(args["spatial_compression_list"]),
        temporal_compression=tuple(args["temporal_compression_list"]),
    )


@pytest.fixture(scope="module", params=CASES, ids=[p.name for p in CASES])
def golden_vae(request):
    case_dir: Path = request.param
    model = load_vae(case_dir / "weights.safetensors", vae_config_from_case(case_dir))
    tensors = load_file(str(case_dir / "case.safetensors"))
    return case_dir, model, tensors


def _subcases(tensors: dict[str, torch.Tensor]) -> list[str]:
    return sorted({k.split(".", 1)[0] + "." for k in tensors if k.startswith(("video.", "image."))})


def _close(name: str, got: torch.Tensor, want: torch.Tensor, atol: float = VAE_ATOL) -> None:
    assert got.shape == want.shape, f"{name}: shape {tuple(got.shape)} != golden {tuple(want.shape)}"
    diff = (got - want).abs().max().item()
    assert diff <= atol, f"{name}: max abs diff {diff:.3e} > atol {atol:.0e}"


def test_case_holds_only_known_tensors(golden_vae):
    """Every tensor of the case is either checked below or by the quantizer tests (none ignored silently)."""
    case_dir, _, tensors = golden_vae
    assert _subcases(tensors), f"{case_dir.name}: no video./image. sub-case"
    for key in tensors:
        prefix, name = key.split(".", 1)
        assert prefix in ("video", "image"), f"{case_dir.name}: unknown prefix in {key}"
        assert name in VAE_TENSORS or QUANTIZER_TENSORS.match(name), f"{case_dir.name}: unknown tensor {key}"


@pytest.mark.parametrize("chunked", [True, False], ids=["chunked", "one-shot"])
def test_vae_matches_golden(golden_vae, chunked):
    case_dir, model, tensors = golden_vae
    for p in _subcases(tensors):
        video = tensors[p + "input_video"]
        with torch.no_grad():
            _close(p + "encoder_out", model.encode_features(video, chunked=chunked), tensors[p + "encoder_out"])
            mean, logvar = model.encode_posterior(video, chunked=chunked)
            _close(p + "posterior_mean", mean, tensors[p + "posterior_mean"])
            _close(p + "posterior_logvar_clamped", logvar, tensors[p + "posterior_logvar_clamped"])
            eps = tensors[p + "posterior_eps"]
            _close(p + "z_sample", model.sample_posterior(mean, logvar, noise=eps), tensors[p + "z_sample"])
            _close(p + "latent", model.encode(video, noise=eps, chunked=chunked), tensors[p + "latent"])
            decoded = model.decode(tensors[p + "latent"], chunked=chunked)
            _close(p + "decoded_from_latent", decoded, tensors[p + "decoded_from_latent"])
            _close(
                p + "decoded_from_latent_clamped_by_video_encode",
                decoded.clamp(-1, 1),
                tensors[p + "decoded_from_latent_clamped_by_video_encode"],
            )
            if p == "image." and video.shape[2] == 1:
                # A 4-D image batch is the same as a one-frame video.
                _close(p + "latent (4-D input)", model.encode(video[:, :, 0], noise=eps), tensors[p + "latent"])


def test_official_preset_matches_official_keys():
    """Key for key and shape for shape the official state dict, minus the 4 quantizer mask buffers."""
    golden = json.loads((GOLDEN_DIR / "vae_keys.json").read_text())
    with torch.device("meta"):
        model = VideoVAE(get_preset("vae", "official"))
    ours = {k: (list(v.shape), str(v.dtype).removeprefix("torch.")) for k, v in model.state_dict().items()}
    for res in ("720p", "480p"):
        keys = golden[res]["keys"]
        masks = {k for k in keys if k.endswith(".mask")}
        assert masks == OFFICIAL_MASK_BUFFERS, f"{res}: the official buffers changed: {sorted(masks)}"
        assert all(keys[k]["kind"] == "buffer" for k in masks)
        official = {k: (v["shape"], v["dtype"]) for k, v in keys.items() if k not in OFFICIAL_MASK_BUFFERS}
        assert sorted(set(official) - set(ours)) == [], "keys missing from our model"
        assert sorted(set(ours) - set(official)) == [], "keys our model has but the official one has not"
        bad = {k: (ours[k], official[k]) for k in official if ours[k] != official[k]}
        assert bad == {}, f"{res}: shape/dtype mismatches {bad}"
        assert len(official) == golden[res]["num_keys"] - 4 == 297
        # The masks are buffers, so the parameter count is the official one unchanged.
        n_params = sum(p.numel() for p in model.parameters())
        assert n_params == golden[res]["num_parameters"] == 184_659_383

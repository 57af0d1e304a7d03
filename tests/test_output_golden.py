"""Parity of the output frames with the reference (golden README section 15, ``output/<case>``).

Every case folder under golden/output/ is one test id. The VAE is rebuilt from the case's ``vae_case`` folder
exactly as tests/test_vae_golden.py builds a VAE case (strict load). Checked:

* ``decoded`` through our decode, atol 1e-4;
* the float -> uint8 conversion on the stored ``decoded``: ours (``media.tensor_to_frames`` and the pipeline's
  output formatting) equals ``frames_u8_rgb_before_flip`` exactly (the reference truncates). We deliberately keep
  RGB and keep frame 0: reversing our channels gives ``frames_u8_bgr_no_frame0_copy``, and ``frames_u8`` is that
  with frame 1 copied over frame 0, which our frames are not;
* through our own decode, an element may differ by one level only where the decoded value lies within the decode
  error of a truncation boundary.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import GOLDEN_DIR, golden_cases
from infinitystar import media
from infinitystar.checkpoints import load_vae
from infinitystar.pipeline import InfinityStarPipeline
from test_vae_golden import VAE_ATOL, vae_config_from_case

CASES = golden_cases("output")
PREFIX = "output."
KNOWN = {"latent", "decoded", "frames_u8_rgb_before_flip", "frames_u8_bgr_no_frame0_copy", "frames_u8"}


@pytest.fixture(scope="module", params=CASES, ids=[p.name for p in CASES])
def golden_output(request):
    case_dir: Path = request.param
    cfg = json.loads((case_dir / "config.json").read_text())
    vae_dir = GOLDEN_DIR / cfg["vae_case"]
    model = load_vae(vae_dir / "weights.safetensors", vae_config_from_case(vae_dir))
    tensors = {k.removeprefix(PREFIX): v for k, v in load_file(str(case_dir / "case.safetensors")).items()}
    return case_dir, cfg["cases"]["output"], model, tensors


def test_cases_exist():
    assert CASES, "no golden output case found"


def test_case_holds_only_known_tensors(golden_output):
    case_dir, _, _, tensors = golden_output
    assert set(tensors) == KNOWN, f"{case_dir.name}: tensors {sorted(tensors)}"


def test_decode_matches_golden(golden_output):
    case_dir, cfg, model, tensors = golden_output
    assert list(tensors["latent"].shape) == cfg["latent_shape"]
    with torch.no_grad():
        decoded = model.decode(tensors["latent"])  # chunked over latent frames, as the reference's slice=True
    want = tensors["decoded"]
    assert decoded.shape == want.shape
    diff = float((decoded - want).abs().max())
    assert diff <= VAE_ATOL, f"{case_dir.name}: decoded max abs diff {diff:.2e} > {VAE_ATOL:.0e}"


def test_uint8_conversion_on_the_stored_decode_is_exact(golden_output):
    case_dir, cfg, _, tensors = golden_output
    decoded = tensors["decoded"]
    want_rgb = tensors["frames_u8_rgb_before_flip"][0].numpy()  # [T, H, W, 3]
    assert list(tensors["frames_u8_rgb_before_flip"].shape) == cfg["frames_shape"]
    ours = media.tensor_to_frames(decoded)
    assert ours.dtype == np.uint8 and ours.shape == want_rgb.shape
    assert int((ours != want_rgb).sum()) == 0, f"{case_dir.name}: {int((ours != want_rgb).sum())} values differ"
    # The pipeline's own output path: decode_latent clamps to [-1, 1] (no effect on the clamped conversion), then
    # _format makes the np / pil frames every caller (CLI, web page, export) writes.
    np.testing.assert_array_equal(InfinityStarPipeline._format(decoded.clamp(-1, 1), "np"), want_rgb)
    pil = InfinityStarPipeline._format(decoded.clamp(-1, 1), "pil")
    np.testing.assert_array_equal(np.stack([np.asarray(im) for im in pil]), want_rgb)
    # Rounding (kept as an option) differs from the reference exactly where the config counts.
    rounded = media.tensor_to_frames(decoded, rounding="round")
    assert int((rounded != want_rgb).sum()) == cfg["elements_where_truncation_differs_from_rounding"]
    assert int((rounded.astype(int) - want_rgb).min()) >= 0  # rounding only ever goes up by ...
    assert int((rounded.astype(int) - want_rgb).max()) <= 1  # ... one level


def test_our_rgb_frames_relate_to_the_reference_bgr_output(golden_output):
    """We write RGB and keep frame 0 on purpose (README); the reference's BGR frames are ours reversed, and its
    returned frames are those with frame 1 copied over frame 0."""
    case_dir, cfg, _, tensors = golden_output
    ours = media.tensor_to_frames(tensors["decoded"])
    bgr = tensors["frames_u8_bgr_no_frame0_copy"][0].numpy()
    returned = tensors["frames_u8"][0].numpy()
    np.testing.assert_array_equal(ours[..., ::-1], bgr)
    np.testing.assert_array_equal(returned[1:], bgr[1:])
    np.testing.assert_array_equal(returned[0], bgr[1])
    np.testing.assert_array_equal(ours[0], tensors["frames_u8_rgb_before_flip"][0, 0].numpy())
    if cfg["frame0_differs_from_decoded_frame0"]:
        assert not np.array_equal(ours[0], returned[0, ..., ::-1]), f"{case_dir.name}: frame 0 was overwritten"


def test_uint8_through_our_decode_differs_only_at_truncation_boundaries(golden_output):
    case_dir, _, model, tensors = golden_output
    with torch.no_grad():
        decoded = model.decode(tensors["latent"])
    err = float((decoded - tensors["decoded"]).abs().max())
    ours = media.tensor_to_frames(decoded).astype(int)
    want = tensors["frames_u8_rgb_before_flip"][0].numpy().astype(int)
    assert int(np.abs(ours - want).max()) <= 1
    # Level = clamp((x + 1) / 2, 0, 1) * 255, so a decode error e moves it by at most 127.5 e; a truncated level
    # can change only where the reference's value lies within that distance of an integer (float32 slack 1e-4).
    level = ((tensors["decoded"][0].permute(1, 2, 3, 0) + 1) / 2).clamp(0, 1).mul(255).double().numpy()
    near_boundary = np.abs(level - np.round(level)) <= 127.5 * err + 1e-4
    moved = ours != want
    assert not (moved & ~near_boundary).any(), f"{case_dir.name}: a level moved away from a truncation boundary"

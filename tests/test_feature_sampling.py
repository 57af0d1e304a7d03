"""Feature extraction's posterior sample (``latent_sampling = "sample"``, ``extract-features --sample``).

The reference caches ``mean + exp(logvar / 2) * eps`` (training.md 2.8). Here eps comes from a generator seeded per
clip by the base seed and the clip's key, so the features do not depend on which process or which run wrote them.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from infinitystar.config import get_preset, replace
from infinitystar.media import write_image
from infinitystar.train.config import DataConfig
from infinitystar.train.data import load_records
from infinitystar.train.features import FeatureIndex, encode_record, extract_features, load_record_pixels
from infinitystar.vae.model import VideoVAE

# tiny-test's 0.06M ladder cut to 3 scales: 48x48 pixel buckets, 3x3 latent grids
SMALL = replace(get_preset("pipeline", "tiny-test"), num_scales=3, image_repetition=(1,) * 3,
                video_repetition=(1,) * 3)


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models


@pytest.fixture(scope="module")
def vae() -> VideoVAE:
    torch.manual_seed(0)
    return VideoVAE(get_preset("vae", "tiny-test")).eval()


@pytest.fixture(scope="module")
def config(tmp_path_factory) -> DataConfig:
    """Four image records (one frame each: encoding takes milliseconds)."""
    d = tmp_path_factory.mktemp("sample-data")
    rng = np.random.default_rng(0)
    rows = []
    for i in range(4):
        write_image(rng.integers(0, 256, (48, 48, 3), dtype=np.uint8), d / f"img{i}.png")
        rows.append(json.dumps({"image_path": str(d / f"img{i}.png"), "text": f"Picture {i}."}))
    (d / "train.jsonl").write_text("\n".join(rows) + "\n", encoding="utf-8")
    return DataConfig(jsonl=(str(d / "train.jsonl"),), cache_dir=str(d / "cache"), latent_sampling="sample", seed=7)


def test_default_is_the_posterior_mean():
    assert DataConfig().latent_sampling == "mean"


@torch.no_grad()
def test_sample_is_reproducible_and_differs_between_seeds(config, vae):
    record = load_records(config, SMALL)[0][0]
    a, _ = encode_record(vae, record, config, SMALL)
    b, _ = encode_record(vae, record, config, SMALL)
    assert torch.equal(a, b)
    other, _ = encode_record(vae, record, replace(config, seed=8), SMALL)
    assert not torch.equal(a, other)
    mean, _ = encode_record(vae, record, replace(config, latent_sampling="mean"), SMALL)
    assert not torch.equal(a, mean)


@torch.no_grad()
def test_sample_minus_mean_is_std_times_standard_normal_noise(config, vae):
    """Undo the (affine, invertible) latent projection and check eps = (z - mean) / std is N(0, 1) per clip, and
    that two clips under one seed get different noise."""
    records = load_records(config, SMALL)[0]
    eps_per_clip = []
    for record in records[:2]:
        sample, _ = encode_record(vae, record, config, SMALL)
        pixels, _ = load_record_pixels(record, SMALL)
        mean, logvar = vae.encode_posterior(pixels[None])
        proj = vae.proj_down
        scale = vae.scale_learnable_parameters[0]
        # latent = (W z + b) * scale over channels -> z = W^-1 (latent / scale - b)
        lat_CN = sample.flatten(1) / scale - proj.bias[:, None]
        z = torch.linalg.solve(proj.weight.double(), lat_CN.double()).float().view_as(mean[0])
        eps = (z - mean[0]) / torch.exp(0.5 * logvar[0])
        eps_per_clip.append(eps.flatten())
    for eps in eps_per_clip:
        n = eps.numel()
        # n standard normals: the sample mean has standard error 1/sqrt(n), the sample std about 1/sqrt(2n).
        assert abs(float(eps.mean())) < 5 / n ** 0.5, float(eps.mean())
        assert abs(float(eps.std()) - 1) < 5 / (2 * n) ** 0.5, float(eps.std())
    # Independent noise of two clips: correlation ~ N(0, 1/n).
    corr = float(torch.corrcoef(torch.stack(eps_per_clip))[0, 1])
    assert abs(corr) < 5 / eps_per_clip[0].numel() ** 0.5, corr


def _latents(cache_dir: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    index = FeatureIndex.scan(cache_dir)
    assert len(index) > 0
    return {p.name: load_file(str(p))["latent"] for p in Path(cache_dir).rglob("*.safetensors")}


def test_parallel_and_resumed_extraction_give_the_same_samples(config, vae, tmp_path):
    one = replace(config, cache_dir=str(tmp_path / "one"))
    assert extract_features(one, SMALL, vae, progress=False).written == 4
    two = replace(config, cache_dir=str(tmp_path / "two"))
    for rank in (1, 0):  # two processes' shares, in either order
        extract_features(two, SMALL, vae, rank=rank, world_size=2, progress=False)
    resumed = replace(config, cache_dir=str(tmp_path / "resumed"))
    extract_features(resumed, SMALL, vae, rank=1, world_size=2, progress=False)  # an interrupted run ...
    assert extract_features(resumed, SMALL, vae, progress=False).skipped == 2  # ... finished by a full one
    ref = _latents(one.cache_dir)
    assert len(ref) == 4 and all(n.endswith("-s7.safetensors") for n in ref)  # the seed names the extraction
    for other in (two, resumed):
        got = _latents(other.cache_dir)
        assert got.keys() == ref.keys()
        for name, t in ref.items():
            assert torch.equal(got[name], t), name

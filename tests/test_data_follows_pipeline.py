"""The training data is cut as the pipeline generates (issue 13): its fps, pyramid, clip length and VAE stride come
from the pipeline config alone, and an older config that still names one of them in ``[data]`` fails in one line."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from infinitystar.checkpoints import save_vae
from infinitystar.cli import main as cli_main
from infinitystar.config import ConfigError, get_preset, replace
from infinitystar.media import write_image
from infinitystar.pipeline import InfinityStarPipeline, read_pipeline_config
from infinitystar.train.config import DataConfig, TrainConfig, config_from_dict
from infinitystar.train.data import bucket_for_size, load_records, sample_schedule
from infinitystar.vae.model import VideoVAE

MOVED = ("pn", "num_scales", "frames_inner_clip", "time_stride", "fps")
TINY = get_preset("pipeline", "tiny-test")  # 0.06M, 6 scales, 20-frame clips, 16 fps
DEMO = get_preset("pipeline", "demo")  # 0.06M, 4 scales, 8-frame clips, 16 fps


@pytest.mark.parametrize("key", MOVED)
def test_old_data_fields_fail_in_one_line_naming_the_pipeline(key):
    with pytest.raises(ConfigError) as err:
        config_from_dict(TrainConfig, {"data": {key: 1}})
    message = str(err.value)
    assert message.startswith(f"data.{key} is no longer a DataConfig setting: ") and "\n" not in message
    assert "comes from the pipeline (model.pipeline; extract-features --pipeline)" in message


def test_extract_features_rejects_an_old_data_file(tmp_path, capsys):
    old = tmp_path / "data.toml"
    old.write_text('jsonl = ["x.jsonl"]\npn = "0.06M"\n', encoding="utf-8")
    # Fails on the config, before any VAE is read (the --vae path does not exist).
    assert cli_main(["extract-features", "--config", str(old), "--vae", str(tmp_path / "none.pth"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "pn is no longer a DataConfig setting" in err and "--pipeline" in err


def test_pipeline_config_is_read_from_a_preset_or_a_folder_without_weights(tmp_path):
    assert read_pipeline_config("demo") is DEMO
    folder = tmp_path / "tiny"
    InfinityStarPipeline.from_preset("tiny-test", seed=0).save_pretrained(folder)
    for weights in folder.rglob("*.safetensors"):
        weights.unlink()  # only model_index.json may be read
    assert read_pipeline_config(folder) == TINY
    with pytest.raises(ConfigError, match="no-such"):
        read_pipeline_config("no-such")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="neither a pipeline folder"):
        read_pipeline_config(tmp_path / "empty")


def test_records_are_sampled_at_the_pipeline_fps(tmp_path):
    jsonl = tmp_path / "d.jsonl"
    row = {"video_path": "v.mp4", "begin_frame_id": 0, "end_frame_id": 60, "fps": 24, "tarsier2_caption": "A."}
    jsonl.write_text(json.dumps(row) + "\n", encoding="utf-8")
    data = DataConfig(jsonl=(str(jsonl),))
    # 60 frames at 24 fps = 2.5 s -> 2 whole seconds: fps * 2 + 1 frames.
    assert load_records(data, TINY)[0][0].num_frames == 33
    assert load_records(data, replace(TINY, fps=8))[0][0].num_frames == 17
    # 10 fps with the 4x temporal VAE: 2 s = 20 frames is not a whole number of latent frames.
    with pytest.raises(ConfigError, match=r"fps \(10\) must be a multiple of the VAE time stride \(4\)"):
        load_records(data, replace(TINY, fps=10))


def test_buckets_and_schedules_follow_the_pipeline_pyramid_and_clip_length():
    # The 1:1 ladder of 0.06M starts 1x1, 2x2, 3x3, 4x4, ...: the last grid of the first k scales is k x k latents,
    # 16 k pixels.
    assert (bucket_for_size(40, 40, DEMO).height, bucket_for_size(40, 40, TINY).height) == (64, 96)
    # 17 latent frames (4 s): the first frame, then clips of frames_inner_clip latents, each a full pyramid.
    demo = sample_schedule(bucket_for_size(40, 40, DEMO), 17, DEMO)
    assert [t for t, _, _ in demo] == [1] * 4 + [8] * 4 + [8] * 4  # two 8-frame clips of 4 scales
    tiny = sample_schedule(bucket_for_size(40, 40, TINY), 17, TINY)
    assert [t for t, _, _ in tiny] == [1] * 6 + [16] * 6  # one (partial) 20-frame clip of 6 scales


def test_cli_extraction_buckets_by_the_given_pipeline(tmp_path, capsys):
    torch.manual_seed(0)
    vae_file = tmp_path / "vae.safetensors"
    save_vae(VideoVAE(get_preset("vae", "tiny-test")).eval(), vae_file)
    write_image(np.random.default_rng(0).integers(0, 256, (40, 40, 3), dtype=np.uint8), tmp_path / "square.png")
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text(json.dumps({"image_path": "square.png", "text": "A square."}) + "\n", encoding="utf-8")
    for pipeline, size in (("demo", 64), ("tiny-test", 96)):
        cache = tmp_path / f"cache-{pipeline}"
        args = ["extract-features", str(jsonl), "--cache-dir", str(cache), "--vae", str(vae_file), "--pipeline",
                pipeline, "--quiet"]
        assert cli_main(args) == 0, capsys.readouterr().err
        names = [p.name for p in Path(cache).rglob("*.safetensors")]
        assert len(names) == 1 and f"_{size}x{size}_" in names[0], names

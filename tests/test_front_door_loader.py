"""The one loader of both front doors (``infinitystar.demo.load_pipeline``): which weights it picks, and that the
command line and the web page use that same function."""

from __future__ import annotations

import pytest

import infinitystar.demo as demo
from infinitystar import cli, web


def test_both_front_doors_call_the_one_loader():
    assert cli.load_pipeline is demo.load_pipeline
    assert web.load_pipeline is demo.load_pipeline


@pytest.fixture
def no_demo_weights(tmp_path, monkeypatch):
    """A package without shipped weights (a source checkout before ``train-demo --ship``)."""
    monkeypatch.setattr(demo, "DEMO_WEIGHTS", tmp_path / "weights")


def test_without_demo_weights_the_default_is_random_tiny_test(no_demo_weights, capsys):
    assert not demo.demo_weights_shipped()
    assert demo.random_weights(None, None)
    assert "Random weights" in web.weights_note(None, None)
    pipe = demo.load_pipeline(None, None)
    assert pipe.config.name == "tiny-test"
    assert "RANDOM weights" in capsys.readouterr().err


def test_a_preset_without_a_model_is_random_and_a_model_folder_is_not(no_demo_weights, monkeypatch, tmp_path):
    assert demo.random_weights(None, "tiny-test")
    assert not demo.random_weights(str(tmp_path), None)
    assert not demo.random_weights(str(tmp_path), "official-480p")
    # Once the package holds weights, no arguments means the demo model: not random.
    (tmp_path / "weights").mkdir()
    (tmp_path / "weights" / "model_index.json").write_text("{}")
    assert demo.demo_weights_shipped()
    assert not demo.random_weights(None, None)
    assert web.weights_note(None, None) == ""
    assert demo.random_weights(None, "tiny-test")  # an explicit preset still asks for random weights


def test_a_missing_model_folder_is_one_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="does-not-exist"):
        demo.load_pipeline(str(tmp_path / "does-not-exist"), None)

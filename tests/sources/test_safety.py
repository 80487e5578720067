"""Safetensors by default; pickle checkpoints only with --allow-pickle."""

from __future__ import annotations

import shutil

import pytest

from openrerank.engine.loading import LoadOptions, load_model
from openrerank.sources.safety import UnsafeWeightsError, check_weights
from tests.support import build_tiny_model


@pytest.fixture(scope="module")
def pickle_model_dir(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("pickle-ce"), safe=False)


def test_pickle_only_refused_with_flag_named(pickle_model_dir):
    assert not list(pickle_model_dir.glob("*.safetensors"))
    with pytest.raises(UnsafeWeightsError, match="--allow-pickle"):
        check_weights(pickle_model_dir, allow_pickle=False)
    with pytest.raises(UnsafeWeightsError, match="--allow-pickle"):
        load_model(str(pickle_model_dir))


def test_pickle_allowed_when_asked(pickle_model_dir, tiny_model_dir):
    model = load_model(str(pickle_model_dir), LoadOptions(backend="torch", allow_pickle=True))
    assert model.weights_format == "pickle"
    assert model.score("paris", ["paris is the capital", "banana"]).shape == (2,)


def test_safetensors_preferred_and_no_weights(tmp_path, tiny_model_dir):
    assert check_weights(tiny_model_dir, allow_pickle=False) == "safetensors"
    empty = tmp_path / "empty"
    shutil.copytree(tiny_model_dir, empty)
    for f in empty.glob("*.safetensors"):
        f.unlink()
    with pytest.raises(UnsafeWeightsError, match="no model weights"):
        check_weights(empty, allow_pickle=True)

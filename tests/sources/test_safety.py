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


def test_a_stray_safetensors_beside_a_pickle_is_not_the_model(tmp_path, pickle_model_dir):
    """training_args.safetensors is not what from_pretrained loads: the folder still has only pickle weights, is
    refused without --allow-pickle and reports "pickle" with it (transformers loads pytorch_model.bin)."""
    from safetensors.torch import save_file

    from openrerank.sources.safety import weights_kwargs

    stray = tmp_path / "stray"
    shutil.copytree(pickle_model_dir, stray)
    import torch

    save_file({"x": torch.zeros(1)}, str(stray / "training_args.safetensors"))
    with pytest.raises(UnsafeWeightsError, match=r"only pickle weights \(pytorch_model.bin\)"):
        check_weights(stray, allow_pickle=False)
    assert check_weights(stray, allow_pickle=True) == "pickle"
    assert weights_kwargs(stray) == {}  # pickle allowed: transformers may read it


def test_sharded_safetensors_count_only_with_every_shard(tmp_path, tiny_model_dir):
    """An index and its shards is what from_pretrained loads; then use_safetensors=True keeps it off a pickle."""
    import json

    from openrerank.sources.safety import weights_kwargs

    sharded = tmp_path / "sharded"
    shutil.copytree(tiny_model_dir, sharded)
    (sharded / "model.safetensors").rename(sharded / "model-00001-of-00001.safetensors")
    index = {"metadata": {}, "weight_map": {"a": "model-00001-of-00001.safetensors"}}
    (sharded / "model.safetensors.index.json").write_text(json.dumps(index))
    assert check_weights(sharded, allow_pickle=False) == "safetensors"
    assert weights_kwargs(sharded) == {"use_safetensors": True}
    (sharded / "model-00001-of-00001.safetensors").unlink()
    with pytest.raises(UnsafeWeightsError, match="no model weights"):
        check_weights(sharded, allow_pickle=False)


def test_a_link_to_a_missing_blob_is_named(tmp_path, tiny_model_dir):
    """A hub-cache snapshot whose model.safetensors points at a blob that never arrived: the refusal names the
    link, not "no file named model.safetensors" beside a file `ls` shows."""
    snapshot = tmp_path / "snapshot"
    shutil.copytree(tiny_model_dir, snapshot)
    (snapshot / "model.safetensors").unlink()
    (snapshot / "model.safetensors").symlink_to(tmp_path / "blobs" / "abc123")
    with pytest.raises(UnsafeWeightsError, match=r"model.safetensors is a link to a missing file.*incomplete"):
        check_weights(snapshot, allow_pickle=False)


def test_an_onnx_folder_not_written_by_export_says_what_to_do(tmp_path, tiny_model_dir):
    """optimum's layout (model.onnx, config, tokenizer, no export.json) is not "no model weights": say what it
    is and how to serve it."""
    optimum = tmp_path / "optimum"
    shutil.copytree(tiny_model_dir, optimum)
    (optimum / "model.safetensors").unlink()
    (optimum / "model.onnx").write_bytes(b"onnx")
    with pytest.raises(UnsafeWeightsError, match=r"ONNX model not written by `openrerank export`.*openrerank export"):
        check_weights(optimum, allow_pickle=True)

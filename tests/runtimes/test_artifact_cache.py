"""The converted-model cache: a model's content fingerprint (hashed once per start, again after an edit), damaged
entries built again, timing records that cannot be read."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest

from openrerank.runtimes import artifact_cache
from openrerank.runtimes.artifact_cache import ensure_record, model_fingerprint
from openrerank.runtimes.base import probe_features
from tests.support import build_tiny_bi_encoder, cross_encoder_network


def test_a_fingerprint_reads_the_weights_once_and_again_after_they_change(tmp_path: Path, tiny_model_dir,
                                                                           monkeypatch) -> None:
    """One start asks for it several times (runtime timing, conversions, served speed): 7 reads of every weight
    byte for the default model from an empty cache before it was remembered."""
    model = tmp_path / "m"
    shutil.copytree(tiny_model_dir, model)
    reads: list[str] = []
    real = artifact_cache.file_sha256
    monkeypatch.setattr(artifact_cache, "file_sha256", lambda p: reads.append(Path(p).name) or real(p))
    first = model_fingerprint(model)
    assert sorted(reads) == ["config.json", "model.safetensors"]
    assert model_fingerprint(model) == model_fingerprint(Path(str(model))) == first
    assert len(reads) == 2  # remembered: nothing read again

    weights = model / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # the same size, another content
    weights.write_bytes(bytes(data))
    changed = model_fingerprint(model)
    assert changed != first and reads[2:] == ["config.json", "model.safetensors"]

    (model / "config.json").write_text((model / "config.json").read_text() + " ")
    assert model_fingerprint(model) not in (first, changed)


def test_the_weights_of_sentence_transformers_modules_are_part_of_the_fingerprint(tmp_path: Path) -> None:
    """A bi-encoder's Dense layer (`2_Dense/model.safetensors`) is part of its exported graph: a changed one
    must not be served from the export of the old one."""
    pytest.importorskip("sentence_transformers")
    path = build_tiny_bi_encoder(tmp_path / "model", dense=({"out_features": 8},))
    first = model_fingerprint(path)
    weights = path / "2_Dense" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0x01  # the same size, another content
    weights.write_bytes(bytes(data))
    assert model_fingerprint(path) != first


def _truncate(folder: Path, name: str) -> None:
    with (folder / name).open("r+b") as f:
        f.truncate(1000)


def _same_size_garbage(folder: Path, name: str) -> None:
    """Damage the size check cannot see: the runtime fails to open it (`open_cached`)."""
    path = folder / name
    path.write_bytes(b"\xff" * path.stat().st_size)


def _runtime(kind: str, model: Path, cache: Path):
    if kind == "onnx":
        from openrerank.runtimes.onnx_runtime import OnnxRuntime

        return OnnxRuntime(cross_encoder_network(model), threads=1, cache_dir=cache)
    from openrerank.runtimes.openvino_runtime import OpenVinoRuntime

    return OpenVinoRuntime(cross_encoder_network(model), threads=1, cache_dir=cache, compiled_cache=False)


def _artifact(runtime):
    return runtime.export if hasattr(runtime, "export") else runtime.conversion


@pytest.mark.parametrize(("kind", "damage"), [
    ("onnx", lambda f: _truncate(f, "model.onnx")),
    ("onnx", lambda f: (f / "model.onnx").unlink()),
    ("onnx", lambda f: (f / "export.json").write_text('{"key": ')),
    ("onnx", lambda f: _same_size_garbage(f, "model.onnx")),
    ("openvino", lambda f: (f / "model.bin").unlink()),
    ("openvino", lambda f: _truncate(f, "model.xml")),
], ids=["onnx-truncated", "onnx-deleted", "onnx-garbage-meta", "onnx-same-size-garbage", "openvino-bin-deleted",
        "openvino-xml-truncated"])
def test_a_damaged_entry_is_built_again_and_scores_as_the_fresh_build(tmp_path, model_copy, kind, damage,
                                                                       caplog) -> None:
    """Each start failed on a damaged entry (or, under `auto`, served another engine) and nothing rebuilt it."""
    cache = tmp_path / "cache"
    fresh = _runtime(kind, model_copy, cache)
    vocab = json.loads((model_copy / "config.json").read_text())["vocab_size"]
    features = probe_features(fresh.input_names, vocab)
    expected = fresh.run(features)
    damage(_artifact(fresh).path.parent)
    with caplog.at_level(logging.WARNING):
        again = _runtime(kind, model_copy, cache)
    assert not _artifact(again).cached and _artifact(again).path == _artifact(fresh).path
    np.testing.assert_array_equal(again.run(features), expected)
    assert any(r.levelname == "WARNING" and "building it again" in r.getMessage() for r in caplog.records)
    assert _artifact(_runtime(kind, model_copy, cache)).cached  # and it stays


@pytest.mark.parametrize("body", [b'{"format": 4, "measu', b"\xff\xfe not text"])
def test_a_timing_record_that_is_not_json_is_computed_again_with_a_warning(tmp_path, body, caplog) -> None:
    """docs/engine.md: such a record "is timed again like a missing one, and a warning names the file"."""
    path = tmp_path / "k.json"
    path.write_bytes(body)
    record, cached = ensure_record(tmp_path, "k", lambda: {"rate": 1.0}, "runtime timing")
    assert (record, cached) == ({"rate": 1.0}, False) and json.loads(path.read_text()) == record
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and str(path) in warnings[0] and "not JSON" in warnings[0]

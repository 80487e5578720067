"""Family detection from model files alone: encoder families and unservable directories."""

from __future__ import annotations

import json

import pytest

from openrerank.families.base import ModelFiles, ModelFormatError, ModelSpec
from openrerank.families.registry import resolve_spec
from openrerank.models.source import default_model_dir


def detect_spec(path) -> ModelSpec:
    return resolve_spec(ModelFiles.read(path))[1]


def test_cross_encoder_one_and_two_labels(tiny_model_dir, tiny_model_2label_dir):
    one = detect_spec(tiny_model_dir)
    two = detect_spec(tiny_model_2label_dir)
    assert one.family == two.family == "cross-encoder"
    assert (one.options["num_labels"], two.options["num_labels"]) == (1, 2)
    assert one.architecture == "BertForSequenceClassification"
    assert one.max_length == 128


def test_default_is_mean_pooled_bi_encoder():
    spec = detect_spec(default_model_dir())
    assert spec.family == "bi-encoder"
    assert spec.options["pooling"] == "mean"
    assert spec.max_length == 256  # sentence_bert_config max_seq_length, below the 512 positions


def _write(path, name, obj):
    (path / name).write_text(json.dumps(obj))


def test_roberta_positions_offset(tmp_path):
    _write(tmp_path, "config.json", {"model_type": "xlm-roberta", "num_labels": 1,
                                     "architectures": ["XLMRobertaForSequenceClassification"],
                                     "max_position_embeddings": 514})
    assert detect_spec(tmp_path).max_length == 512


@pytest.mark.parametrize(
    ("files", "fragment"),
    [
        ({}, "no config.json"),
        ({"config.json": {"model_type": "bert", "architectures": ["BertForMaskedLM"]}}, "neither"),
        ({"config.json": {"model_type": "bert", "architectures": ["BertForSequenceClassification"],
                          "num_labels": 3}}, "3 labels"),
        ({"config.json": {"model_type": "bert"}, "modules.json": [{"type": "x.Transformer", "path": ""}]},
         "no Pooling"),
    ],
)
def test_unservable_directories(tmp_path, files, fragment):
    for name, obj in files.items():
        _write(tmp_path, name, obj)
    with pytest.raises(ModelFormatError, match=fragment):
        detect_spec(tmp_path)


def test_bad_json_is_a_clear_error(tmp_path):
    (tmp_path / "config.json").write_text("{nope")
    with pytest.raises(ModelFormatError, match="not valid JSON"):
        detect_spec(tmp_path)

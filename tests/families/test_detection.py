"""Family detection from model files alone: encoder families and unservable directories."""

from __future__ import annotations

import json
import re

import pytest

from openrerank.families.base import ModelFiles, ModelFormatError, ModelSpec
from openrerank.families.registry import resolve_spec
from openrerank.sources.source import default_model_dir


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


# --- LLM rerankers: detected only where the files say which reranker it is -------------------------------

def _causal(path, arch: str, model_type: str, *, card: str | None = None):
    path.mkdir(parents=True, exist_ok=True)
    _write(path, "config.json", {"architectures": [arch], "model_type": model_type, "max_position_embeddings": 40960})
    _write(path, "tokenizer_config.json", {"model_max_length": 131072})
    if card is not None:
        (path / "README.md").write_text(card)
    return path


@pytest.mark.parametrize(
    ("dirname", "arch", "model_type", "family"),
    [
        ("Qwen3-Reranker-0.6B", "Qwen3ForCausalLM", "qwen3", "qwen3-reranker"),
        ("mxbai-rerank-base-v2", "Qwen2ForCausalLM", "qwen2", "mxbai-rerank-v2"),
        ("mxbai-rerank-large-v2", "Qwen2ForCausalLM", "qwen2", "mxbai-rerank-v2"),
        ("bge-reranker-v2-gemma", "GemmaForCausalLM", "gemma", "bge-reranker-gemma"),
    ],
)
def test_llm_rerankers_are_detected_by_their_published_name(tmp_path, dirname, arch, model_type, family):
    spec = detect_spec(_causal(tmp_path / dirname, arch, model_type))
    assert spec.family == family and spec.architecture == arch
    assert spec.max_length == 40960  # the smaller of the position table and the tokenizer's model_max_length


def test_hub_snapshot_paths_carry_the_name(tmp_path):
    """A hub download lives in models--ORG--NAME/snapshots/HASH; the served id may be anything."""
    snap = _causal(tmp_path / "models--Qwen--Qwen3-Reranker-4B" / "snapshots" / "0123abc", "Qwen3ForCausalLM",
                   "qwen3")
    family, _ = resolve_spec(ModelFiles.read(snap, name="my-reranker"))
    assert family.id == "qwen3-reranker"


def test_a_reranker_card_names_the_family(tmp_path):
    card = "---\nbase_model: google/gemma-2b\npipeline_tag: text-ranking\n---\n# fine-tuned\n"
    assert detect_spec(_causal(tmp_path / "my-gemma", "GemmaForCausalLM", "gemma", card=card)).family == \
        "bge-reranker-gemma"
    tags = "---\ntags:\n- sentence-transformers\n- reranker\n---\n"
    assert detect_spec(_causal(tmp_path / "my-qwen", "Qwen3ForCausalLM", "qwen3", card=tags)).family == \
        "qwen3-reranker"


@pytest.mark.parametrize(
    ("dirname", "arch", "model_type", "card"),
    [
        ("Qwen3-0.6B", "Qwen3ForCausalLM", "qwen3", None),  # a chat model
        ("my-llm", "Qwen3ForCausalLM", "qwen3", "---\npipeline_tag: text-generation\n---\n"),
        ("Qwen3-Reranker-0.6B", "Qwen2ForCausalLM", "qwen2", None),  # name and architecture disagree
        ("mxbai-rerank-base-v2", "LlamaForCausalLM", "llama", None),
        ("broken-card", "GemmaForCausalLM", "gemma", "---\n: [unclosed\n---\n"),
    ],
)
def test_a_causal_lm_is_never_guessed_into_a_reranker(tmp_path, dirname, arch, model_type, card):
    path = _causal(tmp_path / dirname, arch, model_type, card=card)
    with pytest.raises(ModelFormatError) as err:
        detect_spec(path)
    message = str(err.value)
    assert f"{arch} is a causal language model" in message and "--model-family NAME=FAMILY" in message
    assert "qwen3-reranker, mxbai-rerank-v2, bge-reranker-gemma" in message


def test_model_family_names_what_detection_cannot(tmp_path):
    path = _causal(tmp_path / "plain", "Qwen2ForCausalLM", "qwen2")
    family, spec = resolve_spec(ModelFiles.read(path), "mxbai-rerank-v2")
    assert family.id == spec.family == "mxbai-rerank-v2" and spec.options["instruction"] is None
    with pytest.raises(ModelFormatError, match="unknown model family 'qwen3'; families: nemotron-vl, "
                                               "jina-reranker-v3, "
                                               "llama-bidirectional, qwen3-reranker"):
        resolve_spec(ModelFiles.read(path), "qwen3")


def test_a_named_family_must_fit_the_files(tmp_path, tiny_model_dir):
    with pytest.raises(ModelFormatError, match="needs a causal LM checkpoint"):
        resolve_spec(ModelFiles.read(tiny_model_dir), "qwen3-reranker")
    with pytest.raises(ModelFormatError, match="LlamaBidirectionalForSequenceClassification"):
        resolve_spec(ModelFiles.read(tiny_model_dir), "llama-bidirectional")


@pytest.mark.parametrize(
    ("family", "instruction", "fragment"),
    [
        ("bge-reranker-gemma", "Find it", "the bge-reranker-gemma family has no prompt instruction"),
        ("qwen3-reranker", "   ", "the instruction is empty"),
        ("qwen3-reranker", "Rank {passage} for {query}", "may not contain {query} or {passage}"),
    ],
)
def test_bad_instructions_are_refused(tmp_path, family, instruction, fragment):
    arch = {"bge-reranker-gemma": "GemmaForCausalLM", "qwen3-reranker": "Qwen3ForCausalLM"}[family]
    path = _causal(tmp_path / "m", arch, "x")
    with pytest.raises(ModelFormatError, match=re.escape(fragment)) as err:
        resolve_spec(ModelFiles.read(path), family, instruction)
    assert "families that take one: jina-reranker-v3, qwen3-reranker, mxbai-rerank-v2" in str(err.value)


def test_an_instruction_for_an_encoder_is_refused_not_ignored(tiny_model_dir):
    with pytest.raises(ModelFormatError, match="the cross-encoder family has no prompt instruction"):
        resolve_spec(ModelFiles.read(tiny_model_dir), None, "Given a query")


def test_instruction_and_its_default_are_recorded(tmp_path):
    path = _causal(tmp_path / "Qwen3-Reranker-8B", "Qwen3ForCausalLM", "qwen3")
    default = resolve_spec(ModelFiles.read(path))[1].options["instruction"]
    assert default == "Given a web search query, retrieve relevant passages that answer the query"
    assert resolve_spec(ModelFiles.read(path), None, "Find code")[1].as_metadata()["instruction"] == "Find code"


def test_llama_bidirectional_config(tmp_path):
    config = {"architectures": ["LlamaBidirectionalForSequenceClassification"], "model_type": "llama_bidirec",
              "pooling": "avg", "temperature": 0.25, "max_position_embeddings": 131072}
    _write(tmp_path, "config.json", config)
    _write(tmp_path, "tokenizer_config.json", {"model_max_length": 8192})
    spec = detect_spec(tmp_path)
    assert spec.family == "llama-bidirectional" and spec.max_length == 8192
    assert {k: v for k, v in spec.as_metadata().items() if k in ("pooling", "temperature", "base")} == \
        {"pooling": "avg", "temperature": 0.25, "base": "llama"}
    _write(tmp_path, "config.json", {**config, "pooling": "max"})
    with pytest.raises(ModelFormatError, match="pooling 'max'"):
        detect_spec(tmp_path)


def test_decoders_refuse_the_onnx_engine(tmp_path):
    from openrerank.engine.loading import LoadOptions, resolve_model

    path = _causal(tmp_path / "Qwen3-Reranker-0.6B", "Qwen3ForCausalLM", "qwen3")
    (path / "model.safetensors").write_bytes(b"")
    (path / "vocab.json").write_text("{}")  # a tokenizer's file: resolve_model refuses a folder without one
    with pytest.raises(ValueError, match="qwen3-reranker runs on the torch runtime, not onnx"):
        resolve_model(str(path), LoadOptions(backend="onnx"))
    assert resolve_model(str(path), LoadOptions(backend="auto")).runtime == "torch"


def test_a_converted_seq_cls_decoder_is_explained(tmp_path):
    _write(tmp_path, "config.json", {"architectures": ["Qwen3ForSequenceClassification"], "model_type": "qwen3",
                                     "num_labels": 1})
    with pytest.raises(ModelFormatError, match="Qwen3ForSequenceClassification is a qwen3 decoder with a "
                                               "classification head") as err:
        detect_spec(tmp_path)
    assert "original causal-LM checkpoints" in str(err.value)

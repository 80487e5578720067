"""What sentence_bert_config.json says about a model's text, read as sentence-transformers reads it: only for
a folder it loads through modules.json, `do_lower_case` lowercases every text (its prompt included) and
`max_seq_length` replaces the tokenizer's model_max_length (never past the position table). Checked against
`SentenceTransformer.encode` and `CrossEncoder.predict` on tiny models with a cased tokenizer."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from openrerank.core.requests import Truncate
from openrerank.engine.loading import LoadOptions, load_model
from openrerank.families.base import ModelFiles
from openrerank.families.registry import resolve_spec
from tests.support import build_tiny_bi_encoder, build_tiny_model

TOL = 1e-4
PROMPTS = {"query": "Query: ", "passage": "Passage: "}
QUERY = "What is the Capital of FRANCE"
PASSAGES = ["PARIS is the Capital of France and its largest City. " * 3, "Bananas are Yellow", "WHO",
            "The River flows to the Sea. " * 12]


@pytest.fixture(scope="module")
def st():
    return pytest.importorskip("sentence_transformers")


def edit_json(path, **changes) -> None:
    data = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    data.update(changes)
    path.write_text(json.dumps(data), encoding="utf-8")


def make_cased(path) -> None:
    """The tiny models' WordPiece tokenizer without its own lowercasing: an upper-case letter is [UNK]."""
    edit_json(path / "tokenizer_config.json", do_lower_case=False)
    tokenizer = json.loads((path / "tokenizer.json").read_text(encoding="utf-8"))
    tokenizer["normalizer"]["lowercase"] = False
    (path / "tokenizer.json").write_text(json.dumps(tokenizer), encoding="utf-8")


@pytest.fixture(scope="module")
def lower_bi(tmp_path_factory):
    path = build_tiny_bi_encoder(tmp_path_factory.mktemp("lower") / "model", prompts=PROMPTS, seed=7,
                                 max_position_embeddings=128)
    make_cased(path)
    edit_json(path / "sentence_bert_config.json", do_lower_case=True)
    return path


def test_do_lower_case_embeds_and_reranks_as_sentence_transformers(lower_bi, st):
    model = st.SentenceTransformer(str(lower_bi), device="cpu")
    loaded = load_model(str(lower_bi), LoadOptions(backend="torch", dtype="fp32"))
    try:
        texts = [QUERY, *PASSAGES]
        np.testing.assert_allclose(loaded.embed(texts, normalize=False), model.encode(texts), atol=TOL, rtol=0)
        for input_type, name in (("query", "query"), ("passage", "passage")):  # the prompt is lowercased too
            np.testing.assert_allclose(loaded.embed(texts, input_type=input_type, normalize=False),
                                       model.encode(texts, prompt_name=name), atol=TOL, rtol=0)
        q = model.encode([QUERY], prompt_name="query")[0]
        p = model.encode(PASSAGES, prompt_name="passage")
        cosine = p @ q / np.linalg.norm(p, axis=1) / np.linalg.norm(q)
        np.testing.assert_allclose(loaded.score(QUERY, PASSAGES), cosine, atol=TOL, rtol=0)
        assert loaded.spec.options["lowercase"] is True  # shown in /v1/metadata
    finally:
        loaded.close()


def test_do_lower_case_gives_the_lowercased_texts_results_under_every_truncation(lower_bi):
    """Lowercasing happens inside the tokenizer, so cutting, START's prompt-keeping cut and CHUNK's sentence
    windows (all made on the text as sent, by its offsets) give what the lowercased text gives."""
    loaded = load_model(str(lower_bi), LoadOptions(backend="torch", dtype="fp32", max_length=24))
    lower = [p.lower() for p in PASSAGES]
    try:
        for truncate in (Truncate.END, Truncate.START, Truncate.CHUNK):
            np.testing.assert_allclose(loaded.score(QUERY, PASSAGES, truncate),
                                       loaded.score(QUERY.lower(), lower, truncate), atol=1e-6, rtol=0)
        for truncate in (Truncate.END, Truncate.START):
            np.testing.assert_allclose(loaded.embed(PASSAGES, input_type="query", truncate=truncate),
                                       loaded.embed(lower, input_type="query", truncate=truncate), atol=1e-6, rtol=0)
    finally:
        loaded.close()


@pytest.fixture(scope="module")
def cased_cross_encoders(tmp_path_factory, st):
    """A cased cross-encoder with do_lower_case true in sentence_bert_config.json: as a plain checkpoint (which
    `CrossEncoder` reads without that file) and as sentence-transformers >= 6 saves it (modules.json)."""
    root = tmp_path_factory.mktemp("ce")
    plain = build_tiny_model(root / "plain", seed=2)
    make_cased(plain)
    edit_json(plain / "sentence_bert_config.json", do_lower_case=True)
    st.CrossEncoder(str(plain), device="cpu").save(str(root / "saved"))
    edit_json(root / "saved" / "sentence_bert_config.json", do_lower_case=True)
    return plain, root / "saved"


def test_a_cross_encoder_lowercases_only_where_sentence_transformers_reads_do_lower_case(cased_cross_encoders, st):
    import torch

    for path, lowercase in zip(cased_cross_encoders, (False, True), strict=True):
        model = st.CrossEncoder(str(path), device="cpu", activation_fn=torch.nn.Identity())
        loaded = load_model(str(path), LoadOptions(backend="torch", dtype="fp32"))
        try:
            assert loaded.family.id == "cross-encoder"
            ref = model.predict([(QUERY, p) for p in PASSAGES])
            # a tiny random head: its logits differ by ~1e-5 between texts, so the check is that close
            np.testing.assert_allclose(loaded.score(QUERY, PASSAGES), ref, atol=1e-6, rtol=0)
            assert loaded.spec.options.get("lowercase", False) is lowercase
        finally:
            loaded.close()


# -- max_seq_length: sentence-transformers lets it replace the tokenizer's model_max_length ------------------

def window_of(path) -> int:
    return resolve_spec(ModelFiles.read(path))[1].max_length


@pytest.fixture(scope="module")
def long_seq_bi(tmp_path_factory):
    """max_seq_length 48 over a tokenizer's model_max_length of 16, 64 positions."""
    path = build_tiny_bi_encoder(tmp_path_factory.mktemp("seqlen") / "model", seed=8)
    edit_json(path / "sentence_bert_config.json", max_seq_length=48)
    edit_json(path / "tokenizer_config.json", model_max_length=16)
    return path


def test_max_seq_length_wins_over_the_tokenizer_as_in_sentence_transformers(long_seq_bi, st):
    model = st.SentenceTransformer(str(long_seq_bi), device="cpu")
    assert window_of(long_seq_bi) == model.max_seq_length == 48
    loaded = load_model(str(long_seq_bi), LoadOptions(backend="torch", dtype="fp32"))
    try:
        np.testing.assert_allclose(loaded.embed(PASSAGES, normalize=False), model.encode(PASSAGES), atol=TOL, rtol=0)
    finally:
        loaded.close()


def test_max_seq_length_is_held_to_the_position_table(long_seq_bi, tmp_path):
    path = tmp_path / "model"
    shutil.copytree(long_seq_bi, path)
    edit_json(path / "sentence_bert_config.json", max_seq_length=512)
    assert window_of(path) == 64


def test_without_modules_json_the_window_is_read_as_before(cased_cross_encoders, st, tmp_path):
    """`CrossEncoder` on a plain checkpoint reads no sentence_bert_config.json: the tokenizer's length holds."""
    path = tmp_path / "model"
    shutil.copytree(cased_cross_encoders[0], path)
    edit_json(path / "tokenizer_config.json", model_max_length=16)
    edit_json(path / "sentence_bert_config.json", max_seq_length=48)
    assert window_of(path) == st.CrossEncoder(str(path), device="cpu").max_seq_length == 16
    edit_json(path / "sentence_bert_config.json", max_seq_length=8)
    assert window_of(path) == 8  # the smallest of the three, as openrerank has always read it

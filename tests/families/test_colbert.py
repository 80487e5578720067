"""The colbert family over HTTP: fp32 parity <= 1e-4 with an independent reference and with the peer
libraries (sentence-transformers' MultiVectorEncoder, PyLate), negative controls, every dialect's unit form,
the token cache (a passage seen again costs only the query) and the multi-vector embeddings route.

One server holds three tiny random checkpoints: PyLate layout ([unused0]/[unused1] markers), PyLate with
added `[Q] `/`[D] ` markers and attended augmentation, colbert-ai layout; plus the embedded bi-encoder
(a model without multi-vector embeddings, for the route's errors).
"""

from __future__ import annotations

import base64
import re

import numpy as np
import pytest

from openrerank.families.base import ModelFiles, ModelFormatError
from openrerank.families.registry import resolve_spec
from tests.families import colbert_reference as R
from tests.families.builders import PASSAGES, QUERIES
from tests.families.colbert_builders import build_pylate_colbert, build_stanford_colbert
from tests.support import nim_body, run_server

TOL = 1e-4
WRONG = 1e-2
#: Punctuation inside words and around them, a passage past the document length (40 / 30 tokens).
CORPUS = [*PASSAGES, "paris, france; the capital (city) of france!", "what? the river -- the sea... the ocean."]
QUERY_SET = [*QUERIES, "paris france capital?"]
BI_ENCODER = "sentence-transformers/all-MiniLM-L6-v2"  # `--model default`'s id


@pytest.fixture(scope="module")
def colbert_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("colbert-models")
    return {
        "pylate": build_pylate_colbert(root / "pylate"),
        "pylate-qd": build_pylate_colbert(root / "pylate-qd", seed=13, prefixes=("[Q] ", "[D] "),
                                          attend_to_expansion=True, query_length=16),
        "stanford": build_stanford_colbert(root / "stanford"),
    }


@pytest.fixture(scope="module")
def server(tmp_path_factory, colbert_dirs):
    args = [arg for name, path in colbert_dirs.items() for arg in ("--model", f"{name}={path}")]
    args += ["--model", "default", "--dtype", "fp32", "--max-padding", "0.9", "--batch-wait-ms", "5",
             "--token-cache-mb", "4"]
    with run_server(args, tmp_path_factory.mktemp("colbert-server")) as srv:
        yield srv


@pytest.fixture(scope="module")
def references(colbert_dirs):
    return {name: R.Reference(path) for name, path in colbert_dirs.items()}


def _raw(c, model: str, query: str, passages: list[str], **extra) -> np.ndarray:
    r = c.post("/v1/ranking", json=nim_body(query, passages, model=model, truncate="END", **extra))
    assert r.status_code == 200, r.text
    out = np.zeros(len(passages))
    for x in r.json()["rankings"]:
        out[x["index"]] = x["logit"]
    return out


def _metric(c, name: str, **labels) -> float:
    text = c.get("/metrics").text
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    m = re.search(rf"^{name}\{{{want}\}} (\S+)$", text, re.M) if labels else re.search(rf"^{name} (\S+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


# detection ----------------------------------------------------------------------------------------------------

def test_both_layouts_are_detected_from_their_files(colbert_dirs):
    for name, path in colbert_dirs.items():
        family, spec = resolve_spec(ModelFiles.read(path))
        assert family.id == "colbert", name
        assert spec.options["layout"] == ("colbert-ai" if name == "stanford" else "pylate")
    _, spec = resolve_spec(ModelFiles.read(colbert_dirs["pylate-qd"]))
    assert spec.options["query_prefix"] == "[Q] " and spec.options["attend_to_expansion_tokens"] is True
    _, spec = resolve_spec(ModelFiles.read(colbert_dirs["stanford"]))
    assert (spec.options["query_length"], spec.options["document_length"]) == (10, 30)
    assert spec.options["skiplist_tokens"] == 32  # every string.punctuation character is a token here


def test_a_marker_the_tokenizer_lacks_is_a_format_error(tmp_path, colbert_dirs):
    path = build_pylate_colbert(tmp_path / "m", prefixes=("[unused0]", "[unused1]"))
    cfg = path / "config_sentence_transformers.json"
    cfg.write_text(cfg.read_text().replace('"[unused1]"', '"[nope]"'))
    with pytest.raises(ModelFormatError, match="document marker '\\[nope\\]'"):
        resolve_spec(ModelFiles.read(path))


# parity ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["pylate", "pylate-qd", "stanford"])
def test_parity_with_the_reference_and_negative_controls(server, references, name):
    ref = references[name]
    with server.client() as c:
        for query in QUERY_SET:
            got = _raw(c, name, query, CORPUS)
            assert got == pytest.approx(ref.scores(query, CORPUS), abs=TOL), query
    # `got` holds the last query's scores. Each step matters: the reference without it misses the server's
    # scores by far more than the tolerance.
    for switch in ("augment", "skiplist", "normalize"):
        wrong = ref.scores(QUERY_SET[-1], CORPUS, **{switch: False})
        assert np.abs(wrong - got).max() > WRONG, switch


@pytest.mark.parametrize("name", ["pylate", "pylate-qd", "stanford"])
def test_parity_with_sentence_transformers_multi_vector_encoder(server, colbert_dirs, name):
    with server.client() as c:
        for query in QUERY_SET[:2]:
            got = _raw(c, name, query, CORPUS)
            assert got == pytest.approx(R.st_scores(colbert_dirs[name], query, CORPUS), abs=TOL), query


@pytest.mark.parametrize("name", ["pylate", "pylate-qd", "stanford"])
def test_parity_with_pylate(server, colbert_dirs, name):
    reason = R.pylate_available()
    if reason:
        pytest.skip(reason)
    with server.client() as c:
        got = _raw(c, name, QUERY_SET[0], CORPUS)
    assert got == pytest.approx(R.pylate_scores(colbert_dirs[name], QUERY_SET[0], CORPUS), abs=TOL)


# dialects -------------------------------------------------------------------------------------------------------

def test_every_dialect_reports_maxsim_and_its_unit_form(server):
    query, passages = QUERY_SET[0], CORPUS[:6]
    with server.client() as c:
        raw = _raw(c, "pylate", query, passages)
        n = 12  # query_length: augmentation makes every query 12 vectors
        unit = (raw / n + 1) / 2
        co = c.post("/v2/rerank", json={"model": "pylate", "query": query, "documents": passages}).json()["results"]
        tei = c.post("/rerank", json={"model": "pylate", "query": query, "texts": passages}).json()
        tei_raw = c.post("/rerank", json={"model": "pylate", "query": query, "texts": passages, "raw_scores": True})
        inf = c.post("/rerank", json={"model": "pylate", "query": query, "documents": passages}).json()["results"]
        sc = c.post("/v1/score", json={"model": "pylate", "text_1": query, "text_2": passages}).json()["data"]
        meta = c.get("/v1/metadata").json()
    assert {x["index"]: x["relevance_score"] for x in co} == pytest.approx(dict(enumerate(unit)), abs=TOL)
    assert {x["index"]: x["score"] for x in tei} == pytest.approx(dict(enumerate(unit)), abs=TOL)
    assert {x["index"]: x["score"] for x in tei_raw.json()} == pytest.approx(dict(enumerate(raw)), abs=TOL)
    assert {x["index"]: x["relevance_score"] for x in inf} == pytest.approx(dict(enumerate(unit)), abs=TOL)
    assert [d["score"] for d in sc] == pytest.approx(list(unit), abs=TOL)
    model = next(m for m in meta["models"] if m["id"] == "pylate")
    assert model["family"] == "colbert" and model["score"] == "maxsim" and model["multi_vector"] is True


# the token cache -------------------------------------------------------------------------------------------------

def test_a_passage_seen_again_costs_only_the_query(server):
    passages = [f"the capital city of france number {i}, paris." for i in "abcdefgh"]
    first_body = nim_body("what is the capital of france", passages, model="stanford")
    other_body = nim_body("which city is the capital", passages, model="stanford")

    def encoded(c) -> dict[str, float]:
        return {s: _metric(c, "openrerank_late_interaction_encoded_total", model="stanford", side=s)
                for s in ("query", "passage")}

    with server.client() as c:
        before = encoded(c)
        hits0 = _metric(c, "openrerank_token_cache_hits_total", model="stanford")
        first = c.post("/v1/ranking", json=first_body)
        mid = encoded(c)
        other = c.post("/v1/ranking", json=other_body)  # the same passages, a new query
        after = encoded(c)
        hits = _metric(c, "openrerank_token_cache_hits_total", model="stanford") - hits0
        again = c.post("/v1/ranking", json=first_body)  # the first request again
        last = encoded(c)
    assert first.status_code == other.status_code == again.status_code == 200
    assert mid["passage"] - before["passage"] == len(passages) and mid["query"] - before["query"] == 1
    assert after["passage"] == mid["passage"], "the second request encoded passages again"
    assert after["query"] - mid["query"] == 1  # only its query ran through the model
    assert hits == len(passages)
    assert last == after  # a repeated query is remembered too: nothing ran
    assert again.json()["rankings"] == first.json()["rankings"]  # bit for bit: the same JSON floats


# multi-vector embeddings -----------------------------------------------------------------------------------------

def _multi(c, **body):
    return c.post("/v1/embeddings/multi_vector", json=body)


def test_multi_vector_route_returns_the_vectors_reranking_compares(server, references):
    ref = references["pylate"]
    query, passages = QUERY_SET[0], CORPUS[:4]
    with server.client() as c:
        q = _multi(c, model="pylate", input=query, input_type="query")
        d = _multi(c, model="pylate-passage", input=passages)  # NIM's name suffix sets input_type
        b64 = _multi(c, model="pylate", input=passages[:1], input_type="passage", encoding_format="base64")
        raw = _raw(c, "pylate", query, passages)
    assert q.status_code == d.status_code == b64.status_code == 200, (q.text, d.text, b64.text)
    qv = np.array(q.json()["data"][0]["embedding"], dtype=np.float32)
    assert q.json()["data"][0]["tokens"] == 12 and qv.shape == (12, 16)
    assert qv == pytest.approx(ref.vectors(query, True), abs=TOL)
    docs = [np.array(x["embedding"], dtype=np.float32) for x in d.json()["data"]]
    for p, v in zip(passages, docs, strict=True):
        assert v == pytest.approx(ref.vectors(p, False), abs=TOL)
    assert np.linalg.norm(docs[0], axis=1) == pytest.approx(1.0, abs=1e-5)
    assert [float((qv @ v.T).max(axis=1).sum()) for v in docs] == pytest.approx(list(raw), abs=TOL)
    item = b64.json()["data"][0]
    packed = np.frombuffer(base64.b64decode(item["embedding"]), dtype="<f4").reshape(item["tokens"], item["dimensions"])
    assert packed == pytest.approx(docs[0], abs=0)
    assert d.json()["usage"]["prompt_tokens"] > 0


def test_multi_vector_route_errors(server):
    long = " ".join(["paris"] * 80)
    with server.client() as c:
        no_type = _multi(c, model="pylate", input=["paris"])
        single = c.post("/v1/embeddings", json={"model": "pylate", "input": ["paris"]})
        not_late = _multi(c, model=BI_ENCODER, input=["paris"], input_type="passage")
        unknown = _multi(c, model="nope", input=["paris"], input_type="passage")
        too_many = _multi(c, model="pylate", input=["paris"] * 65, input_type="passage")
        too_long = _multi(c, model="pylate", input=[long], input_type="passage")
        cut = _multi(c, model="pylate", input=[long], input_type="passage", truncate="END")
        empty = _multi(c, model="pylate", input=[], input_type="passage")
    assert no_type.status_code == 400 and "input_type is required" in no_type.json()["message"]
    assert single.status_code == 400 and "/v1/embeddings/multi_vector" in single.json()["message"]
    assert not_late.status_code == 400 and "late-interaction models served here: pylate" in not_late.json()["message"]
    assert unknown.status_code == 404
    assert too_many.status_code == 413 and "maximum of 64" in too_many.json()["message"]
    assert too_long.status_code == 400 and too_long.json()["object"] == "error"
    assert cut.status_code == 200 and cut.json()["data"][0]["tokens"] <= 40
    assert empty.status_code == 400


# lowercasing ----------------------------------------------------------------------------------------------------

CASED_QUERY = "What is the Capital of FRANCE?"
CASED_PASSAGES = ["PARIS is the Capital of France.", "Berlin is the capital city of Germany", "the BANANA is Yellow"]


def _load(path):
    from openrerank.engine.loading import LoadOptions, load_model

    return load_model(str(path), LoadOptions(backend="torch", dtype="fp32"))


def test_an_uncased_vocab_only_tokenizer_scores_text_as_its_lowercase(tmp_path):
    """colbert-ai's checkpoints carry an uncased BERT vocabulary (`do_lower_case` in tokenizer_config.json), maybe
    as vocab.txt with no tokenizer.json: "Paris" is scored as "paris", as the reference scores the lowercased
    text (an upper-case letter is not in the vocabulary: read cased, it would be [UNK])."""
    path = build_stanford_colbert(tmp_path / "m", vocab_only=True)
    assert not (path / "tokenizer.json").exists() and (path / "vocab.txt").is_file()
    ref = R.Reference(path)
    model = _load(path)
    try:
        got = model.score(CASED_QUERY, CASED_PASSAGES)
        assert got == pytest.approx(ref.scores(CASED_QUERY.lower(), [p.lower() for p in CASED_PASSAGES]), abs=TOL)
        assert got == pytest.approx(model.score(CASED_QUERY.lower(), [p.lower() for p in CASED_PASSAGES]), abs=1e-6)
    finally:
        model.close()


def test_do_lower_case_of_sentence_bert_config_lowercases_a_pylate_model(tmp_path):
    """A PyLate folder with a cased tokenizer and `do_lower_case: true` in sentence_bert_config.json: PyLate (its
    sentence-transformers Transformer module) lowercases every text before the tokenizer, so this does too; the
    markers are ids inserted after tokenization, untouched. Checked against sentence-transformers'
    MultiVectorEncoder and against the same model scoring the lowercased texts; without it an upper-case letter
    is [UNK] and the scores miss by far."""
    path = build_pylate_colbert(tmp_path / "m", prefixes=("[Q] ", "[D] "), lowercase=False, st_lowercase=True)
    model = _load(path)
    try:
        got = model.score(CASED_QUERY, CASED_PASSAGES)
        lower = model.score(CASED_QUERY.lower(), [p.lower() for p in CASED_PASSAGES])
        assert got == pytest.approx(lower, abs=1e-6)
        assert got == pytest.approx(R.st_scores(path, CASED_QUERY, CASED_PASSAGES), abs=TOL)
        cased = R.Reference(path).scores(CASED_QUERY, CASED_PASSAGES)  # the tokenizer alone: [UNK] for capitals
        assert np.abs(cased - got).max() > WRONG
        for side in ("query", "passage"):  # the multi-vector route's items
            items = [model.token_items([text], input_type=side)[0].input_ids for text in ("PARIS", "paris")]
            assert items[0] == items[1], side
        assert model.spec.options.get("lowercase") is True  # shown in /v1/metadata
    finally:
        model.close()

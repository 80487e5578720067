"""Long documents on the embedded default (a bi-encoder, 256-token window), through HTTP.

A ~3,000-token document whose only relevant sentence sits near its end must outrank short, topical
distractors when chunking is on (NIM `truncate: "CHUNK"`, the Cohere routes by default, TEI with
`--tei-chunking`), and must not when the document is cut at its end.
"""

from __future__ import annotations

import itertools

import pytest

from tests.server.conftest import DEFAULT_ID

FILLER = [
    "The committee met on Tuesday to review the quarterly budget for the regional parks department.",
    "Several members raised concerns about the cost of repainting the benches along the lakeside path.",
    "A proposal to extend the opening hours of the community library was deferred to the next session.",
    "The minutes of the previous meeting were read aloud and approved without amendment.",
    "Volunteers reported that the spring tree-planting event attracted more families than expected.",
    "The treasurer noted that parking fees had covered most of the maintenance costs this year.",
    "A resident asked whether the old bandstand could be restored in time for the summer concerts.",
    "The chair reminded everyone that public comments are limited to three minutes per speaker.",
]
RELEVANT = "Mercury boils at 356.7 degrees Celsius, far lower than most other metals."
QUERY = "At what temperature does mercury boil?"
DISTRACTORS = [
    "Mercury is the smallest planet in the solar system and the closest to the Sun.",
    "Water boils at 100 degrees Celsius at sea level.",
    "Iron melts at about 1538 degrees Celsius.",
    "The Roman god Mercury was the messenger of the gods.",
]
_sentences = list(itertools.islice(itertools.cycle(FILLER), 180))
DOCUMENT = " ".join([*_sentences[:-6], RELEVANT, *_sentences[-6:]])
PASSAGES = [*DISTRACTORS[:2], DOCUMENT, *DISTRACTORS[2:]]
DOC = 2  # index of the long document


def test_document_is_about_3000_tokens_with_the_answer_near_its_end():
    from transformers import AutoTokenizer

    from openrerank.sources.source import default_model_dir

    tok = AutoTokenizer.from_pretrained(str(default_model_dir()))
    ids = tok(DOCUMENT, add_special_tokens=False)["input_ids"]
    answer_at = len(tok(DOCUMENT[: DOCUMENT.index(RELEVANT)], add_special_tokens=False)["input_ids"])
    assert 2800 <= len(ids) <= 3400
    assert answer_at > 0.9 * len(ids)


def _nim_order(c, truncate: str) -> tuple[list[int], int]:
    r = c.post("/v1/ranking", json={"query": {"text": QUERY}, "passages": [{"text": p} for p in PASSAGES],
                                    "truncate": truncate})
    assert r.status_code == 200, r.text
    return [x["index"] for x in r.json()["rankings"]], r.json()["usage"]["prompt_tokens"]


def test_nim_chunk_finds_the_late_answer_and_end_does_not(default_server):
    with default_server.client() as c:
        chunked, chunk_tokens = _nim_order(c, "CHUNK")
        cut, cut_tokens = _nim_order(c, "END")
        refused = c.post("/v1/ranking", json={"query": {"text": QUERY}, "passages": [{"text": DOCUMENT}]})
    assert chunked[0] == DOC
    assert cut[0] != DOC and cut[-1] == DOC  # its first 256 tokens are all filler
    assert chunk_tokens > 3000 > cut_tokens  # usage counts every chunk's tokens
    assert refused.status_code in (400, 422)  # NONE (NIM's default) still refuses an over-long pair


def test_cohere_chunks_by_default(default_server):
    with default_server.client() as c:
        v2 = c.post("/v2/rerank", json={"model": DEFAULT_ID, "query": QUERY, "documents": PASSAGES, "top_n": 1})
        clipped = c.post("/v2/rerank", json={"model": DEFAULT_ID, "query": QUERY, "documents": PASSAGES,
                                             "max_tokens_per_doc": 1000})
    assert v2.json()["results"][0]["index"] == DOC
    assert v2.json()["usage"]["total_tokens"] > 3000
    assert clipped.json()["results"][0]["index"] != DOC  # only the first 1,000 tokens were considered


def test_cohere_v1_max_chunks_bounds_the_work(default_server):
    with default_server.client() as c:
        default = c.post("/v1/rerank", json={"query": QUERY, "documents": PASSAGES})
        more = c.post("/v1/rerank", json={"query": QUERY, "documents": PASSAGES, "max_chunks_per_doc": 16})
        too_many = c.post("/v1/rerank", json={"query": QUERY, "documents": PASSAGES, "max_chunks_per_doc": 20})
    assert too_many.status_code == 400 and "--max-chunks-per-passage" in too_many.json()["message"]
    # 10 windows of 256 tokens (overlapping by a quarter) cover ~2,000 tokens: not the answer; the
    # server's most, 16, cover ~3,100.
    assert default.json()["results"][0]["index"] != DOC
    assert more.json()["results"][0]["index"] == DOC
    assert more.json()["usage"]["total_tokens"] > default.json()["usage"]["total_tokens"]


@pytest.mark.parametrize(("flag", "finds"), [(False, False), (True, True)])
def test_tei_chunks_only_with_the_server_flag(default_server, multi_server, flag, finds):
    server = multi_server if flag else default_server
    with server.client() as c:
        r = c.post("/rerank", json={"query": QUERY, "texts": PASSAGES})
        refused = c.post("/rerank", json={"query": QUERY, "texts": PASSAGES, "truncate": False})
    assert r.status_code == 200, r.text
    assert (r.json()[0]["index"] == DOC) is finds
    assert refused.status_code == 422 and refused.json()["error_type"] == "Validation"

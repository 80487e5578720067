"""A real server says which engine serves and why, and answers repeats from the pair-score cache."""

from __future__ import annotations

import re

import pytest

from openrerank.runtimes.selection import LANES_TIE, plan_runtimes
from tests.support import nim_body, run_server

QUERY = "what is the capital of france"
PASSAGES = ["paris is the capital of france", "bananas are yellow", "berlin is in germany", "the river"]


@pytest.fixture(scope="module")
def cached_server(tmp_path_factory, tiny_model_dir):
    args = ["--model", f"tiny={tiny_model_dir}", "--score-cache-mb", "1", "--log-level", "info"]
    with run_server(args, tmp_path_factory.mktemp("cached-server")) as server:
        yield server


def metric(text: str, name: str) -> float:
    return sum(float(v) for v in re.findall(rf"^{name}(?:{{[^}}]*}})? (\S+)$", text, flags=re.M))


def test_metadata_info_and_startup_log_say_which_engine_and_why(cached_server):
    """Every faithful candidate's measured rate is shown, and the fastest serves (whichever it is here), unless
    one with fewer lanes timed within `LANES_TIE` of it (the documented tie rule: then that one serves)."""
    with cached_server.client() as c:
        model = c.get("/v1/metadata").json()["models"][0]
        info = c.get("/info").json()
    planned = {(p.runtime, p.dtype) for p in plan_runtimes("auto", "auto", "cpu")}  # the faithful candidates here
    engine = model["engine"]
    assert engine["choice"] == "measure"
    assert {(m["backend"], m["dtype"]) for m in engine["measured"]} == planned
    timed = [m for m in engine["measured"] if "pairs_per_s" in m]
    fastest = max(timed, key=lambda m: m["pairs_per_s"])
    tied = [m for m in timed if m["pairs_per_s"] >= fastest["pairs_per_s"] * (1 - LANES_TIE)]
    serves = min(tied, key=lambda m: (m["lanes"], -m["pairs_per_s"]))
    assert (engine["backend"], engine["dtype"], engine["lanes"]) == (serves["backend"], serves["dtype"],
                                                                     serves["lanes"])
    assert engine["throughput"]["pairs_per_s"] == serves["pairs_per_s"] > 0
    if serves is not fastest:  # the reason says it serves a tie, and with which faster candidate
        assert f"within {LANES_TIE:.0%} of the fastest" in engine["reason"]
    assert engine["throughput"]["tokens_per_s"] > engine["throughput"]["pairs_per_s"]
    for m in timed:  # the reason names every candidate's rate
        assert f"{m['pairs_per_s']:.1f}/s" in engine["reason"]
    assert model["backend"] == f"{engine['backend']}-{engine['dtype']}-cpu"
    assert info["engine"] == engine  # TEI /info carries the same object
    assert model["score_cache"]["max_bytes"] == 2**20
    assert f": {engine['reason']}" in cached_server.output()  # the startup log line


def test_repeated_requests_are_answered_from_the_cache(cached_server):
    with cached_server.client() as c:
        before = c.get("/v1/metrics").text
        first = c.post("/v1/ranking", json=nim_body(QUERY, PASSAGES, truncate="END"))
        again = c.post("/v1/ranking", json=nim_body(QUERY, PASSAGES, truncate="END"))
        after = c.get("/v1/metrics").text
    assert first.status_code == again.status_code == 200
    assert again.json() == first.json()  # identical answer, usage included
    assert float(again.headers["x-inference-time"]) == 0.0
    hits = metric(after, "openrerank_score_cache_hits_total") - metric(before, "openrerank_score_cache_hits_total")
    misses = (metric(after, "openrerank_score_cache_misses_total")
              - metric(before, "openrerank_score_cache_misses_total"))
    assert hits >= len(PASSAGES) and misses >= len(PASSAGES)
    assert metric(after, "openrerank_score_cache_entries") >= len(PASSAGES)
    assert metric(after, "openrerank_score_cache_capacity_bytes") == 2**20


def test_a_measured_choice_answers_metadata_as_the_document_declares(cached_server):
    """The richest /v1/metadata: every candidate's timing and the throughput the choice measured."""
    from tests.support import check_against_openapi

    with cached_server.client() as c:
        meta = check_against_openapi(c, "/v1/metadata")
    assert meta["models"][0]["engine"]["measured"] and meta["models"][0]["engine"]["throughput"]

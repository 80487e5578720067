"""Work proportional to what is scored, over HTTP: a megabyte passage costs what its window costs, one
request's tokenization cannot stall another's, and a request that cannot finish in time is refused at once
from the model's measured speed."""

from __future__ import annotations

import re
import threading
from pathlib import Path

import pytest
from transformers import PreTrainedTokenizerBase

from openrerank.core.requests import Truncate
from openrerank.engine.loading import LoadOptions, load_model
from openrerank.engine.preparing import INLINE_TEXTS
from openrerank.engine.rates import BUDGET_SHARE, work_of
from openrerank.engine.speed_record import SpeedRecord
from openrerank.runtimes.artifact_cache import CACHE_ENV
from openrerank.server.config import ServerConfig
from tests.server.faults import WAIT_S, InProcessServer, in_thread, until
from tests.support import nim_body, run_server

MB = 1 << 20


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def test_a_multi_megabyte_passage_costs_what_its_window_costs(tmp_path, tiny_model_dir):
    """Passages used to be tokenized whole before they were cut: a 2 MB END passage took RSS 624 -> 1,762 MB
    (kept after), CHUNK 1 MB 9.4 s and +390 MB, Cohere max_tokens_per_doc the same."""
    args = ["--model", f"tiny={tiny_model_dir}", "--backend", "torch", "--threads", "1"]
    huge = "river water mountain city engine " * (6 * MB // 33)  # ~6 MB of words the tiny vocabulary knows
    with run_server(args, tmp_path) as server, server.client() as c:
        assert c.post("/v1/ranking", json=nim_body("q", ["warm up"], truncate="END")).status_code == 200
        before = rss_mib(server.proc.pid)
        requests = [("/v1/ranking", nim_body("rivers", [huge], truncate="END")),
                    ("/v1/ranking", nim_body("rivers", [huge], truncate="CHUNK")),
                    ("/v2/rerank", {"model": "tiny", "query": "rivers", "documents": [huge],
                                    "max_tokens_per_doc": 300}),
                    ("/v1/rerank", {"query": "rivers", "documents": [huge, "a short one"]})]
        for path, body in requests:
            r = c.post(path, json=body)
            assert r.status_code == 200, (path, r.text[:300])
            assert rss_mib(server.proc.pid) - before < 150, path  # the body itself is 6 MB, its JSON copy too
        chunked = c.post("/v1/ranking", json=nim_body("rivers", [huge], truncate="CHUNK")).json()
        assert chunked["usage"]["prompt_tokens"] <= 16 * 128  # 16 windows of the 128-token model, at most


@pytest.fixture
def gated_tokenizer(monkeypatch):
    """Tokenizer calls holding GATE stop until released: a tokenization that takes as long as the test wants."""
    reached, release = threading.Event(), threading.Event()
    call = PreTrainedTokenizerBase.__call__

    def gated(self, *args, **kw):
        texts = [t for a in args if isinstance(a, list) for t in a if isinstance(t, str)]
        if any("GATE" in t for t in texts):
            reached.set()
            assert release.wait(WAIT_S), "the test never released the tokenizer"
        return call(self, *args, **kw)

    monkeypatch.setattr(PreTrainedTokenizerBase, "__call__", gated)
    yield reached, release
    release.set()


def test_a_long_tokenization_does_not_hold_up_another_request(tiny_model_dir, gated_tokenizer):
    """With one locked tokenizer per model, a 2-passage request waited 6-23.5 s behind one 7 MB request."""
    reached, release = gated_tokenizer
    config = ServerConfig(models=[f"tiny={tiny_model_dir}"], backend="torch", threads=1)
    with InProcessServer(config) as server, server.client() as c:
        # more texts than a slice tokenized on the event loop (`preparing.tiny`), as a 7 MB request is
        big = in_thread(lambda: server.client().post("/v1/ranking",
                                                     json=nim_body("q", ["GATE river"] * (INLINE_TEXTS + 1))))
        assert reached.wait(WAIT_S)  # the big request is inside the tokenizer, holding a copy
        small = c.post("/v1/ranking", json=nim_body("paris", ["paris is in france", "bananas"]))
        assert small.status_code == 200 and len(small.json()["rankings"]) == 2
        release.set()
        assert big().status_code == 200


def test_the_token_budget_follows_the_measured_speed(tmp_path):
    """The default budget assumed ~8k tokens/s; on a slower machine a request admitted under it ran to 504.
    One thread of MiniLM scores far below what this request needs within 5 s on any CPU."""
    timeout = 5.0
    args = ["--backend", "torch", "--threads", "1", "--request-timeout", str(timeout)]
    own_cache = {CACHE_ENV: str(tmp_path / "cache")}  # no speed another test's batches showed (speed_record.py)
    with run_server(args, tmp_path, env=own_cache) as server, server.client() as c:
        model = c.get("/v1/metadata").json()["models"][0]
        rate, budget, knee = model["tokens_per_second"], model["max_request_tokens"], model["attention_knee"]
        assert budget == pytest.approx(rate * timeout * BUDGET_SHARE, rel=0.01)
        # MiniLM's: a token of an L-token pair costs 1 + L/2304 of a short one's (no batch served yet to fit another)
        assert knee == model["attention_knee_flops"] == 6 * 384
        assert c.get("/v1/metadata").json()["limits"]["max_request_tokens"] == budget
        passage = "the river flows through the mountain city to the sea " * 60  # over the 256-token window
        # the limit for 256-token passages, in tokens: the budget (tokens of short sequences) / (1 + 256/knee)
        limit = budget * 256 / work_of([256], knee)
        r = c.post("/v1/ranking", json=nim_body("q", [passage] * 512, truncate="END"))
        assert r.status_code == 400, r.text[:300]
        message = r.json()["message"]
        assert "tokens/s here at these lengths" in message and "--max-request-tokens" in message, message
        # the limit enforced is the measured one at these lengths (the query's 3 tokens move it a little), not
        # the static default (32768 tokens at this timeout), nor the budget counted in tokens
        assert "would score at least" in message, message  # refused after the first of its 8 slices
        said = int(re.search(r"above the limit of (\d+) per request", message).group(1))
        assert said == pytest.approx(limit, rel=1e-3) and said < budget, message
        assert "x-inference-time" not in r.headers  # refused before any scoring
        # just over the measured budget (on a slow CPU, far below the static default): refused too
        passages = int(limit // 256) + 1
        r = c.post("/v1/ranking", json=nim_body("q", [passage] * passages, truncate="END"))
        assert r.status_code == 400 and "above the limit of" in r.json()["message"], r.text[:300]
        assert "at least" not in r.json()["message"]  # one slice: the whole request was counted
        # and under it is scored: 256-token passages are weighed by their length, not counted as short ones
        assert c.post("/v1/ranking", json=nim_body("q", [passage] * (passages - 2), truncate="END")).status_code == 200
        assert c.post("/v1/ranking", json=nim_body("q", ["a river"], truncate="END")).status_code == 200
    # the explicit flag still wins
    with run_server([*args, "--max-request-tokens", "123456"], tmp_path) as server, server.client() as c:
        assert c.get("/v1/metadata").json()["models"][0]["max_request_tokens"] == 123456


def test_a_request_that_cannot_finish_behind_the_queue_is_refused_at_once(tiny_model_dir):
    """Fits its budget, but behind the pending work at the model's rate it would end past its deadline:
    503 with Retry-After now, not a 504 after --request-timeout."""
    timeout = 30.0
    config = ServerConfig(models=[f"tiny={tiny_model_dir}"], backend="torch", threads=1, request_timeout=timeout,
                          max_queue_tokens=100_000)
    with InProcessServer(config) as server, server.client() as c:
        model = server.app.state.models.get("tiny")
        body = nim_body("q", ["paris", "berlin"])
        items = model.loaded.encoder.prepare("q", ["paris", "berlin"], Truncate.NONE).items
        # a rate at which one request takes 0.3 of the timeout: two fit (0.6 of the 0.8 planned), a third would
        # end at 0.9
        server.call(lambda: setattr(model.scheduler, "work_per_second", model.scheduler.weigh(items) / (0.3 * timeout)))
        gate = server.backends["tiny"]
        gate.hold()
        first = in_thread(lambda: server.client().post("/v1/ranking", json=body))
        gate.wait_started()
        second = in_thread(lambda: server.client().post("/v1/ranking", json=body))
        until(lambda: model.scheduler.pending == 2, "two pending requests")
        r = c.post("/v1/ranking", json=body)
        assert r.status_code == 503 and r.headers["retry-after"], r.text
        assert "would finish in about" in r.json()["message"] and "tokens/s" in r.json()["message"]
        gate.release()
        assert first().status_code == 200 and second().status_code == 200


def test_over_budget_text_is_refused_before_all_of_it_is_tokenized(tiny_model_dir):
    config = ServerConfig(models=[f"tiny={tiny_model_dir}"], backend="torch", threads=1, max_request_tokens=500)
    with InProcessServer(config) as server, server.client() as c:
        calls: list[int] = []
        encoder = server.app.state.models.get("tiny").loaded.encoder
        prepare = encoder.prepare

        def counting(query, passages, *args, **kw):
            calls.append(len(passages))
            return prepare(query, passages, *args, **kw)

        encoder.prepare = counting
        r = c.post("/v1/ranking", json=nim_body("q", ["river water sea mountain " * 20] * 512, truncate="END"))
        assert r.status_code == 400 and "--max-request-tokens" in r.json()["message"]
        assert sum(calls) < 512  # refused after the first slice, not after tokenizing all 512 passages


def test_a_small_request_gets_a_tokenizer_between_the_slices_of_big_ones(tiny_model_dir, monkeypatch):
    """Every tokenizer copy busy with a big request: the big ones are tokenized a slice at a time
    (engine/preparing.py text_slices), so a small request gets a copy between two slices instead of waiting for
    a whole big request's tokenization."""
    import time

    from openrerank.engine.preparing import SLICE_TEXTS

    per_text = 0.01  # seconds of tokenization per SLOW text: a slice ~0.64 s, a whole big request ~5 s
    call = PreTrainedTokenizerBase.__call__

    def slow(self, *args, **kw):
        texts = [t for a in args if isinstance(a, list) for t in a if isinstance(t, str)]
        time.sleep(per_text * sum("SLOW" in t for t in texts))
        return call(self, *args, **kw)

    monkeypatch.setattr(PreTrainedTokenizerBase, "__call__", slow)
    config = ServerConfig(models=[f"tiny={tiny_model_dir}"], backend="torch", threads=1)
    with InProcessServer(config) as server, server.client() as c:
        pool = server.app.state.models.get("tiny").loaded.encoder.tok
        n = 8 * SLICE_TEXTS
        body = nim_body("q", [f"SLOW river {i}" for i in range(n)], truncate="END")
        bigs = [in_thread(lambda: server.client().post("/v1/ranking", json=body)) for _ in range(pool.size)]
        until(lambda: not pool._free and pool._made >= pool.size, "every tokenizer copy busy")
        start = time.monotonic()
        small = c.post("/v1/ranking", json=nim_body("paris", ["paris is in france", "bananas"]))
        took = time.monotonic() - start
        assert small.status_code == 200
        assert took < n * per_text / 2, f"the small request waited {took:.1f} s for a tokenizer"
        answers = [big() for big in bigs]
        assert all(a.status_code == 200 for a in answers), [(a.status_code, a.text[:300]) for a in answers]


def test_a_restart_starts_with_the_speed_its_served_batches_showed(tmp_path, monkeypatch):
    """The knee and rate the served batches moved to are kept (engine/speed_record.py): the next start of the
    model on this machine and engine weighs and budgets its first request by them, not by the FLOP knee and
    the engine choice's timing; and it keeps what its own batches show when it stops."""
    import torch

    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    threads = torch.get_num_threads()
    try:  # the record of the model the server below serves, computed as it computes it
        model = load_model("default", LoadOptions(backend="torch", threads=1))
    finally:
        torch.set_num_threads(threads)
    record = SpeedRecord.of(model)
    model.close()
    record.save(1000.0, 5000.0, 30.0)  # as if an earlier start's batches had shown these
    timeout = 10.0
    args = ["--backend", "torch", "--threads", "1", "--request-timeout", str(timeout)]
    with run_server(args, tmp_path, env={CACHE_ENV: str(tmp_path / "cache")}) as server, server.client() as c:
        model = c.get("/v1/metadata").json()["models"][0]
        assert model["attention_knee"] == 1000 and model["attention_knee_flops"] == 6 * 384
        assert model["tokens_per_second"] == 5000.0
        assert model["max_request_tokens"] == int(5000.0 * timeout * BUDGET_SHARE)
        assert "starts with the speed its served batches showed on an earlier start" in server.output()
        passage = "the river flows through the mountain city to the sea " * 60  # over the 256-token window
        for _ in range(2):  # served batches move the rate
            r = c.post("/v1/ranking", json=nim_body("q", [passage] * 40, truncate="END"))
            assert r.status_code == 200, r.text[:300]
        served = c.get("/v1/metadata").json()["models"][0]["tokens_per_second"]
        assert served != 5000.0
    kept = record.load()  # the server kept what its batches showed when it stopped
    assert kept.work_per_second == pytest.approx(served, rel=1e-3)

"""What clients see over HTTP when things go wrong: overload, deadlines, shutdown, a dead worker, a failing
input, a client that goes away. Each test drives a real server (tests/server/faults.py) whose model is
held, poisoned or killed on purpose; each would fail if its error handler were deleted."""

from __future__ import annotations

import queue
import socket
import time

import httpx
import pytest

from openrerank.server.config import ServerConfig
from tests.server.faults import InProcessServer, in_thread, until
from tests.support import nim_body

MODEL = "tiny"
# one request per dialect, and the status it answers when overloaded / past its deadline
DIALECTS = {
    "nim": ("/v1/ranking", nim_body("q", ["paris", "berlin"]), 503, 504),
    "cohere": ("/v1/rerank", {"query": "q", "documents": ["paris", "berlin"]}, 429, 504),
    "tei": ("/rerank", {"query": "q", "texts": ["paris", "berlin"]}, 429, 424),
    "score": ("/v1/score", {"text_1": "q", "text_2": ["paris", "berlin"]}, 503, 504),
}


def config(tiny_model_dir, **kw) -> ServerConfig:
    return ServerConfig(models=[f"{MODEL}={tiny_model_dir}"], backend="torch", threads=1, **kw)


def post_in_thread(server: InProcessServer, path: str, body: dict):
    return in_thread(lambda: server.client().post(path, json=body))


def test_a_full_queue_answers_503_or_429_with_retry_after(tiny_model_dir):
    with InProcessServer(config(tiny_model_dir, max_queue=1)) as server, server.client() as c:
        backend = server.backends[MODEL]
        backend.hold()
        first = post_in_thread(server, "/v1/ranking", nim_body("q", ["a"]))
        backend.wait_started()
        for path, body, overloaded, _ in DIALECTS.values():
            r = c.post(path, json=body)
            assert r.status_code == overloaded, (path, r.text)
            assert int(r.headers["Retry-After"]) >= 1
            assert "overloaded" in r.text
        backend.release()
        assert first().status_code == 200
        rejected = {"model": MODEL, "task": "rerank", "reason": "queue_full"}
        assert server.metric("openrerank_rejected_total", rejected) == 4


def test_a_request_past_its_deadline_answers_504_tei_424(tiny_model_dir):
    with InProcessServer(config(tiny_model_dir, request_timeout=1.0)) as server, server.client() as c:
        backend = server.backends[MODEL]
        backend.hold()
        for name, (path, body, _, late) in DIALECTS.items():
            r = c.post(path, json=body)
            assert r.status_code == late, (path, r.text)
            assert "timed out" in r.text
            if name == "tei":
                assert r.json()["error_type"] == "Backend"
        backend.release()
        assert c.post("/v1/ranking", json=nim_body("q", ["a"])).status_code == 200


def test_requests_reaching_a_stopping_model_answer_503(tiny_model_dir):
    with InProcessServer(config(tiny_model_dir)) as server, server.client() as c:
        backend = server.backends[MODEL]
        backend.hold()
        in_flight = post_in_thread(server, "/v1/ranking", nim_body("q", ["a"]))
        backend.wait_started()
        stopping = in_thread(lambda: server.call(server.app.state.models.stop))  # as the lifespan does
        until(lambda: server.app.state.models.get(MODEL).scheduler._admission.state == "stopping", "the model to stop")
        for path, body, _, _ in DIALECTS.values():
            r = c.post(path, json=body)
            assert r.status_code == 503, (path, r.text)
            assert "shutting down" in r.text and r.headers["Retry-After"] == "1"
        backend.release()
        assert in_flight().status_code == 200  # accepted work is finished, not dropped
        stopping()


def test_a_dead_worker_settles_in_flight_work_and_fails_health(tiny_model_dir):
    with InProcessServer(config(tiny_model_dir)) as server, server.client() as c:
        backend = server.backends[MODEL]
        backend.hold()
        running = post_in_thread(server, "/v1/ranking", nim_body("q", ["a"]))
        backend.wait_started()
        queued = post_in_thread(server, "/rerank", {"query": "q", "texts": ["b"]})
        until(lambda: server.app.state.models.get(MODEL).scheduler.queued == 1, "a queued request")
        assert c.get("/v1/health/ready").status_code == 200
        backend.fatal = True
        backend.release()
        r_running, r_queued = running(), queued()
        assert r_running.status_code == 503 and "worker stopped" in r_running.json()["message"]
        assert r_queued.status_code == 503 and r_queued.json()["error_type"] == "Unhealthy"
        for probe in ("/v1/health/ready", "/v1/health/live", "/health"):
            r = c.get(probe)
            assert r.status_code == 503, probe
            assert "Fatal" not in r.text  # short message; the exception is in the log
        assert "restart" in c.get("/v1/health/live").json()["message"]
        r = c.post("/v1/score", json={"text_1": "q", "text_2": ["a"]})
        assert r.status_code == 503  # refused at once, not after the timeout


def test_a_failing_input_fails_only_its_own_request(tiny_model_dir):
    with InProcessServer(config(tiny_model_dir)) as server:
        backend = server.backends[MODEL]
        tokenizer = server.app.state.models.get(MODEL).loaded.encoder.tokenizer
        backend.poison_token = tokenizer.convert_tokens_to_ids("banana")
        backend.hold()
        blocker = post_in_thread(server, "/v1/ranking", nim_body("q", ["a"]))
        backend.wait_started()
        poisoned = post_in_thread(server, "/v1/ranking", nim_body("query", ["banana", "fruit"]))
        fine = post_in_thread(server, "/v1/rerank", {"query": "query", "documents": ["river", "fruit"]})
        until(lambda: server.app.state.models.get(MODEL).scheduler.queued == 2, "two queued requests")
        backend.release()
        assert blocker().status_code == 200
        r_poisoned, r_fine = poisoned(), fine()
        assert r_fine.status_code == 200 and len(r_fine.json()["results"]) == 2
        assert r_poisoned.status_code == 500
        body = r_poisoned.json()
        assert body["object"] == "error" and "RuntimeError" in body["message"] and "request id" in body["message"]
        assert r_poisoned.headers["x-request-id"] in body["message"]
        assert backend.batches[1] == 4  # the two queued requests did share a batch
        assert server.metric("openrerank_batch_failures_total", {"model": MODEL, "task": "rerank"}) >= 1


def test_host_memory_that_runs_short_in_the_runtime_answers_503_with_retry_after(tiny_model_dir):
    """Under `prlimit --as` OpenVINO's "Failed to allocate N bytes of memory" was answered 500 "the model failed on
    this request's input": the host's memory, not the input. The runtime is real; its infer request fails."""
    class ShortOfMemory:
        def infer(self, *args, **kwargs):
            raise RuntimeError("Exception from src/inference/src/cpp/infer_request.cpp:224:\n[CPU] Add node Check "
                               "'ptr' failed at cpu_memory.cpp:257:\nFailed to allocate 31457280 bytes of memory\n")

    cfg = ServerConfig(models=[f"{MODEL}={tiny_model_dir}"], backend="openvino", threads=1)
    with InProcessServer(cfg) as server, server.client() as c:
        runtime = server.backends[MODEL].runtime
        real = runtime._requests
        runtime._requests = queue.SimpleQueue()
        for _ in range(runtime.lanes):
            runtime._requests.put(ShortOfMemory())
        for path, body in (("/v1/ranking", nim_body("q", ["paris", "berlin"])),
                           ("/rerank", {"query": "q", "texts": ["paris", "berlin"]})):
            r = c.post(path, json=body)
            assert r.status_code == 503, (path, r.text)
            assert r.headers["Retry-After"] == "1" and "Failed to allocate 31457280 bytes" in r.text
            assert "out of host memory scoring a batch of 2 x" in r.text
        runtime._requests = real
        assert c.post("/v1/ranking", json=nim_body("q", ["a"])).status_code == 200  # memory back: served


def test_a_client_that_disconnects_frees_its_work(tiny_model_dir):
    with InProcessServer(config(tiny_model_dir, max_batch_size=4, max_queue=1)) as server, server.client() as c:
        backend = server.backends[MODEL]
        backend.hold()
        payload = httpx.Request("POST", f"{server.url}/v1/ranking",
                                json=nim_body("q", [f"passage {i}" for i in range(40)]))
        raw = (f"POST /v1/ranking HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
               f"content-length: {len(payload.content)}\r\n\r\n").encode() + payload.content
        with socket.create_connection(("127.0.0.1", server.port)) as sock:
            sock.sendall(raw)
            backend.wait_started()  # the first of its 10 batches is being scored
        until(lambda: server.metric("openrerank_client_disconnects_total") == 1, "the disconnect to be seen")
        cancelled = {"model": MODEL, "task": "rerank"}
        until(lambda: server.metric("openrerank_cancelled_total", cancelled) == 1, "the work to be cancelled")
        scheduler = server.app.state.models.get(MODEL).scheduler
        assert scheduler.pending == 0  # its slot is free although its batch is still running
        backend.release()
        r = c.post("/v1/ranking", json=nim_body("q", ["a"]))  # would be refused with max_queue=1 otherwise
        assert r.status_code == 200
        assert backend.batches == [4, 1]  # none of its 9 other batches ran
        assert server.metric("openrerank_requests_total", {"route": "/v1/ranking", "status": "499",
                                                         "protocol": "http"}) == 1


def test_a_client_that_leaves_while_sending_its_body_is_a_499_not_a_500(tiny_model_dir):
    """Before, the body guard returned without a word and the access log and metrics counted a 500: a
    client's doing set off server-error alerts."""
    with InProcessServer(config(tiny_model_dir)) as server:
        with socket.create_connection(("127.0.0.1", server.port)) as sock:
            sock.sendall(b"POST /v1/ranking HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                         b"content-length: 1000\r\n\r\n{\"query\": ")
            until(lambda: server.metric("openrerank_requests_in_flight") == 1, "the request to be read")
        until(lambda: server.metric("openrerank_client_disconnects_total") == 1, "the disconnect to be seen")
        statuses = {"route": "/v1/ranking", "protocol": "http"}
        until(lambda: server.metric("openrerank_requests_total", {**statuses, "status": "499"}) == 1,
              "the request to be counted as the client's")
        assert server.metric("openrerank_requests_total", {**statuses, "status": "500"}) == 0


@pytest.mark.parametrize("path", ["/v1/ranking", "/v1/score"])
def test_the_deadline_counts_from_arrival(tiny_model_dir, path):
    """A request that waited (here: for the body) has less time left; the deadline covers everything."""
    with InProcessServer(config(tiny_model_dir, request_timeout=3.0)) as server:
        backend = server.backends[MODEL]
        body = httpx.Request("POST", "http://x/", json=DIALECTS["nim" if path == "/v1/ranking" else "score"][1]).content
        with socket.create_connection(("127.0.0.1", server.port)) as sock:
            sock.sendall(f"POST {path} HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                         f"content-length: {len(body)}\r\n\r\n".encode())
            time.sleep(2.0)  # two thirds of the budget go by before the body arrives
            backend.hold()
            sent = time.monotonic()
            sock.sendall(body)
            backend.wait_started()
            sock.settimeout(30)
            answer = sock.recv(65536).decode()
            waited = time.monotonic() - sent
            backend.release()
        assert answer.startswith("HTTP/1.1 504"), answer
        assert waited < 2.5  # about the 1 s left, not a fresh 3 s


def test_anything_unexpected_is_a_500_in_the_dialect_shape_with_the_request_id(tiny_model_dir, caplog):
    with InProcessServer(config(tiny_model_dir, api_key="k")) as server, server.client() as c:
        model = server.app.state.models.get(MODEL)

        async def broken(*args, **kw):
            raise ZeroDivisionError("a bug")

        model.rerank_many = broken
        auth = {"Authorization": "Bearer k"}
        r = c.post("/v1/rerank", json=DIALECTS["cohere"][1], headers={**auth, "x-request-id": "trace-42"})
        message = "internal server error (request id trace-42)"
        assert r.status_code == 500 and r.json() == {"message": message, "detail": message}
        assert r.headers["x-request-id"] == "trace-42"
        r = c.post("/rerank", json=DIALECTS["tei"][1], headers=auth)
        assert r.status_code == 424 and r.json()["error_type"] == "Backend"
        assert "request id" in r.json()["error"] and "a bug" not in r.text  # details only in the log
        # hygiene: metadata sits behind the key like every non-health route
        assert c.get("/v1/metadata").status_code == 401
        assert c.get("/v1/metadata", headers=auth).status_code == 200
    logged = [rec.getMessage() for rec in caplog.records if rec.name == "openrerank.server.middleware"]
    assert any("ZeroDivisionError" in m and "trace-42" in m for m in logged)


def test_no_thread_to_start_is_a_retryable_overload_not_a_500(tiny_model_dir, caplog):
    """At the process's thread limit (`ulimit -u 12`, 50 concurrent requests) asyncio's worker threads could not
    start: 40 requests got 500 "internal server error", each with a traceback in the log."""
    with InProcessServer(config(tiny_model_dir)) as server, server.client() as c:
        model = server.app.state.models.get(MODEL)

        async def no_thread(*args, **kw):
            raise RuntimeError("can't start new thread")

        model.rerank_many = no_thread
        r = c.post("/v1/ranking", json=DIALECTS["nim"][1])
        assert r.status_code == 503 and r.headers["retry-after"] == "1", r.text
        assert r.json()["object"] == "error" and "no thread could be started" in r.text
        r = c.post("/rerank", json=DIALECTS["tei"][1])
        assert r.status_code == 429 and r.json()["error_type"] == "Overloaded", r.text
    logged = [rec for rec in caplog.records if rec.name == "openrerank.server.middleware"]
    assert logged and all(rec.levelname == "WARNING" and rec.exc_info is None for rec in logged)
    assert "thread limit" in logged[0].getMessage()


def test_a_score_request_with_several_queries_is_one_admission_unit(tiny_model_dir):
    """vLLM score groups pairs by distinct text_1; they used to take one queue slot each (3 queries ->
    503 on an idle server with --max-queue 2)."""
    with InProcessServer(config(tiny_model_dir, max_queue=1)) as server, server.client() as c:
        r = c.post("/v1/score", json={"text_1": ["paris", "berlin", "river"], "text_2": ["a", "b", "c"]})
        assert r.status_code == 200, r.text
        assert [d["index"] for d in r.json()["data"]] == [0, 1, 2]
        assert server.backends[MODEL].batches == [3]  # one submission, one batch


def test_an_internal_error_answers_in_the_form_the_route_chose(tiny_model_dir, caplog):
    """/rerank serves two forms: an Infinity request's unexpected error is Infinity's 500, not TEI's 424."""
    with InProcessServer(config(tiny_model_dir)) as server, server.client() as c:
        model = server.app.state.models.get(MODEL)

        async def broken(*args, **kw):
            raise ZeroDivisionError("a bug")

        model.rerank_many = broken
        r = c.post("/rerank", json={"query": "q", "documents": ["paris", "berlin"]})
        assert r.status_code == 500, r.text
        assert r.json()["error"]["code"] == 500 and "request id" in r.json()["error"]["message"]
        r = c.post("/rerank", json=DIALECTS["tei"][1])
        assert r.status_code == 424 and r.json()["error_type"] == "Backend"  # the TEI form keeps TEI's 424


def test_only_client_mistakes_in_a_body_are_a_400(tiny_model_dir, monkeypatch, caplog):
    """FastAPI turns any exception while parsing a body into 400 "error parsing the body": a MemoryError or a
    bug must surface as a logged 500, a body nested too deeply is the client's (400, said so)."""
    import json
    import types

    import starlette.requests

    def loads(body, *args, **kw):
        if b"boom" in body:
            raise MemoryError()
        return json.loads(body, *args, **kw)

    from openrerank.server.dialects import list_bounds

    parser = types.SimpleNamespace(loads=loads)
    monkeypatch.setattr(starlette.requests, "json", parser)
    monkeypatch.setattr(list_bounds, "json", parser)  # the routes that count lists parse the body first
    with InProcessServer(config(tiny_model_dir)) as server, server.client() as c:
        r = c.post("/v1/ranking", json={"query": {"text": "boom"}, "passages": [{"text": "a"}]})
        assert r.status_code == 500 and r.json()["object"] == "error" and "request id" in r.json()["message"]
        r = c.post("/v1/ranking", content=b"[" * 100_000 + b"]" * 100_000,
                   headers={"content-type": "application/json"})
        assert r.status_code == 400 and "nested too deeply" in r.json()["message"]
        r = c.post("/v1/ranking", content=b'{"query": ', headers={"content-type": "application/json"})
        assert r.status_code == 400 and "not valid JSON" in r.json()["message"]
    logged = [rec.getMessage() for rec in caplog.records if rec.name == "openrerank.server.middleware"]
    assert any("MemoryError" in m for m in logged)


def test_a_tokenizer_failure_is_not_retried_with_another_truncation(tiny_model_dir, monkeypatch):
    """text/pairs.py retried a pair tokenization with `longest_first` after any exception, so a tokenizer bug
    (or a MemoryError) answered 200 with differently cut pairs; now only a window-filling query is handled, up
    front, and anything else the tokenizer raises is a logged 500."""
    from transformers import PreTrainedTokenizerBase

    call = PreTrainedTokenizerBase.__call__
    truncations: list[str] = []

    def failing(self, *args, **kw):
        texts = [t for a in args if isinstance(a, list) for t in a if isinstance(t, str)]
        if any("POISON" in t for t in texts) and kw.get("truncation"):
            truncations.append(kw["truncation"])
            if kw["truncation"] == "only_second":
                raise RuntimeError("a tokenizer bug")
        return call(self, *args, **kw)

    monkeypatch.setattr(PreTrainedTokenizerBase, "__call__", failing)
    with InProcessServer(config(tiny_model_dir)) as server, server.client() as c:
        r = c.post("/v1/ranking", json=nim_body("q", ["POISON river"], truncate="END"))
    assert r.status_code == 500 and r.json()["object"] == "error" and "request id" in r.json()["message"], r.text
    assert truncations == ["only_second"]  # tried once, never again with another truncation


def test_waiting_past_the_deadline_for_another_requests_passages_answers_504(tiny_model_dir):
    """With the score cache, a request whose passages a concurrent request is scoring waits for them (in the
    cache, not the scheduler): past its own deadline that wait is a 504 like any other, counted as one."""
    from openrerank.core.requests import RerankRequest

    with InProcessServer(config(tiny_model_dir, request_timeout=1.0, score_cache_mb=1)) as server, \
            server.client() as c:
        backend = server.backends[MODEL]
        backend.hold()
        served = server.app.state.models.get(MODEL)
        # the owner of "paris" has all the time it needs; its batch is held
        owner = in_thread(lambda: server.call(lambda: served.rerank(RerankRequest("q", ["paris"]),
                                                                    deadline=time.monotonic() + 60)))
        backend.wait_started()
        r = c.post("/v1/ranking", json=nim_body("q", ["paris"]))
        assert r.status_code == 504 and "timed out" in r.text, r.text
        assert backend.batches == [1]  # it waited for the owner's score, never reaching the model itself
        deadline = {"model": MODEL, "task": "rerank", "reason": "deadline"}
        assert server.metric("openrerank_rejected_total", deadline) == 1
        backend.release()
        assert len(owner().logits) == 1

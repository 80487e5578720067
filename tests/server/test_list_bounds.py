"""A request over a count limit is refused by its count alone, before any element is validated.

Each body below is over its route's bound AND holds only invalid elements. Validated first (as it was), it got
the elements' validation error, after pydantic had walked every element on the event loop: an 8 MB body of
600k one-letter passages took 14 s, with `/v1/health/live` unanswered meanwhile. Counted first, it gets the
count refusal in the dialect's shape, whatever its elements hold: that the answer names the count and not an
element is what shows no element was looked at (no timing involved).
"""

from __future__ import annotations

import asyncio
import gc
import re
import threading
import time
from collections.abc import Callable
from typing import Any

import orjson
import pytest

from openrerank.server import body_budget
from openrerank.server.config import ServerConfig
from openrerank.server.dialects import list_bounds, nim
from openrerank.server.dialects.list_bounds import MAX_UNKNOWN_FIELDS
from openrerank.wire.tei import TeiRerankRequest
from tests.server.faults import WAIT_S, HeldCall, InProcessServer, in_thread, live_while_held

#: tiny_server: --max-passages 8, --max-inputs at its default (2048); the multi-vector route's own bound is 64.
OVER = 9


def message(body: dict | list) -> str:
    """The message of any dialect's error shape."""
    if isinstance(body.get("error"), dict):  # Infinity
        return body["error"]["message"]
    return body.get("message") or body["error"]  # NIM, Cohere, score / TEI


@pytest.mark.parametrize(("path", "body", "status", "expected"), [
    ("/v1/ranking", {"query": {"text": "q"}, "passages": [{"text": ""}] * OVER}, 400,
     "Number of passages (9) exceeds the maximum of 8 (--max-passages)"),
    ("/v1/rerank", {"query": "q", "documents": [1] * OVER}, 400,
     "Number of passages (9) exceeds the maximum of 8 (--max-passages)"),
    ("/v2/rerank", {"model": "tiny", "query": "q", "documents": [1] * OVER}, 400,
     "Number of passages (9) exceeds the maximum of 8 (--max-passages)"),
    ("/rerank", {"query": "q", "texts": [1] * OVER}, 422,
     "Number of passages (9) exceeds the maximum of 8 (--max-passages)"),
    ("/rerank", {"query": "q", "documents": [1] * OVER}, 422,
     "Number of passages (9) exceeds the maximum of 8 (--max-passages)"),
    ("/v1/score", {"text_1": "q", "text_2": [1] * OVER}, 400,
     "Number of pairs (9) exceeds the maximum of 8 (--max-passages)"),
    ("/score", {"text_1": [1] * OVER, "text_2": [1] * OVER}, 400,
     "Number of pairs (9) exceeds the maximum of 8 (--max-passages)"),
    ("/v1/embeddings", {"input": [""] * 2049}, 400,
     "Number of inputs (2049) exceeds the maximum of 2048 (--max-inputs)"),
    ("/v1/embeddings/multi_vector", {"input": [""] * 65, "input_type": "passage"}, 413,
     "Number of inputs (65) exceeds the maximum of 64 per multi-vector request; send them in several requests"),
])
def test_an_over_count_request_is_refused_before_its_elements_are_validated(tiny_server, path, body, status,
                                                                           expected):
    with tiny_server.client() as c:
        r = c.post(path, json=body)
    assert r.status_code == status, r.text
    assert message(r.json()) == expected


#: env_server: OPENRERANK_MAX_PASSAGES='3', OPENRERANK_MAX_INPUTS='3' (tests/conftest.py's LIMITS_ENV).
@pytest.mark.parametrize(("path", "body", "status", "expected"), [
    ("/v1/ranking", {"query": {"text": "q"}, "passages": [{"text": ""}] * 4}, 400,
     "Number of passages (4) exceeds the maximum of 3 (OPENRERANK_MAX_PASSAGES='3')"),
    ("/v1/rerank", {"query": "q", "documents": [1] * 4}, 400,
     "Number of passages (4) exceeds the maximum of 3 (OPENRERANK_MAX_PASSAGES='3')"),
    ("/rerank", {"query": "q", "texts": [1] * 4}, 422,  # TEI: the route parses the body itself (parse_body)
     "Number of passages (4) exceeds the maximum of 3 (OPENRERANK_MAX_PASSAGES='3')"),
    ("/rerank", {"query": "q", "documents": [1] * 4}, 422,  # Infinity: likewise
     "Number of passages (4) exceeds the maximum of 3 (OPENRERANK_MAX_PASSAGES='3')"),
    ("/v1/score", {"text_1": "q", "text_2": [1] * 4}, 400,
     "Number of pairs (4) exceeds the maximum of 3 (OPENRERANK_MAX_PASSAGES='3')"),
    ("/v1/embeddings", {"input": [""] * 4}, 400,
     "Number of inputs (4) exceeds the maximum of 3 (OPENRERANK_MAX_INPUTS='3')"),
])
def test_a_count_refusal_names_the_variable_that_set_the_limit(env_server, path, body, status, expected):
    """A limit set by OPENRERANK_MAX_PASSAGES was named `--max-passages`, a flag the operator never typed."""
    with env_server.client() as c:
        r = c.post(path, json=body)
    assert r.status_code == status, r.text
    assert message(r.json()) == expected


def many(n: int) -> dict[str, int]:
    return {f"k{i}": 0 for i in range(n)}


#: Each body holds 1,000 unknown keys where its model forbids them, and an invalid value: validated, it got an
#: error per key (600k keys: ~10 s of work while /v1/health/live went unanswered) and the value's error too.
@pytest.mark.parametrize(("path", "body", "named"), [
    ("/v1/ranking", {"query": {"text": "q"}, "passages": [{"text": "p"}], "truncate": "BAD", **many(1000)},
     "Unknown field(s) 'k0', 'k1', 'k2', 'k3', 'k4', 'k5', 'k6', 'k7'; allowed fields are: model, query, passages"),
    ("/v1/ranking", {"query": {"text": "q"}, "passages": [{"text": "p"}, {"text": "p", **many(1000)}],
                     "truncate": "BAD"}, "unknown field 'passages.1.k0'; unknown field 'passages.1.k1'"),
    ("/v1/embeddings", {"input": "p", "truncate": "BAD", **many(1000)},
     "Unknown field(s) 'k0', 'k1', 'k2', 'k3', 'k4', 'k5', 'k6', 'k7'; allowed fields are: input, model"),
])
def test_many_unknown_fields_are_refused_by_name_before_the_body_is_validated(tiny_server, path, body, named):
    with tiny_server.client() as c:
        r = c.post(path, json=body)
    assert r.status_code == 400, r.text
    msg = message(r.json())
    assert named in msg and msg.endswith(f"; and {1000 - MAX_UNKNOWN_FIELDS} more unknown fields")
    assert len(re.findall(r"[.']k\d", msg)) == MAX_UNKNOWN_FIELDS and "truncate:" not in msg  # no validation ran


def test_up_to_the_bound_unknown_fields_get_the_validation_answer_and_cohere_ignores_them(tiny_server):
    with tiny_server.client() as c:
        few = c.post("/v1/ranking", json={"query": {"text": "q"}, "passages": [{"text": "p"}], "truncate": "BAD",
                                          **many(MAX_UNKNOWN_FIELDS)})
        cohere = c.post("/v2/rerank", json={"model": "tiny", "query": "q", "documents": ["p"], **many(1000)})
    assert few.status_code == 400 and "more unknown" not in few.json()["message"]
    assert few.json()["message"].count("'k") == MAX_UNKNOWN_FIELDS and "truncate:" in few.json()["message"]
    assert cohere.status_code == 200, cohere.text


def test_a_token_id_list_is_one_input_not_a_count(tiny_server):
    """OpenAI's `input` as one text's token ids is not counted as inputs: it gets its own refusal."""
    with tiny_server.client() as c:
        r = c.post("/v1/embeddings", json={"input": [1] * 3000})
    assert r.status_code == 400 and "token ids is not supported" in r.json()["message"]


# A legal body this big (over `list_bounds.OFF_LOOP_BYTES`) is validated on a worker thread.
LONG = "word " * 2500  # 12.5 kB a passage: 8 of them make a 100 kB body
BIG = {
    "/v1/ranking": {"query": {"text": "q"}, "passages": [{"text": LONG}] * 8, "truncate": "END"},
    "/rerank": {"query": "q", "texts": [LONG] * 8, "truncate": True},
}


@pytest.mark.parametrize("path", sorted(BIG))
def test_a_big_body_is_validated_while_the_server_answers_others(tiny_model_dir, monkeypatch, path):
    """Validating a legal 8 MB body took a quarter of a second on the event loop, during which no probe was
    answered. Here the validation is held: the liveness probe must still be answered meanwhile (validated on the
    loop, it could not be until the validation ended), and the held request then answers normally."""
    config = ServerConfig(models=[f"tiny={tiny_model_dir}"], backend="torch", threads=1)
    with InProcessServer(config) as server:
        if path == "/rerank":  # the TEI route parses and validates the body itself
            held = HeldCall(TeiRerankRequest.model_validate)
            monkeypatch.setattr(TeiRerankRequest, "model_validate", held)
        else:
            route = next(r for r in nim.router.routes if r.path == path)
            held = HeldCall(route.body_field.validate)
            monkeypatch.setattr(route.body_field, "validate", held)
        r = live_while_held(server, held, lambda c: c.post(path, json=BIG[path]), "validated")
        assert len(r.json()["rankings"] if path == "/v1/ranking" else r.json()) == 8


class CountingValidation(HeldCall):
    """A held validation that also records how many run at once and whether the garbage collector ran."""

    def __init__(self, validate: Callable[..., Any]) -> None:
        super().__init__(validate)
        self.inside = self.most_inside = 0
        self.gc_enabled: list[bool] = []
        self.lock = threading.Lock()

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        with self.lock:
            self.inside += 1
            self.most_inside = max(self.most_inside, self.inside)
            self.gc_enabled.append(gc.isenabled())
        try:
            return super().__call__(*args, **kwargs)
        finally:
            with self.lock:
                self.inside -= 1


def test_big_bodies_are_worked_one_at_a_time_with_the_collector_paused(tiny_model_dir, monkeypatch):
    """16 bodies of 2.8M empty lists, each parsed on its own worker thread, kept `/v1/health/live` unanswered for
    28-42 s: the parser holds the GIL throughout, and the garbage collector made 90% of each parse. Here three big
    bodies arrive while the first one's work is held: the others must wait for their turn (before, each went to a
    thread of its own and all three were inside at once), the liveness probe is answered meanwhile, and the work
    runs with the collector paused."""
    config = ServerConfig(models=[f"tiny={tiny_model_dir}"], backend="torch", threads=1)
    route = next(r for r in nim.router.routes if r.path == "/v1/ranking")
    held = CountingValidation(route.body_field.validate)
    monkeypatch.setattr(route.body_field, "validate", held)
    with InProcessServer(config) as server, server.client() as c:
        answers = [in_thread(lambda: server.client().post("/v1/ranking", json=BIG["/v1/ranking"]))
                   for _ in range(3)]
        try:
            assert held.entered.wait(WAIT_S), "no body was validated"
            deadline = time.monotonic() + 2.0  # time enough for the other two to be read and go to a thread
            while time.monotonic() < deadline and held.most_inside < 2:
                time.sleep(0.05)
            live = c.get("/v1/health/live", timeout=5)
        finally:
            held.released.set()
        assert held.most_inside == 1, f"{held.most_inside} big bodies were worked on at once"
        assert live.status_code == 200
        assert [a().status_code for a in answers] == [200, 200, 200]
    assert held.gc_enabled == [False, False, False]
    assert gc.isenabled()


def _run_big(work: Callable[[], Any]) -> Any:
    return list_bounds.off_loop(list_bounds.OFF_LOOP_BYTES, work)


def test_a_cancelled_request_keeps_the_turn_until_its_work_ends():
    """A request cancelled while its body is parsed (its client gone) leaves the parse running on its thread: the
    next body's work must not start beside it, nor before the loop had its turn (`LOOP_TURN_S`)."""
    first_in, first_go = threading.Event(), threading.Event()
    ended: list[float] = []

    def first() -> str:
        first_in.set()
        assert first_go.wait(WAIT_S)
        ended.append(time.monotonic())
        return "first"

    async def scenario() -> float:
        abandoned = asyncio.ensure_future(_run_big(first))
        await asyncio.to_thread(first_in.wait, WAIT_S)
        abandoned.cancel()
        second = asyncio.ensure_future(_run_big(time.monotonic))
        await asyncio.sleep(0.2)
        assert not second.done(), "the second body's work started while the first's still ran"
        first_go.set()
        started = await second
        assert abandoned.cancelled()
        return started

    started = asyncio.run(scenario())
    assert started - ended[0] >= list_bounds.LOOP_TURN_S * 0.9


def test_a_cancelled_requests_refused_body_is_not_logged_whole():
    """A client that left during its body's parse turn: the parse's refusal (a RequestValidationError holding the
    whole body) was never retrieved, and asyncio logged it at ERROR with its repr, 9 MB for a 7 MB body."""
    started, go = threading.Event(), threading.Event()

    def refused() -> None:
        started.set()
        assert go.wait(WAIT_S)
        raise ValueError("the body, " + "x" * 1000)

    async def scenario() -> list[dict]:
        reported: list[dict] = []
        asyncio.get_running_loop().set_exception_handler(lambda _loop, context: reported.append(context))
        abandoned = asyncio.ensure_future(_run_big(refused))
        await asyncio.to_thread(started.wait, WAIT_S)
        abandoned.cancel()
        go.set()
        await _run_big(lambda: None)  # its turn comes once the refused work has ended
        gc.collect()  # an unretrieved exception is reported when its future is collected
        await asyncio.sleep(0)
        return reported

    assert asyncio.run(scenario()) == []


def test_tei_parses_a_big_body_off_the_event_loop(tiny_model_dir, monkeypatch):
    """TEI's /rerank parses its body itself (two forms share the path), with orjson on the event loop: 16 bodies of
    2.8M empty lists kept `/v1/health/live` unanswered for 79 s. Its parse is held here: the probe must be answered
    meanwhile, and the request then answers normally."""
    config = ServerConfig(models=[f"tiny={tiny_model_dir}"], backend="torch", threads=1)
    parse = orjson.loads

    def big_held(data: Any) -> Any:
        return held(data) if len(data) >= list_bounds.OFF_LOOP_BYTES else parse(data)

    held = HeldCall(parse)
    monkeypatch.setattr(orjson, "loads", big_held)
    with InProcessServer(config) as server:
        r = live_while_held(server, held, lambda c: c.post("/rerank", json=BIG["/rerank"]), "parsed")
        assert len(r.json()) == 8


def test_the_routes_give_a_bodys_bytes_back_once_they_have_parsed_it(tiny_model_dir, monkeypatch):
    """A body counts against `--max-body-bytes-in-flight` until a route has parsed it (admission bounds it from
    there): the routes that parse bodies themselves must say so, or a body would count until its answer."""
    config = ServerConfig(models=[f"tiny={tiny_model_dir}"], backend="torch", threads=1)
    released: list[str] = []
    release = body_budget.release

    def spy(scope: dict) -> None:
        released.append(scope["path"])
        release(scope)

    monkeypatch.setattr(body_budget, "release", spy)
    with InProcessServer(config) as server, server.client() as c:
        for path in ("/v1/ranking", "/rerank"):
            assert c.post(path, json=BIG[path]).status_code == 200
    assert released == ["/v1/ranking", "/rerank"]

"""The request bodies held at once are bounded (`--max-body-bytes-in-flight`), and every way a request ends gives
its bytes back.

Nothing bounded them: 96 connections each sending 8 MiB less 60 bytes, then waiting, held 8 MiB apiece (RSS +773
MiB) for `--body-timeout`. Here the body guard runs alone around a stand-in route, with hand-driven clients, so
which body is held, refused or released is exact (no model, no timing)."""

from __future__ import annotations

import asyncio
import gzip
import json
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

import openrerank.server.app  # noqa: F401  (registers every dialect's error shape)
from openrerank.observe.metrics import Metrics
from openrerank.server import body_budget
from openrerank.server.body_budget import BodyBudget
from openrerank.server.body_guard import BodyGuardMiddleware
from openrerank.server.config import BODIES_IN_FLIGHT, ServerConfig

LIMIT = 1000  # --max-body-bytes
BUDGET = 2500  # --max-body-bytes-in-flight: two bodies of 1,000 bytes and a half


class Client:
    """One request to the guard: its body is sent in the parts the test gives (`send`), or the client goes away."""

    def __init__(self, guard: BodyGuardMiddleware, path: str = "/v1/ranking", length: int | None = None,
                 headers: list[tuple[bytes, bytes]] | None = None) -> None:
        head = [(b"content-type", b"application/json"), *(headers or [])]
        if length is not None:
            head.append((b"content-length", str(length).encode()))
        self.scope = {"type": "http", "method": "POST", "path": path, "headers": head}
        self.parts: asyncio.Queue[dict] = asyncio.Queue()
        self.answer: list[dict] = []
        self.task = asyncio.ensure_future(guard(self.scope, self.parts.get, self._send))

    async def _send(self, message: dict) -> None:
        self.answer.append(message)

    async def send(self, data: bytes, more: bool = True) -> None:
        await self.parts.put({"type": "http.request", "body": data, "more_body": more})
        await settle()

    async def leave(self) -> None:
        await self.parts.put({"type": "http.disconnect"})
        await settle()

    @property
    def status(self) -> int | None:
        return self.answer[0]["status"] if self.answer else None

    def header(self, name: bytes) -> bytes | None:
        return dict(self.answer[0]["headers"]).get(name)

    def message(self) -> str:
        return json.loads(self.answer[1]["body"])["message"]


async def settle() -> None:
    """Let every task run as far as it can (the guard inflates on a worker thread)."""
    for _ in range(20):
        await asyncio.sleep(0.01)


class Route:
    """The app behind the guard: reads the body, then parses it (releasing its bytes, as the routes do) unless
    told not to, and holds each request until `finish`."""

    def __init__(self, parse: bool = True) -> None:
        self.parse = parse
        self.bodies: list[bytes] = []
        self.done = asyncio.Event()
        self.fail = False

    async def __call__(self, scope: dict, receive: Callable[[], Awaitable[dict]], send: Any) -> None:
        self.bodies.append((await receive())["body"])
        if self.parse:
            body_budget.release(scope)
        await self.done.wait()
        if self.fail:
            raise RuntimeError("the route failed")
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})


def guard(route: Route, body_timeout: float = ServerConfig.body_timeout) -> BodyGuardMiddleware:
    return BodyGuardMiddleware(route, max_bytes=LIMIT, body_timeout=body_timeout, metrics=Metrics(),
                               budget=BodyBudget(BUDGET))


def refusals(g: BodyGuardMiddleware) -> float:
    return g.metrics.rejected.labels("", "rerank", "bodies_in_flight")._value.get()


def test_bodies_are_held_up_to_the_budget_the_next_is_refused_and_a_parse_gives_them_back():
    async def scenario() -> None:
        route = Route(parse=False)
        g = guard(route)
        a, b = Client(g, length=1000), Client(g, length=1000)
        await a.send(b"x" * 600)
        await b.send(b"x" * 600)
        assert g.budget.held == 1200  # what has arrived
        c = Client(g, length=1000)
        await c.send(b"w" * 600)
        await a.send(b"x" * 400, more=False)  # a is read whole, not parsed: 2,200 held
        await c.send(b"w" * 400)  # would be 2,600
        assert c.status == 503 and c.task.done(), "the body passing the budget was not refused at once"
        assert c.header(b"retry-after") == b"1" and c.header(b"connection") == b"close"
        assert "--max-body-bytes-in-flight" in c.message()
        assert "bodies of 1600 bytes" in c.message() and "this one's 1000 bytes" in c.message(), c.message()
        assert refusals(g) == 1 and g.budget.held == 1600
        small = Client(g, length=500)  # within what is left
        await small.send(b"y" * 500, more=False)
        assert g.budget.held == 2100 and route.bodies == [b"x" * 1000, b"y" * 500]
        route.parse = True
        await b.send(b"x" * 400, more=False)
        assert g.budget.held == 1500, "a parsed body's bytes were not given back, or a body not parsed's were"
        route.done.set()
        await settle()
        assert small.status == a.status == b.status == 200 and g.budget.held == 0

    asyncio.run(scenario())


def test_headers_alone_hold_nothing():
    """Before, a body counted from its declared length: eight connections that declared 8 MiB each and sent
    nothing held the whole budget until --body-timeout, and every other POST was refused."""
    async def scenario() -> None:
        route = Route(parse=True)
        g = guard(route)
        idle = [Client(g, length=1000) for _ in range(5)]  # 5,000 bytes declared, twice the budget
        await settle()
        assert g.budget.held == 0 and not any(c.task.done() for c in idle)
        a = Client(g, length=1000)
        await a.send(b"x" * 1000, more=False)
        route.done.set()
        await settle()
        assert a.status == 200
        for c in idle:
            await c.leave()
        await asyncio.gather(*(c.task for c in idle), return_exceptions=True)
        assert g.budget.held == 0

    asyncio.run(scenario())


def test_the_route_parsing_a_body_gives_its_bytes_back_before_it_answers():
    async def scenario() -> None:
        route = Route(parse=True)
        g = guard(route)
        a = Client(g, length=1000)
        await a.send(b"x" * 1000, more=False)
        assert route.bodies and g.budget.held == 0 and a.status is None  # parsed, still being answered
        route.done.set()
        await settle()
        assert a.status == 200

    asyncio.run(scenario())


@pytest.mark.parametrize("ending", ["disconnect", "timeout", "too_large", "refused", "route_fails", "cancelled"])
def test_every_way_a_request_ends_gives_its_bytes_back(ending):
    async def scenario() -> None:
        route = Route(parse=False)
        g = guard(route, body_timeout=1.0 if ending == "timeout" else 60.0)
        chunked = ending == "too_large"  # no declared length: counted as it arrives, 413 past --max-body-bytes
        a = Client(g, length=None if chunked else 1000)
        await a.send(b"x" * 900)
        assert g.budget.held == 900
        if ending == "disconnect":
            await a.leave()
        elif ending == "timeout":
            await asyncio.sleep(1.2)
            assert a.status == 408
        elif ending == "too_large":
            await a.send(b"x" * 200)
            assert a.status == 413
        elif ending == "refused":  # bodies without a length, the second refused as it passes the budget
            other, refused = Client(g, length=None), Client(g, length=None)
            await other.send(b"y" * 800)
            await refused.send(b"z" * 900)
            assert refused.status == 503 and g.budget.held == 1700
            await refused.task
            await other.leave()
            await a.leave()
        elif ending == "route_fails":
            route.fail = True
            route.done.set()
            await a.send(b"x" * 100, more=False)
        else:
            a.task.cancel()
        await asyncio.gather(a.task, return_exceptions=True)
        assert g.budget.held == 0

    asyncio.run(scenario())


def test_an_inflated_body_counts_at_its_decoded_size():
    async def scenario() -> None:
        route = Route(parse=False)
        g = guard(route)
        body = b"[" + b"0," * 498 + b"00]"  # 1,000 bytes, a few dozen deflated
        packed = gzip.compress(body)
        a = Client(g, length=len(packed), headers=[(b"content-encoding", b"gzip")])
        await a.send(packed, more=False)
        assert route.bodies == [body] and g.budget.held == 1000
        b, c = (Client(g, length=len(packed), headers=[(b"content-encoding", b"gzip")]) for _ in range(2))
        await b.send(packed, more=False)
        await c.send(packed, more=False)
        assert c.status == 503 and len(route.bodies) == 2, "the third inflated body passed the budget"
        route.done.set()
        await settle()
        assert g.budget.held == 0

    asyncio.run(scenario())


def test_the_budget_defaults_to_eight_bodies_and_may_not_be_below_one():
    assert ServerConfig().body_bytes_in_flight == BODIES_IN_FLIGHT * ServerConfig().max_body_bytes == 64 * 2**20
    assert ServerConfig(max_body_bytes=1000).body_bytes_in_flight == 8000
    assert ServerConfig(max_body_bytes_in_flight=5000).body_bytes_in_flight == 5000
    with pytest.raises(ValueError, match=r"--max-body-bytes-in-flight 1000: must be at least --max-body-bytes 2000"):
        ServerConfig(max_body_bytes=2000, max_body_bytes_in_flight=1000).validate()


def test_the_guard_has_no_body_timeout_of_its_own():
    """`--body-timeout`'s default is ServerConfig's alone: the guard had its own 60.0 beside it, which a changed
    ServerConfig default would silently have left behind wherever the guard was built without the setting."""
    with pytest.raises(TypeError, match="body_timeout"):
        BodyGuardMiddleware(Route(), max_bytes=LIMIT, budget=BodyBudget(BUDGET))  # type: ignore[call-arg]


def test_a_real_route_gives_a_parsed_bodys_bytes_back_while_it_waits_for_the_model(tiny_model_dir):
    """The routes release a body's bytes once parsed (`list_bounds.BoundedRoute`): a request waiting for the model
    does not hold --max-body-bytes-in-flight, so a second body of the same size gets in, not a 503."""
    from tests.server.faults import InProcessServer, in_thread, until
    from tests.support import nim_body

    config = ServerConfig(models=[f"tiny={tiny_model_dir}"], backend="torch", threads=1,
                          max_body_bytes=20_000, max_body_bytes_in_flight=20_000)
    body = nim_body("q", ["w " * 6000], truncate="END")  # ~12 kB: two fit only if the first's bytes went back
    with InProcessServer(config) as server:
        backend = server.backends["tiny"]
        scheduler = server.app.state.models.get("tiny").scheduler
        backend.hold()
        first = in_thread(lambda: server.client().post("/v1/ranking", json=body))
        backend.wait_started()
        second = in_thread(lambda: server.client().post("/v1/ranking", json=body))
        refused = {"model": "", "task": "rerank", "reason": "bodies_in_flight"}
        until(lambda: scheduler.pending == 2 or server.metric("openrerank_rejected_total", refused) > 0,
              "the second request admitted or refused")
        backend.release()
        assert first().status_code == 200
        r = second()
        assert r.status_code == 200, r.text

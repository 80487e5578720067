"""When the worker waits `batch_wait_ms` for company (`engine/worker.py`, "Waiting for company"): only while
another request is queued or arriving (`Scheduler.arriving`: being tokenized). A lone request on an idle server
used to wait the whole wait for nobody (1 ms by default, 3.5% of a 1-passage request).

The wait here is two minutes: a worker that waits when it should not never answers within the test, and one that
should wait but does not splits requests that must share a batch. Nothing is timed.
"""

from __future__ import annotations

import asyncio

import pytest

from openrerank.engine.batching import BatchPolicy
from openrerank.engine.errors import QueueFullError
from openrerank.engine.scheduler import Scheduler, SchedulerConfig
from tests.engine.sched_fakes import FakeScorer, Ids, expected, until

LONG_WAIT_MS = 120_000.0
#: Seconds a request that should be planned at once is given: the worker answers in milliseconds, and one
#: waiting for company would take LONG_WAIT_MS.
PROMPT_S = 10.0


def make(backend: FakeScorer, **cfg) -> Scheduler:
    cfg = {"batch_wait_ms": LONG_WAIT_MS, **cfg}
    return Scheduler(backend, SchedulerConfig(BatchPolicy(max_size=4), **cfg), name="m")


async def request(sched: Scheduler, items: list) -> object:
    """As a served model sends one: counted as arriving while tokenized (on a worker thread), then submitted."""
    with sched.arriving("rerank"):
        await asyncio.to_thread(lambda: None)
    return await sched.submit(items)


def test_a_lone_request_is_planned_without_waiting_for_company() -> None:
    backend, ids = FakeScorer(), Ids()
    items = ids.items(3, 5)

    async def main() -> None:
        sched = make(backend)
        await sched.start()
        try:
            out = await asyncio.wait_for(request(sched, items), PROMPT_S)  # before: waited LONG_WAIT_MS
            assert (out.scores == expected(items)).all()
            second = ids.items(4)  # and the next one on the idle server too
            out = await asyncio.wait_for(request(sched, second), PROMPT_S)
            assert (out.scores == expected(second)).all()
        finally:
            await sched.stop()

    asyncio.run(main())
    assert len(backend.batches) == 2


def test_requests_arriving_together_still_share_a_batch() -> None:
    """The others are still being tokenized when the first is queued: it waits for them (here until they fill
    the batch), as it did before; a worker that never waited would run the first alone."""
    backend, ids = FakeScorer(), Ids()
    requests = [ids.items(4) for _ in range(4)]

    async def main() -> None:
        sched = make(backend)
        await sched.start()
        try:
            gate = asyncio.Event()

            async def slower(items: list) -> object:
                with sched.arriving("rerank"):
                    await gate.wait()  # tokenizing
                return await sched.submit(items)

            tasks = [asyncio.create_task(slower(r)) for r in requests[1:]]
            await asyncio.sleep(0)  # they are arriving
            tasks.insert(0, asyncio.create_task(request(sched, requests[0])))
            await until(lambda: sched.queued == 1, "the first queued")
            await asyncio.sleep(0.05)
            assert backend.batches == []  # (a wrong worker may plan later than this: it cannot fail wrongly)
            gate.set()
            outs = await asyncio.wait_for(asyncio.gather(*tasks), PROMPT_S)
        finally:
            await sched.stop()
        for r, out in zip(requests, outs, strict=True):
            assert (out.scores == expected(r)).all()

    asyncio.run(main())
    assert [sorted(b) for b in backend.batches] == [sorted(it.input_ids[0] for r in requests for it in r)]


async def arriving_until(sched: Scheduler, gate: asyncio.Event) -> None:
    """A request being tokenized until `gate` is set, that then never submits."""
    with sched.arriving("rerank"):
        await gate.wait()


def test_requests_queued_together_wait_for_more() -> None:
    """Two queued: company came, and more may follow. They go on waiting after the one arriving has gone (here
    until a fourth fills the batch), as before; planning as soon as nobody was arriving would split them."""
    backend, ids = FakeScorer(), Ids()
    requests = [ids.items(4) for _ in range(4)]

    async def main() -> None:
        sched = make(backend)
        await sched.start()
        try:
            gate = asyncio.Event()
            holder = asyncio.create_task(arriving_until(sched, gate))
            await asyncio.sleep(0)  # it is arriving
            tasks = [asyncio.create_task(sched.submit(r)) for r in requests[:2]]
            await until(lambda: sched.queued == 2, "two queued")
            gate.set()
            await holder  # gone without a word: nobody arriving, two queued
            tasks.append(asyncio.create_task(sched.submit(requests[2])))
            await until(lambda: sched.queued == 3, "three queued")
            await asyncio.sleep(0.05)
            assert backend.batches == []  # (a wrong worker may plan later than this: it cannot fail wrongly)
            tasks.append(asyncio.create_task(sched.submit(requests[3])))
            outs = await asyncio.wait_for(asyncio.gather(*tasks), PROMPT_S)
        finally:
            await sched.stop()
        for r, out in zip(requests, outs, strict=True):
            assert (out.scores == expected(r)).all()

    asyncio.run(main())
    assert len(backend.batches) == 1


@pytest.mark.parametrize("ends", ["fails", "nothing", "too much", "queue full"])
def test_a_request_that_arrives_but_brings_no_work_stops_the_wait_for_it(ends: str) -> None:
    """Its tokenizing fails, or it ends normally (the submit that follows wakes the worker, with it) but that
    submit has nothing to score or is refused (over the request budget, the queue full): the lone request queued
    meanwhile waited the whole batch wait for it (fails: before `arriving` woke the worker; the others: before
    `submit` did)."""
    backend, ids = FakeScorer(), Ids()
    items = ids.items(3)

    async def arrives(sched: Scheduler, gate: asyncio.Event) -> object:
        with sched.arriving("rerank"):
            await gate.wait()
            if ends == "fails":
                raise ValueError("bad input")
        items = {"nothing": 0, "queue full": 15}.get(ends, 50)  # over 20 tokens: refused before the queue is read
        return await sched.submit(ids.items(items) if items else [])

    async def main() -> None:
        sched = make(backend, max_request_tokens=20, max_queue_tokens=10)  # 15 tokens behind 3 fill the queue
        await sched.start()
        try:
            gate = asyncio.Event()
            other = asyncio.create_task(arrives(sched, gate))
            await asyncio.sleep(0)  # it is arriving
            lone = asyncio.create_task(request(sched, items))
            await until(lambda: sched.queued == 1, "the request queued")
            await asyncio.sleep(0.05)
            assert backend.batches == []  # it waits for the one arriving
            gate.set()
            [done] = await asyncio.gather(other, return_exceptions=True)
            assert type(done).__name__ == {"fails": "ValueError", "nothing": "ScoreOutcome",
                                           "too much": "RequestTooLargeError", "queue full": "QueueFullError"}[ends]
            out = await asyncio.wait_for(lone, PROMPT_S)  # before it was woken: LONG_WAIT_MS
            assert (out.scores == expected(items)).all()
        finally:
            await sched.stop()

    asyncio.run(main())


def test_a_request_refused_at_arrival_is_not_waited_for() -> None:
    backend, ids = FakeScorer(), Ids()
    backend.hold()

    async def main() -> None:
        sched = make(backend, max_queue=1)
        await sched.start()
        try:
            held = asyncio.create_task(request(sched, ids.items(3)))
            await backend.wait_batch_started()
            with pytest.raises(QueueFullError), sched.arriving("rerank"):
                pytest.fail("a full queue refuses before the request is tokenized")
            backend.release()
            await held
            lone = ids.items(2)
            out = await asyncio.wait_for(request(sched, lone), PROMPT_S)  # nobody counted as arriving
            assert (out.scores == expected(lone)).all()
        finally:
            backend.release()
            await sched.stop()

    asyncio.run(main())

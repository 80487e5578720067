"""The scheduler while the server shuts down (`Scheduler.drain_by`): requests served one after another, shortest
first, and those that cannot finish before the grace period ends answered at once. Before, fair shares had four
200-passage requests advance together and all miss a 9 s grace period (0 of 4 answered, ~9 s of scoring
wasted); and how a cancellation at the request's deadline is counted."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest

from openrerank.engine.errors import ShutdownDeadlineError
from openrerank.engine.rates import drain_order
from openrerank.observe.metrics import Metrics
from tests.engine.sched_fakes import FakeScorer, Ids, expected, until
from tests.engine.test_scheduler import block_worker, make

RATE = 100.0  # work (tokens: no knee) per second the tests hold the model's rate at


def hold_rate(sched) -> None:
    """The fake scores instantly: keep the model's measured rate where the test put it, whatever batches show."""
    adm = sched._admission
    measured = adm.record_speed

    def fixed(*args, **kwargs):
        knee = measured(*args, **kwargs)
        adm.work_per_second = RATE
        return knee

    adm.record_speed = fixed
    sched.work_per_second = RATE


def test_drain_order_finishes_the_most_requests_by_the_end():
    kept, doomed = drain_order([400.0, 240.0, 160.0, 800.0], 5.0, RATE)
    assert kept == [(2, 1.6), (1, 4.0)]  # shortest first, each after the one before
    assert [i for i, _ in doomed] == [0, 3]
    assert doomed[0][1] == pytest.approx(8.0)
    assert drain_order([3.0, 1.0], 0.0, None) == ([(1, 0.0), (0, 0.0)], [])  # no rate: all kept, shortest first


def test_a_drain_answers_what_cannot_finish_at_once_and_serves_the_rest_shortest_first() -> None:
    backend, ids, metrics = FakeScorer(), Ids(), Metrics()
    big, mid, small, huge = ids.items(*[80] * 5), ids.items(*[80] * 3), ids.items(*[80] * 2), ids.items(*[80] * 10)

    async def main() -> list:
        sched = make(backend, metrics, request_timeout=60.0, max_batch_tokens=200, batch_wait_ms=0)
        hold_rate(sched)
        blocker, _ = await block_worker(sched, backend, ids)
        tasks = [asyncio.create_task(sched.submit(r)) for r in (big, mid, small, huge)]
        await until(lambda: sched.queued == 4, "four requests queued behind the held batch")
        sched.drain_by(time.monotonic() + 5.0)  # 1.6 s + 2.4 s fit; big's 4 s more would end at 8 s
        backend.release()
        out = await asyncio.gather(blocker, *tasks, return_exceptions=True)
        await sched.stop()
        return out[1:]

    r_big, r_mid, r_small, r_huge = asyncio.run(main())
    for refused in (r_big, r_huge):
        assert isinstance(refused, ShutdownDeadlineError), refused
        assert "shutting down" in str(refused) and "retry" in str(refused)
    np.testing.assert_array_equal(r_small.scores, expected(small))
    np.testing.assert_array_equal(r_mid.scores, expected(mid))
    scored = [i for b in backend.batches[1:] for i in b]
    owner = {it.input_ids[0]: name for name, r in (("big", big), ("mid", mid), ("small", small), ("huge", huge))
             for it in r}
    order = [owner[i] for i in scored]
    assert order == ["small"] * 2 + ["mid"] * 3, order  # one after another, shortest first; nothing refused ran
    value = metrics.registry.get_sample_value
    assert value("openrerank_rejected_total", {"model": "m", "task": "rerank", "reason": "shutdown"}) == 2


def test_a_drain_hands_back_the_window_it_runs() -> None:
    """Two requests planned in one window, their batches interleaved; the drain begins during its first batch:
    the rest of the window goes back, and the shorter request's batches all run before the longer one's."""
    backend, ids = FakeScorer(), Ids()
    longer, shorter = ids.items(*[80] * 8), ids.items(*[80] * 4)
    mine = {it.input_ids[0] for it in (*longer, *shorter)}
    loop_box: list = []

    async def main() -> list:
        sched = make(backend, request_timeout=60.0, max_batch_tokens=200, batch_wait_ms=0)
        hold_rate(sched)

        def drain_on_first_batch(batch_ids: list[int]) -> None:  # on the worker thread, inside the batch
            if set(batch_ids) & mine and not loop_box:
                loop_box.append(True)
                sched.drain_by(time.monotonic() + 60.0)

        blocker, _ = await block_worker(sched, backend, ids)
        tasks = [asyncio.create_task(sched.submit(r)) for r in (longer, shorter)]
        await until(lambda: sched.queued == 2, "both requests queued behind the held batch")
        backend.on_batch = drain_on_first_batch
        backend.release()
        out = await asyncio.gather(blocker, *tasks)
        await sched.stop()
        return out[1:]

    r_longer, r_shorter = asyncio.run(main())
    np.testing.assert_array_equal(r_longer.scores, expected(longer))
    np.testing.assert_array_equal(r_shorter.scores, expected(shorter))
    short_ids = {it.input_ids[0] for it in shorter}
    after_first = [set(b) <= short_ids for b in backend.batches[2:]]  # past the held batch and the first one
    assert after_first == sorted(after_first, reverse=True), backend.batches  # the shorter's batches first


def test_a_cancellation_at_the_deadline_counts_as_a_deadline_not_a_client_gone() -> None:
    """A gRPC client's deadline cancels the call a few ms before the server's copy of it passes: counted in
    `rejected_total{reason="deadline"}` as HTTP's --request-timeout is; a cancellation well before its deadline
    is a client gone (`cancelled_total`)."""
    backend, ids, metrics = FakeScorer(), Ids(), Metrics()

    async def main() -> None:
        sched = make(backend, metrics)
        blocker, _ = await block_worker(sched, backend, ids)
        near = asyncio.create_task(sched.submit(ids.items(5), deadline=time.monotonic() + 0.05))
        far = asyncio.create_task(sched.submit(ids.items(5), deadline=time.monotonic() + 30))
        await until(lambda: sched.pending == 3, "both requests admitted")
        near.cancel()
        far.cancel()
        for task in (near, far):
            with pytest.raises(asyncio.CancelledError):
                await task
        backend.release()
        await blocker
        await sched.stop()

    asyncio.run(main())
    value = metrics.registry.get_sample_value
    assert value("openrerank_rejected_total", {"model": "m", "task": "rerank", "reason": "deadline"}) == 1
    assert value("openrerank_cancelled_total", {"model": "m", "task": "rerank"}) == 1

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
    kept, doomed = drain_order([400.0, 240.0, 160.0, 800.0], 6.0, RATE)
    assert kept == [(2, 1.6), (1, 4.0)]  # shortest first, each after the one before
    assert [i for i, _ in doomed] == [0, 3]
    assert doomed[0][1] == pytest.approx(8.0)
    assert drain_order([3.0, 1.0], 0.0, None) == ([(1, 0.0), (0, 0.0)], [])  # no rate: all kept, shortest first


def test_drain_order_keeps_admissions_margin_and_its_promises():
    """Planned to the last second, a request ended just after the grace period at a slightly slower rate, answered
    503 then with its scoring wasted: a request is kept within 80% of the time left (`DEADLINE_SHARE`), as
    admission plans. One kept by an earlier plan stays kept, first, while it would finish by the end itself."""
    assert drain_order([450.0], 5.0, RATE) == ([], [(0, 4.5)])  # before: kept, ending 0.5 s before the end
    assert drain_order([400.0], 5.0, RATE) == ([(0, 4.0)], [])
    assert drain_order([450.0], 5.0, RATE, promised=[0]) == ([(0, 4.5)], [])
    assert drain_order([300.0, 150.0], 5.0, RATE, promised=[0]) == ([(0, 3.0)], [(1, 4.5)])  # the promise first


def test_a_drain_answers_what_cannot_finish_at_once_and_serves_the_rest_shortest_first() -> None:
    backend, ids, metrics = FakeScorer(), Ids(), Metrics()
    big, mid, small, huge = ids.items(*[80] * 5), ids.items(*[80] * 3), ids.items(*[80] * 2), ids.items(*[80] * 10)

    async def main() -> list:
        sched = make(backend, metrics, request_timeout=60.0, max_batch_tokens=200, batch_wait_ms=0)
        hold_rate(sched)
        blocker, _ = await block_worker(sched, backend, ids)
        tasks = [asyncio.create_task(sched.submit(r)) for r in (big, mid, small, huge)]
        await until(lambda: sched.queued == 4, "four requests queued behind the held batch")
        sched.drain_by(time.monotonic() + 6.0)  # 1.6 s + 2.4 s fit 80% of it; big's 4 s more would end at 8 s
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


def test_a_drain_answers_at_once_what_would_finish_only_without_admissions_margin() -> None:
    """4.5 s of scoring in a 5 s grace period fits only without the 20% margin admission keeps: answered at once,
    nothing of it scored (before: scored, to end just before the end, or just after it at a slower rate)."""
    backend, ids, metrics = FakeScorer(), Ids(), Metrics()
    tight = ids.items(*[90] * 5)

    async def main() -> BaseException | None:
        sched = make(backend, metrics, request_timeout=60.0, max_batch_tokens=200, batch_wait_ms=0)
        hold_rate(sched)
        blocker, _ = await block_worker(sched, backend, ids)
        task = asyncio.create_task(sched.submit(tight))
        await until(lambda: sched.queued == 1, "the request queued behind the held batch")
        sched.drain_by(time.monotonic() + 5.0)  # 4.5 s of it, 4 s allowed
        backend.release()
        out = await asyncio.gather(blocker, task, return_exceptions=True)
        await sched.stop()
        return out[1]

    refused = asyncio.run(main())
    assert isinstance(refused, ShutdownDeadlineError), refused
    assert "about 4.5 s of scoring" in str(refused) and "at most 80% of it" in str(refused)
    tight_ids = {it.input_ids[0] for it in tight}
    assert not any(set(b) & tight_ids for b in backend.batches), backend.batches
    value = metrics.registry.get_sample_value
    assert value("openrerank_rejected_total", {"model": "m", "task": "rerank", "reason": "shutdown"}) == 1


def test_a_request_the_drain_kept_is_not_dropped_for_the_margin_when_batches_slow_down() -> None:
    """Kept with 7 s of 8 allowed in a 10 s grace period, the batches then slow to 8.6 s of work left: still within
    the period, it is scored (dropped, its first batch would be wasted and its client answered 503)."""
    backend, ids = FakeScorer(), Ids()
    request = ids.items(*[70] * 10)  # 700 work: 7 s at the held rate
    mine = {it.input_ids[0] for it in request}
    rate = [RATE]

    async def main():
        sched = make(backend, request_timeout=60.0, max_batch_tokens=200, batch_wait_ms=0, window_batches=1)
        adm = sched._admission
        measured = adm.record_speed

        def fixed(*args, **kwargs):
            knee = measured(*args, **kwargs)
            adm.work_per_second = rate[0]
            return knee

        def slow_down(batch_ids: list[int]) -> None:
            if set(batch_ids) & mine:
                rate[0] = 65.0  # its 560 work left: 8.6 s, past 80% of the ~10 s left, within all of it

        adm.record_speed = fixed
        sched.work_per_second = RATE
        blocker, _ = await block_worker(sched, backend, ids)
        task = asyncio.create_task(sched.submit(request))
        await until(lambda: sched.queued == 1, "the request queued behind the held batch")
        sched.drain_by(time.monotonic() + 10.0)
        backend.on_batch = slow_down
        backend.release()
        out = await asyncio.gather(blocker, task, return_exceptions=True)
        await sched.stop()
        return out[1]

    result = asyncio.run(main())
    assert not isinstance(result, BaseException), result
    np.testing.assert_array_equal(result.scores, expected(request))
    assert sum(1 for b in backend.batches if set(b) & mine) == 5  # planned again after each one-batch window


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

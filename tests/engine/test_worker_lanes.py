"""The scheduler with a scorer whose runtime runs several batches at once (`Runtime.lanes`)."""

from __future__ import annotations

import asyncio
import threading

import numpy as np
import pytest

from openrerank.engine.batch_runner import BusyClock
from openrerank.engine.batching import BatchPolicy
from openrerank.engine.errors import BatchFailedError, WorkerDiedError
from openrerank.engine.scheduler import Scheduler, SchedulerConfig
from tests.engine.sched_fakes import WAIT_S, FakeScorer, Ids, expected, until


def lanes_of(n: int) -> FakeScorer:
    backend = FakeScorer()
    backend.lanes = n
    return backend


def make(backend: FakeScorer, **policy) -> Scheduler:
    return Scheduler(backend, SchedulerConfig(BatchPolicy(**policy)), name="m")


def score_alone(backend: FakeScorer, items: list):
    """One request on a fresh scheduler: its outcome."""

    async def main():
        sched = make(backend)
        await sched.start()
        out = await sched.submit(items)
        await sched.stop()
        return out

    return asyncio.run(main())


def started(backend: FakeScorer, n: int) -> bool:
    """Whether `n` more batches enter score() while the backend is held (waits at most WAIT_S for each)."""
    return all(backend.started.acquire(timeout=WAIT_S) for _ in range(n))


def test_two_lanes_run_two_batches_at_once_and_every_score_reaches_its_request() -> None:
    backend, ids = lanes_of(2), Ids()
    requests = [ids.items(*range(3, 13)), ids.items(5, 40, 41, 6), ids.items(20)]

    async def main() -> list:
        sched = make(backend, max_size=2)
        await sched.start()
        backend.hold()
        tasks = [asyncio.create_task(sched.submit(r)) for r in requests]
        # Both lanes are inside a batch while the first is held: one lane alone could not start a second.
        assert await asyncio.to_thread(started, backend, 2)
        assert not backend.started.acquire(timeout=0.2)  # and no third: two lanes
        backend.release()
        out = await asyncio.gather(*tasks)
        await sched.stop()
        return out

    outcomes = asyncio.run(main())
    for items, out in zip(requests, outcomes, strict=True):
        np.testing.assert_array_equal(out.scores, expected(items))
    assert sorted(i for b in backend.batches for i in b) == sorted(it.input_ids[0] for r in requests for it in r)
    assert backend.threads <= {"m-lane_0", "m-lane_1"} and len(backend.threads) == 2


def test_a_lone_batch_is_halved_so_both_lanes_work_on_it() -> None:
    backend, ids = lanes_of(2), Ids()
    items = ids.items(8, 8, 8, 8, 8)
    out = score_alone(backend, items)
    np.testing.assert_array_equal(out.scores, expected(items))
    assert sorted(len(b) for b in backend.batches) == [2, 3] and out.batches == 2


def test_one_lane_keeps_the_batch_whole_on_the_worker_thread() -> None:
    backend, ids = lanes_of(1), Ids()
    score_alone(backend, ids.items(8, 8, 8, 8, 8))
    assert [len(b) for b in backend.batches] == [5] and backend.threads == {"model-m"}


def test_a_failing_batch_on_one_lane_fails_only_its_request() -> None:
    backend, ids = lanes_of(2), Ids()
    poisoned, fine = ids.items(4), ids.items(30)
    backend.fail_on = {poisoned[0].input_ids[0]}
    gate = threading.Barrier(2, timeout=WAIT_S)
    backend.on_batch = lambda _ids: gate.wait()  # both batches are in score() at once, or this times out

    async def main():
        sched = make(backend, max_padding=0.0)
        await sched.start()
        out = await asyncio.gather(sched.submit(poisoned), sched.submit(fine), return_exceptions=True)
        await sched.stop()
        return out

    bad, good = asyncio.run(main())
    assert isinstance(bad, BatchFailedError)
    np.testing.assert_array_equal(good.scores, expected(fine))


def test_stop_waits_for_batches_still_on_the_lanes() -> None:
    backend, ids = lanes_of(2), Ids()
    items = ids.items(6, 6, 7, 7)

    async def main():
        sched = make(backend)
        await sched.start()
        backend.hold()
        task = asyncio.create_task(sched.submit(items))
        assert await asyncio.to_thread(started, backend, 2)
        stopping = asyncio.create_task(sched.stop())
        await asyncio.sleep(0.05)
        assert not stopping.done() and not task.done()  # drain: accepted work is finished, not dropped
        backend.release()
        await stopping
        return await task

    out = asyncio.run(main())
    np.testing.assert_array_equal(out.scores, expected(items))


def test_a_lane_that_dies_kills_the_worker_and_every_request_is_answered() -> None:
    backend, ids = lanes_of(2), Ids()
    fatal = ids.items(5)  # one item: one batch, so nothing is left to plan once it is on its lane
    backend.fatal_on = {fatal[0].input_ids[0]}

    async def main():
        sched = make(backend)
        await sched.start()
        # Only the lane's own wake-up ends the idle worker, which then answers the request.
        out = await asyncio.wait_for(asyncio.gather(sched.submit(fatal), return_exceptions=True), WAIT_S)
        await until(lambda: not sched.alive, "the worker to end")
        assert sched.failure == "FatalError"
        with pytest.raises(WorkerDiedError):
            await sched.submit(ids.items(1))  # refused at once
        await sched.stop()
        return out[0]

    assert isinstance(asyncio.run(main()), WorkerDiedError)


def test_a_lone_batch_on_two_lanes_shows_the_rate_of_one() -> None:
    """A lane's batch took its seconds divided by the lane count in the rate, as if the other lane had run one
    beside it: a model serving one small request at a time was rated twice as fast as it ran, and admission
    planned with that speed. The rate is work over the seconds the model was busy (`BusyClock`)."""
    backend, ids = lanes_of(2), Ids()
    backend.sleep_per_token = 0.005  # 10-token items: 50 ms a batch, at most 200 tokens/s

    async def main() -> float | None:
        sched = make(backend)
        await sched.start()
        for _ in range(6):  # one at a time: one batch, one lane
            await sched.submit(ids.items(10))
        rate = sched.work_per_second
        await sched.stop()
        return rate

    rate = asyncio.run(main())
    assert rate is not None and rate <= 200.0  # (halved seconds made it ~400)


def test_the_busy_clock_hands_out_the_time_at_least_one_lane_was_busy() -> None:
    clock = BusyClock()
    clock.started(0.0)
    clock.started(0.5)  # beside the first
    assert clock.ended(1.0) == 1.0  # [0, 1]
    assert clock.ended(1.5) == 0.5  # (1, 1.5]: together 1.5 s busy, not 2
    clock.started(3.0)  # idle from 1.5 to 3: not counted
    clock.started(3.2)
    assert clock.ended(4.0) == 1.0
    assert clock.ended(3.9) == 0.0  # it ended before the other one handed out the time: nothing left

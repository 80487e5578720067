"""Scheduler behaviour with a fake backend: batching, fairness, back-pressure, deadlines, failures."""

from __future__ import annotations

import asyncio
import random
import threading

import numpy as np
import pytest

from openrerank.core.work import PairItem
from openrerank.engine.batching import CPU_POLICY, BatchPolicy
from openrerank.engine.errors import (
    BatchFailedError,
    DeadlineExceededError,
    DeviceMemoryError,
    EngineStoppedError,
    QueueFullError,
    RequestTooLargeError,
    WorkerDiedError,
)
from openrerank.engine.scheduler import Scheduler, SchedulerConfig
from openrerank.engine.speed_record import SpeedRecord
from openrerank.families.pair_scorer import PairScorer
from openrerank.observe.metrics import Metrics
from openrerank.runtimes.base import HostMemoryError, Runtime, computed
from tests.engine.sched_fakes import FakeScorer, Ids, expected, until


def make(backend: FakeScorer, metrics: Metrics | None = None, *, max_batch_tokens: int = CPU_POLICY.max_tokens,
         max_batch_size: int = CPU_POLICY.max_size, **cfg) -> Scheduler:
    policy = BatchPolicy(max_tokens=max_batch_tokens, max_size=max_batch_size)
    return Scheduler(backend, SchedulerConfig(policy, **cfg), name="m", metrics=metrics)


async def block_worker(sched: Scheduler, backend: FakeScorer, ids: Ids) -> tuple[asyncio.Task, list[PairItem]]:
    """Submit one request and hold the worker inside its batch, so later requests stack up queued."""
    backend.hold()
    items = ids.items(3)
    task = asyncio.create_task(sched.submit(items))
    await backend.wait_batch_started()
    return task, items


def check_budgets(backend: FakeScorer, max_tokens: int, max_size: int) -> None:
    for lengths in backend.lengths:
        assert len(lengths) <= max_size
        assert len(lengths) == 1 or len(lengths) * max(lengths) <= max_tokens


def owner_map(*requests: list[PairItem]) -> dict[int, int]:
    return {it.input_ids[0]: r for r, items in enumerate(requests) for it in items}


def test_concurrent_results_return_to_their_request_and_position_within_budgets() -> None:
    backend, ids = FakeScorer(), Ids()
    rng = random.Random(1)
    requests = [ids.items(*[rng.randint(1, 20) for _ in range(rng.randint(1, 15))]) for _ in range(8)]

    async def main() -> list:
        sched = make(backend, max_batch_tokens=64, max_batch_size=4)
        await sched.start()
        try:
            return await asyncio.gather(*(sched.submit(r) for r in requests))
        finally:
            await sched.stop()

    outcomes = asyncio.run(main())
    for items, out in zip(requests, outcomes, strict=True):
        assert out.scores.dtype == np.float32
        np.testing.assert_array_equal(out.scores, expected(items))
        assert out.queue_ms >= 0 and out.inference_ms >= 0 and out.batches >= 1
    check_budgets(backend, 64, 4)
    scored = sorted(i for b in backend.batches for i in b)
    assert scored == sorted(it.input_ids[0] for r in requests for it in r)  # each item exactly once


def test_queued_requests_share_batches_grouped_by_length() -> None:
    backend, ids = FakeScorer(), Ids()
    a, b, c, d = ids.items(2, 30), ids.items(30, 2), ids.items(3, 31), ids.items(31, 3)

    async def main() -> list:
        sched = make(backend, max_batch_tokens=4 * 31, max_batch_size=4)
        blocker, blocker_items = await block_worker(sched, backend, ids)
        tasks = [asyncio.create_task(sched.submit(r)) for r in (a, b, c, d)]
        await until(lambda: sched.queued == 4, "4 queued requests")
        backend.release()
        out = await asyncio.gather(blocker, *tasks)
        await sched.stop()
        np.testing.assert_array_equal(out[0].scores, expected(blocker_items))
        return out[1:]

    outcomes = asyncio.run(main())
    for items, out in zip((a, b, c, d), outcomes, strict=True):
        np.testing.assert_array_equal(out.scores, expected(items))
        assert out.batches == 2  # its short item rode with the short ones, its long one with the long
    # after the blocker's batch: one batch of the 4 short items, one of the 4 long ones,
    # each holding items of all four requests
    assert backend.lengths[1:] == [[2, 2, 3, 3], [30, 30, 31, 31]]
    owners = owner_map(a, b, c, d)
    for batch in backend.batches[1:]:
        assert {owners[i] for i in batch} == {0, 1, 2, 3}


def test_a_request_larger_than_a_batch_spans_several_in_order() -> None:
    backend, ids = FakeScorer(), Ids()
    rng = random.Random(2)
    items = ids.items(*[rng.randint(1, 40) for _ in range(100)])

    async def main():
        sched = make(backend, max_batch_tokens=200, max_batch_size=16)
        try:
            return await sched.submit(items)
        finally:
            await sched.stop()

    out = asyncio.run(main())
    np.testing.assert_array_equal(out.scores, expected(items))
    assert out.batches == len(backend.batches) > 100 * 1 // 16
    check_budgets(backend, 200, 16)


def test_a_small_request_waits_one_batch_behind_a_big_one_not_all_of_it() -> None:
    backend, ids = FakeScorer(), Ids()
    big = ids.items(*[10] * 40)  # 4 windows of 1 batch x ... : 40 items of 10 tokens, 10 per batch
    small = ids.items(3, 4)

    async def main() -> None:
        sched = make(backend, max_batch_tokens=100, max_batch_size=10, window_batches=4)
        backend.hold()
        big_task = asyncio.create_task(sched.submit(big))
        await backend.wait_batch_started()  # the big request's first batch is being scored
        small_task = asyncio.create_task(sched.submit(small))
        await until(lambda: sched.queued == 1)
        backend.release()
        out = await asyncio.gather(big_task, small_task)
        await sched.stop()
        np.testing.assert_array_equal(out[0].scores, expected(big))
        np.testing.assert_array_equal(out[1].scores, expected(small))

    asyncio.run(main())
    small_ids = {it.input_ids[0] for it in small}
    holding = [n for n, b in enumerate(backend.batches) if small_ids & set(b)]
    assert holding == [1]  # right after the batch in progress, all in one batch
    assert backend.batches[1] == [it.input_ids[0] for it in small]  # not mixed into a big batch
    assert len(backend.batches) == 5  # the big request still went on in full batches


def test_a_stream_of_small_requests_does_not_starve_a_big_one() -> None:
    backend, ids = FakeScorer(), Ids()
    big = ids.items(*[10] * 30)
    big_ids = {it.input_ids[0] for it in big}
    smalls: list[list[PairItem]] = []
    tasks: list[asyncio.Task] = []

    async def main() -> None:
        sched = make(backend, max_batch_tokens=100, max_batch_size=10, window_batches=4)
        loop = asyncio.get_running_loop()

        def spawn() -> None:  # a new small request arrives during every batch
            if len(smalls) >= 12:
                return
            items = ids.items(2)
            smalls.append(items)
            tasks.append(asyncio.create_task(sched.submit(items)))

        backend.on_batch = lambda _ids: loop.call_soon_threadsafe(spawn)
        out = await sched.submit(big)
        np.testing.assert_array_equal(out.scores, expected(big))
        await until(lambda: len(smalls) == 12)
        for items, o in zip(smalls, await asyncio.gather(*tasks), strict=True):
            np.testing.assert_array_equal(o.scores, expected(items))
        await sched.stop()

    asyncio.run(main())
    # between two batches of the big request there is at most one batch of newcomers
    last_big = max(n for n, b in enumerate(backend.batches) if big_ids & set(b))
    run = longest = 0
    for b in backend.batches[: last_big + 1]:
        run = 0 if big_ids & set(b) else run + 1
        longest = max(longest, run)
    assert longest <= 1
    assert backend.batches[0] == [it.input_ids[0] for it in big[:10]]  # full batches while alone


def test_full_queue_rejects_immediately_and_loses_nothing_accepted() -> None:
    backend, ids, metrics = FakeScorer(), Ids(), Metrics()
    accepted = [ids.items(4, 5), ids.items(6)]

    async def main() -> None:
        sched = make(backend, metrics, max_queue=3)
        blocker, blocker_items = await block_worker(sched, backend, ids)
        tasks = [asyncio.create_task(sched.submit(r)) for r in accepted]
        await until(lambda: sched.pending == 3, "3 pending requests")
        with pytest.raises(QueueFullError) as err:
            await sched.submit(ids.items(1))
        assert err.value.retry_after >= 1
        assert sched.pending == 3
        backend.release()
        out = await asyncio.gather(blocker, *tasks)
        np.testing.assert_array_equal(out[0].scores, expected(blocker_items))
        for items, o in zip(accepted, out[1:], strict=True):
            np.testing.assert_array_equal(o.scores, expected(items))
        assert sched.pending == 0
        late = ids.items(2)  # the slots are free again
        np.testing.assert_array_equal((await sched.submit(late)).scores, expected(late))
        await sched.stop()

    asyncio.run(main())
    rejected = {"model": "m", "task": "rerank", "reason": "queue_full"}
    assert metrics.registry.get_sample_value("openrerank_rejected_total", rejected) == 1


def test_deadline_fails_a_queued_request_and_frees_its_slot() -> None:
    backend, ids, metrics = FakeScorer(), Ids(), Metrics()
    late = ids.items(5, 6)

    async def main() -> None:
        sched = make(backend, metrics, max_queue=2)
        blocker, blocker_items = await block_worker(sched, backend, ids)
        with pytest.raises(DeadlineExceededError):
            await sched.submit(late, timeout=0.05)  # the worker is held: it cannot be served in time
        assert sched.pending == 1 and sched.queued == 0
        other = ids.items(3)
        other_task = asyncio.create_task(sched.submit(other))  # would be refused if the slot were held
        await until(lambda: sched.queued == 1)
        backend.release()
        out = await asyncio.gather(blocker, other_task)
        np.testing.assert_array_equal(out[0].scores, expected(blocker_items))
        np.testing.assert_array_equal(out[1].scores, expected(other))
        await sched.stop()

    asyncio.run(main())
    assert not {it.input_ids[0] for it in late} & {i for b in backend.batches for i in b}
    rejected = {"model": "m", "task": "rerank", "reason": "deadline"}
    assert metrics.registry.get_sample_value("openrerank_rejected_total", rejected) == 1
    assert metrics.registry.get_sample_value("openrerank_queue_depth", {"model": "m"}) == 0


def test_deadline_during_a_running_batch_discards_results_and_worker_continues() -> None:
    backend, ids = FakeScorer(), Ids()

    async def main() -> None:
        sched = make(backend)
        backend.hold()
        running = asyncio.create_task(sched.submit(ids.items(4, 4), timeout=1.0))
        await backend.wait_batch_started()
        with pytest.raises(DeadlineExceededError):
            await running  # its batch is stuck in the backend past the deadline
        assert sched.pending == 0
        backend.release()  # the batch finishes; nobody receives its scores
        after = ids.items(2)
        np.testing.assert_array_equal((await sched.submit(after)).scores, expected(after))
        await sched.stop()

    asyncio.run(main())
    assert len(backend.batches) == 2


def test_cancellation_frees_queued_items_and_running_ones_are_discarded() -> None:
    backend, ids, metrics = FakeScorer(), Ids(), Metrics()
    gone = ids.items(7, 8)

    async def main() -> None:
        sched = make(backend, metrics, max_queue=2)
        blocker, _ = await block_worker(sched, backend, ids)
        task = asyncio.create_task(sched.submit(gone))
        await until(lambda: sched.queued == 1)
        task.cancel()  # a client disconnect cancels the awaiting handler
        with pytest.raises(asyncio.CancelledError):
            await task
        assert sched.pending == 1 and sched.queued == 0
        blocker.cancel()  # cancelled while its batch is running
        with pytest.raises(asyncio.CancelledError):
            await blocker
        assert sched.pending == 0
        backend.release()
        after = ids.items(3)
        np.testing.assert_array_equal((await sched.submit(after)).scores, expected(after))
        await sched.stop()

    asyncio.run(main())
    assert not {it.input_ids[0] for it in gone} & {i for b in backend.batches for i in b}
    assert metrics.registry.get_sample_value("openrerank_cancelled_total", {"model": "m", "task": "rerank"}) == 2


def test_a_failing_input_fails_only_its_own_request() -> None:
    backend, ids, metrics = FakeScorer(), Ids(), Metrics()
    poisoned = ids.items(50)
    fine = ids.items(5, 5)
    neighbour = ids.items(50)  # shares the poisoned batch, then is re-run on its own
    spread = ids.items(4, 4, 60)  # its first batch fails; its last item must then be skipped
    backend.fail_on = {poisoned[0].input_ids[0], spread[0].input_ids[0]}

    async def main() -> list:
        sched = make(backend, metrics, max_batch_size=2)
        blocker, _ = await block_worker(sched, backend, ids)
        tasks = [asyncio.create_task(sched.submit(r)) for r in (poisoned, fine, neighbour, spread)]
        await until(lambda: sched.queued == 4)
        backend.release()
        out = await asyncio.gather(blocker, *tasks, return_exceptions=True)
        after = ids.items(9)
        np.testing.assert_array_equal((await sched.submit(after)).scores, expected(after))  # worker alive
        await sched.stop()
        return out[1:]

    r_poisoned, r_fine, r_neighbour, r_spread = asyncio.run(main())
    assert isinstance(r_poisoned, BatchFailedError) and "BoomError" in str(r_poisoned)
    assert isinstance(r_spread, BatchFailedError)
    np.testing.assert_array_equal(r_fine.scores, expected(fine))
    np.testing.assert_array_equal(r_neighbour.scores, expected(neighbour))
    assert spread[2].input_ids[0] not in {i for b in backend.batches for i in b}
    assert metrics.registry.get_sample_value("openrerank_batch_failures_total", {"model": "m", "task": "rerank"}) >= 2


def test_memory_that_runs_short_alone_too_is_answered_as_itself_not_as_a_fault_of_the_input() -> None:
    """OpenVINO's "Failed to allocate" under a host memory limit was answered 500 "the model failed on this
    request's input": a `DeviceMemoryError` (the CPU runtimes raise `HostMemoryError`) is capacity, a 503."""
    backend, ids = FakeScorer(), Ids()
    short = ids.items(50)
    neighbour = ids.items(50)  # shares the failing batch, then is re-run on its own
    backend.fail_on = {short[0].input_ids[0]}
    backend.fail_with = lambda message: HostMemoryError(f"out of host memory ({message}); retry later")

    async def main() -> list:
        sched = make(backend, max_batch_size=2)
        blocker, _ = await block_worker(sched, backend, ids)
        tasks = [asyncio.create_task(sched.submit(r)) for r in (short, neighbour)]
        await until(lambda: sched.queued == 2)
        backend.release()
        out = await asyncio.gather(blocker, *tasks, return_exceptions=True)
        await sched.stop()
        return out[1:]

    r_short, r_neighbour = asyncio.run(main())
    assert isinstance(r_short, HostMemoryError) and "out of host memory" in str(r_short)
    np.testing.assert_array_equal(r_neighbour.scores, expected(neighbour))


def test_a_dead_worker_settles_everything_and_reports_it() -> None:
    backend, ids = FakeScorer(), Ids()
    fatal = ids.items(5)
    backend.fatal_on = {fatal[0].input_ids[0]}

    async def main() -> list:
        sched = make(backend)
        assert sched.alive  # before the first start
        blocker, _ = await block_worker(sched, backend, ids)
        tasks = [asyncio.create_task(sched.submit(r)) for r in (fatal, ids.items(3), ids.items(4, 4))]
        await until(lambda: sched.queued == 3)
        assert sched.alive
        backend.release()
        out = await asyncio.gather(blocker, *tasks, return_exceptions=True)
        await until(lambda: not sched.alive, "the worker to end")
        assert sched.failure == "FatalError"
        with pytest.raises(WorkerDiedError):
            await sched.submit(ids.items(1))  # refused at once, not after the timeout
        await sched.stop()  # returns: nothing left to drain
        return out

    out = asyncio.run(main())
    assert not isinstance(out[0], BaseException)  # the blocker's batch finished before the fatal one
    assert all(isinstance(o, WorkerDiedError) for o in out[1:])


def test_admission_counts_tokens_and_one_request_is_one_unit() -> None:
    backend, ids, metrics = FakeScorer(), Ids(), Metrics()

    async def main() -> None:
        sched = make(backend, metrics, max_queue=10, max_queue_tokens=100, max_request_tokens=80)
        with pytest.raises(RequestTooLargeError) as err:
            await sched.submit(ids.items(*[9] * 9))  # 81 tokens: refused even when idle
        assert "81 tokens" in str(err.value) and "80" in str(err.value) and "--max-request-tokens" in str(err.value)
        blocker, _ = await block_worker(sched, backend, ids)  # 3 tokens pending
        first = asyncio.create_task(sched.submit(ids.items(*[10] * 7)))  # 70 tokens: 73 pending
        await until(lambda: sched.pending == 2)
        assert sched.pending_tokens == 73
        with pytest.raises(QueueFullError) as full:
            await sched.submit(ids.items(*[10] * 3))  # 30 more would pass 100
        assert "tokens" in str(full.value) and "--max-queue-tokens" in str(full.value)
        fits = asyncio.create_task(sched.submit(ids.items(*[9] * 3)))  # 27: exactly 100
        await until(lambda: sched.pending == 3)
        backend.release()
        await asyncio.gather(blocker, first, fits)
        assert sched.pending == 0 and sched.pending_tokens == 0
        await sched.stop()

    asyncio.run(main())
    value = metrics.registry.get_sample_value
    assert value("openrerank_rejected_total", {"model": "m", "task": "rerank", "reason": "too_large"}) == 1
    assert value("openrerank_rejected_total", {"model": "m", "task": "rerank", "reason": "queue_full"}) == 1


def test_an_idle_scheduler_admits_one_request_above_the_queue_budget() -> None:
    backend, ids = FakeScorer(), Ids()

    async def main() -> None:
        sched = make(backend, max_queue_tokens=10, max_request_tokens=100)
        items = ids.items(*[10] * 5)
        np.testing.assert_array_equal((await sched.submit(items)).scores, expected(items))
        await sched.stop()

    asyncio.run(main())


def test_a_measured_budget_weighs_long_sequences_by_their_attention() -> None:
    """With a knee of 100 tokens, a 100-token sequence costs twice its tokens: 400 tokens of them are the
    work of 800 short ones. Counted in tokens, a long-context model's budget admitted twice what it scores."""
    backend, ids = FakeScorer(), Ids()

    async def main() -> None:
        sched = make(backend, request_timeout=10.0)
        sched.knee = 100.0
        sched.work_per_second = 100.0  # work per second: one request may hold 100 x 10 s x BUDGET_SHARE = 500
        assert sched.request_budget == 500
        short = ids.items(*[5] * 90)  # 450 tokens, 472.5 of work
        np.testing.assert_array_equal((await sched.submit(short)).scores, expected(short))
        sched.work_per_second = 100.0  # as it was: every served batch moves it
        with pytest.raises(RequestTooLargeError) as err:
            await sched.submit(ids.items(*[100] * 3))  # 300 tokens, 600 of work
        message = str(err.value)
        assert "300 tokens, above the limit of 250 per request" in message, message  # 500 x 300 / 600
        assert "~50 tokens/s here at these lengths" in message, message  # 100 x 300 / 600
        assert sched.over_budget(200, sched.weigh(ids.items(100, 100))) is None  # 400 of work: fits
        sched.knee = None  # unknown shape: tokens
        assert sched.over_budget(300, sched.weigh(ids.items(*[100] * 3))) is None
        await sched.stop()

    asyncio.run(main())


def test_served_batches_move_the_knee_to_what_the_scorer_shows(tmp_path) -> None:
    """A scorer whose time grows as if its knee were 400 while the model's FLOPs say 1,600: after batches of
    mixed lengths the scheduler weighs by ~400, and /v1/metadata would say so. The knee and the rate are kept:
    the next start of the model begins with them instead of the FLOP knee and its timed rate."""
    backend, ids = FakeScorer(), Ids()
    backend.sleep_per_token, backend.sleep_knee = 2e-5, 400.0
    record = SpeedRecord(tmp_path / "speed.json", 1600.0)

    async def main() -> None:
        sched = make(backend, max_batch_tokens=2048)
        sched.knee = 1600.0
        assert sched.keep_speed(record) is None  # nothing kept yet: the FLOP knee stands
        assert sched.knee == 1600.0
        sched.work_per_second = 1e9  # as timed at start: far from what the batches show
        for _ in range(6):
            for width in (32, 128, 512):  # one request per batch: 2,048 tokens of one width
                await sched.submit(ids.items(*[width] * (2048 // width)))
        assert sched.knee == pytest.approx(400.0, rel=0.25)
        assert record.load().knee == sched.knee  # the last knee it moved to, kept at once
        await sched.submit(ids.items(*[32] * 64))  # the rate moves on after the knee's last move
        await sched.stop()
        kept = record.load()  # at stop: the rate the batches moved to
        assert kept.knee == sched.knee and kept.work_per_second == sched.work_per_second < 1e9

        restarted = make(backend, max_batch_tokens=2048)
        restarted.knee = 1600.0
        assert restarted.keep_speed(SpeedRecord(tmp_path / "speed.json", 1600.0)) == kept
        assert (restarted.knee, restarted.work_per_second) == (kept.knee, kept.work_per_second)  # before any batch
        await restarted.stop()  # it served nothing: what it read stays
        assert record.load() == kept

    asyncio.run(main())


def test_deadline_admission_counts_the_work_pending() -> None:
    """Behind a pending request of long sequences, a newcomer would finish after its deadline although the
    tokens pending would have let it in."""
    backend, ids = FakeScorer(), Ids()

    async def main() -> None:
        sched = make(backend, request_timeout=10.0)
        sched.knee, sched.work_per_second = 100.0, 100.0
        blocker, _ = await block_worker(sched, backend, ids)
        long = asyncio.create_task(sched.submit(ids.items(*[100] * 2)))  # 200 tokens, 400 of work: 4 s
        await until(lambda: sched.pending == 2)
        # ahead: the blocker's 3.09 and 400 of work, then its own 400: 8.03 s at 100/s, past a 7 s deadline;
        # in tokens it was 203 + 200 at 100/s: 4 s, admitted, and then it missed its deadline
        with pytest.raises(QueueFullError, match="would finish in about 8 s") as err:
            await sched.submit(ids.items(*[100] * 2), timeout=7.0)
        assert "tokens/s here at these lengths" in str(err.value)
        backend.release()
        await asyncio.gather(blocker, long)
        await sched.stop()

    asyncio.run(main())


def test_deadline_admission_keeps_a_newcomer_from_pushing_an_admitted_request_past_its_deadline() -> None:
    """A newcomer that would itself finish in time is refused when its share would make a request admitted
    before it miss that one's deadline (it was admitted, and the earlier request ended 504 after its work)."""
    backend, ids = FakeScorer(), Ids()

    async def main() -> None:
        sched = make(backend, request_timeout=20.0)
        sched.work_per_second = 100.0  # the knee unknown: work is tokens
        blocker, _ = await block_worker(sched, backend, ids)
        big = asyncio.create_task(sched.submit(ids.items(*[80] * 10), timeout=11.0))  # 8.03 s of the 8.8 planned
        await until(lambda: sched.pending == 2)
        # its own 20 s suffice for 300 more ((min(803, 2 x 300) + 300) / 100 = 9 s); the big one's 11 s do not
        with pytest.raises(QueueFullError, match="would push a request already admitted past its deadline"):
            await sched.submit(ids.items(*[30] * 10))
        backend.release()
        await asyncio.gather(blocker, big)
        await sched.stop()

    asyncio.run(main())


def test_deadline_admission_counts_what_an_admitted_request_has_left() -> None:
    """Half of a request scored, half its work is left: a newcomer that would have pushed all of it past its
    deadline delays only the rest, in time."""
    backend, ids = FakeScorer(), Ids()

    async def main() -> None:
        sched = make(backend, request_timeout=20.0, max_batch_tokens=400)

        def second_batch(_: list[int]) -> None:
            if len(backend.batches) == 2:
                sched.work_per_second = 100.0  # as it was: the first batch's timing moved it
                backend.hold()

        backend.on_batch = second_batch
        sched.work_per_second = 100.0
        big = asyncio.create_task(sched.submit(ids.items(*[80] * 10), timeout=10.0))  # 8 s of work, 2 batches
        await backend.wait_batch_started()
        await backend.wait_batch_started()  # the second, held: 400 of work left, 4 s
        newcomer = asyncio.create_task(sched.submit(ids.items(*[30] * 10)))  # 3 s more: 7 s, in time
        await until(lambda: sched.pending == 2 or newcomer.done())
        assert not newcomer.done()  # admitted (a refusal would have ended it)
        backend.release()
        await asyncio.gather(big, newcomer)
        await sched.stop()

    asyncio.run(main())


def test_a_request_admitted_in_time_runs_first_once_a_slowdown_puts_its_deadline_at_risk() -> None:
    """Admitted at 100 work/s with two small requests after it, the big one was in time; then the batches show
    60/s (the machine slowed down): under fair shares it would finish in (200 + 400) / 60 = 10 s, past 80% of
    its ~10 s, alone in 6.7 s. Its batches run first; before, the small ones' ran first and it ended 504."""
    backend, ids = FakeScorer(), Ids()

    async def main() -> None:
        sched = make(backend, request_timeout=20.0, max_batch_tokens=200)
        sched.work_per_second = 100.0  # the knee unknown: work is tokens
        adm = sched._admission
        measured = adm.record_speed

        def slowed(*args, **kwargs):  # what the served batches show from now on
            knee = measured(*args, **kwargs)
            adm.work_per_second = 60.0
            return knee

        blocker, _ = await block_worker(sched, backend, ids)
        big_items = ids.items(*[80] * 5)
        big = asyncio.create_task(sched.submit(big_items, timeout=10.0))
        smalls = [asyncio.create_task(sched.submit(ids.items(50, 50))) for _ in range(2)]
        await until(lambda: sched.pending == 4, "the big request and two small ones admitted")
        adm.record_speed = slowed
        backend.release()
        await asyncio.gather(blocker, big, *smalls)
        after_blocker = backend.batches[1:]
        big_ids = {it.input_ids[0] for it in big_items}
        ran_big = [set(b) <= big_ids for b in after_blocker]
        assert ran_big == sorted(ran_big, reverse=True), after_blocker  # every big batch before any small one
        await sched.stop()

    asyncio.run(main())


def test_retry_after_follows_the_backlog_and_the_measured_rate() -> None:
    backend, ids = FakeScorer(), Ids()

    async def main() -> None:
        sched = make(backend, max_queue=2)
        assert sched.retry_after == 1.0  # nothing measured yet
        backend.sleep_per_token = 0.002
        await sched.submit(ids.items(*[10] * 5))  # measures at least 2 ms per token
        backend.sleep_per_token = 0.0
        blocker, _ = await block_worker(sched, backend, ids)
        backlog = asyncio.create_task(sched.submit(ids.items(*[100] * 20)))  # 2,000 tokens: >= 4 s of work
        await until(lambda: sched.pending == 2)
        with pytest.raises(QueueFullError) as full:
            await sched.submit(ids.items(1))
        assert 4.0 <= full.value.retry_after <= 60.0
        backend.release()
        await asyncio.gather(blocker, backlog)
        await sched.stop()

    asyncio.run(main())


def test_rows_that_fail_alone_fail_only_their_requests() -> None:
    """A runtime that scores a batch but for some rows (one sequence too big for the device even alone)
    fails only the requests owning those rows; the rest of that same batch is delivered."""
    backend, ids = FakeScorer(), Ids()
    oversized = ids.items(20, 20, 40)  # its last item would run in a later batch
    neighbour = ids.items(20, 20)  # same length as its first two: lands in their batch
    later = ids.items(30, 30)
    backend.fail_alone = {oversized[1].input_ids[0]}

    async def main() -> list:
        sched = make(backend, max_batch_size=4, batch_wait_ms=0)
        blocker, _ = await block_worker(sched, backend, ids)
        tasks = [asyncio.create_task(sched.submit(r)) for r in (oversized, neighbour, later)]
        await until(lambda: sched.queued == 3)
        backend.release()
        out = await asyncio.gather(blocker, *tasks, return_exceptions=True)
        await sched.stop()
        return out[1:]

    r_oversized, r_neighbour, r_later = asyncio.run(main())
    assert isinstance(r_oversized, DeviceMemoryError)
    np.testing.assert_array_equal(r_neighbour.scores, expected(neighbour))
    np.testing.assert_array_equal(r_later.scores, expected(later))
    shared = next(b for b in backend.batches if oversized[1].input_ids[0] in b)
    assert {it.input_ids[0] for it in neighbour} <= set(shared)  # really the same batch
    assert oversized[2].input_ids[0] not in {i for b in backend.batches for i in b}  # skipped once failed


def test_stop_finishes_accepted_work_then_refuses() -> None:
    backend, ids = FakeScorer(), Ids()
    requests = [ids.items(3, 9), ids.items(1), ids.items(20, 2, 5)]

    async def main() -> None:
        sched = make(backend)
        blocker, blocker_items = await block_worker(sched, backend, ids)
        tasks = [asyncio.create_task(sched.submit(r)) for r in requests]
        await until(lambda: sched.queued == 3)
        stopping = asyncio.create_task(sched.stop())
        await asyncio.sleep(0)  # stop() has refused new work and is waiting for the worker
        with pytest.raises(EngineStoppedError):
            await sched.submit(ids.items(1))
        assert not stopping.done()
        backend.release()
        out = await asyncio.gather(blocker, *tasks)
        await stopping
        np.testing.assert_array_equal(out[0].scores, expected(blocker_items))
        for items, o in zip(requests, out[1:], strict=True):
            np.testing.assert_array_equal(o.scores, expected(items))
        with pytest.raises(EngineStoppedError):
            await sched.submit(ids.items(1))

    asyncio.run(main())
    assert not [t for t in threading.enumerate() if t.name == "model-m"]


def test_model_work_runs_on_the_worker_thread_and_warmup_before_start() -> None:
    backend, ids = FakeScorer(), Ids()
    sched = make(backend)
    sched.warmup(ids.items(3, 4))  # synchronous, no worker needed
    assert backend.threads == {threading.current_thread().name}
    backend.threads.clear()

    async def main() -> None:
        await sched.start()
        items = ids.items(5)
        np.testing.assert_array_equal((await sched.submit(items)).scores, expected(items))
        empty = await sched.submit([])
        assert empty.scores.shape == (0,)
        await sched.stop()

    asyncio.run(main())
    assert backend.threads == {"model-m"}


def test_metrics_describe_the_batches() -> None:
    backend, ids, metrics = FakeScorer(), Ids(), Metrics()
    requests = [ids.items(3, 9, 4), ids.items(1, 30), ids.items(12)]

    async def main() -> None:
        sched = make(backend, metrics, max_batch_size=2)
        blocker, _ = await block_worker(sched, backend, ids)
        tasks = [asyncio.create_task(sched.submit(r)) for r in requests]
        await until(lambda: sched.queued == 3)
        assert metrics.registry.get_sample_value("openrerank_queue_depth", {"model": "m"}) == 4
        backend.release()
        await asyncio.gather(blocker, *tasks)
        await sched.stop()

    asyncio.run(main())
    value = metrics.registry.get_sample_value
    lab = {"model": "m", "task": "rerank"}
    n_batches = len(backend.lengths)
    assert value("openrerank_batch_size_count", lab) == n_batches
    assert value("openrerank_batch_size_sum", lab) == sum(len(b) for b in backend.lengths)
    assert value("openrerank_batch_padded_tokens_sum", lab) == sum(len(b) * max(b) for b in backend.lengths)
    padding = sum(1 - sum(b) / (len(b) * max(b)) for b in backend.lengths)
    assert value("openrerank_batch_padding_ratio_sum", lab) == pytest.approx(padding)
    assert value("openrerank_inference_seconds_count", lab) == n_batches
    assert value("openrerank_queue_seconds_count", lab) == 4
    assert value("openrerank_queue_depth", {"model": "m"}) == 0


class GridRuntime(Runtime):
    """Pads a batch to a grid of 4 rows and 8 columns, as OpenVINO's buckets do, and reports that shape; counts how
    often the attention mask is summed (what the tally costs)."""

    input_names = ("input_ids", "attention_mask")
    description = "grid-fp32-cpu"

    def __init__(self) -> None:
        self.mask_sums = 0

    def padded_shape(self, rows, width):
        return -(-rows // 4) * 4, -(-width // 8) * 8

    def run(self, features: dict[str, np.ndarray]) -> np.ndarray:
        mask = features["attention_mask"]
        runtime = self

        class Counted:
            def sum(self) -> int:
                runtime.mask_sums += 1
                return int(mask.sum())

        computed(*self.padded_shape(*mask.shape), Counted())
        return features["input_ids"][:, 0].astype(np.float32)


@pytest.mark.parametrize("with_metrics", [True, False])
def test_a_batch_the_runtime_pads_to_its_grid_is_recorded_at_the_grid_size(with_metrics: bool) -> None:
    """The padding metrics read the shape the runtime ran: 3 pairs of 9, 7 and 5 tokens run as 4 x 16 (64 tokens,
    21 real), where the items alone say 3 x 9. Without metrics nothing is tallied: the mask is never summed."""
    runtime, metrics = GridRuntime(), Metrics() if with_metrics else None
    items = [PairItem([i] * n) for i, n in zip((11, 12, 13), (9, 7, 5), strict=True)]

    async def main() -> np.ndarray:
        sched = Scheduler(PairScorer(runtime, pad_id=0), SchedulerConfig(CPU_POLICY), name="m", metrics=metrics)
        await sched.start()
        scores = (await sched.submit(items)).scores
        await sched.stop()
        return scores

    np.testing.assert_array_equal(asyncio.run(main()), [11, 12, 13])
    if metrics is None:
        assert runtime.mask_sums == 0
        return
    value = metrics.registry.get_sample_value
    lab = {"model": "m", "task": "rerank"}
    assert value("openrerank_batch_size_sum", lab) == 3
    assert value("openrerank_batch_padded_tokens_sum", lab) == 64
    assert value("openrerank_batch_padding_ratio_sum", lab) == pytest.approx(1 - 21 / 64)


class _DyingScorer:
    """Raises what no batch handler catches, as an interpreter-level failure would."""

    def score(self, items):
        raise SystemExit("worker killed")


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # the death is the point
def test_alive_reports_a_stopped_or_dead_worker() -> None:
    ids = Ids()

    async def main() -> None:
        sched = make(FakeScorer())
        assert sched.alive  # never started: nothing has died
        await sched.start()
        assert sched.alive
        await sched.stop()
        assert not sched.alive
        dying_backend = FakeScorer()
        dying_backend.inner = _DyingScorer()  # type: ignore[assignment]
        dying = make(dying_backend)
        await dying.start()
        with pytest.raises(WorkerDiedError):  # settled at once, not left to its deadline
            await dying.submit(ids.items(2), timeout=30)
        assert not dying.alive

    asyncio.run(main())

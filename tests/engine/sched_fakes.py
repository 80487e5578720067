"""Fakes for the scheduler tests: a backend that records batches and can be held or made to fail.

Imported by the test files of this folder.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Sequence

import numpy as np

from openrerank.core.work import PairItem
from openrerank.engine.rates import work_of
from openrerank.families.scorer import Scorer
from openrerank.runtimes.base import DeviceMemoryError, RowsFailedError, computed

WAIT_S = 30.0  # generous: only reached when something is broken


class BoomError(RuntimeError):
    pass


class FatalError(BaseException):
    """Escapes the scheduler's per-batch error handling: it kills the worker thread."""


class FakeScorer(Scorer):
    """Scores an item as its id (its first token); records each batch's ids and the thread it ran on, and reports
    the batch's shape as computed (`runtimes/base.computed`), as a runtime without a grid would.

    `hold()` makes the next batches block inside `score` until `release()`, so a test can stack up
    requests behind a running batch deterministically. Ids in `fail_on` make their batch raise.
    """

    lanes = 1  # batches the scheduler may run at once (a test sets 2 to run lanes)

    def padded_shape(self, rows: int, width: int) -> tuple[int, int]:
        return rows, width  # no runtime grid: the batches a test expects are cut on exact lengths

    def __init__(self) -> None:
        self.pad_id = 0
        self.inner: Scorer | None = None  # when set, scores come from it (real-model tests)
        self.batches: list[list[int]] = []
        self.items_seen: list[list[PairItem]] = []
        self.lengths: list[list[int]] = []
        self.threads: set[str] = set()
        self.fail_on: set[int] = set()
        self.fail_with: Callable[[str], Exception] = BoomError  # what a batch with an id of `fail_on` raises
        self.fail_alone: set[int] = set()
        self.fatal_on: set[int] = set()
        self.on_batch: Callable[[list[int]], None] | None = None  # called as each batch enters score()
        self.sleep_per_token = 0.0
        self.sleep_knee: float | None = None  # with it, a token of an L-token item sleeps 1 + L/knee times as long
        self._gate = threading.Event()
        self._gate.set()
        self.started = threading.Semaphore(0)  # released once per batch that enters score()

    def hold(self) -> None:
        self._gate.clear()

    def release(self) -> None:
        self._gate.set()

    def score(self, items: Sequence[PairItem]) -> np.ndarray:
        ids = [it.input_ids[0] for it in items]
        self.batches.append(ids)
        self.items_seen.append(list(items))
        self.lengths.append([it.length for it in items])
        self.threads.add(threading.current_thread().name)
        self.started.release()
        if self.on_batch is not None:
            self.on_batch(ids)
        if not self._gate.wait(WAIT_S):
            raise TimeoutError("test never released the fake backend")
        if self.sleep_per_token:
            time.sleep(self.sleep_per_token * work_of([it.length for it in items], self.sleep_knee))
        if self.fatal_on.intersection(ids):
            raise FatalError(f"fatal batch {ids}")
        if self.fail_on.intersection(ids):
            raise self.fail_with(f"poisoned batch {ids}")
        if self.inner is not None:
            return self.inner.score(items)
        lengths = np.array([it.length for it in items])
        computed(len(items), lengths.max(), np.arange(lengths.max()) < lengths[:, None])  # as a runtime does
        scores = np.asarray(ids, dtype=np.float32)
        failed = [row for row, i in enumerate(ids) if i in self.fail_alone]
        if failed:
            scores[failed] = np.nan
            raise RowsFailedError(scores, failed, DeviceMemoryError(f"rows {failed} do not fit"))
        return scores

    async def wait_batch_started(self) -> None:
        """Wait (off the loop) until one more batch has entered score()."""
        ok = await asyncio.to_thread(self.started.acquire, True, WAIT_S)
        assert ok, "no batch started"


class Ids:
    """Hands out unique item ids so every score says which item it belongs to."""

    def __init__(self) -> None:
        self._next = 1

    def items(self, *lengths: int) -> list[PairItem]:
        out = []
        for n in lengths:
            out.append(PairItem([self._next] + [7] * (n - 1), None))
            self._next += 1
        return out


async def until(cond: Callable[[], bool], what: str = "condition") -> None:
    """Poll a condition on the event loop; fails only if it never holds within WAIT_S."""
    loop = asyncio.get_running_loop()
    end = loop.time() + WAIT_S
    while not cond():
        if loop.time() > end:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.002)


def expected(items: Sequence[PairItem]) -> np.ndarray:
    return np.asarray([it.input_ids[0] for it in items], dtype=np.float32)

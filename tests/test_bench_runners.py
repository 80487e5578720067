"""`openrerank bench`'s in-process runner: what "first request ÷ warm" and the best round are made of, on a fake
served model and a fake clock (the real engines' latencies are the bench's to measure)."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest
from openrerank_bench import runners
from openrerank_bench.runners import OfflineRunner, best_round
from openrerank_bench.workload import Workload


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def perf_counter(self) -> float:
        return self.now


def _runner(clock: _Clock, latencies_of_first: list[float]) -> OfflineRunner:
    """An OfflineRunner whose served model takes `latencies_of_first[i]` seconds on the i-th call with the
    workload's first query (each round sends it twice: a warm-up, which in round 1 is the first request after
    `ready`, then measured) and 0.1 s on any other."""
    calls = iter(latencies_of_first)

    async def rerank(req):
        clock.now += next(calls) if req.query == "q0" else 0.1
        return SimpleNamespace(timings=SimpleNamespace(inference_ms=1.0), logits=[0.0] * len(req.passages))

    runner = object.__new__(OfflineRunner)
    runner.loop = asyncio.new_event_loop()
    runner.served = SimpleNamespace(rerank=rerank)
    runner.load_seconds, runner.description = 0.0, "fake"
    runner.first_request_ms, runner.warm_request_ms = None, []
    return runner


def test_warm_is_the_median_of_the_first_requests_own_request_over_every_round(monkeypatch):
    """Before, warm was that request once, in round 1: one fast warm sample (150 ms against 300-310 ms in the
    other rounds) made a first request of 300 ms read 2.00x. Now it reads 1.00x, and the range against each
    round's warm latency shows the noisy round."""
    clock = _Clock()
    monkeypatch.setattr(runners, "time", clock)
    runner = _runner(clock, [0.300, 0.150, 0.250, 0.300, 0.250, 0.310])
    wl = Workload(queries=["q0", "q1"], passages=[["a", "b"], ["c", "d"]])
    try:
        for _ in range(3):
            runner.measure(wl)
    finally:
        runner.loop.close()
    assert runner.first_request_ms == pytest.approx(300.0)
    assert runner.warm_request_ms == pytest.approx([150.0, 300.0, 310.0])
    from openrerank_bench.runners import first_request_summary

    out = first_request_summary(runner.first_request_ms, runner.warm_request_ms)
    assert out == {"first_ms": 300.0, "warm_ms": 300.0, "warm_ms_rounds": [150.0, 300.0, 310.0], "ratio": 1.0,
                   "ratio_range": [0.97, 2.0]}


def test_the_best_round_keeps_every_rate_in_round_order_and_their_median():
    out = best_round([{"pairs_per_s": 226.0, "round": 1}, {"pairs_per_s": 304.0, "round": 2},
                      {"pairs_per_s": 250.0, "round": 3}])
    assert out["round"] == 2 and out["pairs_per_s"] == 304.0
    assert out["rounds_pairs_per_s"] == [226.0, 304.0, 250.0] and out["median_pairs_per_s"] == 250.0
    assert out["spread"] == pytest.approx(round(78 / 304, 3))

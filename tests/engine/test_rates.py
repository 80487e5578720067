"""The model's rate as the served batches show it (engine/rates.py `ServedRate`, fed by admission's
`record_speed`): every batch counts, weighed by its seconds. No test times anything: batches are given as
(work, seconds)."""

from __future__ import annotations

import pytest

from openrerank.engine.admission import AdmissionQueue, SchedulerConfig
from openrerank.engine.rates import BUDGET_SHARE, RATE_MEMORY_S, RATE_PRIOR_S, ServedRate

WARMUP = 1200.0  # work per second, as a warm-up timed it


def served(rate: ServedRate, work_per_s: float, seconds: float, each: float) -> ServedRate:
    """`rate` after `seconds` of batches of `each` seconds running at `work_per_s`."""
    for _ in range(round(seconds / each)):
        rate = rate.after(work_per_s * each, each)
    return rate


def test_a_stream_of_small_batches_moves_the_rate_to_what_they_run_at():
    """The batches of 5-passage requests ran at about half the warm-up's rate on a loaded 2-core EPYC. Only
    batches of a quarter of --max-batch-tokens (4,096 tokens) moved the rate, so it stayed the warm-up's, the
    deadline checks planned twice the speed there was, and a big request admitted before them ended 504."""
    adm = AdmissionQueue(SchedulerConfig(request_timeout=20.0))  # the knee unknown: work is tokens
    adm.work_per_second = WARMUP
    for _ in range(60):  # 24 s of batches of 4 x 50 tokens, 0.4 s each: 500 per second
        adm.record_speed(0.4, [50] * 4)
    assert adm.work_per_second == pytest.approx(500.0, rel=0.02)
    # (the per-request budget keeps the warm-up's rate as its floor: test_admission.py)
    assert adm.request_budget == pytest.approx(WARMUP * 20.0 * BUDGET_SHARE)


def test_each_batch_weighs_by_its_seconds():
    """A hundred 10 ms batches move the rate as one 1 s batch of the same work does: the rate is work done
    over model seconds taken, so small batches count for what they cost, neither more nor less."""
    start = ServedRate.starting(WARMUP)
    many = served(start, 500.0, 1.0, each=0.01)
    one = start.after(500.0, 1.0)
    assert many.rate == pytest.approx(one.rate)
    assert many.rate < 0.8 * WARMUP
    # and a batch's own speed matters in proportion to its time: a 10 ms batch barely moves it
    assert start.after(5.0, 0.01).rate > 0.99 * WARMUP


def test_the_served_seconds_soon_outweigh_the_warm_up():
    """The starting rate weighs as `RATE_PRIOR_S` of batches: after one memory's worth of model time at another
    speed the rate is within 10% of that speed; older batches fade (by e every `RATE_MEMORY_S`)."""
    start = ServedRate.starting(WARMUP)
    assert start.rate == WARMUP and start.seconds == RATE_PRIOR_S
    assert served(start, 500.0, RATE_PRIOR_S, each=0.1).rate < 0.75 * WARMUP
    assert served(start, 500.0, RATE_MEMORY_S, each=0.1).rate == pytest.approx(500.0, rel=0.1)
    later = served(served(start, 500.0, 3 * RATE_MEMORY_S, each=0.5), 1000.0, 3 * RATE_MEMORY_S, each=0.5)
    assert later.rate == pytest.approx(1000.0, rel=0.05)


def test_a_rate_not_measured_starts_with_the_first_batch():
    assert ServedRate.starting(None).rate is None
    assert ServedRate.starting(None).after(300.0, 0.5).rate == pytest.approx(600.0)
    # a batch that ran beside another, whose seconds were handed to that one (batch_runner.BusyClock): its work
    # counts in the same seconds (two lanes, each 600 work in the same second: 1,200 per second)
    beside = ServedRate().after(600.0, 1.0).after(600.0, 0.0)
    assert beside.rate == pytest.approx(1200.0, rel=0.05)  # (the first faded over its second)
    assert ServedRate().after(300.0, 0.0).rate is None  # no seconds at all yet: nothing to divide by


def test_a_new_knee_reweighs_the_work_not_the_seconds():
    rate = served(ServedRate.starting(WARMUP), 500.0, 5.0, each=0.5)
    moved = rate.reweighed(1.5)
    assert moved.rate == pytest.approx(1.5 * rate.rate)
    assert moved.after(750.0, 1.0).rate == pytest.approx(1.5 * rate.after(500.0, 1.0).rate)

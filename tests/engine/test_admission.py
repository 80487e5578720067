"""Admission's arithmetic (work, and a rate timed on some shapes as work per second) and its deadline checks."""

from __future__ import annotations

import asyncio

import pytest

from openrerank.engine.admission import AdmissionQueue, SchedulerConfig
from openrerank.engine.errors import DeadlinePushedError, DeadlineUnreachableError, QueueFullError
from openrerank.engine.pending import PendingRequest
from openrerank.engine.rates import (
    DEADLINE_SHARE,
    at_risk,
    finish_estimate,
    pushed_past_deadline,
    work_of,
    work_rate,
)
from tests.engine.sched_fakes import Ids


def test_work_counts_each_token_of_an_l_token_sequence_one_plus_l_over_the_knee():
    assert work_of([100, 300], 100.0) == pytest.approx(100 * 2 + 300 * 4)
    assert work_of([100, 300], None) == 400  # the shape unknown: tokens


def test_a_rate_timed_on_two_shapes_becomes_work_per_second():
    # the engine choice's shapes: 8 x 128 and 4 x 256 tokens, at 1,000 tokens/s over the two
    knee = 6 * 384
    rate = work_rate(1000.0, ((8, 128), (4, 256)), knee)
    assert rate == pytest.approx(1000 * (1024 * (1 + 128 / knee) + 1024 * (1 + 256 / knee)) / 2048)
    assert work_rate(1000.0, ((8, 128), (4, 256)), None) == 1000.0
    # so a request of 512-token pairs is expected to take (1 + 512/knee) / (1 + 192/knee) of what its tokens
    # at the timed rate would say: 1.13x for MiniLM
    seconds = finish_estimate(work_of([512] * 10, knee), 0, 0, rate)
    assert seconds / (5120 / 1000) == pytest.approx((1 + 512 / knee) / (1 + 192 / knee))


# -- an admitted request is not pushed past its deadline by later newcomers ---------------------------------

RATE = 100.0  # work per second, fixed: no test below times anything
NOW = 1000.0  # a time.monotonic() instant


def test_a_newcomer_that_would_push_an_admitted_request_past_its_deadline_is_named():
    # alone behind nothing, 800 of work left finishes in 8 s; a newcomer of 300 delays it by 3 s, past 10 s
    # (share=1: no margin, the arithmetic alone)
    assert pushed_past_deadline(300.0, [(800.0, 10.0)], RATE, 1.0) == pytest.approx((8.0, 11.0, 10.0))
    assert pushed_past_deadline(200.0, [(800.0, 10.0)], RATE, 1.0) is None  # 10 s: just in time
    # under max-min fairness a big newcomer delays a small request by the small one's work only
    assert pushed_past_deadline(5000.0, [(100.0, 2.5)], RATE, 1.0) is None  # 1 s, then 2 s
    # each admitted one is estimated behind the others as a newcomer is: 300 left behind 800 and 100 finishes
    # after min(900, 2 x 300) + 300 = 900 of work: 9 s, and 10 s with a newcomer of 100
    assert pushed_past_deadline(100.0, [(800.0, 60.0), (300.0, 9.5), (100.0, 60.0)], RATE, 1.0) == pytest.approx(
        (9.0, 10.0, 9.5))


def test_newcomers_fill_at_most_the_deadline_share_of_an_admitted_requests_time():
    """A margin: the rate of the last seconds is no promise for the next ones."""
    assert DEADLINE_SHARE < 1
    # 800 left finishes in 8 s of its 10: 200 more would end it at exactly 10 s, past the planned share
    assert pushed_past_deadline(200.0, [(800.0, 10.0)], RATE) == pytest.approx((8.0, 10.0, 10.0))
    fits = (DEADLINE_SHARE * 10.0 - 8.0) * RATE  # the work that still fits into the share
    assert pushed_past_deadline(fits * 0.99, [(800.0, 10.0)], RATE) is None
    assert pushed_past_deadline(fits * 1.01 + 1, [(800.0, 10.0)], RATE) is not None


def test_a_request_that_misses_its_deadline_anyway_does_not_refuse_every_newcomer():
    assert pushed_past_deadline(300.0, [(800.0, 7.0)], RATE) is None  # 8 s already: it ends 504 either way
    # but the one beside it still in time is: 100 left finishes in 2 s behind it, in 3 s with the newcomer
    assert pushed_past_deadline(300.0, [(800.0, 7.0), (100.0, 2.5)], RATE) == pytest.approx((2.0, 3.0, 2.5))


@pytest.fixture
def loop():
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


def admission() -> AdmissionQueue:
    adm = AdmissionQueue(SchedulerConfig(request_timeout=20.0))
    adm.work_per_second = RATE  # one request may hold 1,000 of work, the queue 2,000
    return adm


def admit(adm: AdmissionQueue, loop: asyncio.AbstractEventLoop, ids: Ids, work: int, left: float
          ) -> PendingRequest:
    """Admit a request of `work` tokens (knee unknown: work = tokens) due `left` seconds after NOW."""
    req = PendingRequest(ids.items(*[work // 10] * 10), loop)
    req.work, req.deadline = adm.weigh(req.items), NOW + left
    with adm.cv:
        assert adm.refusal_locked(req.tokens, req.work, req.deadline, NOW) is None
        adm.accept_locked(req)
    return req


def test_admission_refuses_a_newcomer_that_would_push_an_admitted_request_past_its_deadline(loop):
    adm, ids = admission(), Ids()
    big = admit(adm, loop, ids, 800, left=12.5)  # 8 s of work; the planned share of its time: 10 s
    admit(adm, loop, ids, 100, left=20.0)  # it delays the big one by 1 s: admitted
    with adm.cv:
        # 300 more would finish by itself in (min(900, 2 x 300) + 300) / 100 = 9 s, but the big one in 12 s
        refusal = adm.refusal_locked(300, 300.0, NOW + 20.0, NOW)
    assert isinstance(refusal, DeadlinePushedError) and isinstance(refusal, QueueFullError)  # 503/429
    assert "would push a request already admitted past its deadline" in str(refusal)
    assert "finish in about 12.0 s instead of 9.0 s, its deadline is in 12.5 s" in str(refusal)
    assert refusal.retry_after >= 1.0
    adm.release(big)  # answered: its deadline binds no one any more
    with adm.cv:
        assert adm.refusal_locked(300, 300.0, NOW + 20.0, NOW) is None


def test_admission_weighs_an_admitted_request_by_the_work_it_has_left(loop):
    adm, ids = admission(), Ids()
    big = admit(adm, loop, ids, 800, left=10.0)
    big.left_tokens = 400  # half of it scored (batch_runner): 4 s left, so 3 s more still fit
    with adm.cv:
        assert adm.refusal_locked(300, 300.0, NOW + 20.0, NOW) is None
    big.abandoned = True  # timed out or cancelled, not yet released: nothing of it will run
    big.left_tokens = 800
    with adm.cv:
        assert adm.refusal_locked(300, 300.0, NOW + 20.0, NOW) is None


def test_admission_does_not_protect_a_request_already_past_saving(loop):
    adm, ids = admission(), Ids()
    admit(adm, loop, ids, 800, left=7.0)  # at an idle model: admitted, 8 s of work before a 7 s deadline
    with adm.cv:
        assert adm.refusal_locked(300, 300.0, NOW + 22.0, NOW + 2.0) is None  # 2 s later, none of it scored


def test_admission_plans_by_the_rate_the_served_small_batches_show(loop):
    """A big request admitted by the warm-up's rate, then a stream of small requests whose small batches run
    at 40% of it (a loaded CPU): a newcomer that fit at the warm-up's rate now pushes the big one past its
    deadline, and is refused. Small batches did not move the rate, and the big request ended 504."""
    adm, ids = AdmissionQueue(SchedulerConfig(request_timeout=60.0)), Ids()  # budgets far from binding
    adm.work_per_second = RATE
    admit(adm, loop, ids, 600, left=20.0)  # 6 s at the warm-up's 100/s, 15 s at 40/s
    with adm.cv:  # at 100/s it finishes in 6 + 3 s
        assert adm.refusal_locked(300, 300.0, NOW + 60.0, NOW) is None
    for _ in range(50):  # 25 s of small batches: 20 of work in 0.5 s
        adm.record_speed(0.5, [5] * 4)
    assert adm.work_per_second == pytest.approx(40.0, rel=0.05)
    with adm.cv:  # at 40/s: 15 s, and 22.5 s with the newcomer, past its 20 s
        refusal = adm.refusal_locked(300, 300.0, NOW + 60.0, NOW)
    assert isinstance(refusal, DeadlinePushedError)


def test_the_request_budget_never_falls_below_the_rate_the_model_started_from():
    """Slow batches (a loaded machine, a mix of small ones) lower the rate the deadline checks plan with, but a
    request is refused as too large (400) only if it could not finish even at the model's own speed: the
    budget fell with the served rate, and a request that ran in 2 s was refused on a busy 2-core machine."""
    adm = AdmissionQueue(SchedulerConfig(request_timeout=20.0))
    adm.work_per_second = RATE
    start = adm.request_budget
    for _ in range(50):  # 25 s of batches at 40/s
        adm.record_speed(0.5, [5] * 4)
    assert adm.work_per_second == pytest.approx(40.0, rel=0.05)  # what the deadline checks use
    assert adm.request_budget == start == 1000  # RATE x 20 s x BUDGET_SHARE
    assert adm.over_budget(1000, 1000.0) is None and adm.over_budget(1001, 1001.0) is not None
    assert "~100 tokens/s" in adm.budget_reason(1001, 1001.0)
    for _ in range(50):  # faster batches than the start raise it
        adm.record_speed(0.1, [50] * 4)
    assert adm.request_budget > start


def test_at_risk_names_the_requests_fairness_would_make_late_but_priority_would_not():
    """(work left, seconds to the deadline) at 100 work/s: under fair shares the first finishes in
    (300 + 400) / 100 = 7 s, past 80% of its 8 s, and alone in 4 s; the second is in time either way."""
    assert at_risk([(400.0, 8.0), (300.0, 20.0)], RATE) == [0]
    assert at_risk([(400.0, 10.0), (300.0, 20.0)], RATE) == []  # 7 s of 10: within the share
    assert at_risk([(900.0, 8.0), (300.0, 20.0)], RATE) == []  # 9 s alone: late anyway, no priority
    assert at_risk([(400.0, float("inf")), (100.0, 2.0)], RATE) == [1]  # no deadline, never at risk
    assert at_risk([(400.0, 8.0), (400.0, 7.0)], RATE) == [1, 0]  # earliest deadline first


def test_a_deadline_refusal_names_what_set_the_deadline_in_seconds_a_client_can_read():
    """A client's deadline of a few milliseconds read "too close to its deadline in -0 s (--request-timeout"."""
    refusal = DeadlineUnreachableError(0.75, -0.004, 1_700.0, 1.0)
    assert "finish in about 0.75 s" in str(refusal) and "deadline in 0 s (--request-timeout;" in str(refusal)
    named = refusal.set_by("the client's gRPC deadline")
    assert "deadline in 0 s (the client's gRPC deadline;" in str(named) and named.retry_after == 1.0
    assert "finish in about 17 s" in str(DeadlineUnreachableError(17.2, 30.0, 1_700.0, 1.0))


def test_retry_after_is_at_most_a_minute_whatever_the_backlog():
    """A backlog of hours at the measured rate still says Retry-After 60 (clients that honour it, such as the
    OpenAI and Cohere SDKs, would otherwise wait that long), and 1 s with nothing pending."""
    adm = AdmissionQueue(SchedulerConfig())
    adm.work_per_second = 1.0
    with adm.cv:
        assert adm.retry_after_locked() == 1.0
        adm.pending_work = 10_000.0
        assert adm.retry_after_locked() == 60.0

"""Admission's rate arithmetic: what a request's sequences cost (work), the model's measured rate in work per
second, and the estimates admission makes from it. Pure: the state is `admission.AdmissionQueue`'s.

Admission by measured speed. A fixed token budget assumed a speed the machine may not have (983,040 tokens
assumed ~8k tokens/s; a MiniLM cross-encoder scores ~3k/s on a small CPU, so a request admitted under it ran
120 s and ended 504).
Instead the model's rate is measured when it is warmed up (`measure_rate`: warm-up batches growing until
one takes about `WARMUP_TARGET_S`), and:

- one request may hold what the model scores in `BUDGET_SHARE` of `--request-timeout` at that rate
  (`budget_for`); more is refused at once (400; TEI 422) naming the rate, since it could not finish even
  alone. `--max-request-tokens` overrides it.
- a request that fits the budget but would not finish before its deadline behind the work already pending
  (each pending request scores at most as many tokens as the newcomer before it is done, the planner
  being max-min fair) is refused at once with 503 (TEI/Cohere 429) and Retry-After (`finish_estimate`).
- so is one that would push a request admitted before it past that one's deadline (`pushed_past_deadline`):
  newcomers are scored beside the pending requests, so a stream of small ones made a big one end 504.
- both plan work into at most `DEADLINE_SHARE` of the time left to a deadline: the rest is margin for a
  machine whose speed changes faster than the measured rate follows.

`Scheduler.work_per_second` holds the rate; whoever knows a better one (the engine choice times each
candidate runtime on the loaded model) may set it before the model serves. While serving, every batch moves
it (`ServedRate`: the recent batches' work over the model seconds they took), so the budget and the
estimates follow what the scheduler achieves: a warm-up timed on a busy machine does not shrink the budget
for good (nor does a moment of slow batches: the budget keeps the starting rate as its floor,
`AdmissionQueue.budget_rate`), and a stream of small requests, whose small batches score less per
second, is planned at the speed its batches get. (Only batches of a quarter of the batch token limit used
to move it; the CPU's batching, at most 2% padding, seldom makes one of passages of mixed lengths, so the
rate stayed the warm-up's while the batches ran at half of it, and a big request admitted before a stream
of small ones ended 504: docs/reliability.md.)

Work, not tokens. Attention costs a token more the longer its sequence (`families/cost.py`: a token of an
L-token sequence costs 1 + L/knee tokens of a short one; knee = 6 x hidden size for BERT), so the measured
budgets count *work*: `work_of`, each sequence's tokens times 1 + L/knee, and rates are work per second.
Counted in tokens, a rate timed on 128-256-token batches promised 2,048-token sequences 2.0-2.6x the speed
they get; weighed, 1.1-1.5x, and 0.9-1.2x once the knee is fitted from the served batches (`knee_fit.py`:
OpenVINO's attention runs slower per FLOP than its matrix products; docs/reliability.md,
`benchmarks/admission_widths.py`). Clients still read
tokens: a refusal names the limit in tokens at the request's own lengths. The operator's explicit
`--max-request-tokens` and `--max-queue-tokens` count tokens, as they say.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass

from openrerank.core.work import WorkItem

#: Share of the request timeout one request's work may take at the measured rate (the rest: queueing,
#: tokenization, and a rate measured on a machine that may get busier).
BUDGET_SHARE = 0.5
#: Warm-up batches grow until one takes about this long (or reaches the batch token limit).
WARMUP_TARGET_S = 0.5


def work_of(lengths: Sequence[int], knee: float | None) -> float:
    """What sequences of these lengths cost, in tokens of a short sequence (module docstring); tokens when
    the knee is unknown."""
    if not knee:
        return float(sum(lengths))
    return float(sum(n * (1 + n / knee) for n in lengths))


def work_rate(tokens_per_s: float, shapes: Sequence[tuple[int, int]], knee: float | None) -> float:
    """A rate in tokens/s, timed on batches of these (rows, width) shapes, as work per second."""
    tokens = sum(rows * width for rows, width in shapes)
    return tokens_per_s * work_of([w for rows, w in shapes for _ in range(rows)], knee) / max(1, tokens)


#: The served rate's memory, in seconds of model time: a batch weighs 1/e as much once the model has run this
#: long since (~10-30 CPU batches of a MiniLM).
RATE_MEMORY_S = 10.0
#: What the rate the model starts with (the warm-up's timing, the engine choice's, or a kept record's) weighs,
#: in seconds of served batches: about what the warm-up timed, so the first served seconds soon outweigh it.
RATE_PRIOR_S = 1.0


@dataclass(frozen=True)
class ServedRate:
    """The rate the scheduler achieves under the current mix of batches: the work of the recent batches over
    the model seconds they took, every batch counted for the time it ran, the model time run since fading it
    by e every `RATE_MEMORY_S` (an exponential moving average over model time of the speed batches ran at:
    ten 0.1 s batches count as one 1 s batch of their work). Small batches count for what they cost, so the
    rate is what the next seconds of batches like these will score: what admission's estimates need.
    Idle time counts for nothing (nothing is learnt while nothing runs)."""

    work: float = 0.0  # the recent batches' work, faded
    seconds: float = 0.0  # their model seconds, faded alike

    @classmethod
    def starting(cls, rate: float | None) -> ServedRate:
        """Before any batch: `rate` (None: unknown), weighing as `RATE_PRIOR_S` of batches."""
        return cls(rate * RATE_PRIOR_S, RATE_PRIOR_S) if rate else cls()

    @property
    def rate(self) -> float | None:
        """Work per second; None until measured."""
        return self.work / self.seconds if self.seconds > 0 else None

    def after(self, work: float, seconds: float) -> ServedRate:
        """With one more batch of `work` that took `seconds` (0: a batch that ran beside another, whose seconds
        were counted with that one's: its work counts, no time passes)."""
        if seconds <= 0:
            return ServedRate(self.work + work, self.seconds) if self.seconds > 0 else self
        keep = math.exp(-seconds / RATE_MEMORY_S)
        span = RATE_MEMORY_S * (1 - keep)  # its seconds, each faded by the rest of the batch
        return ServedRate(self.work * keep + work / seconds * span, self.seconds * keep + span)

    def reweighed(self, ratio: float) -> ServedRate:
        """The same batches with their work counted `ratio` times as much (a new knee)."""
        return ServedRate(self.work * ratio, self.seconds)


def budget_for(work_per_second: float, timeout: float) -> int:
    """Work one request may hold: what the model scores in BUDGET_SHARE of the timeout."""
    return max(1, int(work_per_second * timeout * BUDGET_SHARE))


def finish_estimate(work: float, pending_requests: int, pending_work: float, work_per_second: float) -> float:
    """Seconds until a newcomer of `work` is scored behind the pending work, under max-min fairness: each
    pending request is scored at most as much more as the newcomer before the newcomer is done."""
    ahead = min(pending_work, pending_requests * work)
    return (ahead + work) / work_per_second


#: Admission plans work into at most this share of the time to a deadline, the newcomer's and those of the
#: requests admitted before it; the rest is margin. The rate of the last seconds is no promise for the next:
#: on a shared 2-core EPYC the batches' speed swung 690-1,580 work/s between 10 s spans, and with no margin a
#: stream of small newcomers filled a big request's spare time until any slowdown made it end 504.
DEADLINE_SHARE = 0.8


#: A request cancelled with this little of its deadline left ended by that deadline, not by its client going away:
#: a client's own timer (a gRPC deadline) runs ahead of the server's copy, set when the call's headers arrived,
#: so its cancellation arrives while the server's copy still has a few ms left (0.5-7 ms seen on loopback,
#: 300-passage calls on a busy 2-core machine).
DEADLINE_MARGIN_S = 0.1


def drain_order(pending: Sequence[float], left: float, work_per_second: float | None, promised: Collection[int] = ()
                ) -> tuple[list[tuple[int, float]], list[tuple[int, float]]]:
    """The server is shutting down with `left` seconds of grace: the pending requests, of `pending` as work left,
    split into those that finish in time when served one after another, shortest first (which finishes the
    most of them by a common deadline), and those that would not even so; each as (index, estimated finish in
    seconds). Without a rate every request is kept, shortest first.

    A request is kept if it would finish within `DEADLINE_SHARE` of the time left, the margin admission plans
    with: planned to the last second, a request finished just after the end at a slightly slower rate, and was
    answered 503 then with its scoring wasted. Those of `promised` (indices kept by an earlier plan of this
    drain) come first, shortest first, and stay kept while they would finish by the end itself: admission's
    promise, which a request admitted in time keeps until it would miss its deadline outright
    (`pushed_past_deadline`); dropping one for a moment of slow batches would waste the scoring it had."""
    promised = set(promised)
    order = sorted(range(len(pending)), key=lambda i: (i not in promised, pending[i]))
    if not work_per_second:
        return [(i, 0.0) for i in order], []
    kept, doomed, done = [], [], 0.0
    for i in order:
        finish = done + pending[i] / work_per_second
        if finish <= (left if i in promised else DEADLINE_SHARE * left):
            kept.append((i, finish))
            done = finish
        else:
            doomed.append((i, finish))
    return kept, doomed


def at_risk(pending: Sequence[tuple[float, float]], work_per_second: float, share: float = DEADLINE_SHARE
            ) -> list[int]:
    """The pending requests, of `pending` as (work left, seconds to its deadline), that under max-min fairness
    would finish past `share` of their time left at this rate, yet would still make their deadline if served
    first: the planner gives them their whole need before fair shares, earliest deadline first (admission's
    promise, kept when the machine slows down after it was made). One that misses its deadline even so gets
    no priority: it would take the others' time and end 504 anyway."""
    total = sum(left_work for left_work, _ in pending)
    others = len(pending) - 1
    risky = []
    for i, (left_work, left) in enumerate(pending):
        if left_work <= 0 or left == float("inf"):
            continue
        finish = finish_estimate(left_work, others, total - left_work, work_per_second)
        if finish > share * left and left_work / work_per_second <= left:
            risky.append(i)
    return sorted(risky, key=lambda i: pending[i][1])


def pushed_past_deadline(work: float, admitted: Sequence[tuple[float, float]], work_per_second: float,
                         share: float = DEADLINE_SHARE) -> tuple[float, float, float] | None:
    """A pending request, of `admitted` as (work left, seconds to its deadline), that a newcomer of `work` would
    push past `share` of its time left, as (its finish without the newcomer, with it, seconds left), or None.
    Its finish is estimated as a newcomer's (`finish_estimate`); under max-min fairness the newcomer delays it
    by at most min(work, its work left) / rate. One that misses its deadline anyway is not protected: it would
    have every newcomer refused until it ends 504."""
    total = sum(left_work for left_work, _ in admitted)
    others = len(admitted) - 1
    for left_work, left in admitted:
        finish = finish_estimate(left_work, others, total - left_work, work_per_second)
        pushed = finish + min(work, left_work) / work_per_second
        if finish <= left and pushed > share * left:
            return finish, pushed, left
    return None


def measure_rate(compute: Callable[[Sequence[WorkItem]], object], item: WorkItem, max_tokens: int,
                 knee: float | None = None) -> float:
    """Work per second of `compute` on batches of copies of `item`: 1, 4, 16... items, until a batch takes
    `WARMUP_TARGET_S` or the next would pass `max_tokens`; the rate of the last (largest) batch."""
    n = 1
    while True:
        start = time.perf_counter()
        compute([item] * n)
        seconds = max(time.perf_counter() - start, 1e-6)
        tokens = n * item.length
        if seconds >= WARMUP_TARGET_S or tokens * 4 > max_tokens:
            return n * work_of([item.length], knee) / seconds
        n *= 4

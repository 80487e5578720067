"""Admission by measured speed: how much work a request may bring, from how fast this model scores here.

A fixed token budget assumed a speed the machine may not have (983,040 tokens assumed ~8k tokens/s; a
MiniLM cross-encoder scores ~3k/s on a small CPU, so a request admitted under it ran 120 s and ended 504).
Instead the model's rate is measured when it is warmed up (`measure_rate`: warm-up batches growing until
one takes about `WARMUP_TARGET_S`), and:

- one request may hold what the model scores in `BUDGET_SHARE` of `--request-timeout` at that rate
  (`budget_for`); more is refused at once (400; TEI 422) naming the rate, since it could not finish even
  alone. `--max-request-tokens` overrides it.
- a request that fits the budget but would not finish before its deadline behind the work already pending
  (each pending request scores at most as many tokens as the newcomer before it is done, the planner
  being max-min fair) is refused at once with 503 (TEI/Cohere 429) and Retry-After (`finish_estimate`).

`Scheduler.tokens_per_second` holds the rate; whoever knows a better one (the engine choice times each
candidate runtime on the loaded model) may set it before the model serves. While serving, every batch of
at least `RATE_BATCH_SHARE` of the batch token limit moves it (`observed_rate`), so the budget follows the
machine: a warm-up timed on a busy machine does not shrink it for good, nor an idle one inflate it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

from openrerank.core.work import WorkItem

#: Share of the request timeout one request's work may take at the measured rate (the rest: queueing,
#: tokenization, and a rate measured on a machine that may get busier).
BUDGET_SHARE = 0.5
#: Warm-up batches grow until one takes about this long (or reaches the batch token limit).
WARMUP_TARGET_S = 0.5


#: Batches at least this share of --max-batch-tokens update the rate (small ones are mostly overhead).
RATE_BATCH_SHARE = 0.25
#: Weight of one such batch in the moving average of the rate.
RATE_WEIGHT = 0.1


def observed_rate(rate: float | None, tokens: int, seconds: float, max_batch_tokens: int) -> float | None:
    """The rate after a batch of `tokens` that took `seconds`: a moving average over big-enough batches."""
    if tokens < RATE_BATCH_SHARE * max_batch_tokens or seconds <= 0:
        return rate
    now = tokens / seconds
    return now if not rate else (1 - RATE_WEIGHT) * rate + RATE_WEIGHT * now


def budget_for(tokens_per_second: float, timeout: float) -> int:
    """Tokens one request may hold: what the model scores in BUDGET_SHARE of the timeout."""
    return max(1, int(tokens_per_second * timeout * BUDGET_SHARE))


def finish_estimate(tokens: int, pending_requests: int, pending_tokens: int, tokens_per_second: float) -> float:
    """Seconds until a newcomer of `tokens` is scored behind the pending work, under max-min fairness: each
    pending request is scored at most `tokens` more before the newcomer is done."""
    ahead = min(pending_tokens, pending_requests * tokens)
    return (ahead + tokens) / tokens_per_second


def measure_rate(compute: Callable[[Sequence[WorkItem]], object], item: WorkItem, max_tokens: int) -> float:
    """Tokens per second of `compute` on batches of copies of `item`: 1, 4, 16... items, until a batch takes
    `WARMUP_TARGET_S` or the next would pass `max_tokens`; the rate of the last (largest) batch."""
    n = 1
    while True:
        start = time.perf_counter()
        compute([item] * n)
        seconds = max(time.perf_counter() - start, 1e-6)
        tokens = n * item.length
        if seconds >= WARMUP_TARGET_S or tokens * 4 > max_tokens:
            return tokens / seconds
        n *= 4

"""Which pending work the scheduler runs next: fair shares of a window, and the order of its batches.

A *window* is about `window_batches` batches' worth of work, taken from every unfinished request and
sorted by length across requests (so padding stays small), then cut into batches by the one batching
policy. How much each request puts in is a max-min fair share of the window: a request that needs
less than an equal share gets all of it, the others split what is left evenly. The items of *quick*
requests -- all their remaining work fits in one batch and is in this window -- are batched among
themselves and run first; everything else is sorted and batched together after them.

So a small request that arrives while a 512-passage request is being scored needs only its own share
of the next window, and its batches run first: it waits for the batch in progress and its own
batches, not for the big request (the scheduler re-plans once a newcomer is queued, see
`Scheduler._run_window`). The big request is never starved either: every window gives it a share.

Fairness yields to deadlines only where admission's promise is at stake: a request that would finish past
`rates.DEADLINE_SHARE` of its time left under fair shares at the served rate, but in time if served first (the
machine slowed down after it was admitted, say), gets its whole need first and its batches run first, earliest
deadline first (`rates.at_risk`); the others share what is left.

Costs are in tokens, and an item costs at least `floor_cost` (the per-item share of a batch,
`max_tokens / max_size`), so one unit bounds both a window's tokens and its items.

Reranking and embedding requests share windows and fair shares, but a batch holds items of one task only (a
scorer call returns scores or vectors, not both): each group is split per task before it is cut into batches.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, TypeVar

from openrerank.core.work import TASKS
from openrerank.engine.batching import BatchPolicy, HasLength, Shape, exact_shape


def fair_shares(needs: Sequence[int], capacity: int) -> list[int]:
    """Max-min fair split of `capacity` among needs: the smallest needs are met in full, the rest
    split the remainder equally. Returns one allocation per need, in the given order."""
    alloc = [0] * len(needs)
    left = capacity
    order = sorted(range(len(needs)), key=lambda i: needs[i])
    for k, i in enumerate(order):
        share = left // (len(order) - k)
        alloc[i] = min(needs[i], share)
        left -= alloc[i]
    return alloc


class PlannedItem(HasLength, Protocol):
    @property
    def task(self) -> str: ...


class Pending(Protocol):
    """One unfinished request as the planner sees it."""

    items: Sequence[PlannedItem]  # all of the request's items
    todo: list[int]  # indices into `items` not scheduled yet, shortest first


P = TypeVar("P", bound=Pending)
T = TypeVar("T")


def item_cost(length: int, floor_cost: int) -> int:
    return max(length, floor_cost)


def plan_window(pending: Sequence[P], policy: BatchPolicy, window_batches: int,
                shape: Shape = exact_shape, first: Sequence[int] = ()) -> list[list[tuple[P, int]]]:
    """Take each request's fair share of one window off its `todo` and return the window's batches
    (lists of (request, item index)): those of `first`, then quick requests', then the rest.

    `shape`: the scorer's runtime's `padded_shape`. `first`: indices into `pending` whose whole need comes
    before the fair shares, in that order, and whose batches run first (those at risk of missing their deadline,
    earliest deadline first, `rates.at_risk`; or, shutting down, the shortest first, `rates.drain_order`): those
    whose remaining work fits one batch share batches (they all finish in them), then each bigger one's batches
    on their own and in that order, so the first finishes first instead of all sorted by length together and
    finishing last. Every request with work gets at least one item, so none is ever starved."""
    floor_cost = max(1, policy.max_tokens // max(1, policy.max_size))
    capacity = window_batches * policy.max_tokens
    needs = [sum(item_cost(p.items[i].length, floor_cost) for i in p.todo) for p in pending]
    alloc = [0] * len(pending)
    for i in first:
        alloc[i] = min(needs[i], capacity)
        capacity -= alloc[i]
    chosen_first = set(first)
    fair = [i for i in range(len(pending)) if i not in chosen_first]
    for i, share in zip(fair, fair_shares([needs[i] for i in fair], capacity), strict=True):
        alloc[i] = share
    small_first: list[tuple[P, int]] = []  # requests of `first` whose remaining work fits one batch
    urgent: dict[int, list[tuple[P, int]]] = {k: [] for k in first}  # the others, in `first`'s order
    quick: list[tuple[P, int]] = []
    rest: list[tuple[P, int]] = []
    for k, (p, need, budget) in enumerate(zip(pending, needs, alloc, strict=True)):
        if not p.todo:
            continue
        taken = 0
        used = 0
        for i in p.todo:
            cost = item_cost(p.items[i].length, floor_cost)
            if taken and used + cost > budget:
                break
            used += cost
            taken += 1
        chosen, p.todo = p.todo[:taken], p.todo[taken:]
        if k in chosen_first:
            group = small_first if need <= policy.max_tokens else urgent[k]
        else:
            group = quick if not p.todo and need <= policy.max_tokens else rest
        group.extend((p, i) for i in chosen)
    batches: list[list[tuple[P, int]]] = []
    for group in (small_first, *urgent.values(), quick, rest):
        for task in TASKS:
            part = [(p, i) for p, i in group if p.items[i].task == task]
            batches.extend([part[j] for j in idx] for idx in policy.split([p.items[i] for p, i in part], shape))
    return batches


def spread(batches: list[list[T]], lanes: int) -> list[list[T]]:
    """A window with fewer batches than lanes, its largest batches cut in halves (rows in order) until every
    lane has one or no batch has two rows: a lone small request then runs on every lane's threads instead
    of one lane's share."""
    out = list(batches)
    while len(out) < lanes:
        k = max(range(len(out)), key=lambda j: len(out[j]), default=None)
        if k is None or len(out[k]) < 2:
            break
        batch = out.pop(k)
        half = (len(batch) + 1) // 2
        out[k:k] = [batch[:half], batch[half:]]
    return out


def give_back(pending: Pending, indices: Sequence[int]) -> None:
    """Return planned-but-unrun items to a request's `todo` (kept sorted by length)."""
    if indices:
        pending.todo = sorted([*pending.todo, *indices], key=lambda i: pending.items[i].length)

"""Window planning: max-min fair shares, quick requests first, nothing starved."""

from __future__ import annotations

from dataclasses import dataclass, field

from openrerank.core.work import PairItem
from openrerank.engine.batching import BatchPolicy
from openrerank.engine.planning import fair_shares, give_back, plan_window


def test_fair_shares_meet_small_needs_and_split_the_rest():
    assert fair_shares([10, 1000, 1000], 410) == [10, 200, 200]
    assert fair_shares([5, 5], 100) == [5, 5]  # everything fits
    assert fair_shares([300, 100], 200) == [100, 100]
    assert sum(fair_shares([7, 9, 1000, 3], 50)) <= 50


@dataclass(eq=False)
class Req:
    items: list[PairItem]
    todo: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.todo = sorted(range(len(self.items)), key=lambda i: self.items[i].length)


def make(*lengths: int) -> Req:
    return Req([PairItem([1] * n) for n in lengths])


def test_quick_requests_run_first_and_the_big_one_still_gets_a_share():
    policy = BatchPolicy(max_tokens=100, max_size=10, max_padding=1.0)
    big = make(*[10] * 50)
    small = make(12, 12, 12)
    window = plan_window([big, small], policy, window_batches=4)
    assert all(req is small for req, _ in window[0])  # the newcomer's own batch, first
    assert {i for req, i in window[0]} == {0, 1, 2}
    assert sum(1 for b in window for req, _ in b if req is big) >= 10  # at least a batch of the big one
    assert len(big.todo) == 50 - sum(1 for b in window for req, _ in b if req is big)
    assert small.todo == []


def test_give_back_keeps_todo_sorted():
    req = make(5, 1, 9, 3)
    window = plan_window([req], BatchPolicy(max_tokens=8, max_size=2, max_padding=1.0), window_batches=1)
    taken = [i for b in window for _, i in b]
    give_back(req, taken)
    assert [req.items[i].length for i in req.todo] == [1, 3, 5, 9]


def test_spread_halves_the_largest_batches_until_every_lane_has_one() -> None:
    from openrerank.engine.planning import spread

    assert spread([[1, 2, 3, 4, 5]], 2) == [[1, 2, 3], [4, 5]]
    assert spread([[1, 2, 3, 4], [5]], 4) == [[1], [2], [3, 4], [5]]
    assert spread([[1], [2]], 4) == [[1], [2]]  # one-row batches cannot be cut
    assert spread([[1, 2], [3, 4], [5, 6]], 2) == [[1, 2], [3, 4], [5, 6]]  # enough batches: untouched
    assert spread([], 2) == []


def test_a_request_at_risk_gets_its_whole_need_first_and_its_batches_run_first():
    """Fair shares would give the big request a quarter of the window and run the small ones first; at risk
    of missing its deadline (`rates.at_risk`), it takes what it needs, the others share the rest, and each of
    them still gets an item."""
    policy = BatchPolicy(max_tokens=100, max_size=10, max_padding=1.0)
    big, smalls = make(*[10] * 30), [make(12, 12) for _ in range(3)]
    window = plan_window([*smalls, big], policy, window_batches=3, first=[3])
    owners = [{id(req) for req, _ in b} for b in window]
    assert owners[0] == {id(big)} and owners[1] == {id(big)} and owners[2] == {id(big)}  # 30 x 10 tokens
    assert all(len(s.todo) == 1 for s in smalls)  # one item each, nothing starved
    assert big.todo == []

    fair = [make(*[10] * 30), *[make(12, 12) for _ in range(3)]]
    window = plan_window(fair, policy, window_batches=3)
    assert {id(req) for req, _ in window[0]} == {id(r) for r in fair[1:]}  # without: the small ones first
    assert len(fair[0].todo) > 0


def test_requests_given_first_run_one_after_another_in_that_order():
    """Two requests given first (earliest deadline, or shortest work while shutting down) are batched each on its
    own, in `first`'s order: sorted by length across both, their batches would mix and both finish last."""
    policy = BatchPolicy(max_tokens=100, max_size=4, max_padding=1.0)
    short_items, long_items = make(*[20, 5] * 4), make(*[6, 19] * 6)
    window = plan_window([long_items, short_items], policy, window_batches=10, first=[1, 0])
    owners = [{id(req) for req, _ in b} for b in window]
    assert all(len(o) == 1 for o in owners), owners  # no batch mixes the two
    assert [o == {id(short_items)} for o in owners] == [True] * 2 + [False] * 3  # the first given, first


def test_small_requests_given_first_still_share_batches():
    """Sixteen two-item requests given first (shutting down, every pending request is): each fits one batch,
    so they share one, as they would otherwise; a batch of their own each ran 16 batches of 2 (1.4x the model
    time of one batch of 32 on the MiniLM)."""
    policy = BatchPolicy(max_tokens=1000, max_size=32, max_padding=1.0)
    smalls = [make(10, 12) for _ in range(16)]
    window = plan_window(smalls, policy, window_batches=4, first=list(range(16)))
    assert len(window) == 1 and len(window[0]) == 32

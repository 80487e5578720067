"""The batching policy: token budget, pair cap, padding cap, length grouping."""

from __future__ import annotations

import itertools
import random

from openrerank.core.work import PairItem
from openrerank.engine.batching import MAX_PADDING, MIN_ROWS, split_batches


def items_of(*lengths: int) -> list[PairItem]:
    return [PairItem([0] * n, None) for n in lengths]


def test_respects_budgets_padding_and_covers_every_item_once() -> None:
    rng = random.Random(0)
    for _ in range(200):
        items = items_of(*[rng.randint(1, 300) for _ in range(rng.randint(1, 120))])
        max_tokens, max_size = rng.choice([256, 1000, 4096, 16384]), rng.choice([1, 3, 16, 128])
        groups = split_batches(items, max_tokens, max_size)
        assert sorted(i for g in groups for i in g) == list(range(len(items)))
        for g in groups:
            lengths = [items[i].length for i in g]
            assert len(g) <= max_size
            assert len(g) == 1 or len(g) * max(lengths) <= max_tokens
            if len(g) > MIN_ROWS:
                assert 1 - sum(lengths) / (len(g) * max(lengths)) <= MAX_PADDING + 1e-9
        # grouped by length: every batch's items are no longer than the next batch's
        for a, b in itertools.pairwise(groups):
            assert max(items[i].length for i in a) <= min(items[i].length for i in b)


def test_wide_spread_request_is_cut_by_padding_not_only_by_budget() -> None:
    """One DL19-like request (40..270 tokens) fits the token budget whole but would be half padding."""
    lengths = [40 + (230 * i) // 99 for i in range(100)]
    groups = split_batches(items_of(*lengths), max_tokens=10**6, max_size=128)
    assert len(groups) > 1
    padded = sum(len(g) * max(lengths[i] for i in g) for g in groups)
    assert 1 - sum(lengths) / padded < 0.2
    whole = 1 - sum(lengths) / (100 * max(lengths))
    assert whole > 0.4


def test_uniform_lengths_stay_one_batch_and_oversize_item_alone() -> None:
    assert split_batches(items_of(*[50] * 100), 16384, 128) == [list(range(100))]
    assert split_batches(items_of(10, 5000, 10), 1000, 8) == [[0, 2], [1]]

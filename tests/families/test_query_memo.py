"""The query vectors a scorer keeps: exact keys, least recently used out first, bounded in bytes keys included."""

from __future__ import annotations

import numpy as np

from openrerank.families.query_memo import ENTRY_BYTES, QueryMemo, entry_bytes, memo_key


def vec(x: float, dim: int = 4) -> np.ndarray:
    return np.full(dim, x, dtype=np.float32)


def test_a_key_is_the_ids_and_the_numbers_the_vector_depends_on() -> None:
    assert memo_key([1, 2, 3], 0) != memo_key([1, 2, 3], 1)  # the same ids pooled without their prompt
    assert memo_key([1, 2, 3], 0) != memo_key([1, 2, 3, 0])
    assert memo_key([70000, 2]) == memo_key(np.array([70000, 2]))  # a vocabulary past 2**16 stays exact
    assert memo_key([70000, 2]) != memo_key([4464, 2])


def test_the_least_recently_used_go_first_and_the_budget_counts_keys_too() -> None:
    keys = [memo_key([i] * 100) for i in range(4)]  # 400-byte keys beside 16-byte vectors
    one = entry_bytes(keys[0], vec(0))
    assert one > 400 + 16 + ENTRY_BYTES - 1
    memo = QueryMemo(budget=3 * one)
    memo.keep({keys[0]: vec(0), keys[1]: vec(1), keys[2]: vec(2)})
    assert len(memo) == 3 and memo.nbytes == 3 * one
    assert set(memo.found([keys[0]])) == {keys[0]}  # used: now the most recent
    memo.keep({keys[3]: vec(3)})
    assert set(memo.found(keys)) == {keys[0], keys[2], keys[3]} and memo.nbytes == 3 * one


def test_kept_vectors_are_read_only_and_the_first_kept_wins() -> None:
    memo = QueryMemo()
    key, first = memo_key([5]), vec(1)
    memo.keep({key: first})
    memo.keep({key: vec(2)})  # a lane that encoded it at the same time
    (got,) = memo.found([key]).values()
    assert got is first and not got.flags.writeable
    assert memo.nbytes == entry_bytes(key, first)

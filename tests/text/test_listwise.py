"""The listwise block rule and marker sanitizing (`text/listwise.py`), apart from any model."""

from __future__ import annotations

from openrerank.text.listwise import ListwiseLimits, split_blocks

LIMITS = ListwiseLimits(context=1000, doc_window=100, query_window=50, block_size=125)


def test_blocks_close_when_the_room_left_is_one_passage_or_less():
    # room starts at 1000 - 2 * 10 = 980; it falls to 100 after 880 tokens: the passage that gets it there closes
    assert split_blocks([440, 440, 10, 10], 10, LIMITS) == [[0, 1], [2, 3]]
    assert split_blocks([440, 439, 10], 10, LIMITS) == [[0, 1, 2]]
    assert split_blocks([100] * 9 + [100], 10, LIMITS) == [list(range(9)), [9]]


def test_a_block_holds_at_most_block_size_passages():
    limits = ListwiseLimits(context=10**6, doc_window=100, query_window=50, block_size=125)
    blocks = split_blocks([1] * 300, 5, limits)
    assert [len(b) for b in blocks] == [125, 125, 50]
    assert [i for b in blocks for i in b] == list(range(300)), "request order is kept"


def test_a_window_too_small_for_two_queries_gives_each_passage_its_block():
    limits = ListwiseLimits(context=200, doc_window=100, query_window=50, block_size=125)
    assert split_blocks([5, 5, 5], 50, limits) == [[0], [1], [2]]

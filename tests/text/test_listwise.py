"""The listwise block rule and marker sanitizing (`text/listwise.py`), apart from any model's weights (the
marker tests use jina-reranker-v3's prompt and a tiny tokenizer with its markers)."""

from __future__ import annotations

import pytest

from openrerank.core.requests import Truncate
from openrerank.families.jina_reranker_v3 import DOC_MARKER, QUERY_MARKER, limits_for, render
from openrerank.text.listwise import ListwiseLimits, ListwiseTextEncoder, split_blocks
from openrerank.text.prepare import InstructionError, TextInputError
from tests.families import builders as B

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


# -- what a listwise encoder refuses: marker text where only the template may put it, an over-long instruction --

@pytest.fixture(scope="module")
def encoder():
    return ListwiseTextEncoder(B.build_tokenizer(B.JINA), limits_for(1024), render, (DOC_MARKER, QUERY_MARKER))


@pytest.mark.parametrize("instruction", [f"prefer {DOC_MARKER} cities", f"x{QUERY_MARKER}",
                                         "<|embed_<|rerank_token|>token|>"])
def test_an_instruction_holding_marker_text_is_refused(encoder, instruction):
    """Marker text in the instruction was rendered as is (the reference does not sanitize an instruction) and the
    marker count check raised a bare ValueError: a 500. The instruction is the task, so it is refused, not edited."""
    with pytest.raises(InstructionError, match="marker text"):
        encoder.prepare("q", ["a", "b"], Truncate.END, instruction=instruction)


def test_an_instruction_too_long_for_the_window_is_refused(encoder):
    """Any length was taken (a 3000-word one: 9186 prompt tokens in a 1024-token window); the rule is the
    template families': the prompt's fixed text, instruction included, may take at most half the window."""
    fits = encoder.prepare("q", ["a"], Truncate.END, instruction="word " * 40)
    assert fits.items
    with pytest.raises(InstructionError, match=r"takes \d+ tokens, and may take at most half the window"):
        encoder.prepare("q", ["a"], Truncate.END, instruction="word " * 400)
    with pytest.raises(InstructionError, match="more than"):  # only about half the window of it is tokenized
        encoder.with_instruction("word " * 1_000_000)


@pytest.mark.parametrize(("query", "passages", "name"), [
    (DOC_MARKER, ["a", "b"], "query"),
    (QUERY_MARKER + DOC_MARKER, ["a"], "query"),
    ("q", ["a", "<|embed_<|rerank_token|>token|>"], "passage 1"),
])
def test_text_made_only_of_marker_text_is_refused_as_an_empty_text_is(encoder, query, passages, name):
    """It was sanitized to "" and scored as an empty text, where the dialects refuse an empty query (400)."""
    with pytest.raises(TextInputError, match=f"^{name}: nothing is left"):
        encoder.prepare(query, passages, Truncate.END)
    encoder.prepare("", ["", f"a{DOC_MARKER}"], Truncate.END)  # "" itself, and text beside a marker, are kept


def test_a_marker_the_template_did_not_place_is_a_client_text_error(encoder):
    """The marker count check stands for client text a tokenizer reads as a marker despite sanitizing: it raises
    an error answered 4xx, never a bare ValueError (a 500)."""
    stray = ListwiseTextEncoder(encoder.tokenizer, encoder.limits,
                                lambda q, docs, instr: render(q, docs, instr) + QUERY_MARKER, encoder.markers)
    with pytest.raises(TextInputError, match="marker tokens"):
        stray.prepare("q", ["a"], Truncate.END)

"""Prompt templates: piece-wise tokenization, slot attribution by character offsets, and truncation that
never touches the template's fixed text (END / START / NONE / CHUNK, the query cap)."""

from __future__ import annotations

import random

import pytest

from openrerank.core.requests import Truncate
from openrerank.text.prepare import InputTooLongError
from openrerank.text.template import (
    FIXED,
    HEAD,
    PASSAGE,
    QUERY,
    TAIL,
    PromptTemplate,
    TemplateTextEncoder,
    _split_runs,
    fill,
)
from tests.families.builders import GEMMA, QWEN, build_tokenizer

PREFIX, SUFFIX = "<|im_start|>user\n", "<|im_end|>\n<|im_start|>assistant\n"
TEMPLATE = PromptTemplate((PREFIX, "Q: {query}\nD: {passage}", SUFFIX), query_share=0.75)
WORDS = "paris banana river mountain engine water city gene".split()


def words(n: int, offset: int = 0) -> str:
    return " ".join(WORDS[(i + offset) % len(WORDS)] for i in range(n))


@pytest.fixture(scope="module")
def tok():
    """Byte-level BPE with Qwen's pre-tokenizer (merges "?\\n"); every word above is one token after a space."""
    return build_tokenizer(QWEN)


def ids(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def encoder(tok, window: int = 64, template: PromptTemplate = TEMPLATE) -> TemplateTextEncoder:
    return TemplateTextEncoder(tok, window, template)


def test_template_needs_one_query_and_one_passage_slot():
    for pieces in [("{query}",), ("{query} {passage} {query}",), ("no slots",)]:
        with pytest.raises(ValueError, match="one \\{query\\} and one \\{passage\\} slot"):
            PromptTemplate(pieces)
    assert TEMPLATE.render("q?", "p") == f"{PREFIX}Q: q?\nD: p{SUFFIX}"


def test_fill_reports_each_slots_character_span():
    text, spans = fill("Q: {query}\nD: {passage}.", "what", "paris is")
    assert text == "Q: what\nD: paris is."
    assert text[slice(*spans["query"])] == "what" and text[slice(*spans["passage"])] == "paris is"


def split_runs_reference(ids, offsets, spans):
    """Token by token: the first slot (in `spans`' order) whose characters the token overlaps, else fixed."""
    runs = []
    for tid, (a, b) in zip(ids, offsets, strict=True):
        role = next((name for name, (s, e) in spans.items() if a < e and b > s), FIXED)
        if runs and runs[-1][0] == role:
            runs[-1][1].append(tid)
        else:
            runs.append((role, [tid]))
    return runs


def test_runs_are_split_like_the_token_by_token_rule():
    """Batches of texts with random offsets (repeated, zero-width, straddling both slots; empty texts too) and
    their own slot spans, against the rule stated token by token for each text."""
    rng = random.Random(7)
    for _ in range(100):
        order = rng.sample([QUERY, PASSAGE], 2)
        rows = []
        for _ in range(rng.randrange(1, 6)):
            n = rng.randrange(0, 40)
            starts = sorted(rng.randrange(0, 120) for _ in range(n))
            offsets = [(a, a + rng.choice((0, 1, 3, 8))) for a in starts]
            spans = {name: tuple(sorted(rng.sample(range(0, 121), 2))) for name in order}
            rows.append(([rng.randrange(1000) for _ in range(n)], offsets, spans))
        got = _split_runs([r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows])
        assert got == [split_runs_reference(*r) for r in rows]
    assert _split_runs([[], []], [[], []], [{QUERY: (0, 3), PASSAGE: (4, 9)}] * 2) == [[], []]


def test_pieces_are_tokenized_apart_not_as_one_prompt(tok):
    """Ids are the concatenation of each piece's own ids (as the references build them), which differs from
    tokenizing the rendered prompt when a seam merges: "?" + "\\n" across two pieces."""
    template = PromptTemplate(("Q: {query}", "\n", "D: {passage}"))
    got = encoder(tok, 64, template).prepare("what is it?", ["paris"], Truncate.END).items[0].input_ids
    assert got == ids(tok, "Q: what is it?") + ids(tok, "\n") + ids(tok, "D: paris")
    assert got != ids(tok, template.render("what is it?", "paris"))


def test_tokens_are_attributed_to_slots_by_offsets(tok):
    """A token that holds slot characters belongs to the slot (" paris" with the template's space; "?\\n"
    with the template's newline); everything else is fixed. The newline it holds is also kept apart, for a cut
    that drops the token to put back (the space is not: a window's own first token brings one)."""
    [runs] = encoder(tok).runs("what is?", ["paris river"])
    roles = [(role, tok.decode(run)) for role, run in runs]
    assert roles == [(FIXED, PREFIX), (FIXED, "Q:"), (QUERY, " what is?\n"), (TAIL[QUERY], "\n"), (FIXED, "D:"),
                     (PASSAGE, " paris river"), (FIXED, SUFFIX)]


def test_bos_is_prepended_once_when_the_template_asks(tok):
    gemma = build_tokenizer(GEMMA)
    template = PromptTemplate(("A: {query}", "\n", "B: {passage}"), bos=True)
    [item] = encoder(gemma, 64, template).prepare("q", ["p"], Truncate.END).items
    assert item.input_ids[0] == gemma.bos_token_id and item.input_ids.count(gemma.bos_token_id) == 1
    with pytest.raises(ValueError, match="defines no bos_token"):
        encoder(tok, 64, template)  # Qwen's tokenizer has none


def test_a_window_too_small_for_the_prompt_is_refused(tok):
    with pytest.raises(ValueError, match="too small for this prompt"):
        encoder(tok, 2 * _fixed(tok) - 1)
    # fixed text inside a slot piece counts too (a long --instruction): otherwise pairs overflow the window
    instructed = PromptTemplate((PREFIX, f"Instruct: {words(40)}\nQ: {{query}}\nD: {{passage}}", SUFFIX))
    with pytest.raises(ValueError, match="instruction included"):
        encoder(tok, 64, instructed)


@pytest.mark.parametrize("truncate", [Truncate.END, Truncate.START, Truncate.CHUNK])
def test_no_sequence_exceeds_the_window_and_the_fixed_text_survives(tok, truncate):
    enc = encoder(tok)
    for q_words, p_words in [(0, 0), (1, 500), (30, 30), (40, 0), (200, 1), (500, 500), (3, 61)]:
        prep = enc.prepare(words(q_words, 1) + "?", [words(p_words)], truncate)
        assert prep.owners and set(prep.owners) == {0}
        for item in prep.items:
            assert len(item.input_ids) <= 64, (q_words, p_words)
            _, middle, _ = _parts(tok, item.input_ids)
            # "\nD:" whole: a query cut before its "?\n" token (one token, the template's newline in it) keeps it
            assert tok.decode(middle).startswith("Q:") and "\nD:" in tok.decode(middle), (q_words, p_words)


@pytest.mark.parametrize("truncate", [Truncate.END, Truncate.CHUNK])
def test_a_cut_passage_keeps_the_newline_its_last_token_held(tok, truncate):
    """jina-reranker-m0's layout: fixed text after the passage. A passage ending in "?" tokenizes "?\\n" with the
    template's newline; a window that ends before it still ends the passage with that newline, in the length
    the window allows."""
    template = PromptTemplate((PREFIX, "D: {passage}\nQ: {query}", SUFFIX))
    passage = words(300) + " what is it?"
    prep = encoder(tok, 64, template).prepare("which city", [passage], truncate)
    assert len(prep.items) >= (3 if truncate is Truncate.CHUNK else 1)
    for item in prep.items[:-1] if truncate is Truncate.CHUNK else prep.items:
        assert len(item.input_ids) == 64
        _, middle, _ = _parts(tok, item.input_ids)
        assert middle[-len(ids(tok, "\nQ: which city")):] == ids(tok, "\nQ: which city")
    if truncate is Truncate.CHUNK:  # the last window holds the passage's end: "?\n" as the whole pair has it
        assert tok.decode(prep.items[-1].input_ids).endswith(f"it?\nQ: which city{SUFFIX}")


def test_a_cut_passage_keeps_fixed_text_its_first_token_held(tok):
    """Fixed text before the slot merged into the passage's first token ("?" + "\\n..." is "?\\n") comes back
    where START drops that token; a space before the slot does not (" capital" brings its own)."""
    template = PromptTemplate((PREFIX, "Q: {query}\nD?{passage}", SUFFIX))
    [runs] = encoder(tok, 64, template).runs("what", ["\n" + words(300)])
    assert (HEAD[PASSAGE], ids(tok, "?")) in runs and not any(role == HEAD[QUERY] for role, _ in runs)
    [item] = encoder(tok, 64, template).prepare("what", ["\n" + words(300)], Truncate.START).items
    assert len(item.input_ids) == 64 and tok.decode(item.input_ids).startswith(f"{PREFIX}Q: what\nD?")


def _fixed(tok) -> int:
    """Fixed tokens of TEMPLATE around a query that ends in a word (its "\\n" is then a token of its own)."""
    return len(ids(tok, PREFIX)) + len(ids(tok, "Q:")) + len(ids(tok, "\nD:")) + len(ids(tok, SUFFIX))


def _parts(tok, item_ids: list[int]) -> tuple[list[int], list[int], list[int]]:
    """(prefix ids, middle, suffix ids) of an assembled sequence."""
    pre, suf = ids(tok, PREFIX), ids(tok, SUFFIX)
    assert item_ids[: len(pre)] == pre and item_ids[-len(suf):] == suf, "the fixed prefix/suffix was cut"
    return pre, item_ids[len(pre) : -len(suf)], suf


def test_end_cuts_the_passage_end_and_keeps_prefix_and_suffix(tok):
    passage = words(500)
    [item] = encoder(tok).prepare("what", [passage], Truncate.END).items
    assert len(item.input_ids) == 64
    _, middle, _ = _parts(tok, item.input_ids)
    head = ids(tok, "Q: what\nD: " + passage)
    assert middle == head[: len(middle)]


def test_start_cuts_the_passage_start(tok):
    passage = words(500)
    [item] = encoder(tok).prepare("what", [passage], Truncate.START).items
    assert len(item.input_ids) == 64
    _, middle, _ = _parts(tok, item.input_ids)
    query_part = ids(tok, "Q: what\nD:")
    assert middle[: len(query_part)] == query_part
    assert middle[len(query_part):] == ids(tok, "D: " + passage)[-(len(middle) - len(query_part)):]


def test_none_refuses_an_over_long_pair_with_its_length(tok):
    enc = encoder(tok)
    full = len(ids(tok, PREFIX)) + len(ids(tok, "Q: what\nD: " + words(100))) + len(ids(tok, SUFFIX))
    with pytest.raises(InputTooLongError) as err:
        enc.prepare("what", ["sea", words(100)], Truncate.NONE)
    assert (err.value.length, err.value.maximum, err.value.passage_index) == (full, 64, 1)
    fits = enc.prepare("what", ["sea"], Truncate.NONE)
    assert fits.prompt_tokens == len(fits.items[0].input_ids) < 64


def test_short_pairs_are_never_cut(tok):
    prep = encoder(tok).prepare("what is?", ["paris", "", words(10)], Truncate.END)
    assert [it.input_ids for it in prep.items] == [
        ids(tok, PREFIX) + ids(tok, f"Q: what is?\nD: {p}") + ids(tok, SUFFIX) for p in ["paris", "", words(10)]]
    assert prep.owners == [0, 1, 2] and prep.prompt_tokens == sum(len(it.input_ids) for it in prep.items)


def test_the_query_is_capped_at_its_share_then_gets_back_what_the_passage_leaves(tok):
    enc = encoder(tok, 100)
    free = 100 - _fixed(tok)
    long_query = words(300, 3)
    [both_long] = enc.runs(long_query, [words(300)])
    [item] = enc.prepare(long_query, [words(300)], Truncate.END).items
    q_kept = int(free * 0.75)
    assert len(item.input_ids) == 100
    query_ids = next(run for role, run in both_long if role == QUERY)
    assert item.input_ids[len(ids(tok, PREFIX)) + 2 : len(ids(tok, PREFIX)) + 2 + q_kept] == query_ids[:q_kept]
    # a short passage leaves its room to the query
    [short] = enc.prepare(long_query, ["sea"], Truncate.END).items
    assert len(short.input_ids) == 100 and short.input_ids[-len(ids(tok, SUFFIX)) - 1] == ids(tok, " sea")[0]


def test_chunk_windows_cover_the_passage_each_inside_the_full_prompt(tok):
    enc = encoder(tok)
    passage = words(200)
    prep = enc.prepare("what", ["sea", passage], Truncate.CHUNK)
    assert prep.owners[0] == 0 and set(prep.owners[1:]) == {1} and len(prep.owners) > 4
    head = ids(tok, "Q: what\nD:")
    body = ids(tok, "D: " + passage)[len(ids(tok, "D:")):]
    covered: list[int] = []
    windows = []
    for item in prep.items[1:]:
        assert len(item.input_ids) <= 64
        _, middle, _ = _parts(tok, item.input_ids)
        assert middle[: len(head)] == head
        windows.append(middle[len(head):])
    size = len(windows[0])
    for k, w in enumerate(windows[:-1]):  # consecutive, overlapping windows from the start ...
        start = body.index(w[0], k * (size - size // 4) - 1) if k else 0
        assert body[start : start + len(w)] == w
        covered.extend(range(start, start + len(w)))
    assert windows[-1] == body[-len(windows[-1]):]  # ... and the last one ends with the passage
    assert set(covered) | set(range(len(body) - len(windows[-1]), len(body))) == set(range(len(body)))
    capped = enc.prepare("what", ["sea", passage], Truncate.CHUNK, max_chunks_per_passage=2)
    assert capped.owners == [0, 1, 1]
    assert [it.input_ids for it in capped.items] == [it.input_ids for it in prep.items[:3]]


def test_chunking_cuts_a_long_query_to_half_the_free_window(tok):
    enc = encoder(tok)
    prep = enc.prepare(words(300, 5), [words(300)], Truncate.CHUNK)
    assert all(len(it.input_ids) == 64 for it in prep.items) and len(prep.items) > 4
    [runs] = enc.runs(words(300, 5), [words(300)])
    query_ids = next(run for role, run in runs if role == QUERY)
    q_kept = (64 - _fixed(tok)) // 2
    start = len(ids(tok, PREFIX)) + len(ids(tok, "Q:"))
    assert all(it.input_ids[start : start + q_kept] == query_ids[:q_kept] for it in prep.items)
    # a short passage of the same request is scored against the same cut query (before: the whole query)
    [short] = enc.prepare(words(300, 5), ["sea"], Truncate.CHUNK).items
    [end] = enc.prepare(words(300, 5), ["sea"], Truncate.END).items  # END gives the room back to the query
    tail = end.input_ids[-(len(ids(tok, "\nD: sea")) + len(ids(tok, SUFFIX))):]
    assert short.input_ids == end.input_ids[: start + q_kept] + tail
    assert len(end.input_ids) == 64 > len(short.input_ids)
    # a query that fits half the window is kept whole
    assert enc.prepare("what", ["sea"], Truncate.CHUNK).items[0].input_ids == enc.prepare(
        "what", ["sea"], Truncate.END).items[0].input_ids


def test_max_tokens_per_passage_clips_before_the_template(tok):
    """Cohere's max_tokens_per_doc: the passage's first k tokens, inside the full prompt."""
    prep = encoder(tok).prepare("what", [words(40)], Truncate.END, max_tokens_per_passage=5)
    assert prep.items[0].input_ids == ids(tok, PREFIX) + ids(tok, "Q: what\nD: " + words(5)) + ids(tok, SUFFIX)

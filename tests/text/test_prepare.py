"""Pair and bi-encoder text encoders: truncation directions, refusal, and chunking."""

from __future__ import annotations

import itertools
import random

import pytest
from transformers import AutoTokenizer

from openrerank.core.requests import Truncate
from openrerank.core.work import BiItem, PairItem
from openrerank.sources.source import default_model_dir
from openrerank.text import bi as B
from openrerank.text import prepare as P
from openrerank.text.bi import BiTextEncoder
from openrerank.text.pairs import PairTextEncoder
from openrerank.text.prepare import InputTooLongError
from openrerank.text.tokenizing import CHARS_PER_TOKEN_GUESS

WORDS = "paris banana river mountain engine water city gene".split()


def long_text(n_words: int, offset: int = 0) -> str:
    return " ".join(WORDS[(i + offset) % len(WORDS)] for i in range(n_words))


@pytest.fixture(scope="module")
def cross(tiny_model_dir) -> PairTextEncoder:
    """Tiny WordPiece tokenizer (one token per word above), window 32."""
    return PairTextEncoder(AutoTokenizer.from_pretrained(str(tiny_model_dir)), 32)


@pytest.fixture(scope="module")
def bi() -> BiTextEncoder:
    """The embedded default's tokenizer, window 256."""
    return BiTextEncoder(AutoTokenizer.from_pretrained(str(default_model_dir())), 256)


def test_none_refuses_over_long_pairs(cross):
    with pytest.raises(InputTooLongError) as err:
        cross.prepare("paris", ["sea", long_text(40)], Truncate.NONE)
    assert err.value.passage_index == 1 and err.value.maximum == 32 and err.value.length == 40 + 4
    ok = cross.prepare("paris", ["sea"], Truncate.NONE)
    assert ok.owners == [0] and ok.prompt_tokens == 5


def test_end_and_start_cut_opposite_ends_keeping_the_query(cross):
    text = long_text(40)
    end = cross.prepare("paris", [text], Truncate.END).items[0]
    start = cross.prepare("paris", [text], Truncate.START).items[0]
    assert isinstance(end, PairItem) and len(end.input_ids) == len(start.input_ids) == 32
    assert end.input_ids[:3] == start.input_ids[:3]  # [CLS] paris [SEP]
    full = cross.tokenizer(text, add_special_tokens=False)["input_ids"]
    assert end.input_ids[3:-1] == full[:28] and start.input_ids[3:-1] == full[-28:]


def test_cross_encoder_chunks_cover_the_passage_with_overlap(cross):
    text = long_text(100)
    prep = cross.prepare("paris", ["sea", text], Truncate.CHUNK)
    assert prep.owners[0] == 0 and set(prep.owners[1:]) == {1} and len(prep.owners) > 4
    full = cross.tokenizer(text, add_special_tokens=False)["input_ids"]
    bodies = [it.input_ids[3:-1] for it, o in zip(prep.items, prep.owners, strict=True) if o == 1]
    assert all(len(it.input_ids) <= 32 and it.input_ids[:3] == prep.items[0].input_ids[:3] for it in prep.items)
    assert bodies[0] == full[: len(bodies[0])] and bodies[-1] == full[-len(bodies[-1]):]  # start and end
    overlap = int(P.CHUNK_OVERLAP * len(bodies[0]))
    assert overlap > 0 and bodies[1][:overlap] == bodies[0][-overlap:]
    assert prep.prompt_tokens == sum(len(it.input_ids) for it in prep.items)


def test_max_chunks_keeps_leading_windows(cross):
    text = long_text(100)
    capped = cross.prepare("paris", [text, text], Truncate.CHUNK, max_chunks_per_passage=2)
    assert capped.owners == [0, 0, 1, 1]


def test_the_chunk_cap_clips_a_huge_passage_before_its_windows_are_made(cross, monkeypatch):
    """A 1 MB passage under a chunk cap costs what its capped windows cost: the tokenizer only ever
    sees the span those windows cover, not the megabyte."""
    seen: list[int] = []
    real_call = type(cross.tok).__call__

    def spy(self, *args, **kw):
        texts = [a for a in args if isinstance(a, list) and a and isinstance(a[0], str)]
        seen.extend(len(t) for group in texts for t in group)
        return real_call(self, *args, **kw)

    monkeypatch.setattr(type(cross.tok), "__call__", spy)
    huge = long_text(200_000)  # ~1.2 MB
    prep = cross.prepare("paris " * 40, [huge], Truncate.CHUNK, max_chunks_per_passage=3)
    assert prep.owners == [0, 0, 0]
    assert max(seen) <= 4 * 32 * 3 * CHARS_PER_TOKEN_GUESS  # never the whole megabyte
    # the over-long query was cut to half the window, so each window still holds a real slice
    q_len = prep.items[0].token_type_ids.index(1) - 2  # [CLS] query [SEP] | passage [SEP]
    assert q_len <= (32 - 3) // 2
    assert all(len(it.input_ids) - q_len - 3 >= (32 - 3) // 2 for it in prep.items[:2])


def test_max_tokens_per_passage_clips_before_anything_else(cross):
    prep = cross.prepare("paris", [long_text(100)], Truncate.CHUNK, max_tokens_per_passage=20)
    assert prep.owners == [0] and len(prep.items[0].input_ids) == 3 + 20 + 1


def test_sentence_spans():
    text = "First one. Second!  Third?\nFourth line\n\nFifth。第六。"
    spans = B._sentence_spans(text)
    assert [text[a:b] for a, b in spans] == ["First one.", "Second!", "Third?", "Fourth line", "Fifth。", "第六。"]
    assert B._sentence_spans("") == [] and B._sentence_spans("no break") == [(0, 8)]


def test_pack_overlaps_neighbouring_windows():
    text = "abcdefghij"
    units = [(i, i + 1, 10) for i in range(10)]  # ten one-character units of 10 tokens each
    windows = B._pack(text, units, 40)
    assert windows[0] == "abcd" and all(len(w) <= 4 for w in windows)
    assert windows[-1].endswith("j")
    for a, b in itertools.pairwise(windows):
        assert a[-1] >= b[0]  # every next window starts inside the previous one


def test_bi_encoder_short_passages_are_whole(bi):
    prep = bi.prepare("capital of france", ["Paris is the capital.", "Bananas."], Truncate.CHUNK)
    assert prep.owners == [0, 1]
    assert all(isinstance(it, BiItem) for it in prep.items)
    end = bi.prepare("capital of france", ["Paris is the capital.", "Bananas."], Truncate.END)
    assert [it.passage_ids for it in prep.items] == [it.passage_ids for it in end.items]


def test_bi_encoder_chunks_keep_sentences_whole(bi):
    filler = " ".join(f"Sentence number {i} talks about the weather in town." for i in range(120))
    answer = "Mercury boils at 356.7 degrees Celsius."
    text = f"{filler} {answer} The end of the report."
    prep = bi.prepare("when does mercury boil", ["short one", text], Truncate.CHUNK)
    assert prep.owners[0] == 0 and set(prep.owners[1:]) == {1}
    windows = [bi.tokenizer.decode(it.passage_ids, skip_special_tokens=True) for it in prep.items[1:]]
    assert all(len(it.passage_ids) <= B.BI_CHUNK_TOKENS + 2 for it in prep.items[1:])
    needle = bi.tokenizer.decode(bi.tokenizer(answer, add_special_tokens=False)["input_ids"])
    assert any(needle in w for w in windows)  # the answer sentence is intact in some window
    assert all(w.endswith(".") and w[0].isalpha() for w in windows)  # windows are whole sentences
    assert prep.prompt_tokens == len(prep.items[0].query_ids) + sum(len(it.passage_ids) for it in prep.items)


def test_bi_encoder_max_chunks_bounds_the_covered_span(bi):
    filler = " ".join(f"Sentence number {i} talks about the weather in town." for i in range(120))
    text = f"{filler} Mercury boils at 356.7 degrees Celsius."
    full = bi.prepare("q", [text], Truncate.CHUNK)
    one = bi.prepare("q", [text], Truncate.CHUNK, max_chunks_per_passage=1)
    decoded = [bi.tokenizer.decode(it.passage_ids, skip_special_tokens=True) for it in one.items]
    assert len(one.items) < len(full.items)
    assert sum(len(it.passage_ids) - 2 for it in one.items) < 2 * 254  # about one 254-token window's worth
    assert not any("mercury" in w for w in decoded)


def test_a_bi_encoders_long_passage_counts_the_model_windows_its_span_fills(bi):
    """Billing (search_units) and --max-chunks-per-request counted each small sentence window: Cohere v1's
    default 10 chunks on 100 long documents was refused (over 2,048 chunks) on the default model though a
    cross-encoder, with the same window, counted 1,000. A long passage counts as the windows a cross-encoder
    of that window would cut from the same span."""
    from openrerank.text.prepare import chunk_starts

    filler = " ".join(f"Sentence number {i} talks about the weather in town." for i in range(120))
    for cap in (None, 1, 3):
        prep = bi.prepare("q", ["short one", filler], Truncate.CHUNK, max_chunks_per_passage=cap)
        tokens = len(bi.tok.ids(filler))
        window = bi.max_length - bi.single_specials
        span = tokens if cap is None else min(tokens, window + (cap - 1) * (window - P.chunk_overlap(window)))
        assert len(prep.items) > 1 + len(chunk_starts(span, window))  # more sentence windows than that ...
        assert prep.windows == 1 + len(chunk_starts(span, window))  # ... but counted as model windows
        assert list(prep.windows_of(2)) == [1, len(chunk_starts(span, window))]
        if cap is not None:
            assert prep.windows - 1 <= cap


def test_bi_encoder_sentence_longer_than_a_window_is_split(bi):
    run_on = " ".join(["word"] * 600)  # no sentence break at all
    prep = bi.prepare("q", [run_on], Truncate.CHUNK)
    assert len(prep.items) > 600 // B.BI_CHUNK_TOKENS
    assert all(len(it.passage_ids) <= B.BI_CHUNK_TOKENS + 2 for it in prep.items)


def test_bi_encoder_windows_of_a_long_sentence_start_and_end_at_word_edges(bi):
    """Each window is re-tokenized as text: one cut inside a word ('vably antidisestablish') was embedded as
    other words. Windows of a long run-on sentence are runs of whole words, overlapping, covering the span;
    so is the last window of a span bounded by `max_chunks`."""
    rng = random.Random(0)
    long_words = ["antidisestablishmentarianism", "photosynthesization", "electroencephalography", "paris",
                  "unbelievably"]
    text = " ".join(rng.choice(long_words) for _ in range(400))
    for cap in (None, 1):
        windows, _, _ = bi._bi_windows([text], cap)
        assert len(windows) > 3
        spans = []
        for w in windows:
            start = text.find(w, spans[-1][0] + 1 if spans else 0)
            end = start + len(w)
            assert start >= 0 and text[start - 1 : start].strip() == text[end : end + 1].strip() == "", \
                f"cut inside a word: {w[:30]!r} ... {w[-30:]!r}"
            assert len(bi.tok.ids(w)) <= B.BI_CHUNK_TOKENS
            spans.append((start, end))
        assert spans[0][0] == 0 and all(b[0] < a[1] for a, b in itertools.pairwise(spans))  # overlapping
        assert cap or spans[-1][1] == len(text)
    # a word longer than a window is still cut into windows that fit (inside the word, where it must)
    run_on = "-".join(["paris"] * 200)  # one 399-token word
    windows, _, _ = bi._bi_windows([run_on], None)
    assert len(windows) > 2 and all(len(bi.tok.ids(w)) <= B.BI_CHUNK_TOKENS for w in windows)
    assert windows[0].startswith("paris-") and windows[-1].endswith("-paris")


# -- texts embedded on their own (/v1/embeddings) -------------------------------------------------


@pytest.fixture(scope="module")
def prompted() -> BiTextEncoder:
    """The default's tokenizer with a query prompt (as e5/bge models have), window 16."""
    return BiTextEncoder(AutoTokenizer.from_pretrained(str(default_model_dir())), 16,
                         prompts={"query": "query: ", None: "default: "})


def test_encode_texts_prepends_the_prompt_of_the_input_type(prompted):
    tok = prompted.tokenizer
    assert prompted.encode_texts(["paris"], input_type="query") == [tok("query: paris")["input_ids"]]
    assert prompted.encode_texts(["paris"], input_type="passage") == [tok("paris")["input_ids"]]  # no prompt
    assert prompted.encode_texts(["paris"]) == [tok("default: paris")["input_ids"]]


def test_encode_texts_truncation_keeps_the_prompt(prompted):
    text = long_text(40)
    tok = prompted.tokenizer
    with pytest.raises(InputTooLongError):
        prompted.encode_texts([text], Truncate.NONE, input_type="query")
    end = prompted.encode_texts([text], Truncate.END, input_type="query")[0]
    start = prompted.encode_texts([text], Truncate.START, input_type="query")[0]
    prompt_ids = tok("query:", add_special_tokens=False)["input_ids"]
    assert len(end) == len(start) == 16
    assert end[1 : 1 + len(prompt_ids)] == start[1 : 1 + len(prompt_ids)] == prompt_ids
    words = tok(text, add_special_tokens=False)["input_ids"]
    assert start[1 + len(prompt_ids) : -1] == words[-(16 - 2 - len(prompt_ids)) :]  # the text's end
    assert end[1 + len(prompt_ids) : -1] == words[: 16 - 2 - len(prompt_ids)]  # the text's start


def test_bi_encoder_reranks_with_the_query_and_passage_prompts():
    """Each text gets its input type's prompt (what /v1/embeddings prepends for input_type query / passage),
    under every truncation; a CHUNK window of whole sentences leaves room for it (none is cut short), START
    keeps it and cuts the passage's start."""
    tok = AutoTokenizer.from_pretrained(str(default_model_dir()))
    enc = BiTextEncoder(tok, 32, prompts={"query": "query: ", "passage": "passage: "})
    q_ids = tok("query: capital of france")["input_ids"]
    head = tok("passage: ")["input_ids"][:-1]  # [CLS] passage :
    text = " ".join(long_text(9, i) + "." for i in range(10))  # sentences of 10 tokens
    period = tok.convert_tokens_to_ids(".")
    for truncate in (Truncate.END, Truncate.START, Truncate.CHUNK):
        prep = enc.prepare("capital of france", ["paris is the capital", text], truncate)
        assert all(it.query_ids == q_ids for it in prep.items)
        assert prep.items[0].passage_ids == tok("passage: paris is the capital")["input_ids"]
        long = prep.items[1:]
        assert all(it.passage_ids[: len(head)] == head and len(it.passage_ids) <= 32 for it in long)
        if truncate is Truncate.CHUNK:
            assert len(long) > 1 and all(it.passage_ids[-2] == period for it in long)
    start = enc.prepare("q", [text], Truncate.START).items[0].passage_ids
    assert start[-4:-1] == tok(text, add_special_tokens=False)["input_ids"][-3:]


def test_the_smallest_window_holds_the_fixed_tokens_and_a_token_of_query_and_passage(tiny_model_dir):
    """`--max-length 1` started a server that refused every request as too long; the window an encoder
    needs is its own to say (special tokens, a prompt), and the smallest one it says still scores a pair."""
    from openrerank.text.prepare import WindowTooSmallError

    tok = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    pair = PairTextEncoder(tok, 32)
    assert pair.min_length == tok.num_special_tokens_to_add(pair=True) + 2
    one = BiTextEncoder(tok, 32)
    prompted = BiTextEncoder(tok, 32, prompts={"query": "paris banana river: ", "passage": "city: "})
    longest = len(tok("paris banana river: ", add_special_tokens=False)["input_ids"])
    assert prompted.min_length == one.min_length + longest == tok.num_special_tokens_to_add(pair=False) + longest + 1
    for enc in (pair, one, prompted):
        enc.check_window()
        enc.max_length = enc.min_length
        enc.check_window()
        items = enc.prepare(long_text(5), [long_text(9), "x"], Truncate.END).items
        assert items and all(len(it.input_ids if isinstance(it, PairItem) else it.passage_ids) <= enc.max_length
                             for it in items)
        enc.max_length -= 1
        with pytest.raises(WindowTooSmallError, match=f"a {enc.max_length}-token window is too small"):
            enc.check_window()

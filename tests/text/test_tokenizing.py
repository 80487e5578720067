"""Bounded tokenization gives the ids whole-text tokenization gives, at a cost that follows what is scored;
the tokenizer pool lets a call through while another holds a copy."""

from __future__ import annotations

import logging
import random
import threading

import pytest
from transformers import AutoTokenizer

from openrerank.core.requests import Truncate
from openrerank.sources.source import default_model_dir
from openrerank.text import prepare as P
from openrerank.text.bi import BiTextEncoder
from openrerank.text.pairs import PairTextEncoder
from openrerank.text.template import PromptTemplate, TemplateTextEncoder
from openrerank.text.tokenizing import CHARS_PER_TOKEN_GUESS, TokenizerPool, bound_texts
from tests.families.builders import QWEN, XLMR, build_tokenizer

VOCAB = ("paris banana river mountain engine water city gene über naïve straße 東京 Ελλάδα 12.5% don't "
         "e-mail (see) x=y; antidisestablishmentarianism " + "a" * 150).split()
TEMPLATE = PromptTemplate(("<|im_start|>user\n", "Q: {query}\nD: {passage}", "<|im_end|>\n"), query_share=0.75)


def text(rng: random.Random, n_words: int) -> str:
    seps = [" ", " ", " ", "  ", "\n", ", ", ". "]
    return "".join(rng.choice(VOCAB) + rng.choice(seps) for _ in range(n_words)).strip()


def encoders() -> dict:
    minilm = AutoTokenizer.from_pretrained(str(default_model_dir()))
    return {
        "pair-wordpiece": PairTextEncoder(minilm, 48),
        "pair-unigram": PairTextEncoder(build_tokenizer(XLMR), 48),
        "bi-wordpiece": BiTextEncoder(minilm, 48),
        "template-bpe": TemplateTextEncoder(build_tokenizer(QWEN), 64, TEMPLATE),
    }


@pytest.fixture(scope="module")
def all_encoders() -> dict:
    return encoders()


def unbounded(monkeypatch) -> None:
    monkeypatch.setattr(P, "bound_texts", lambda tok, texts, need, from_end=False: (list(texts), []))


@pytest.mark.parametrize("name", ["pair-wordpiece", "pair-unigram", "bi-wordpiece", "template-bpe"])
@pytest.mark.parametrize(("truncate", "chunks", "max_tokens"), [
    (Truncate.END, None, None), (Truncate.START, None, None), (Truncate.CHUNK, 3, None),
    (Truncate.CHUNK, 2, 70), (Truncate.END, None, 30)])
def test_bounded_texts_give_the_ids_whole_texts_give(all_encoders, monkeypatch, name, truncate, chunks, max_tokens):
    enc = all_encoders[name]
    rng = random.Random(7)
    for _ in range(6):
        query = text(rng, rng.choice([3, 30, 300]))
        passages = [text(rng, rng.choice([5, 60, 400, 3000])) for _ in range(4)]
        kw = {"max_chunks_per_passage": chunks, "max_tokens_per_passage": max_tokens}
        bounded = enc.prepare(query, passages, truncate, **kw)
        with monkeypatch.context() as m:
            unbounded(m)
            whole = enc.prepare(query, passages, truncate, **kw)
        assert bounded.owners == whole.owners
        assert bounded.items == whole.items, (query[:60], [p[:60] for p in passages])


def test_none_reports_exact_lengths_within_four_windows_and_a_bound_beyond(all_encoders):
    enc = all_encoders["pair-wordpiece"]
    with pytest.raises(P.InputTooLongError) as err:
        enc.prepare("q", ["river " * 100], Truncate.NONE)
    assert err.value.length == 104 and str(err.value) == "Input length 104 exceeds maximum allowed token size 48"
    with pytest.raises(P.InputTooLongError) as err:
        enc.prepare("q", ["ok", "river " * 100_000], Truncate.NONE)
    assert err.value.passage_index == 1 and "of at least" in str(err.value)


def test_a_megabyte_passage_is_read_only_as_far_as_the_window_needs(all_encoders, monkeypatch):
    enc = all_encoders["pair-wordpiece"]
    seen: list[int] = []
    call = TokenizerPool.__call__

    def spy(self, *args, **kw):
        seen.extend(len(t) for a in args if isinstance(a, list) for t in a if isinstance(t, str))
        return call(self, *args, **kw)

    monkeypatch.setattr(TokenizerPool, "__call__", spy)
    huge = "river water mountain " * 50_000  # 1 MB
    for truncate in (Truncate.END, Truncate.START):
        prep = enc.prepare("q", [huge], truncate)
        assert len(prep.items) == 1 and prep.items[0].length == 48
    assert sum(seen) < 4 * 48 * 4 * CHARS_PER_TOKEN_GUESS  # a few windows' worth, never the megabyte


def test_a_text_without_word_breaks_is_still_cut_exactly():
    tok = TokenizerPool(AutoTokenizer.from_pretrained(str(default_model_dir())))
    cjk = "東京都は日本の首都である" * 2000
    (cut,), which = bound_texts(tok, [cjk], 40)
    assert which == [0] and len(cut) < len(cjk)
    assert tok.ids(cut)[:40] == tok.ids(cjk)[:40]


def test_the_pool_serves_a_call_while_another_holds_a_copy():
    """One long tokenization holds one copy; another request's call gets its own (the single locked
    tokenizer made it wait: a 2-passage request waited 6-23 s behind a 7 MB one)."""
    pool = TokenizerPool(AutoTokenizer.from_pretrained(str(default_model_dir())), size=2)
    done = threading.Event()
    with pool._borrow():  # a call in progress elsewhere
        worker = threading.Thread(target=lambda: (pool.ids("paris is a city"), done.set()), daemon=True)
        worker.start()
        assert done.wait(60), "a second call waited for the first copy"
        with pool._borrow():  # both copies busy now: a third call waits for one
            third = threading.Event()
            waiter = threading.Thread(target=lambda: (pool.ids("x"), third.set()), daemon=True)
            waiter.start()
            assert not third.wait(0.2)
        assert third.wait(60)


def test_a_text_past_the_window_is_tokenized_without_transformers_warning(caplog):
    """The server cuts texts past the window itself; transformers' "will result in indexing errors"
    warning (once per tokenizer copy) read as a fault in the server's log."""
    tok = TokenizerPool(AutoTokenizer.from_pretrained(str(default_model_dir())), size=1)
    with caplog.at_level(logging.WARNING):
        logging.getLogger("transformers").addHandler(caplog.handler)
        try:
            assert len(tok.ids("word " * 2000)) == 2000
        finally:
            logging.getLogger("transformers").removeHandler(caplog.handler)
    assert not [r for r in caplog.records if "sequence length" in r.getMessage()]

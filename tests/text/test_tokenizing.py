"""Bounded tokenization gives the ids whole-text tokenization gives, at a cost that follows what is scored;
the tokenizer pool lets a call through while another holds a copy."""

from __future__ import annotations

import logging
import random
import threading

import pytest
from transformers import AutoTokenizer

from openrerank.core.requests import Truncate
from openrerank.families.qwen3_reranker import Qwen3RerankerFamily
from openrerank.sources.source import default_model_dir
from openrerank.text import prepare as P
from openrerank.text import tokenizing as T
from openrerank.text.bi import BiTextEncoder
from openrerank.text.pairs import PairTextEncoder
from openrerank.text.template import PromptTemplate, TemplateTextEncoder
from openrerank.text.tokenizing import CHARS_PER_TOKEN_GUESS, TokenizerPool, bound_read, bound_texts
from tests.families.builders import DEBERTA, QWEN, XLMR, build_tokenizer

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


#: Pieces of the texts below: words, punctuation that byte-level BPE merges with newlines, CJK without spaces,
#: and runs of whitespace long enough to hold a window (one pre-token: a run of newlines).
PIECES = ["paris ", "banana", "the ", "東京", "巴黎" * 5, "Ελλάδα ", "don't ", "12.5% ", "?", ". ", "?\n", "a" * 40,
          "<|im_end|>", " ", "\n", "\t", "\r\n", "\u3000"]
RUNS = [" ", "\n", "\t", " \n", "\r\n", "\n\n "]


def ragged(rng: random.Random, n: int) -> str:
    """A text of `n` pieces, one in twelve a whitespace run of up to 3000 characters."""
    return "".join(rng.choice(RUNS) * rng.choice([3, 50, 400, 3000]) if rng.random() < 1 / 12 else rng.choice(PIECES)
                   for _ in range(n))


@pytest.fixture(scope="module")
def pools() -> dict:
    return {"wordpiece": TokenizerPool(AutoTokenizer.from_pretrained(str(default_model_dir()))),
            "byte-bpe": TokenizerPool(build_tokenizer(QWEN)), "unigram": TokenizerPool(build_tokenizer(XLMR)),
            "unigram-deberta": TokenizerPool(build_tokenizer(DEBERTA))}


@pytest.mark.parametrize("name", ["wordpiece", "byte-bpe", "unigram", "unigram-deberta"])
@pytest.mark.parametrize("from_end", [False, True])
def test_a_bound_text_holds_the_tokens_the_whole_text_has_in_the_window(pools, name, from_end):
    """Whitespace runs broke the bound: a cut inside a run of newlines stripped the whole run, tokens below
    `need` included, and the text's last word came into the window (the model read "yellow. Paris")."""
    tok = pools[name]
    rng = random.Random(11)
    for trial in range(16):
        whole_text = ragged(rng, rng.choice([200, 800]))
        need = rng.choice([8, 20, 60])
        (bounded,), _ = bound_texts(tok, [whole_text], need, from_end=from_end)
        whole, got = tok.ids(whole_text), tok.ids(bounded)
        window = slice(-need, None) if from_end else slice(0, need)
        assert got[window] == whole[window], (trial, need, bounded[:80] if from_end else bounded[-80:])
        assert (len(got) > need) == (len(whole) > need)


@pytest.mark.parametrize("name", ["pair-wordpiece", "pair-unigram", "bi-wordpiece", "template-bpe"])
def test_prepare_on_ragged_texts_gives_what_whole_texts_give(all_encoders, monkeypatch, name):
    enc = all_encoders[name]
    rng = random.Random(5)
    for _ in range(3):
        query, passages = ragged(rng, rng.choice([3, 30])), [ragged(rng, rng.choice([150, 700])) for _ in range(3)]
        for truncate, chunks in [(Truncate.END, None), (Truncate.START, None), (Truncate.CHUNK, 3)]:
            bounded = enc.prepare(query, passages, truncate, max_chunks_per_passage=chunks)
            with monkeypatch.context() as m:
                unbounded(m)
                whole = enc.prepare(query, passages, truncate, max_chunks_per_passage=chunks)
            assert (bounded.owners, bounded.items) == (whole.owners, whole.items), truncate


@pytest.mark.parametrize("truncate", [Truncate.END, Truncate.START])
def test_a_window_of_newlines_is_scored_as_newlines_not_as_the_last_word(truncate):
    """The reviewer's case: Qwen3-Reranker's prompt, a 512-token window, 5000 newlines between a short text
    and "Paris"; only newlines fit in the window after the text, so the pair must not hold "Paris"."""
    tok = build_tokenizer(QWEN)
    enc = TemplateTextEncoder(tok, 512, Qwen3RerankerFamily().template(None))
    bananas = "Bananas are yellow. " * 20
    passage = bananas + "\n" * 5000 + "Paris" if truncate is Truncate.END else "Paris" + "\n" * 5000 + bananas
    query = "What is the capital of France?"
    (item,) = enc.prepare(query, [passage], truncate).items
    assert item.length == 512
    assert item.input_ids == enc._prepare(query, [passage], truncate, None).items[0].input_ids  # the whole text's
    assert "Paris" not in tok.decode(item.input_ids)


def test_max_tokens_per_passage_keeps_the_first_tokens_of_a_run():
    """Cohere's max_tokens_per_doc=50 on a text whose 50 first tokens end in newlines: the clipped text is
    those tokens, not the text's last word pulled in after a stripped run."""
    tok = build_tokenizer(QWEN)
    enc = TemplateTextEncoder(tok, 512, Qwen3RerankerFamily().template(None))
    passage = "Bananas are yellow. " * 3 + "\n" * 3000 + "Paris"
    (clipped,) = enc.clip_passages([passage], 50)
    whole = tok(passage, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    assert clipped == passage[: whole[49][1]]


def characters_tokenized(monkeypatch) -> list[int]:
    """The length of every text handed to a TokenizerPool from now on (while `monkeypatch` holds)."""
    seen: list[int] = []
    call = TokenizerPool.__call__

    def spy(self, *args, **kw):
        seen.extend(len(t) for a in args if isinstance(a, list) for t in a if isinstance(t, str))
        return call(self, *args, **kw)

    monkeypatch.setattr(TokenizerPool, "__call__", spy)
    return seen


@pytest.mark.parametrize("name", ["wordpiece", "byte-bpe", "unigram", "unigram-deberta"])
@pytest.mark.parametrize("run", [" ", "\n"])
@pytest.mark.parametrize("from_end", [False, True])
def test_a_long_whitespace_run_is_read_only_as_far_as_the_window_needs(pools, monkeypatch, name, run, from_end):
    """A run that one pre-token holds was read whole to settle its tokens (4 MB of newlines: 6 s for one
    512-token window). Past `bound_read(need)` characters the cut is safe, not exact: the window is filled
    from the text's start (end), its tokens before the run are the whole text's, and "Paris", past the run,
    stays out of it (where the tokenizer drops whitespace, WordPiece, it is the whole text's next token)."""
    tok, need = pools[name], 60
    bananas = "Bananas are yellow. " * 5  # fewer tokens than the window: its edge falls inside the run
    text = "Paris" + run * 4_000_000 + bananas if from_end else bananas + run * 4_000_000 + "Paris"
    with monkeypatch.context() as m:
        seen = characters_tokenized(m)
        (bounded,), which = bound_texts(tok, [text], need, from_end=from_end)
    assert max(seen) <= bound_read(need) and sum(seen) < 2 * bound_read(need), (max(seen), sum(seen))
    assert which == [0]
    got = tok(bounded, add_special_tokens=False, return_offsets_mapping=True)
    ids, offs = got["input_ids"], got["offset_mapping"]
    short = "Paris" + run * 200 + bananas if from_end else bananas + run * 200 + "Paris"  # the whole text's ids
    if name == "wordpiece":
        assert ids == tok.ids(short)
        return
    firm = len(tok.ids(bananas)) - 1  # the tokens before (after) the run, less one it may merge with
    assert len(ids) > need
    if from_end:
        start = offs[-need][0]
        assert text.endswith(bounded[start:]) and "Paris" not in bounded[start:]
        assert ids[-firm:] == tok.ids(short)[-firm:]
    else:
        end = offs[need - 1][1]
        assert text.startswith(bounded[:end]) and "Paris" not in bounded[:end]
        assert ids[:firm] == tok.ids(short)[:firm]


def test_a_text_no_cut_fits_is_cut_to_the_prefix_read_not_kept_whole(all_encoders, monkeypatch):
    """Where no candidate cut gives the window's tokens again, the text was kept whole and tokenized whole
    later (a megabyte for a 48-token window); the prefix read holds those tokens and is at most the cap."""
    enc = all_encoders["pair-wordpiece"]
    huge = "river water mountain " * 50_000  # 1 MB
    exact = {t: enc.prepare("q", [huge], t) for t in (Truncate.END, Truncate.START)}
    seen = characters_tokenized(monkeypatch)
    monkeypatch.setattr(T, "_joined", lambda *a: "")  # no candidate cut keeps the tokens
    for truncate, want in exact.items():
        assert enc.prepare("q", [huge], truncate).items == want.items
    assert max(seen) <= bound_read(48)


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
    seen = characters_tokenized(monkeypatch)
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

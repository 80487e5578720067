"""Tokenization whose cost follows what is scored, and that no request can hold for everyone.

Two problems this module solves (issue 22):

- A passage was tokenized whole before it was cut: a 2 MB passage cost 20 s and a gigabyte of RSS to
  keep its first 512 tokens. `bound_texts` cuts each text to a span that holds the tokens that can be
  used (a window under END, the covered span under CHUNK, `max_tokens_per_doc`), tokenizing a
  character prefix that grows only as far as it must: a few times `need` x `CHARS_PER_TOKEN_GUESS`
  characters for ordinary text, whatever the text's size.
- Every request of a model shared one locked tokenizer, so a request waited behind another's huge
  tokenization. `TokenizerPool` hands each call a copy of its own (the fast tokenizer keeps truncation
  and padding state between calls, so a copy serves one call at a time); the server also tokenizes a
  request's passages in slices (`engine/served.py`), so no thread is held for a whole big request.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import os
import re
import threading
from collections.abc import Iterator
from dataclasses import dataclass

#: First guess of characters per token when only a text's first (or last) N tokens matter; the span
#: read grows 4x while it holds too few tokens (long words, CJK, markup).
CHARS_PER_TOKEN_GUESS = 8
#: Tokens read past the last one that matters, so a cut inside a word cannot change the tokens kept.
BOUND_MARGIN = 16
#: Cuts tried per text, each checked by tokenizing the cut text, before the text is kept whole.
BOUND_TRIES = 4
#: Tokenizer copies per model: enough that a long tokenization never stalls the others.
POOL_SIZE = max(2, min(4, os.cpu_count() or 1))
_HEAD = re.compile(r"\s*\S*")  # a text's leading whitespace and first word
_TAIL = re.compile(r"\S*\s*$")  # its last word and trailing whitespace


class TokenizerPool:
    """Copies of a fast tokenizer for concurrent threads: a call takes a free copy (made on first need, up
    to `size`), and gives it back when done. `left=True` truncates on the left for that call (`START`)."""

    def __init__(self, tokenizer, size: int = POOL_SIZE) -> None:
        self.size = max(1, size)
        self._pristine = copy.deepcopy(tokenizer)  # never used to tokenize: copies are made from it
        self._free = [tokenizer]
        self._made = 1
        self._cv = threading.Condition()

    @contextlib.contextmanager
    def _borrow(self) -> Iterator:
        make = False
        with self._cv:
            while not self._free and self._made >= self.size:
                self._cv.wait()
            if self._free:
                tok = self._free.pop()
            else:
                self._made += 1
                make = True
        if make:
            tok = copy.deepcopy(self._pristine)
        try:
            yield tok
        finally:
            with self._cv:
                self._free.append(tok)
                self._cv.notify()

    def __call__(self, *args, left: bool = False, **kw) -> dict:
        with self._borrow() as tok:
            side = tok.truncation_side
            tok.truncation_side = "left" if left else "right"
            try:  # not verbose: transformers warns of "indexing errors" for any text past the model's
                # window, which every text bound here for truncation or chunking may be
                return tok(*args, return_attention_mask=False, verbose=False, **kw)
            finally:
                tok.truncation_side = side

    def ids(self, text: str | list[str], **kw) -> list:
        """Token ids without special tokens."""
        return self(text, add_special_tokens=False, **kw)["input_ids"]


def bound_texts(tok: TokenizerPool, texts: list[str], need: int, *, from_end: bool = False
                ) -> tuple[list[str], list[int]]:
    """Each text cut to a span holding its first `need` tokens (`from_end`: its last) exactly as the whole
    text tokenizes them, and a few more; the indices of the texts that were cut.

    Only a character prefix (suffix) is tokenized, grown 4x until it holds `need` + `BOUND_MARGIN` tokens
    that the rest of the text cannot change (`_settled`) or is the whole text, so the cost follows `need`,
    not the text's size (a long run that one pre-token holds, as a run of newlines, is read whole: its
    tokens depend on its length). The text's first (last) word is kept beyond the cut, so whatever follows
    (precedes) the text in a prompt meets the same characters as in the whole text. A cut is kept only where
    the cut text's own tokenization gives those `need` tokens (`_cut`); where no candidate cut does, the
    text stays whole."""
    out = list(texts)
    cut: list[int] = []
    chars = {i: need * CHARS_PER_TOKEN_GUESS for i, t in enumerate(texts) if len(t) > need * CHARS_PER_TOKEN_GUESS}
    ready: list[_Piece] = []
    while chars:
        idx = list(chars)
        pieces = [texts[i][-chars[i]:] if from_end else texts[i][: chars[i]] for i in idx]
        enc = tok(pieces, add_special_tokens=False, return_offsets_mapping=True)
        for n, (i, piece) in enumerate(zip(idx, pieces, strict=True)):
            ids, offs, words = enc["input_ids"][n], enc["offset_mapping"][n], enc.word_ids(n)
            if len(piece) < len(texts[i]):
                ids, offs, words = _settled(piece, ids, offs, words, from_end)
            if len(offs) > need + BOUND_MARGIN:
                ready.append(_Piece(i, piece, ids, offs, words))
                del chars[i]
            elif chars[i] * 4 < len(texts[i]):
                chars[i] *= 4
            else:
                chars[i] = len(texts[i])
                if len(piece) == len(texts[i]):  # the whole text holds too few tokens: nothing to cut
                    del chars[i]
    for i, text in _cut(tok, texts, ready, need, from_end).items():
        out[i] = text
        cut.append(i)
    return out, sorted(cut)


@dataclass(frozen=True)
class _Piece:
    """A text's tokenized prefix (suffix) less the tokens the rest of the text could change."""

    index: int
    text: str
    ids: list[int]
    offs: list[tuple[int, int]]
    words: list[int | None]


def _settled(piece: str, ids: list[int], offs: list[tuple[int, int]], words: list[int | None], from_end: bool
             ) -> tuple[list[int], list[tuple[int, int]], list[int | None]]:
    """A piece cut from a longer text, less the tokens of its last (first) pre-token, which the cut split and
    the rest of the text may tokenize otherwise: a split word (99 letters vs. one [UNK]), a run of newlines
    (byte-level BPE merges it from its start) or spaces. A tokenizer that splits the piece into no words (no
    pre-tokenizer, or none of its breaks) is cut at the last (first) whitespace instead."""
    if len(set(words)) > 1:
        edge = words[0] if from_end else words[-1]
        keep = [j for j, w in enumerate(words) if w != edge]
    elif from_end:
        first = next((j for j, c in enumerate(piece) if c.isspace()), None)
        keep = [j for j, o in enumerate(offs) if first is None or o[0] > first]
    else:
        last = next((j for j in range(len(piece) - 1, -1, -1) if piece[j].isspace()), None)
        keep = [j for j, o in enumerate(offs) if last is None or o[1] <= last]
    return [ids[j] for j in keep], [offs[j] for j in keep], [words[j] for j in keep]


def _cut(tok: TokenizerPool, texts: list[str], ready: list[_Piece], need: int, from_end: bool) -> dict[int, str]:
    """The cut text of each piece: the first of its candidate cuts (`_candidates`) whose own tokenization
    holds the piece's first (last) `need` tokens; tried in batches, a candidate per text at a time."""
    tries = {p.index: _candidates(p, need, from_end) for p in ready}
    by_index = {p.index: p for p in ready}
    done: dict[int, str] = {}
    while tries:
        trial = {i: _joined(texts[i], by_index[i], ks.pop(0), from_end) for i, ks in tries.items()}
        enc = tok(list(trial.values()), add_special_tokens=False, return_offsets_mapping=True)
        for n, (i, text) in enumerate(trial.items()):
            p, got = by_index[i], enc["input_ids"][n]
            if from_end:
                same = got[-need:] == p.ids[-need:]
            else:
                same = got[:need] == p.ids[:need] and list(enc["offset_mapping"][n][:need]) == p.offs[:need]
            if same and len(got) > need:
                done[i] = text
                del tries[i]
            elif not tries[i]:  # no cut keeps the tokens: the text stays whole
                del tries[i]
    return done


def _candidates(p: _Piece, need: int, from_end: bool) -> list[int]:
    """Up to `BOUND_TRIES` tokens to cut the piece before: nearest the tokens that matter first, those that
    start a pre-token, then those that start a word, then one `BOUND_MARGIN / 2` tokens away."""
    if from_end:
        last = len(p.offs) - need  # the first token that matters
        span, fallback = range(last - 1, BOUND_MARGIN // 2, -1), last - BOUND_MARGIN // 2
    else:
        span, fallback = range(need + 1, len(p.offs) - BOUND_MARGIN // 2), need + BOUND_MARGIN // 2
    starts = itertools.islice((k for k in span if p.words[k] != p.words[k - 1]), BOUND_TRIES)
    words = itertools.islice((k for k in span if _starts_word(p.text, p.offs[k][0])), BOUND_TRIES)
    return list(dict.fromkeys([*starts, *words, fallback]))[:BOUND_TRIES]


def _joined(text: str, p: _Piece, k: int, from_end: bool) -> str:
    """The text cut before the piece's token `k`, with the text's own far end (first or last word) kept: a
    prompt template's fixed text meets it as in the whole text. A space joins them only where neither side
    has whitespace there (the cut keeps the whitespace before the cut: it may hold tokens that matter)."""
    if from_end:
        head, body = _HEAD.match(text[:64]).group(), p.text[p.offs[k][0]:]
    else:
        head, body = p.text[: p.offs[k][0]], _TAIL.search(text[-64:]).group()
    space = head and body and not head[-1].isspace() and not body[0].isspace()
    return head + (" " if space else "") + body


def _starts_word(piece: str, start: int) -> bool:
    """Whether the token starting at `start` begins a word: whitespace before it, or (byte-level BPE, whose
    tokens carry their leading space) at its start."""
    return start > 0 and (piece[start].isspace() or piece[start - 1].isspace())

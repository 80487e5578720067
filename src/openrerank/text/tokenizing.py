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
import re
import threading
from collections.abc import Iterator
from dataclasses import dataclass

from openrerank.core.cpus import available_cpus

#: First guess of characters per token when only a text's first (or last) N tokens matter; the span
#: read grows 4x while it holds too few tokens (long words, CJK, markup).
CHARS_PER_TOKEN_GUESS = 8
#: Tokens read past the last one that matters, so a cut inside a word cannot change the tokens kept.
BOUND_MARGIN = 16
#: Cuts tried per text, each checked by tokenizing the cut text, before the prefix read is taken whole.
BOUND_TRIES = 4
#: Times the span read may grow 4x past the window's guess: `bound_read(need)` characters of a text at most
#: are tokenized to bound it (for an 8-token window a run of newlines of 9,000 characters is still read whole).
BOUND_GROWTHS = 3
#: Tokenizer copies per model: enough that a long tokenization never stalls the others.
POOL_SIZE = max(2, min(4, available_cpus()))
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


def lowercased(tokenizer):
    """A copy of `tokenizer` that lowercases every text, as sentence-transformers' `do_lower_case` does: a
    Lowercase normalizer in front of the tokenizer's own (unless it has one), so a prompt prepended to a text is
    lowercased with it, and offsets still point into the text as sent (chunking and bounding cut that text)."""
    from tokenizers.normalizers import Lowercase, Sequence

    tokenizer = copy.deepcopy(tokenizer)
    if not tokenizer.is_fast:  # sentence-transformers' own path for a slow tokenizer
        try:
            tokenizer.do_lower_case = True
        except AttributeError:
            tokenizer.basic_tokenizer.do_lower_case = True
        return tokenizer
    backend = tokenizer.backend_tokenizer
    own = backend.normalizer
    steps = list(own) if isinstance(own, Sequence) else [] if own is None else [own]
    if not any(isinstance(step, Lowercase) for step in steps):
        backend.normalizer = Sequence([Lowercase(), *steps])
    return tokenizer


def bound_read(need: int) -> int:
    """The most characters of one text that bounding it for `need` tokens tokenizes: a fixed multiple of what
    the window needs, so no text (a megabyte run of newlines) buys seconds of CPU beyond its window's cost."""
    return CHARS_PER_TOKEN_GUESS * (need + BOUND_MARGIN) * 4 ** BOUND_GROWTHS


def bound_texts(tok: TokenizerPool, texts: list[str], need: int, *, from_end: bool = False
                ) -> tuple[list[str], list[int]]:
    """Each text cut to a span holding its first `need` tokens (`from_end`: its last) exactly as the whole
    text tokenizes them, and a few more; the indices of the texts that were cut.

    Only a character prefix (suffix) is tokenized: `CHARS_PER_TOKEN_GUESS` characters per token of `need` +
    `BOUND_MARGIN` first, grown 4x until it holds that many tokens that the rest of the text cannot change
    (`_settled`), is the whole text, or is `bound_read(need)` characters long, so the cost follows `need`,
    not the text's size. The text's first (last) word is kept beyond the cut, so whatever follows (precedes)
    the text in a prompt meets the same characters as in the whole text. A cut is kept only where the cut
    text's own tokenization gives those `need` tokens (`_cut`); where no candidate cut does, the prefix read
    is the cut text (its window is the whole text's). A text whose `bound_read` prefix holds too few settled
    tokens (a long run of whitespace that one pre-token holds: its tokens depend on its length) gets the
    safe cut of `_safe` instead of an exact one."""
    most = bound_read(need)
    first = CHARS_PER_TOKEN_GUESS * (need + BOUND_MARGIN)  # grown 4x, it reaches `most`
    chars = {i: first for i, t in enumerate(texts) if len(t) > need * CHARS_PER_TOKEN_GUESS}
    ready: list[_Piece] = []
    capped: list[_Piece] = []
    while chars:
        idx = list(chars)
        pieces = [texts[i][-chars[i]:] if from_end else texts[i][: chars[i]] for i in idx]
        enc = tok(pieces, add_special_tokens=False, return_offsets_mapping=True)
        for n, (i, piece) in enumerate(zip(idx, pieces, strict=True)):
            raw = _Piece(i, piece, enc["input_ids"][n], list(enc["offset_mapping"][n]), enc.word_ids(n))
            whole = len(piece) == len(texts[i])
            settled = raw if whole else _settled(raw, from_end)
            if len(settled.offs) > need + BOUND_MARGIN:
                ready.append(settled)
            elif not whole and len(piece) >= most:
                capped.append(raw)
            elif not whole:
                chars[i] = min(chars[i] * 4, most, len(texts[i]))
                continue
            del chars[i]  # ready, capped, or whole with too few tokens: nothing to cut
    done = _cut(tok, texts, ready, need, from_end)
    done |= {p.index: p.text for p in ready if p.index not in done and len(p.text) < len(texts[p.index])}
    done |= _safe(tok, texts, capped, need, from_end)
    out = list(texts)
    for i, text in done.items():
        out[i] = text
    return out, sorted(done)


@dataclass(frozen=True)
class _Piece:
    """A text's tokenized prefix (suffix), whole or less the tokens the rest of the text could change."""

    index: int
    text: str
    ids: list[int]
    offs: list[tuple[int, int]]
    words: list[int | None]


def _settled(p: _Piece, from_end: bool) -> _Piece:
    """A piece cut from a longer text, less the tokens of its last (first) pre-token, which the cut split and
    the rest of the text may tokenize otherwise: a split word (99 letters vs. one [UNK]), a run of newlines
    (byte-level BPE merges it from its start) or spaces. A tokenizer that splits the piece into no words (no
    pre-tokenizer, or none of its breaks) is cut at the last (first) whitespace instead."""
    piece, offs, words = p.text, p.offs, p.words
    if len(set(words)) > 1:
        edge = words[0] if from_end else words[-1]
        keep = [j for j, w in enumerate(words) if w != edge]
    elif from_end:
        first = next((j for j, c in enumerate(piece) if c.isspace()), None)
        keep = [j for j, o in enumerate(offs) if first is None or o[0] > first]
    else:
        last = next((j for j in range(len(piece) - 1, -1, -1) if piece[j].isspace()), None)
        keep = [j for j, o in enumerate(offs) if last is None or o[1] <= last]
    return _Piece(p.index, piece, [p.ids[j] for j in keep], [offs[j] for j in keep], [words[j] for j in keep])


def _cut(tok: TokenizerPool, texts: list[str], ready: list[_Piece], need: int, from_end: bool) -> dict[int, str]:
    """The cut text of each piece: the first of its candidate cuts (`_candidates`) whose own tokenization
    holds the piece's first (last) `need` tokens; tried in batches, a candidate per text at a time. A piece
    none of whose cuts does is left out."""
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
            elif not tries[i]:
                del tries[i]
    return done


def _safe(tok: TokenizerPool, texts: list[str], capped: list[_Piece], need: int, from_end: bool) -> dict[int, str]:
    """Cuts of texts read `bound_read` characters far without `need` settled tokens: the window is filled
    from the text's start (end) with the tokens the span read gives, so only those of the whitespace run at
    the window's edge may differ from the whole text's, and nothing past the cut enters the window. First
    tried: a cut `BOUND_MARGIN / 2` tokens past the window with the text's far end kept (`_keeps` checks
    it); else the span read itself. A span of `need` tokens or fewer (a run the tokenizer drops, as WordPiece
    does whitespace) keeps the text's far end after it: those are the next tokens the text can hold."""
    done: dict[int, str] = {}
    trial: dict[int, tuple[_Piece, int, str]] = {}
    for p in capped:
        k = len(p.offs) - need - BOUND_MARGIN // 2 if from_end else need + BOUND_MARGIN // 2
        if len(p.offs) <= need:
            done[p.index] = _joined(texts[p.index], p, None, from_end)
        elif 0 < k < len(p.offs):
            trial[p.index] = (p, k, _joined(texts[p.index], p, k, from_end))
        else:
            done[p.index] = p.text
    if trial:
        enc = tok([t for _, _, t in trial.values()], add_special_tokens=False, return_offsets_mapping=True)
        for n, (i, (p, k, text)) in enumerate(trial.items()):
            keeps = _keeps(p, k, text, enc["input_ids"][n], enc["offset_mapping"][n], need, from_end)
            done[i] = text if keeps else p.text
    return done


def _keeps(p: _Piece, k: int, text: str, got: list[int], offs: list[tuple[int, int]], need: int, from_end: bool
           ) -> bool:
    """Whether `text`, the piece cut before its token `k`, holds more than `need` tokens, the piece's own
    before (after) the pre-token at its edge, and a window that ends before the cut (starts after it)."""
    if len(got) <= need:
        return False
    edge = p.words[0] if from_end else p.words[-1]
    firm = min(need, sum(1 for w in p.words if w != edge))
    if from_end:
        body = len(p.text) - p.offs[k][0]
        return offs[-need][0] >= len(text) - body and got[len(got) - firm:] == p.ids[len(p.ids) - firm:]
    return offs[need - 1][1] <= p.offs[k][0] and got[:firm] == p.ids[:firm]


def _candidates(p: _Piece, need: int, from_end: bool) -> list[int]:
    """Up to `BOUND_TRIES` tokens to cut the piece before, within `BOUND_MARGIN` of the tokens that matter (a
    cut text costs what the window costs): nearest them first, those that start a pre-token, then those that
    start a word, then one `BOUND_MARGIN / 2` tokens away."""
    if from_end:
        last = len(p.offs) - need  # the first token that matters
        span = range(last - 1, max(BOUND_MARGIN // 2, last - BOUND_MARGIN), -1)
        fallback = last - BOUND_MARGIN // 2
    else:
        span = range(need + 1, min(len(p.offs) - BOUND_MARGIN // 2, need + BOUND_MARGIN))
        fallback = need + BOUND_MARGIN // 2
    starts = itertools.islice((k for k in span if p.words[k] != p.words[k - 1]), BOUND_TRIES)
    words = itertools.islice((k for k in span if starts_word(p.text, p.offs[k][0])), BOUND_TRIES)
    return list(dict.fromkeys([*starts, *words, fallback]))[:BOUND_TRIES]


def _joined(text: str, p: _Piece, k: int | None, from_end: bool) -> str:
    """The text cut before the piece's token `k` (None: the whole piece), with the text's own far end (first
    or last word) kept: a prompt template's fixed text meets it as in the whole text. A space joins them only
    where neither side has whitespace there (the cut keeps the whitespace before the cut: it may hold tokens
    that matter)."""
    if from_end:
        head, body = _HEAD.match(text[:64]).group(), p.text if k is None else p.text[p.offs[k][0]:]
    else:
        head, body = p.text if k is None else p.text[: p.offs[k][0]], _TAIL.search(text[-64:]).group()
    space = head and body and not head[-1].isspace() and not body[0].isspace()
    return head + (" " if space else "") + body


def starts_word(piece: str, start: int) -> bool:
    """Whether the token starting at `start` begins a word: whitespace before it, or (byte-level BPE, whose
    tokens carry their leading space) at its start."""
    return start > 0 and (piece[start].isspace() or piece[start - 1].isspace())

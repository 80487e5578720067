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
import os
import re
import threading
from collections.abc import Iterator

#: First guess of characters per token when only a text's first (or last) N tokens matter; the span
#: read grows 4x while it holds too few tokens (long words, CJK, markup).
CHARS_PER_TOKEN_GUESS = 8
#: Tokens read past the last one that matters, so a cut inside a word cannot change the tokens kept.
BOUND_MARGIN = 16
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
    or is the whole text, so the cost follows `need`, not the text's size. The cut falls at a word start
    past those tokens where there is one, else `BOUND_MARGIN / 2` tokens past
    them: what a tokenizer does at the cut stays there. The text's first (last) word is kept beyond the cut,
    so whatever follows (precedes) the text in a prompt meets the same characters as in the whole text."""
    out = list(texts)
    cut: list[int] = []
    chars = {i: need * CHARS_PER_TOKEN_GUESS for i, t in enumerate(texts) if len(t) > need * CHARS_PER_TOKEN_GUESS}
    while chars:
        idx = list(chars)
        pieces = [texts[i][-chars[i]:] if from_end else texts[i][: chars[i]] for i in idx]
        offsets = tok(pieces, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
        for i, piece, offs in zip(idx, pieces, offsets, strict=True):
            if len(piece) < len(texts[i]):
                offs = _whole_words(piece, offs, from_end)
            if len(offs) > need + BOUND_MARGIN:
                # the text's own far end is kept: a prompt template's fixed text meets it as in the whole text
                if from_end:
                    out[i] = _HEAD.match(texts[i][:64]).group() + " " + _cut_suffix(piece, offs, need)
                else:
                    out[i] = _cut_prefix(piece, offs, need) + " " + _TAIL.search(texts[i][-64:]).group()
                cut.append(i)
                del chars[i]
            elif chars[i] * 4 < len(texts[i]):
                chars[i] *= 4
            else:
                chars[i] = len(texts[i])
                if len(piece) == len(texts[i]):  # the whole text holds too few tokens: nothing to cut
                    del chars[i]
    return out, cut


def _whole_words(piece: str, offs: list[tuple[int, int]], from_end: bool) -> list[tuple[int, int]]:
    """The offsets of the tokens of a piece cut from a longer text, less those of the word the cut split (a
    split word can tokenize into many pieces its whole never has: 99 letters vs. one [UNK])."""
    if from_end:
        first = next((j for j, c in enumerate(piece) if c.isspace()), None)
        return offs if first is None else [o for o in offs if o[0] > first]
    last = next((j for j in range(len(piece) - 1, -1, -1) if piece[j].isspace()), None)
    return offs if last is None else [o for o in offs if o[1] <= last]


def _starts_word(piece: str, start: int) -> bool:
    """Whether the token starting at `start` begins a word: whitespace before it, or (byte-level BPE, whose
    tokens carry their leading space) at its start."""
    return start > 0 and (piece[start].isspace() or piece[start - 1].isspace())


def _cut_prefix(piece: str, offs: list[tuple[int, int]], need: int) -> str:
    """The piece up to the end of a word past token `need` (no trailing whitespace: a template's next fixed
    text must meet the passage as it would in the whole text)."""
    for k in range(need + 1, len(offs) - BOUND_MARGIN // 2):
        if _starts_word(piece, offs[k][0]):
            return piece[: offs[k][0]].rstrip()
    return piece[: offs[need + BOUND_MARGIN // 2][0]]


def _cut_suffix(piece: str, offs: list[tuple[int, int]], need: int) -> str:
    """The piece from the start of a word before its last `need` tokens (no leading whitespace)."""
    last = len(offs) - need  # the first token that matters
    for k in range(last - 1, BOUND_MARGIN // 2, -1):
        if _starts_word(piece, offs[k][0]):
            return piece[offs[k][0]:].lstrip()
    return piece[offs[last - BOUND_MARGIN // 2][0]:]

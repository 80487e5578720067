"""What every text encoder shares: the prepared work, truncation errors, chunk arithmetic, a pool of
tokenizers, and bounded work: only the part of a text that can be scored is tokenized.

A model family decides *how* a query and a passage become token ids (pair encoding, separate
encodings, or a prompt template: `text/pairs.py`, `text/bi.py`, `text/template.py`); all of them return
a `Prepared`: work items plus, per item, the passage it belongs to. Several items per passage are
chunks, and a passage's score is its best chunk's (`Prepared.fold`, used by the server and the offline
path alike). Tokenization is always the fast (Rust) tokenizer's, never a Python token loop.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from openrerank.core.requests import Truncate
from openrerank.core.work import WorkItem
from openrerank.text.tokenizing import TokenizerPool, bound_texts

#: Fraction of a chunk window that overlaps the previous window; the stride is the rest (at least 3/4 of
#: the window, and the window is at least half the model's free window: see the encoders).
CHUNK_OVERLAP = 0.25
#: Under truncate=NONE a text is read up to this many model windows: enough to report an over-long
#: pair's exact length in ordinary cases, bounded for a megabyte one ("at least N tokens").
NONE_WINDOWS = 4


class InstructionError(ValueError):
    """A request's instruction this model cannot take (its input has none, or it does not fit the window)."""


class TextInputError(ValueError):
    """A query or passage this model cannot read as sent (a 4xx in the route's shape, like an empty text): e.g.
    nothing is left of it once the model's marker text is removed."""


class WindowTooSmallError(ValueError):
    """A window (`--max-length`) too small for the model's fixed text and one token of query and of passage."""


class InputTooLongError(ValueError):
    """A pair exceeds the model window under truncate=NONE (NIM: the whole request fails)."""

    def __init__(self, length: int, maximum: int, passage_index: int, *, at_least: bool = False) -> None:
        self.length = length
        self.maximum = maximum
        self.passage_index = passage_index
        size = f"of at least {length}" if at_least else str(length)
        super().__init__(f"Input length {size} exceeds maximum allowed token size {maximum}")


@dataclass
class Prepared:
    items: list[WorkItem]
    owners: list[int]  # passage index of each item (listwise: of each passage or chunk in its blocks)
    prompt_tokens: int  # tokens that will actually be scored
    #: Passages counted (billed, bounded by --max-chunks-per-request) as a number of windows other than their
    #: items: a bi-encoder scores a long passage over small sentence windows, but counts the model-sized
    #: windows its span fills, as a cross-encoder would.
    window_counts: dict[int, int] | None = None
    #: Of `prompt_tokens`, the query's where the family encodes it apart, once a request (bi-encoder, ColBERT):
    #: the slices of one request's passages each count it, and it is billed once (`concat`, `extra_tokens`).
    query_tokens: int = 0

    def extra_tokens(self, earlier: bool) -> int:
        """What this slice adds to its request's tokens: all of them, less its query's where an `earlier` slice
        counted it."""
        return self.prompt_tokens - (self.query_tokens if earlier else 0)

    @staticmethod
    def concat(parts: list[tuple[int, Prepared]]) -> Prepared:
        """One Prepared from those of consecutive slices of one request's passages (each with its first passage's
        index)."""
        if len(parts) == 1 and parts[0][0] == 0:
            return parts[0][1]
        items: list[WorkItem] = []
        owners: list[int] = []
        counts: dict[int, int] = {}
        for start, part in parts:
            items += part.items
            owners += [start + o for o in part.owners]
            counts.update({start + o: c for o, c in (part.window_counts or {}).items()})
        tokens = sum(part.extra_tokens(earlier=k > 0) for k, (_, part) in enumerate(parts))
        return Prepared(items, owners, tokens, counts or None, parts[0][1].query_tokens if parts else 0)

    @property
    def windows(self) -> int:
        """Passages and chunks scored: a passage cut into N windows counts N."""
        if not self.window_counts:
            return len(self.owners)
        return int(self.windows_of(max(self.owners, default=-1) + 1).sum())

    def windows_of(self, passages: int) -> np.ndarray:
        """The windows each of `passages` counts (the items it owns, unless `window_counts` says)."""
        out = np.bincount(np.asarray(self.owners, dtype=np.int64), minlength=passages)
        for owner, count in (self.window_counts or {}).items():
            out[owner] = count
        return out

    def fold(self, scores: np.ndarray, passages: int) -> np.ndarray:
        """Item scores -> one float32 score per passage: the best of its chunks."""
        out = np.full(passages, -np.inf, dtype=np.float32)
        np.maximum.at(out, np.asarray(self.owners, dtype=np.int64), np.asarray(scores, dtype=np.float32))
        return out


class TextEncoder(ABC):
    """(query, passages, truncation policy) -> work items; one subclass per input format.

    `prepare` first bounds every text to what the policy can use (`bound_texts`), so a subclass never
    tokenizes more than about that: a window under END/START, the span `max_chunks` windows cover under
    CHUNK, `max_tokens_per_passage`, `NONE_WINDOWS` windows under NONE."""

    #: The query is always cut to a length of the encoder's own (late interaction: its query length), so
    #: NONE refuses over-long passages only.
    cuts_query: ClassVar[bool] = False

    def __init__(self, tokenizer, max_length: int) -> None:
        self.tokenizer = tokenizer  # the Hugging Face tokenizer itself (read-only use)
        self.tok = TokenizerPool(tokenizer)
        self.max_length = max_length
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        #: id -> text of the tokenizer's added tokens (every special token, and Qwen's `<think>`): text the
        #: tokenizer reads as one of them anywhere in a prompt, a query's or passage's too.
        self._added = {int(i): t.content for i, t in getattr(tokenizer, "added_tokens_decoder", {}).items()}

    @property
    @abstractmethod
    def min_length(self) -> int:
        """The smallest window this encoder can work in: what every input spends on fixed text (special
        tokens, markers, a prompt's text) plus one token of query and one of passage."""

    def check_window(self) -> None:
        """WindowTooSmallError unless `max_length` is at least `min_length`: a smaller window would refuse
        every request as too long."""
        if self.max_length < self.min_length:
            raise WindowTooSmallError(f"a {self.max_length}-token window is too small for this model: its fixed "
                                      f"tokens and one token of query and of passage take {self.min_length}")

    def special_tokens_in(self, text: str) -> list[str]:
        """The added tokens `text` spells. An instruction is the task, not data: a special token in it would
        rewrite the prompt's structure (close the user turn, open the answer), not state a task; queries and
        passages keep theirs, as the references and vLLM do (docs/models.md)."""
        return sorted({self._added[t] for t in self.tok.ids(text) if t in self._added})

    def prepare(
        self,
        query: str,
        passages: list[str],
        truncate: Truncate,
        *,
        max_chunks_per_passage: int | None = None,
        max_tokens_per_passage: int | None = None,
        instruction: str | None = None,
    ) -> Prepared:
        """Work items for one query; `instruction` (a request's own) replaces the model's default one."""
        encoder = self if instruction is None else self.with_instruction(instruction)
        m = self.max_length
        from_end = truncate is Truncate.START
        need = {Truncate.NONE: NONE_WINDOWS * m, Truncate.CHUNK: (max_chunks_per_passage or 0) * m}.get(truncate, m)
        if max_tokens_per_passage:
            passages = encoder.clip_passages(passages, max_tokens_per_passage)
        if need:
            refusing = truncate is Truncate.NONE and not self.cuts_query
            (query,), q_cut = bound_texts(self.tok, [query], NONE_WINDOWS * m if refusing else m)
            passages, cut = bound_texts(self.tok, passages, need, from_end=from_end)
            if truncate is Truncate.NONE and ((q_cut and refusing) or cut):  # over the window whatever the rest holds
                raise InputTooLongError(need, m, cut[0] if cut else 0, at_least=True)
        return encoder._prepare(query, passages, truncate, max_chunks_per_passage)

    def with_instruction(self, instruction: str) -> TextEncoder:
        """This encoder with a request's own task instruction; InstructionError where the input has none."""
        raise InstructionError("this model's input has no task instruction")

    @abstractmethod
    def _prepare(self, query: str, passages: list[str], truncate: Truncate, max_chunks: int | None) -> Prepared: ...

    def clip_passages(self, passages: list[str], limit: int) -> list[str]:
        """Keep only each passage's first `limit` tokens (Cohere's max_tokens_per_doc, chunk caps)."""
        passages, _ = bound_texts(self.tok, passages, limit)
        enc = self.tok(passages, add_special_tokens=False, return_offsets_mapping=True)
        out = []
        for text, offsets in zip(passages, enc["offset_mapping"], strict=True):
            out.append(text if len(offsets) <= limit else text[: offsets[limit - 1][1]])
        return out

    def check_lengths(self, seqs: list[list[int]]) -> None:
        for i, s in enumerate(seqs):
            if len(s) > self.max_length:
                raise InputTooLongError(len(s), self.max_length, i)


def chunk_overlap(window: int) -> int:
    """Tokens a chunk shares with the previous one."""
    return max(1, int(window * CHUNK_OVERLAP))


def chunk_span(window: int, max_chunks: int) -> int:
    """Tokens that `max_chunks` overlapping windows of `window` tokens cover."""
    return window + (max_chunks - 1) * max(1, window - chunk_overlap(window))


def chunk_starts(total: int, window: int) -> list[int]:
    """Start offsets of overlapping windows covering `total` tokens (the last one ends at `total`)."""
    if total <= window:
        return [0]
    step = max(1, window - chunk_overlap(window))
    starts = list(range(0, total - window, step))
    starts.append(total - window)
    return starts


def cap_chunks(owners: list[int], max_chunks: int | None) -> list[int]:
    """Indices of the items to keep: at most `max_chunks` leading windows per passage."""
    if not max_chunks:
        return list(range(len(owners)))
    seen: dict[int, int] = {}
    keep = []
    for i, o in enumerate(owners):
        seen[o] = seen.get(o, 0) + 1
        if seen[o] <= max_chunks:
            keep.append(i)
    return keep

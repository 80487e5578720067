"""Listwise input: one query and many passages in one prompt, split into blocks the way the reference does.

A listwise reranker (jina-reranker-v3) reads a prompt holding the query, every passage closed by a marker
token, and the query again closed by another marker; a passage's score compares the hidden states at the two
markers. The family gives the prompt (`render`) and its marker strings; this module decides what goes in
which prompt, following the model card's reference `rerank()`:

* the query is cut to `query_window` tokens and every passage to `doc_window` tokens (END, START), refused
  over them (NONE), or (CHUNK, an openrerank addition) split into overlapping `doc_window`-token windows that
  enter the prompt as passages of their own, the passage scored by its best window;
* passages fill blocks in request order: a block closes once it holds `block_size` passages or the room left
  (`context` minus twice the query, minus the passages so far) falls to `doc_window` or below;
* each block is rendered and tokenized as one string, as the reference tokenizes its prompt;
* scores from several blocks are made comparable as the reference makes them (`ListwisePrepared.fold`): the
  query vector is the average of the blocks' query vectors, each weighted by its block's best unit score
  `max((1 + cos) / 2)`, and every passage is scored against that one vector.

Passage and query text is sanitized of the marker strings before rendering (as the reference does, repeated
until none is left), so only the template places markers; a query or passage that was nothing but marker text
is refused (`TextInputError`, a 400 like an empty text) rather than scored as the empty text it became. An
instruction is the task, not data, and the reference does not sanitize it: one holding marker text is refused
(`InstructionError`), as is one that makes the prompt's fixed text take more than half the window (the rule of
the prompt-template families, `text/template.py`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from openrerank.core.requests import Truncate
from openrerank.core.work import BlockItem
from openrerank.text.prepare import (
    InputTooLongError,
    InstructionError,
    Prepared,
    TextEncoder,
    TextInputError,
    WindowTooSmallError,
    chunk_starts,
)
from openrerank.text.tokenizing import bound_texts

#: (query, passages, instruction or None) -> the whole prompt of one block.
Render = Callable[[str, list[str], "str | None"], str]


@dataclass(frozen=True)
class ListwiseLimits:
    """How much one block holds (the reference's `rerank()` arguments and the model's window)."""

    context: int  # tokens a block may hold (the reference: tokenizer.model_max_length)
    doc_window: int  # tokens of one passage (the reference's max_doc_length)
    query_window: int  # tokens of the query (the reference's max_query_length)
    block_size: int  # passages in one block (the reference: 125)

    #: The smallest passage and query windows a block is still worth reading with.
    MIN_DOC_WINDOW: ClassVar[int] = 8
    MIN_QUERY_WINDOW: ClassVar[int] = 4

    def too_small(self) -> bool:
        return self.doc_window < self.MIN_DOC_WINDOW or self.query_window < self.MIN_QUERY_WINDOW


def split_blocks(lengths: list[int], query_length: int, limits: ListwiseLimits) -> list[list[int]]:
    """Passage indices per block, in order: the reference's rule, verbatim in effect."""
    fresh = limits.context - 2 * query_length
    blocks: list[list[int]] = []
    current: list[int] = []
    room = fresh
    for i, length in enumerate(lengths):
        current.append(i)
        room -= length
        if len(current) >= limits.block_size or room <= limits.doc_window:
            blocks.append(current)
            current, room = [], fresh
    if current:
        blocks.append(current)
    return blocks


def _cosines(query: np.ndarray, docs: np.ndarray) -> np.ndarray:
    norms = np.clip(np.linalg.norm(docs, axis=1) * np.linalg.norm(query), 1e-12, None)
    return docs @ query / norms


@dataclass
class ListwisePrepared(Prepared):
    """Blocks as work items; `owners` has one entry per passage (or chunk) in prompt order across blocks."""

    def fold(self, scores: np.ndarray, passages: int) -> np.ndarray:
        """Block outputs (`(entries + 1, dim)` each: passages, then the query) -> one cosine per passage.

        One block: the cosine of each passage with the block's query vector. Several: the query vector is the
        blocks' query vectors averaged with weights `max((1 + cos) / 2)` of each block (the reference's merge),
        and every passage's cosine is taken against it, so scores from different blocks share one query."""
        blocks = [np.asarray(b, dtype=np.float64) for b in scores]
        queries = np.stack([b[-1] for b in blocks])
        docs = np.concatenate([b[:-1] for b in blocks])
        weights = np.array([((1.0 + _cosines(b[-1], b[:-1])) / 2.0).max() for b in blocks])
        if weights.sum() <= 0:  # every passage exactly opposite its query: no block is better than another
            weights = np.ones_like(weights)
        query = np.average(queries, axis=0, weights=weights)
        entry_scores = _cosines(query, docs).astype(np.float32)
        return super().fold(entry_scores, passages)


class ListwiseTextEncoder(TextEncoder):
    def __init__(self, tokenizer, limits: ListwiseLimits, render: Render, markers: tuple[str, ...],
                 instruction: str | None = None) -> None:
        super().__init__(tokenizer, limits.doc_window)
        self.limits = limits
        self.render = render
        self.markers = markers
        self.instruction = instruction
        self.marker_ids = {int(tokenizer.convert_tokens_to_ids(m)) for m in markers}

    @property
    def min_length(self) -> int:
        return ListwiseLimits.MIN_DOC_WINDOW  # `max_length` is a passage's window; the block's, `limits.context`

    def check_window(self) -> None:
        if self.limits.too_small():
            raise WindowTooSmallError(f"a {self.limits.context}-token window is too small for listwise blocks")

    def with_instruction(self, instruction: str) -> ListwiseTextEncoder:
        """This encoder with a request's own instruction; InstructionError where `instruction_problem` finds one."""
        problem = self.instruction_problem(instruction)
        if problem:
            raise InstructionError(problem)
        variant = ListwiseTextEncoder.__new__(ListwiseTextEncoder)
        variant.__dict__.update(self.__dict__)
        variant.instruction = instruction
        return variant

    def instruction_problem(self, instruction: str) -> str | None:
        """Why `instruction` cannot go in this model's prompt (None: it can). Marker text in it would be read as
        a passage's or the query's end where the template put none; and the prompt's fixed text (one empty
        passage, the instruction included) may take at most half the window, as in the template families, so a
        block keeps room for the query and passages and an instruction cannot make every block's cost unbounded.
        Only about that many of the instruction's tokens are tokenized (`bound_texts`)."""
        found = [m for m in self.markers if m in instruction]
        if found:
            return f"an instruction may not contain the model's marker text {', '.join(found)}"
        special = self.special_tokens_in(instruction)
        if special:  # the template families' rule (`TemplateTextEncoder.with_instruction`)
            return f"an instruction may not contain text this model's tokenizer reads as a special token: " \
                   f"{', '.join(special)}"
        half = self.limits.context // 2
        (bounded,), cut = bound_texts(self.tok, [instruction], half)
        ids = self.tok(self.render("", [""], bounded))["input_ids"]
        if cut or len(ids) >= half:
            return (f"a {self.limits.context}-token window is too small for this prompt: its fixed text (instruction "
                    f"included) takes {'more than ' if cut else ''}{len(ids)} tokens, and may take at most half the "
                    "window")
        if sum(1 for t in ids if t in self.marker_ids) != 2:
            return "the instruction holds text this model's tokenizer reads as a marker token"
        return None

    def sanitize(self, text: str) -> str:
        """The text without marker strings (removed until none is left: removing one may join another)."""
        while any(m in text for m in self.markers):
            for m in self.markers:
                text = text.replace(m, "")
        return text

    def _cut(self, text: str, index: int, window: int, truncate: Truncate, max_chunks: int | None
             ) -> list[tuple[str, int]]:
        """The text as (piece, tokens) within `window` tokens: whole, cut, refused or chunked."""
        enc = self.tok(text, add_special_tokens=False, return_offsets_mapping=True)
        offsets = enc["offset_mapping"]
        n = len(offsets)
        if n <= window:
            return [(text, n)]
        if truncate is Truncate.NONE:
            raise InputTooLongError(n, window, index)
        if truncate is Truncate.START:
            return [(text[offsets[n - window][0]:], window)]
        if truncate is Truncate.CHUNK:
            starts = chunk_starts(n, window)[: max_chunks or None]
            return [(text[offsets[s][0]: offsets[min(n, s + window) - 1][1]], min(window, n - s)) for s in starts]
        return [(text[: offsets[window - 1][1]], window)]

    def _prepare(self, query, passages, truncate, max_chunks) -> ListwisePrepared:
        lim = self.limits
        if truncate is Truncate.CHUNK and max_chunks:
            passages = self.clip_passages(passages, max_chunks * lim.doc_window)
        query_text, query_length = self._cut(query, 0, lim.query_window,
                                             Truncate.NONE if truncate is Truncate.NONE else Truncate.END, None)[0]
        entries: list[str] = []
        lengths: list[int] = []
        owners: list[int] = []
        for idx, text in enumerate(passages):
            for piece, length in self._cut(text, idx, lim.doc_window, truncate, max_chunks):
                entries.append(piece)
                lengths.append(length)
                owners.append(idx)
        clean_query = self.sanitize(query_text)
        for name, text in [("query", query), *((f"passage {i}", p) for i, p in enumerate(passages))]:
            if text and not self.sanitize(text):  # "" itself is the dialect's to refuse or score
                raise TextInputError(f"{name}: nothing is left of it once the model's marker text "
                                     f"({', '.join(self.markers)}) is removed")
        items: list[BlockItem] = []
        for block in split_blocks(lengths, query_length, lim):
            prompt = self.render(clean_query, [self.sanitize(entries[i]) for i in block], self.instruction)
            ids = self.tok(prompt)["input_ids"]
            found = sum(1 for t in ids if t in self.marker_ids)
            if found != len(block) + 1:  # the markers must be where the template put them, nowhere else
                # the instruction was checked (`instruction_problem`) and marker strings removed from the rest:
                # what is left is client text the tokenizer still reads as a marker
                raise TextInputError(f"the query or a passage holds text this model's tokenizer reads as its marker "
                                     f"tokens ({found} in a block of {len(block)} passages, {len(block) + 1} "
                                     "expected)")
            items.append(BlockItem(ids, len(block)))
        return ListwisePrepared(items, owners, sum(it.length for it in items))  # type: ignore[arg-type]

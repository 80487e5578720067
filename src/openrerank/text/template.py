"""Prompt templates, as LLM rerankers (and NVIDIA's Llama-bidirectional reranker) read text.

A template is a sequence of pieces tokenized one at a time and concatenated at the token level, the way
each family's reference implementation builds its ids (Qwen3-Reranker: prefix | body | suffix; mxbai and
bge-gemma: every piece apart; Llama-bidirectional: one string after BOS). Tokenizing the way the reference
does is what makes the ids byte-exact: tokenizing the rendered prompt in one go can merge tokens across a
seam (e.g. "?\\n") and change the ids.

A piece may hold the `{query}` and `{passage}` slots (each once in the whole template). Which tokens
belong to a slot is read from the tokenizer's character offsets, so truncation never cuts the template's
fixed text. A token that holds both (Qwen's "?\\n": a query's "?" and the template's newline) belongs to the
slot; where a cut drops it, the fixed characters it held come back, tokenized alone, in place of the window's
last (first) token, as they stay where a reference cuts the text before formatting it (jina-reranker-m0).
A space before a slot (" paris" in "D: {passage}") is the exception: a window that starts inside the
passage mostly starts with a token that brings its own space (" capital"), as a passage that began there would.
The query is first capped at `query_share` of the free window (`QUERY_SHARE` for every family: mxbai's and
bge-gemma's references cap it so; Qwen3's and NVIDIA's cut the body's end, so a query that fills the window
leaves no passage at all and every passage gets the same score), then the passage is trimmed (END: its end,
START: its start), then the query gets back any room left. NONE refuses an over-long pair. CHUNK slides
overlapping windows over the passage's tokens, splicing each into the same prompt; a query longer than half
the free window is cut to that half for every passage (short ones too), as the pair encoder does, so all of
a request's passages are scored against one query text.
"""

from __future__ import annotations

import copy
import itertools
import re
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from openrerank.core.requests import Truncate
from openrerank.core.work import PairItem, WorkItem
from openrerank.text.prepare import (
    InputTooLongError,
    InstructionError,
    Prepared,
    TextEncoder,
    WindowTooSmallError,
    cap_chunks,
    chunk_starts,
)

QUERY = "query"
PASSAGE = "passage"
FIXED = "fixed"
_SLOT = re.compile(r"\{(query|passage)\}")

Run = tuple[str, list[int]]  # (role, token ids)
#: Roles of the fixed text a slot's first (last) token also holds, tokenized alone: a run beside the slot's,
#: emitted only where a cut drops that token.
HEAD = {QUERY: "query head", PASSAGE: "passage head"}
TAIL = {QUERY: "query tail", PASSAGE: "passage tail"}
_EMITTED = (FIXED, QUERY, PASSAGE)  # what an uncut pair is made of
#: Largest share of the free window a cut pair's query keeps (mxbai's and bge-gemma's references: 3/4), so the
#: passage always keeps at least the rest.
QUERY_SHARE = 0.75


@dataclass(frozen=True)
class PromptTemplate:
    #: Pieces tokenized apart (no special tokens added) and concatenated; `{query}`/`{passage}` are the slots.
    pieces: tuple[str, ...]
    #: Prepend the tokenizer's BOS token (Llama-3 and Gemma references do; Qwen's tokenizers have none).
    bos: bool = False
    #: Largest share of the free window (window minus fixed tokens) the query may take when a pair is cut.
    query_share: float = QUERY_SHARE

    def __post_init__(self) -> None:
        slots = [m.group(1) for p in self.pieces for m in _SLOT.finditer(p)]
        if sorted(slots) != [PASSAGE, QUERY]:
            raise ValueError(f"a prompt template needs one {{query}} and one {{passage}} slot, found {slots}")

    def render(self, query: str, passage: str) -> str:
        """The prompt as one string (for docs and tests; never tokenized as a whole)."""
        return "".join(fill(p, query, passage)[0] for p in self.pieces)


def fill(piece: str, query: str, passage: str) -> tuple[str, dict[str, tuple[int, int]]]:
    """A piece with its slots filled, and each slot's character span in the result."""
    out: list[str] = []
    spans: dict[str, tuple[int, int]] = {}
    pos = last = 0
    for m in _SLOT.finditer(piece):
        out.append(piece[last : m.start()])
        pos += m.start() - last
        value = query if m.group(1) == QUERY else passage
        spans[m.group(1)] = (pos, pos + len(value))
        out.append(value)
        pos += len(value)
        last = m.end()
    out.append(piece[last:])
    return "".join(out), spans


def _split_runs(ids: list[list[int]], offsets: list[list[tuple[int, int]]],
                spans: list[dict[str, tuple[int, int]]]) -> list[list[Run]]:
    """Each text's consecutive tokens grouped by role; a token overlapping a slot's characters belongs to the
    slot (the first, in `spans`' order, where it overlaps two). Every row's `spans` names the same slots in the
    same order (one template piece filled per text). Array-wise over all texts at once: a per-token Python loop
    took 0.3 ms a 256-token pair, more than the tokenizer itself."""
    lengths = [len(row) for row in ids]
    total = sum(lengths)
    if total == 0:
        return [[] for _ in ids]
    off = np.fromiter(itertools.chain.from_iterable(itertools.chain.from_iterable(offsets)), np.int64,
                      2 * total).reshape(total, 2)
    names = list(spans[0])
    role = np.full(total, len(names))  # len(names): fixed text
    for k in reversed(range(len(names))):  # the first overlapping slot wins, so it is written last
        s = np.repeat(np.fromiter((sp[names[k]][0] for sp in spans), np.int64, len(spans)), lengths)
        e = np.repeat(np.fromiter((sp[names[k]][1] for sp in spans), np.int64, len(spans)), lengths)
        role[(off[:, 0] < e) & (off[:, 1] > s)] = k
    starts = np.zeros(len(ids) + 1, dtype=np.int64)
    np.cumsum(lengths, out=starts[1:])
    cut = np.zeros(total + 1, dtype=bool)
    cut[starts] = True  # a run never crosses from one text into the next
    cut[1:-1] |= role[1:] != role[:-1]
    bounds = np.flatnonzero(cut)
    rows = np.searchsorted(starts, bounds[:-1], side="right") - 1
    labels = [*names, FIXED]
    flat = list(itertools.chain.from_iterable(ids))
    out: list[list[Run]] = [[] for _ in ids]
    for row, a, b in zip(rows.tolist(), bounds[:-1].tolist(), bounds[1:].tolist(), strict=True):
        out[row].append((labels[role[a]], flat[a:b]))
    return out


#: Per-request instructions whose prompt pieces an encoder keeps tokenized (least recently used beyond).
INSTRUCTION_VARIANTS = 64


class TemplateTextEncoder(TextEncoder):
    """`template_for` (instruction -> template) lets a request bring its own instruction: the encoder for it
    shares this one's tokenizer and only tokenizes the fixed pieces anew (kept for the last few instructions)."""

    def __init__(self, tokenizer, max_length: int, template: PromptTemplate,
                 template_for: Callable[[str], PromptTemplate] | None = None) -> None:
        super().__init__(tokenizer, max_length)
        self._template_for = template_for
        self._variants: OrderedDict[str, TemplateTextEncoder] = OrderedDict()
        self._variants_lock = threading.Lock()
        self._use(template)

    def _use(self, template: PromptTemplate) -> None:
        self.template = template
        if template.bos and self.tokenizer.bos_token_id is None:
            raise ValueError("this prompt starts with BOS but the tokenizer defines no bos_token")
        self._bos: list[int] = [self.tokenizer.bos_token_id] if template.bos else []
        self._seams: dict[str, list[int]] = {}
        self._fixed = {i: self.tok.ids(p) for i, p in enumerate(template.pieces) if not _SLOT.search(p)}
        # The fixed text of the slot pieces (an instruction, `<Query>: `) counts too; filled with empty slots
        # it is within a token or two of what any pair will have.
        fixed = len(self._bos) + sum(len(self._fixed[i]) if i in self._fixed else len(self.tok.ids(fill(p, "", "")[0]))
                                     for i, p in enumerate(template.pieces))
        self.fixed_tokens = fixed
        if fixed >= self.max_length // 2:
            raise WindowTooSmallError(f"a {self.max_length}-token window is too small for this prompt: its fixed "
                                      f"text (instruction included) takes {fixed} tokens, and may take at most half "
                                      "the window")

    @property
    def min_length(self) -> int:
        """The prompt's fixed text may take at most half the window (less one token), as its check says."""
        return 2 * self.fixed_tokens + 2

    def with_instruction(self, instruction: str) -> TemplateTextEncoder:
        if self._template_for is None:
            return super().with_instruction(instruction)  # type: ignore[return-value]
        with self._variants_lock:
            variant = self._variants.get(instruction)
            if variant is not None:
                self._variants.move_to_end(instruction)
                return variant
        found = self.special_tokens_in(instruction)
        if found:
            raise InstructionError(f"an instruction may not contain text this model's tokenizer reads as a "
                                   f"special token: {', '.join(found)}")
        try:
            template = self._template_for(instruction)
            variant = copy.copy(self)  # shares the tokenizer and its locks
            variant._use(template)
        except ValueError as exc:
            raise InstructionError(str(exc)) from None
        with self._variants_lock:
            self._variants[instruction] = variant
            while len(self._variants) > INSTRUCTION_VARIANTS:
                self._variants.popitem(last=False)
        return variant

    def runs(self, query: str, passages: list[str]) -> list[list[Run]]:
        """Each pair as role-tagged token runs, tokenized piece by piece (seam runs beside the slots that need
        them)."""
        pairs: list[list[Run]] = [[(FIXED, self._bos)] if self._bos else [] for _ in passages]
        for i, piece in enumerate(self.template.pieces):
            if i in self._fixed:
                for runs in pairs:
                    runs.append((FIXED, self._fixed[i]))
                continue
            per_passage = "{passage}" in piece
            filled = [fill(piece, query, p) for p in (passages if per_passage else [""])]
            enc = self.tok([t for t, _ in filled], add_special_tokens=False, return_offsets_mapping=True)
            split = _split_runs(enc["input_ids"], enc["offset_mapping"], [spans for _, spans in filled])
            split = [self._with_seams(row, text, spans, offsets)
                     for row, (text, spans), offsets in zip(split, filled, enc["offset_mapping"], strict=True)]
            for k, runs in enumerate(pairs):
                runs.extend(split[k] if per_passage else split[0])
        return pairs

    def _with_seams(self, row: list[Run], text: str, spans: dict[str, tuple[int, int]],
                    offsets: list[tuple[int, int]]) -> list[Run]:
        """`row` with a HEAD (TAIL) run beside each slot whose first (last) token also holds fixed characters
        (other than a space before the slot): those characters tokenized alone, what a cut that drops the token
        must put back."""
        out: list[Run] = []
        pos = 0
        for role, ids in row:
            if role == FIXED:
                out.append((role, ids))
                pos += len(ids)
                continue
            start, end = spans[role]
            others = [sp for name, sp in spans.items() if name != role]
            first, last = offsets[pos][0], offsets[pos + len(ids) - 1][1]
            lead = text[max([first, *(e for _, e in others if e <= start)]) : start] if first < start else ""
            trail = text[end : min([last, *(s for s, _ in others if s >= end)])] if last > end else ""
            if lead and not lead.isspace():  # a space: the window's own first token (" capital") brings one
                out.append((HEAD[role], self._seam_ids(lead)))
            out.append((role, ids))
            if trail:
                out.append((TAIL[role], self._seam_ids(trail)))
            pos += len(ids)
        return out

    def _seam_ids(self, text: str) -> list[int]:
        """Fixed characters' ids; few distinct ones per template (a space, a newline), so they are kept."""
        ids = self._seams.get(text)
        if ids is None:
            ids = self._seams[text] = self.tok.ids(text)
        return ids

    def _prepare(self, query, passages, truncate, max_chunks) -> Prepared:
        items: list[WorkItem] = []
        owners: list[int] = []
        if truncate is Truncate.CHUNK and max_chunks:  # no window can hold more than the model window
            passages = self.clip_passages(passages, max_chunks * self.max_length)
        for idx, runs in enumerate(self.runs(query, passages)):
            for ids in self._fit(runs, truncate, idx, max_chunks):
                items.append(PairItem(ids))
                owners.append(idx)
        keep = cap_chunks(owners, max_chunks)
        items = [items[i] for i in keep]
        return Prepared(items, [owners[i] for i in keep], sum(it.length for it in items))

    def _fit(self, runs: list[Run], truncate: Truncate, idx: int, max_chunks: int | None = None) -> list[list[int]]:
        """The pair's ids (one list), cut to the window per `truncate`, or its chunks (several)."""
        m = self.max_length
        size = {role: sum(len(ids) for r, ids in runs if r == role) for role in _EMITTED}
        total = sum(size.values())
        free = max(0, m - size[FIXED])
        q, p = size[QUERY], size[PASSAGE]
        if truncate is Truncate.CHUNK:
            # The query is cut to half the free window for every pair, short passages too (docs/api.md), so a
            # request's passages are all scored against one query text and their scores stay comparable.
            q_keep = min(q, int(free * min(0.5, self.template.query_share)))
            if total <= m and q_keep == q:
                return [_whole(runs)]
            p_keep = free - q_keep
            starts = chunk_starts(p, p_keep)[: max_chunks or None]
            return [_assemble(runs, {QUERY: (0, q_keep), PASSAGE: (s, s + p_keep)}) for s in starts]
        if total <= m:
            return [_whole(runs)]
        if truncate is Truncate.NONE:
            raise InputTooLongError(total, m, idx)
        q_keep = min(q, int(free * self.template.query_share))
        p_keep = min(p, free - q_keep)
        q_keep = min(q, free - p_keep)  # room the passage does not need goes back to the query
        window = (p - p_keep, p) if truncate is Truncate.START else (0, p_keep)
        return [_assemble(runs, {QUERY: (0, q_keep), PASSAGE: window})]


def _whole(runs: list[Run]) -> list[int]:
    return [t for role, ids in runs if role in _EMITTED for t in ids]


def _assemble(runs: list[Run], windows: dict[str, tuple[int, int]]) -> list[int]:
    """The pair with each slot cut to its window of token positions (a seam put back where the cut needs it)."""
    seams = {role: ids for role, ids in runs if role not in _EMITTED}
    out: list[int] = []
    for role, ids in runs:
        if role == FIXED:
            out.extend(ids)
        elif role in windows:
            out.extend(_cut(ids, *windows[role], seams.get(HEAD[role], []), seams.get(TAIL[role], [])))
    return out


def _cut(ids: list[int], a: int, b: int, head: list[int], tail: list[int]) -> list[int]:
    """`ids[a:b]`; where that drops the first (last) token and it held fixed text, the text's own ids take the
    place of the window's first (last) tokens, so the pair stays as long as the window made it (a window
    shorter than that text, which the shares never make of the templates we serve, goes without it)."""
    b = min(b, len(ids))
    lead = head if a > 0 and len(head) <= b - a else []
    a += len(lead)
    trail = tail if b < len(ids) and len(tail) <= b - a else []
    return [*lead, *ids[a : b - len(trail)], *trail]

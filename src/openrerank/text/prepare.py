"""Turn (query, passages, truncation policy) into scheduler work items, using the fast tokenizer.

Truncation and chunking are done by the tokenizer itself (`truncation="only_second"`,
`stride` + `return_overflowing_tokens` for sliding windows), never by Python token loops.
`owners[i]` says which passage work item `i` belongs to; several items per passage means chunks.

Chunking differs by model kind. A cross-encoder reads the query with every window, so a long
passage is cut into overlapping windows as large as the model allows. A bi-encoder mean-pools each
window on its own: one relevant sentence in a 256-token window is drowned by the rest (measured on
the embedded all-MiniLM-L6-v2: a 3,000-token document's answer sentence scores 0.86 alone, 0.80 in
a 64-token window of whole sentences, 0.27 in a 128-token window and 0.11 in a 256-token one). So a
bi-encoder's long passage is scored over small windows of whole sentences (`BI_CHUNK_TOKENS`),
each overlapping the previous by about half (~1.6x the passage's tokens in all); the span they
cover is bounded like the cross-encoder's windows (`max_chunks` model-sized windows).
"""

from __future__ import annotations

import copy
import re
import threading
from dataclasses import dataclass

from openrerank.backends.base import BiItem, PairItem, WorkItem
from openrerank.models.spec import ModelKind
from openrerank.schemas.internal import Truncate

#: Fraction of a chunk window that overlaps the previous window.
CHUNK_OVERLAP = 0.25
#: Token budget of one bi-encoder chunk: as many whole sentences as fit (see the module docstring).
BI_CHUNK_TOKENS = 64

# Sentence ends: . ! ? followed by whitespace, CJK full stops, or line breaks.
_SENTENCE_BREAK = re.compile(r"(?<=[.!?])\s+|(?<=[。！？])\s*|\n\s*")


class InputTooLongError(ValueError):
    """A pair exceeds the model window under truncate=NONE (NIM: the whole request fails)."""

    def __init__(self, length: int, maximum: int, passage_index: int) -> None:
        self.length = length
        self.maximum = maximum
        self.passage_index = passage_index
        super().__init__(f"Input length {length} exceeds maximum allowed token size {maximum}")


@dataclass
class Prepared:
    items: list[WorkItem]
    owners: list[int]  # passage index of each item
    prompt_tokens: int  # tokens that will actually be scored


class TextPreparer:
    """Thread-safe: the Rust tokenizer keeps truncation state, so each instance is guarded by a lock."""

    def __init__(self, tokenizer, kind: ModelKind, max_length: int) -> None:
        self.kind = kind
        self.max_length = max_length
        self._right = tokenizer
        self._left = copy.deepcopy(tokenizer)
        self._left.truncation_side = "left"
        self._locks = {id(self._right): threading.Lock(), id(self._left): threading.Lock()}
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.pair_specials = tokenizer.num_special_tokens_to_add(pair=True)
        self.single_specials = tokenizer.num_special_tokens_to_add(pair=False)

    def count_tokens(self, text: str) -> int:
        """Tokens of a text without special tokens (used by dialects for token budgets)."""
        with self._locks[id(self._right)]:
            return len(self._right(text, add_special_tokens=False)["input_ids"])

    def prepare(
        self,
        query: str,
        passages: list[str],
        truncate: Truncate,
        *,
        max_chunks_per_passage: int | None = None,
        max_tokens_per_passage: int | None = None,
    ) -> Prepared:
        if max_tokens_per_passage:
            passages = self._clip_passages(passages, max_tokens_per_passage)
        if self.kind is ModelKind.CROSS_ENCODER:
            return self._prepare_pairs(query, passages, truncate, max_chunks_per_passage)
        return self._prepare_bi(query, passages, truncate, max_chunks_per_passage)

    # -- helpers -----------------------------------------------------------------------------

    def _encode(self, tok, first, second=None, **kw) -> dict:
        with self._locks[id(tok)]:
            return tok(first, second, return_attention_mask=False, **kw)

    def _clip_passages(self, passages: list[str], limit: int) -> list[str]:
        """Cohere's max_tokens_per_doc: keep only each document's first `limit` tokens."""
        enc = self._encode(self._right, passages, add_special_tokens=False, return_offsets_mapping=True)
        out = []
        for text, offsets in zip(passages, enc["offset_mapping"], strict=True):
            out.append(text if len(offsets) <= limit else text[: offsets[limit - 1][1]])
        return out

    def _stride(self, window: int) -> int:
        return max(1, int(window * CHUNK_OVERLAP))

    def _prepare_pairs(self, query, passages, truncate, max_chunks) -> Prepared:
        n = len(passages)
        queries = [query] * n
        m = self.max_length
        if truncate is Truncate.NONE:
            enc = self._encode(self._right, queries, passages, return_token_type_ids=True)
            self._check_lengths(enc["input_ids"])
            owners = list(range(n))
        else:
            tok = self._left if truncate is Truncate.START else self._right
            kw: dict = {"truncation": "only_second", "max_length": m, "return_token_type_ids": True}
            if truncate is Truncate.CHUNK:
                q_len = len(self._encode(self._right, query, add_special_tokens=False)["input_ids"])
                window = max(1, m - q_len - self.pair_specials)
                kw.update(stride=self._stride(window), return_overflowing_tokens=True)
            try:
                enc = self._encode(tok, queries, passages, **kw)
            except Exception:  # the query alone overflows the window: cut both, longest first
                kw["truncation"] = "longest_first"
                enc = self._encode(tok, queries, passages, **kw)
            owners = list(enc.get("overflow_to_sample_mapping", range(n)))
        ids, types = enc["input_ids"], enc.get("token_type_ids")
        keep = _cap_chunks(owners, max_chunks)
        items: list[WorkItem] = [
            PairItem(ids[i], types[i] if types is not None else None) for i in keep
        ]
        return Prepared(items, [owners[i] for i in keep], sum(len(ids[i]) for i in keep))

    def _prepare_bi(self, query, passages, truncate, max_chunks) -> Prepared:
        m = self.max_length
        if truncate is Truncate.NONE:
            q = self._encode(self._right, query)["input_ids"]
            p = self._encode(self._right, passages)["input_ids"]
            self._check_lengths([q])
            self._check_lengths(p)
            owners = list(range(len(passages)))
        else:
            q = self._encode(self._right, query, truncation=True, max_length=m)["input_ids"]
            if truncate is Truncate.CHUNK:
                texts, owners = self._bi_windows(passages, max_chunks)
                p = self._encode(self._right, texts, truncation=True, max_length=m)["input_ids"] if texts else []
                items: list[WorkItem] = [BiItem(q, ids) for ids in p]
                return Prepared(items, owners, len(q) + sum(len(ids) for ids in p))
            tok = self._left if truncate is Truncate.START else self._right
            enc = self._encode(tok, passages, truncation=True, max_length=m)
            p = enc["input_ids"]
            owners = list(range(len(passages)))
        keep = _cap_chunks(owners, max_chunks)
        items: list[WorkItem] = [BiItem(q, p[i]) for i in keep]
        return Prepared(items, [owners[i] for i in keep], len(q) + sum(len(p[i]) for i in keep))

    def _bi_windows(self, passages: list[str], max_chunks: int | None) -> tuple[list[str], list[int]]:
        """Window texts and their owners: whole passages that fit, else sentence windows.

        A long passage is first bounded to the span `max_chunks` model-sized windows would cover,
        then cut into half-overlapping windows of up to `BI_CHUNK_TOKENS` tokens of whole sentences
        (a sentence longer than that is cut into overlapping token windows).
        """
        window = max(1, self.max_length - self.single_specials)
        budget = min(BI_CHUNK_TOKENS, window)
        enc = self._encode(self._right, passages, add_special_tokens=False, return_offsets_mapping=True)
        texts: list[str] = []
        owners: list[int] = []
        long: list[tuple[int, str]] = []
        for idx, (text, offsets) in enumerate(zip(passages, enc["offset_mapping"], strict=True)):
            if len(offsets) <= window:
                texts.append(text)
                owners.append(idx)
                continue
            if max_chunks:
                span = window + (max_chunks - 1) * (window - self._stride(window))
                if len(offsets) > span:
                    text = text[: offsets[span - 1][1]]
            long.append((idx, text))
        if not long:
            return texts, owners
        spans = [_sentence_spans(text) for _, text in long]
        flat = [text[a:b] for (_, text), ss in zip(long, spans, strict=True) for a, b in ss]
        sent_enc = self._encode(self._right, flat, add_special_tokens=False, return_offsets_mapping=True)
        k = 0
        for (idx, text), ss in zip(long, spans, strict=True):
            units: list[tuple[int, int, int]] = []  # (start char, end char, tokens)
            for a, _ in ss:
                offs = sent_enc["offset_mapping"][k]
                k += 1
                units.extend(_split_unit(a, offs, budget))
            for piece in _pack(text, units, budget):
                texts.append(piece)
                owners.append(idx)
        return texts, owners

    def _check_lengths(self, seqs: list[list[int]]) -> None:
        for i, s in enumerate(seqs):
            if len(s) > self.max_length:
                raise InputTooLongError(len(s), self.max_length, i)


def _sentence_spans(text: str) -> list[tuple[int, int]]:
    """(start, end) character spans of the sentences of `text`, whitespace between them dropped."""
    spans: list[tuple[int, int]] = []
    start = 0
    for m in _SENTENCE_BREAK.finditer(text):
        if m.start() > start:
            spans.append((start, m.start()))
        start = max(start, m.end())
    if start < len(text):
        spans.append((start, len(text)))
    return spans


def _split_unit(base: int, offsets: list[tuple[int, int]], budget: int) -> list[tuple[int, int, int]]:
    """One sentence as (start, end, tokens) units: whole, or overlapping token windows if too long."""
    n = len(offsets)
    if n == 0:
        return []
    if n <= budget:
        return [(base + offsets[0][0], base + offsets[-1][1], n)]
    step = max(1, budget - int(budget * CHUNK_OVERLAP))
    out = []
    for s in range(0, n, step):
        e = min(n, s + budget)
        out.append((base + offsets[s][0], base + offsets[e - 1][1], e - s))
        if e == n:
            break
    return out


def _pack(text: str, units: list[tuple[int, int, int]], budget: int) -> list[str]:
    """Windows of consecutive units up to `budget` tokens; each next window starts at the first
    unit past the middle of the previous one (or at its last unit), so neighbours overlap."""
    out = []
    i = 0
    while i < len(units):
        start, end, total = units[i]
        j = i + 1
        nxt = None
        while j < len(units) and total + units[j][2] <= budget:
            if nxt is None and total >= budget // 2:
                nxt = j
            total += units[j][2]
            end = units[j][1]
            j += 1
        out.append(text[start:end])
        if j >= len(units):
            break
        i = nxt if nxt is not None else max(i + 1, j - 1)
    return out


def _cap_chunks(owners: list[int], max_chunks: int | None) -> list[int]:
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

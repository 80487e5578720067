"""Turn (query, passages, truncation policy) into scheduler work items, using the fast tokenizer.

Truncation and chunking are done by the tokenizer itself (`truncation="only_second"`,
`stride` + `return_overflowing_tokens` for sliding windows), never by Python token loops.
`owners[i]` says which passage work item `i` belongs to; several items per passage means chunks.
"""

from __future__ import annotations

import copy
import threading
from dataclasses import dataclass

from openrerank.backends.base import BiItem, PairItem, WorkItem
from openrerank.models.spec import ModelKind
from openrerank.schemas.internal import Truncate

#: Fraction of a chunk window that overlaps the previous window.
CHUNK_OVERLAP = 0.25


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
            tok = self._left if truncate is Truncate.START else self._right
            kw: dict = {"truncation": True, "max_length": m}
            if truncate is Truncate.CHUNK:
                kw.update(stride=self._stride(m - self.single_specials), return_overflowing_tokens=True)
            enc = self._encode(tok, passages, **kw)
            p = enc["input_ids"]
            owners = list(enc.get("overflow_to_sample_mapping", range(len(passages))))
        keep = _cap_chunks(owners, max_chunks)
        items: list[WorkItem] = [BiItem(q, p[i]) for i in keep]
        return Prepared(items, [owners[i] for i in keep], len(q) + sum(len(p[i]) for i in keep))

    def _check_lengths(self, seqs: list[list[int]]) -> None:
        for i, s in enumerate(seqs):
            if len(s) > self.max_length:
                raise InputTooLongError(len(s), self.max_length, i)


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

"""Late-interaction (ColBERT) text encoding: query and passage apart, each with its marker token.

What PyLate's `ColBERT.tokenize` does (and colbert-ai's Query/DocTokenizer before it), per text:
whitespace stripped, tokenized with the model's special tokens to one token less than the side's length
(`query_length` / `document_length`), then the side's marker (`[unused0]`/`[unused1]`, or `[Q]`/`[D]`)
inserted right after `[CLS]`. So a cut text keeps its `[SEP]`, and the marker costs one text token.

A query item holds the real tokens only; query augmentation (padding to `query_length` with the mask
token, which the transformer does not attend to unless the model says so) is the scorer's, from the same
`LateSettings`, so a literal "[MASK]" typed in a query never looks like padding. Document tokens in the
skiplist (punctuation) are dropped after the transformer, by the scorer: they still give context.

Passages follow the request's truncation like every family: END keeps the start, START the end, NONE
refuses a passage over the document length, CHUNK scores overlapping windows (each with its own `[CLS]`,
marker and `[SEP]`) and a passage gets its best window's MaxSim.
"""

from __future__ import annotations

from dataclasses import dataclass

from openrerank.core.requests import Truncate
from openrerank.core.work import BiItem, TokenEmbedItem, WorkItem
from openrerank.text.prepare import Prepared, TextEncoder, cap_chunks, chunk_overlap, chunk_span


@dataclass(frozen=True)
class LateSettings:
    """A late-interaction model's text and scoring settings, resolved to token ids by its family."""

    query_marker: int | None  # inserted after [CLS]; None: the model has no query marker
    document_marker: int | None
    query_length: int  # tokens a query is cut (and, with expansion, padded) to, marker included
    document_length: int  # tokens a passage window holds, marker included
    expansion_id: int | None  # query augmentation: pad queries to query_length with this id; None: off
    attend_to_expansion: bool  # whether the transformer attends to the augmentation tokens
    skiplist: frozenset[int]  # document token ids whose vectors are dropped (punctuation)

    def query_vectors(self, real_tokens: int) -> int:
        """How many vectors a query of `real_tokens` tokens (marker included) has: every position up to
        query_length with augmentation, its real tokens without."""
        return self.query_length if self.expansion_id is not None else real_tokens


class LateTextEncoder(TextEncoder):
    cuts_query = True  # to query_length, under every truncation (PyLate, colbert-ai)

    def __init__(self, tokenizer, settings: LateSettings) -> None:
        super().__init__(tokenizer, settings.document_length)
        self.settings = settings

    @property
    def min_length(self) -> int:
        """A passage is encoded on its own (the query has its own length): specials, marker, one token."""
        marker = 1 if self.settings.document_marker is not None else 0
        return self.tokenizer.num_special_tokens_to_add(pair=False) + marker + 1

    def _marked(self, seqs: list[list[int]], marker: int | None) -> list[list[int]]:
        if marker is None:
            return seqs
        return [[*s[:1], marker, *s[1:]] for s in seqs]

    def _room(self, length: int, marker: int | None) -> int:
        return length - (1 if marker is not None else 0)

    def encode_queries(self, queries: list[str]) -> list[list[int]]:
        """Queries' real tokens, marker included, cut to query_length (a query is always cut: its length is
        part of the model, as in PyLate and colbert-ai)."""
        s = self.settings
        ids = self.tok([q.strip() for q in queries], truncation=True,
                       max_length=self._room(s.query_length, s.query_marker))["input_ids"]
        return self._marked(ids, s.query_marker)

    def encode_documents(self, texts: list[str], truncate: Truncate = Truncate.END) -> list[list[int]]:
        """Passages' tokens, marker included, cut to the document length (NONE: refused when longer)."""
        s = self.settings
        texts = [t.strip() for t in texts]
        if truncate is Truncate.NONE:
            ids = self._marked(self.tok(texts)["input_ids"], s.document_marker)
            self.check_lengths(ids)
            return ids
        ids = self.tok(texts, left=truncate is Truncate.START, truncation=True,
                       max_length=self._room(self.max_length, s.document_marker))["input_ids"]
        return self._marked(ids, s.document_marker)

    def query_vectors(self, query: str) -> int:
        """How many vectors the query's MaxSim sums over (for the score's unit-interval form)."""
        s = self.settings
        if s.expansion_id is not None:
            return s.query_length
        return len(self.encode_queries([query])[0])

    def token_items(self, texts: list[str], truncate: Truncate, query: bool) -> list[TokenEmbedItem]:
        """Texts as per-token embedding work items (the multi-vector embeddings route)."""
        if query:
            return [TokenEmbedItem(ids, query=True) for ids in self.encode_queries(texts)]
        return [TokenEmbedItem(ids, query=False) for ids in self.encode_documents(texts, truncate)]

    def _prepare(self, query, passages, truncate, max_chunks) -> Prepared:
        q = self.encode_queries([query])[0]
        if truncate is Truncate.CHUNK:
            p, owners = self._windows(passages, max_chunks)
        else:
            p = self.encode_documents(passages, truncate)
            owners = list(range(len(passages)))
        keep = cap_chunks(owners, max_chunks)
        items: list[WorkItem] = [BiItem(q, p[i]) for i in keep]
        return Prepared(items, [owners[i] for i in keep], len(q) + sum(len(p[i]) for i in keep), query_tokens=len(q))

    def _windows(self, passages: list[str], max_chunks: int | None) -> tuple[list[list[int]], list[int]]:
        """Overlapping windows of each passage, each a whole document sequence with its marker."""
        s = self.settings
        room = self._room(self.max_length, s.document_marker)
        window = max(1, room - self.tokenizer.num_special_tokens_to_add(pair=False))
        texts = [t.strip() for t in passages]
        if max_chunks:  # never tokenize windows past the cap: bounded work for any passage size
            texts = self.clip_passages(texts, chunk_span(window, max_chunks))
        enc = self.tok(texts, truncation=True, max_length=room, stride=chunk_overlap(window),
                       return_overflowing_tokens=True)
        owners = list(enc.get("overflow_to_sample_mapping", range(len(texts))))
        return self._marked(enc["input_ids"], s.document_marker), owners

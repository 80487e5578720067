"""Late-interaction scoring (ColBERT MaxSim) over a runtime that returns projected token vectors.

Per batch: each distinct query is augmented (padded to `query_length` with the mask token, which the
transformer does not attend to unless the model says so) and encoded once; each distinct passage is taken
from the token cache or encoded, its skiplist tokens (punctuation) and padding dropped. Every kept vector
is L2-normalized (PyLate's `normalize_embeddings=True`), and a pair's score is MaxSim: for each query
vector its best dot product with a passage vector, summed over the query vectors.

Each pair is scored on its own arrays (one small matrix product), so a score never depends on what
else shared the batch, and a passage's cached vectors give bit-identical scores on a hit. A query's vectors
are kept too, in a small byte-bounded LRU of their own (`families/query_memo.py`, as the bi-encoder's): the
scheduler cuts one request's passages into several batches by length, and the query would otherwise be encoded
again for each.

The same vectors are the multi-vector embeddings (`embed`): one packed float32 row per text (`pack`),
since the scheduler moves fixed-width rows.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from openrerank.core.work import BiItem, TokenEmbedItem
from openrerank.families.query_memo import QueryMemo, memo_key
from openrerank.families.scorer import Scorer
from openrerank.families.token_cache import BoundTokenCache
from openrerank.runtimes.base import RowsFailedError, Runtime
from openrerank.text.late import LateSettings


def normalize_rows(x: np.ndarray) -> np.ndarray:
    """Unit rows, float32: x / max(|x|, 1e-12), as torch.nn.functional.normalize."""
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return (x / np.maximum(norms, 1e-12)).astype(np.float32)


def maxsim(query: np.ndarray, passage: np.ndarray) -> np.float32:
    """Sum over query vectors of the best dot product with a passage vector (float32)."""
    return np.float32((query @ passage.T).max(axis=1).sum(dtype=np.float32))


class LateInteractionScorer(Scorer):
    def __init__(self, runtime: Runtime, pad_id: int, settings: LateSettings) -> None:
        self.runtime = runtime
        self.pad_id = pad_id
        self.settings = settings
        #: The token cache (attached by the server; None: every passage is encoded).
        self.cache: BoundTokenCache | None = None
        #: Normalized query vectors, keyed on the query's ids (its augmentation follows from them and `settings`).
        self.queries = QueryMemo()

    @property
    def row_tokens(self) -> int:
        """Vectors a packed row has room for: the longer of the two sides."""
        return max(self.settings.query_length, self.settings.document_length)

    def _run(self, seqs: Sequence[list[int]], attended: Sequence[int]) -> np.ndarray:
        """Token vectors `(n, width, dim)` of right-padded sequences, the first `attended[i]` tokens of
        row i attended to."""
        width = max(len(s) for s in seqs)
        ids = np.full((len(seqs), width), self.pad_id, dtype=np.int64)
        mask = np.zeros((len(seqs), width), dtype=np.int64)
        for row, (seq, n) in enumerate(zip(seqs, attended, strict=True)):
            ids[row, : len(seq)] = seq
            mask[row, :n] = 1
        feats = {"input_ids": ids, "attention_mask": mask}
        if "token_type_ids" in self.runtime.input_names:
            feats["token_type_ids"] = np.zeros_like(ids)
        try:
            out = self.runtime.run(feats)
        except RowsFailedError as exc:  # rows are texts, not items: the batch fails
            raise exc.cause from exc
        return np.asarray(out, dtype=np.float32)

    def query_vectors(self, queries: Sequence[list[int]]) -> list[np.ndarray]:
        """Normalized vectors of each query (real tokens, marker included): query_length of them with
        augmentation (the mask-token positions count), the real tokens' without. Queries encoded before
        (by an earlier batch of the same request, or an earlier request) come from the memo."""
        keys = [memo_key(q) for q in queries]
        found = self.queries.found(keys)
        todo = {k: q for k, q in zip(keys, queries, strict=True) if k not in found}
        if todo:
            fresh = dict(zip(todo, self._encode_queries(list(todo.values())), strict=True))
            self.queries.keep(fresh)
            found.update(fresh)
        return [found[k] for k in keys]

    def _encode_queries(self, queries: list[list[int]]) -> list[np.ndarray]:
        s = self.settings
        if s.expansion_id is not None:
            seqs = [q + [s.expansion_id] * (s.query_length - len(q)) for q in queries]
            attended = [s.query_length if s.attend_to_expansion else len(q) for q in queries]
        else:
            seqs, attended = list(queries), [len(q) for q in queries]
        out = self._run(seqs, attended)
        if self.cache is not None:
            self.cache.encoded("query", len(queries))
        return [normalize_rows(out[i, : len(seq)]) for i, seq in enumerate(seqs)]  # each owns its data

    def _kept(self, seq: list[int]) -> np.ndarray:
        skip = self.settings.skiplist
        return np.array([t not in skip for t in seq], dtype=bool)

    def document_vectors(self, docs: Sequence[list[int]]) -> list[np.ndarray]:
        """Normalized vectors of each passage's kept tokens (skiplist and padding dropped), cached."""
        keys = [self.cache.key(d) for d in docs] if self.cache is not None else None
        found: list[np.ndarray | None] = self.cache.get(keys) if self.cache is not None and keys is not None \
            else [None] * len(docs)
        todo: dict[tuple[int, ...], list[int]] = {}
        for i, (doc, vec) in enumerate(zip(docs, found, strict=True)):
            if vec is None:
                todo.setdefault(tuple(doc), []).append(i)
        if todo:
            seqs = [list(t) for t in todo]
            out = self._run(seqs, [len(s) for s in seqs])
            fresh = []
            for row, (seq, where) in enumerate(zip(seqs, todo.values(), strict=True)):
                vec = normalize_rows(out[row, : len(seq)][self._kept(seq)])
                for i in where:
                    found[i] = vec
                if keys is not None:
                    fresh.append((keys[where[0]], vec))
            if self.cache is not None:
                self.cache.encoded("passage", len(seqs))
                self.cache.put(fresh)
        return found  # type: ignore[return-value]

    def score(self, items: Sequence[BiItem]) -> np.ndarray:
        unique: dict[tuple[int, ...], int] = {}
        for it in items:
            unique.setdefault(tuple(it.query_ids), len(unique))
        q_vecs = self.query_vectors([list(q) for q in unique])
        d_vecs = self.document_vectors([it.passage_ids for it in items])
        return np.array([maxsim(q_vecs[unique[tuple(it.query_ids)]], d)
                         for it, d in zip(items, d_vecs, strict=True)], dtype=np.float32)

    def embed(self, items: Sequence[TokenEmbedItem]) -> np.ndarray:  # type: ignore[override]
        """Per-token vectors of each text, packed (see `pack`); queries augmented, passages cached."""
        if any(not isinstance(it, TokenEmbedItem) for it in items):
            raise TypeError("a late-interaction model embeds token by token (TokenEmbedItem)")
        vecs: list[np.ndarray | None] = [None] * len(items)
        q_idx = [i for i, it in enumerate(items) if it.query]
        d_idx = [i for i, it in enumerate(items) if not it.query]
        if q_idx:
            for i, v in zip(q_idx, self.query_vectors([items[i].input_ids for i in q_idx]), strict=True):
                vecs[i] = v
        if d_idx:
            for i, v in zip(d_idx, self.document_vectors([items[i].input_ids for i in d_idx]), strict=True):
                vecs[i] = v
        return pack(vecs, self.row_tokens)  # type: ignore[arg-type]


def pack(vectors: Sequence[np.ndarray], tokens: int) -> np.ndarray:
    """Token vectors of several texts as fixed-width float32 rows: [count, dim, count x dim values, 0...]."""
    dim = vectors[0].shape[1] if vectors else 0
    rows = np.zeros((len(vectors), 2 + tokens * dim), dtype=np.float32)
    for row, v in zip(rows, vectors, strict=True):
        row[0], row[1] = v.shape[0], dim
        row[2 : 2 + v.size] = v.reshape(-1)
    return rows


def unpack(row: np.ndarray) -> np.ndarray:
    """One packed row back to its `(count, dim)` token vectors."""
    count, dim = int(row[0]), int(row[1])
    return np.asarray(row[2 : 2 + count * dim], dtype=np.float32).reshape(count, dim)

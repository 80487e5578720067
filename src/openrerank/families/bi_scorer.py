"""Bi-encoder scoring: embed query and passage apart, score = cosine of the pooled embeddings.

This is how the embedded default (all-MiniLM-L6-v2) reranks. The network pools (on the device, or in the
ONNX graph); this class normalizes and compares. A batch runs its passages only; each distinct query is
embedded apart, once, at its own width, and kept in a byte-bounded memo (`families/query_memo.py`), since one
request's passages come in several batches and a query is the same in each. (Run as an extra row of every
batch, padded to the passages' width, the query cost 17-37% of the model's time per request, and pushed a batch
cut on OpenVINO's row grid to the next row bucket: docs/engine.md, "The bi-encoder's query".)

The same network hands out embeddings (`embed`, for `/v1/embeddings`): L2-normalized when the model's
sentence-transformers modules end with a Normalize module, as `SentenceTransformer.encode` returns them,
raw pooled vectors otherwise. Scores always compare normalized vectors (a cosine).

A model whose Pooling leaves the prompt out (`include_prompt: false`) is given each text's prompt length with
its ids (the work items carry it): the network's `pooling_mask` input leaves those tokens out of the pooling.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from openrerank.core.work import BiItem, EmbedItem
from openrerank.families.query_memo import QueryMemo, memo_key
from openrerank.families.scorer import Scorer
from openrerank.runtimes.base import RowsFailedError, Runtime, pad_features


def normalize(x: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.clip(norms, 1e-12, None)


class BiEncoderScorer(Scorer):
    def __init__(self, runtime: Runtime, pad_id: int, *, normalize_embeddings: bool = True) -> None:
        self.runtime = runtime
        self.pad_id = pad_id
        self.normalize_embeddings = normalize_embeddings  # what `embed` returns (the model's Normalize module)
        #: Normalized query vectors, keyed on (prompt length, query ids): what the network reads.
        self.queries = QueryMemo()

    def pooled_ids(self, seqs: Sequence[list[int]], prompt_lengths: Sequence[int] | None = None) -> np.ndarray:
        """The network's pooled float32 vectors of already tokenized texts, not normalized; `prompt_lengths`:
        each text's leading tokens the pooling leaves out (None: none)."""
        feats = pad_features(seqs, None, self.pad_id, self.runtime.input_names, pooled_from=prompt_lengths)
        return np.asarray(self.runtime.run(feats), dtype=np.float32)

    def embed_ids(self, seqs: Sequence[list[int]], prompt_lengths: Sequence[int] | None = None) -> np.ndarray:
        """L2-normalized float32 embeddings of already tokenized texts."""
        return normalize(self.pooled_ids(seqs, prompt_lengths)).astype(np.float32)

    def embed(self, items: Sequence[EmbedItem]) -> np.ndarray:
        finish = (lambda x: normalize(x).astype(np.float32)) if self.normalize_embeddings else (lambda x: x)
        try:
            return finish(self.pooled_ids([it.input_ids for it in items], [it.prompt_length for it in items]))
        except RowsFailedError as exc:  # one row per item: the scheduler fails only the failed rows' requests
            raise exc.with_outputs(finish(np.asarray(exc.outputs, dtype=np.float32))) from exc.cause

    def query_vectors(self, queries: Sequence[tuple[list[int], int]]) -> np.ndarray:
        """Normalized float32 vectors `(n, dim)` of (query ids, prompt length)s: kept ones from the memo, the
        others embedded and kept. Queries of one length run together, so each runs at its own width, with no
        padding: a query's vector is then the one it has alone (bit for bit on OpenVINO, measured)."""
        keys = [memo_key(ids, prompt) for ids, prompt in queries]
        found = self.queries.found(keys)
        by_length: dict[int, dict[bytes, tuple[list[int], int]]] = {}
        for key, query in zip(keys, queries, strict=True):
            if key not in found:
                by_length.setdefault(len(query[0]), {})[key] = query
        fresh: dict[bytes, np.ndarray] = {}
        for group in by_length.values():
            try:
                vecs = self.embed_ids([ids for ids, _ in group.values()], [n for _, n in group.values()])
            except RowsFailedError as exc:  # a query that does not fit even alone: its batch fails as a whole
                raise exc.cause from exc
            # Each kept as a copy: a row of `vecs` would keep the whole group's array alive.
            fresh.update((key, vec.copy()) for key, vec in zip(group, vecs, strict=True))
        self.queries.keep(fresh)
        found.update(fresh)
        return np.stack([found[k] for k in keys]) if keys else np.empty((0, 0), dtype=np.float32)

    def score(self, items: Sequence[BiItem]) -> np.ndarray:
        """The cosine of each item's query and passage vectors. The runtime gets the passages (one row per
        item) and each distinct query once (`query_vectors`); a passage that could not be embedded even alone
        fails its item only (`RowsFailedError`, NaN there)."""
        distinct: dict[tuple[tuple[int, ...], int], int] = {}  # (query ids, its prompt length) -> its vector's row
        q_rows = np.fromiter((distinct.setdefault((tuple(it.query_ids), it.query_prompt_length), len(distinct))
                              for it in items), dtype=np.intp, count=len(items))
        q_emb = self.query_vectors([(list(ids), n) for ids, n in distinct])
        try:
            p_emb = self.embed_ids([it.passage_ids for it in items], [it.passage_prompt_length for it in items])
        except RowsFailedError as exc:  # one row per item: the scheduler fails only the failed items' requests
            p_emb = normalize(np.asarray(exc.outputs, dtype=np.float32)).astype(np.float32)
            raise exc.with_outputs(cosines(q_emb[q_rows], p_emb)) from exc.cause
        return cosines(q_emb[q_rows], p_emb)


def cosines(queries: np.ndarray, passages: np.ndarray) -> np.ndarray:
    """Row i's query vector dotted with row i's passage vector (both normalized), float32."""
    return np.einsum("ij,ij->i", queries, passages).astype(np.float32)

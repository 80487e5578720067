"""Bi-encoder scoring: embed query and passage apart, score = cosine of the pooled embeddings.

This is how the embedded default (all-MiniLM-L6-v2) reranks. The network pools (on the device, or in the
ONNX graph); this class normalizes and compares. Queries repeat across the items of a batch (one request
= one query), so each distinct query is embedded once per batch.

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

    def score(self, items: Sequence[BiItem]) -> np.ndarray:
        unique: dict[tuple[tuple[int, ...], int], int] = {}  # (query ids, its prompt length) -> row
        for it in items:
            unique.setdefault((tuple(it.query_ids), it.query_prompt_length), len(unique))
        seqs = [list(q) for q, _ in unique] + [it.passage_ids for it in items]
        lengths = [n for _, n in unique] + [it.passage_prompt_length for it in items]
        try:
            emb = self.embed_ids(seqs, lengths)
        except RowsFailedError as exc:  # its rows are queries and passages, not items: the batch fails
            raise exc.cause from exc
        q_emb = emb[: len(unique)]
        p_emb = emb[len(unique) :]
        q_rows = np.array([unique[tuple(it.query_ids), it.query_prompt_length] for it in items])
        return np.einsum("ij,ij->i", q_emb[q_rows], p_emb).astype(np.float32)

"""One forward pass per sequence, one score per sequence: cross-encoders, Llama-bidirectional and the
yes/no decoders alike (the family's network already reduced its output to a score, or to class logits)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from openrerank.core.work import PairItem
from openrerank.families.scorer import Scorer
from openrerank.runtimes.base import RowsFailedError, Runtime, pad_features


def logits_to_scores(logits: np.ndarray) -> np.ndarray:
    """A score per row: a score itself, a one-label logit, or positive minus negative (2 labels: log-odds)."""
    logits = np.asarray(logits, dtype=np.float32)
    if logits.ndim == 1:
        return logits
    if logits.shape[1] == 1:
        return logits[:, 0]
    if logits.shape[1] == 2:
        return logits[:, 1] - logits[:, 0]
    raise ValueError(f"cannot rerank with a {logits.shape[1]}-label classifier head")


class PairScorer(Scorer):
    def __init__(self, runtime: Runtime, pad_id: int) -> None:
        self.runtime = runtime
        self.pad_id = pad_id

    def score(self, items: Sequence[PairItem]) -> np.ndarray:
        feats = pad_features(
            [it.input_ids for it in items],
            [it.token_type_ids for it in items],
            self.pad_id,
            self.runtime.input_names,
        )
        try:
            return logits_to_scores(self.runtime.run(feats))
        except RowsFailedError as exc:  # rows are items here: keep the others' scores
            raise exc.with_outputs(logits_to_scores(exc.outputs)) from exc.cause

"""Listwise scoring: one forward pass per block, a vector per passage marker and one for the query marker.

The family's network returns, for each block in the batch, the projected hidden states at its marker tokens in
prompt order, padded to a fixed number of slots (so a batch is one array whatever its blocks hold). This class
hands back each block's own rows; the scores (cosines, and the merge across blocks) are computed once every
block of the request is back (`text.listwise.ListwisePrepared.fold`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from openrerank.core.work import BlockItem
from openrerank.families.scorer import Scorer
from openrerank.runtimes.base import RowsFailedError, Runtime, pad_features


class ListwiseScorer(Scorer):
    def __init__(self, runtime: Runtime, pad_id: int) -> None:
        self.runtime = runtime
        self.pad_id = pad_id

    def score(self, items: Sequence[BlockItem]) -> list[np.ndarray]:  # type: ignore[override]
        """Each block's `(entries + 1, dim)` float32 vectors: its passages', then its query's."""
        feats = pad_features([it.input_ids for it in items], None, self.pad_id, self.runtime.input_names)
        try:
            out = np.asarray(self.runtime.run(feats), dtype=np.float32)
        except RowsFailedError as exc:  # rows are blocks: the scheduler fails only the failed blocks' requests
            raise exc.with_outputs(_rows(np.asarray(exc.outputs, dtype=np.float32), items)) from exc.cause
        return _rows(out, items)


def _rows(out: np.ndarray, items: Sequence[BlockItem]) -> list[np.ndarray]:
    return [out[i, : it.entries + 1] for i, it in enumerate(items)]

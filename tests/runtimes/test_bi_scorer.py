"""The bi-encoder scorer when its runtime could embed only part of a batch (a sequence that does not fit in
device memory even alone): the surviving embeddings come back finished (normalized) with the failure, so
the scheduler fails only the failed rows' requests and serves the others as usual."""

from __future__ import annotations

import numpy as np
import pytest

from openrerank.core.work import EmbedItem
from openrerank.families.bi_scorer import BiEncoderScorer
from openrerank.runtimes.base import DeviceMemoryError, RowsFailedError, Runtime

POOLED = np.array([[3.0, 4.0], [np.nan, np.nan], [0.0, 2.0]], dtype=np.float32)


class PartlyFailingRuntime(Runtime):
    input_names = ("input_ids", "attention_mask")
    description = "fake-fp32-cpu"

    def run(self, features: dict[str, np.ndarray]) -> np.ndarray:
        raise RowsFailedError(POOLED.copy(), [1], DeviceMemoryError("row 1 does not fit"))


ITEMS = [EmbedItem([5, 6]), EmbedItem([5, 6, 7, 8]), EmbedItem([9])]


def test_surviving_rows_are_normalized_and_the_failure_is_kept() -> None:
    scorer = BiEncoderScorer(PartlyFailingRuntime(), pad_id=0, normalize_embeddings=True)
    with pytest.raises(RowsFailedError) as info:
        scorer.embed(ITEMS)
    exc = info.value
    assert exc.failed == [1] and isinstance(exc.cause, DeviceMemoryError)
    np.testing.assert_allclose(exc.outputs[[0, 2]], [[0.6, 0.8], [0.0, 1.0]], atol=1e-6)
    assert np.isnan(exc.outputs[1]).all()


def test_without_normalization_the_pooled_rows_are_passed_on() -> None:
    scorer = BiEncoderScorer(PartlyFailingRuntime(), pad_id=0, normalize_embeddings=False)
    with pytest.raises(RowsFailedError) as info:
        scorer.embed(ITEMS)
    np.testing.assert_array_equal(info.value.outputs[[0, 2]], POOLED[[0, 2]])

"""The bi-encoder scorer when its runtime could embed only part of a batch (a sequence that does not fit in
device memory even alone): the surviving embeddings come back finished (normalized) with the failure, so
the scheduler fails only the failed rows' requests and serves the others as usual."""

from __future__ import annotations

import numpy as np
import pytest

from openrerank.core.work import BiItem, EmbedItem
from openrerank.families.bi_scorer import BiEncoderScorer, cosines
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


# the query, embedded once ---------------------------------------------------------------------------------------

class RecordingRuntime(Runtime):
    """Pools a row as (sum of its real ids, its real tokens, 1), whatever it is padded to; records each run's
    (rows, width). `fail_rows_with`: ids whose rows fail even alone (`RowsFailedError`)."""

    input_names = ("input_ids", "attention_mask")
    description = "fake-fp32-cpu"

    def __init__(self) -> None:
        self.runs: list[tuple[int, int]] = []
        self.fail_rows_with: set[int] = set()

    def run(self, features: dict[str, np.ndarray]) -> np.ndarray:
        ids, mask = features["input_ids"], features["attention_mask"]
        self.runs.append(ids.shape)
        out = np.stack([(ids * mask).sum(1), mask.sum(1), np.ones(len(ids))], axis=1).astype(np.float32)
        failed = [r for r in range(len(ids)) if self.fail_rows_with.intersection(ids[r, mask[r] == 1].tolist())]
        if failed:
            out[failed] = np.nan
            raise RowsFailedError(out, failed, DeviceMemoryError("does not fit"))
        return out


def alone(scorer: BiEncoderScorer, item: BiItem) -> np.float32:
    """An item's score with its query and passage each embedded alone: what batching must not change."""
    q = scorer.embed_ids([item.query_ids], [item.query_prompt_length])[0]
    p = scorer.embed_ids([item.passage_ids], [item.passage_prompt_length])[0]
    return cosines(q[None], p[None])[0]


def test_a_batch_runs_its_passages_only_and_each_query_once_at_its_own_width() -> None:
    runtime = RecordingRuntime()
    scorer = BiEncoderScorer(runtime, pad_id=0)
    query = [7, 8]
    first = [BiItem(query, [10 + i] * (20 + i)) for i in range(5)]
    scores = scorer.score(first)
    assert runtime.runs == [(1, 2), (5, 24)]  # the query alone at 2 tokens, then 5 passages (not 6 rows x 24)
    runtime.runs.clear()
    second = [BiItem(list(query), [30 + i] * 3) for i in range(3)]  # the request's next batch: the query is kept
    scorer.score(second)
    assert runtime.runs == [(3, 3)]
    reference = RecordingRuntime()
    np.testing.assert_array_equal(scores, [alone(BiEncoderScorer(reference, pad_id=0), it) for it in first])


def test_distinct_queries_run_once_each_by_length_and_a_prompt_length_is_part_of_the_key() -> None:
    """A window of many small requests: one batch holds several queries; none pads another, and the same ids
    pooled without their prompt are another vector."""
    runtime = RecordingRuntime()
    scorer = BiEncoderScorer(runtime, pad_id=0)
    items = [BiItem([1, 2, 3], [50, 51]), BiItem([4, 5, 6], [52]), BiItem([9], [53, 54, 55]),
             BiItem([1, 2, 3], [56]), BiItem([1, 2, 3], [57], query_prompt_length=1)]
    scores = scorer.score(items)
    assert sorted(runtime.runs) == [(1, 1), (3, 3), (5, 3)]  # [9]; three 3-token queries; the passages
    np.testing.assert_allclose(scores, [alone(BiEncoderScorer(RecordingRuntime(), pad_id=0), it) for it in items],
                               rtol=1e-6)
    assert len(scorer.queries) == 4


def test_a_passage_that_fails_alone_fails_its_item_only() -> None:
    runtime = RecordingRuntime()
    runtime.fail_rows_with = {99}
    scorer = BiEncoderScorer(runtime, pad_id=0)
    items = [BiItem([1, 2], [5, 6]), BiItem([1, 2], [99, 6]), BiItem([3], [7])]
    with pytest.raises(RowsFailedError) as info:
        scorer.score(items)
    assert info.value.failed == [1] and isinstance(info.value.cause, DeviceMemoryError)
    out = info.value.outputs
    assert np.isnan(out[1]) and np.isfinite(out[[0, 2]]).all()
    np.testing.assert_allclose(out[[0, 2]], [alone(scorer, items[0]), alone(scorer, items[2])], rtol=1e-6)


def test_a_query_that_fails_alone_fails_the_batch_with_its_cause() -> None:
    runtime = RecordingRuntime()
    runtime.fail_rows_with = {99}
    scorer = BiEncoderScorer(runtime, pad_id=0)
    with pytest.raises(DeviceMemoryError):
        scorer.score([BiItem([99], [5]), BiItem([99], [6])])
    assert len(scorer.queries) == 0


def test_a_long_query_does_not_cut_short_passages_as_if_they_were_long():
    """A batch's rows are passages (the query runs apart, once): 128 passages of 8 tokens fit one 16,384-token
    batch whatever the query's length. Counted as the longer of the two, a 200-token query cut them into two."""
    from openrerank.engine.batching import CPU_POLICY

    items = [BiItem([101, *range(1000, 1198), 102], [101, *range(i, i + 6), 102]) for i in range(128)]
    assert [len(b) for b in CPU_POLICY.split(items)] == [128]

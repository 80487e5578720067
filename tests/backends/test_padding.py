"""Trimmed sub-batches give the same numbers, in the same rows, as running the padded batch whole."""

from __future__ import annotations

import numpy as np

from openrerank.backends.padding import run_trimmed


def fake_model(features: dict[str, np.ndarray]) -> np.ndarray:
    """Per-token output that depends only on a row's real tokens, plus a per-row 'logit'."""
    ids, mask = features["input_ids"], features["attention_mask"]
    return (ids * mask)[:, :, None] * np.array([1.0, -2.0], dtype=np.float32)


def test_trimmed_matches_whole_batch_and_keeps_row_order():
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 90, size=77)
    width = int(lengths.max()) + 3
    mask = (np.arange(width)[None, :] < lengths[:, None]).astype(np.int64)
    feats = {"input_ids": rng.integers(1, 1000, size=mask.shape) * mask, "attention_mask": mask}
    calls: list[tuple[int, int]] = []

    def model(f):
        calls.append(f["input_ids"].shape)
        return fake_model(f)

    got = run_trimmed(model, feats, rows=16)
    np.testing.assert_array_equal(got, fake_model(feats))
    assert len(calls) == 5 and all(w < width for _, w in calls[:-1])  # sorted chunks, narrower than the batch
    logits = run_trimmed(lambda f: fake_model(f).sum(axis=1), feats, rows=16)
    np.testing.assert_array_equal(logits, fake_model(feats).sum(axis=1))


def test_tight_batch_runs_whole():
    mask = np.ones((40, 12), dtype=np.int64)
    mask[0, -1] = 0
    calls = []
    feats = {"input_ids": mask, "attention_mask": mask}
    run_trimmed(lambda f: calls.append(f["input_ids"].shape) or f["input_ids"][:, :1], feats)
    assert calls == [(40, 12)]

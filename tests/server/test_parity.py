"""Served logits equal a plain `transformers` forward pass (the reference), through HTTP."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from tests.support import nim_body, run_server

QUERY = "what is the capital of france"
PASSAGES = [
    "paris is the capital of france",
    "berlin is the capital city of germany",
    "the banana is a yellow fruit",
    "a river flows to the sea",
    "how does a neural network learn from data",
    "france",
    "the the the of of a",
]


def reference_scores(model_dir, query: str, passages: list[str]) -> np.ndarray:
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    with torch.inference_mode():
        enc = tok([query] * len(passages), passages, padding=True, truncation=True, return_tensors="pt")
        logits = model(**enc).logits.float().numpy()
    return logits[:, 0] if logits.shape[1] == 1 else logits[:, 1] - logits[:, 0]


@pytest.mark.parametrize("fixture", ["tiny_model_dir", "tiny_model_2label_dir"])
def test_logits_match_transformers(request, tmp_path, fixture):
    model_dir = request.getfixturevalue(fixture)
    expected = reference_scores(model_dir, QUERY, PASSAGES)
    # fp32 is exact on every engine; auto may pick bf16, which is held to its fidelity gate elsewhere.
    with run_server(["--model", f"m={model_dir}", "--dtype", "fp32"], tmp_path) as server, server.client() as c:
        resp = c.post("/v1/ranking", json=nim_body(QUERY, PASSAGES))
    assert resp.status_code == 200, resp.text
    rankings = resp.json()["rankings"]
    got = np.zeros(len(PASSAGES), dtype=np.float32)
    for r in rankings:
        got[r["index"]] = r["logit"]
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)
    expected_order = [int(i) for i in np.argsort(-expected, kind="stable")]
    assert [r["index"] for r in rankings] == expected_order

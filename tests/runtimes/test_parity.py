"""fp32 engines (OpenVINO, ONNX Runtime, PyTorch) agree with the reference implementations (transformers,
sentence-transformers) within 1e-4."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import AutoModelForSequenceClassification

from openrerank.core.requests import Truncate
from openrerank.engine.loading import LoadOptions, load_model
from openrerank.families.pair_scorer import logits_to_scores
from openrerank.runtimes.base import pad_features

QUERY = "what is the capital city of france"
PASSAGES = [
    "paris",
    "paris is the capital of france and its largest city on the river",
    "bananas are yellow fruit",
    "the engine of a car drives the road",
    "science study of protein cell gene drug disease patient data learning neural network model " * 2,
    "who",
    "berlin germany capital city water sea",
    "what which who where when how why answer question",
    "a",
]
TOL = 1e-4


def reference_logits(model_dir, features: dict[str, np.ndarray]) -> np.ndarray:
    model = AutoModelForSequenceClassification.from_pretrained(str(model_dir), local_files_only=True).eval()
    with torch.inference_mode():
        return model(**{k: torch.from_numpy(v) for k, v in features.items()}).logits.float().numpy()


def batch_features(loaded, passages: list[str]) -> dict[str, np.ndarray]:
    prep = loaded.encoder.prepare(QUERY, passages, Truncate.END)
    items = prep.items
    return pad_features([it.input_ids for it in items], [it.token_type_ids for it in items],
                        loaded.scorer.pad_id, loaded.scorer.runtime.input_names)


ENGINES = ["openvino", "onnx", "torch"]


@pytest.mark.parametrize("backend", ENGINES)
@pytest.mark.parametrize("which", ["tiny_model_dir", "tiny_model_2label_dir"])
def test_cross_encoder_logits_match_transformers(request, backend, which):
    model_dir = request.getfixturevalue(which)
    loaded = load_model(str(model_dir), LoadOptions(backend=backend, dtype="fp32"))
    assert loaded.scorer.description == f"{backend}-fp32-cpu"
    # Batch sizes and padded widths unlike the export's dummy batch: the axes must really be dynamic.
    for passages in (PASSAGES, PASSAGES[:1], PASSAGES[2:7]):
        feats = batch_features(loaded, passages)
        ref = reference_logits(model_dir, feats)
        got = loaded.scorer.runtime.run(feats)
        assert got.dtype == np.float32
        assert got.shape == ref.shape
        np.testing.assert_allclose(got, ref, atol=TOL, rtol=0)
    # And through the scoring path the server uses (one logit, or yes-minus-no for two labels).
    scores = loaded.score(QUERY, PASSAGES)
    ref_scores = logits_to_scores(reference_logits(model_dir, batch_features(loaded, PASSAGES)))
    np.testing.assert_allclose(scores, ref_scores, atol=TOL, rtol=0)
    loaded.close()


@pytest.fixture(scope="module")
def sentence_transformer():
    from sentence_transformers import SentenceTransformer

    from openrerank.sources.source import default_model_dir

    return SentenceTransformer(str(default_model_dir()), device="cpu", local_files_only=True)


@pytest.mark.parametrize("backend", ENGINES)
def test_bi_encoder_matches_sentence_transformers(sentence_transformer, backend):
    loaded = load_model("default", LoadOptions(backend=backend, dtype="fp32"))
    assert loaded.scorer.description == f"{backend}-fp32-cpu"
    texts = [QUERY, *PASSAGES, "A much longer passage about rivers. " * 30]
    ref = sentence_transformer.encode(texts, normalize_embeddings=True, convert_to_numpy=True, batch_size=4)
    got = loaded.embed(texts, batch_size=5)
    np.testing.assert_allclose(got, ref, atol=TOL, rtol=0)
    scores = loaded.score(QUERY, PASSAGES)
    np.testing.assert_allclose(scores, ref[1 : len(PASSAGES) + 1] @ ref[0], atol=TOL, rtol=0)
    loaded.close()

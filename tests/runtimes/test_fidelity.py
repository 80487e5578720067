"""The fidelity gate behind `--backend auto`, on real models: what auto picks must be faithful to fp32.

Faithful: scores on a fixed probe set correlate >= 0.9999 (Pearson) with PyTorch fp32, and the default
model's DL19 nDCG@10 stays within 0.002 (test_quality.py). Models: the MiniLM-L6 cross-encoder shape
(`openrerank bench`'s model: the packaged encoder weights with a seeded one-logit head) and the default
bi-encoder. Probe sets: the fixed text in probe_text.py (always there) and 120 DL19 pairs (8 queries x BM25
top-15, where the shared data is present). int8 is measured too: usable, but it does not pass the gate,
which is why auto never picks it.
"""

from __future__ import annotations

import numpy as np
import pytest

from openrerank.engine.loading import LoadOptions, load_model
from tests.runtimes.probe_text import PROBE_QUERIES
from tests.support import DL19

GATE = 0.9999
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cross_encoder(tmp_path_factory):
    from openrerank_bench import build_bench_cross_encoder

    return str(build_bench_cross_encoder(tmp_path_factory.mktemp("bench-ce") / "minilm-l6-ce"))


def probe(name: str) -> list[tuple[str, list[str]]]:
    if name == "text":
        return [(q, list(ps)) for q, ps in PROBE_QUERIES]
    if not (DL19 / "runs" / "bm25_top100.trec.gz").is_file():
        pytest.skip(f"DL19 data absent at {DL19}")
    from openrerank_bench import load_workload

    wl = load_workload(DL19, "runs/bm25_top100.trec.gz", 8, 15)
    return list(zip(wl.queries, wl.passages, strict=True))


_SCORES: dict[tuple, np.ndarray] = {}


def scores(model: str, probe_name: str, backend: str, dtype: str) -> np.ndarray:
    """The engine's scores on the probe set, one per pair (memoised: loading an engine costs seconds)."""
    key = (model, probe_name, backend, dtype)
    if key not in _SCORES:
        loaded = load_model(model, LoadOptions(backend=backend, dtype=dtype))
        try:
            _SCORES[key] = np.concatenate([loaded.score(q, ps) for q, ps in probe(probe_name)])
        finally:
            loaded.close()
    return _SCORES[key]


def correlation(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a, b)[0, 1])


@pytest.fixture(params=["cross-encoder", "default"])
def model(request, cross_encoder) -> str:
    return cross_encoder if request.param == "cross-encoder" else "default"


@pytest.mark.parametrize("probe_name", ["text", "dl19"])
def test_what_auto_picks_is_faithful(model, probe_name):
    auto = load_model(model)  # --backend auto --dtype auto
    engine = auto.runtime_choice
    auto.close()
    reference = scores(model, probe_name, "torch", "fp32")
    got = scores(model, probe_name, engine.runtime, engine.dtype)
    r = correlation(reference, got)
    print(f"\n{model[-12:]} {probe_name}: auto = {engine.label}, correlation {r:.6f}, "
          f"max|Δ| {np.abs(got - reference).max():.2e}")
    assert r >= GATE, f"{engine.label} correlates {r:.6f} with fp32 on the {probe_name} probe"


@pytest.mark.parametrize("probe_name", ["text", "dl19"])
def test_openvino_fp32_is_exact(model, probe_name):
    reference = scores(model, probe_name, "torch", "fp32")
    got = scores(model, probe_name, "openvino", "fp32")
    assert np.abs(got - reference).max() <= 1e-4


@pytest.mark.parametrize("backend", ["openvino", "onnx"])
def test_int8_is_usable_but_not_faithful(cross_encoder, backend):
    """If this fails on the `<` side, int8 has become faithful: let `auto` pick it (runtimes/selection.py).
    "Usable" is 0.98: the kernels differ by CPU (ONNX Runtime's dynamic int8 gave 0.98990 on this probe on an AMD
    EPYC Zen 4 with VNNI, failing the 0.99 this test had, measured on a Zen 3 without VNNI)."""
    name = "dl19" if (DL19 / "runs" / "bm25_top100.trec.gz").is_file() else "text"
    reference = scores(cross_encoder, name, "torch", "fp32")
    r = correlation(reference, scores(cross_encoder, name, backend, "int8"))
    print(f"\ncross-encoder {name}: {backend} int8 correlation {r:.6f}")
    assert 0.98 <= r < GATE

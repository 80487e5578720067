"""`openrerank bench`'s fp32 roofline: the FLOP formula against PyTorch's own FLOP counter on a real BERT
forward, and the pairing that keeps a drifting host's pace out of the fraction."""

from __future__ import annotations

from itertools import pairwise

import numpy as np
import pytest
from openrerank_bench import roofline
from openrerank_bench.roofline import GEMM_LIBRARIES, flops_per_pair, fraction_summary, paired_fraction, sequence_flops


@pytest.mark.parametrize("tokens", [8, 40, 200])
def test_the_flop_formula_counts_what_pytorch_counts_in_a_bert_forward(tokens):
    import torch
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import BertConfig, BertModel

    config = {"hidden_size": 64, "intermediate_size": 256, "num_hidden_layers": 3, "num_attention_heads": 4}
    model = BertModel(BertConfig(vocab_size=100, max_position_embeddings=256, attn_implementation="eager", **config),
                      add_pooling_layer=False).eval()
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(input_ids=torch.ones(1, tokens, dtype=torch.long))
    counted = counter.get_total_flops()  # every matmul: the linear layers and attention's two products
    assert sequence_flops(config, tokens) == pytest.approx(counted, rel=1e-9)


def test_flops_per_pair_is_the_mean_over_the_workload_pairs():
    config = {"hidden_size": 4, "intermediate_size": 8, "num_hidden_layers": 1}
    # a bi-encoder request: two passages and its query, encoded once, over 2 pairs
    assert flops_per_pair(config, [10, 20, 5], 2) == pytest.approx(
        (sequence_flops(config, 10) + sequence_flops(config, 20) + sequence_flops(config, 5)) / 2)


def test_a_measurement_is_set_against_the_pace_either_side_of_it():
    # 50 pairs/s of 2 GFLOP each = 100 GFLOP/s of model work; the GEMM ran at 120 before and 130 after
    assert paired_fraction(50.0, 2.0, 120.0, 130.0) == pytest.approx(100 / 125)


def test_an_engine_that_keeps_pace_with_a_drifting_host_has_one_fraction():
    # the host slows from 160 to 110 GFLOP/s over the run; the engine always runs at 0.8 of its pace
    gemm = [160.0, 150.0, 135.0, 120.0, 110.0]
    rounds = [{"pairs_per_s": 0.8 * (a + b) / 2 / 2.0, "gemm_gflops": (a, b)} for a, b in pairwise(gemm)]
    out = fraction_summary(rounds, 2.0)
    assert out["roofline_fraction"] == pytest.approx(0.8)
    assert out["roofline_fraction_rounds"] == pytest.approx([0.8] * 4)
    # whereas its best round against the run's best GEMM would have understated it
    assert max(r["pairs_per_s"] for r in rounds) * 2.0 / max(gemm) < 0.8 - 0.02


def test_the_fraction_is_the_median_of_the_rounds_kept_in_round_order():
    """The rounds were sorted, so they could not be matched to `rounds_pairs_per_s` (kept in round order)."""
    def rounds(*fractions: float) -> list[dict]:
        return [{"pairs_per_s": f * 100.0, "gemm_gflops": (100.0, 100.0)} for f in fractions]

    assert fraction_summary(rounds(0.9, 0.5, 0.7), 1.0) == {"roofline_fraction": 0.7,
                                                             "roofline_fraction_best_round": 0.9,
                                                             "roofline_fraction_rounds": [0.9, 0.5, 0.7]}
    assert fraction_summary(rounds(0.9, 0.5, 0.7, 0.6), 1.0)["roofline_fraction"] == pytest.approx(0.65)
    assert fraction_summary([], 1.0) == {}


def test_the_best_rounds_fraction_is_of_the_round_whose_pairs_per_s_the_table_shows():
    """Zen 5: OpenVINO int8's rounds ran 226 and 304 pairs/s, bf16's 292 and 298; the table showed the best pairs/s
    (int8 ahead) beside the median fraction (int8 behind). The best round's own paired fraction ranks them as the
    pairs/s do, even where that round is not the one with the highest fraction (its GEMM ran faster)."""
    def rounds(*measured: tuple[float, float, float]) -> list[dict]:
        return [{"pairs_per_s": rate, "gemm_gflops": (before, after)} for rate, before, after in measured]

    int8 = rounds((226.0, 420.0, 440.0), (304.0, 480.0, 484.0))
    bf16 = rounds((292.0, 460.0, 470.0), (298.0, 476.0, 478.0))
    a, b = fraction_summary(int8, 2.1), fraction_summary(bf16, 2.1)
    assert a["roofline_fraction"] < b["roofline_fraction"]  # the medians rank them against the pairs/s
    assert a["roofline_fraction_best_round"] == pytest.approx(304.0 * 2.1 / 482.0, abs=1e-3)
    assert a["roofline_fraction_best_round"] > b["roofline_fraction_best_round"]
    # the best round by pairs/s, not by fraction: a slower round against a slower GEMM can have the higher one
    slow_host = rounds((100.0, 100.0, 100.0), (120.0, 200.0, 200.0))
    assert fraction_summary(slow_host, 1.0)["roofline_fraction_best_round"] == pytest.approx(0.6)


@pytest.mark.parametrize("library", GEMM_LIBRARIES)
def test_each_library_product_is_an_fp32_product_on_the_threads_given(library):
    """A product in lower precision (OpenVINO runs bf16 by default on a CPU with bf16 units) would set the roofline
    on a rate no fp32 engine can reach: each library's product equals float64's to fp32's accuracy (bf16's 8-bit
    mantissa is off by ~1e-2 of the scale)."""
    pytest.importorskip(library.split("-")[0])  # torch-onednn: PyTorch's oneDNN product
    size = 256
    product = roofline.gemm_products(1, size)[library]
    rng = np.random.default_rng(0)  # the inputs gemm_products draws
    a, b = (rng.standard_normal((size, size), dtype=np.float32) for _ in range(2))
    out = product()
    out = np.asarray(out[0] if isinstance(out, list) else (out.to_tuple()[0] if hasattr(out, "to_tuple") else out))
    exact = a.astype(np.float64) @ b.astype(np.float64)
    assert np.abs(out - exact).max() / np.abs(exact).max() < 1e-5
    assert roofline.gemm_gflops(product, size, repeats=2) > 0


def test_the_roofline_is_the_fastest_library_and_one_not_installed_is_left_out(monkeypatch):
    """On a Zen 5, PyTorch's MKL (its AVX2 path on AMD) ran at 204 GFLOP/s and OpenVINO at 448: the roofline is the
    fastest library's, and every rate is reported."""
    def missing(*_a):
        raise ImportError("No module named 'onnxruntime'")

    monkeypatch.setitem(roofline._PRODUCT_BUILDERS, "onnxruntime", missing)
    products = roofline.gemm_products(1, 64)
    assert set(products) == {"torch", "torch-onednn", "openvino"} & {lib for lib in GEMM_LIBRARIES if _installed(lib)}
    rates = {"torch": 204.0, "torch-onednn": 440.0, "openvino": 448.0}
    monkeypatch.setattr(roofline, "gemm_gflops", lambda product: rates[next(k for k, p in products.items()
                                                                              if p is product)])
    assert roofline.fastest_gemm(products) == (max(products, key=rates.__getitem__), {k: rates[k] for k in products})


def _installed(library: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(library.split("-")[0]) is not None

"""The bench table (openrerank_bench.report): each figure under the heading that says what it is."""

from __future__ import annotations

import pytest
from openrerank_bench.report import render

RESULT = {
    "model": {"name": "default"}, "workload": {"requests": 2, "passages_per_request": 10, "pairs": 20},
    "concurrency": {"clients": 2}, "machine": {"load_average_start": "0.5", "load_average_end": "0.6"},
    "reference_ndcg@10": 0.5,
    "baseline": {"name": "sentence-transformers", "pairs_per_s": 15.0, "p50_ms": 651.0, "p95_ms": 758.0,
                 "rounds_pairs_per_s": [15.0], "spread": 0.0},
    "backends": [
        {"name": "openvino fp32", "agreement": {"correlation": 1.0, "max_abs_diff": 4.8e-7}, "faithful": True,
         "offline": {"pairs_per_s": 25.8, "p50_ms": 388.0, "p95_ms": 471.0, "spread": 0.0},
         "first_request": {"ratio": 1.32},
         "http": {"pairs_per_s": 26.0, "p50_ms": 384.0, "p95_ms": 442.0, "model_share": 0.974},
         "concurrent": {"pairs_per_s": 22.5, "p50_ms": 818.0, "p99_ms": 937.0, "failures": 0}},
        {"name": "torch bf16", "error": "RuntimeError: no bf16"},
    ],
}


def _columns(result: dict, monkeypatch: pytest.MonkeyPatch) -> dict[str, list[str]]:
    """The cells of the table `render` prints, by column heading."""
    from rich.console import Console

    printed = []
    with monkeypatch.context() as m:
        m.setattr(Console, "print", lambda self, table: printed.append(table))
        render(result)
    return {c.header: [str(cell) for cell in c.cells] for c in printed[0].columns}


def test_the_baselines_offline_latency_is_not_under_the_http_heading(monkeypatch):
    """b1.json's baseline p50 651 ms (offline, in-process) was printed under "HTTP p50/p95 ms", and the engines'
    offline p50s appeared nowhere."""
    cols = _columns(RESULT, monkeypatch)
    assert cols["engine"] == ["baseline", "openvino fp32", "torch bf16"]
    assert cols["HTTP p50/p95 ms"] == ["", "384/442", ""]
    assert cols["offline p50/p95 ms"] == ["651/758", "388/471", ""]
    assert cols["HTTP pairs/s"] == ["", "26.0 (1.73x)", ""]
    assert cols["2c p50/p99 ms"] == ["", "818/937", ""]
    assert cols["offline pairs/s (best round)"] == ["15.0 (1.00x)", "25.8 (1.72x)", "error: RuntimeError: no bf16"]
    assert cols["corr vs fp32"] == ["1", "1.000000", ""] and cols["faithful"] == ["", "yes", ""]


def test_a_row_measured_offline_only_has_no_http_figures(monkeypatch, capsys):
    offline_only = {**RESULT["backends"][0]}
    for key in ("http", "concurrent", "first_request"):
        offline_only.pop(key)
    cols = _columns({**RESULT, "backends": [offline_only]}, monkeypatch)
    assert cols["offline p50/p95 ms"][1] == "388/471"
    assert cols["HTTP p50/p95 ms"][1] == "-" and cols["2c p50/p99 ms"][1] == "-"
    render({**RESULT, "backends": [offline_only]})
    assert "388/471" in capsys.readouterr().out


def test_the_roofline_cell_leads_with_the_round_whose_pairs_per_s_the_row_shows(monkeypatch):
    """The row showed the best round's pairs/s beside the median fraction: on Zen 5 OpenVINO int8 read 303.8 pairs/s
    against bf16's 297.9 but 1.15 against 1.23 of the roofline. Both columns now name the best round; the median
    and range follow. A result written before keeps its median and range."""
    int8 = {**RESULT["backends"][0], "name": "openvino int8", "roofline_fraction": 1.15,
            "roofline_fraction_best_round": 1.325, "roofline_fraction_rounds": [0.97, 1.32]}
    old = {**RESULT["backends"][0], "name": "old", "roofline_fraction": 0.8, "roofline_fraction_rounds": [0.7, 0.9]}
    cols = _columns({**RESULT, "backends": [int8, old]}, monkeypatch)
    assert cols["roofline (best round)"] == ["-", "1.32 (median 1.15, 0.97-1.32)", "0.80 (0.70-0.90)"]
    assert cols["offline pairs/s (best round)"][1] == "25.8 (1.72x)"


def test_the_first_request_cell_shows_the_range_against_each_rounds_warm_latency(monkeypatch):
    """One warm sample carried the whole ratio; now the median and the range over the rounds' warm latencies."""
    row = {**RESULT["backends"][0], "first_request": {"first_ms": 300.0, "warm_ms": 300.0, "ratio": 1.0,
                                                      "warm_ms_rounds": [150.0, 300.0, 310.0],
                                                      "ratio_range": [0.97, 2.0]}}
    older = {**RESULT["backends"][0], "name": "older"}  # a result with the single-sample ratio only
    cols = _columns({**RESULT, "backends": [row, older]}, monkeypatch)
    assert cols["first req."] == ["", "1.00x (0.97-2.00)", "1.32x (1.32-1.32)"]

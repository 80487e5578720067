"""`openrerank bench --suite llm` end to end on the tiny twins of its models: it runs, its hand-written
baselines agree with openrerank (the fp32 gate), and it writes the figures it reports."""

from __future__ import annotations

import json

import pytest

from openrerank.cli.main import main
from tests.support import DATA

DL19 = DATA / "msmarco-trec-dl19-pooled"


@pytest.mark.skipif(not DL19.is_dir(), reason="needs the shared DL19 data")
def test_llm_suite_runs_and_its_gates_hold(tmp_path):
    out = tmp_path / "llm.json"
    rc = main(["bench", "--suite", "llm", "--llm-models", "qwen3-reranker-tiny,llama-bidirectional-tiny",
               "--passages", "6", "--rounds", "1", "--threads", "1", "--data", str(DL19),
               "--model-cache", str(tmp_path / "models"), "--json", str(out)])
    result = json.loads(out.read_text())
    assert rc == 0, result
    assert [m["family"] for m in result["models"]] == ["qwen3-reranker", "llama-bidirectional"]
    bf16_units = not result["skipped_configs"]  # bf16 is left out, with its reason, on CPUs without bf16 units
    if not bf16_units:
        assert "bf16" in result["skipped_configs"]["torch:bf16"]
    for model in result["models"]:
        fp32, *rest = model["engines"]
        assert fp32["config"] == "torch:fp32" and fp32["vs_baseline"]["max_abs_diff"] <= 1e-4
        assert len(rest) == (1 if bf16_units else 0)
        for bf16 in rest:
            assert bf16["vs_fp32"]["pearson"] >= 0.999
        assert model["baseline"]["pairs_per_s"] > 0 and fp32["speedup"] > 0 and fp32["paired_speedups"]

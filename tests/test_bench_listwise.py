"""`python -m openrerank_bench.listwise` (docs/models.md's cost figures) runs: it read the scorer under a name
the loaded model no longer has, and failed at its first request."""

from __future__ import annotations

import pytest

from tests.support import DATA

DL19 = DATA / "msmarco-trec-dl19-pooled"


@pytest.mark.skipif(not DL19.is_dir(), reason="needs the shared DL19 data")
def test_listwise_bench_runs(tmp_path, capsys):
    from openrerank_bench.listwise import main

    assert main(["--data", str(DL19), "--queries", "1", "--passages", "3", "--rounds", "1",
                 "--cache", str(tmp_path / "model")]) == 0
    out = capsys.readouterr().out
    assert "| listwise | 1 |" in out and "| pointwise | 3 |" in out, out

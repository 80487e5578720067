"""`--runs`: every run file is its own row, named so that a reader can tell which file it is."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest
from tests.support import run_eval as main


def _write(path: Path, lines: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(lines)
    return path


GOOD = "q1 Q0 d1 1 9.0 t\nq2 Q0 d2 1 8.0 t\nq3 Q0 d3 1 7.0 t\n"  # every query's relevant doc first
BAD = "q1 Q0 d6 1 9.0 t\nq2 Q0 d6 1 8.0 t\nq3 Q0 d6 1 7.0 t\n"  # nothing relevant


def test_run_files_sharing_a_name_stem_are_separate_rows(tiny_beir: Path, tmp_path: Path) -> None:
    """Before, runsA/bm25.trec and runsB/bm25.trec (and splade.v1/splade.v2) were both `run:bm25` (`run:splade`),
    cached by that name: the second row silently showed the first file's numbers."""
    a = _write(tiny_beir / "runsA" / "bm25.trec", GOOD)
    b = _write(tiny_beir / "runsB" / "bm25.trec", BAD)
    v1 = _write(tiny_beir / "runsA" / "splade.v1.trec", BAD)
    v2 = tiny_beir / "runsB" / "splade.v2.trec.gz"
    v2.write_bytes(gzip.compress(GOOD.encode()))
    out = tmp_path / "t.json"
    assert main(["--dataset", str(tiny_beir), "--pipelines", "sparse", "--runs", str(a), str(b), str(v1), str(v2),
                 str(a), "--quiet", "--no-cache", "--json", str(out)]) == 0
    rows = {r["pipeline"]: r["metrics"]["mrr@10"] for r in json.loads(out.read_text())["rows"]}
    assert list(rows) == ["sparse", "run:runsA/bm25", "run:runsB/bm25", "run:splade.v1", "run:splade.v2"]
    assert rows["run:runsA/bm25"] == pytest.approx(1.0) and rows["run:runsB/bm25"] == pytest.approx(0.0)
    assert rows["run:splade.v1"] == pytest.approx(0.0) and rows["run:splade.v2"] == pytest.approx(1.0)


def test_run_file_names() -> None:
    from openrerank.eval.data import run_file_names

    paths = [Path("/d/runs/bm25_top100.trec.gz"), Path("/x/a/bm25.trec"), Path("/y/a/bm25.trec"),
             Path("/d/runs/x.trec"), Path("/d/runs/x.trec.gz")]
    assert run_file_names(paths) == {
        paths[0]: "bm25_top100", paths[1]: "x/a/bm25", paths[2]: "y/a/bm25",
        paths[3]: "/d/runs/x.trec", paths[4]: "/d/runs/x.trec.gz"}

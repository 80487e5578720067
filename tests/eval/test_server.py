"""`openrerank eval --server URL` reranks through a real running server, with the same result as in-process."""

from __future__ import annotations

import json
from pathlib import Path

from openrerank.eval.__main__ import main


def test_server_rerank_matches_in_process(default_server, tiny_beir: Path, tmp_path: Path) -> None:
    common = ["--dataset", str(tiny_beir), "--pipelines", "sparse,sparse+rerank", "--top-k", "4",
              "--cache-dir", str(tmp_path / "cache"), "--quiet"]
    local, remote = tmp_path / "local.json", tmp_path / "remote.json"
    assert main([*common, "--json", str(local)]) == 0
    assert main([*common, "--server", default_server.url, "--json", str(remote)]) == 0
    rows = {p: {r["pipeline"]: r["metrics"] for r in json.loads(p.read_text())["rows"]} for p in (local, remote)}
    assert rows[local]["sparse+rerank"] == rows[remote]["sparse+rerank"]
    assert rows[local]["sparse"] == rows[remote]["sparse"]
    # the server saw the rerank requests
    with default_server.client() as c:
        metrics = c.get("/v1/metrics").text
    assert 'openrerank_requests_total{route="/v1/ranking",status="200"}' in metrics

"""`openrerank eval --server URL` reranks through a real running server, and embeds the dense stage with its
`/v1/embeddings` when it serves an embedding model, with the same result as in-process."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest
from tests.support import run_eval as main
from tests.support import run_server


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
    assert 'openrerank_requests_total{protocol="http",route="/v1/ranking",status="200"}' in metrics


def _rows(path: Path) -> dict:
    return {r["pipeline"]: r["metrics"] for r in json.loads(path.read_text())["rows"]}


def test_server_dense_stage_uses_its_embeddings(default_server, tiny_beir: Path, tmp_path: Path) -> None:
    common = ["--dataset", str(tiny_beir), "--pipelines", "dense,hybrid,dense+rerank", "--top-k", "4",
              "--cache-dir", str(tmp_path / "cache"), "--quiet"]
    local, remote, again = tmp_path / "local.json", tmp_path / "remote.json", tmp_path / "again.json"
    assert main([*common, "--json", str(local)]) == 0
    assert main([*common, "--server", default_server.url, "--json", str(remote)]) == 0
    assert main([*common, "--server", default_server.url, "--json", str(again)]) == 0
    assert _rows(remote) == _rows(local)
    notes = json.loads(remote.read_text())["notes"]
    assert any(f"via {default_server.url}/v1/embeddings" in n for n in notes)
    assert any("encoded 6 docs (cache key server-" in n for n in notes)
    text = again.read_text()
    assert "corpus embeddings from cache (key server-" in text and _rows(again) == _rows(local)
    with default_server.client() as c:
        metrics = c.get("/v1/metrics").text
    assert 'openrerank_requests_total{protocol="http",route="/v1/embeddings",status="200"}' in metrics


def test_server_without_embedding_model(tiny_server, tiny_beir: Path, tmp_path: Path, capsys) -> None:
    common = ["--dataset", str(tiny_beir), "--pipelines", "dense", "--top-k", "4", "--no-cache", "--quiet",
              "--server", tiny_server.url]
    out = tmp_path / "fallback.json"
    assert main([*common, "--json", str(out)]) == 0  # auto: the dense model in-process
    assert "serves no embedding model; embedded in-process instead" in out.read_text()
    assert main([*common, "--dense-from", "server"]) == 2
    assert main([*common, "--dense-server-model", "tiny"]) == 2
    assert "serves no embedding model 'tiny'" in capsys.readouterr().err


def test_an_empty_document_is_reranked_through_the_server_as_in_process(tiny_server, tiny_model_dir, make_beir,
                                                                       tmp_path: Path) -> None:
    """Before, a corpus document with no title and no text went to the server as {"text": ""}: the server refused
    the whole request (400) and the table was lost. Now it is sent as the in-process path scores it."""
    ds = make_beir(tmp_path / "with-empty", gz=False)
    with open(ds / "corpus.jsonl", "a", encoding="utf-8") as f:
        f.write(json.dumps({"_id": "empty", "title": "", "text": "", "metadata": {}}) + "\n")
    run = ds / "cands.trec"
    run.write_text("q1 Q0 empty 1 9.0 t\nq1 Q0 d1 2 8.0 t\nq2 Q0 d2 1 5.0 t\nq2 Q0 empty 2 4.0 t\n")
    common = ["--dataset", str(ds), "--pipelines", "sparse+rerank", "--top-k", "4", "--runs", str(run),
              "--no-cache", "--quiet"]
    local, remote = tmp_path / "local.json", tmp_path / "remote.json"
    assert main([*common, "--rerank-model", str(tiny_model_dir), "--json", str(local)]) == 0
    assert main([*common, "--server", tiny_server.url, "--json", str(remote)]) == 0
    assert _rows(remote)["run:cands+rerank"] == _rows(local)["run:cands+rerank"]


@pytest.fixture(scope="module")
def keyed_server(tmp_path_factory, tiny_model_dir):
    """A server that wants a key and takes at most 2 passages a request."""
    args = ["--model", f"tiny={tiny_model_dir}", "--max-passages", "2"]
    with run_server(args, tmp_path_factory.mktemp("keyed-server"), api_key="s3cret") as server:
        yield server


def _one_line_error(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_server_errors_are_one_line_and_the_key_and_the_servers_max_passages_are_honoured(
        keyed_server, tiny_beir: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    """Before, a 401 (no key: eval had no --api-key) or a refused connection was a raw traceback, and a server
    started with --max-passages below --top-k refused every request (eval sent up to 512 passages)."""
    common = ["--dataset", str(tiny_beir), "--pipelines", "sparse,sparse+rerank", "--top-k", "4", "--no-cache",
              "--quiet"]
    monkeypatch.delenv("OPENRERANK_API_KEY", raising=False)
    capsys.readouterr()
    assert main([*common, "--server", keyed_server.url]) == 2
    line = _one_line_error(capsys.readouterr().err)
    assert line.startswith(f"openrerank eval: error: --server {keyed_server.url}: 401")
    out = tmp_path / "keyed.json"
    assert main([*common, "--server", keyed_server.url, "--api-key", "s3cret", "--json", str(out)]) == 0
    assert "s3cret" not in out.read_text()  # the key is never written out
    monkeypatch.setenv("OPENRERANK_API_KEY", "s3cret")  # the variable `serve --api-key` reads
    assert main([*common, "--server", keyed_server.url]) == 0
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        refused = f"http://127.0.0.1:{s.getsockname()[1]}"
    capsys.readouterr()
    assert main([*common, "--server", refused]) == 2
    assert "cannot reach" in _one_line_error(capsys.readouterr().err)


def test_the_dense_stage_reports_server_errors_in_one_line_with_the_servers_message(
        keyed_server, tiny_beir: Path, monkeypatch, capsys) -> None:
    """The dense stage asks the server for its embedding model first: a 401 there was httpx's two-line text
    ("Client error '401 Unauthorized' ... For more information check: ...") without the server's message."""
    common = ["--dataset", str(tiny_beir), "--pipelines", "sparse,dense", "--no-cache", "--quiet"]
    monkeypatch.delenv("OPENRERANK_API_KEY", raising=False)
    capsys.readouterr()
    assert main([*common, "--server", keyed_server.url]) == 2
    line = _one_line_error(capsys.readouterr().err)
    assert line.startswith(f"openrerank eval: error: --server {keyed_server.url}: 401: "), line
    assert "API key" in line, line  # the server's message
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        refused = f"http://127.0.0.1:{s.getsockname()[1]}"
    assert main([*common, "--server", refused]) == 2
    assert "cannot reach" in _one_line_error(capsys.readouterr().err)

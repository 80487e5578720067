"""Bounded work per request, slow clients, fail-fast startup: against `openrerank serve` as users run it."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from openrerank_bench.serve_process import free_port

from tests.support import nim_body, run_server


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


@pytest.fixture(scope="module")
def chunk_server(tmp_path_factory, tiny_model_dir):
    args = ["--model", f"tiny={tiny_model_dir}", "--max-body-bytes", str(8 * 1024 * 1024), "--threads", "1"]
    with run_server(args, tmp_path_factory.mktemp("chunk-server")) as server:
        yield server


def test_the_chunk_amplification_request_is_bounded(chunk_server):
    """A query near the window plus a 1 MB passage under CHUNK once ran for minutes and kept 12 GB:
    now the query is cut to half the window, the passage to the chunk cap, and memory comes back."""
    query = " ".join(["paris"] * 120)  # about the whole 128-token window
    passage = " ".join(["berlin", "river", "water"] * 100_000)[: 1024 * 1024]
    pid = chunk_server.proc.pid
    with chunk_server.client() as c:
        c.post("/v1/ranking", json=nim_body("q", ["warm up"]))
        before = rss_mib(pid)
        t0 = time.monotonic()
        r = c.post("/v1/ranking", json=nim_body(query, [passage], truncate="CHUNK"))
        elapsed = time.monotonic() - t0
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["prompt_tokens"] <= 16 * 128  # at most 16 windows of the model's size
        assert elapsed < 30
        small = c.post("/v1/ranking", json=nim_body("q", ["a"]))
        assert small.status_code == 200
        after = rss_mib(pid)
        # asking for more chunks than the server allows is a clear 400 naming the limit
        r = c.post("/v1/ranking", json=nim_body(query, [passage], truncate="CHUNK", max_chunks_per_passage=64))
        assert r.status_code == 400 and "--max-chunks-per-passage" in r.json()["message"]
    assert after - before < 150, f"RSS {before:.0f} MiB -> {after:.0f} MiB"


#: The limits of the test below, as flags or as the environment variables that set them instead.
_AS_FLAGS = (["--max-request-tokens", "500", "--max-chunks-per-request", "20"], {},
             {"tokens": "(--max-request-tokens)", "chunks": "(--max-chunks-per-request)"})
_AS_VARIABLES = ([], {"OPENRERANK_MAX_REQUEST_TOKENS": "500", "OPENRERANK_MAX_CHUNKS_PER_REQUEST": "20"},
                 {"tokens": "(OPENRERANK_MAX_REQUEST_TOKENS='500')",
                  "chunks": "(OPENRERANK_MAX_CHUNKS_PER_REQUEST='20')"})


@pytest.mark.parametrize(("flags", "env", "named"), [_AS_FLAGS, _AS_VARIABLES], ids=["flags", "variables"])
def test_a_request_over_the_token_budget_is_refused_naming_the_limit(tmp_path, tiny_model_dir, flags, env, named):
    """Each refusal names its limit as the operator set it: a limit set by a variable was named by a flag nobody
    typed (`--max-request-tokens`)."""
    relative = os.path.relpath(tiny_model_dir)  # the server runs in this process's working directory
    args = ["--model", f"tiny={relative}", *flags, "--threads", "1"]
    with run_server(args, tmp_path, env=env) as server, server.client() as c:
        ok = c.post("/v1/ranking", json=nim_body("q", ["a b c"] * 8))
        assert ok.status_code == 200
        r = c.post("/v1/ranking", json=nim_body("q", ["paris " * 100] * 8, truncate="END"))
        assert r.status_code == 400 and named["tokens"] in r.json()["message"], r.text
        r = c.post("/rerank", json={"query": "q", "texts": ["paris " * 100] * 8})
        assert r.status_code == 422 and named["tokens"] in r.json()["error"], r.text
        long = "berlin " * 2000
        r = c.post("/v1/ranking", json=nim_body("q", [long, long], truncate="CHUNK"))
        assert r.status_code == 400 and named["chunks"] in r.json()["message"], r.text
        assert re.search(r"would score \d+ chunks", r.json()["message"])  # one slice: counted whole
        # refused after its first slice of 64 passages: the count is of that slice, and says so
        r = c.post("/v1/ranking", json=nim_body("q", ["berlin " * 300] * 70, truncate="CHUNK"))
        assert r.status_code == 400 and "would score at least" in r.json()["message"], r.text[:300]
        meta = c.get("/v1/metadata").json()
        assert meta["limits"]["max_request_tokens"] == 500
        # a local folder by its name only: clients learn nothing of the server's filesystem layout
        assert meta["models"][0]["source"] == meta["modelInfo"][0]["modelUrl"] == Path(relative).name


def test_a_timeout_names_the_nim_variable_that_set_it_and_a_flag_its_flag(tmp_path, tiny_model_dir):
    """NIM_REQUEST_TIMEOUT_S=0.02 answered "request timed out after 0.02 s (--request-timeout)", a flag the operator
    never typed; a limit given as a flag in the same start is still named by its flag."""
    args = ["--model", f"tiny={tiny_model_dir}", "--max-chunks-per-passage", "4", "--threads", "1"]
    with run_server(args, tmp_path, env={"NIM_REQUEST_TIMEOUT_S": "0.000001"}) as server, server.client() as c:
        timed_out = c.post("/v1/ranking", json=nim_body("q", ["paris"] * 20))
        chunks = c.post("/v1/ranking", json=nim_body("q", ["paris"], truncate="CHUNK", max_chunks_per_passage=8))
    assert timed_out.status_code == 504, timed_out.text
    assert timed_out.json()["message"] == "request timed out after 1e-06 s (NIM_REQUEST_TIMEOUT_S='0.000001')"
    assert chunks.status_code == 400 and "(--max-chunks-per-passage)" in chunks.json()["message"], chunks.text


def read_all(sock: socket.socket) -> bytes:
    chunks = []
    while chunk := sock.recv(4096):
        chunks.append(chunk)
    return b"".join(chunks)


def test_slow_headers_and_bodies_are_cut_off(tmp_path, tiny_model_dir):
    args = ["--model", f"tiny={tiny_model_dir}", "--header-timeout", "1", "--body-timeout", "1", "--threads", "1"]
    with run_server(args, tmp_path) as server:
        with socket.create_connection(("127.0.0.1", server.port)) as sock:
            sock.sendall(b"POST /v1/ranking HTTP/1.1\r\nhost: x\r\n")  # ... and never the rest
            sock.settimeout(10)
            answer = read_all(sock)  # then closed
            assert answer.startswith(b"HTTP/1.1 408")
            body = json.loads(answer.split(b"\r\n\r\n", 1)[1])  # in the path's dialect, as the 431 is
            assert body["object"] == "error" and "--header-timeout" in body["message"], answer
        with socket.create_connection(("127.0.0.1", server.port)) as sock:
            sock.sendall(b"POST /v1/rerank HTTP/1.1\r\n")
            sock.settimeout(10)
            assert json.loads(read_all(sock).split(b"\r\n\r\n", 1)[1]).keys() == {"message", "detail"}  # Cohere/Jina
        with socket.create_connection(("127.0.0.1", server.port)) as sock:
            sock.sendall(b"POST /v1/ran")  # not even the whole request line: no dialect to answer in
            sock.settimeout(10)
            answer = read_all(sock)
            assert answer.startswith(b"HTTP/1.1 408") and answer.endswith(b"request headers not received in time\n")
        with socket.create_connection(("127.0.0.1", server.port)) as sock:
            sock.sendall(b"POST /v1/ranking HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                         b"content-length: 1000\r\n\r\n{\"query\":")  # declares more than it sends
            sock.settimeout(10)
            answer = read_all(sock)
            assert answer.startswith(b"HTTP/1.1 408") and b"--body-timeout" in answer
        with httpx.Client(base_url=server.url) as c:  # a normal client is unaffected
            assert c.post("/v1/ranking", json=nim_body("q", ["a"])).status_code == 200


def test_requests_answered_before_the_app_has_them_are_counted_and_logged(tmp_path, tiny_model_dir):
    """An unreadable request (400), headers over the limit (431), a stalled head (408), a transfer coding it
    cannot read (501): answered by the connection's guard, but in no metric, and the log had only uvicorn's
    bare "Invalid HTTP request received." at WARNING, with no path, client or reason."""
    from prometheus_client.parser import text_string_to_metric_families

    args = ["--model", f"tiny={tiny_model_dir}", "--threads", "1", "--max-header-bytes", "8192",
            "--header-timeout", "1"]
    sends = [b"garbage\r\n\r\n", b"GET /v1/models HTTP/1.1\r\nhost: x\r\nx-pad: " + b"a" * 9000 + b"\r\n\r\n",
             b"POST /v1/ranking HTTP/1.1\r\nhost: x\r\n",
             b"POST /v1/rerank HTTP/1.1\r\nhost: x\r\ntransfer-encoding: gzip, chunked\r\n\r\n"]
    with run_server(args, tmp_path) as server:
        answers = []
        for data in sends:
            with socket.create_connection(("127.0.0.1", server.port)) as sock:
                sock.sendall(data)
                sock.settimeout(10)
                answers.append(read_all(sock)[:12])
        metrics = httpx.get(f"{server.url}/metrics", timeout=30).text
        output = server.output()
    assert answers == [b"HTTP/1.1 400", b"HTTP/1.1 431", b"HTTP/1.1 408", b"HTTP/1.1 501"]
    counted = {(s.labels["route"], s.labels["status"]): s.value for f in text_string_to_metric_families(metrics)
               if f.name == "openrerank_requests" for s in f.samples if s.name == "openrerank_requests_total"}
    refused = {("unmatched", "400"): 1.0, ("/v1/models", "431"): 1.0, ("/v1/ranking", "408"): 1.0,
               ("/v1/rerank", "501"): 1.0}  # an unreadable request has no route: "unmatched", as an unknown path
    assert {k: v for k, v in counted.items() if not k[0].startswith(("/v1/health", "/metrics"))} == refused
    lines = [line for line in output.splitlines() if "openrerank.access" in line and " - " in line]
    assert len(lines) == 4 and all("reason=" in line and "client=" in line for line in lines), lines
    assert "Invalid HTTP request received" not in output


def serve_exit(args: list[str], timeout: float = 120) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "openrerank", "serve", "--port", str(free_port()), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env={"HF_HUB_OFFLINE": "1",
                          "PATH": "/usr/bin:/bin", "OPENRERANK_CACHE_DIR": str(Path.home() / ".cache" / "none")})


def test_a_model_that_cannot_load_makes_serve_exit_with_one_clear_line(tmp_path, tiny_model_dir):
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in tiny_model_dir.iterdir():
        data = f.read_bytes()
        (broken / f.name).write_bytes(data[: len(data) // 3] if f.suffix == ".safetensors" else data)
    done = serve_exit(["--model", f"broken={broken}", "--backend", "torch"])
    assert done.returncode == 3, done.stderr[-2000:]
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("openrerank: error: model broken could not be loaded:"), last
    # with several models, --allow-partial serves the ones that load
    args = ["--model", f"broken={broken}", "--model", f"tiny={tiny_model_dir}", "--allow-partial",
            "--backend", "torch", "--threads", "1"]
    with run_server(args, tmp_path) as server, server.client() as c:
        assert [m["id"] for m in c.get("/v1/models").json()["data"]] == ["tiny"]
        assert "1 model(s) failed to load" in c.get("/v1/health/ready").json()["message"]
        assert c.post("/v1/ranking", json=nim_body("q", ["a"], model="broken")).status_code == 404


@pytest.mark.parametrize(("flag", "value"), [("--max-queue", "-1"), ("--max-padding", "1.5"),
                                              ("--request-timeout", "0"), ("--max-chunks-per-passage", "0"),
                                              ("--cors-allow-origin", "rag.example.com")])
def test_nonsense_settings_are_refused_before_anything_loads(flag, value):
    done = serve_exit([flag, value], timeout=60)
    assert done.returncode == 2
    assert f"{flag} " in done.stderr and "must" in done.stderr


def test_headers_past_the_limit_get_431_in_the_dialect_shape(tmp_path, tiny_model_dir):
    """uvicorn's httptools protocol read headers of any size (1, 8, 32 MB all got 200)."""
    args = ["--model", f"tiny={tiny_model_dir}", "--max-header-bytes", "8192", "--threads", "1"]
    with run_server(args, tmp_path) as server, httpx.Client(base_url=server.url, timeout=60) as c:
        body = nim_body("q", ["a"])
        assert c.post("/v1/ranking", json=body, headers={"x-pad": "a" * 7000}).status_code == 200
        r = c.post("/v1/ranking", json=body, headers={"x-pad": "a" * 9000})
        assert r.status_code == 431 and r.json()["object"] == "error" and "--max-header-bytes" in r.json()["message"]
        r = c.post("/v1/rerank", json={"query": "q", "documents": ["a"]}, headers={"x-pad": "a" * 9000})
        assert r.status_code == 431 and set(r.json()) == {"message", "detail"}  # Cohere/Jina shape
        # 8 MB of headers: answered 431 once past the limit, the rest dropped unparsed
        with socket.create_connection(("127.0.0.1", server.port)) as sock:
            sock.settimeout(30)

            def flood() -> None:
                with contextlib.suppress(OSError):  # the server closes while we may still be sending
                    sock.sendall(b"GET /v1/models HTTP/1.1\r\nhost: x\r\nx-pad: " + b"a" * (8 << 20))

            sender = threading.Thread(target=flood, daemon=True)
            sender.start()
            answer = read_all(sock)
            sender.join(30)
            assert answer.startswith(b"HTTP/1.1 431"), answer[:200]
            assert b"--max-header-bytes" in answer
        assert c.get("/v1/models").status_code == 200  # the server is fine


def test_openapi_declares_the_limits_this_server_enforces(tiny_model_dir):
    """The served OpenAPI document states non-empty lists and the --max-passages / --max-inputs bounds (and the
    chunk counts a request may ask for) as this server was started with; a client generating requests from it
    (Schemathesis, SDK validators) learns them before a 400 does."""
    from openrerank.server.config import ServerConfig
    from tests.server.faults import InProcessServer

    config = ServerConfig(models=[f"tiny={tiny_model_dir}"], backend="torch", threads=1, max_passages=8,
                          max_inputs=5, max_chunks_per_passage=7)
    with InProcessServer(config) as server, server.client() as c:
        schemas = c.get("/openapi.json").json()["components"]["schemas"]

        def branches(name: str, field: str, kind: str) -> list[dict]:
            prop = schemas[name]["properties"][field]
            found = [b for b in [prop, *prop.get("anyOf", [])] if b.get("type") == kind]
            assert found, (name, field, prop)
            return found

        for name, field in [("NimRankingRequest", "passages"), ("CohereV1RerankRequest", "documents"),
                            ("CohereV2RerankRequest", "documents"), ("TeiRerankRequest", "texts"),
                            ("InfinityRerankRequest", "documents"), ("ScoreRequest", "text_2")]:
            for b in branches(name, field, "array"):
                assert (b.get("minItems"), b.get("maxItems")) == (1, 8), (name, field, b)
        for name in ("EmbeddingsRequest", "MultiVectorRequest"):
            for b in branches(name, "input", "array"):
                assert (b.get("minItems"), b.get("maxItems")) == (1, 5), (name, b)
        assert branches("NimRankingRequest", "max_chunks_per_passage", "integer")[0]["maximum"] == 7
        # what the document states is what the server enforces
        assert c.post("/v1/ranking", json=nim_body("q", ["a"] * 8)).status_code == 200
        assert c.post("/v1/ranking", json=nim_body("q", ["a"] * 9)).status_code == 400


def test_openapi_declares_the_multi_vector_routes_own_bound():
    """/v1/embeddings/multi_vector refuses more texts than its own bound (413) even under a higher --max-inputs;
    its `input` declared no maxItems at all."""
    from fastapi.testclient import TestClient

    from openrerank.server.app import create_app
    from openrerank.server.config import ServerConfig
    from openrerank.server.dialects.multi_vector import MAX_INPUTS

    config = ServerConfig(models=["default"], max_inputs=MAX_INPUTS * 2)
    with TestClient(create_app(config, load_models=False)) as c:
        prop = c.get("/openapi.json").json()["components"]["schemas"]["MultiVectorRequest"]["properties"]["input"]
    arrays = [b for b in prop["anyOf"] if b.get("type") == "array"]
    assert [(b["minItems"], b["maxItems"]) for b in arrays] == [(1, MAX_INPUTS)]


def test_an_oversize_body_gets_its_413_while_the_client_is_still_sending_it(tmp_path, tiny_model_dir):
    """The 413 goes out before the body is read. Closing the connection then, with the client's bytes
    unread, reset it, and httpx's async client (the OpenAI and Cohere SDKs' async clients) lost the answer
    to a ReadError every time. The server now reads and drops the rest of the body before it closes."""
    args = ["--model", f"tiny={tiny_model_dir}", "--max-body-bytes", str(1 << 20), "--threads", "1"]
    big = b'{"query": {"text": "q"}, "passages": [' + b'{"text": "word"}, ' * (1 << 20) + b'{"text": "x"}]}'
    assert len(big) > 16 << 20  # far more than the socket buffers hold: the client is mid-send at the 413
    json_type = {"content-type": "application/json"}

    async def chunked():  # no Content-Length: the limit is found while streaming
        for start in range(0, len(big), 1 << 16):
            yield big[start:start + (1 << 16)]

    async def send_all(url: str) -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=url, timeout=60) as c:
            return [await c.post("/v1/ranking", content=big, headers=json_type),
                    await c.post("/v1/rerank", content=chunked(), headers=json_type),
                    await c.post("/v1/ranking", json=nim_body("q", ["a"]))]

    with run_server(args, tmp_path) as server:
        for attempt in range(3):
            declared, streamed, fine = asyncio.run(send_all(server.url))
            assert declared.status_code == 413 and "--max-body-bytes" in declared.json()["message"], attempt
            assert streamed.status_code == 413 and set(streamed.json()) == {"message", "detail"}, attempt  # Cohere/Jina
            assert fine.status_code == 200
        with httpx.Client(base_url=server.url, timeout=60) as c:  # the sync client read it before too
            assert c.post("/v1/ranking", content=big, headers=json_type).status_code == 413

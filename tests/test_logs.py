"""Operator-facing logs: one format for ours and uvicorn's, JSON lines, access lines with the request id,
and the ready line only once the model is loaded and warmed."""

from __future__ import annotations

import json
import logging
import subprocess
import sys

from fastapi.testclient import TestClient

from openrerank.observe.logs import JsonFormatter, TextFormatter
from openrerank.server.app import create_app
from openrerank.server.config import ServerConfig
from openrerank.server.middleware import UNMATCHED_PATH_CHARS
from tests.server.faults import until
from tests.support import nim_body, run_server


def _record(msg: str, **fields) -> logging.LogRecord:
    rec = logging.LogRecord("openrerank.access", logging.INFO, __file__, 1, msg, (), None)
    rec.fields = fields
    return rec


def test_text_format_appends_fields_json_format_nests_nothing():
    rec = _record("POST /v1/ranking 200", model="m", passages=2, queue_ms=1.23456, missing=None)
    text = TextFormatter().format(rec)
    assert text.endswith("INFO openrerank.access: POST /v1/ranking 200 model=m passages=2 queue_ms=1.23")
    doc = json.loads(JsonFormatter().format(rec))
    assert doc["message"] == "POST /v1/ranking 200" and doc["model"] == "m" and doc["queue_ms"] == 1.235
    assert "missing" not in doc and doc["level"] == "INFO" and doc["ts"].endswith("Z")


def test_json_logs_access_lines_and_request_ids(tmp_path, tiny_model_dir):
    with run_server(["--model", f"tiny={tiny_model_dir}", "--log-format", "json"], tmp_path) as server:
        with server.client() as c:
            given = c.post("/v1/ranking", json=nim_body("paris", ["a", "b", "c"]),
                           headers={"x-request-id": "trace-42"})
            made = c.post("/v1/ranking", json={"bad": 1})
            c.get("/v1/health/ready")
        generated = made.headers["x-request-id"]
        # A request's access line is written once its response has gone out: the client can be first.
        until(lambda: all(f'"request_id":"{rid}"' in server.output() for rid in ("trace-42", generated)),
              "both requests' access lines")
        log_text = server.output()
    assert given.headers["x-request-id"] == "trace-42"
    assert len(generated) >= 16 and generated != "trace-42"
    lines = [json.loads(line) for line in log_text.splitlines() if line.strip()]  # every line is JSON
    assert {"ts", "level", "logger", "message"} <= set(lines[0])
    assert any(line["logger"].startswith("uvicorn") for line in lines)  # uvicorn's lines share the format
    assert not any("Uvicorn running" in line["message"] for line in lines)
    access = [line for line in lines if line["logger"] == "openrerank.access"]
    ok = next(line for line in access if line["request_id"] == "trace-42")
    assert ok["method"] == "POST" and ok["route"] == "/v1/ranking" and ok["status"] == 200
    assert ok["model"] == "tiny" and ok["passages"] == 3 and ok["tokens"] > 0
    assert ok["queue_ms"] >= 0 and ok["inference_ms"] > 0 and ok["level"] == "INFO"
    bad = next(line for line in access if line["request_id"] == generated)
    assert bad["status"] == 400 and "model" not in bad
    assert not any(line["route"] == "/v1/health/ready" for line in access)  # probes only at debug
    messages = [line["message"] for line in lines]
    ready = next(i for i, m in enumerate(messages) if m.startswith("ready: serving tiny"))
    loaded = next(i for i, m in enumerate(messages) if m.startswith("loaded "))
    assert loaded < ready < messages.index(ok["message"])
    assert messages[ready].endswith("; no API key: every route is open)")  # an open server says so at start


def test_transformers_lines_come_out_as_json_and_its_noise_is_dropped():
    """In the torch-free image transformers would print plain-text `[transformers] PyTorch was not found`
    and (for a BERT bi-encoder) `loss_type=None ... ForCausalLMLoss` among the JSON lines."""
    script = """
import sys
sys.modules["torch"] = None  # as in the container image
from openrerank.observe.logs import configure_logging
configure_logging("info", "json")
import transformers
from transformers.utils import logging as hf
hf.get_logger("transformers.modeling_utils").warning(
    "`loss_type=None` was set in the config but it is unrecognized. Using the default loss: `ForCausalLMLoss`.")
hf.get_logger("transformers.tokenization_utils_base").warning("a tokenizer warning")
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    lines = [json.loads(line) for line in done.stderr.splitlines() if line.strip()]  # every line is JSON
    assert [(r["logger"], r["message"]) for r in lines] == [
        ("transformers.tokenization_utils_base", "a tokenizer warning")]


def test_an_upgrade_offer_uvicorns_h11_protocol_ignores_is_not_warned_of_per_request():
    """Without httptools `serve` runs uvicorn's h11 protocol, which warned twice for each request offering an
    upgrade the server ignores (h2c; a websocket under ws="none"), the second telling to install a WebSocket
    library. The request is served and logged as any other."""
    script = """
import asyncio, socket, threading, time
import uvicorn
from openrerank.observe.logs import configure_logging
configure_logging("info", "text")
async def app(scope, receive, send):
    if scope["type"] == "http":
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
        await send({"type": "http.response.body", "body": b"ok"})
sock = socket.socket()
sock.bind(("127.0.0.1", 0))
server = uvicorn.Server(uvicorn.Config(app, log_config=None, lifespan="off", http="h11", ws="none"))
threading.Thread(target=lambda: asyncio.run(server.serve([sock])), daemon=True).start()
while not server.started:
    time.sleep(0.02)
for offer in (b"websocket", b"h2c"):
    with socket.create_connection(sock.getsockname()) as client:
        client.sendall(b"GET / HTTP/1.1\\r\\nhost: x\\r\\nconnection: upgrade, close\\r\\nupgrade: " + offer
                       + b"\\r\\nsec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\\r\\n"
                       + b"sec-websocket-version: 13\\r\\n\\r\\n")
        print(client.recv(100)[:12].decode())
server.should_exit = True
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["HTTP/1.1", "200", "HTTP/1.1", "200"], done.stdout
    assert "WARNING" not in done.stderr and "upgrade" not in done.stderr.lower(), done.stderr


def test_text_field_values_cannot_end_their_line_or_field():
    rec = _record("POST /v1/ranking 400", reason='model "x\nEVIL INFO forged\u2028y" k=v', model="m", empty="")
    text = TextFormatter().format(rec)
    assert "\n" not in text and "\u2028" not in text
    assert text.endswith(r'reason="model \"x\nEVIL INFO forged\u2028y\" k=v" model=m empty=""')


def test_a_client_cannot_write_a_line_of_the_text_log(tmp_path, tiny_model_dir):
    """A model name the client chose is quoted in the error the access line carries (`reason=`)."""
    forged = "x\n2026-12-06T12:00:00.000Z INFO openrerank.access: POST /v1/ranking 200 request_id=forged"
    with run_server(["--model", f"tiny={tiny_model_dir}"], tmp_path) as server:  # --log-format text: default
        with server.client() as c:
            answer = c.post("/v1/ranking", json={**nim_body("q", ["p"]), "model": forged})
        until(lambda: f"request_id={answer.headers['x-request-id']}" in server.output(), "the access line")
        lines = server.output().splitlines()
    assert answer.status_code == 404
    assert not any(line.startswith("2026-12-06T12:00:00.000Z") for line in lines)
    assert not any("request_id=forged" in line and "\\n" not in line for line in lines)


def test_access_lines_say_an_unmatched_path_and_the_tokenize_time(tiny_model_dir, caplog):
    """`GET unmatched 404` did not say which path a client asked for, and a scored request's line left out its
    tokenization (up to 80% of its time): now `path=` (unmatched routes only, cut and escaped: a client chose
    it) and `tokenize_ms=`. Metric labels stay `unmatched`."""
    caplog.set_level(logging.INFO, "openrerank.access")
    with TestClient(create_app(ServerConfig(models=[f"tiny={tiny_model_dir}"]), wait_for_models=True)) as c:
        assert c.post("/v1/ranking", json=nim_body("paris", ["a", "b"])).status_code == 200
        assert c.get("/v1/rankings").status_code == 404
        assert c.get("/forged%0A2026-12-06T12:00:00.000Z INFO x" + "/long" * 100).status_code == 404
        metrics = c.get("/v1/metrics").text
    lines: dict[str, list[logging.LogRecord]] = {}
    for r in caplog.records:
        if r.name == "openrerank.access":
            lines.setdefault(r.getMessage(), []).append(r)
    scored, = lines["POST /v1/ranking 200"]
    assert scored.fields["tokenize_ms"] > 0 and scored.fields["path"] is None
    asked, forged = lines["GET unmatched 404"]
    assert asked.fields["path"] == "/v1/rankings"
    assert len(forged.fields["path"]) == UNMATCHED_PATH_CHARS and forged.fields["path"].startswith("/forged\n")
    text = TextFormatter().format(forged)
    assert "\n" not in text and 'path="/forged\\n2026' in text
    assert "/v1/rankings" not in metrics and 'route="unmatched"' in metrics

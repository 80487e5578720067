"""App-level behaviour that needs no model: readiness before loading, error shapes, metric labels."""

from __future__ import annotations

import asyncio
import threading

import numpy as np
import pytest
from fastapi.testclient import TestClient

from openrerank.engine.loading import LoadOptions, load_model
from openrerank.engine.scheduler import Scheduler, SchedulerConfig
from openrerank.engine.served import ServedModel
from openrerank.runtimes.heap import HEAP
from openrerank.server.app import create_app, route_paths
from openrerank.server.config import ServerConfig
from openrerank.server.errors import MAX_MESSAGE_CHARS
from openrerank.server.middleware import HeadMiddleware
from openrerank.server.request_messages import MAX_ERRORS_READ, format_validation_errors
from openrerank.wire.nim import NimRankingRequest
from tests.support import nim_body


def test_not_ready_until_models_load():
    app = create_app(ServerConfig(models=["default"]), load_models=False)
    with TestClient(app) as c:
        assert c.get("/v1/health/live").status_code == 200
        ready = c.get("/v1/health/ready")
        assert ready.status_code == 503
        assert ready.json()["status"] == "not ready"
        r = c.post("/v1/ranking", json=nim_body("q", ["a"]))
        assert r.status_code == 503
        assert r.json()["object"] == "error"
        assert "Retry-After" in r.headers
        # listed before loading, so clients that ask /v1/models first still see the id
        assert [m["id"] for m in c.get("/v1/models").json()["data"]] == ["sentence-transformers/all-MiniLM-L6-v2"]


def test_wait_for_models_is_ready_at_startup(tiny_model_dir):
    """Under Ray Serve a replica is ready when the lifespan startup ends: models must be loaded by then."""
    app = create_app(ServerConfig(models=[f"tiny={tiny_model_dir}"]), wait_for_models=True)
    with TestClient(app) as c:
        assert c.get("/v1/health/ready").status_code == 200  # no polling: loaded and warmed up
        assert c.post("/v1/ranking", json=nim_body("q", ["a", "b"])).status_code == 200


def test_the_readiness_probes_say_503_once_the_server_drains(tiny_model_dir):
    """A probe on a keep-alive connection opened before SIGTERM must not see a draining server as ready."""
    app = create_app(ServerConfig(models=[f"tiny={tiny_model_dir}"]), wait_for_models=True)
    with TestClient(app) as c:
        assert c.get("/v1/health/ready").status_code == 200 and c.get("/health").status_code == 200
        c.portal.call(app.state.drain.begin)  # on the app's event loop, as the HTTP runner calls it
        ready, tei = c.get("/v1/health/ready"), c.get("/health")
        assert ready.status_code == 503 and ready.json()["message"] == "Service is shutting down."
        assert tei.status_code == 503 and tei.json()["error"] == "unhealthy: Service is shutting down."
        assert c.get("/v1/health/live").status_code == 200  # alive: finishing its requests


def test_wait_for_models_fails_the_startup_on_a_load_error(tmp_path):
    app = create_app(ServerConfig(models=[f"broken={tmp_path / 'missing'}"]), wait_for_models=True)
    with pytest.raises(RuntimeError, match=r"model loading failed: .*missing"), TestClient(app):
        pass


def test_route_paths_cover_included_routers():
    paths = route_paths(create_app(load_models=False))
    assert {"/v1/ranking", "/v1/models", "/v1/health/ready", "/v1/metrics"} <= paths


def test_validation_message_names_allowed_fields():
    errors = [{"type": "extra_forbidden", "loc": ("body", "top_n"), "msg": "Extra inputs are not permitted"},
              {"type": "missing", "loc": ("body", "query"), "msg": "Field required"}]
    msg = format_validation_errors(errors, NimRankingRequest)
    assert msg.startswith("Unknown field(s) 'top_n'; allowed fields are: model, query, passages, truncate")
    assert "field 'query' is required" in msg


def test_a_validation_message_reads_a_bounded_number_of_errors():
    """600k errors made a 6.5 MB message (a second's work) to send its first 2,000 characters."""
    errors = [{"type": "missing", "loc": ("body", f"f{i}"), "msg": "Field required"} for i in range(1000)]
    msg = format_validation_errors(errors, NimRankingRequest)
    assert msg.count("is required") == MAX_ERRORS_READ and msg.endswith(f"; and {1000 - MAX_ERRORS_READ} more errors")


def test_a_passage_too_big_for_device_memory_is_503_and_spares_the_others(tiny_model_dir):
    """One sequence that does not fit in device memory even alone: its request gets a 503 in the dialect's
    error shape, the rest of the batch is still scored (the runtime splits, the scheduler fails only it)."""
    torch = pytest.importorskip("torch")

    class OutOfMemoryAbove(torch.nn.Module):
        def __init__(self, inner, max_width: int) -> None:
            super().__init__()
            self.inner, self.max_width = inner, max_width

        def forward(self, *inputs):
            if inputs[0].shape[1] > self.max_width:
                raise torch.OutOfMemoryError("fake: too wide for this device")
            return self.inner(*inputs)

    loaded = load_model(str(tiny_model_dir), LoadOptions(backend="torch", threads=1))
    loaded.scorer.runtime.module = OutOfMemoryAbove(loaded.scorer.runtime.module, max_width=40)
    served = ServedModel("tiny", loaded, Scheduler(loaded.scorer, SchedulerConfig(), name="tiny"))
    short = ["alpha beta", "gamma delta epsilon"]
    app = create_app(ServerConfig(models=[f"tiny={tiny_model_dir}"]), load_models=False)
    with TestClient(app) as c:
        app.state.models.add(served)
        app.state.models.loaded = True
        r = c.post("/v1/ranking", json=nim_body("q", [*short, " ".join(["alpha"] * 80)], truncate="END"))
        assert r.status_code == 503
        assert r.json()["object"] == "error" and "out of memory" in r.json()["message"]
        ok = c.post("/v1/ranking", json=nim_body("q", short))
        assert ok.status_code == 200
        scores = [x["logit"] for x in sorted(ok.json()["rankings"], key=lambda x: x["index"])]
        np.testing.assert_allclose(scores, loaded.score("q", short), rtol=0, atol=1e-5)


# (path, the keys of its dialect's error body): every route whose body FastAPI parses into a model
EMPTY_BODY_SHAPES = [("/v1/ranking", {"object", "message", "type"}), ("/v1/rerank", {"message", "detail"}),
                     ("/v2/rerank", {"message"}), ("/v1/score", {"object", "message", "type", "param", "code"}),
                     ("/score", {"object", "message", "type", "param", "code"}),
                     ("/v1/embeddings", {"object", "message", "type"}),
                     ("/v1/embeddings/multi_vector", {"object", "message", "type"})]


@pytest.mark.parametrize(("path", "keys"), EMPTY_BODY_SHAPES, ids=[p for p, _ in EMPTY_BODY_SHAPES])
def test_an_empty_body_is_named_as_such_in_the_dialect_shape(path, keys):
    """FastAPI reports a missing body at location ("body",): stripped of "body", it read "field '' is required"."""
    with TestClient(create_app(ServerConfig(models=["default"]), load_models=False)) as c:
        r = c.post(path, content=b"", headers={"content-type": "application/json"})
    assert r.status_code == 400, r.text
    assert set(r.json()) == keys and r.json()["message"] == "request body is empty: send a JSON object"


def error_message(answer) -> str:
    """The message of an error answer in any dialect's shape."""
    body = answer.json()
    said = body.get("message", body.get("error"))
    return said["message"] if isinstance(said, dict) else said


# every route that takes a JSON body: FastAPI's and `list_bounds`' parse (the standard library), or TEI's own (orjson)
BODY_ROUTES = [path for path, _ in EMPTY_BODY_SHAPES] + ["/embed", "/embeddings", "/rerank", "/", "/invocations"]


@pytest.mark.parametrize("path", BODY_ROUTES)
def test_a_body_that_is_not_json_is_told_where_it_broke_on_every_route(path):
    """The routes the standard library parses said "request body is not valid JSON: Invalid control character
    at", the sentence cut where its position was, which orjson's routes gave."""
    with TestClient(create_app(ServerConfig(models=["default"]), load_models=False)) as c:
        r = c.post(path, content=b'{"query":"a\x01b"}', headers={"content-type": "application/json"})
    assert r.status_code in (400, 422), r.text
    assert error_message(r).startswith("request body is not valid JSON: "), r.text
    assert error_message(r).endswith("line 1 column 12 (char 11)"), r.text


@pytest.mark.parametrize("path", BODY_ROUTES)
def test_a_number_over_the_digit_limit_is_named(path):
    """Python's JSON parser refuses an integer of more than 4,300 digits with a ValueError, not a JSON error:
    the answer was a bare "request body is not valid JSON". orjson's (TEI's routes) said "number is infinity
    when parsed as double"."""
    with TestClient(create_app(ServerConfig(models=["default"]), load_models=False)) as c:
        r = c.post(path, content=b'{"n": ' + b"1" * 4400 + b"}", headers={"content-type": "application/json"})
    assert error_message(r) == "request body holds a number of more than 4300 digits, too long to read", r.text


@pytest.mark.parametrize("path", BODY_ROUTES)
def test_an_empty_or_too_deep_body_is_told_so_in_one_wording_on_every_route(path):
    """TEI's routes, which parse with orjson, said "Input is a zero-length, empty document: line 1 column 1
    (char 0)" and "depth limit exceeded: line 1 column 1026 (char 1025)" where every other route named them."""
    told = {b"": "request body is empty: send a JSON object",
            b"  ": "request body is not valid JSON: Expecting value: line 1 column 3 (char 2)",
            b"[" * 3000 + b"]" * 3000: "request body is nested too deeply to parse"}
    with TestClient(create_app(ServerConfig(models=["default"]), load_models=False)) as c:
        for body, message in told.items():
            r = c.post(path, content=body, headers={"content-type": "application/json"})
            assert r.status_code in (400, 422) and error_message(r) == message, (body[:4], r.text)


@pytest.mark.parametrize("public", [False, True])
def test_metrics_public_opens_the_scrape_route_only(public):
    """With --api-key, a Prometheus that scrapes by pod annotation (no key) needs --metrics-public."""
    app = create_app(ServerConfig(models=["default"], api_key="k", metrics_public=public), load_models=False)
    with TestClient(app) as c:
        for path in ("/v1/metrics", "/metrics"):
            assert c.get(path).status_code == (200 if public else 401)
        assert c.get("/v1/metrics", headers={"Authorization": "Bearer k"}).status_code == 200
        assert c.get("/v1/metadata").status_code == 401  # everything else still needs the key
        assert c.post("/v1/ranking", json=nim_body("q", ["a"])).status_code == 401


@pytest.mark.parametrize("keys", [("wrong", "k"), ("k", "wrong"), ("k", "k")])
def test_two_authorization_lines_never_authenticate(keys):
    """The key check read the last line and Starlette, TEI and vLLM the first: wrong-then-right got in."""
    app = create_app(ServerConfig(models=["default"], api_key="k"), load_models=False)
    with TestClient(app) as c:
        r = c.get("/v1/metadata", headers=[("authorization", f"Bearer {key}") for key in keys])
        assert r.status_code == 401 and "2 Authorization headers" in r.json()["message"]
        assert c.get("/v1/metadata", headers={"Authorization": "Bearer k"}).status_code == 200


def test_metadata_names_a_local_folder_by_its_name_only(tiny_model_dir):
    """Unauthenticated clients must not learn the server's filesystem layout from /v1/metadata."""
    app = create_app(ServerConfig(models=[f"tiny={tiny_model_dir}"]), wait_for_models=True)
    with TestClient(app) as c:
        resp = c.get("/v1/metadata")
    assert str(tiny_model_dir.parent) not in resp.text
    assert resp.json()["models"][0]["source"] == tiny_model_dir.name


def test_access_lines_say_why_a_request_failed_which_asset_and_what_was_embedded(caplog):
    """Access lines for errors carry the reason the client got; Swagger UI's files log under their mount, not
    `unmatched`; an embeddings request counts texts, not passages."""
    app = create_app(ServerConfig(models=["default"], api_key="k"), wait_for_models=True)
    auth = {"Authorization": "Bearer k"}
    with caplog.at_level("DEBUG", logger="openrerank.access"), TestClient(app) as c:
        assert c.post("/v1/ranking", json=nim_body("q", ["a"])).status_code == 401
        assert c.post("/v1/ranking", json={"query": "q"}, headers=auth).status_code in (400, 422)
        assert c.get("/docs-assets/swagger-ui.css").status_code == 200
        assert c.post("/v1/embeddings", json={"input": ["a", "b"], "model": "sentence-transformers/all-MiniLM-L6-v2"},
                      headers=auth).status_code == 200
        assert c.get("/v1/models/sentence-transformers/all-MiniLM-L6-v2", headers=auth).status_code == 200
    lines = [r.fields for r in caplog.records if r.name == "openrerank.access"]
    unauthorized, invalid, asset, embedded, card = lines[-5:]
    assert card["route"] == "/v1/models/{model_id:path}"  # a route with a parameter: its template, not `unmatched`
    assert unauthorized["status"] == 401 and "API key" in unauthorized["reason"]
    assert "query" in invalid["reason"] and "passages" in invalid["reason"]
    assert asset["route"] == "/docs-assets" and asset["reason"] is None
    assert embedded["texts"] == 2 and embedded["passages"] is None and embedded["reason"] is None


def test_every_get_route_answers_head_with_the_gets_status_and_headers(caplog):
    """RFC 9110 section 9.1: HEAD wherever GET is supported (load balancers probe with it); every GET route
    answered 405. The OpenAPI document keeps one operation per route (no HEAD twins)."""
    app = create_app(ServerConfig(models=["default"]), load_models=False)
    with caplog.at_level("DEBUG", logger="openrerank.access"), TestClient(app) as c:
        doc = c.get("/openapi.json").json()
        gets = [p for p, item in doc["paths"].items() if "get" in item]
        assert {"/health", "/v1/health/live", "/v1/health/ready", "/v1/models", "/info", "/v1/metadata",
                "/v1/metrics"} <= set(gets)
        for path in [*gets, "/metrics", "/docs", "/redoc", "/openapi.json"]:
            got, head = c.get(path), c.head(path)
            assert head.status_code == got.status_code != 405, path
            assert head.headers["content-type"] == got.headers["content-type"] and head.content == b"", path
        for path in ("/v1/health/live", "/v1/models", "/info"):  # answers that do not change between calls
            assert int(c.head(path).headers["content-length"]) == len(c.get(path).content), path
        assert c.head("/v1/ranking").status_code == 405  # a POST route: HEAD is refused as GET is
    assert not any("head" in item for item in doc["paths"].values())
    assert any(r.fields["method"] == "HEAD" for r in caplog.records if r.name == "openrerank.access")


def test_head_middleware_runs_the_get_and_drops_its_body():
    """The body goes even where no server drops it (uvicorn does; an ASGI server need not)."""
    seen: list[str] = []
    sent: list[dict] = []

    async def app(scope, receive, send) -> None:
        seen.append(scope["method"])
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"5")]})
        await send({"type": "http.response.body", "body": b"hello"})

    async def send(message) -> None:
        sent.append(message)

    asyncio.run(HeadMiddleware(app)({"type": "http", "method": "HEAD", "path": "/x", "headers": []}, None, send))
    assert seen == ["GET"]
    assert sent[0]["headers"] == [(b"content-length", b"5")] and sent[1]["body"] == b""


@pytest.mark.parametrize("ctype", ["application/jsonl", "application/json5", "application/json-seq", "text/plain",
                                   "Application/JSON; charset=utf-8", "application/vnd.api+json", ""])
def test_a_body_of_any_declared_type_is_read_as_json(ctype):
    """The body guard reads bodies as JSON whatever their type (`curl -d` sends a form type); a prefix test took
    `application/jsonl` for JSON, so FastAPI passed it on unparsed: 400 "Input should be a valid dictionary"."""
    headers = {"content-type": ctype} if ctype else {}
    with TestClient(create_app(ServerConfig(models=["default"]), load_models=False)) as c:
        r = c.post("/v1/ranking", content=b'{"passages": [{"text": "a"}]}', headers=headers)
    assert r.status_code == 400 and r.json()["message"] == "field 'query' is required", r.text


def test_a_load_failure_keeps_its_cause_on_one_bounded_line():
    """OpenVINO puts the cause on later lines; the operator saw only "Exception from src/.../core.cpp:132:"."""
    from openrerank.server.app import LOAD_ERROR_CHARS, one_line

    ov = RuntimeError("Exception from src/inference/src/cpp/core.cpp:132:\n"
                      "Exception from src/inference/src/dev/plugin.cpp:59:\n"
                      "Check 'is_axis_valid(axis, r)' failed at src/core/src/validation_util.cpp:336:\n"
                      "While validating node 'Gather_61':\n"
                      "Axis 1073741824 out of the tensor rank range [-1, 0].\n\n\n")
    said = one_line(ov)
    assert "\n" not in said and said.startswith("RuntimeError: Check 'is_axis_valid")
    assert said.endswith("| Axis 1073741824 out of the tensor rank range [-1, 0].") and "core.cpp" not in said
    assert one_line(ValueError("plain")) == "ValueError: plain" and one_line(KeyError()) == "KeyError"
    long = one_line(OSError("\n".join(f"line {i} " + "x" * 50 for i in range(100)) + "\nthe cause"))
    assert len(long) == LOAD_ERROR_CHARS and long.startswith("OSError: line 0 ") and long.endswith("the cause")


def test_a_405_allows_every_method_of_its_path():
    """TEI's `/` is two routes (GET: health, POST: the model's task); Starlette's 405 named only the first one's
    method in `Allow` (schemathesis: "Allow header mismatch")."""
    with TestClient(create_app(ServerConfig(models=["default"]), load_models=False)) as c:
        root = c.request("OPTIONS", "/")
        put = c.put("/")
        rerank = c.get("/rerank")
    assert root.status_code == put.status_code == rerank.status_code == 405
    assert root.headers["allow"] == put.headers["allow"] == "GET, POST"
    assert rerank.headers["allow"] == "POST" and set(root.json()) == {"error", "error_type"}


def test_the_heap_is_trimmed_when_the_server_goes_idle_after_a_refused_request(monkeypatch):
    """A reviewer's server kept 1,150 MiB of RSS idle for 30 s after requests refused before any batch ran: the
    only trim was after a batch. Now a request's end, once none is left in flight, trims (runtimes/heap.py)."""
    trimmed = threading.Event()
    batches: list[int] = []
    trims: list[int] = []

    def trim() -> None:
        trims.append(1)
        trimmed.set()

    monkeypatch.setattr(HEAP, "_trim", trim)
    monkeypatch.setattr(HEAP, "_last", float("-inf"))
    monkeypatch.setattr(HEAP, "after_batch", lambda: batches.append(1))
    app = create_app(ServerConfig(models=["default"], max_body_bytes=1024), load_models=False)
    with TestClient(app) as c:
        trimmed.clear()
        before = len(trims)
        r = c.post("/v1/ranking", json=nim_body("q", ["x" * 4096]))
        assert r.status_code == 413
        assert trimmed.wait(10), "no trim after the refused request"
    assert len(trims) == before + 1 and batches == []


@pytest.mark.parametrize("given", ["abc status=200 model=forged", "x" * 129, "caf\u00e9"])
def test_an_insane_request_id_is_replaced_not_echoed(given):
    """Only a sane x-request-id is echoed and logged: a space would forge logfmt fields in the access line, and
    an unbounded one would be echoed whole. Anything else gets an id of the server's own."""
    with TestClient(create_app(ServerConfig(models=["default"]), load_models=False)) as c:
        r = c.get("/v1/models", headers={"x-request-id": given.encode("latin-1")})
    assert r.headers["x-request-id"] != given and len(r.headers["x-request-id"]) == 32


def test_an_error_message_quoting_client_input_is_bounded():
    """A 404 quoting a 50,000-character model name is cut to MAX_MESSAGE_CHARS (the access log writes it too)."""
    with TestClient(create_app(ServerConfig(models=["default"]), load_models=False)) as c:
        r = c.get("/v1/models/" + "m" * 50_000)
    assert r.status_code == 404
    message = r.json()["message"]
    assert len(message) == MAX_MESSAGE_CHARS and message.endswith("..."), len(message)


def test_an_unparsable_body_of_a_json_like_type_is_answered_as_not_json():
    """`application/jsonl` is not JSON to FastAPI: the guard declares such a body JSON, so a malformed one is
    answered "not valid JSON", not pydantic's "Input should be a valid dictionary"."""
    with TestClient(create_app(ServerConfig(models=["default"]), load_models=False)) as c:
        r = c.post("/v1/ranking", content=b'{"query": ', headers={"content-type": "application/jsonl"})
    assert r.status_code == 400 and r.json()["message"].startswith("request body is not valid JSON"), r.text


@pytest.mark.parametrize(("models", "settings", "hinted"), [
    (["a=/x/a", "b=/x/b"], {}, True), (["a=/x/a", "b=/x/b"], {"threads": 1}, False), (["a=/x/a"], {}, False),
    (["a=/x/a", "b=/x/b"], {"device": "cuda"}, False)])
def test_several_models_on_every_cpu_each_log_a_thread_hint_at_start(monkeypatch, caplog, models, settings, hinted):
    """Each model takes every CPU by default: two busy at once ran up to 2.3x slower in all than with --threads 1
    (docs/engine.md, Thread knobs), and the server said nothing of it."""
    import logging

    import openrerank.server.app as app_module
    from openrerank.server import host_limits

    def refuse(*_args, **_kwargs):
        raise OSError("not loaded in this test")

    monkeypatch.setattr(app_module, "load_served_model", refuse)
    monkeypatch.setattr(host_limits, "default_threads", lambda: 4)
    app = create_app(ServerConfig(models=models, **settings), load_models=False)
    with caplog.at_level(logging.INFO, logger="openrerank.server.host_limits"):
        asyncio.run(app_module.load_all(app))
    hints = [r.getMessage() for r in caplog.records if "fight over the cores" in r.getMessage()]
    assert hints == (["2 models each run 4 threads, one per CPU this process may use (--threads not set): when "
                      "several are busy at once their threads fight over the cores; --threads 2 (CPUs / models) "
                      "serves them better then (docs/engine.md, Thread knobs)"] if hinted else [])

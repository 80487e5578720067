"""openrerank on Ray Serve, end to end: `openrerank serve --replicas 2` on a loopback-only local Ray cluster.

One module-scoped cluster (Ray head + Serve + 2 replicas of the tiny model at 0.5 CPU each), started the
way a user starts it, serves every test here; the tests that change it (overload, a dead replica,
shutdown) come last. Skipped when the `ray` extra is not installed.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ipaddress
import itertools
import json
import os
import re
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

pytest.importorskip("ray.serve")

from fastapi.testclient import TestClient
from openrerank_bench.serve_process import free_port

from openrerank.server.app import create_app
from openrerank.server.config import ServerConfig
from openrerank.server.drain import CLOSED_MESSAGE
from openrerank.server.ray_drain import DRAIN, NOW, DrainFlag
from openrerank.server.ray_replica import (
    NON_SCORING_HEADROOM,
    REPLICA_HEADER,
    memory_share,
    replica_app,
    replica_problems,
)
from openrerank.server.ray_router import LeastBusyRouter
from openrerank.server.ray_serve import APP_NAME, DEPLOYMENT_NAME, argument_names, deployment_options, parse_args
from tests.support import ServerProcess, nim_body

QUERY = "what is the capital of france"
PASSAGES = [
    "paris is the capital of france",
    "berlin is the capital city of germany",
    "the banana is a yellow fruit",
    "a river flows to the sea",
    "how does a neural network learn from data",
]
MAX_QUEUE = 2  # per replica: small, so the overload test needs few requests
BODY_TIMEOUT = 2  # seconds: short, so the slow-body test waits little
CHUNKS = "4"  # OPENRERANK_MAX_CHUNKS_PER_PASSAGE: the passages here are one chunk each
#: One request per dialect: (path, body); rankings through Ray must equal the in-process app's.
DIALECT_REQUESTS = [
    ("/v1/ranking", nim_body(QUERY, PASSAGES, truncate="END")),
    ("/v1/rerank", {"query": QUERY, "documents": PASSAGES, "top_n": 3, "return_documents": True}),
    ("/v2/rerank", {"model": "tiny", "query": QUERY, "documents": PASSAGES}),
    ("/rerank", {"query": QUERY, "texts": PASSAGES, "return_text": True}),
    ("/rerank", {"query": QUERY, "texts": PASSAGES, "raw_scores": True}),
    ("/v1/score", {"text_1": QUERY, "text_2": PASSAGES}),
]
_LOOPBACK = {"127.0.0.1", "::1", "::ffff:127.0.0.1"}
_WILDCARD = {"0.0.0.0", "::"}


# -- builder arguments and deployment options (no cluster) ------------------------------------------------


def test_builder_arguments_arrive_as_strings_from_serve_run():
    server, replicas = parse_args({"model": "a=/m/a, b=/m/b", "num_replicas": "3", "max_queue": "8",
                                   "tei_chunking": "true", "threads": "2", "num_cpus": "0.5"})
    assert server.models == ["a=/m/a", "b=/m/b"]
    assert (server.max_queue, server.tei_chunking, server.threads) == (8, True, 2)
    assert (replicas.num_replicas, replicas.num_cpus) == (3, 0.5)
    assert parse_args({})[0].models == ["default"]
    assert parse_args({"models": []})[0].models == parse_args({"model": ""})[0].models == ["default"]
    assert parse_args({"models": ["x=/m"]})[0].models == ["x=/m"]
    # one revision for every model, as the argument was before it took one per model; or a list of NAME=REV
    assert parse_args({"revision": "v2"})[0].revisions == ["v2"]
    assert parse_args({"revision": None})[0].revisions == []  # `revision: null` in a Serve config: no pin
    assert parse_args({"revision": "a=v1, b=v2"})[0].revisions == ["a=v1", "b=v2"]  # as OPENRERANK_REVISION
    assert parse_args({"revisions": ["a=v1", "b=v2"]})[0].revisions == ["a=v1", "b=v2"]
    with pytest.raises(ValueError, match="either 'revision' or 'revisions'"):
        parse_args({"revision": "v2", "revisions": ["v3"]})


@pytest.mark.parametrize(("args", "message"), [
    ({"modle": "default"}, "unknown argument.*modle.*allowed: model"),
    ({"port": 9000}, "http_options"),
    ({"num_replicas": "zero"}, "num_replicas"),
    ({"max_queue": "lots"}, "max_queue"),
    ({"num_gpus": 1}, "device=cuda"),
    ({"model": "a", "models": ["b"]}, "either"),
])
def test_bad_builder_arguments_are_refused_clearly(args, message):
    with pytest.raises(ValueError, match=message):
        parse_args(args)


def test_a_builder_argument_is_named_as_written_not_as_a_flag():
    """`serve run ... api_key=` (or a Serve config's args) was refused naming `--api-key ''`, a flag a Serve
    config has no place for; the replicas' refusals name `max_passages=3`, not `--max-passages`."""
    with pytest.raises(ValueError, match=r"^api_key='': "):
        parse_args({"api_key": ""})
    assert argument_names({"max_passages": "3", "model": "a", "num_replicas": 2, "model_families": ["a=b"]}) == {
        "max-passages": "max_passages='3'", "model": "model='a'", "model-family": "model_families=['a=b']"}


def test_replicas_on_one_machine_split_its_memory_limit_by_their_cpus():
    """Each replica capped its batches by the whole room a memory limit left, so N replicas in one container
    held N times what fits: each takes its reserved CPUs' share (the whole where Ray reserved none)."""
    assert memory_share(1.0, 2) == 0.5 and memory_share(0.5, 2) == 0.25 and memory_share(4.0, 2) == 1.0
    assert memory_share(0.0, 2) == 1.0


def test_fixed_replicas_admit_max_queue_and_let_health_and_metrics_through():
    server, replicas = parse_args({"model": "a=/m/a,b=/m/b", "max_queue": 10, "num_replicas": 2, "num_cpus": 2})
    options = deployment_options(server, replicas)
    assert options["num_replicas"] == 2 and "autoscaling_config" not in options
    assert options["ray_actor_options"] == {"num_cpus": 2}
    # Serve never holds back a scoring request the replica would take: the replica refuses in dialect shape.
    assert options["max_ongoing_requests"] == 2 * 10 + NON_SCORING_HEADROOM
    assert options["max_queued_requests"] == -1 and "backpressure_config" not in options
    assert options["request_router_config"].request_router_class == f"{LeastBusyRouter.__module__}.LeastBusyRouter"
    serve_default = deployment_options(*parse_args({"router": "power-of-two"}))
    assert "request_router_config" not in serve_default  # Serve's own PowerOfTwoChoicesRequestRouter


def test_max_replicas_turns_on_autoscaling_on_queue_depth():
    server, replicas = parse_args({"max_replicas": 8, "num_replicas": 2})
    options = deployment_options(server, replicas)
    assert "num_replicas" not in options
    assert options["autoscaling_config"] == {
        "min_replicas": 1, "initial_replicas": 2, "max_replicas": 8, "target_ongoing_requests": 4.0,
        "upscale_delay_s": 10.0, "downscale_delay_s": 300.0, "look_back_period_s": 30.0}
    with pytest.raises(ValueError, match="within"):
        deployment_options(*parse_args({"max_replicas": 2, "num_replicas": 3}))
    capped = deployment_options(*parse_args({"max_queued_requests": 100, "num_gpus": 0.5, "device": "cuda"}))
    assert capped["backpressure_config"].retry_after_s == 1
    assert capped["ray_actor_options"] == {"num_cpus": 1.0, "num_gpus": 0.5}


def test_the_cli_refuses_bad_replica_settings_before_starting_ray(capsys):
    from openrerank.cli.main import main

    assert main(["serve", "--replicas", "2", "--replica-option", "bogus=1"]) == 2
    assert "bogus" in capsys.readouterr().err
    assert main(["serve", "--replicas", "4", "--replica-cpus", "1"]) == 2  # more than this machine has
    assert "CPUs" in capsys.readouterr().err
    assert main(["serve", "--replicas", "3", "--max-replicas", "2"]) == 2
    assert "within" in capsys.readouterr().err


def test_every_answer_names_the_replica_a_401_and_a_preflight_too():
    """The replica header was added inside the API-key and CORS middleware, so their answers lacked it."""
    config = ServerConfig(api_key="k", cors_allow_origins=["https://ok.example"])
    with TestClient(replica_app(create_app(config, load_models=False), config, "replica-7")) as c:
        answers = [c.get("/v1/models"), c.get("/v1/models", headers={"Authorization": "Bearer k"}),
                   c.options("/v1/ranking", headers={"Origin": "https://ok.example",
                                                     "Access-Control-Request-Method": "POST"}),
                   c.get("/v1/health/live")]
    assert [r.status_code for r in answers] == [401, 200, 200, 200]
    assert [r.headers.get_list(REPLICA_HEADER) for r in answers] == [["replica-7"]] * 4


def test_a_transfer_coding_other_than_chunked_gets_one_servers_501(caplog):
    """Serve's uvicorn de-chunks `Transfer-Encoding: gzip, chunked` and hands the body on still gzipped: a 400
    "request body is not valid UTF-8", or a plain body served as if the coding were not there. Counted and
    logged with its reason, as one server's guard does (the gate sits inside the metrics and access log)."""
    config = ServerConfig()
    app = replica_app(create_app(config, load_models=False), config, "replica-7")
    with caplog.at_level("INFO", logger="openrerank.access"), TestClient(app) as c:
        answer = c.post("/v1/ranking", content=b'{"query": {"text": "q"}, "passages": [{"text": "p"}]}',
                        headers={"Transfer-Encoding": "gzip, chunked", "Content-Type": "application/json"})
        cohere = c.post("/v1/rerank", content=b"{}", headers={"Transfer-Encoding": "GZIP"})
        chunked = c.post("/v1/ranking", content=b"{}", headers={"Transfer-Encoding": "chunked"})
    assert answer.status_code == 501 and answer.json()["type"] == "not_implemented"
    assert answer.json()["message"].startswith("Transfer-Encoding 'gzip' is not supported: send the body chunked")
    assert cohere.status_code == 501 and "Transfer-Encoding 'gzip'" in cohere.json()["message"]
    assert chunked.status_code != 501
    assert 'openrerank_requests_total{protocol="http",route="/v1/ranking",status="501"} 1.0' in _metrics_text(app)
    lines = [r for r in caplog.records if r.name == "openrerank.access" and r.fields["status"] == 501]
    assert [r.fields["route"] for r in lines] == ["/v1/ranking", "/v1/rerank"]
    assert all(r.fields["reason"].startswith("Transfer-Encoding 'gzip' is not supported") for r in lines)


def test_a_request_cancelled_by_serve_is_the_clients_499_not_a_shutdown_503(caplog):
    """Serve's proxy cancels a request whose client went away (no `http.disconnect` reaches the app). It was
    answered as a server-side cancellation (a 503, a WARNING) and counted as a 500."""
    config = ServerConfig()
    app = replica_app(create_app(config, load_models=False), config, "replica-7")
    sent: list[dict] = []

    async def main() -> None:
        waiting = asyncio.Event()

        async def receive() -> dict:  # the body never comes: the request waits in the body guard
            waiting.set()
            await asyncio.Event().wait()
            return {}

        async def send(message: dict) -> None:
            sent.append(message)

        scope = {"type": "http", "method": "POST", "path": "/v1/ranking", "raw_path": b"/v1/ranking",
                 "query_string": b"", "headers": [(b"content-type", b"application/json")], "scheme": "http",
                 "server": ("127.0.0.1", 8000), "client": ("127.0.0.1", 5000), "http_version": "1.1",
                 "root_path": "", "app": app}
        task = asyncio.create_task(app(scope, receive, send))
        await asyncio.wait_for(waiting.wait(), 30)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    with caplog.at_level("INFO", logger="openrerank"):
        asyncio.run(main())
    assert sent == []  # nothing answered: the client is gone
    text = _metrics_text(app)
    assert 'openrerank_requests_total{protocol="http",route="/v1/ranking",status="499"} 1.0' in text
    assert "openrerank_client_disconnects_total 1.0" in text
    assert "client disconnected" in caplog.text and "cancelled by the server" not in caplog.text


def _metrics_text(app) -> str:
    from prometheus_client import generate_latest

    return generate_latest(app.state.metrics.registry).decode()


def test_the_launchers_flag_drains_a_replicas_app_and_the_replica_reports_idle():
    """`openrerank serve --replicas` stops its replicas through a flag file (server/ray_drain.py): the app's
    drain begins (a new request: the dialect's 503, readiness 503), a second signal's flag ends its grace period
    now, and the replica reports idle, so the launcher stops Serve only then."""
    config = ServerConfig(graceful_timeout=60)
    flag = DrainFlag()
    app = replica_app(create_app(config, load_models=False), config, "replica-7", str(flag.directory))

    async def until(condition) -> None:
        deadline = time.monotonic() + 30
        while not condition():
            assert time.monotonic() < deadline
            await asyncio.sleep(0.02)

    async def main() -> tuple[httpx.Response, httpx.Response]:
        watch = asyncio.create_task(app.state.replica_drain.watch())
        try:
            await until(flag.busy)  # the replica registered (serving)
            assert not app.state.drain.draining
            flag.raise_flag(DRAIN)
            await until(lambda: not flag.busy())
            assert app.state.drain.draining and not app.state.drain.expired
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://replica") as c:
                answers = await c.post("/v1/ranking", json={"query": {"text": "q"}, "passages": [{"text": "p"}]}), \
                    await c.get("/v1/health/ready")
            flag.raise_flag(NOW)
            await until(lambda: app.state.drain.expired)
            return answers
        finally:
            watch.cancel()
            flag.remove()

    refused, ready = asyncio.run(main())
    assert refused.status_code == 503 and refused.headers["retry-after"] == "1", refused.text
    assert refused.json() == {"object": "error", "message": CLOSED_MESSAGE, "type": "unavailable"}
    assert ready.status_code == 503 and "shutting down" in ready.text


def test_a_dead_scheduler_or_load_error_is_a_health_problem(tiny_model_dir):
    with TestClient(create_app(ServerConfig(models=[f"tiny={tiny_model_dir}"]), wait_for_models=True)) as c:
        served = c.app.state.models
        assert replica_problems(served) == []
        served.load_error = "OSError: no weights"
        assert replica_problems(served) == ["model loading failed: OSError: no weights"]
        served.load_error = None
        asyncio.run(served.get("tiny").scheduler.stop())
        assert replica_problems(served) == ["the scheduler worker of model tiny is not running"]


# -- one cluster, started as a user starts it ----------------------------------------------------------


class Cluster:
    def __init__(self, server: ServerProcess, metrics_port: int) -> None:
        self.server = server
        self.url = server.url
        self.metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"
        deadline = time.monotonic() + 60  # the proxy may answer a moment before `serve run` returns
        while not (match := re.search(r"Ray cluster (\S+?)[;)]", server.output())) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert match, server.output()[-2000:]
        self.gcs_address = match.group(1)
        self.processes = descendants(server.proc.pid)


def descendants(pid: int) -> dict[int, str]:
    """Every process below `pid` (pid -> command line), from /proc."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    found: dict[int, str] = {}
    stack = [pid]
    while stack:
        for child in children.get(stack.pop(), []):
            try:
                found[child] = (Path("/proc") / str(child) / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            stack.append(child)
    return found


def listening_addresses(pids: set[int]) -> dict[int, set[str]]:
    """pid -> local addresses of its listening TCP sockets (IPv4 and IPv6), from /proc."""
    inode_owner: dict[str, int] = {}
    for pid in pids:
        try:
            for fd in (Path("/proc") / str(pid) / "fd").iterdir():
                target = os.readlink(fd)
                if target.startswith("socket:["):
                    inode_owner[target[8:-1]] = pid
        except OSError:
            continue
    found: dict[int, set[str]] = {}
    for table, v6 in (("tcp", False), ("tcp6", True)):
        for line in (Path("/proc/net") / table).read_text().splitlines()[1:]:
            cols = line.split()
            if cols[3] != "0A" or cols[9] not in inode_owner:  # 0A: LISTEN
                continue
            raw = bytes.fromhex(cols[1].split(":")[0])
            if v6:  # four little-endian 32-bit words
                raw = b"".join(raw[i:i + 4][::-1] for i in range(0, 16, 4))
                addr = ipaddress.IPv6Address(raw)
                text = f"::ffff:{addr.ipv4_mapped}" if addr.ipv4_mapped else str(addr)
            else:
                text = ".".join(str(b) for b in raw[::-1])
            found.setdefault(inode_owner[cols[9]], set()).add(text)
    return found


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, tiny_model_dir) -> Iterator[Cluster]:
    tmp = tmp_path_factory.mktemp("ray-serve")
    metrics_port = free_port()
    args = ["--model", f"tiny={tiny_model_dir}", "--replicas", "2", "--replica-cpus", "0.5",
            "--max-queue", str(MAX_QUEUE), "--ray-metrics-port", str(metrics_port), "--body-timeout", str(BODY_TIMEOUT),
            "--replica-option", "health_check_period_s=1", "--replica-option", "max_constructor_retry_count=2"]
    env = {"RAY_DEDUP_LOGS": "0",
           "OPENRERANK_CACHE_DIR": str(tmp / "onnx-cache"),  # empty: both replicas need the export at once
           "OPENRERANK_MAX_CHUNKS_PER_PASSAGE": CHUNKS}  # set as a variable: the replicas' refusals name it
    server = ServerProcess(args, tmp, env=env)
    try:
        server.wait_ready(240)
        yield Cluster(server, metrics_port)
    finally:
        server.stop()


@pytest.fixture(scope="module")
def in_process(cluster, tiny_model_dir) -> Iterator[TestClient]:
    """The plain single-process app with the same settings, the same thread count and the same runtime as a
    replica (the replicas' measured choice: timing it again here could pick another, faithful to 1e-5 only)."""
    engine = httpx.get(f"{cluster.url}/v1/metadata", timeout=30).json()["models"][0]["engine"]
    config = ServerConfig(models=[f"tiny={tiny_model_dir}"], max_queue=MAX_QUEUE, threads=1,
                          backend=engine["backend"], dtype=engine["dtype"], backend_choice="rules")
    with TestClient(create_app(config, wait_for_models=True)) as client:
        yield client


def comparable(body):
    """A response body without what legitimately differs between two servers (request ids, timings)."""
    if isinstance(body, dict):
        return {k: comparable(v) for k, v in body.items() if k not in ("id", "meta", "created")}
    if isinstance(body, list):
        return [comparable(v) for v in body]
    return body


def test_ready_through_the_proxy(cluster):
    with httpx.Client(base_url=cluster.url, timeout=30) as c:
        ready = c.get("/v1/health/ready")
        assert ready.status_code == 200 and ready.json()["status"] == "ready"
        assert c.get("/-/healthz").status_code == 200  # Serve's proxy health, what KubeRay probes
        assert [m["id"] for m in c.get("/v1/models").json()["data"]] == ["tiny"]


def test_sequential_requests_take_turns_on_the_replicas(cluster):
    """A lone sequential client finds both replicas idle each time, and the least-busy router then takes the
    one chosen longest ago (Serve's default router flips a coin: 12 alternating answers, 1 in 2048)."""
    with httpx.Client(base_url=cluster.url, timeout=30) as c:
        seen = [c.post("/v1/ranking", json=nim_body(QUERY, PASSAGES)).headers[REPLICA_HEADER] for _ in range(12)]
    assert len(set(seen)) == 2 and all(a != b for a, b in itertools.pairwise(seen)), seen


def test_rankings_equal_the_in_process_app_for_every_dialect(cluster, in_process):
    with httpx.Client(base_url=cluster.url, timeout=30) as c:
        for path, body in DIALECT_REQUESTS:
            for _ in range(2):  # most likely one answer from each replica
                ray_resp = c.post(path, json=body)
                local = in_process.post(path, json=body)
                assert ray_resp.status_code == local.status_code == 200, (path, ray_resp.text)
                assert comparable(ray_resp.json()) == comparable(local.json()), path


def test_replicas_share_one_export_and_use_their_cpu_share(cluster):
    """Both replicas started together on an empty model cache: for each runtime timed or served, one replica
    converted the model and the other reused it; each runs as many threads as the CPUs Ray gave it (0.5 -> 1),
    not one per core of the machine."""
    log = cluster.server.output()
    conversions = re.findall(r"(exporting|converting|compressing) \S+ .*\(first start with these options", log)
    assert conversions and len(conversions) == len(set(conversions)), log[-3000:]
    sessions = re.findall(r"(?:ONNX Runtime session|OpenVINO \w+ model) on \S+ \((\d+) threads", log)
    assert len(sessions) >= 2 and set(sessions) == {"1"}, log[-3000:]  # each replica's, and timed candidates


def test_ray_stays_on_loopback(cluster):
    import ray

    with ray_driver(cluster):
        assert {n["NodeManagerAddress"] for n in ray.nodes()} == {"127.0.0.1"}
    listening = listening_addresses(set(cluster.processes))
    assert listening, "found no listening socket of the cluster's processes"
    for pid, addresses in listening.items():
        assert addresses <= _LOOPBACK | _WILDCARD, (cluster.processes[pid], addresses)
        if addresses & _WILDCARD:  # Serve binds each replica's internal gRPC server to [::] (hard-coded)
            assert "ServeReplica" in cluster.processes[pid], (cluster.processes[pid], addresses)


def test_a_replicas_refusal_names_the_variable_that_set_the_limit(cluster):
    """The launcher hands the replicas how each setting was given: a replica's engine refusal named
    `--max-chunks-per-passage`, a flag nobody typed, for OPENRERANK_MAX_CHUNKS_PER_PASSAGE."""
    body = nim_body(QUERY, PASSAGES[:1], truncate="CHUNK", max_chunks_per_passage=8)
    with httpx.Client(base_url=cluster.url, timeout=30) as c:
        r = c.post("/v1/ranking", json=body)
    assert r.status_code == 400, r.text
    assert r.json()["message"].endswith(f"(OPENRERANK_MAX_CHUNKS_PER_PASSAGE='{CHUNKS}')"), r.text


async def _send_whole_then_read(url: str, body: bytes, n: int) -> list[httpx.Response | str]:
    """`n` posts from one async client, which sends the whole body before it reads the answer."""
    out: list[httpx.Response | str] = []
    async with httpx.AsyncClient(base_url=url, timeout=60) as c:
        for _ in range(n):
            try:
                out.append(await c.post("/v1/ranking", content=body, headers={"content-type": "application/json"}))
            except httpx.TransportError as exc:
                out.append(type(exc).__name__)
        out.append(await c.post("/v1/ranking", json=nim_body(QUERY, PASSAGES)))
    return out


def test_a_body_over_the_limit_gets_its_413_through_the_proxy(cluster):
    """The replica refuses from the declared length, before the body is read. With its `Connection: close`
    Serve's uvicorn closed at once, the body unread, and the reset lost the answer (ReadError, every time here)."""
    body = json.dumps(nim_body(QUERY, ["x" * 1000] * 17_500)).encode()  # 17.6 MB, over the default 8 MiB
    *refused, after = asyncio.run(_send_whole_then_read(cluster.url, body, 3))
    assert [getattr(r, "status_code", r) for r in refused] == [413] * 3, refused
    assert all(r.json()["type"] == "too_large" and "--max-body-bytes" in r.json()["message"] for r in refused)
    assert after.status_code == 200


def test_a_body_too_slow_is_refused_and_its_connection_closed(cluster):
    """The 408 keeps its `Connection: close` through the proxy: Serve's uvicorn would otherwise read a
    trickling body for as long as it trickles."""
    host, port = cluster.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as sock:
        sock.sendall(b"POST /v1/ranking HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                     b"content-length: 1000\r\n\r\n{\"query\":")  # declares more than it sends
        sock.settimeout(BODY_TIMEOUT + 30)
        answer = b""
        while chunk := sock.recv(65536):  # until the server closes
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 408") and b"--body-timeout" in answer, answer[:300]


def test_each_answer_names_its_request_id_once(cluster):
    """Serve's proxy puts the request's id on every answer; the replica's own copy made it "id, id"."""
    with httpx.Client(base_url=cluster.url, timeout=30) as c:
        generated = c.post("/v1/ranking", json=nim_body(QUERY, PASSAGES))
        given = c.post("/v1/ranking", json=nim_body(QUERY, PASSAGES), headers={"x-request-id": "caller-7"})
        refused = c.post("/v1/rerank", json={"query": QUERY}, headers={"x-request-id": "caller-8"})
        unfit = c.post("/v1/ranking", json=nim_body(QUERY, PASSAGES), headers={"x-request-id": "has space"})
    assert generated.status_code == 200 and len(generated.headers.get_list("x-request-id")) == 1
    assert given.headers.get_list("x-request-id") == ["caller-7"]
    assert refused.status_code == 400 and refused.headers.get_list("x-request-id") == ["caller-8"]
    # an id the replica finds unfit: Serve's echo only (it was "new-id, has space")
    assert unfit.status_code == 200 and unfit.headers.get_list("x-request-id") == ["has space"]
    # the replicas log with openrerank's formatter: the access line's fields (they were dropped)
    deadline = time.monotonic() + 30  # Ray forwards the replicas' lines to the driver's output in batches
    while "request_id=caller-7" not in cluster.server.output():
        assert time.monotonic() < deadline, cluster.server.output()[-2000:]
        time.sleep(0.2)


@contextlib.contextmanager
def ray_driver(cluster: Cluster, **kwargs) -> Iterator[None]:
    """This test process connected to the cluster as a Ray driver (token auth: see conftest.py)."""
    import ray

    ray.init(address=cluster.gcs_address, log_to_driver=False, logging_level="ERROR", **kwargs)
    try:
        yield
    finally:
        ray.shutdown()


def _route_totals(metrics_url: str, route: str) -> dict[str, float]:
    """replica -> its `openrerank_requests_total` for `route` with status 200, as Ray exports it."""
    text = httpx.get(metrics_url, timeout=10).text
    pattern = re.compile(r'^ray_openrerank_requests_total\{(?P<tags>[^}]*)\} (?P<value>\S+)$', re.M)
    totals: dict[str, float] = {}
    for m in pattern.finditer(text):
        tags = dict(re.findall(r'(\w+)="([^"]*)"', m["tags"]))
        if tags.get("route") == route and tags.get("status") == "200":
            totals[tags["replica"]] = totals.get(tags["replica"], 0.0) + float(m["value"])
    return totals


def test_metrics_sum_across_replicas(cluster):
    """Ray's endpoint has each replica's series; their sum is the number of requests served.
    (`/score` is not used by any other test of this module, so its total starts at 0.)"""
    with httpx.Client(base_url=cluster.url, timeout=30) as c:
        replicas = [c.post("/score", json={"text_1": QUERY, "text_2": PASSAGES}).headers[REPLICA_HEADER]
                    for _ in range(10)]
    assert len(set(replicas)) == 2
    deadline = time.monotonic() + 40  # Ray's agents export what the replicas report every few seconds
    while sum(_route_totals(cluster.metrics_url, "/score").values()) < 10 and time.monotonic() < deadline:
        time.sleep(1)
    time.sleep(2)  # nothing more arrives
    totals = _route_totals(cluster.metrics_url, "/score")
    assert totals == {r: float(replicas.count(r)) for r in set(replicas)}
    assert sum(totals.values()) == 10


async def _burst(url: str, path: str, body: dict, n: int) -> list[httpx.Response]:
    limits = httpx.Limits(max_connections=n, max_keepalive_connections=n)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as c:
        return await asyncio.gather(*(c.post(path, json=body) for _ in range(n)))


@pytest.mark.parametrize(("path", "status"), [("/v1/ranking", 503), ("/v1/rerank", 429), ("/rerank", 429)])
def test_overload_answers_in_the_dialect_shape(cluster, path, status):
    passages = [f"{p} number {i}" for i in range(60) for p in PASSAGES][:300]
    body = {"/v1/ranking": nim_body(QUERY, passages, truncate="END"),
            "/v1/rerank": {"query": QUERY, "documents": passages},
            "/rerank": {"query": QUERY, "texts": passages, "truncate": True}}[path]
    responses = asyncio.run(_burst(cluster.url, path, body, 40))
    codes = [r.status_code for r in responses]
    assert set(codes) <= {200, status}, codes
    assert codes.count(status) > 0 and codes.count(200) >= MAX_QUEUE, codes
    for r in responses:
        if r.status_code == 200:  # every accepted request is answered in full
            ranked = r.json() if path == "/rerank" else r.json().get("rankings") or r.json()["results"]
            assert sorted(x["index"] for x in ranked) == list(range(len(passages)))
        else:
            assert int(r.headers["Retry-After"]) >= 1
            error = r.json()
            if path == "/v1/ranking":
                assert error["object"] == "error" and error["type"] == "overloaded", error
            elif path == "/rerank":
                assert error["error_type"] == "Overloaded", error
            else:
                assert "overloaded" in error["message"], error


def _kill_scheduler_workers(replica) -> list[tuple[str, bool]]:
    """Runs inside a replica: ends each model's scheduler worker thread the way an uncaught error would."""
    out = []
    for thread in threading.enumerate():
        if thread.name.startswith("model-"):
            scheduler = thread._target.__self__  # type: ignore[attr-defined]
            ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread.ident), ctypes.py_object(SystemExit))
            with scheduler._cv:
                scheduler._cv.notify_all()  # wake it so the exception is raised
            thread.join(10)
            out.append((scheduler.name, scheduler.alive))
    return out


def test_a_replica_whose_scheduler_died_is_replaced(cluster):
    import ray

    with httpx.Client(base_url=cluster.url, timeout=30) as c:
        before: set[str] = set()
        for _ in range(60):  # right after a burst Serve's router may favour one replica for a while
            before.add(c.post("/v1/ranking", json=nim_body(QUERY, PASSAGES)).headers[REPLICA_HEADER])
            if len(before) == 2:
                break
            time.sleep(0.2)
        assert len(before) == 2
        victim = sorted(before)[0]
        with ray_driver(cluster, namespace="serve"):
            actor = ray.get_actor(f"SERVE_REPLICA::{APP_NAME}#{DEPLOYMENT_NAME}#{victim}", namespace="serve")
            assert ray.get(actor.__ray_call__.remote(_kill_scheduler_workers), timeout=30) == [("tiny", False)]
        deadline = time.monotonic() + 60
        recent: list[str] = []
        while time.monotonic() < deadline:
            r = c.post("/v1/ranking", json=nim_body(QUERY, PASSAGES))
            recent = [*recent[-11:], r.headers[REPLICA_HEADER] if r.status_code == 200 else "error"]
            if len(recent) == 12 and len(set(recent) - before) == 1 and victim not in recent and "error" not in recent:
                break
            time.sleep(0.25)
        else:
            pytest.fail(f"the replica was not replaced: last answers {recent}")
    assert "the scheduler worker of model tiny is not running" in cluster.server.output()


def test_shutdown_leaves_no_process(cluster):
    processes = descendants(cluster.server.proc.pid) | cluster.processes
    assert any("raylet" in cmd for cmd in processes.values())
    cluster.server.stop()
    assert cluster.server.proc.returncode == 0, cluster.server.output()[-3000:]
    deadline = time.monotonic() + 20
    while (left := still_running(processes)) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not left, left


def still_running(processes: dict[int, str]) -> dict[int, str]:
    """Those of `processes` still alive (same pid, same command line: not a reused pid)."""
    left = {}
    for pid, cmd in processes.items():
        try:
            if (Path("/proc") / str(pid) / "cmdline").read_bytes().replace(b"\0", b" ").decode() == cmd:
                left[pid] = cmd
        except OSError:
            continue
    return left


def test_the_api_key_comes_from_the_replicas_environment_and_an_empty_one_is_refused():
    """Under `serve run`/KubeRay the settings are the application's arguments; OPENRERANK_API_KEY (a Secret in
    the pod) was ignored without a word, and the replicas served every route without a key."""
    from openrerank.cli.main import SERVE_OPTIONS
    from openrerank.server.config import API_KEY_ENV
    from openrerank.server.ray_replica import take_secrets

    assert next(o for o in SERVE_OPTIONS if o.flag == "api-key").env_name == API_KEY_ENV  # the CLI's variable
    server, _ = parse_args({"model": "default"})
    take_secrets(server, {API_KEY_ENV: "from-a-secret\n"})
    assert server.api_key == "from-a-secret"
    given, _ = parse_args({"model": "default", "api_key": "in-the-config"})
    take_secrets(given, {API_KEY_ENV: "from-a-secret"})
    assert given.api_key == "in-the-config"  # the arguments win, as a flag wins over the variable
    with pytest.raises(ValueError, match="is empty"):
        parse_args({"model": "default", "api_key": ""})


def test_a_report_the_launcher_cannot_read_is_passed_over(tmp_path):
    """The launcher (and the drain test) read every report in its directory; one in another version's form
    (`idle`, before reports held a count) made `reports` raise instead of leaving it out."""
    import os

    from openrerank.server.ray_drain import Report, reports

    (tmp_path / f"replica-{os.getpid()}").write_text("idle")
    assert reports(tmp_path) == {}
    (tmp_path / f"replica-{os.getpid()}").write_text(Report(2, draining=True).text())
    assert reports(tmp_path) == {os.getpid(): Report(2, draining=True)}

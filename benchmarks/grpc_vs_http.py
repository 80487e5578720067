"""gRPC (KServe V2, tritonclient) vs HTTP (NIM /v1/ranking, httpx) on one server: latency and pairs/s.

    PYTHONPATH=src:benchmarks/src .venv/bin/python benchmarks/grpc_vs_http.py [--backend onnx] [--rounds 12]

One `openrerank serve --grpc-port` process; the same DL19 queries with their BM25 top-100 MS MARCO passages
(shared/data) over both protocols, the protocols interleaved round by round so machine load drifts equally on
both. Two rows: one client sending one 100-passage request at a time (latency), and 16 concurrent clients
(throughput). Prints the CPU model and the load average next to the figures, and the gRPC/HTTP ratio.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import tritonclient.grpc as grpcclient
from openrerank_bench.serve_process import ServeProcess, free_port
from openrerank_bench.workload import default_data_dir, load_workload


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        return next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except (OSError, subprocess.CalledProcessError, StopIteration):
        return platform.processor() or "unknown CPU"


def load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


class Http:
    name = "HTTP"

    def __init__(self, url: str, model: str) -> None:
        self.client = httpx.Client(base_url=url, timeout=None)  # the server's --request-timeout bounds it
        self.model = model

    def rank(self, query: str, passages: list[str]) -> None:
        body = {"model": self.model, "query": {"text": query}, "passages": [{"text": p} for p in passages],
                "truncate": "END"}
        r = self.client.post("/v1/ranking", json=body)
        r.raise_for_status()


class Grpc:
    name = "gRPC"

    def __init__(self, url: str, model: str) -> None:
        self.client = grpcclient.InferenceServerClient(url)
        self.model = model

    def rank(self, query: str, passages: list[str]) -> None:
        q = np.array([[query.encode()]], dtype=np.object_)
        p = np.array([[x.encode()] for x in passages], dtype=np.object_)
        inputs = [grpcclient.InferInput("query", list(q.shape), "BYTES"),
                  grpcclient.InferInput("passage", list(p.shape), "BYTES")]
        inputs[0].set_data_from_numpy(q)
        inputs[1].set_data_from_numpy(p)
        self.client.infer(self.model, inputs, parameters={"truncate": "END"})


def run_clients(make, requests: list[tuple[str, list[str]]], clients: int) -> tuple[list[float], float]:
    """Send `requests` from `clients` threads (each its own connection); per-request latencies, wall time."""
    latencies: list[float] = []
    lock = threading.Lock()
    shares = [requests[i::clients] for i in range(clients)]
    conns = [make() for _ in range(clients)]

    errors: list[BaseException] = []

    def work(conn, share) -> None:
        try:
            for query, passages in share:
                t0 = time.perf_counter()
                conn.rank(query, passages)
                with lock:
                    latencies.append(time.perf_counter() - t0)
        except Exception as exc:  # reported after the join: a failed request voids the row
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(c, s)) for c, s in zip(conns, shares, strict=True)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise RuntimeError(f"{len(errors)} client(s) failed; first: {errors[0]}")
    return latencies, time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=None, help="the DL19 data folder (default: shared/data/...)")
    ap.add_argument("--backend", default="onnx")
    ap.add_argument("--model", default="default")
    ap.add_argument("--queries", type=int, default=16, help="DL19 queries (each with its top-100 passages)")
    ap.add_argument("--rounds", type=int, default=4, help="requests of the single-client row, per protocol")
    ap.add_argument("--concurrent-rounds", type=int, default=1,
                    help="rounds of the 16-client row, per protocol (each: one request per client)")
    ap.add_argument("--request-timeout", type=float, default=900.0,
                    help="the server's --request-timeout: 16 clients on a busy shared CPU take minutes")
    args = ap.parse_args()

    wl = load_workload(args.data or default_data_dir(), "runs/bm25_top100.trec.gz", args.queries, 100)
    requests = [(q, p) for q, p in zip(wl.queries, wl.passages, strict=True) if len(p) == 100]
    grpc_port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        server = ServeProcess(["--model", args.model, "--backend", args.backend, "--grpc-port", str(grpc_port),
                               "--max-passages", "512", "--request-timeout", str(args.request_timeout)],
                             Path(tmp))
        try:
            server.wait_ready(600)
            model = httpx.get(f"{server.url}/v1/models").json()["data"][0]["id"]
            grpc_url = f"127.0.0.1:{grpc_port}"
            protocols = {"HTTP": lambda: Http(server.url, model), "gRPC": lambda: Grpc(grpc_url, model)}
            for make in protocols.values():  # warm both paths (connections, first batches)
                make().rank(*requests[0])
            print(f"CPU: {cpu_model()}; load average before: {load()}; backend {args.backend}; "
                  f"model {model}; {len(requests)} DL19 queries x 100 passages")
            single: dict[str, list[float]] = {k: [] for k in protocols}
            for _ in range(args.rounds):
                for name, make in protocols.items():
                    conn = make()
                    query, passages = requests[len(single[name]) % len(requests)]
                    t0 = time.perf_counter()
                    conn.rank(query, passages)
                    single[name].append(time.perf_counter() - t0)
            many: dict[str, list[tuple[list[float], float]]] = {k: [] for k in protocols}
            for _ in range(args.concurrent_rounds):
                for name, make in protocols.items():
                    many[name].append(run_clients(make, requests[:16], 16))
            print(f"load average after: {load()}")
        finally:
            server.stop()
    print("\n| protocol | 1 client: p50 latency (s) | 1 client: pairs/s | 16 clients: p50 latency (s) "
          "| 16 clients: pairs/s |")
    print("|---|---|---|---|---|")
    rates: dict[str, tuple[float, float]] = {}
    for name in protocols:
        p50 = statistics.median(single[name])
        lat16 = statistics.median([x for lats, _ in many[name] for x in lats])
        pairs16 = sum(100 * len(lats) for lats, _ in many[name]) / sum(wall for _, wall in many[name])
        rates[name] = (100 / p50, pairs16)
        print(f"| {name} | {p50:.3f} | {100 / p50:.0f} | {lat16:.3f} | {pairs16:.0f} |")
    print(f"\ngRPC/HTTP pairs/s: 1 client {rates['gRPC'][0] / rates['HTTP'][0]:.2f}x, "
          f"16 clients {rates['gRPC'][1] / rates['HTTP'][1]:.2f}x")


if __name__ == "__main__":
    main()

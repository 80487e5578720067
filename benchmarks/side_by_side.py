"""Processes sharing one machine: does each keep its speed? Per CPU engine, and for Ray Serve replicas.

Configurations, interleaved over rounds so drifting machine load spreads over all of them:
- per engine (`--engine BACKEND:DTYPE`, repeatable): one `openrerank serve --threads 1` alone, then two of
  them at once, each driven by its own sequential client; the figure is each server's pairs/s together
  divided by one alone (issue 16's target: each >= 0.85x; a pinning fight puts both threads on one core and
  gives ~0.5x). Together means while both clients send: a client through its requests keeps sending (cycling
  them) until the other is through too, and each counts the pairs done in the window both were sending (a
  request across its edge by the part inside), so a server starved while both ran does not read better for
  the stretch it would otherwise have run alone;
- with `--ray`: `serve --replicas 2 --threads 1` against `--replicas 1 --threads 1`, each driven by two
  concurrent clients (target >= 1.7x); `--ray-router` (repeatable) names the request routers the 2-replica
  setup is run with, e.g. `--ray-router least-busy --ray-router power-of-two` (Serve's default) to see
  what the router is worth in the same rounds.

Load: DL19 queries with their 100 BM25 passages each (bench.py's workload) on the MiniLM-L6 cross-encoder,
one unmeasured request per client first. Run it on an otherwise idle machine with at least two cores.

    .venv/bin/python benchmarks/side_by_side.py --rounds 2 --ray
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
from openrerank_bench.runners import SERVED_NAME, nim_body
from openrerank_bench.serve_process import ServeProcess
from openrerank_bench.workload import build_bench_cross_encoder, default_data_dir, load_workload

from openrerank.runtimes.base import default_threads

ENGINES = ("openvino:fp32", "onnx:fp32", "torch:fp32")


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


class AllSent:
    """Set once every client has sent its whole list: until then a client that is through keeps sending, so no
    client is ever measured with the machine to itself."""

    def __init__(self, clients: int) -> None:
        self.left, self.lock, self.event = clients, threading.Lock(), threading.Event()

    def one_done(self) -> None:
        with self.lock:
            self.left -= 1
            if self.left <= 0:
                self.event.set()


def drive(url: str, bodies: list[bytes], spans: list[tuple[float, float]], start: threading.Barrier,
          all_sent: AllSent, transport: httpx.BaseTransport | None = None) -> None:
    """One sequential client: a warm-up request, then `bodies` one after another, and on (cycling them) until every
    client has sent its list; appends each request's (start, end)."""
    counted = False
    try:
        with httpx.Client(base_url=url, timeout=600, transport=transport) as client:
            headers = {"content-type": "application/json"}
            warm = client.post("/v1/ranking", content=bodies[0], headers=headers)
            assert warm.status_code == 200, warm.text[:300]
            start.wait()
            sent = 0
            while sent < len(bodies) or not all_sent.event.is_set():
                t = time.perf_counter()
                resp = client.post("/v1/ranking", content=bodies[sent % len(bodies)], headers=headers)
                assert resp.status_code == 200, resp.text[:300]
                spans.append((t, time.perf_counter()))
                sent += 1
                if sent == len(bodies):
                    counted = True
                    all_sent.one_done()
    finally:
        if not counted:  # a failed client must not keep the others sending for ever
            start.abort()
            all_sent.one_done()


def common_window_rates(spans: list[list[tuple[float, float]]], pairs_each: int) -> list[float]:
    """Each client's pairs/s over the window in which every client was sending: from the last first start to the
    first last end. A request that straddles an edge counts by the part of it inside. Timing each client to its
    own end let the slower one finish alone: a fight that gave it 0.3x while both ran read 0.5x."""
    begin, end = max(s[0][0] for s in spans), min(s[-1][1] for s in spans)
    if end <= begin:
        raise ValueError("the clients never sent at the same time")
    rates = []
    for client in spans:
        done = sum(max(0.0, min(b, end) - max(a, begin)) / (b - a) for a, b in client if b > a)
        rates.append(done * pairs_each / (end - begin))
    return rates


def run_clients(urls: list[str], bodies: list[bytes], pairs_each: int,
                transports: list[httpx.BaseTransport | None] | None = None) -> list[float]:
    """One client per url (several per url where a url repeats), all started together; pairs/s of each over the
    window in which all of them were sending (`common_window_rates`)."""
    spans: list[list[tuple[float, float]]] = [[] for _ in urls]
    errors: list[BaseException] = []
    barrier, all_sent = threading.Barrier(len(urls)), AllSent(len(urls))

    def client(i: int) -> None:
        try:
            drive(urls[i], bodies, spans[i], barrier, all_sent, (transports or [None] * len(urls))[i])
        except BaseException as exc:  # re-raised below, in the caller's thread
            errors.append(exc)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(urls))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise next((e for e in errors if not isinstance(e, threading.BrokenBarrierError)), errors[0])
    return common_window_rates(spans, pairs_each)


def serve(args: list[str], log_dir: Path, timeout: float = 600) -> ServeProcess:
    server = ServeProcess(args, log_dir)
    try:
        server.wait_ready(timeout)
    except BaseException:
        server.stop()
        raise
    return server


def engine_round(engine: str, model: Path, bodies: list[bytes], pairs_each: int, tmp: Path) -> dict:
    backend, dtype = engine.split(":")
    args = ["--model", f"{SERVED_NAME}={model}", "--backend", backend, "--dtype", dtype, "--backend-choice", "rules",
            "--threads", "1", "--max-passages", "1000"]
    alone = serve(args, tmp)
    try:
        one = run_clients([alone.url], bodies, pairs_each)[0]
    finally:
        alone.stop()
    a, b = serve(args, tmp), None
    try:
        b = serve(args, tmp)
        pair = run_clients([a.url, b.url], bodies, pairs_each)
    finally:
        a.stop()
        if b is not None:
            b.stop()
    return {"alone": one, "pair": pair}


def served_engine(url: str) -> str:
    """The engine a server (a replica of it, behind Ray) serves, from TEI /info's `engine` object."""
    engine = httpx.get(f"{url}/info", timeout=30).json().get("engine") or {}
    lanes = engine.get("lanes")
    return f"{engine.get('backend')}:{engine.get('dtype')}" + (f", {lanes} lane(s)" if lanes else "")


def ray_round(model: Path, bodies: list[bytes], pairs_each: int, tmp: Path, engine: str | None,
              routers: list[str]) -> tuple[dict[str, float], dict[str, str]]:
    """pairs/s of two clients together: on 1 replica ("1"), and on 2 replicas with each router; and the
    engine each setup served (without --ray-engine, the replicas' own auto choice)."""
    out, engines = {}, {}
    for name, replicas, router in [("1", 1, None)] + [(f"2 {r}", 2, r) for r in routers]:
        args = ["--model", f"{SERVED_NAME}={model}", "--replicas", str(replicas), "--threads", "1",
                "--replica-cpus", "1", "--max-passages", "1000"]
        if router not in (None, "default"):
            args += ["--replica-option", f"router={router}"]
        if engine:
            backend, dtype = engine.split(":")
            args += ["--backend", backend, "--dtype", dtype]
        server = serve(args, tmp, timeout=900)
        try:
            engines[name] = served_engine(server.url)
            out[name] = sum(run_clients([server.url] * 2, bodies, pairs_each))
        finally:
            server.stop()
    return out, engines


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--engine", action="append", default=[], help=f"BACKEND:DTYPE (default: {', '.join(ENGINES)})")
    p.add_argument("--queries", type=int, default=4, help="requests per client and configuration")
    p.add_argument("--passages", type=int, default=100)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--ray", action="store_true", help="also Ray Serve: 2 replicas against 1 (needs the ray extra)")
    p.add_argument("--ray-engine", help="BACKEND:DTYPE of the replicas (default: the server's auto choice)")
    p.add_argument("--only-ray", action="store_true", help="Ray Serve only, no engine pairs")
    p.add_argument("--ray-router", action="append", default=[],
                   help="request router of the 2-replica setup (ReplicaOptions.router), repeatable "
                        "(default: the server's own)")
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    if default_threads() < 2:
        print("side_by_side.py needs at least two CPUs", file=sys.stderr)
        return 2
    engines = [] if args.only_ray else args.engine or list(ENGINES)
    args.ray = args.ray or args.only_ray
    routers = args.ray_router or ["default"]
    wl = load_workload(default_data_dir(), "runs/bm25_top100.trec.gz", args.queries + 1, args.passages)
    bodies = [nim_body(q, ps) for q, ps in zip(wl.queries, wl.passages, strict=True)][: args.queries]
    pairs_each = args.passages
    load_start = os.getloadavg()
    results: dict = {e: [] for e in engines}
    ray: list[dict] = []
    ray_engines: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        model = build_bench_cross_encoder(tmp / "bench-cross-encoder")
        for r in range(args.rounds):
            order = engines if r % 2 == 0 else engines[::-1]
            for engine in order:
                res = engine_round(engine, model, bodies, pairs_each, tmp)
                results[engine].append(res)
                each = ", ".join(f"{x:.1f}" for x in res["pair"])
                ratio = ", ".join(f"{x / res['alone']:.2f}x" for x in res["pair"])
                print(f"round {r + 1}: {engine}: alone {res['alone']:.1f} pairs/s, two at once {each} pairs/s "
                      f"({ratio})", flush=True)
            if args.ray:
                res, served = ray_round(model, bodies, pairs_each, tmp, args.ray_engine,
                                        routers if r % 2 == 0 else routers[::-1])
                ray.append(res)
                ray_engines.append(served)
                twos = ", ".join(f"2 replicas ({k[2:]}) {v:.1f} pairs/s ({v / res['1']:.2f}x)"
                                 for k, v in res.items() if k != "1")
                kinds = "; ".join(f"{k}: {v}" for k, v in served.items())
                print(f"round {r + 1}: ray: 1 replica {res['1']:.1f} pairs/s, {twos} (engines {kinds})", flush=True)
    print(f"\n{cpu_name()}, {default_threads()} CPUs available; load {load_start} -> {os.getloadavg()}; "
          f"{args.queries} requests x {args.passages} passages per client (two at once: pairs/s while both send); "
          f"medians of {args.rounds} rounds")
    print("| engine | one alone (pairs/s) | each of two at once | ratio (min of the two) | spread of ratio |")
    print("|---|---:|---:|---:|---:|")
    summary: dict = {"cpu": cpu_name(), "load": [load_start, os.getloadavg()], "engines": {}, "ray": ray,
                     "ray_engines": ray_engines}
    for engine, runs in results.items():
        ratios = [min(r["pair"]) / r["alone"] for r in runs]
        alone = statistics.median(r["alone"] for r in runs)
        each = statistics.median(x for r in runs for x in r["pair"])
        summary["engines"][engine] = {"runs": runs, "ratio_median": statistics.median(ratios)}
        print(f"| {engine} | {alone:.1f} | {each:.1f} | {statistics.median(ratios):.2f}x | "
              f"{min(ratios):.2f}-{max(ratios):.2f} |")
    for router in routers if ray else []:
        ratios = [r[f"2 {router}"] / r["1"] for r in ray]
        print(f"| ray 2 replicas ({router}) / 1 | {statistics.median(r['1'] for r in ray):.1f} | "
              f"{statistics.median(r[f'2 {router}'] for r in ray):.1f} (both) | {statistics.median(ratios):.2f}x | "
              f"{min(ratios):.2f}-{max(ratios):.2f} |")
    if args.json:
        args.json.write_text(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""`openrerank bench --scale-out`: does throughput grow with Ray Serve replicas, and what does the proxy cost?

An emulation of N machines on one: every replica (and the direct server it is compared with) runs in its
own cgroup-v1 CPU quota (default 0.5 CPU, one intra-op thread), so N replicas get N equal CPU shares while
Ray's proxy, its daemons and the load generator run outside the quotas. Configurations: a direct
`openrerank serve` process (the single-process baseline), then Ray Serve with 1, 2, 3 replicas of the same
app; rounds are interleaved (direct, 1, 2, 3, then backwards) so drifting machine load spreads over all.

Load: real DL19 requests of 100 BM25 passages (bench.py's workload and MiniLM-L6 cross-encoder), from a
closed loop of `clients per replica x N` concurrent clients sending `requests per replica x N` requests after
one unmeasured request each; throughput = requests / makespan, with p50/p99 of their latencies. Every
non-200 answer or transport error counts as a failure.

It shows that routing, per-replica batching and back-pressure scale; not network effects between machines.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from openrerank.server.ray_local import set_ray_env
from openrerank_bench.runners import SERVED_NAME, nim_body
from openrerank_bench.serve_process import ServeProcess, free_port
from openrerank_bench.workload import build_bench_cross_encoder, default_data_dir, load_workload

CGROUP_CPU = Path("/sys/fs/cgroup/cpu")
_PERIOD_US = 100_000


class CpuQuotas:
    """One cgroup-v1 CPU quota per process ("a node each"); removed again at the end. Without a writable
    cgroup-v1 cpu controller every process is left as it is and the results say so."""

    def __init__(self, quota_cpus: float) -> None:
        self.quota_cpus = quota_cpus
        self.prefix = f"openrerank-bench-{os.getpid()}"
        self.created: list[Path] = []
        self.available = (CGROUP_CPU / "cgroup.procs").is_file() and os.access(CGROUP_CPU, os.W_OK)

    def place(self, pid: int, name: str) -> bool:
        if not self.available:
            return False
        group = CGROUP_CPU / f"{self.prefix}-{name}"
        if not group.is_dir():
            group.mkdir()
            self.created.append(group)
            (group / "cpu.cfs_period_us").write_text(str(_PERIOD_US))
            (group / "cpu.cfs_quota_us").write_text(str(int(self.quota_cpus * _PERIOD_US)))
        (group / "cgroup.procs").write_text(str(pid))  # moves every thread of the process
        return True

    def throttling(self) -> dict[str, float]:
        """Share of scheduler periods in which each group hit its quota (evidence that the quota binds)."""
        out = {}
        for group in self.created:
            stat = dict(line.split() for line in (group / "cpu.stat").read_text().splitlines())
            periods = int(stat.get("nr_periods", 0))
            out[group.name.removeprefix(self.prefix + "-")] = round(int(stat["nr_throttled"]) / periods, 3) \
                if periods else 0.0
        return out

    def remove(self) -> None:
        for group in self.created:
            with contextlib.suppress(OSError):
                for pid in (group / "cgroup.procs").read_text().split():  # survivors go back to the root
                    (CGROUP_CPU / "cgroup.procs").write_text(pid)
                group.rmdir()


def measure(url: str, bodies: list[bytes], clients: int, requests: int) -> dict:
    """`clients` closed-loop clients send `requests` requests in all, after one unmeasured request each.

    Throughput is requests / makespan (first send to last answer). Completions come in clusters (the
    scheduler batches concurrent requests together), so counting them inside a time window would be off by
    a whole cluster; a fixed amount of work is not."""
    import httpx

    from openrerank.server.ray_replica import REPLICA_HEADER

    per_replica: dict[str, int] = {}
    trace: list[tuple[str, float, float]] = []  # (replica, sent at, latency) of every measured request
    t0 = time.perf_counter()

    async def go() -> tuple[list[float], int, float]:
        latencies: list[float] = []
        failures = 0
        limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
        async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits,
                                     headers={"content-type": "application/json"}) as client:

            async def send(i: int, record: bool) -> None:
                nonlocal failures
                t = time.perf_counter()
                try:
                    response = await client.post("/v1/ranking", content=bodies[i % len(bodies)])
                    ok = response.status_code == 200
                except httpx.HTTPError:
                    ok = False
                if not ok:
                    failures += 1
                elif record:
                    end = time.perf_counter()
                    latencies.append(end - t)
                    replica = response.headers.get(REPLICA_HEADER, "direct")
                    per_replica[replica] = per_replica.get(replica, 0) + 1
                    trace.append((replica, round(t - t0, 3), round(end - t, 3)))

            await asyncio.gather(*(send(k, False) for k in range(clients)))  # warm: every replica busy once
            queue = iter(range(requests))

            async def worker() -> None:
                for i in queue:
                    await send(i, True)

            started = time.perf_counter()
            await asyncio.gather(*(worker() for _ in range(clients)))
            return latencies, failures, time.perf_counter() - started

    latencies, failures, wall = asyncio.run(go())
    return {"requests_per_s": len(latencies) / wall,
            "p50_ms": float(np.percentile(latencies, 50)) * 1e3 if latencies else float("nan"),
            "p99_ms": float(np.percentile(latencies, 99)) * 1e3 if latencies else float("nan"),
            "completed": len(latencies), "seconds": wall, "failures": failures, "clients": clients,
            "answered_by": sorted(per_replica.values(), reverse=True), "trace": trace}


class RayReplicas:
    """A local Ray cluster (loopback only) whose openrerank app is rescaled between measurements."""

    def __init__(self, model: str, backend: str, dtype: str, quota_cpus: float, quotas: CpuQuotas) -> None:
        import ray
        from ray import serve

        from openrerank.server.config import ServerConfig

        self.ray, self.serve = ray, serve
        self.quotas = quotas
        self.quota_cpus = quota_cpus
        self.config = ServerConfig(models=[model], backend=backend, dtype=dtype, log_level="warning")
        ray.init(address="local", num_cpus=os.cpu_count() or 2, include_dashboard=False, log_to_driver=False,
                 object_store_memory=128 * 2**20, logging_level="ERROR")
        self.port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": self.port})
        self.url = f"http://127.0.0.1:{self.port}"
        self.placed: set[str] = set()

    def scale(self, replicas: int, router: str | None = None) -> list[int]:
        """Run `replicas` replicas, each in its own quota (a lightweight update where only the count changes:
        existing ones stay; another `router` replaces them), routed by `router` (default: the server's)."""
        from openrerank.server.ray_serve import APP_NAME, ReplicaOptions, bind

        options = ReplicaOptions(num_replicas=replicas, num_cpus=self.quota_cpus,
                                 **({"router": router} if router else {}))
        self.serve.run(bind(self.config, options), name=APP_NAME, route_prefix="/")
        deadline = time.monotonic() + 120
        while True:
            names = [a["name"] for a in self.ray.util.list_named_actors(all_namespaces=True)
                     if a["name"].startswith(f"SERVE_REPLICA::{APP_NAME}#")]
            if len(names) == replicas or time.monotonic() > deadline:
                break
            time.sleep(0.5)  # replicas being removed are still listed for a moment
        pids = []
        for name in names:
            actor = self.ray.get_actor(name, namespace="serve")
            pid = self.ray.get(actor.__ray_call__.remote(lambda _: os.getpid()), timeout=60)
            tag = name.rsplit("#", 1)[1]
            if tag not in self.placed:
                self.quotas.place(pid, f"replica-{tag}")
                self.placed.add(tag)
            pids.append(pid)
        return pids

    def close(self) -> None:
        try:
            self.serve.shutdown()
        finally:
            self.ray.shutdown()


def _uptime() -> str:
    try:
        return Path("/proc/loadavg").read_text().strip()
    except OSError:  # pragma: no cover
        return ""


def run_scaleout(args: argparse.Namespace) -> int:
    from rich.console import Console

    from openrerank.cli.main import main as cli_main

    set_ray_env()  # before anything imports ray: it reads them at import
    console = Console(stderr=True)
    data = Path(args.data) if args.data else default_data_dir()
    if not data.is_dir():
        console.print(f"[red]no benchmark data at {data}; pass --data DIR[/red]")
        return 2
    backend, _, dtype = args.scale_out_backend.partition(":")
    counts = args.replica_counts  # a list, parsed by cli.count_list
    args.passages = args.passages or 100
    wl = load_workload(data, args.run, args.queries, args.passages)
    bodies = [nim_body(q, ps) for q, ps in zip(wl.queries, wl.passages, strict=True)]
    quotas = CpuQuotas(args.cpu_quota)
    result: dict = {
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "command": " ".join(["openrerank", *sys.argv[1:]]),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "loadavg_start": _uptime()},
        "method": {"cpu_quota_per_node": args.cpu_quota if quotas.available else None,
                   "isolation": "cgroup-v1 cpu quota per process" if quotas.available
                   else "none available: 1 intra-op thread per replica only",
                   "clients_per_node": args.clients_per_replica, "requests_per_node": args.requests_per_replica,
                   "rounds": args.rounds, "engine": f"{backend} {dtype}", "passages_per_request": args.passages,
                   "requests": len(bodies)},
        "rounds": [],
    }
    console.print(f"load before: {result['machine']['loadavg_start']}; isolation: {result['method']['isolation']}")
    routers = [r for r in args.scale_out_routers.split(",") if r]
    # One replica is routed the same by any router; more are measured with each router asked for.
    configs = ["direct", *[f"ray-{n}" for n in counts if n == 1 or not routers],
               *[f"ray-{n}/{r}" for r in routers for n in counts if n > 1]]
    with tempfile.TemporaryDirectory(prefix="openrerank-scaleout-") as tmp:
        model_dir = build_bench_cross_encoder(Path(tmp) / "minilm-l6-ce")
        # Export once up front (the documented path for images), so no configuration pays for the export.
        if backend == "onnx" and cli_main(["export", "--model", str(model_dir), "--dtype", dtype]) != 0:
            return 2
        model = f"{SERVED_NAME}={model_dir}"
        direct = ServeProcess(["--model", model, "--backend", backend, "--dtype", dtype, "--threads", "1",
                               "--log-level", "warning"], Path(tmp))
        cluster = None
        try:
            direct.wait_ready()
            quotas.place(direct.proc.pid, "direct")
            cluster = RayReplicas(model, backend, dtype, args.cpu_quota, quotas)
            for r in range(args.rounds):
                order = configs if r % 2 == 0 else configs[::-1]
                for name in order:
                    if name == "direct":
                        url, nodes = direct.url, 1
                    else:
                        nodes, router = replica_count(name), name.partition("/")[2] or None
                        cluster.scale(nodes, router)
                        url = cluster.url
                    stats = measure(url, bodies, args.clients_per_replica * nodes, args.requests_per_replica * nodes)
                    stats |= {"config": name, "round": r + 1, "loadavg": _uptime()}
                    result["rounds"].append(stats)
                    console.print(f"round {r + 1}/{args.rounds} {name}: {stats['requests_per_s']:.3f} req/s, "
                                  f"p50 {stats['p50_ms']:.0f} ms, p99 {stats['p99_ms']:.0f} ms, "
                                  f"{stats['failures']} failures, answered by {stats['answered_by']} "
                                  f"(load {stats['loadavg']})")
            result["throttled_share"] = quotas.throttling()
        finally:
            direct.stop()
            if cluster is not None:
                cluster.close()
            quotas.remove()
    result["machine"]["loadavg_end"] = _uptime()
    result["summary"] = summarize(result["rounds"], configs)
    render(result)
    out = Path(args.json) if args.json else \
        Path("benchmarks/results") / f"scaleout-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2), encoding="utf-8")
    console.print(f"load after: {result['machine']['loadavg_end']}; wrote {out}")
    return 1 if any(r["failures"] for r in result["rounds"]) else 0


def replica_count(config: str) -> int:
    """`ray-N` or `ray-N/ROUTER` -> N."""
    return int(config.split("-", 1)[1].partition("/")[0])


def summarize(rounds: list[dict], configs: list[str]) -> dict[str, dict]:
    """Per configuration: the median over rounds, the spread, and ratios to 1 replica and to the direct server."""
    out: dict[str, dict] = {}
    for name in configs:
        rows = [r for r in rounds if r["config"] == name]
        rates = [r["requests_per_s"] for r in rows]
        out[name] = {"requests_per_s": float(np.median(rates)), "rounds_requests_per_s": [round(x, 3) for x in rates],
                     "spread": round((max(rates) - min(rates)) / float(np.median(rates)), 3),
                     "p50_ms": float(np.median([r["p50_ms"] for r in rows])),
                     "p99_ms": float(np.median([r["p99_ms"] for r in rows])),
                     "failures": sum(r["failures"] for r in rows)}
    one = out.get("ray-1", {}).get("requests_per_s")
    base = out["direct"]["requests_per_s"]
    by_round = {(r["config"], r["round"]): r["requests_per_s"] for r in rounds}
    for name, row in out.items():
        row["x_direct"] = row["requests_per_s"] / base
        if one and name.startswith("ray-"):
            n = replica_count(name)
            row["x_one_replica"] = row["requests_per_s"] / one
            row["efficiency"] = row["x_one_replica"] / n
            # Within one round the two were measured minutes apart, not a whole run: less exposed to drift.
            paired = [by_round[name, r] / by_round["ray-1", r] for _, r in by_round if _ == name]
            row["x_one_replica_per_round"] = [round(x, 2) for x in paired]
        if name == "ray-1":
            row["x_direct_per_round"] = [round(by_round[name, r] / by_round["direct", r], 2)
                                         for c, r in by_round if c == name]
    return out


def render(result: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    m = result["method"]
    t = Table(title=f"openrerank bench --scale-out: {m['passages_per_request']}-passage requests, {m['engine']}, "
              f"{m['isolation']} ({m['cpu_quota_per_node']} CPU per node), medians of {m['rounds']} rounds")
    for col in ("configuration", "req/s", "pairs/s", "x 1 replica", "per round", "efficiency", "x direct",
                "per round", "p50 ms", "p99 ms", "p99/p50", "spread", "failures"):
        t.add_column(col, justify="right")
    for name, row in result["summary"].items():
        pairs = row["requests_per_s"] * m["passages_per_request"]
        t.add_row(
            "direct server (1 node)" if name == "direct" else
            f"Ray Serve, {replica_count(name)} replica(s)" + (f", {name.partition('/')[2]}" if "/" in name else ""),
            f"{row['requests_per_s']:.3f}", f"{pairs:.1f}",
            f"{row['x_one_replica']:.2f}x" if "x_one_replica" in row else "",
            " ".join(map(str, row.get("x_one_replica_per_round", []))),
            f"{row['efficiency']:.0%}" if "efficiency" in row else "", f"{row['x_direct']:.2f}x",
            " ".join(map(str, row.get("x_direct_per_round", []))),
            f"{row['p50_ms']:.0f}", f"{row['p99_ms']:.0f}", f"{row['p99_ms'] / row['p50_ms']:.2f}",
            f"±{row['spread'] / 2:.0%}", str(row["failures"]))
    Console(width=max(Console().width, 200)).print(t)

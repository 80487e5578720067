"""Lanes against one lane, by request size: what running two batches at once does to one request's latency.

`openrerank bench --lanes 1,2` gives the throughput side (100-passage requests back to back). This script
looks at the other side: a single client sending requests of 1, 4, 16 and 100 DL19 passages, one at a time,
through the public served-model path (tokenization, scheduler, lanes, runtime) of the MiniLM-L6
cross-encoder. A small request is one batch, which the scheduler halves over the lanes (`planning.spread`),
so each half runs on one lane's share of the threads. Every request is sent to each lane count back to back,
in rotating order, so drifting machine load lands on all of them alike; the figure is the median latency
and the median of the per-request ratios.

    .venv/bin/python benchmarks/lanes.py --engine openvino:fp32 --engine onnx:fp32 --lanes 1,2
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

from openrerank_bench.cli import _cpu_model, lanes_env, load_average
from openrerank_bench.runners import OfflineRunner
from openrerank_bench.workload import build_bench_cross_encoder, default_data_dir, load_workload


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--engine", action="append", help="BACKEND:DTYPE (repeatable; default openvino:fp32)")
    p.add_argument("--lanes", default="1,2", help="comma-separated lane counts to compare (first: the baseline)")
    p.add_argument("--sizes", default="1,4,16,100", help="passages per request")
    p.add_argument("--queries", type=int, default=8, help="DL19 queries: requests per size and round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    engines = args.engine or ["openvino:fp32"]
    lanes = [int(n) for n in args.lanes.split(",")]
    sizes = [int(n) for n in args.sizes.split(",")]
    wl = load_workload(default_data_dir(), "runs/bm25_top100.trec.gz", args.queries, max(sizes))
    print(f"CPU: {_cpu_model()}; load average {load_average()}", file=sys.stderr)
    loop = asyncio.new_event_loop()
    result: dict = {"cpu": _cpu_model(), "load_average_start": load_average(), "command": " ".join(sys.argv),
                    "engines": {}}
    with tempfile.TemporaryDirectory(prefix="openrerank-lanes-") as tmp:
        model_dir = build_bench_cross_encoder(Path(tmp) / "minilm-l6-ce")
        for engine in engines:
            backend, dtype = engine.split(":")
            runners = {}
            for n in lanes:
                with lanes_env(n):
                    runners[n] = OfflineRunner(model_dir, backend, dtype, args.threads, loop)
            result["engines"][engine] = measure(runners, wl, sizes, args.rounds, loop)
            for runner in runners.values():
                runner.close()
    result["load_average_end"] = load_average()
    report(result, lanes)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2), encoding="utf-8")
    return 0


def measure(runners: dict[int, OfflineRunner], wl, sizes: list[int], rounds: int, loop) -> dict:
    """Per size: each lane count's latencies (ms), every request sent to each lane count back to back."""
    from openrerank.core.requests import RerankRequest, Truncate

    order = list(runners)
    lat: dict[int, dict[int, list[float]]] = {s: {n: [] for n in order} for s in sizes}

    async def one(runner: OfflineRunner, req) -> float:
        t = time.perf_counter()
        await runner.served.rerank(req)
        return (time.perf_counter() - t) * 1e3

    for size in sizes:  # warm-up: every shape once per runner
        for q, ps in zip(wl.queries, wl.passages, strict=True):
            for runner in runners.values():
                loop.run_until_complete(one(runner, RerankRequest(q, ps[:size], truncate=Truncate.END)))
    turn = 0
    for _ in range(rounds):
        for size in sizes:
            for q, ps in zip(wl.queries, wl.passages, strict=True):
                req = RerankRequest(q, ps[:size], truncate=Truncate.END)
                turn += 1
                for n in order[turn % len(order):] + order[:turn % len(order)]:
                    lat[size][n].append(loop.run_until_complete(one(runners[n], req)))
    return {str(s): {str(n): v for n, v in by_lanes.items()} for s, by_lanes in lat.items()}


def report(result: dict, lanes: list[int]) -> None:
    base = str(lanes[0])
    print(f"CPU {result['cpu']}; load average {result['load_average_start']} -> {result['load_average_end']}")
    for engine, by_size in result["engines"].items():
        for size, by_lanes in by_size.items():
            cells = []
            for n, values in by_lanes.items():
                ratios = [a / b for a, b in zip(values, by_lanes[base], strict=True)]
                cells.append(f"{n} lanes {statistics.median(values):7.1f} ms (x {statistics.median(ratios):.2f}, "
                             f"quartiles {statistics.quantiles(ratios, n=4)[0]:.2f}-"
                             f"{statistics.quantiles(ratios, n=4)[2]:.2f})")
            print(f"{engine:14s} {size:>4s} passages: " + "; ".join(cells))


if __name__ == "__main__":
    sys.exit(main())

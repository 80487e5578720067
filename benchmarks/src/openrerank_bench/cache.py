"""`openrerank bench-cache`: what the pair-score cache (`serve --score-cache-mb`) buys on a repeat workload.

The workload imitates RAG agents and chat front-ends over one document store, built from the DL19 queries
and their BM25 rankings (seeded, so every run sends the same requests):

- which question: Zipf-distributed over the 43 DL19 queries (exponent 1.1), so a few are asked often;
- how it is worded: 60% the exact text again (agent retries, multi-step plans re-ranking the same
  question, several users on one FAQ), 40% a rewording (a trailing "?", lower case, "tell me about ..."),
  which is another query for an exact cache and misses;
- what is reranked: the top-20 of the BM25 ranking, 70% of the time exactly, 30% shifted by 1-3 places
  (retrieval jitter: a few new passages, the rest seen before).

The same requests go to two real servers, one without the cache and one with it, in interleaved rounds;
the table shows throughput, latency, the cache's hit rate (from /v1/metrics) and the ratios.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from openrerank_bench.runners import SERVED_NAME, nim_body, run_http_concurrent
from openrerank_bench.serve_process import ServeProcess
from openrerank_bench.workload import DATASET, build_bench_cross_encoder, default_data_dir, load_workload

REWORDINGS = (lambda q: q.rstrip("?") + "?", str.lower, lambda q: f"tell me about {q}")


def repeat_workload(queries: list[str], rankings: list[list[str]], requests: int, top_k: int,
                    seed: int = 0) -> list[tuple[str, list[str]]]:
    """(query, passages) requests following the mix in the module docstring."""
    rng = np.random.default_rng(seed)
    weights = 1.0 / np.arange(1, len(queries) + 1) ** 1.1
    order = rng.permutation(len(queries))  # which queries are the popular ones
    out = []
    for _ in range(requests):
        qi = int(order[rng.choice(len(queries), p=weights / weights.sum())])
        query = queries[qi]
        if rng.random() >= 0.6:
            query = REWORDINGS[int(rng.integers(len(REWORDINGS)))](query)
        shift = 0 if rng.random() < 0.7 else int(rng.integers(1, 4))
        out.append((query, rankings[qi][shift:shift + top_k]))
    return out


def _cache_counts(url: str) -> tuple[float, float]:
    import httpx

    text = httpx.get(f"{url}/v1/metrics", timeout=10).text

    def total(name: str) -> float:
        return sum(float(v) for v in re.findall(rf"^{name}{{[^}}]*}} (\S+)$", text, flags=re.M))

    hits = total("openrerank_score_cache_hits_total") + total("openrerank_score_cache_shared_total")
    return hits, total("openrerank_score_cache_misses_total")


def run_bench_cache(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from openrerank_bench.cli import load_average

    console = Console(stderr=True)
    data = Path(args.data) if args.data else default_data_dir()
    if not data.is_dir():
        console.print(f"[red]no benchmark data at {data}; pass --data DIR[/red]")
        return 2
    wl = load_workload(data, "runs/bm25_top100.trec.gz", None, args.top_k + 3)
    reqs = repeat_workload(wl.queries, wl.passages, args.requests, args.top_k, args.seed)
    bodies = [nim_body(q, ps) for q, ps in reqs]
    sizes = [len(ps) for _, ps in reqs]
    distinct = len({(q, p) for q, ps in reqs for p in ps})
    console.print(f"{len(reqs)} requests, {sum(sizes)} pairs, {distinct} distinct (query, passage) pairs "
                  f"(at most {1 - distinct / sum(sizes):.0%} can hit); load average {load_average()}")
    result: dict = {"workload": {"requests": len(reqs), "pairs": sum(sizes), "distinct_pairs": distinct,
                                 "top_k": args.top_k, "clients": args.clients, "seed": args.seed},
                    "engine": f"{args.backend}:{args.dtype}", "load_average_start": load_average(),
                    "command": " ".join(["openrerank", *sys.argv[1:]]), "rounds": {"off": [], "on": []}}
    with tempfile.TemporaryDirectory(prefix="openrerank-bench-cache-") as tmp:
        if args.model == "default":
            model = "default"
        else:
            model = str(build_bench_cross_encoder(Path(tmp) / "minilm-l6-ce"))
        base = ["--model", f"{SERVED_NAME}={model}", "--backend", args.backend, "--dtype", args.dtype,
                "--log-level", "warning", *(["--threads", str(args.threads)] if args.threads else [])]
        for r in range(args.rounds):
            for mode in ("off", "on"):
                extra = ["--score-cache-mb", str(args.score_cache_mb)] if mode == "on" else []
                server = ServeProcess([*base, *extra], Path(tmp))
                try:
                    server.wait_ready()
                    stats = run_http_concurrent(server.url, bodies, sizes, args.clients, len(bodies))
                    if mode == "on":
                        hits, misses = _cache_counts(server.url)
                        stats["hit_rate"] = hits / max(1.0, hits + misses)
                finally:
                    server.stop()
                result["rounds"][mode].append(stats)
                console.print(f"round {r + 1}/{args.rounds}, cache {mode}: {stats['pairs_per_s']:.1f} pairs/s, "
                              f"p50 {stats['p50_ms']:.0f} ms" + (f", hit rate {stats['hit_rate']:.1%}"
                                                                 if mode == "on" else ""))
    result["load_average_end"] = load_average()
    best = {m: max(rs, key=lambda s: s["pairs_per_s"]) for m, rs in result["rounds"].items()}
    t = Table(title=f"score cache on a repeat workload: {len(reqs)} requests x top-{args.top_k}, "
              f"{args.clients} clients, engine {args.backend}:{args.dtype}; load {result['load_average_start']} -> "
              f"{result['load_average_end']}")
    for c in ("cache", "pairs/s (best)", "rounds", "p50 ms", "p99 ms", "hit rate", "x no cache"):
        t.add_column(c, justify="right")
    for mode in ("off", "on"):
        b = best[mode]
        t.add_row(mode if mode == "off" else f"{args.score_cache_mb:g} MB", f"{b['pairs_per_s']:.1f}",
                  " ".join(f"{s['pairs_per_s']:.0f}" for s in result["rounds"][mode]), f"{b['p50_ms']:.0f}",
                  f"{b['p99_ms']:.0f}", f"{b['hit_rate']:.1%}" if "hit_rate" in b else "",
                  f"{b['pairs_per_s'] / best['off']['pairs_per_s']:.2f}x")
    Console(width=max(Console().width, 150)).print(t)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = Path(args.json) if args.json else Path("benchmarks/results") / f"bench-cache-{stamp}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2), encoding="utf-8")
    console.print(f"wrote {out}")
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench-cache", help="benchmark the pair-score cache on a repeat (RAG agent) workload",
                       description=__doc__.split("\n\n")[0])
    p.add_argument("--data", help=f"BEIR folder of {DATASET} (default: ../shared/data/{DATASET})")
    p.add_argument("--model", choices=("cross-encoder", "default"), default="cross-encoder")
    p.add_argument("--backend", default="auto")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--requests", type=int, default=300, help="requests in the workload")
    p.add_argument("--top-k", type=int, default=20, help="passages reranked per request")
    p.add_argument("--clients", type=int, default=4, help="concurrent clients")
    p.add_argument("--score-cache-mb", type=float, default=64.0)
    p.add_argument("--rounds", type=int, default=2, help="interleaved rounds (off, on, off, on, ...)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="where to write the JSON result")
    p.set_defaults(func=run_bench_cache)

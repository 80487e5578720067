"""`openrerank bench`: throughput and latency of each backend against the usual PyTorch baseline, one run.

Workload: the TREC DL19 queries with their BM25 top-100 passages (real MS MARCO text), sent as 100-passage
requests. Model: a cross-encoder with the MiniLM-L6 architecture built from the packaged all-MiniLM-L6-v2
weights plus a seeded one-logit head (the compute of ms-marco-MiniLM-L-6-v2; its scores are not
meaningful rankings, its speed is). Baseline: `sentence_transformers.CrossEncoder.predict` (PyTorch fp32,
default batch size) on the same pairs, measured in the same run, so every figure is also a ratio.

Per backend/dtype: pairs/s in-process (through the served model's scheduler), pairs/s and latency through
the real HTTP server, the share of client-side time spent outside the model (HTTP, JSON, tokenization,
queueing), and 16 concurrent clients. Results go to a rich table and a JSON file.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from openrerank.serve_process import ServeProcess

DEFAULT_CONFIGS = ("torch:fp32", "torch:bf16", "onnx:fp32", "onnx:int8")
SERVED_NAME = "bench-minilm-l6-ce"
_DATASET = "msmarco-trec-dl19-pooled"


@dataclass
class Workload:
    queries: list[str]
    passages: list[list[str]]

    @property
    def pairs(self) -> int:
        return sum(len(p) for p in self.passages)


def default_data_dir() -> Path:
    """`../shared/data/<dl19>` next to the checkout (or the current directory's parent)."""
    candidates = [Path(__file__).resolve().parents[3].parent, Path.cwd().parent, Path.cwd()]
    for base in candidates:
        path = base / "shared" / "data" / _DATASET
        if path.is_dir():
            return path
    return candidates[0] / "shared" / "data" / _DATASET


def load_workload(data: Path, run_file: str, queries: int | None, passages: int) -> Workload:
    from openrerank.eval.data import load_dataset, read_trec_run
    from openrerank.eval.metrics import ranked

    ds = load_dataset(data, split="test_full", limit_queries=queries)
    run = read_trec_run(data / run_file)
    qs, ps = [], []
    for qid, text in ds.queries.items():
        docs = [d for d, _ in ranked(run.get(qid, {}))[:passages] if d in ds.corpus]
        if docs:
            qs.append(text)
            ps.append([ds.corpus[d].passage() for d in docs])
    if not qs:
        raise SystemExit(f"{data}: no query of the split has candidates in {run_file}")
    return Workload(qs, ps)


def build_bench_cross_encoder(out: Path, seed: int = 0) -> Path:
    """BertForSequenceClassification(num_labels=1) with the packaged MiniLM-L6 encoder weights, saved like a hub model.

    The head is seeded, so the saved weights are byte-identical across runs and the ONNX cache stays valid.
    """
    import torch
    from transformers import AutoTokenizer, BertForSequenceClassification

    from openrerank.models.source import default_model_dir

    src = default_model_dir()
    torch.manual_seed(seed)
    model = BertForSequenceClassification.from_pretrained(str(src), num_labels=1, local_files_only=True).eval()
    model.save_pretrained(out, safe_serialization=True)
    AutoTokenizer.from_pretrained(str(src), local_files_only=True).save_pretrained(out)
    return out


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


class Baseline:
    """sentence-transformers CrossEncoder.predict, default batch size, one call per 100-passage request."""

    def __init__(self, model_dir: Path, max_length: int) -> None:
        import torch
        from sentence_transformers import CrossEncoder

        # Identity activation: compare raw logits (a one-label CrossEncoder applies a sigmoid by default).
        self.ce = CrossEncoder(str(model_dir), device="cpu", max_length=max_length,
                               activation_fn=torch.nn.Identity(), local_files_only=True)

    def measure(self, wl: Workload) -> tuple[dict, list[np.ndarray]]:
        self.ce.predict([(wl.queries[0], p) for p in wl.passages[0]], show_progress_bar=False)  # warm-up
        scores, lat = [], []
        started = time.perf_counter()
        for q, ps in zip(wl.queries, wl.passages, strict=True):
            t = time.perf_counter()
            scores.append(np.asarray(self.ce.predict([(q, p) for p in ps], show_progress_bar=False),
                                     np.float32).ravel())
            lat.append(time.perf_counter() - t)
        wall = time.perf_counter() - started
        return {"pairs_per_s": wl.pairs / wall, "p50_ms": percentile(lat, 50) * 1e3,
                "p95_ms": percentile(lat, 95) * 1e3, "seconds": wall}, scores

    def close(self) -> None:
        del self.ce


class OfflineRunner:
    """One served model in-process, scored through the public path: tokenization + scheduler + backend."""

    def __init__(self, model_dir: Path, backend: str, dtype: str, threads: int | None,
                 loop: asyncio.AbstractEventLoop) -> None:
        from openrerank.engine.loading import LoadOptions
        from openrerank.engine.scheduler import SchedulerConfig
        from openrerank.engine.served import load_served_model
        from openrerank.models.source import ModelSource

        self.loop = loop
        t = time.perf_counter()
        self.served = load_served_model(ModelSource(SERVED_NAME, str(model_dir)),
                                        LoadOptions(backend=backend, dtype=dtype, threads=threads),
                                        SchedulerConfig(), None)
        self.load_seconds = time.perf_counter() - t
        self.description = self.served.loaded.backend.description
        loop.run_until_complete(self.served.scheduler.start())

    def measure(self, wl: Workload) -> tuple[dict, list[np.ndarray]]:
        from openrerank.schemas.internal import RerankRequest, Truncate

        reqs = [RerankRequest(query=q, passages=ps, truncate=Truncate.END)
                for q, ps in zip(wl.queries, wl.passages, strict=True)]

        async def go() -> tuple[list[np.ndarray], list[float], list[float], float]:
            await self.served.rerank(reqs[0])  # warm-up at full size
            out, lat, inf = [], [], []
            started = time.perf_counter()
            for req in reqs:
                t = time.perf_counter()
                res = await self.served.rerank(req)
                lat.append(time.perf_counter() - t)
                inf.append(res.timings.inference_ms / 1e3)
                out.append(np.asarray(res.logits, np.float32))
            return out, lat, inf, time.perf_counter() - started

        scores, lat, inf, wall = self.loop.run_until_complete(go())
        return {"pairs_per_s": wl.pairs / wall, "p50_ms": percentile(lat, 50) * 1e3,
                "p95_ms": percentile(lat, 95) * 1e3, "model_share": sum(inf) / sum(lat),
                "seconds": wall, "load_seconds": self.load_seconds, "runtime": self.description}, scores

    def close(self) -> None:
        self.loop.run_until_complete(self.served.scheduler.stop())
        self.served.loaded.close()


def _best(runs: list[dict]) -> dict:
    """The fastest of the rounds (the one least disturbed by other load), with every round's rate kept."""
    best = max(runs, key=lambda r: r["pairs_per_s"])
    return {**best, "rounds_pairs_per_s": [round(r["pairs_per_s"], 2) for r in runs]}


def _body(query: str, passages: list[str]) -> bytes:
    return json.dumps({"model": SERVED_NAME, "query": {"text": query},
                       "passages": [{"text": p} for p in passages], "truncate": "END"}).encode()


def run_http_sequential(url: str, wl: Workload) -> dict:
    """One client, one 100-passage request at a time: latency and where the time goes."""
    import httpx

    bodies = [_body(q, ps) for q, ps in zip(wl.queries, wl.passages, strict=True)]
    headers = {"content-type": "application/json"}
    lat, inf, tot = [], [], []
    with httpx.Client(base_url=url, timeout=300, headers=headers) as client:
        client.post("/v1/ranking", content=bodies[0]).raise_for_status()  # warm-up
        started = time.perf_counter()
        for body in bodies:
            t = time.perf_counter()
            r = client.post("/v1/ranking", content=body)
            lat.append(time.perf_counter() - t)
            r.raise_for_status()
            inf.append(float(r.headers.get("x-inference-time", "nan")) / 1e3)
            tot.append(float(r.headers.get("x-total-time", "nan")) / 1e3)
        wall = time.perf_counter() - started
    return {"pairs_per_s": wl.pairs / wall, "p50_ms": percentile(lat, 50) * 1e3,
            "p95_ms": percentile(lat, 95) * 1e3, "model_share": sum(inf) / sum(lat),
            "server_share": sum(tot) / sum(lat), "seconds": wall}


def run_http_concurrent(url: str, wl: Workload, clients: int, requests: int) -> dict:
    """`clients` concurrent clients sending `requests` 100-passage requests in all (queries cycled)."""
    import httpx

    bodies = [_body(q, ps) for q, ps in zip(wl.queries, wl.passages, strict=True)]
    sizes = [len(ps) for ps in wl.passages]

    async def go() -> tuple[list[float], int, int, float]:
        queue: asyncio.Queue[int] = asyncio.Queue()
        for i in range(requests):
            queue.put_nowait(i % len(bodies))
        lat: list[float] = []
        done_pairs = 0
        failures = 0
        limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
        async with httpx.AsyncClient(base_url=url, timeout=300, limits=limits,
                                     headers={"content-type": "application/json"}) as client:

            async def worker() -> None:
                nonlocal done_pairs, failures
                while True:
                    try:
                        i = queue.get_nowait()
                    except asyncio.QueueEmpty:
                        return
                    t = time.perf_counter()
                    try:
                        r = await client.post("/v1/ranking", content=bodies[i])
                        ok = r.status_code == 200
                    except httpx.HTTPError:
                        ok = False
                    lat.append(time.perf_counter() - t)
                    if ok:
                        done_pairs += sizes[i]
                    else:
                        failures += 1

            started = time.perf_counter()
            await asyncio.gather(*(worker() for _ in range(clients)))
            return lat, done_pairs, failures, time.perf_counter() - started

    lat, pairs, failures, wall = asyncio.run(go())
    return {"clients": clients, "requests": requests, "pairs_per_s": pairs / wall,
            "p50_ms": percentile(lat, 50) * 1e3, "p99_ms": percentile(lat, 99) * 1e3,
            "failures": failures, "seconds": wall}


def _parity(scores: list[np.ndarray], ref: list[np.ndarray]) -> dict:
    a, b = np.concatenate(scores), np.concatenate(ref)
    diff = np.abs(a - b)
    return {"max_abs_diff": float(diff.max()), "mean_abs_diff": float(diff.mean())}


def _load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:  # pragma: no cover
        return None


def _render(result: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    base = result["baseline"]["pairs_per_s"]
    t = Table(title=f"openrerank bench: {result['workload']['requests']} requests x "
              f"{result['workload']['passages_per_request']} passages, {result['workload']['pairs']} pairs "
              f"(baseline: sentence-transformers CrossEncoder.predict fp32 = {base:.1f} pairs/s)")
    cols = ["backend", "offline pairs/s", "x base", "HTTP pairs/s", "x base", "HTTP p50/p95 ms",
            "model share", f"{result['concurrency']['clients']}c pairs/s", "/offline", "16c p50/p99 ms",
            "fail", "max|Δlogit|"]
    for c in cols:
        t.add_column(c, justify="right")
    t.add_row("baseline (st fp32)", f"{base:.1f}", "1.00x", "", "", f"{result['baseline']['p50_ms']:.0f}/"
              f"{result['baseline']['p95_ms']:.0f}", "", "", "", "", "", "")
    for row in result["backends"]:
        off, http, conc = row.get("offline", {}), row.get("http", {}), row.get("concurrent", {})
        if row.get("error"):
            t.add_row(row["name"], f"error: {row['error'][:60]}", *[""] * (len(cols) - 2))
            continue

        def f(d: dict, k: str, fmt: str = "{:.1f}") -> str:
            return fmt.format(d[k]) if k in d else "-"

        t.add_row(
            row["name"], f(off, "pairs_per_s"), f"{off['pairs_per_s'] / base:.2f}x" if off else "-",
            f(http, "pairs_per_s"), f"{http['pairs_per_s'] / base:.2f}x" if http else "-",
            f"{f(http, 'p50_ms', '{:.0f}')}/{f(http, 'p95_ms', '{:.0f}')}",
            f(http, "model_share", "{:.1%}"), f(conc, "pairs_per_s"),
            f"{conc['pairs_per_s'] / off['pairs_per_s']:.2f}x" if conc and off else "-",
            f"{f(conc, 'p50_ms', '{:.0f}')}/{f(conc, 'p99_ms', '{:.0f}')}", f(conc, "failures", "{}"),
            f(row.get("parity", {}), "max_abs_diff", "{:.1e}"),
        )
    Console(width=max(Console().width, 170)).print(t)


def run_bench(args: argparse.Namespace) -> int:
    from rich.console import Console

    from openrerank.extras import MissingExtraError, require

    console = Console(stderr=True)
    try:
        require("sentence_transformers", "bench", "openrerank bench (its baseline)")
    except MissingExtraError as exc:
        print(f"openrerank bench: error: {exc}", file=sys.stderr)
        return 2
    data = Path(args.data) if args.data else default_data_dir()
    if not data.is_dir():
        console.print(f"[red]no benchmark data at {data}; pass --data DIR[/red]")
        return 2
    configs = [c.strip() for c in args.backends.split(",") if c.strip()]
    for c in configs:
        if c.count(":") != 1:
            console.print(f"[red]--backends entries are BACKEND:DTYPE, got {c!r}[/red]")
            return 2
    wl = load_workload(data, args.run, args.queries, args.passages)
    console.print(f"workload: {len(wl.queries)} requests, {wl.pairs} pairs from {data.name}/{args.run}")
    result: dict = {
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": " ".join(["openrerank", *sys.argv[1:]]) if sys.argv else "",
        "machine": {"cpus_available": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
                    "platform": platform.platform(), "python": platform.python_version(),
                    "load_average_start": _load_average()},
        "workload": {"dataset": data.name, "run": args.run, "requests": len(wl.queries),
                     "passages_per_request": args.passages, "pairs": wl.pairs},
        "concurrency": {"clients": args.clients, "requests": args.concurrent_requests},
        "backends": [],
    }
    with tempfile.TemporaryDirectory(prefix="openrerank-bench-") as tmp:
        model_dir = build_bench_cross_encoder(Path(tmp) / "minilm-l6-ce")
        from openrerank.engine.loading import resolve_model

        max_length = resolve_model(str(model_dir)).spec.max_length
        result["model"] = {"architecture": "BertForSequenceClassification (MiniLM-L6-H384, 1 logit)",
                           "max_length": max_length}
        # Mean tokens per pair, as the model sees them.
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(model_dir))
        lengths = [len(ids) for q, ps in zip(wl.queries, wl.passages, strict=True)
                   for ids in tok([q] * len(ps), ps, truncation="only_second", max_length=max_length)["input_ids"]]
        result["workload"]["mean_tokens_per_pair"] = round(float(np.mean(lengths)), 1)

        # Offline: every engine loaded side by side, rounds interleaved (baseline, then each backend), best
        # round kept, so a burst of other load on the machine does not land on one engine only.
        loop = asyncio.new_event_loop()
        runners: dict[str, object] = {}
        rows: dict[str, dict] = {}
        baseline = Baseline(model_dir, max_length)
        for cfg in configs:
            backend, dtype = cfg.split(":")
            row = rows[cfg] = {"name": f"{backend} {dtype}", "backend": backend, "dtype": dtype}
            result["backends"].append(row)
            try:
                console.print(f"loading {cfg} ...")
                runners[cfg] = OfflineRunner(model_dir, backend, dtype, args.threads, loop)
            except Exception as exc:  # one broken config must not lose the others' numbers
                row["error"] = f"{type(exc).__name__}: {exc}"
                console.print(f"[red]{cfg} failed: {row['error']}[/red]")
        rounds: dict[str, list[dict]] = {"baseline": [], **{c: [] for c in runners}}
        ref: list[np.ndarray] = []
        for r in range(args.rounds):
            stats, ref = baseline.measure(wl)
            rounds["baseline"].append(stats)
            console.print(f"round {r + 1}/{args.rounds}: baseline {stats['pairs_per_s']:.1f} pairs/s")
            for cfg, runner in runners.items():
                stats, scores = runner.measure(wl)  # type: ignore[attr-defined]
                rounds[cfg].append(stats)
                rows[cfg]["parity"] = _parity(scores, ref)
                console.print(f"round {r + 1}/{args.rounds}: {cfg} {stats['pairs_per_s']:.1f} pairs/s, "
                              f"max|Δ| vs baseline {rows[cfg]['parity']['max_abs_diff']:.2e}")
        baseline.close()
        for cfg, runner in runners.items():
            runner.close()  # type: ignore[attr-defined]
            rows[cfg]["offline"] = _best(rounds[cfg])
        loop.close()
        result["baseline"] = _best(rounds["baseline"])

        for cfg in runners if not args.no_http else []:
            backend, dtype = cfg.split(":")
            row = rows[cfg]
            serve_args = ["--model", f"{SERVED_NAME}={model_dir}", "--backend", backend, "--dtype", dtype,
                          "--log-level", "warning", *(["--threads", str(args.threads)] if args.threads else [])]
            server = ServeProcess(serve_args, Path(tmp))
            try:
                server.wait_ready()
                console.print(f"{cfg}: HTTP, 1 client ...")
                row["http"] = run_http_sequential(server.url, wl)
                console.print(f"{cfg}: HTTP, {args.clients} clients x {args.concurrent_requests} requests ...")
                row["concurrent"] = run_http_concurrent(server.url, wl, args.clients, args.concurrent_requests)
                console.print(f"  1 client {row['http']['pairs_per_s']:.1f} pairs/s, "
                              f"{args.clients} clients {row['concurrent']['pairs_per_s']:.1f} pairs/s")
            except Exception as exc:
                row["error"] = f"{type(exc).__name__}: {exc}"
                console.print(f"[red]{cfg} HTTP failed: {row['error']}[/red]")
            finally:
                server.stop()
    result["machine"]["load_average_end"] = _load_average()
    _render(result)
    out = Path(args.json) if args.json else Path("benchmarks/results") / f"bench-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2), encoding="utf-8")
    console.print(f"wrote {out}")
    return 1 if any(r.get("error") for r in result["backends"]) else 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="benchmark backends against the sentence-transformers baseline",
                       description=__doc__.split("\n\n")[0])
    p.add_argument("--data", help=f"BEIR folder of {_DATASET} (default: ../shared/data/{_DATASET})")
    p.add_argument("--run", default="runs/bm25_top100.trec.gz", help="TREC run giving each query's candidates")
    p.add_argument("--queries", type=int, default=None, help="use the first N queries (quick run)")
    p.add_argument("--passages", type=int, default=100, help="passages per request")
    p.add_argument("--backends", default=",".join(DEFAULT_CONFIGS), help="comma-separated BACKEND:DTYPE list")
    p.add_argument("--threads", type=int, default=None, help="intra-op threads (default: cores available)")
    p.add_argument("--clients", type=int, default=16, help="concurrent HTTP clients")
    p.add_argument("--concurrent-requests", type=int, default=64, help="requests sent by the concurrent clients")
    p.add_argument("--rounds", type=int, default=2, help="offline rounds (interleaved; the best is kept)")
    p.add_argument("--no-http", action="store_true", help="offline numbers only (no server)")
    p.add_argument("--json", help="where to write the JSON result (default: benchmarks/results/bench-<time>.json)")
    p.set_defaults(func=run_bench)

"""Soak and chaos run against `openrerank serve` (not part of CI).

N clients send a mix of dialects (NIM, Cohere v1/v2, TEI, score) for a bounded time; a share of the
requests is invalid on purpose (each must get a 4xx) and a share is abandoned by its client mid-flight
(a disconnect, which the server must cancel). Printed: requests and status counts, lost = accepted -
answered (a request sent and never answered, disconnects by design excluded), p50/p99 latency of the
valid requests per minute, the server's RSS every `--rss-every` seconds with its slope (MiB per minute,
least squares over the samples after the first minute: what the growth would be if the run went on), and
first a fairness probe: the latency of a 10-passage request sent while a 512-passage request is being
scored, in batch times. `--backend` (repeatable) runs the whole soak once per engine, each on a fresh
server, and ends with one summary line per engine.

    flock /tmp/openrerank-bench.lock python benchmarks/soak.py --duration 600 --clients 4 --json soak.json
    python benchmarks/soak.py --duration 600 --backend onnx --backend openvino --backend torch --json soak.json
"""

from __future__ import annotations

import argparse
import asyncio
import gzip
import json
import os
import random
import statistics
import sys
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path

import httpx
from openrerank_bench.serve_process import ServeProcess

REPO = Path(__file__).resolve().parents[1]
DL19 = REPO.parent / "shared" / "data" / "msmarco-trec-dl19-pooled"


def load_texts(limit: int = 4000) -> tuple[list[str], list[str]]:
    """Queries and passages: DL19 when the shared data is there, else generated sentences."""
    corpus = DL19 / "corpus.jsonl.gz"
    queries = DL19 / "queries.jsonl"
    if corpus.exists() and queries.exists():
        with gzip.open(corpus, "rt") as fh:
            passages = [json.loads(line)["text"] for _, line in zip(range(limit), fh, strict=False)]
        with open(queries) as fh:
            qs = [json.loads(line)["text"] for line in fh]
        return qs, passages
    rng = random.Random(0)
    words = "the a of river city capital paris science protein network model query document answer".split()
    passages = [" ".join(rng.choice(words) for _ in range(rng.randint(20, 150))) for _ in range(limit)]
    return [" ".join(rng.choice(words) for _ in range(6)) for _ in range(200)], passages


def rss_mib(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def valid_request(rng: random.Random, model: str, queries: list[str], passages: list[str]) -> tuple[str, dict]:
    q = rng.choice(queries)
    ps = rng.sample(passages, rng.randint(1, 64))
    kind = rng.choice(["nim", "nim-chunk", "cohere1", "cohere2", "tei", "score"])
    if kind == "nim":
        return "/v1/ranking", {"query": {"text": q}, "passages": [{"text": p} for p in ps], "truncate": "END"}
    if kind == "nim-chunk":
        return "/v1/ranking", {"query": {"text": q}, "passages": [{"text": p * 4} for p in ps[:8]], "truncate": "CHUNK"}
    if kind == "cohere1":
        return "/v1/rerank", {"query": q, "documents": [{"text": p, "id": i} for i, p in enumerate(ps)],
                              "top_n": 5, "return_documents": True}
    if kind == "cohere2":
        return "/v2/rerank", {"model": model, "query": q, "documents": ps, "top_n": 3}
    if kind == "tei":
        return "/rerank", {"query": q, "texts": ps, "raw_scores": rng.random() < 0.5}
    pairs = len(ps) // 2 * 2  # two queries, pairwise (two distinct text_1: one admission unit)
    return "/v1/score", {"text_1": [q, rng.choice(queries)] * (pairs // 2) or q, "text_2": ps[: max(1, pairs)]}


def invalid_request(rng: random.Random) -> tuple[str, bytes]:
    """Bodies that must get a 4xx (raw JSON text, so lone surrogates and huge numbers survive)."""
    return rng.choice([
        ("/v1/ranking", b'{"query": {"text": "\\udc00"}, "passages": [{"text": "a"}]}'),
        ("/v1/ranking", b'{"query": {"text": "q"}, "passages": []}'),
        ("/v1/ranking", b'{"query": {"text": "q"}, "passages": [{"text": "a"}], "top_n": 3}'),
        ("/v1/rerank", b'{"query": "q", "documents": [{"text": "a", "id": 123456789012345678901234567890}],'
                       b' "return_documents": true}'),
        ("/v1/rerank", b'{"query": "q", "documents": ["a"], "model": "no-such-model"}'),
        ("/rerank", b'{"query": "q", "texts": []}'),
        ("/rerank", b'{"query": "q", "texts": "not a list"}'),
        ("/v1/score", b'{"text_1": ["a", "b", "c"], "text_2": ["x", "y"]}'),
        ("/v1/score", b'{"text_1": "q", "text_2": ["a"'),
        ("/v1/ranking", b"[" * 5000 + b"]" * 5000),
        ("/v1/ranking", OVERSIZE),
    ])


#: 9.4 MiB, over the default --max-body-bytes (8 MiB): answered 413 while the client is still sending it (the server
#: must read and drop the rest, or the client's connection is reset and the 413 lost; docs/reliability.md).
OVERSIZE = b'{"query": {"text": "q"}, "passages": [' + b'{"text": "a"}, ' * (10 << 16) + b'{"text": "a"}]}'


class Tally:
    def __init__(self) -> None:
        self.statuses: Counter[str] = Counter()
        self.sent = self.answered = self.disconnected = self.errors_transport = 0
        self.invalid_not_4xx = 0
        self.latency_by_minute: dict[int, list[float]] = defaultdict(list)


async def client_loop(cid: int, url: str, headers: dict, args, stop_at: float, t0: float, tally: Tally,
                      queries: list[str], passages: list[str], model: str) -> None:
    rng = random.Random(args.seed * 1000 + cid)
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=300) as client:
        while time.monotonic() < stop_at:
            roll = rng.random()
            tally.sent += 1
            if roll < args.invalid:
                path, raw = invalid_request(rng)
                try:
                    r = await client.post(path, content=raw, headers={"content-type": "application/json"})
                except httpx.TransportError:
                    tally.errors_transport += 1
                    continue
                tally.answered += 1
                tally.statuses[str(r.status_code)] += 1
                if not 400 <= r.status_code < 500:
                    tally.invalid_not_4xx += 1
                continue
            path, body = valid_request(rng, model, queries, passages)
            if roll < args.invalid + args.disconnect:  # abandon it mid-flight
                try:
                    await asyncio.wait_for(client.post(path, json=body), timeout=rng.uniform(0.01, 0.3))
                    tally.answered += 1  # it was quicker than our patience
                    tally.statuses["200-before-abandon"] += 1
                except (TimeoutError, httpx.TransportError):
                    tally.disconnected += 1
                continue
            start = time.monotonic()
            try:
                r = await client.post(path, json=body)
            except httpx.TransportError:
                tally.errors_transport += 1
                continue
            tally.answered += 1
            tally.statuses[str(r.status_code)] += 1
            if r.status_code == 200:
                tally.latency_by_minute[int((start - t0) // 60)].append((time.monotonic() - start) * 1e3)


def batch_stats(url: str, headers: dict) -> tuple[float, float]:
    text = httpx.get(f"{url}/v1/metrics", headers=headers, timeout=30).text
    total = count = 0.0
    for line in text.splitlines():
        if line.startswith("openrerank_inference_seconds_sum"):
            total += float(line.split()[-1])
        elif line.startswith("openrerank_inference_seconds_count"):
            count += float(line.split()[-1])
    return total, count


async def fairness_probe(url: str, headers: dict, queries: list[str], passages: list[str]) -> dict:
    """Latency of a 10-passage request while a 512-passage one is scored, against the batch time."""
    rng = random.Random(7)
    big = {"query": {"text": queries[0]}, "passages": [{"text": p} for p in rng.sample(passages, 512)],
           "truncate": "END"}
    small = {"query": {"text": queries[1]}, "passages": [{"text": p} for p in rng.sample(passages, 10)],
             "truncate": "END"}
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=600) as c:
        solo = []
        for _ in range(3):
            t = time.monotonic()
            (await c.post("/v1/ranking", json=small)).raise_for_status()
            solo.append((time.monotonic() - t) * 1e3)
        s0, n0 = batch_stats(url, headers)
        t_big = time.monotonic()
        big_task = asyncio.create_task(c.post("/v1/ranking", json=big))
        await asyncio.sleep(0.5)
        during = []
        while not big_task.done() and len(during) < 5:
            t = time.monotonic()
            (await c.post("/v1/ranking", json=small)).raise_for_status()
            during.append((time.monotonic() - t) * 1e3)
            await asyncio.sleep(0.2)
        (await big_task).raise_for_status()
        big_ms = (time.monotonic() - t_big) * 1e3
        s1, n1 = batch_stats(url, headers)
    batch_ms = (s1 - s0) / max(1.0, n1 - n0) * 1e3
    return {"small_alone_ms": statistics.median(solo), "small_during_big_ms": during, "big_ms": big_ms,
            "batch_ms_mean": batch_ms, "batches": n1 - n0,
            "worst_in_batch_times": max(during) / batch_ms if during and batch_ms else None}


def rss_slope(samples: list[tuple[int, float | None]], skip_s: float = 60) -> float | None:
    """MiB per minute: the least-squares slope of the RSS samples taken after `skip_s` (warm-up excluded)."""
    points = [(t, v) for t, v in samples if v is not None and t >= skip_s]
    if len(points) < 3:
        return None
    slope, _ = statistics.linear_regression([t for t, _ in points], [v for _, v in points])
    return slope * 60


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))] if values else float("nan")


async def main_async(args, url: str, headers: dict, pid: int | None) -> dict:
    queries, passages = load_texts()
    model = httpx.get(f"{url}/v1/models", headers=headers, timeout=30).json()["data"][0]["id"]
    report: dict = {"clients": args.clients, "duration_s": args.duration, "invalid_share": args.invalid,
                    "disconnect_share": args.disconnect, "load_before": os.getloadavg(), "model": model}
    if args.fairness:
        report["fairness"] = await fairness_probe(url, headers, queries, passages)
        print("fairness:", json.dumps(report["fairness"], indent=None), flush=True)
    tally = Tally()
    t0 = time.monotonic()
    stop_at = t0 + args.duration
    rss: list[tuple[int, float | None]] = []

    async def sample_rss() -> None:
        while time.monotonic() < stop_at + 1:
            rss.append((int(time.monotonic() - t0), rss_mib(pid) if pid else None))
            print(f"  t={rss[-1][0]:4d}s rss={rss[-1][1]} MiB sent={tally.sent} answered={tally.answered}",
                  flush=True)
            await asyncio.sleep(args.rss_every)

    sampler = asyncio.create_task(sample_rss())
    await asyncio.gather(*(client_loop(i, url, headers, args, stop_at, t0, tally, queries, passages, model)
                           for i in range(args.clients)))
    sampler.cancel()
    await asyncio.sleep(2)  # let the server settle before the last reading
    rss.append((int(time.monotonic() - t0), rss_mib(pid) if pid else None))
    text = httpx.get(f"{url}/v1/metrics", headers=headers, timeout=30).text
    valid = [ms for v in tally.latency_by_minute.values() for ms in v]
    readings = [v for _, v in rss if v is not None]
    report.update({
        "p50_ms": pct(valid, 0.5), "p99_ms": pct(valid, 0.99),
        "rss_start_mib": readings[0] if readings else None, "rss_end_mib": readings[-1] if readings else None,
        "rss_slope_mib_per_min": rss_slope(rss), "cpu": cpu_name(), "cpus": os.cpu_count(),
        "sent": tally.sent, "answered": tally.answered, "disconnected_on_purpose": tally.disconnected,
        "lost": tally.sent - tally.answered - tally.disconnected, "transport_errors": tally.errors_transport,
        "invalid_not_4xx": tally.invalid_not_4xx, "statuses": dict(tally.statuses),
        "per_minute": {m: {"n": len(v), "p50_ms": pct(v, 0.5), "p99_ms": pct(v, 0.99)}
                       for m, v in sorted(tally.latency_by_minute.items())},
        "rss_mib": rss, "load_after": os.getloadavg(),
        "server_cancelled": sum(float(line.split()[-1]) for line in text.splitlines()
                                if line.startswith("openrerank_cancelled_total")),
        "server_disconnects": sum(float(line.split()[-1]) for line in text.splitlines()
                                  if line.startswith("openrerank_client_disconnects_total")),
    })
    return report


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", help="an already running server (default: start `openrerank serve`)")
    p.add_argument("--model", default="default", help="--model of the server this script starts")
    p.add_argument("--serve-arg", action="append", default=[], help="extra `serve` argument (repeatable)")
    p.add_argument("--api-key")
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--duration", type=float, default=600, help="seconds")
    p.add_argument("--invalid", type=float, default=0.10, help="share of invalid requests")
    p.add_argument("--disconnect", type=float, default=0.05, help="share of requests abandoned mid-flight")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--no-fairness", dest="fairness", action="store_false")
    p.add_argument("--json", type=Path, help="write the report here")
    p.add_argument("--backend", action="append", default=[],
                   help="run the soak on a fresh server with this --backend (repeatable: one run per engine)")
    p.add_argument("--rss-every", type=float, default=10, help="seconds between RSS samples")
    args = p.parse_args()
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    print(f"load average at start: {os.getloadavg()}; CPU: {cpu_name()} x{os.cpu_count()}", flush=True)
    reports: dict[str, dict] = {}
    for backend in args.backend or [None]:
        extra = ["--backend", backend] if backend else []
        server = None
        try:
            if args.url:
                url, pid = args.url, None
            else:
                server = ServeProcess(["--model", args.model, *extra, *args.serve_arg], Path(tempfile.mkdtemp()))
                server.wait_ready()
                url, pid = server.url, server.proc.pid
            print(f"== soak on {backend or 'the default engine'}", flush=True)
            reports[backend or "default"] = asyncio.run(main_async(args, url, headers, pid))
        finally:
            if server is not None:
                server.stop()
    print(json.dumps(reports, indent=2))
    if args.json:
        args.json.write_text(json.dumps(reports, indent=2))
    ok = True
    print("engine | sent | answered | lost | 5xx | p50 ms | p99 ms | RSS start / slope / end (MiB, MiB/min) | load")
    for name, r in reports.items():
        server_errors = sum(n for s, n in r["statuses"].items() if s.startswith("5") and s != "503")
        ok = ok and r["lost"] == 0 and r["invalid_not_4xx"] == 0 and server_errors == 0
        slope = r["rss_slope_mib_per_min"]
        print(f"{name} | {r['sent']} | {r['answered']} | {r['lost']} | {server_errors} | {r['p50_ms']:.0f} | "
              f"{r['p99_ms']:.0f} | {r['rss_start_mib']} / {'n/a' if slope is None else f'{slope:+.2f}'} / "
              f"{r['rss_end_mib']} | {r['load_before'][0]:.1f} -> {r['load_after'][0]:.1f}")
    print(f"load average at end: {os.getloadavg()}; {'OK' if ok else 'PROBLEMS'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

"""What the benchmark measures: the sentence-transformers baseline, the served model in-process, and the
real HTTP server with one client and with many."""

from __future__ import annotations

import asyncio
import json
import statistics
import time
from pathlib import Path

import numpy as np

from openrerank_bench.workload import Workload, percentile

SERVED_NAME = "bench-model"


class Baseline:
    """The usual way to rerank with sentence-transformers, fp32, default batch size, one call per request:
    `CrossEncoder.predict` for a cross-encoder, `SentenceTransformer.encode` + cosine for a bi-encoder."""

    def __init__(self, model_dir: Path, max_length: int, bi_encoder: bool) -> None:
        import torch

        self.bi_encoder = bi_encoder
        if bi_encoder:
            from sentence_transformers import SentenceTransformer

            self.model = SentenceTransformer(str(model_dir), device="cpu", local_files_only=True)
            self.model.max_seq_length = max_length
            self.name = "sentence-transformers SentenceTransformer.encode + cosine, fp32"
        else:
            from sentence_transformers import CrossEncoder

            # Identity activation: compare raw logits (a one-label CrossEncoder applies a sigmoid by default).
            self.model = CrossEncoder(str(model_dir), device="cpu", max_length=max_length,
                                      activation_fn=torch.nn.Identity(), local_files_only=True)
            self.name = "sentence-transformers CrossEncoder.predict, fp32"

    def predict(self, query: str, passages: list[str]) -> np.ndarray:
        if self.bi_encoder:
            emb = self.model.encode([query, *passages], normalize_embeddings=True, convert_to_numpy=True,
                                    show_progress_bar=False)
            return (emb[1:] @ emb[0]).astype(np.float32)
        out = self.model.predict([(query, p) for p in passages], show_progress_bar=False)
        return np.asarray(out, np.float32).ravel()

    def measure(self, wl: Workload) -> tuple[dict, list[np.ndarray]]:
        self.predict(wl.queries[0], wl.passages[0])  # warm-up
        scores, lat = [], []
        started = time.perf_counter()
        for q, ps in zip(wl.queries, wl.passages, strict=True):
            t = time.perf_counter()
            scores.append(self.predict(q, ps))
            lat.append(time.perf_counter() - t)
        wall = time.perf_counter() - started
        return {"pairs_per_s": wl.pairs / wall, "p50_ms": percentile(lat, 50) * 1e3,
                "p95_ms": percentile(lat, 95) * 1e3, "seconds": wall}, scores

    def close(self) -> None:
        del self.model


class OfflineRunner:
    """One served model in-process, scored through the public path: tokenization + scheduler + engine."""

    def __init__(self, model_dir: Path, backend: str, dtype: str, threads: int | None,
                 loop: asyncio.AbstractEventLoop, device: str = "cpu") -> None:
        from openrerank.engine.batching import default_policy
        from openrerank.engine.loading import LoadOptions
        from openrerank.engine.scheduler import SchedulerConfig
        from openrerank.engine.served import load_served_model
        from openrerank.sources.source import ModelSource

        self.loop = loop
        t = time.perf_counter()
        policy = default_policy(device)  # the server's defaults for the device
        sched = SchedulerConfig(policy=policy)
        self.served = load_served_model(ModelSource(SERVED_NAME, str(model_dir)),
                                        LoadOptions(backend=backend, dtype=dtype, device=device, threads=threads),
                                        sched, None)
        self.load_seconds = time.perf_counter() - t
        self.description = self.served.loaded.scorer.description
        self.first_request_ms: float | None = None
        self.warm_request_ms: list[float] = []  # the same request's latency in every round (first_request_summary)
        loop.run_until_complete(self.served.scheduler.start())

    def measure(self, wl: Workload) -> tuple[dict, list[np.ndarray]]:
        from openrerank.core.requests import RerankRequest, Truncate

        reqs = [RerankRequest(query=q, passages=ps, truncate=Truncate.END)
                for q, ps in zip(wl.queries, wl.passages, strict=True)]

        async def go() -> tuple[list[np.ndarray], list[float], list[float], float]:
            t = time.perf_counter()
            await self.served.rerank(reqs[0])  # warm-up at full size
            if self.first_request_ms is None:  # the first real request after `ready` (load + warm-up)
                self.first_request_ms = (time.perf_counter() - t) * 1e3
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
        self.warm_request_ms.append(lat[0] * 1e3)  # the first request's own request, warm: once per round
        return {"pairs_per_s": wl.pairs / wall, "p50_ms": percentile(lat, 50) * 1e3,
                "p95_ms": percentile(lat, 95) * 1e3, "model_share": sum(inf) / sum(lat),
                "seconds": wall, "load_seconds": self.load_seconds, "runtime": self.description}, scores

    def close(self) -> None:
        self.loop.run_until_complete(self.served.scheduler.stop())
        self.served.loaded.close()


def best_round(runs: list[dict]) -> dict:
    """The fastest of the rounds (the one least disturbed by other load), with every round's rate kept in round
    order and their median, so a reader can tell a best round from a typical one."""
    best = max(runs, key=lambda r: r["pairs_per_s"])
    rates = [r["pairs_per_s"] for r in runs]
    return {**best, "rounds_pairs_per_s": [round(r, 2) for r in rates],
            "median_pairs_per_s": round(statistics.median(rates), 2),
            "spread": round((max(rates) - min(rates)) / max(rates), 3) if rates else 0.0}


def first_request_summary(first_ms: float, warm_ms: list[float]) -> dict:
    """The first request after `ready` against the same request warm. The first request is one sample by nature
    (a process has one); the warm side is the median of that request's latency over every round (each round
    times it), and `ratio_range` is the first request against each round's warm latency, so a ratio that one
    noisy warm sample made (a VM's warm latencies of one request ranged 260-485 ms) shows as a wide range."""
    warm = statistics.median(warm_ms)
    return {"first_ms": round(first_ms, 1), "warm_ms": round(warm, 1),
            "warm_ms_rounds": [round(w, 1) for w in warm_ms], "ratio": round(first_ms / warm, 2),
            "ratio_range": [round(first_ms / max(warm_ms), 2), round(first_ms / min(warm_ms), 2)]}


def nim_body(query: str, passages: list[str]) -> bytes:
    return json.dumps({"model": SERVED_NAME, "query": {"text": query},
                       "passages": [{"text": p} for p in passages], "truncate": "END"}).encode()


def run_http_sequential(url: str, wl: Workload) -> dict:
    """One client, one 100-passage request at a time: latency and where the time goes."""
    import httpx

    bodies = [nim_body(q, ps) for q, ps in zip(wl.queries, wl.passages, strict=True)]
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


def run_http_concurrent(url: str, bodies: list[bytes], sizes: list[int], clients: int, requests: int) -> dict:
    """`clients` concurrent clients sending `requests` requests in all (bodies cycled); `sizes` = passages each."""
    import httpx

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


def workload_bodies(wl: Workload) -> tuple[list[bytes], list[int]]:
    return ([nim_body(q, ps) for q, ps in zip(wl.queries, wl.passages, strict=True)],
            [len(ps) for ps in wl.passages])

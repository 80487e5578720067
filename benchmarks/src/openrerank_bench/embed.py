"""`openrerank bench`'s embeddings row: texts/s embedding DL19 passages with the embedded default model.

Workload: the first N distinct passages (default 1,000) of the DL19 BM25 candidate lists the rerank benchmark
uses (real MS MARCO text, ~70 tokens each). Baseline: `SentenceTransformer.encode` (PyTorch fp32, default
batch size 32, length-sorted) on the same texts, measured in the same run, rounds interleaved with ours.

Per backend/dtype: texts/s in-process through the served model's scheduler (one 1,000-text request, as
`/v1/embeddings` runs it), texts/s over HTTP (`/v1/embeddings`, 8 concurrent requests of 125 texts, base64),
and the per-text cosine to the baseline's fp32 vectors (min and mean): fp32 engines must match, int8 is gated
by the target (cosine >= 0.999).
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import numpy as np

from openrerank_bench.serve_process import ServeProcess

DEFAULT_EMBED_CONFIGS = ("openvino:bf16", "openvino:fp32", "onnx:fp32", "onnx:int8", "torch:fp32")
SERVED_NAME = "bench-embed"
HTTP_REQUESTS = 8


def distinct_texts(passage_lists: list[list[str]], n: int) -> list[str]:
    """The first `n` distinct passages, in candidate-list order."""
    seen: dict[str, None] = {}
    for passages in passage_lists:
        for p in passages:
            seen.setdefault(p, None)
            if len(seen) >= n:
                return list(seen)
    return list(seen)


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def _best(runs: list[dict]) -> dict:
    best = max(runs, key=lambda r: r["texts_per_s"])
    return {**best, "rounds_texts_per_s": [round(r["texts_per_s"], 1) for r in runs]}


class StBaseline:
    """sentence-transformers' `encode`, PyTorch fp32 on CPU, its default batch size."""

    def __init__(self, threads: int | None) -> None:
        import torch
        from sentence_transformers import SentenceTransformer

        from openrerank.sources.source import default_model_dir

        if threads:
            torch.set_num_threads(threads)
        self.model = SentenceTransformer(str(default_model_dir()), device="cpu")

    def measure(self, texts: list[str]) -> tuple[dict, np.ndarray]:
        self.model.encode(texts[:32], convert_to_numpy=True)  # warm-up
        t = time.perf_counter()
        emb = self.model.encode(texts, convert_to_numpy=True)
        wall = time.perf_counter() - t
        return {"texts_per_s": len(texts) / wall, "seconds": wall}, np.asarray(emb, np.float32)


class EmbedRunner:
    """The default model served in-process: tokenization + scheduler + backend, one request for all texts."""

    def __init__(self, backend: str, dtype: str, threads: int | None, loop: asyncio.AbstractEventLoop) -> None:
        from openrerank.engine.loading import LoadOptions
        from openrerank.engine.scheduler import SchedulerConfig
        from openrerank.engine.served import load_served_model
        from openrerank.sources.source import ModelSource

        self.loop = loop
        t = time.perf_counter()
        self.served = load_served_model(ModelSource(SERVED_NAME, "default"),
                                        LoadOptions(backend=backend, dtype=dtype, threads=threads),
                                        SchedulerConfig(), None)
        self.load_seconds = time.perf_counter() - t
        self.description = self.served.loaded.scorer.description
        loop.run_until_complete(self.served.scheduler.start())

    def measure(self, texts: list[str]) -> tuple[dict, np.ndarray]:
        from openrerank.core.requests import EmbedRequest, Truncate

        async def go():
            await self.served.embed(EmbedRequest(texts[:64], truncate=Truncate.END))  # warm-up
            t = time.perf_counter()
            res = await self.served.embed(EmbedRequest(texts, truncate=Truncate.END))
            return res, time.perf_counter() - t

        res, wall = self.loop.run_until_complete(go())
        return {"texts_per_s": len(texts) / wall, "seconds": wall, "inference_share": res.timings.inference_ms / 1e3
                / wall, "load_seconds": self.load_seconds, "runtime": self.description}, res.embeddings

    def close(self) -> None:
        self.loop.run_until_complete(self.served.scheduler.stop())
        self.served.loaded.close()


def run_http(url: str, texts: list[str], requests: int = HTTP_REQUESTS) -> dict:
    """`requests` concurrent `/v1/embeddings` calls splitting the texts, through `openrerank.AsyncClient`."""
    from openrerank.client import AsyncClient

    size = -(-len(texts) // requests)
    parts = [texts[i : i + size] for i in range(0, len(texts), size)]

    async def go() -> float:
        async with AsyncClient(url, timeout=600) as client:
            await client.embed(texts[:64])  # warm-up
            t = time.perf_counter()
            await asyncio.gather(*(client.embed(p) for p in parts))
            return time.perf_counter() - t

    wall = asyncio.run(go())
    return {"texts_per_s": len(texts) / wall, "seconds": wall, "requests": len(parts)}


def run_embeddings(texts: list[str], configs: list[str], *, rounds: int, threads: int | None, http: bool,
                   tmp: Path, console) -> dict:
    """The embeddings section of the benchmark result: baseline, then each engine, rounds interleaved."""
    from transformers import AutoTokenizer

    from openrerank.sources.source import default_model_dir

    tok = AutoTokenizer.from_pretrained(str(default_model_dir()))
    lengths = [len(ids) for ids in tok(texts, truncation=True, max_length=256)["input_ids"]]
    section: dict = {"texts": len(texts), "mean_tokens": round(float(np.mean(lengths)), 1),
                     "model": "sentence-transformers/all-MiniLM-L6-v2 (embedded default)", "backends": []}
    loop = asyncio.new_event_loop()
    baseline = StBaseline(threads)
    runners: dict[str, EmbedRunner] = {}
    rows: dict[str, dict] = {}
    for cfg in configs:
        backend, dtype = cfg.split(":")
        row = rows[cfg] = {"name": f"{backend} {dtype}", "backend": backend, "dtype": dtype}
        section["backends"].append(row)
        try:
            console.print(f"embeddings: loading {cfg} ...")
            runners[cfg] = EmbedRunner(backend, dtype, threads, loop)
        except Exception as exc:  # one broken config must not lose the others' numbers
            row["error"] = f"{type(exc).__name__}: {exc}"
            console.print(f"[red]embeddings {cfg} failed: {row['error']}[/red]")
    base_runs: list[dict] = []
    runs: dict[str, list[dict]] = {c: [] for c in runners}
    for r in range(rounds):
        stats, ref = baseline.measure(texts)
        base_runs.append(stats)
        console.print(f"embeddings round {r + 1}/{rounds}: baseline {stats['texts_per_s']:.1f} texts/s")
        for cfg, runner in runners.items():
            stats, emb = runner.measure(texts)
            runs[cfg].append(stats)
            cos = _cosines(emb, ref)
            rows[cfg]["cosine_to_baseline"] = {"min": float(cos.min()), "mean": float(cos.mean())}
            console.print(f"embeddings round {r + 1}/{rounds}: {cfg} {stats['texts_per_s']:.1f} texts/s, "
                          f"min cosine to baseline {cos.min():.6f}")
    for cfg, runner in runners.items():
        runner.close()
        rows[cfg]["offline"] = _best(runs[cfg])
    loop.close()
    section["baseline"] = _best(base_runs)
    for cfg in runners if http else []:
        backend, dtype = cfg.split(":")
        server = ServeProcess(["--model", f"{SERVED_NAME}=default", "--backend", backend, "--dtype", dtype,
                               "--log-level", "warning", *(["--threads", str(threads)] if threads else [])], tmp)
        try:
            server.wait_ready()
            rows[cfg]["http"] = run_http(server.url, texts)
            console.print(f"embeddings {cfg}: HTTP {rows[cfg]['http']['texts_per_s']:.1f} texts/s")
        except Exception as exc:
            rows[cfg]["error"] = f"{type(exc).__name__}: {exc}"
            console.print(f"[red]embeddings {cfg} HTTP failed: {rows[cfg]['error']}[/red]")
        finally:
            server.stop()
    return section


def render(section: dict, console) -> None:
    from rich.table import Table

    base = section["baseline"]["texts_per_s"]
    t = Table(title=f"openrerank bench, embeddings: {section['texts']} DL19 passages (~{section['mean_tokens']} "
              f"tokens), {section['model']} (baseline: SentenceTransformer.encode fp32 = {base:.1f} texts/s)")
    for c in ("backend", "offline texts/s", "x base", "rounds", "HTTP texts/s", "x base", "min cos", "mean cos"):
        t.add_column(c, justify="right")
    t.add_row("baseline (st fp32)", f"{base:.1f}", "1.00x", str(section["baseline"]["rounds_texts_per_s"]),
              "", "", "", "")
    for row in section["backends"]:
        if "offline" not in row:
            t.add_row(row["name"], f"error: {row.get('error', '')[:60]}", *[""] * 6)
            continue
        off, http, cos = row["offline"], row.get("http"), row.get("cosine_to_baseline", {})
        t.add_row(row["name"], f"{off['texts_per_s']:.1f}", f"{off['texts_per_s'] / base:.2f}x",
                  str(off["rounds_texts_per_s"]), f"{http['texts_per_s']:.1f}" if http else "-",
                  f"{http['texts_per_s'] / base:.2f}x" if http else "-", f"{cos.get('min', float('nan')):.6f}",
                  f"{cos.get('mean', float('nan')):.6f}")
    console.print(t)

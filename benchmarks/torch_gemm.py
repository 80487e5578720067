"""The PyTorch runtime's fp32 products on this CPU: PyTorch's default library against oneDNN, served end to end.

`runtimes/torch_gemm.py` times one product both ways when the runtimes are timed and routes the model's
`nn.Linear` layers through oneDNN where it is at least 1.25x as fast (on AMD CPUs PyTorch's MKL runs its AVX2
code). This script checks what that is worth where it counts: the same DL19 requests through openrerank's offline
path (tokenization, scheduler, torch runtime, fp32), once with PyTorch's products (`--backend-choice rules`, which
times nothing) and once with oneDNN's forced, in interleaved rounds so that a busy host slows both alike. Models:
the bench's MiniLM-L6 cross-encoder (the packaged encoder weights) and the LLM suite's Qwen3-Reranker-0.6B shape
(random weights, a tokenizer trained on the corpus; built once, cached like `openrerank bench --suite llm`'s).

Printed per model: each round's pairs/s both ways, the best round's ratio with the range over rounds, the
largest score difference between the two (fp32 rounding: ~1e-6 of the scores' scale), and what the measured
choice (`--backend-choice measure`, the default) decided here and why.

    .venv/bin/python benchmarks/torch_gemm.py                 # ~3 min on 2 cores (plus the Qwen3 build once)
    .venv/bin/python benchmarks/torch_gemm.py --models minilm --rounds 5

Results and what they mean: docs/engine.md, "PyTorch fp32 through oneDNN".
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from int8_frontier import cpu_name
from openrerank_bench.llm import cached_model, default_model_cache, shape_of
from openrerank_bench.workload import build_bench_cross_encoder, default_data_dir, load_workload

from openrerank.core.requests import RerankRequest, Truncate
from openrerank.engine.batching import default_policy
from openrerank.engine.loading import LoadOptions
from openrerank.engine.scheduler import SchedulerConfig
from openrerank.engine.served import load_served_model
from openrerank.runtimes.base import default_threads
from openrerank.runtimes.torch_gemm import choose_gemm, onednn_linear
from openrerank.sources.source import ModelSource

MODELS = {"minilm": (3, 100), "qwen3": (1, 16)}  # requests x passages per round: a few seconds each
_REQUEST_TOKENS = 1_000_000  # far past any request of MODELS


def served(path: Path, threads: int, loop: asyncio.AbstractEventLoop):
    """The model served by the torch runtime in fp32 with PyTorch's own products (the rule-based path)."""
    options = LoadOptions(backend="torch", dtype="fp32", threads=threads, backend_choice="rules")
    # The requests are the workload's, not what a speed measured at start admits: on a busy host the Qwen3 one
    # (2,665 tokens) was refused as too large against a budget of 2,415.
    config = SchedulerConfig(policy=default_policy("cpu"), max_request_tokens=_REQUEST_TOKENS)
    model = load_served_model(ModelSource("bench", str(path)), options, config, None)
    loop.run_until_complete(model.scheduler.start())
    return model


def score(model, requests: list, loop: asyncio.AbstractEventLoop) -> tuple[float, list[np.ndarray]]:
    """Pairs/s over the requests (after one warm request) and their logits."""
    async def go() -> tuple[float, list[np.ndarray]]:
        await model.rerank(requests[0])
        start, out = time.perf_counter(), []
        for request in requests:
            out.append(np.asarray((await model.rerank(request)).logits, np.float32))
        return sum(len(r.passages) for r in requests) / (time.perf_counter() - start), out

    return loop.run_until_complete(go())


def compare(name: str, path: Path, data: Path, rounds: int, threads: int) -> None:
    queries, passages = MODELS[name]
    wl = load_workload(data, "runs/bm25_top100.trec.gz", queries, passages)
    requests = [RerankRequest(query=q, passages=ps, truncate=Truncate.END)
                for q, ps in zip(wl.queries, wl.passages, strict=True)]
    loop = asyncio.new_event_loop()
    default, onednn = served(path, threads, loop), served(path, threads, loop)
    module = onednn.loaded.scorer.runtime.module
    measured = choose_gemm(module, "fastest")  # what `measure` decides here (it may route: forced just below)
    choose_gemm(module, "onednn")
    rates: dict[str, list[float]] = {"default": [], "onednn": []}
    scores: dict[str, list[np.ndarray]] = {}
    for i in range(rounds):
        order = (("default", default), ("onednn", onednn)) if i % 2 == 0 else (("onednn", onednn), ("default", default))
        for key, model in order:
            rate, scores[key] = score(model, requests, loop)
            rates[key].append(rate)
        print(f"{name} round {i + 1}/{rounds}: PyTorch's default {rates['default'][-1]:.2f} pairs/s, "
              f"oneDNN {rates['onednn'][-1]:.2f} pairs/s", flush=True)
    ratios = [o / d for o, d in zip(rates["onednn"], rates["default"], strict=True)]
    diff = max(float(np.abs(a - b).max()) for a, b in zip(scores["onednn"], scores["default"], strict=True))
    scale = max(float(np.abs(a).max()) for a in scores["default"])
    print(f"{name}: {wl.pairs} pairs per round; best rounds: PyTorch's default {max(rates['default']):.2f} pairs/s, "
          f"oneDNN {max(rates['onednn']):.2f} ({max(rates['onednn']) / max(rates['default']):.2f}x; per round "
          f"{min(ratios):.2f}-{max(ratios):.2f}x); largest score difference {diff:.2g} ({diff / scale:.2g} of the "
          f"scores' scale)")
    print(f"{name}: the measured choice here: {measured.library} ({measured.reason})", flush=True)
    for model in (default, onednn):
        loop.run_until_complete(model.scheduler.stop())
        model.loaded.close()
    loop.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="minilm,qwen3", help="comma-separated: " + ", ".join(MODELS))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="default: the CPUs available")
    parser.add_argument("--data", default=None, help="the DL19 folder (default: ../shared/data/...)")
    args = parser.parse_args()
    if onednn_linear() is None:
        print("this PyTorch build has no oneDNN linear product: nothing to compare", file=sys.stderr)
        return 2
    data = Path(args.data) if args.data else default_data_dir()
    threads = args.threads or default_threads()
    name, flags = cpu_name()
    print(f"{name} ({', '.join(flags) or 'no int8/bf16 flags'}), {threads} threads; load average at start "
          f"{[round(x, 2) for x in os.getloadavg()]}", flush=True)
    for name in [m.strip() for m in args.models.split(",") if m.strip()]:
        if name not in MODELS:
            parser.error(f"unknown model {name!r} (use {', '.join(MODELS)})")
        if name == "minilm":
            with tempfile.TemporaryDirectory() as tmp:
                compare(name, build_bench_cross_encoder(Path(tmp) / "minilm"), data, args.rounds, threads)
        else:
            from rich.console import Console

            shape = shape_of("qwen3").name
            path = cached_model(shape, data, default_model_cache(), Console(stderr=True))
            compare(name, path, data, args.rounds, threads)
    return 0


if __name__ == "__main__":
    sys.exit(main())

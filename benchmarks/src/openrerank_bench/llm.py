"""`openrerank bench --suite llm`: LLM rerankers on CPU against what a user writes by hand.

Models: random-weight networks with the exact shapes of Qwen3-Reranker-0.6B (causal, yes/no readout) and
llama-nemotron-rerank-1b-v2 (Llama-3.2-1B, bidirectional, mean pool + head), built once and cached
(`openrerank_bench.synthetic`); a byte-level BPE trained on the workload's own text gives ~1.3 tokens per word.
Workload: TREC DL19 queries with their BM25 top passages (real MS MARCO text), one request per query.

Baselines, in fp32, batch 8, passages in the order given, as each model's reference code does it:
- Qwen3: the model card's `AutoModelForCausalLM` snippet: prefix + body + suffix tokenized apart, left
  padding, `model(**inputs).logits[:, -1, :]` (full-vocabulary logits at every position), yes/no read off.
- Llama-bidirectional: NVIDIA's reference forward: stock `LlamaModel` with an explicit non-causal 4-D mask,
  masked mean over the real tokens, linear head.

Candidates go through openrerank's public offline path (template encoder, scheduler, torch runtime), so
they include what the server does: length-sorted low-padding batches, the last-token readout over two
LM-head rows, the shared prompt prefix run once per batch (causal models), bf16 under autocast. The rounds
are interleaved (baseline, then each engine) and each keeps its best; wall time *and* process CPU time are
recorded, since on a shared machine CPU seconds per pair are the steadier figure.
"""

from __future__ import annotations

import asyncio
import gc
import gzip
import hashlib
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

from openrerank.runtimes.base import default_threads
from openrerank_bench.workload import Workload, default_data_dir, load_workload, percentile

LLM_MODELS = {"qwen3": "qwen3-reranker-0.6b", "llama": "llama-bidirectional-1b"}
DEFAULT_LLM_CONFIGS = ("torch:fp32", "torch:bf16")
BASELINE_BATCH = 8
#: bf16 is judged against fp32 by the logits' Pearson correlation (no trained weights, so no nDCG gate).
BF16_MIN_CORRELATION = 0.999
#: fp32 must reproduce the hand-written baseline's logits within this.
FP32_MAX_ABS_DIFF = 1e-4


def default_model_cache() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "openrerank" / "bench-models"


def corpus_texts(data: Path) -> list[str]:
    with gzip.open(data / "corpus.jsonl.gz", "rt", encoding="utf-8") as fh:
        return [json.loads(line)["text"] for line in fh]


def cached_model(shape: str, data: Path, cache: Path, console) -> Path:
    """The shape's random-weight model with a tokenizer trained on `data`, built once (a minute or two)."""
    from openrerank_bench.synthetic import build_model, train_tokenizer

    tok = train_tokenizer(corpus_texts(data))
    key = hashlib.sha256(tok.to_str().encode()).hexdigest()[:12]
    out = cache / f"{shape}-seed0-tok{key}"
    if not (out / ".complete").is_file():
        console.print(f"building {shape} (random weights, once) in {out} ...")
        build_model(shape, out, tok)
        (out / ".complete").write_text("ok\n", encoding="utf-8")
    return out


class HandQwen3Reranker:
    """The Qwen3-Reranker model card's transformers code, fp32, batch 8 (scores as l_yes - l_no)."""

    def __init__(self, path: Path, device: str = "cpu") -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from openrerank.families.qwen3_reranker import DEFAULT_INSTRUCTION, PREFIX, SUFFIX

        self.torch = torch
        self.tok = AutoTokenizer.from_pretrained(str(path), padding_side="left")
        self.model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval().to(device)
        self.device = device
        self.prefix = self.tok.encode(PREFIX, add_special_tokens=False)
        self.suffix = self.tok.encode(SUFFIX, add_special_tokens=False)
        self.instruction = DEFAULT_INSTRUCTION
        self.yes = self.tok.convert_tokens_to_ids("yes")
        self.no = self.tok.convert_tokens_to_ids("no")
        self.max_length = 8192

    def score(self, query: str, passages: list[str]) -> np.ndarray:
        torch = self.torch
        pairs = [f"<Instruct>: {self.instruction}\n<Query>: {query}\n<Document>: {p}" for p in passages]
        inputs = self.tok(pairs, padding=False, truncation="longest_first", return_attention_mask=False,
                          max_length=self.max_length - len(self.prefix) - len(self.suffix))
        inputs["input_ids"] = [self.prefix + ids + self.suffix for ids in inputs["input_ids"]]
        inputs = self.tok.pad(inputs, padding=True, return_tensors="pt", max_length=self.max_length).to(self.device)
        with torch.no_grad():
            logits = self.model(**inputs).logits[:, -1, :]
        pair = torch.stack([logits[:, self.no], logits[:, self.yes]], dim=1)
        log_p = torch.nn.functional.log_softmax(pair, dim=1)  # the card's P(yes) = exp(log_p[:, 1])
        return (log_p[:, 1] - log_p[:, 0]).cpu().numpy()  # its log-odds: exactly l_yes - l_no


class HandLlamaBidirectional:
    """NVIDIA's reference forward for llama-nemotron-rerank: stock LlamaModel, non-causal mask, mean, head.
    (The Mistral variant: the same on stock MistralModel.)"""

    def __init__(self, path: Path, device: str = "cpu") -> None:
        import torch
        from transformers import (
            AutoTokenizer,
            LlamaConfig,
            LlamaForSequenceClassification,
            MistralConfig,
            MistralForSequenceClassification,
        )

        cfg = json.loads((path / "config.json").read_text(encoding="utf-8"))
        self.temperature = float(cfg.get("temperature") or 1.0)
        drop = ("architectures", "auto_map", "model_type", "pooling", "temperature", "transformers_version")
        mistral = cfg.get("model_type") == "mistral_bidirec"
        config_cls, model_cls = ((MistralConfig, MistralForSequenceClassification) if mistral
                                 else (LlamaConfig, LlamaForSequenceClassification))
        config = config_cls(**{k: v for k, v in cfg.items() if k not in drop})
        model = model_cls.from_pretrained(str(path), config=config, dtype=torch.float32).to(device)
        self.body, self.head = model.model.eval(), model.score
        for layer in self.body.layers:
            layer.self_attn.is_causal = False
        self.torch, self.device = torch, device
        self.tok = AutoTokenizer.from_pretrained(str(path))

    def score(self, query: str, passages: list[str]) -> np.ndarray:
        torch = self.torch
        texts = [f"question:{query} \n \n passage:{p}" for p in passages]
        batch = self.tok(texts, padding=True, truncation=True, max_length=8192, return_tensors="pt").to(self.device)
        mask = batch["attention_mask"]
        # transformers' _prepare_4d_attention_mask: 0 where a key is real, the dtype's min where it is padding.
        width = mask.shape[1]
        bias = (1.0 - mask[:, None, None, :].float()) * torch.finfo(torch.float32).min
        with torch.no_grad():
            hidden = self.body(input_ids=batch["input_ids"], attention_mask=bias.expand(-1, 1, width, width)
                               ).last_hidden_state
            m = mask.unsqueeze(-1).float()
            pooled = (hidden * m).sum(dim=1) / m.sum(dim=1)
            return (self.head(pooled)[:, 0] / self.temperature).cpu().numpy()


#: The hand-written baseline of each family the suite covers.
HAND_WRITTEN = {"qwen3-reranker": HandQwen3Reranker, "llama-bidirectional": HandLlamaBidirectional}


def shape_of(key: str):
    """`qwen3` / `llama`, or any shape name of `openrerank_bench.synthetic.SHAPES` (e.g. the tiny twins)."""
    from openrerank_bench.synthetic import SHAPES

    shape = SHAPES.get(LLM_MODELS.get(key, key))
    if shape is None or shape.family not in HAND_WRITTEN:
        names = [*LLM_MODELS, *(n for n, s in SHAPES.items() if s.family in HAND_WRITTEN)]
        raise ValueError(f"--llm-models: unknown {key!r}; choose from {', '.join(names)}")
    return shape


def measure_baseline(ref, wl: Workload) -> tuple[dict, list[np.ndarray]]:
    scores, lat = [], []
    cpu0, started = time.process_time(), time.perf_counter()
    for q, ps in zip(wl.queries, wl.passages, strict=True):
        t = time.perf_counter()
        scores.append(np.concatenate([ref.score(q, ps[i : i + BASELINE_BATCH])
                                      for i in range(0, len(ps), BASELINE_BATCH)]).astype(np.float32))
        lat.append(time.perf_counter() - t)
    wall, cpu = time.perf_counter() - started, time.process_time() - cpu0
    return _stats(wl, wall, cpu, lat), scores


def _stats(wl: Workload, wall: float, cpu: float, lat: list[float]) -> dict:
    return {"pairs_per_s": wl.pairs / wall, "cpu_s_per_pair": cpu / wl.pairs, "p50_ms": percentile(lat, 50) * 1e3,
            "seconds": wall}


def measure_candidate(runner, wl: Workload, loop: asyncio.AbstractEventLoop) -> tuple[dict, list[np.ndarray]]:
    from openrerank.core.requests import RerankRequest, Truncate

    reqs = [RerankRequest(query=q, passages=ps, truncate=Truncate.END)
            for q, ps in zip(wl.queries, wl.passages, strict=True)]

    async def go() -> tuple[list[np.ndarray], list[float], float, float]:
        out, lat = [], []
        cpu0, started = time.process_time(), time.perf_counter()
        for req in reqs:
            t = time.perf_counter()
            res = await runner.served.rerank(req)
            lat.append(time.perf_counter() - t)
            out.append(np.asarray(res.logits, np.float32))
        return out, lat, time.perf_counter() - started, time.process_time() - cpu0

    scores, lat, wall, cpu = loop.run_until_complete(go())
    return {**_stats(wl, wall, cpu, lat), "runtime": runner.description}, scores


def _best(runs: list[dict]) -> dict:
    """The fastest round (least disturbed by other load); CPU seconds per pair from the thriftiest round."""
    best = {**max(runs, key=lambda r: r["pairs_per_s"])}
    best["cpu_s_per_pair"] = min(r["cpu_s_per_pair"] for r in runs)
    return {**best, "rounds_pairs_per_s": [round(r["pairs_per_s"], 3) for r in runs],
            "rounds_cpu_s_per_pair": [round(r["cpu_s_per_pair"], 3) for r in runs]}


def _compare(scores: list[np.ndarray], ref: list[np.ndarray]) -> dict:
    a, b = np.concatenate(scores), np.concatenate(ref)
    return {"max_abs_diff": float(np.abs(a - b).max()), "pearson": float(np.corrcoef(a, b)[0, 1])}


def bench_model(key: str, path: Path, wl: Workload, configs: list[str], rounds: int, threads: int | None,
                console) -> dict:
    """One model: its hand-written baseline and each engine, rounds interleaved."""
    from openrerank.engine.loading import resolve_model
    from openrerank_bench.runners import OfflineRunner

    spec = resolve_model(str(path)).spec
    result: dict = {"model": key, "shape": path.name.split("-seed")[0], "family": spec.family, "engines": []}
    loop = asyncio.new_event_loop()
    rounds_of: dict[str, list[dict]] = {"baseline": [], **{c: [] for c in configs}}
    scores_of: dict[str, list[np.ndarray]] = {}
    # Only one model in memory at a time (a 1B model in fp32 is 5 GB a copy, and this machine is shared):
    # each round loads the baseline, then each engine, measures it warm and frees it.
    for r in range(rounds):
        baseline = HAND_WRITTEN[spec.family](path)
        baseline.score(wl.queries[0], wl.passages[0][:2])  # warm-up
        stats, scores_of["baseline"] = measure_baseline(baseline, wl)
        rounds_of["baseline"].append(stats)
        del baseline
        gc.collect()
        console.print(f"{key} round {r + 1}/{rounds}: hand-written fp32 {stats['pairs_per_s']:.3f} pairs/s, "
                      f"{stats['cpu_s_per_pair']:.2f} CPU-s/pair")
        for cfg in configs:
            backend, dtype = cfg.split(":")
            runner = OfflineRunner(path, backend, dtype, threads, loop)  # warms up while loading
            stats, scores_of[cfg] = measure_candidate(runner, wl, loop)
            runner.close()
            del runner
            gc.collect()
            stats["paired_speedup"] = stats["pairs_per_s"] / rounds_of["baseline"][-1]["pairs_per_s"]
            stats["paired_cpu_speedup"] = rounds_of["baseline"][-1]["cpu_s_per_pair"] / stats["cpu_s_per_pair"]
            rounds_of[cfg].append(stats)
            console.print(f"{key} round {r + 1}/{rounds}: {cfg} {stats['pairs_per_s']:.3f} pairs/s, "
                          f"{stats['cpu_s_per_pair']:.2f} CPU-s/pair")
    loop.close()
    result["baseline"] = _best(rounds_of["baseline"])
    fp32 = scores_of.get("torch:fp32", scores_of["baseline"])
    for cfg in configs:
        row = {"config": cfg, **_best(rounds_of[cfg]), "vs_baseline": _compare(scores_of[cfg], scores_of["baseline"])}
        row["speedup"] = row["pairs_per_s"] / result["baseline"]["pairs_per_s"]
        row["cpu_speedup"] = result["baseline"]["cpu_s_per_pair"] / row["cpu_s_per_pair"]
        # each round against the baseline round run just before it: the spread of the ratio itself
        row["paired_speedups"] = [round(r["paired_speedup"], 3) for r in rounds_of[cfg]]
        row["paired_cpu_speedups"] = [round(r["paired_cpu_speedup"], 3) for r in rounds_of[cfg]]
        if cfg.endswith(":fp32"):
            row["gate"] = {"fp32_max_abs_diff": FP32_MAX_ABS_DIFF,
                           "passed": row["vs_baseline"]["max_abs_diff"] <= FP32_MAX_ABS_DIFF}
        else:
            row["vs_fp32"] = _compare(scores_of[cfg], fp32)
            row["gate"] = {"min_pearson_vs_fp32": BF16_MIN_CORRELATION,
                           "passed": row["vs_fp32"]["pearson"] >= BF16_MIN_CORRELATION}
        result["engines"].append(row)
    return result


def _render(result: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    wl = result["workload"]
    t = Table(title=f"openrerank bench --suite llm: {wl['requests']} request(s) x {wl['passages_per_request']} "
              f"DL19 passages ({wl['pairs']} pairs per round), best of {result['rounds']} interleaved rounds")
    for c in ("model", "engine", "pairs/s", "× hand-written", "per round", "CPU-s/pair", "× (CPU)",
              "p50 ms/request", "max|Δ| vs hand-written", "corr vs fp32", "gate"):
        t.add_column(c, justify="right")
    for m in result["models"]:
        b = m["baseline"]
        t.add_row(m["shape"], "hand-written fp32, batch 8", f"{b['pairs_per_s']:.3f}", "1.00x", "",
                  f"{b['cpu_s_per_pair']:.3g}", "1.00x", f"{b['p50_ms']:.0f}", "", "", "")
        for e in m["engines"]:
            corr = e.get("vs_fp32", {}).get("pearson")
            t.add_row("", f"openrerank {e['config'].replace(':', ' ')}", f"{e['pairs_per_s']:.3f}",
                      f"{e['speedup']:.2f}x", " ".join(f"{x:.2f}" for x in e["paired_speedups"]),
                      f"{e['cpu_s_per_pair']:.3g}", f"{e['cpu_speedup']:.2f}x",
                      f"{e['p50_ms']:.0f}", f"{e['vs_baseline']['max_abs_diff']:.1e}",
                      "" if corr is None else f"{corr:.5f}", "ok" if e.get("gate", {}).get("passed") else "FAIL")
    Console(width=max(Console().width, 170)).print(t)


def run_llm_bench(args) -> int:
    from rich.console import Console

    console = Console(stderr=True)
    data = Path(args.data) if args.data else default_data_dir()
    if not data.is_dir():
        console.print(f"[red]no benchmark data at {data}; pass --data DIR[/red]")
        return 2
    keys = [k.strip() for k in args.llm_models.split(",") if k.strip()]
    try:
        shapes = [shape_of(k) for k in keys]
    except ValueError as exc:
        console.print(f"[red]{exc}[/red]")
        return 2
    configs = [c.strip() for c in (args.backends or ",".join(DEFAULT_LLM_CONFIGS)).split(",") if c.strip()]
    skipped: dict[str, str] = {}
    if not args.backends:  # the defaults: leave out what this CPU refuses (bf16 without bf16 units), and say so
        from openrerank.runtimes.selection import RuntimeConfigError, check_runtime_options

        for cfg in list(configs):
            runtime, dtype = cfg.split(":")
            try:
                check_runtime_options(runtime, dtype, "cpu", ("torch",))
            except RuntimeConfigError as exc:
                configs.remove(cfg)
                skipped[cfg] = str(exc)
                console.print(f"[yellow]{cfg} left out on this CPU: {exc}[/yellow]")
    wl = load_workload(data, args.run, args.queries or 1, args.passages or 32)
    cache = Path(args.model_cache) if args.model_cache else default_model_cache()
    result: dict = {
        "suite": "llm", "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": " ".join(["openrerank", *sys.argv[1:]]) if sys.argv else "",
        "machine": {"cpus_available": default_threads(),
                    "platform": platform.platform(), "python": platform.python_version(),
                    "load_average_start": _load_average()},
        "workload": {"dataset": data.name, "run": args.run, "requests": len(wl.queries),
                     "passages_per_request": len(wl.passages[0]), "pairs": wl.pairs},
        "rounds": args.rounds, "baseline_batch": BASELINE_BATCH, "models": [], "skipped_configs": skipped,
    }
    console.print(f"workload: {len(wl.queries)} request(s), {wl.pairs} pairs from {data.name}/{args.run}")
    for key, shape in zip(keys, shapes, strict=True):
        path = cached_model(shape.name, data, cache, console)
        result["models"].append(bench_model(key, path, wl, configs, args.rounds, args.threads, console))
    result["machine"]["load_average_end"] = _load_average()
    _render(result)
    out = (Path(args.json) if args.json
           else Path("benchmarks/results") / f"bench-llm-{time.strftime('%Y%m%d-%H%M%S')}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2), encoding="utf-8")
    console.print(f"wrote {out}")
    return 0 if all(e.get("gate", {}).get("passed", True) for m in result["models"] for e in m["engines"]) else 1


def _load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:  # pragma: no cover
        return None

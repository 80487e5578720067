"""GPU readiness check for openrerank (run by `benchmarks/gpu_check.sh`; `--device cpu --quick` dry-runs it).

Steps, each recorded in one JSON file (`$OUT/gpu_check.json`, else `./results/gpu_check.json`):

1. environment: torch/CUDA/device facts.
2. parity: the device/dtype parity tests (`tests/runtimes/test_device_parity.py`, fp32 / bf16 / fp16 on the
   device against the hand-written fp32 references on CPU), and the family parity tests over HTTP with the
   server on the device in fp32 (`OPENRERANK_DEVICE`; `tests/families`, where present).
3. minilm: a MiniLM-L6 cross-encoder, sentence-transformers `CrossEncoder.predict` (fp32, its default batch
   of 32) against openrerank's served path (torch fp32 / fp16 / bf16, the device's batching defaults), on the
   same device and pairs: pairs/s and max |Δlogit| in fp32.
4. latency: one request of 500 passages x ~256 tokens through the served path (tokenization, scheduler,
   runtime) on random-weight Llama-1B- and Mistral-4B-shaped bidirectional rerankers, per dtype: ms per
   request (warm), its tokenization / model split, the batches formed and the time taken to cut them
   (`plan_ms_p50`: the batcher runs on the worker thread between batches), peak device memory, and the dense
   FLOP rate achieved. NIM's published figure for its Mistral-4B reranker is ~1,750 ms / 500 passages on an
   H100; the target is <= 875 ms. That needs ~1.0 PFLOP/s on 128k tokens of a 3.5B-parameter body (above a
   Hopper's dense bf16/fp16 peak, ~0.99), which the JSON's `required_tflops` makes explicit.
5. dtype: the runtime alone (no tokenization or scheduling) on random-weight encoders of three sizes
   (MiniLM-L6, BERT-base, BERT-large shapes), sequences/s per dtype at batch shapes from `--backend auto`'s
   CPU timing shapes (8x128, 4x256) to a 500-passage request's (128x256): whether `--dtype auto`'s rule
   (fp16 for encoders) holds at the shapes a GPU serves, and where a small model is launch-bound instead.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

NIM_MISTRAL_4B_MS = 1750.0  # NIM's published latency, 500 passages on an H100
TARGET_MS = 875.0
QUICK = {"shapes": ("llama-bidirectional-tiny", "mistral-bidirectional-tiny"), "passages": 40, "tokens": 64,
         "requests": 2, "minilm_requests": 2, "encoders": {"bert-tiny": (64, 2, 128)}, "batches": ((2, 16), (4, 32))}
FULL = {"shapes": ("llama-bidirectional-1b", "mistral-bidirectional-4b"), "passages": 500, "tokens": 256,
        "requests": 5, "minilm_requests": 20,
        # (hidden, layers, feed-forward) beside the MiniLM-L6 cross-encoder (384, 6, 1536)
        "encoders": {"bert-base": (768, 12, 3072), "bert-large": (1024, 24, 4096)},
        "batches": ((8, 128), (4, 256), (64, 128), (32, 256), (128, 256))}


def log(msg: str) -> None:
    print(f"[gpu_check {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def environment(device: str) -> dict:
    import tokenizers
    import torch
    import transformers

    env = {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
           "tokenizers": tokenizers.__version__, "device": device, "cuda_available": torch.cuda.is_available()}
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise SystemExit("gpu_check: --device cuda but torch sees no GPU (a CPU build of torch?)")
        props = torch.cuda.get_device_properties(device)
        env.update({"gpu": props.name, "capability": f"{props.major}.{props.minor}",
                    "gpu_memory_gib": round(props.total_memory / 2**30, 1), "cuda": torch.version.cuda,
                    "tf32_matmul": torch.backends.cuda.matmul.allow_tf32})
    return env


def texts_for_workload() -> tuple[list[str], list[str], str]:
    """(passage texts, queries, source): DL19 where the data is at hand, else synthetic English-like text."""
    from openrerank_bench import default_data_dir
    from openrerank_bench.synthetic import synthetic_texts

    data = Path(os.environ.get("OPENRERANK_BENCH_DATA", "")) if os.environ.get("OPENRERANK_BENCH_DATA") \
        else default_data_dir()
    if (data / "corpus.jsonl.gz").is_file():
        from openrerank_bench.llm import corpus_texts

        queries = [json.loads(line)["text"] for line in (data / "queries.jsonl").read_text().splitlines() if line]
        return corpus_texts(data), queries, f"DL19 ({data})"
    return synthetic_texts(20000, seed=1), synthetic_texts(50, seed=2, words=(4, 10)), "synthetic"


# -- parity -----------------------------------------------------------------------------------------------


def run_pytest(args: list[str], env: dict, xml: Path, timeout: int) -> dict:
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={xml}", *args]
    log("$ " + " ".join(f"{k}={v}" for k, v in env.items()) + " " + " ".join(cmd[2:]))
    started = time.perf_counter()
    try:
        # The tests' servers start by fork + exec, which turns the tokenizers' thread pool off with a warning.
        proc = subprocess.run(cmd, cwd=REPO, env={**os.environ, **env, "HF_HUB_OFFLINE": "1",
                                                  "TOKENIZERS_PARALLELISM": "false"}, text=True,
                              capture_output=True, timeout=timeout)
        out, rc = proc.stdout + proc.stderr, proc.returncode
    except subprocess.TimeoutExpired as exc:
        out, rc = f"{exc.stdout or ''}\n(timed out after {timeout} s)", 124
    lines = out.strip().splitlines()
    tail = next((ln for ln in reversed(lines) if re.search(r"\d+ (passed|failed|error|skipped)", ln)),
                lines[-1] if lines else "")  # pytest's summary line (progress bars may come after it)
    counts = {k: int(v) for v, k in re.findall(r"(\d+) (passed|failed|skipped|error|errors)", tail)}
    print("\n".join(line for line in out.splitlines() if line.startswith(("parity", "FAILED", "ERROR", "E "))
                    or " max |diff| " in line)[-6000:], flush=True)
    log(f"pytest: {tail} ({time.perf_counter() - started:.0f} s)")
    return {"returncode": rc, "summary": tail, **counts, "seconds": round(time.perf_counter() - started, 1)}


def parity(device: str, dtypes: list[str], out: Path, quick: bool) -> dict:
    result = {"device_parity": run_pytest(
        ["-s", "tests/runtimes/test_device_parity.py"],
        {"OPENRERANK_TEST_DEVICE": device, "OPENRERANK_TEST_DTYPES": ",".join(dtypes)},
        out / "parity-device.xml", timeout=300)}
    families = sorted(str(p.relative_to(REPO)) for p in (REPO / "tests" / "families").glob("test_*.py")
                      if p.name not in ("test_cli.py", "test_detection.py", "test_shared_prefix.py"))
    if families and not quick:
        # The family tests start `openrerank serve`, which reads OPENRERANK_DEVICE / OPENRERANK_DTYPE.
        result["family_parity_fp32"] = run_pytest(families, {"OPENRERANK_DEVICE": device, "OPENRERANK_DTYPE": "fp32"},
                                                  out / "parity-families.xml", timeout=300)
    return result


# -- MiniLM cross-encoder vs sentence-transformers --------------------------------------------------------


def minilm(device: str, dtypes: list[str], requests: int, tmp: Path) -> dict:
    import torch
    from openrerank_bench.runners import OfflineRunner, Workload
    from openrerank_bench.synthetic import build_minilm_cross_encoder
    from sentence_transformers import CrossEncoder

    from openrerank.core.requests import RerankRequest, Truncate
    from openrerank.sources.source import ModelSourceError

    texts, queries, source = texts_for_workload()
    model_dir = tmp / "minilm-l6-ce"
    try:
        from openrerank_bench import build_bench_cross_encoder

        build_bench_cross_encoder(model_dir)  # the packaged MiniLM-L6 weights, where installed
        weights = "all-MiniLM-L6-v2 + seeded head"
    except (ImportError, OSError, ModelSourceError):  # no packaged weights here: the same shape, random weights
        build_minilm_cross_encoder(model_dir, texts[:20000])
        weights = "random (MiniLM-L6-H384 shape)"
    rng = np.random.default_rng(0)
    wl = Workload([queries[i % len(queries)] for i in range(requests)],
                  [[texts[j] for j in rng.choice(len(texts), 100, replace=False)] for _ in range(requests)])
    ce = CrossEncoder(str(model_dir), device=device, max_length=512, activation_fn=torch.nn.Identity())
    loop = asyncio.new_event_loop()
    runners = {dt: OfflineRunner(model_dir, "torch", dt, None, loop, device=device) for dt in dtypes}
    reqs = [RerankRequest(query=q, passages=ps, truncate=Truncate.END) for q, ps in zip(wl.queries, wl.passages,
                                                                                      strict=True)]

    def run_st() -> tuple[float, np.ndarray]:
        t = time.perf_counter()
        s = [np.asarray(ce.predict([(q, p) for p in ps], show_progress_bar=False), np.float32).ravel()
             for q, ps in zip(wl.queries, wl.passages, strict=True)]
        return wl.pairs / (time.perf_counter() - t), np.concatenate(s)

    def run_ours(runner) -> tuple[float, np.ndarray]:
        async def go():
            return [np.asarray((await runner.served.rerank(r)).logits, np.float32) for r in reqs]

        t = time.perf_counter()
        s = loop.run_until_complete(go())
        return wl.pairs / (time.perf_counter() - t), np.concatenate(s)

    run_st()  # warm-up
    for r in runners.values():
        run_ours(r)
    rates: dict[str, list[float]] = {"sentence-transformers fp32": [], **{f"openrerank {d}": [] for d in runners}}
    scores: dict[str, np.ndarray] = {}
    for _ in range(2):
        rate, scores["st"] = run_st()
        rates["sentence-transformers fp32"].append(rate)
        for dt, runner in runners.items():
            rate, scores[dt] = run_ours(runner)
            rates[f"openrerank {dt}"].append(rate)
    base = max(rates["sentence-transformers fp32"])
    result = {"weights": weights, "text": source, "requests": requests, "pairs": wl.pairs,
              "pairs_per_s": {k: round(max(v), 1) for k, v in rates.items()},
              "x_sentence_transformers": {k: round(max(v) / base, 2) for k, v in rates.items()}}
    result["max_abs_diff_vs_st"] = {dt: float(np.abs(scores[dt] - scores["st"]).max()) for dt in runners}
    for runner in runners.values():
        runner.close()
    loop.close()
    log(f"minilm: {result['pairs_per_s']} pairs/s; x ST {result['x_sentence_transformers']}")
    return result


def encoder_dtypes(device: str, dtypes: list[str], encoders: dict, batches: tuple, tmp: Path) -> dict:
    """Sequences/s of the torch runtime alone per encoder size, dtype and batch shape (module docstring, 5)."""
    from openrerank_bench.synthetic import build_minilm_cross_encoder
    from transformers import BertConfig, BertForSequenceClassification

    from openrerank.engine.loading import LoadOptions, load_model
    from openrerank.runtimes.timing_passes import time_runtimes

    texts, _, _ = texts_for_workload()
    models = {"minilm-l6": build_minilm_cross_encoder(tmp / "dtype-minilm-l6", texts[:20000])}
    for name, (hidden, layers, ff) in encoders.items():
        out = tmp / f"dtype-{name}"
        config = BertConfig(vocab_size=30522, hidden_size=hidden, num_hidden_layers=layers,
                            num_attention_heads=max(1, hidden // 64), intermediate_size=ff, num_labels=1)
        BertForSequenceClassification(config).eval().save_pretrained(out)
        for f in models["minilm-l6"].iterdir():  # the tokenizer's files
            if f.name.startswith(("tokenizer", "special_tokens", "vocab")):
                (out / f.name).write_bytes(f.read_bytes())
        models[name] = out
    rates: dict[str, dict[str, float]] = {}
    for name, path in models.items():
        for dtype in dtypes:
            loaded = load_model(str(path), LoadOptions(device=device, backend="torch", dtype=dtype,
                                                       backend_choice="rules"))
            runtime = loaded.scorer.runtime
            rates[f"{name} {dtype}"] = {f"{rows}x{width}": round(time_runtimes([runtime], [(rows, width)], 30522,
                                                                                seconds=0.5)[0].pairs_per_s, 1)
                                        for rows, width in batches}
            loaded.close()
            log(f"dtype: {name} {dtype} {rates[f'{name} {dtype}']}")
    return {"sequences_per_s": rates, "batches": [list(b) for b in batches]}


# -- one request of 500 passages x ~256 tokens ------------------------------------------------------------


def body_flops(shape, lengths: list[int]) -> float:
    """Dense FLOPs of the transformer body over sequences of `lengths` tokens (matmuls + attention)."""
    c = shape.config
    h, inter, layers = c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"]
    heads, kv = c["num_attention_heads"], c["num_key_value_heads"]
    hd = c.get("head_dim") or h // heads
    per_token = layers * (h * heads * hd + 2 * h * kv * hd + heads * hd * h + 3 * h * inter)
    tokens = sum(lengths)
    attention = sum(layers * 4 * n * n * heads * hd for n in lengths)
    return 2.0 * per_token * tokens + attention


def latency(shape_name: str, device: str, dtypes: list[str], passages: int, tokens: int, requests: int,
            tmp: Path) -> dict:
    import torch
    from openrerank_bench.synthetic import SHAPES, build_model, passages_of_length, train_tokenizer

    from openrerank.core.requests import RerankRequest, Truncate
    from openrerank.engine.batching import default_policy
    from openrerank.engine.loading import LoadOptions
    from openrerank.engine.scheduler import SchedulerConfig
    from openrerank.engine.served import load_served_model
    from openrerank.sources.source import ModelSource

    shape = SHAPES[shape_name]
    texts, queries, source = texts_for_workload()
    tok = train_tokenizer(texts[:20000])
    path = tmp / shape_name
    t = time.perf_counter()
    build_model(shape, path, tok, device=device, dtype="bf16")
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    built_s = time.perf_counter() - t
    # Passages sized so that query + template + passage is ~`tokens` long.
    docs = passages_of_length(tok, texts, passages, (tokens - 28, tokens - 12), seed=3)
    query = queries[0]
    req = RerankRequest(query=query, passages=docs, truncate=Truncate.END)
    policy = default_policy(device)
    # The request is this step's fixed size, not what the machine's measured speed admits (a slow CPU's dry run
    # refused it as too large): the budget is set past it.
    sched = SchedulerConfig(policy=policy, max_request_tokens=passages * tokens * 4)
    out = {"shape": shape_name, "reference": shape.note, "text": source, "passages": passages,
           "build_seconds": round(built_s, 1), "dtypes": {}}
    for dtype in dtypes:
        t = time.perf_counter()
        served = load_served_model(ModelSource(shape_name, str(path)),
                                   LoadOptions(backend="torch", dtype=dtype, device=device), sched, None)
        load_s = time.perf_counter() - t
        prep = served.loaded.encoder.prepare(query, docs, Truncate.END)
        lengths = [it.length for it in prep.items]
        plan_ms = []  # the cut search runs on the worker thread between batches: its cost on this host
        for _ in range(5):
            t = time.perf_counter()
            batches = policy.split(prep.items, served.loaded.scorer.padded_shape)
            plan_ms.append((time.perf_counter() - t) * 1e3)
        padded = sum(max(lengths[i] for i in b) * len(b) for b in batches)
        loop = asyncio.new_event_loop()
        if device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats(device)

        async def go(served=served):
            await served.scheduler.start()
            await served.rerank(req)  # warm-up at full size
            timings = []
            for _ in range(requests):
                t0 = time.perf_counter()
                res = await served.rerank(req)
                timings.append(((time.perf_counter() - t0) * 1e3, res.timings.tokenize_ms, res.timings.inference_ms))
            await served.scheduler.stop()
            return timings

        timings = loop.run_until_complete(go())
        loop.close()
        total = [x[0] for x in timings]
        model_ms = float(np.median([x[2] for x in timings]))
        flops = body_flops(shape, lengths)
        row = {"load_seconds": round(load_s, 1), "runtime": served.loaded.scorer.description,
               "mean_tokens_per_pair": round(float(np.mean(lengths)), 1), "batches": len(batches),
               "plan_ms_p50": round(float(np.median(plan_ms)), 2),
               "padding": round(1 - sum(lengths) / padded, 3),
               "ms_per_request": [round(x, 1) for x in total], "p50_ms": round(float(np.median(total)), 1),
               "min_ms": round(min(total), 1), "tokenize_ms_p50": round(float(np.median([x[1] for x in timings])), 1),
               "model_ms_p50": round(model_ms, 1), "body_tflop": round(flops / 1e12, 1),
               "achieved_tflops": round(flops / (model_ms / 1e3) / 1e12, 1),
               "required_tflops_for_target": round(flops / (TARGET_MS / 1e3) / 1e12, 1)}
        if device.startswith("cuda"):
            row["peak_memory_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 1)
        if "mistral" in shape_name:
            row["vs_nim_1750ms"] = round(NIM_MISTRAL_4B_MS / row["p50_ms"], 2)
            row["meets_875ms_target"] = row["p50_ms"] <= TARGET_MS
        out["dtypes"][dtype] = row
        log(f"{shape_name} {dtype}: p50 {row['p50_ms']} ms per {passages} passages "
            f"(model {row['model_ms_p50']} ms, tokenize {row['tokenize_ms_p50']} ms, {row['batches']} batches "
            f"planned in {row['plan_ms_p50']} ms, "
            f"{row['achieved_tflops']} TFLOP/s)")
        served.loaded.close()
        del served
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
    return out


def cpu_dtypes() -> list[str]:
    """The default dry-run dtypes: fp32, and bf16 where this CPU runs it natively (it is refused elsewhere)."""
    from openrerank.runtimes.selection import RuntimeConfigError, check_runtime_options

    try:
        check_runtime_options("torch", "bf16", "cpu", ("torch",))
    except RuntimeConfigError as exc:
        log(f"bf16 left out on this CPU: {exc}")
        return ["fp32"]
    return ["fp32", "bf16"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda", help="cuda[:N], or cpu for a dry run")
    p.add_argument("--quick", action="store_true", help="tiny shapes and few pairs (a dry run of every step)")
    p.add_argument("--steps", default="parity,minilm,latency,dtype",
                   help="comma-separated subset of the steps")
    p.add_argument("--dtypes", default=None, help="default: fp32,bf16,fp16 on CUDA (latency: fp16,bf16); "
                   "fp32 on CPU, and bf16 where the CPU has bf16 units")
    p.add_argument("--passages", type=int, default=None, help="latency: passages per request (default: 500, "
                   "--quick 40)")
    p.add_argument("--tokens", type=int, default=None, help="latency: tokens per pair (default: 256, --quick 64)")
    p.add_argument("--out", default=os.environ.get("OUT") or str(REPO / "results"), help="where the JSON goes")
    args = p.parse_args(argv)
    cuda = args.device.startswith("cuda")
    size = dict(QUICK if args.quick else FULL)
    size.update({k: v for k, v in (("passages", args.passages), ("tokens", args.tokens)) if v})
    dtypes = args.dtypes.split(",") if args.dtypes else (["fp32", "bf16", "fp16"] if cuda else cpu_dtypes())
    fast_dtypes = [d for d in dtypes if d != "fp32"] or dtypes
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result: dict = {"started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "argv": sys.argv[1:],
                    "environment": environment(args.device), "quick": args.quick}
    log(f"environment: {result['environment']}")
    steps = [s.strip() for s in args.steps.split(",") if s.strip()]
    started = time.perf_counter()
    path = out / "gpu_check.json"

    def save() -> None:
        result["seconds"] = round(time.perf_counter() - started, 1)
        path.write_text(json.dumps(result, indent=2), encoding="utf-8")

    with tempfile.TemporaryDirectory(prefix="openrerank-gpu-check-") as tmp:
        for step in steps:
            log(f"step {step} ...")
            try:
                if step == "parity":
                    result["parity"] = parity(args.device, dtypes, out, args.quick)
                elif step == "minilm":
                    result["minilm"] = minilm(args.device, dtypes, size["minilm_requests"], Path(tmp))
                elif step == "dtype":
                    result["dtype"] = encoder_dtypes(args.device, dtypes, size["encoders"], size["batches"],
                                                     Path(tmp))
                elif step == "latency":
                    result["latency"] = [latency(s, args.device, fast_dtypes, size["passages"], size["tokens"],
                                                 size["requests"], Path(tmp)) for s in size["shapes"]]
                else:
                    raise SystemExit(f"unknown step {step!r}")
            except Exception as exc:  # one broken step must not lose the others' figures
                result.setdefault("errors", {})[step] = f"{type(exc).__name__}: {exc}"
                log(f"step {step} failed: {type(exc).__name__}: {exc}")
            save()
    log(f"wrote {path} ({result['seconds']} s)")
    failed = bool(result.get("errors")) or any(
        v.get("returncode", 0) not in (0,) for v in result.get("parity", {}).values())
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

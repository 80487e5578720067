"""`openrerank bench`: throughput, latency and fidelity of each engine against the usual sentence-transformers
baseline, one run.

Workload: the TREC DL19 queries with their BM25 top-100 passages (real MS MARCO text), sent as 100-passage
requests. Model (`--model`): `cross-encoder` (default), the MiniLM-L6 cross-encoder shape built from the
packaged all-MiniLM-L6-v2 weights plus a seeded one-logit head (the compute of ms-marco-MiniLM-L-6-v2), or
`default`, the embedded bi-encoder itself. Baseline: sentence-transformers fp32 (`CrossEncoder.predict`, or
`SentenceTransformer.encode` + cosine) on the same pairs, measured in the same run, so every figure is also a
ratio.

Per engine (BACKEND:DTYPE): pairs/s in-process (through the served model's scheduler; rounds interleaved
with the baseline's, best kept, spread shown), the fp32 roofline fraction of that best round (median and range
of the rounds' beside it), the first request after `ready` against the median of the same request warm over
the rounds (range beside it; the first request is one sample), pairs/s and latency through the real HTTP
server with one client and with 16, the Pearson correlation and largest difference of its scores against the
fp32 baseline's, and the default model's DL19 nDCG@10 on that engine: the two halves of the fidelity gate
`--backend auto` relies on. Results go to a rich table and a JSON file.

The embeddings row (`openrerank_bench/embed.py`) measures `/v1/embeddings`' path on the embedded default against
`SentenceTransformer.encode` in the same run; `--tasks` picks either part. `--suite llm` (`openrerank_bench/llm.py`)
measures the LLM reranker families against their model cards' code; `--scale-out` (`openrerank_bench/scaleout.py`)
Ray Serve replicas against the direct server.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

from openrerank.cli.options import at_least_one
from openrerank.runtimes.base import LANES_ENV, default_threads, lanes_text
from openrerank.runtimes.selection import LANED_RUNTIMES, RuntimeConfigError
from openrerank_bench.embed import DEFAULT_EMBED_CONFIGS
from openrerank_bench.quality import default_model_ndcg, faithful, ndcg10, score_agreement
from openrerank_bench.report import render
from openrerank_bench.roofline import (
    fastest_gemm,
    flops_per_pair,
    fraction_summary,
    gemm_gflops,
    gemm_products,
    workload_sequences,
)
from openrerank_bench.runners import (
    SERVED_NAME,
    Baseline,
    OfflineRunner,
    best_round,
    first_request_summary,
    run_http_concurrent,
    run_http_sequential,
    workload_bodies,
)
from openrerank_bench.serve_process import ServeProcess
from openrerank_bench.workload import DATASET, WorkloadError, build_bench_cross_encoder, default_data_dir, load_workload

DEFAULT_CONFIGS = ("openvino:bf16", "openvino:int8", "openvino:fp32", "onnx:fp32", "onnx:int8", "torch:fp32",
                   "torch:bf16")
MODELS = ("cross-encoder", "default")


def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:  # pragma: no cover
        return None


def _auto_pick(model_dir: Path, threads: int | None, console) -> tuple[str | None, dict | None]:
    """What `--backend auto` serves the bench model with on this machine (BACKEND:DTYPE, measured: every
    faithful engine timed on the model's shapes, or read from the cache), and its engine metadata."""
    from openrerank.engine.loading import LoadOptions, load_model

    try:
        loaded = load_model(str(model_dir), LoadOptions(threads=threads))
    except Exception as exc:  # the engines' own rows say more
        console.print(f"[red]auto could not load the model: {exc}[/red]")
        return None, None
    engine = loaded.runtime_choice
    loaded.close()
    if engine is None:
        return None, None
    console.print(f"auto: {engine.label}: {engine.reason}")
    return f"{engine.runtime}:{engine.dtype}", engine.as_metadata()


def run_bench(args: argparse.Namespace) -> int:
    """Every suite; a workload its flags cannot build (a --run file that is not there) is one line, exit 2."""
    try:
        return _run_suite(args)
    except WorkloadError as exc:
        print(f"openrerank bench: error: {exc}", file=sys.stderr)
        return 2


def _run_suite(args: argparse.Namespace) -> int:
    from rich.console import Console

    from openrerank.extras import MissingExtraError, require

    if args.scale_out:
        from openrerank.server.ray_local import set_ray_env

        set_ray_env()
        try:
            require("ray.serve", "ray", "openrerank bench --scale-out")
        except MissingExtraError as exc:
            print(f"openrerank bench: error: {exc}", file=sys.stderr)
            return 2
        from openrerank_bench.scaleout import run_scaleout

        args.rounds = args.rounds or 3
        return run_scaleout(args)
    if args.suite == "colbert":
        from openrerank_bench.colbert import run_colbert_bench

        return run_colbert_bench(args)
    if args.suite == "llm":
        from openrerank_bench.llm import run_llm_bench

        args.rounds = args.rounds or 2
        return run_llm_bench(args)
    args.rounds = args.rounds or 2

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
    configs = [c.strip() for c in (args.backends or ",".join(DEFAULT_CONFIGS)).split(",") if c.strip()]
    embed_configs = [c.strip() for c in (args.embed_backends or ",".join(DEFAULT_EMBED_CONFIGS)).split(",")
                     if c.strip()]
    tasks = {t.strip() for t in args.tasks.split(",") if t.strip()}
    if not tasks or tasks - {"rerank", "embed"}:
        console.print(f"[red]--tasks is a comma-separated list of rerank, embed; got {args.tasks!r}[/red]")
        return 2
    checked = ([("--backends", configs)] if "rerank" in tasks else []) + \
        ([("--embed-backends", embed_configs)] if "embed" in tasks else [])
    for flag, entries in checked:  # only the tasks asked for (docs/benchmarks.md), named as the flag given
        for c in entries:
            if c.count(":") != 1:
                console.print(f"[red]{flag} entries are BACKEND:DTYPE, got {c!r}[/red]")
                return 2
    try:  # only the engines of the tasks asked for; a default list's row this CPU refuses is left out, said why
        if "rerank" in tasks:
            configs = _runnable(configs, given=args.backends is not None, console=console)
        if "embed" in tasks:
            embed_configs = _runnable(embed_configs, given=args.embed_backends is not None, console=console,
                                      flag="--embed-backends")
    except RuntimeConfigError as exc:
        print(f"openrerank bench: error: {exc}", file=sys.stderr)
        return 2
    try:
        lanes = [int(n) for n in args.lanes.split(",") if n.strip()] if args.lanes else []
    except ValueError:
        lanes = [0]
    if any(n < 1 for n in lanes):
        console.print(f"[red]--lanes is a comma-separated list of lane counts >= 1, got {args.lanes!r}[/red]")
        return 2
    if lanes:
        configs = lane_configs(configs, lanes)
    args.passages = args.passages or 100
    wl = load_workload(data, args.run, args.queries, args.passages)
    console.print(f"workload: {len(wl.queries)} requests, {wl.pairs} pairs from {data.name}/{args.run}; "
                  f"load average {load_average()}")
    result: dict = {
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": " ".join(["openrerank", *sys.argv[1:]]) if sys.argv else "",
        "machine": {"cpus_available": default_threads(),
                    "cpu": _cpu_model(), "platform": platform.platform(), "python": platform.python_version(),
                    "load_average_start": load_average()},
        "workload": {"dataset": data.name, "run": args.run, "requests": len(wl.queries),
                     "passages_per_request": args.passages, "pairs": wl.pairs},
        "concurrency": {"clients": args.clients, "requests": args.concurrent_requests},
        "auto": None,
        "backends": [],
    }
    if "embed" in tasks:
        from openrerank_bench.embed import distinct_texts, run_embeddings

        with tempfile.TemporaryDirectory(prefix="openrerank-bench-") as tmp:
            texts = distinct_texts(wl.passages, args.embed_texts)
            console.print(f"embeddings workload: {len(texts)} distinct passages")
            result["embeddings"] = run_embeddings(texts, embed_configs, rounds=args.rounds, threads=args.threads,
                                                  http=not args.no_http, tmp=Path(tmp), console=console)
    if "rerank" not in tasks:
        return _finish(result, args, console)
    with tempfile.TemporaryDirectory(prefix="openrerank-bench-") as tmp:
        bi_encoder = args.model == "default"
        if bi_encoder:
            from openrerank.sources.source import default_model_dir

            model_dir = default_model_dir()
            result["model"] = {"name": "default bi-encoder all-MiniLM-L6-v2"}
        else:
            model_dir = build_bench_cross_encoder(Path(tmp) / "minilm-l6-ce")
            result["model"] = {"name": "MiniLM-L6 cross-encoder",
                               "architecture": "BertForSequenceClassification (MiniLM-L6-H384, 1 logit)"}
        from openrerank.engine.loading import resolve_model

        max_length = resolve_model(str(model_dir)).spec.max_length
        result["model"]["max_length"] = max_length
        auto, result["auto_choice"] = _auto_pick(model_dir, args.threads, console)
        result["auto"] = auto
        _offline(args, wl, model_dir, max_length, bi_encoder, configs, auto, result, console)
        if not args.no_quality:
            _quality(args, wl, result, console)
        if not args.no_http:
            _http(args, wl, model_dir, Path(tmp), result, console)
    return _finish(result, args, console)


def _runnable(configs: list[str], *, given: bool, console, flag: str = "--backends") -> list[str]:
    """The BACKEND:DTYPE entries this machine runs, checked before anything is timed: one the user named and
    this CPU or install refuses ends the bench (RuntimeConfigError); a default one is left out, said why (a CPU
    without bf16 refuses the default list's bf16 rows by design, which made every plain bench exit 1)."""
    import warnings

    from openrerank.runtimes.selection import plan_runtimes

    kept = []
    for cfg in configs:
        backend, _, dtype = cfg.partition(":")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # int8 without VNNI: the engine's own load says it
                # named as this entry's parts: not `--backend ...`, a serve flag the user did not type here
                plan_runtimes(backend, dtype, "cpu",
                              shown={"backend": f"backend {backend!r}", "dtype": f"dtype {dtype!r}"})
        except RuntimeConfigError as exc:
            if given:
                raise RuntimeConfigError(f"{flag} {cfg}: {exc}") from None
            console.print(f"skipping {cfg}: {exc}")
            continue
        kept.append(cfg)
    return kept


def _finish(result: dict, args: argparse.Namespace, console) -> int:
    """Print the tables, write the JSON; exit 1 if any engine failed."""
    result["machine"]["load_average_end"] = load_average()
    if result["backends"]:
        render(result)
    if "embeddings" in result:
        from openrerank_bench.embed import render as render_embeddings

        render_embeddings(result["embeddings"], console)
    console.print(f"load average at start {result['machine']['load_average_start']}, "
                  f"at end {result['machine']['load_average_end']}")
    out = Path(args.json) if args.json else Path("benchmarks/results") / f"bench-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2), encoding="utf-8")
    console.print(f"wrote {out}")
    rows = result["backends"] + result.get("embeddings", {}).get("backends", [])
    return 1 if any(r.get("error") for r in rows) else 0


#: Separates an engine from its lane count in the expanded `--lanes` configs ("openvino:fp32@2").
LANES_SEP = "@"


def lane_configs(configs: list[str], lanes: list[int]) -> list[str]:
    """Each engine that has lanes once per lane count, side by side in the same rounds; an engine without
    lanes (PyTorch runs one batch at a time) keeps its one row."""
    out: list[str] = []
    for c in configs:
        out += [f"{c}{LANES_SEP}{n}" for n in lanes] if c.partition(":")[0] in LANED_RUNTIMES else [c]
    return out


@contextlib.contextmanager
def lanes_env(lanes: int | None):
    """`OPENRERANK_LANES` set to `lanes` while a runner loads (runtimes read it when built); None: as it is."""
    if lanes is None:
        yield
        return
    before = os.environ.get(LANES_ENV)
    os.environ[LANES_ENV] = str(lanes)
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(LANES_ENV, None)
        else:
            os.environ[LANES_ENV] = before


def _cpu_model() -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace").splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    except OSError:
        pass
    return None


def _offline(args, wl, model_dir, max_length, bi_encoder, configs, auto, result, console) -> None:
    """Every engine loaded side by side, rounds interleaved (baseline, then each engine), best round kept,
    so a burst of other load on the machine does not land on one engine only."""
    loop = asyncio.new_event_loop()
    runners: dict[str, OfflineRunner] = {}
    rows: dict[str, dict] = {}
    baseline = Baseline(model_dir, max_length, bi_encoder)
    for cfg in configs:
        engine, _, lanes = cfg.partition(LANES_SEP)
        backend, dtype = engine.split(":")
        row = rows[cfg] = {"name": f"{backend} {dtype}", "backend": backend, "dtype": dtype, "auto": engine == auto}
        if not lanes and row["auto"] and (result.get("auto_choice") or {}).get("lanes"):
            lanes = str(result["auto_choice"]["lanes"])  # auto's row runs what auto serves, lanes included
        if lanes:
            row["lanes"] = int(lanes)
        result["backends"].append(row)
        try:
            console.print(f"loading {cfg} ...")
            with lanes_env(row.get("lanes")):
                runners[cfg] = OfflineRunner(model_dir, backend, dtype, args.threads, loop)
        except Exception as exc:  # one broken config must not lose the others' numbers
            row["error"] = f"{type(exc).__name__}: {exc}"
            console.print(f"[red]{cfg} failed: {row['error']}[/red]")
            continue
        # Unless given, the lane count is what loading measured fastest; the HTTP server runs the same.
        row["lanes"] = n = runners[cfg].served.loaded.scorer.lanes
        if backend in LANED_RUNTIMES:
            row["name"] = f"{backend} {dtype}, {lanes_text(n)}"
            auto_lanes = (result.get("auto_choice") or {}).get("lanes")
            if row["auto"] and auto_lanes and n != auto_lanes:
                row["auto"] = False  # under --lanes, auto's row is the one with the count auto serves
    rounds: dict[str, list[dict]] = {"baseline": [], **{c: [] for c in runners}}
    reference: list = []
    threads = args.threads or default_threads()
    # The roofline's pace: the fastest library's fp32 GEMM, timed between every two measurements (paired).
    products = gemm_products(threads)
    library, library_rates = fastest_gemm(products)
    console.print(f"fp32 GEMM on {threads} threads, GFLOP/s: "
                  + ", ".join(f"{name} {rate:.1f}" for name, rate in library_rates.items())
                  + f"; the roofline times {library}'s")
    gemm = products[library]
    gflops = [library_rates[library]]
    for r in range(args.rounds):
        stats, reference = baseline.measure(wl)
        gflops.append(gemm_gflops(gemm))
        rounds["baseline"].append({**stats, "gemm_gflops": (gflops[-2], gflops[-1])})
        console.print(f"round {r + 1}/{args.rounds}: baseline {stats['pairs_per_s']:.1f} pairs/s")
        for cfg, runner in runners.items():
            stats, scores = runner.measure(wl)
            gflops.append(gemm_gflops(gemm))
            rounds[cfg].append({**stats, "gemm_gflops": (gflops[-2], gflops[-1])})
            rows[cfg]["agreement"] = score_agreement(scores, reference)
            console.print(f"round {r + 1}/{args.rounds}: {cfg} {stats['pairs_per_s']:.1f} pairs/s "
                          f"({stats['pairs_per_s'] / rounds['baseline'][-1]['pairs_per_s']:.2f}x), correlation "
                          f"{rows[cfg]['agreement']['correlation']:.6f}")
    result["baseline"] = {**best_round(rounds["baseline"]), "name": baseline.name}
    if bi_encoder:
        result["reference_ndcg@10"] = ndcg10(wl, reference)  # the default model in sentence-transformers fp32
    baseline.close()
    if runners:
        result["roofline"] = roof = _roofline(next(iter(runners.values())), wl, model_dir, threads, gflops)
        roof.update(gemm_library=library, gemm_library_gflops=library_rates)
        console.print(f"fp32 roofline: {library} GEMM {roof['gemm_gflops']:.1f} GFLOP/s on {threads} threads "
                      f"(median of {len(gflops)}, {min(gflops):.1f}-{max(gflops):.1f}), "
                      f"{roof['gflop_per_pair']:.2f} GFLOP per pair: {roof['pairs_per_s']:.1f} pairs/s; fractions "
                      "are paired per round")
        result["baseline"].update(fraction_summary(rounds["baseline"], roof["gflop_per_pair"]))
    for cfg, runner in runners.items():
        runner.close()
        rows[cfg]["offline"] = best_round(rounds[cfg])
        if "roofline" in result:
            rows[cfg].update(fraction_summary(rounds[cfg], result["roofline"]["gflop_per_pair"]))
        if runner.first_request_ms is not None and runner.warm_request_ms:
            rows[cfg]["first_request"] = first_request_summary(runner.first_request_ms, runner.warm_request_ms)
    loop.close()


def _roofline(runner: OfflineRunner, wl, model_dir: Path, threads: int, gflops: list[float]) -> dict:
    """The fp32 roofline of this workload on this machine at the run's median GEMM pace (formula and pairing:
    openrerank_bench/roofline.py)."""
    config = json.loads((Path(model_dir) / "config.json").read_text(encoding="utf-8"))
    sequences, pairs = workload_sequences(runner.served.loaded, wl.queries, wl.passages)
    per_pair = flops_per_pair(config, sequences, pairs)
    pace = statistics.median(gflops)
    return {"gemm_gflops": round(pace, 1), "gemm_gflops_range": [round(min(gflops), 1), round(max(gflops), 1)],
            "threads": threads, "gflop_per_pair": per_pair / 1e9,
            "mean_tokens": sum(sequences) / max(1, len(sequences)), "pairs_per_s": pace * 1e9 / per_pair}


def _quality(args, wl, result, console) -> None:
    """The default model's DL19 nDCG@10 on each engine, against sentence-transformers fp32's."""
    if "reference_ndcg@10" not in result:
        from openrerank.sources.source import default_model_dir
        from openrerank_bench.runners import Baseline

        ref = Baseline(default_model_dir(), 256, bi_encoder=True)
        result["reference_ndcg@10"] = ndcg10(wl, [ref.predict(q, ps) for q, ps in zip(wl.queries, wl.passages,
                                                                                       strict=True)])
        ref.close()
    console.print(f"default model DL19 nDCG@10, sentence-transformers fp32: {result['reference_ndcg@10']:.4f}")
    done: dict[tuple[str, str], dict] = {}
    for row in result["backends"]:
        if row.get("error"):
            continue
        if (row["backend"], row["dtype"]) in done:  # the same engine with other lanes: the same scores
            row.update({k: done[(row["backend"], row["dtype"])][k] for k in ("default_ndcg@10", "faithful")})
            continue
        try:
            q = default_model_ndcg(wl, row["backend"], row["dtype"], args.threads)
        except Exception as exc:  # e.g. an engine the default model cannot run on
            console.print(f"[red]{row['name']}: default-model nDCG failed: {exc}[/red]")
            continue
        row["default_ndcg@10"] = q["ndcg@10"]
        row["faithful"] = faithful(row, result["reference_ndcg@10"])
        done[(row["backend"], row["dtype"])] = row
        console.print(f"{row['name']}: default model DL19 nDCG@10 {q['ndcg@10']:.4f}")


def _http(args, wl, model_dir, tmp: Path, result, console) -> None:
    bodies, sizes = workload_bodies(wl)
    for row in result["backends"]:
        if row.get("error"):
            continue
        serve_args = ["--model", f"{SERVED_NAME}={model_dir}", "--backend", row["backend"], "--dtype",
                      row["dtype"], "--log-level", "warning",
                      *(["--threads", str(args.threads)] if args.threads else [])]
        server = ServeProcess(serve_args, tmp, env={LANES_ENV: str(row["lanes"])} if "lanes" in row else None)
        try:
            server.wait_ready()
            console.print(f"{row['name']}: HTTP, 1 client ...")
            row["http"] = run_http_sequential(server.url, wl)
            console.print(f"{row['name']}: HTTP, {args.clients} clients x {args.concurrent_requests} requests ...")
            row["concurrent"] = run_http_concurrent(server.url, bodies, sizes, args.clients,
                                                    args.concurrent_requests)
            console.print(f"  1 client {row['http']['pairs_per_s']:.1f} pairs/s, "
                          f"{args.clients} clients {row['concurrent']['pairs_per_s']:.1f} pairs/s")
        except Exception as exc:
            row["error"] = f"{type(exc).__name__}: {exc}"
            console.print(f"[red]{row['name']} HTTP failed: {row['error']}[/red]")
        finally:
            server.stop()


def count_list(text: str) -> list[int]:
    """An argparse type for --replica-counts: comma-separated counts of at least 1 (`1,2,3`); else argparse's
    one line, exit 2 (`a` was an int() traceback)."""
    try:
        counts = [at_least_one(n.strip()) for n in text.split(",") if n.strip()]
    except argparse.ArgumentTypeError as exc:
        raise argparse.ArgumentTypeError(f"{text!r}: {exc}; give comma-separated counts, e.g. 1,2,3") from None
    if not counts:
        raise argparse.ArgumentTypeError(f"{text!r}: give comma-separated counts, e.g. 1,2,3")
    return counts


def add_parser(sub: argparse._SubParsersAction) -> None:
    from openrerank.cli.options import DefaultsHelpFormatter

    p = sub.add_parser("bench", help="benchmark engines against the usual hand-written PyTorch baseline",
                       description=__doc__.split("\n\n")[0], formatter_class=DefaultsHelpFormatter)
    p.add_argument("--suite", choices=("cross-encoder", "llm", "colbert"), default="cross-encoder",
                   help="cross-encoder: MiniLM-L6 vs sentence-transformers (default); llm: Qwen3-0.6B- and "
                   "Llama-1B-shaped LLM rerankers vs their reference code (see openrerank_bench.llm); colbert: "
                   "answerai-colbert-small-shaped ColBERT, cold and warm token cache, vs the MiniLM-L6 "
                   "cross-encoder (see openrerank_bench.colbert)")
    p.add_argument("--data", help=f"BEIR folder of {DATASET} (default: ../shared/data/{DATASET})")
    p.add_argument("--run", default="runs/bm25_top100.trec.gz", help="TREC run giving each query's candidates")
    p.add_argument("--model", choices=MODELS, default="cross-encoder",
                   help="the MiniLM-L6 cross-encoder shape, or the embedded default bi-encoder")
    p.add_argument("--queries", type=at_least_one, default=None, help="use the first N queries (default: all; llm: 1)")
    p.add_argument("--passages", type=at_least_one, default=None, help="passages per request (default 100; llm: 32)")
    p.add_argument("--backends", default=None, help="comma-separated BACKEND:DTYPE list (default: "
                   f"{','.join(DEFAULT_CONFIGS)}; llm: torch:fp32,torch:bf16)")
    p.add_argument("--lanes", default=None, help="comma-separated lane counts (e.g. 1,2): each OpenVINO and ONNX "
                   f"Runtime engine once per count, side by side; PyTorch, without lanes, once ({LANES_ENV}; "
                   "default: the runtimes' own, docs/engine.md)")
    p.add_argument("--tasks", default="rerank,embed", help="what to measure: rerank, embed, or both")
    p.add_argument("--embed-backends", default=None,
                   help=f"BACKEND:DTYPE list for the embeddings row (default: {','.join(DEFAULT_EMBED_CONFIGS)}, "
                   "less what this CPU refuses)")
    p.add_argument("--embed-texts", type=at_least_one, default=1000,
                   help="distinct DL19 passages the embeddings row embeds")
    p.add_argument("--threads", type=at_least_one, default=None, help="intra-op threads (default: cores available)")
    p.add_argument("--clients", type=at_least_one, default=16, help="concurrent HTTP clients")
    p.add_argument("--concurrent-requests", type=at_least_one, default=64,
                   help="requests sent by the concurrent clients")
    p.add_argument("--rounds", type=at_least_one, default=None,
                   help="offline rounds (interleaved; the best is kept; default 2); --scale-out: rounds of every "
                   "configuration (interleaved; medians reported; default 3)")
    p.add_argument("--no-http", action="store_true", help="offline numbers only (no server; llm: always)")
    p.add_argument("--no-quality", action="store_true", help="skip the default model's nDCG@10 per engine")
    p.add_argument("--llm-models", default="qwen3,llama", help="llm suite: which of qwen3, llama")
    p.add_argument("--model-cache", help="llm suite: where the random-weight models are built once "
                   "(default: ~/.cache/openrerank/bench-models)")
    p.add_argument("--json", help="where to write the JSON result (default: benchmarks/results/bench-<time>.json)")
    so = p.add_argument_group("--scale-out: Ray Serve replicas, each in its own CPU quota, against the direct "
                              "server (needs openrerank[ray]; root for the cgroup quotas)")
    so.add_argument("--scale-out", action="store_true", help="run the scale-out benchmark instead")
    so.add_argument("--replica-counts", type=count_list, default="1,2,3", help="replica counts to measure")
    so.add_argument("--cpu-quota", type=float, default=0.5, help="CPUs per replica and for the direct server")
    so.add_argument("--clients-per-replica", type=int, default=4, help="concurrent clients per replica (node)")
    so.add_argument("--requests-per-replica", type=int, default=16,
                    help="measured requests per replica (node), per configuration and round")
    so.add_argument("--scale-out-backend", default="onnx:int8", help="BACKEND:DTYPE of the replicas")
    so.add_argument("--scale-out-routers", default="",
                    help="comma-separated request routers (ReplicaOptions.router) to measure 2+ replicas with, "
                         "e.g. least-busy,power-of-two (default: the server's own only)")
    p.set_defaults(func=run_bench)

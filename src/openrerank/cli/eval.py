"""`openrerank eval`: argparse wiring. The main CLI calls `add_parser(subparsers)`; `run(args)` does the work."""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

from openrerank.cli.options import ENV_PREFIX, DefaultsHelpFormatter, UsageError, at_least_one, fail, parent_problem
from openrerank.eval.data import DEFAULT_SPLIT
from openrerank.eval.fusion import FUSIONS
from openrerank.eval.metrics import DEFAULT_REL_THRESHOLD
from openrerank.eval.pipeline import ALL_PIPELINES, DENSE_FROM, EvalConfig
from openrerank.eval.sparse import BM25Config, BM25ConfigError, analyzer
from openrerank.runtimes.selection import BACKEND_CHOICES, DTYPES

DESCRIPTION = """Evaluate retrieval pipelines (BM25, dense, hybrid, each optionally reranked) on BEIR-layout
datasets and print recall@5 / nDCG@10 / MRR@10 / recall@100 per pipeline, like the table in NVIDIA's reranking
documentation. Example: openrerank eval --dataset ../shared/data/scifact --plot scifact.png
(writes runs/scifact.png)"""

#: The variable `serve --api-key` is also read from, and eval's --api-key defaults to.
API_KEY_ENV = ENV_PREFIX + "API_KEY"
PROG = "openrerank eval"

#: Where --json/--csv/--plot files go unless given with a directory (git-ignored in the repository).
DEFAULT_OUT_DIR = Path("runs")


#: How a flag says "off" for BM25's stemmer and stopwords (BM25Config's None).
_OFF = ("", "none", "off")
#: --rerank-path's words -> EvalConfig.bi_encoder_via_embeddings: `auto` embeds each passage once (a bi-encoder
#: reranker), `score` scores each query+passage pair.
_RERANK_PATHS = {"auto": True, "score": False}


def _flag_word(value: str | None) -> str:
    """A BM25Config text setting as its flag writes it (None: `none`)."""
    return "none" if value is None else value


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The eval flags of the `openrerank eval` subcommand; their defaults are `EvalConfig`'s and `BM25Config`'s."""
    config, bm25 = EvalConfig(), BM25Config()
    data = p.add_argument_group("data")
    data.add_argument("--dataset", action="append", required=True, metavar="DIR",
                      help="BEIR folder (corpus.jsonl[.gz], queries.jsonl, qrels/<split>.tsv); repeat for several "
                           "datasets and an average column")
    data.add_argument("--split", action="append", metavar="NAME",
                      help=f"qrels split (default {DEFAULT_SPLIT}); once for all datasets or once per --dataset")
    data.add_argument("--rel-threshold", action="append", type=int, metavar="N",
                      help=f"grade counted as relevant by recall and MRR (default {DEFAULT_REL_THRESHOLD}; TREC DL "
                           "uses 2); nDCG uses the grades. Once for all datasets or once per --dataset")
    data.add_argument("--runs", nargs="+", action="extend", default=[], metavar="FILE",
                      help="existing TREC run files to score and rerank (a file inside a dataset folder belongs to "
                           "that dataset; otherwise give exactly one --dataset)")
    data.add_argument("--limit-queries", type=at_least_one, metavar="N",
                      help="evaluate only the first N queries (quick runs)")

    pipe = p.add_argument_group("pipelines")
    pipe.add_argument("--pipelines", default=",".join(config.pipelines),
                      help=f"comma-separated rows (`all` = {','.join(ALL_PIPELINES)})")
    pipe.add_argument("--top-k", type=at_least_one, default=config.top_k,
                      help="candidates per query from each first stage (below 100, recall@100 is shown as "
                           "recall@TOP_K: the recall of every candidate there is)")
    pipe.add_argument("--k1", type=float, default=bm25.k1, help="BM25 k1 (the value Anserini uses)")
    pipe.add_argument("--b", type=float, default=bm25.b, help="BM25 b (the value Anserini uses)")
    pipe.add_argument("--stemmer", default=_flag_word(bm25.stemmer),
                      help="PyStemmer algorithm for BM25 (porter = Lucene's EnglishAnalyzer; `none` to disable)")
    pipe.add_argument("--stopwords", default=_flag_word(bm25.stopwords),
                      help="bm25s stopword list (`en` = Lucene's; `none` to disable)")
    pipe.add_argument("--dense-model", default=config.dense_model, metavar="SOURCE",
                      help="in-process bi-encoder for the dense stage (default: the packaged all-MiniLM-L6-v2)")
    pipe.add_argument("--dense-from", choices=DENSE_FROM, default=config.dense_from,
                      help="with --server: auto = the server's /v1/embeddings when it serves an embedding model, "
                           "else --dense-model in-process; server = the server's or fail; local = --dense-model")
    pipe.add_argument("--dense-server-model", metavar="NAME",
                      help="with --server: the served embedding model for the dense stage (default: the first)")
    pipe.add_argument("--fusion", choices=FUSIONS, default=config.fusion,
                      help="hybrid fusion: reciprocal rank fusion or min-max normalized weighted sum (ranx)")
    pipe.add_argument("--rrf-k", type=at_least_one, default=config.rrf_k, help="RRF constant")
    pipe.add_argument("--dense-weight", type=float, default=config.dense_weight, help="wsum weight of the dense scores")

    rr = p.add_argument_group("reranking")
    who = rr.add_mutually_exclusive_group()
    who.add_argument("--rerank-model", default=config.rerank_model, metavar="SOURCE",
                     help="in-process reranker: `default`, a local directory or a hub id, e.g. "
                          "cross-encoder/ms-marco-MiniLM-L-6-v2 (default: default, the embedded all-MiniLM-L6-v2)")
    who.add_argument("--server", metavar="URL",
                     help="rerank through a running server's NIM /v1/ranking instead, and embed the dense stage "
                          "with its /v1/embeddings when it serves an embedding model (see --dense-from)")
    rr.add_argument("--server-model", metavar="NAME", help="`model` field sent to the server")
    rr.add_argument("--concurrency", type=at_least_one, default=config.concurrency,
                    help="requests in flight with --server")
    rr.add_argument("--api-key", metavar="KEY",
                    help=f"with --server: the key a server started with --api-key requires, sent as "
                         f"'Authorization: Bearer KEY' (default: ${API_KEY_ENV}, the variable `serve` reads)")
    rr.add_argument("--rerank-path", choices=tuple(_RERANK_PATHS),
                    default=next(w for w, v in _RERANK_PATHS.items() if v == config.bi_encoder_via_embeddings),
                    help="auto: a bi-encoder reranker scores from passage embeddings computed once per passage "
                         "(same numbers as the served model); score: call the served model's scorer per "
                         "query+passage pair")

    rt = p.add_argument_group("runtime")
    rt.add_argument("--backend", default=config.backend, choices=BACKEND_CHOICES,
                    help="runtime of the in-process models: auto (what `serve` picks: the fastest faithful runtime "
                         "timed here, docs/engine.md), openvino, onnx or torch; the JSON output's `engines` says what "
                         "ran")
    rt.add_argument("--dtype", default=config.dtype, choices=DTYPES,
                    help="precision of the in-process models; fp32 (exact) keeps tables comparable, auto is what "
                         "`serve` picks")
    rt.add_argument("--cache-dir", type=Path, metavar="DIR",
                    help="corpus-embedding cache (default $OPENRERANK_EVAL_CACHE or ~/.cache/openrerank/eval)")
    rt.add_argument("--no-cache", action="store_true", help="neither read nor write the embedding cache")
    rt.add_argument("--quiet", action="store_true", help="no progress bars")

    out = p.add_argument_group("output", "a bare file name goes into --out-dir; a path with a folder is used as is")
    out.add_argument("--out-dir", type=Path, default=DEFAULT_OUT_DIR, metavar="DIR",
                     help="folder for output files (default: runs/, created when needed)")
    out.add_argument("--json", type=Path, metavar="OUT", help="write the table as JSON")
    out.add_argument("--csv", type=Path, metavar="OUT", help="write the table as CSV")
    out.add_argument("--plot", type=Path, metavar="OUT.png", help="write a bar chart of the table")


def output_path(name: Path, out_dir: Path) -> Path:
    """A bare file name lands in `out_dir`; anything with a folder part (or absolute) is kept."""
    if name.is_absolute() or name.parent != Path("."):
        return name
    return out_dir / name


def output_problem(path: Path) -> str | None:
    """Why the output file `path` cannot be written, found before the evaluation (which can run for many minutes)
    rather than after it, with the table lost. A path that exists (a file, a pipe: `--json >(jq .)`, /dev/fd/1)
    needs only to be writable itself; for a new file its folder is made now and a scratch file written and removed
    there: a permission check alone passes for root where writing fails (/proc)."""
    if problem := parent_problem(path):
        return problem
    if path.is_dir():
        return "is a directory"
    if path.exists():  # not opened here: opening a pipe and closing it would end the reader's input
        return None if os.access(path, os.W_OK) else "cannot be written"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path.parent):
            pass
    except OSError as exc:
        return f"cannot write into {path.parent}: {exc.strerror or exc}"
    return None


def check_extras(plot: bool) -> None:
    """One line naming the install command when the eval extra is missing (instead of a traceback later)."""
    from openrerank.extras import require

    for module in ("bm25s", "Stemmer", "ranx", *(("matplotlib",) if plot else ())):
        require(module, "eval", "openrerank eval")


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register `eval` on the main CLI's subparsers."""
    p = subparsers.add_parser("eval", help="evaluate retrieval + reranking pipelines on BEIR datasets",
                              description=DESCRIPTION, formatter_class=DefaultsHelpFormatter)
    add_arguments(p)
    p.set_defaults(func=run)
    return p


def _per_dataset(values: list | None, n: int, default, flag: str) -> list:
    if not values:
        return [default] * n
    if len(values) == 1:
        return values * n
    if len(values) != n:
        raise UsageError(f"give {flag} once or once per --dataset ({n} times)")
    return list(values)


def _assign_runs(datasets: list[Path], runs: list[str]) -> list[list[Path]]:
    out: list[list[Path]] = [[] for _ in datasets]
    roots = [d.resolve() for d in datasets]
    for r in runs:
        path = Path(r).expanduser()
        if not path.is_file():
            raise UsageError(f"--runs {r}: no such file")
        owners = [i for i, root in enumerate(roots) if root in path.resolve().parents]
        if not owners and len(datasets) == 1:
            owners = [0]
        if not owners:
            raise UsageError(f"--runs {r} is outside every --dataset folder; "
                             "with several datasets a run file must live in its dataset's folder")
        out[owners[0]].append(path)
    return out


def run(args: argparse.Namespace) -> int:
    """Load the datasets, evaluate every pipeline, print and write the table. Returns the exit code."""
    from openrerank.client import RerankError
    from openrerank.eval.data import DatasetError, dataset_labels, load_dataset
    from openrerank.eval.dense import default_cache_dir
    from openrerank.eval.pipeline import PipelineError, evaluate_datasets, parse_pipelines
    from openrerank.eval.progress import Reporter
    from openrerank.eval.report import print_tables, write_csv, write_json, write_plot
    from openrerank.extras import MissingExtraError

    try:
        check_extras(bool(args.plot))
    except MissingExtraError as exc:
        print(f"openrerank eval: error: {exc}", file=sys.stderr)
        return 2
    silence_library_warnings()
    reporter = Reporter(quiet=args.quiet)
    try:
        pipelines = parse_pipelines(args.pipelines)
    except PipelineError as exc:
        print(f"openrerank eval: {exc}", file=sys.stderr)
        return 2
    dirs = [Path(d).expanduser() for d in args.dataset]
    try:
        splits = _per_dataset(args.split, len(dirs), DEFAULT_SPLIT, "--split")
        thresholds = _per_dataset(args.rel_threshold, len(dirs), DEFAULT_REL_THRESHOLD, "--rel-threshold")
        run_files = _assign_runs(dirs, args.runs)
    except UsageError as exc:
        return fail(PROG, str(exc))
    outputs = {flag: output_path(name, args.out_dir)
               for flag, name in (("--json", args.json), ("--csv", args.csv), ("--plot", args.plot)) if name}
    for flag, path in outputs.items():
        if problem := output_problem(path):
            return fail(PROG, f"{flag} {path}: {problem}")
    config = EvalConfig(
        pipelines=pipelines,
        top_k=args.top_k,
        bm25=BM25Config(k1=args.k1, b=args.b,
                        stemmer=None if args.stemmer.lower() in _OFF else args.stemmer,
                        stopwords=None if args.stopwords.lower() in _OFF else args.stopwords),
        dense_model=args.dense_model,
        rerank_model=None if args.server else args.rerank_model,
        server=args.server,
        server_model=args.server_model,
        concurrency=args.concurrency,
        backend=args.backend,
        dtype=args.dtype,
        fusion=args.fusion,
        rrf_k=args.rrf_k,
        dense_weight=args.dense_weight,
        cache_dir=None if args.no_cache else (args.cache_dir or default_cache_dir()),
        bi_encoder_via_embeddings=_RERANK_PATHS[args.rerank_path],
        dense_from=args.dense_from,
        dense_server_model=args.dense_server_model,
        api_key=args.api_key or os.environ.get(API_KEY_ENV) or None,
    )
    try:
        analyzer(config.bm25)  # an unknown stemmer or stopword list, before the data is loaded
    except BM25ConfigError as exc:
        return fail(PROG, f"--{exc.setting} {exc}")
    datasets = []
    start = time.perf_counter()
    try:
        for d, split in zip(dirs, splits, strict=True):
            with reporter.step(f"load {d.name} ({split})", None):
                datasets.append(load_dataset(d, split, limit_queries=args.limit_queries))
        labels = dataset_labels(dirs)  # two folders named alike get the folders above them in the tables
        for ds in datasets:
            ds.label = labels[ds.path.resolve()]
        results = evaluate_datasets(datasets, config, rel_thresholds=thresholds, run_files=run_files,
                                    reporter=reporter)
    except (DatasetError, PipelineError) as exc:
        print(f"openrerank eval: {exc}", file=sys.stderr)
        return 2
    except RerankError as exc:  # the server refused, failed or could not be reached (retries spent)
        print(f"openrerank eval: error: --server {args.server}: {exc}", file=sys.stderr)
        return 2
    print_tables(results)
    reporter.note(f"total {time.perf_counter() - start:.1f}s")
    cfg = {k: (str(v) if isinstance(v, Path) else v) for k, v in dataclasses.asdict(config).items()
           if k != "api_key"}  # a secret: never in the JSON
    writers = {"--json": lambda p: write_json(results, p, cfg), "--csv": lambda p: write_csv(results, p),
               "--plot": lambda p: write_plot(results, p, reranker=reranker_label(args))}
    status = 0
    for flag, path in outputs.items():
        try:
            writers[flag](path)
        except OSError as exc:  # checked up front; a disk that filled since, a folder removed: the others still go
            status = fail(PROG, f"{flag} {path}: {exc.strerror or exc}")
            continue
        reporter.note(f"wrote {path}")
    return status


def reranker_label(args: argparse.Namespace) -> str:
    """Who reranked, for the plot's title."""
    if args.server:
        return f"{args.server_model or 'first model'} at {args.server}"
    from openrerank.sources.source import parse_model_arg

    return parse_model_arg(args.rerank_model).served_id


def silence_library_warnings() -> None:
    """ranx (through numba) and its dependencies warn about casts and deprecations a user cannot act on."""
    warnings.filterwarnings("ignore", module="numba")
    warnings.filterwarnings("ignore", module="ranx")
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    try:
        from numba.core.errors import NumbaWarning
    except ImportError:
        return
    warnings.filterwarnings("ignore", category=NumbaWarning)

"""Run the evaluation table: first stages (sparse, dense, hybrid, TREC run files), optional reranking, metrics.

Each first stage is computed once per dataset and shared by the rows that use it; every row's `seconds`
lists the stages it depends on (shared stages appear in several rows) so a row shows what that pipeline
costs on its own.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from openrerank.engine.loading import LoadOptions, load_model
from openrerank.eval.data import Dataset, Run, read_trec_run, run_file_names
from openrerank.eval.dense import (
    EmbeddingCache,
    LocalEncoder,
    ServerEncoder,
    find_server_embedder,
    model_fingerprint,
    search,
)
from openrerank.eval.fusion import fuse
from openrerank.eval.metrics import DEFAULT_METRICS, DEFAULT_REL_THRESHOLD, drop_self_hits, evaluate, measured, top_k
from openrerank.eval.progress import Reporter, Stopwatch
from openrerank.eval.rerank import InProcessReranker, Reranker, RerankJob
from openrerank.eval.sparse import BM25Config, BM25Index
from openrerank.sources.source import DEFAULT_SOURCE

FIRST_STAGES = ("sparse", "dense", "hybrid")
ALL_PIPELINES = ("sparse", "dense", "hybrid", "sparse+rerank", "dense+rerank", "hybrid+rerank")
#: Where the dense stage's embeddings come from with --server: the server when it serves an embedding model
#: (auto), always the server (server), or always the in-process --dense-model (local).
DENSE_FROM = ("auto", "server", "local")


class PipelineError(ValueError):
    """A pipeline list or option combination that cannot run."""


def parse_pipelines(spec: str | list[str]) -> list[str]:
    """`sparse,dense+rerank,...` -> validated list; `all` = the six standard rows."""
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    out: list[str] = []
    for raw in items:
        name = raw.strip().lower().replace(" ", "")
        if not name:
            continue
        if name == "all":
            out.extend(p for p in ALL_PIPELINES if p not in out)
            continue
        first, _, rest = name.partition("+")
        if first not in FIRST_STAGES or rest not in ("", "rerank"):
            raise PipelineError(f"unknown pipeline {raw!r}; use {', '.join(ALL_PIPELINES)}")
        if name not in out:
            out.append(name)
    if not out:
        raise PipelineError("no pipeline given")
    return out


@dataclass
class EvalConfig:
    """One evaluation's settings. Their defaults are `openrerank eval`'s: the CLI reads them from here
    (`BM25Config` for the BM25 ones), and nothing below restates them."""

    pipelines: list[str] = field(default_factory=lambda: list(ALL_PIPELINES))
    top_k: int = 100
    metrics: tuple[str, ...] = DEFAULT_METRICS
    bm25: BM25Config = field(default_factory=BM25Config)
    dense_model: str = DEFAULT_SOURCE  # the embedded all-MiniLM-L6-v2
    rerank_model: str | None = DEFAULT_SOURCE  # None when reranking through a server
    server: str | None = None
    server_model: str | None = None
    concurrency: int = 8
    backend: str = LoadOptions.backend  # the in-process models' runtime (the --backend flag), as `serve`'s
    dtype: str = "fp32"  # exact: tables stay comparable across machines (`serve` picks auto)
    fusion: str = "rrf"  # one of FUSIONS
    rrf_k: int = 60
    dense_weight: float = 0.5
    cache_dir: Path | None = None
    bi_encoder_via_embeddings: bool = True
    dense_from: str = "auto"  # see DENSE_FROM
    dense_server_model: str | None = None  # the server's embedding model (default: its first one)
    api_key: str | None = field(default=None, repr=False)  # with --server: sent as Authorization: Bearer


@dataclass
class Row:
    pipeline: str
    metrics: dict[str, float]
    seconds: dict[str, float]

    def as_dict(self) -> dict:
        return {"pipeline": self.pipeline, "metrics": self.metrics, "seconds": self.seconds}


@dataclass
class DatasetResult:
    dataset: str
    split: str
    rel_threshold: int
    queries: int
    docs: int
    rows: list[Row]
    stages: dict[str, float]  # wall seconds actually spent per stage (shared stages once)
    notes: list[str] = field(default_factory=list)
    engines: dict[str, dict] = field(default_factory=dict)  # in-process model source -> what ran it

    def as_dict(self) -> dict:
        return {
            "dataset": self.dataset,
            "split": self.split,
            "rel_threshold": self.rel_threshold,
            "queries": self.queries,
            "docs": self.docs,
            "rows": [r.as_dict() for r in self.rows],
            "stages": self.stages,
            "notes": self.notes,
            "engines": self.engines,
        }


class Models:
    """Loads the dense model and the in-process reranker once for all datasets; shares them when equal."""

    def __init__(self, config: EvalConfig, reporter: Reporter) -> None:
        self.config = config
        self.reporter = reporter
        self._loaded: dict[str, object] = {}
        self._fingerprints: dict[str, str] = {}
        self._dense: LocalEncoder | ServerEncoder | None = None
        self.dense_note: str | None = None  # why the dense stage runs where it does, when that needs saying

    def get(self, source: str, flag: str = "--rerank-model"):
        """The model `flag` names, loaded once; a model that cannot load is one PipelineError naming `flag`
        (RuntimeError/ValueError/OSError: the loaders' source, format, engine and file errors)."""
        if source not in self._loaded:
            with self.reporter.step(f"load model {source}", None):
                try:
                    self._loaded[source] = load_model(
                        source, LoadOptions(backend=self.config.backend, dtype=self.config.dtype))
                except (RuntimeError, ValueError, OSError) as exc:
                    text = re.sub(r"--model(?![-\w])", flag, str(exc))  # the loaders speak serve's flag
                    raise PipelineError(text if text.startswith(flag) else f"{flag} {source}: {text}") from exc
        return self._loaded[source]

    def engines(self) -> dict[str, dict]:
        """What actually ran each in-process model (not the `auto` that was asked for)."""
        out = {}
        for source, model in self._loaded.items():
            engine = model.runtime_choice.as_metadata() if model.runtime_choice is not None else {}
            out[source] = {**engine, "runtime": model.scorer.description}
        return out

    def fingerprint(self, source: str) -> str:
        if source not in self._fingerprints:
            model = self.get(source)
            runtime = getattr(model.scorer, "runtime", None)
            backend = getattr(runtime, "description", None) or f"{self.config.backend}-{self.config.dtype}"
            self._fingerprints[source] = model_fingerprint(
                model.spec.path, backend=backend, dtype=self.config.dtype, max_length=model.max_length)
        return self._fingerprints[source]

    def dense(self) -> LocalEncoder | ServerEncoder:
        """The dense stage's encoder: the server's embedding model with --server (unless --dense-from local),
        else the in-process --dense-model."""
        if self._dense is None:
            c = self.config
            if c.server and c.dense_from != "local":
                from openrerank.client import RerankError

                with self.reporter.step(f"ask {c.server} for an embedding model", None):
                    try:
                        found = find_server_embedder(c.server, c.dense_server_model, api_key=c.api_key)
                    except RerankError:
                        raise  # the server refused or could not be reached: one line with its message (cli/eval)
                    except Exception as exc:
                        raise PipelineError(f"cannot ask {c.server} for its models: {exc}") from exc
                if found is not None:
                    model, meta, max_inputs = found
                    self._dense = ServerEncoder(c.server, model, meta, concurrency=c.concurrency,
                                                max_inputs=max_inputs, api_key=c.api_key)
                    return self._dense
                which = f"embedding model '{c.dense_server_model}'" if c.dense_server_model else "embedding model"
                if c.dense_from == "server" or c.dense_server_model:
                    raise PipelineError(f"{c.server} serves no {which} (GET /v1/models lists each model's tasks)")
                self.dense_note = f"dense: {c.server} serves no embedding model; embedded in-process instead"
            source = c.dense_model
            self._dense = LocalEncoder(self.get(source, "--dense-model"), self.fingerprint(source), source)
        return self._dense

    def close(self) -> None:
        for model in self._loaded.values():
            model.close()


class DatasetRunner:
    """Everything for one dataset: first-stage runs (computed once), rerank rows, scores."""

    def __init__(self, ds: Dataset, config: EvalConfig, models: Models, reranker: Reranker | None,
                 reporter: Reporter, rel_threshold: int = DEFAULT_REL_THRESHOLD,
                 run_files: list[Path] | None = None) -> None:
        self.ds = ds
        self.config = config
        self.models = models
        self.reranker = reranker
        self.reporter = reporter
        self.rel_threshold = rel_threshold
        self.metrics = measured(config.metrics, config.top_k)  # every run is cut to top_k
        unique = {p.resolve(): p for p in run_files or []}  # a file given twice is one row
        self.run_files = list(unique.values())
        self._run_names = run_file_names(list(unique))
        self.watch = Stopwatch()
        self.notes: list[str] = []
        self._runs: dict[str, Run] = {}
        self._deps: dict[str, list[str]] = {}
        self._doc_emb: np.ndarray | None = None
        self.rerank_shares_encode = False  # reranker reuses the dense corpus embeddings

    # -- first stages -------------------------------------------------------------------------

    def _sparse(self) -> Run:
        if "sparse" not in self._runs:
            ds = self.ds
            with self.reporter.step(f"{ds.name}: BM25 index ({len(ds.corpus):,} docs)", None), \
                    self.watch.time("sparse.index"):
                index = BM25Index(ds.doc_ids, [d.passage() for d in ds.corpus.values()], self.config.bm25)
            with self.reporter.step(f"{ds.name}: BM25 retrieve", None), self.watch.time("sparse.retrieve"):
                run = index.search(list(ds.queries), list(ds.queries.values()), self.config.top_k + 1)
            self._runs["sparse"] = top_k(drop_self_hits(run), self.config.top_k)
            self._deps["sparse"] = ["sparse.index", "sparse.retrieve"]
            self.notes.append(f"sparse: {self.config.bm25.describe()}")
        return self._runs["sparse"]

    def doc_embeddings(self) -> np.ndarray:
        """Corpus embeddings of the dense model, from the cache or encoded (and cached) now."""
        if self._doc_emb is None:
            ds, dense = self.ds, self.models.dense()
            key = dense.key
            cache = EmbeddingCache(self.config.cache_dir)
            with self.watch.time("dense.encode"):
                emb = cache.load(ds.name, ds.corpus_hash(), key, ds.doc_ids)
                if emb is None:
                    texts = [d.passage() for d in ds.corpus.values()]
                    with self.reporter.step(f"{ds.name}: encode corpus", len(texts)) as advance:
                        emb = dense.encode(texts, "passage", advance)
                    cache.save(ds.name, ds.corpus_hash(), key, ds.doc_ids, emb)
                    self.notes.append(f"dense: encoded {len(texts):,} docs (cache key {key})")
                else:
                    self.notes.append(f"dense: corpus embeddings from cache (key {key})")
            self._doc_emb = emb
        return self._doc_emb

    def _dense(self) -> Run:
        if "dense" not in self._runs:
            ds = self.ds
            emb = self.doc_embeddings()
            dense = self.models.dense()
            with self.watch.time("dense.retrieve"):
                with self.reporter.step(f"{ds.name}: encode queries", len(ds.queries)) as advance:
                    q_emb = dense.encode(list(ds.queries.values()), "query", advance)
                run = search(ds.doc_ids, emb, list(ds.queries), q_emb, self.config.top_k + 1)
            self._runs["dense"] = top_k(drop_self_hits(run), self.config.top_k)
            self._deps["dense"] = ["dense.encode", "dense.retrieve"]
            if self.models.dense_note:
                self.notes.append(self.models.dense_note)
            self.notes.append(f"dense: {dense.name}, exact inner product of normalized embeddings")
        return self._runs["dense"]

    def _hybrid(self) -> Run:
        if "hybrid" not in self._runs:
            sparse, dense = self._sparse(), self._dense()
            c = self.config
            with self.watch.time("hybrid.fuse"):
                self._runs["hybrid"] = fuse(sparse, dense, method=c.fusion, k=c.top_k, rrf_k=c.rrf_k,
                                            dense_weight=c.dense_weight)
            self._deps["hybrid"] = self._deps["sparse"] + self._deps["dense"] + ["hybrid.fuse"]
            how = f"rrf k={c.rrf_k}" if c.fusion == "rrf" else f"min-max wsum dense weight {c.dense_weight}"
            self.notes.append(f"hybrid: ranx fusion of sparse and dense top-{c.top_k}, {how}")
        return self._runs["hybrid"]

    def _run_file(self, path: Path) -> tuple[str, Run]:
        name = "run:" + self._run_names[path.resolve()]
        if name not in self._runs:
            with self.watch.time(f"{name}.read"):
                run = {q: docs for q, docs in read_trec_run(path).items() if q in self.ds.queries}
                missing = sum(1 for docs in run.values() for d in docs if d not in self.ds.corpus)
            if missing:
                self.notes.append(f"{name}: {missing} candidates absent from the corpus (cannot be reranked)")
            self._runs[name] = top_k(drop_self_hits(run), self.config.top_k)
            self._deps[name] = [f"{name}.read"]
        return name, self._runs[name]

    def first_stage(self, name: str) -> Run:
        return {"sparse": self._sparse, "dense": self._dense, "hybrid": self._hybrid}[name]()

    # -- rows ---------------------------------------------------------------------------------

    def _rerank(self, name: str, run: Run) -> Run:
        key = f"{name}+rerank"
        if self.reranker is None:
            raise PipelineError(f"{key}: no reranker configured")
        ds = self.ds
        jobs = []
        for qid, docs in run.items():
            ids = [d for d in docs if d in ds.corpus]
            if ids:
                images = [ds.corpus[d].image_url() for d in ids]
                jobs.append(RerankJob(qid, ds.queries[qid], ids, [ds.corpus[d].passage() for d in ids],
                                      images if any(i is not None for i in images) else None))
        before = self.reranker.pairs_scored
        with self.reporter.step(f"{ds.name}: rerank {name} ({self.reranker.name})", len(jobs)) as advance, \
                self.watch.time(f"{key}.rerank"):
            out = self.reranker.rerank(jobs, advance)
        fresh = self.reranker.pairs_scored - before
        total = sum(len(j.doc_ids) for j in jobs)
        self.notes.append(f"{key}: {total:,} pairs, {fresh:,} newly scored (others memoized from earlier rows)")
        shared = ["dense.encode"] if self.rerank_shares_encode and "dense.encode" not in self._deps[name] else []
        self._deps[key] = [*self._deps[name], *shared, f"{key}.rerank"]
        return out

    def _score(self, pipeline: str, run: Run) -> Row:
        with self.watch.time(f"{pipeline}.score"):
            metrics = evaluate(self.ds.qrels, run, self.metrics, rel_threshold=self.rel_threshold)
        deps = [*self._deps[pipeline], f"{pipeline}.score"]
        seconds = {stage: round(self.watch.seconds.get(stage, 0.0), 3) for stage in deps}
        seconds["total"] = round(sum(seconds.values()), 3)
        return Row(pipeline, metrics, seconds)

    def run(self) -> DatasetResult:
        rows: list[Row] = []
        names = list(self.config.pipelines)
        wants_rerank = any(p.endswith("+rerank") for p in names)
        stages: list[tuple[str, Run]] = []
        for p in names:
            first = p.split("+")[0]
            run = self.first_stage(first)
            if p.endswith("+rerank"):
                run = self._rerank(first, run)
            stages.append((p, run))
        for path in self.run_files:
            name, run = self._run_file(path)
            stages.append((name, run))
            if wants_rerank:
                stages.append((f"{name}+rerank", self._rerank(name, run)))
        if renamed := [m for m in self.config.metrics if m not in self.metrics]:
            shown = [m for m in self.metrics if m not in self.config.metrics]
            self.notes.append(f"{', '.join(renamed)} shown as {', '.join(shown)}: every run holds at most top-k "
                              f"{self.config.top_k} candidates")
        with self.reporter.step(f"{self.ds.name}: score", len(stages)) as advance:
            for p, run in stages:
                rows.append(self._score(p, run))
                advance(1)
        stage_seconds = {k: round(v, 3) for k, v in self.watch.seconds.items()}
        return DatasetResult(self.ds.label or self.ds.name, self.ds.split, self.rel_threshold, len(self.ds.queries),
                             len(self.ds.corpus), rows, stage_seconds, self.notes)


def make_reranker(config: EvalConfig, models: Models) -> Reranker | None:
    """The server client when --server is given, else the in-process model (None if no row reranks)."""
    from openrerank.eval.rerank import ServerReranker

    if config.server:
        return ServerReranker(config.server, model=config.server_model, concurrency=config.concurrency,
                              api_key=config.api_key)
    if not config.rerank_model:
        return None
    model = models.get(config.rerank_model)
    return InProcessReranker(model, name=config.rerank_model,
                             bi_encoder_via_embeddings=config.bi_encoder_via_embeddings)


def evaluate_datasets(datasets: list[Dataset], config: EvalConfig, *, rel_thresholds: list[int],
                      run_files: list[list[Path]] | None = None, reporter: Reporter | None = None
                      ) -> list[DatasetResult]:
    """The whole table: every pipeline on every dataset."""
    reporter = reporter or Reporter()
    hybrid = any(p.startswith("hybrid") for p in config.pipelines)
    with reporter.step("ranx: compile its metrics" + (" and fusion" if hybrid else "") + " (once per process)",
                       None):
        warm_up_ranx(config, hybrid)
    models = Models(config, reporter)
    wants_rerank = any(p.endswith("+rerank") for p in config.pipelines)
    reranker = make_reranker(config, models) if wants_rerank else None
    results = []
    try:
        for i, ds in enumerate(datasets):
            start = time.perf_counter()
            runner = DatasetRunner(ds, config, models, reranker, reporter, rel_thresholds[i],
                                   (run_files or [[]] * len(datasets))[i])
            if reranker is not None:
                reranker.reset()  # memo keys are (query id, doc id): never carry them across datasets
            if isinstance(reranker, InProcessReranker) and reranker.via_embeddings:
                _share_doc_embeddings(runner, reranker, config)
            results.append(runner.run())
            results[-1].engines = models.engines()
            reporter.note(f"[dim]{ds.name}: done in {time.perf_counter() - start:.1f}s[/dim]")
    finally:
        if reranker is not None:
            reranker.close()
        models.close()
    return results


def warm_up_ranx(config: EvalConfig, hybrid: bool) -> None:
    """ranx compiles its metrics (and fusion) with numba on first use in a process: 7-11 s even with numba's
    cache warm, minutes on a cold one. Done up front, in a step of its own, so the first dataset's `sparse.score`
    and `hybrid.fuse` seconds are its own work (they read 89 s and 124 s for milliseconds of it), and a log shows
    what the silence is."""
    evaluate({"q": {"a": 2, "b": 1}}, {"q": {"a": 1.0, "b": 0.5, "c": 0.2}}, config.metrics, rel_threshold=2)
    if hybrid:
        fuse({"q": {"a": 1.0, "b": 0.5}}, {"q": {"a": 0.3, "c": 0.1}}, method=config.fusion, k=2,
             rrf_k=config.rrf_k, dense_weight=config.dense_weight)


def _share_doc_embeddings(runner: DatasetRunner, reranker: InProcessReranker, config: EvalConfig) -> None:
    """When the reranker is the dense model itself, reuse the dense stage's corpus embeddings.

    Embeddings are keyed by doc id, so they are reset per dataset; they are only shared when the two model
    sources are the same (the fingerprint includes every file of the model and the runtime), and only when a
    dense or hybrid row embeds the corpus anyway: for sparse-only or run-file rows (or `--limit-queries`) the
    reranker embeds just the candidates it is given, not the whole corpus.
    """
    reranker.doc_embeddings = {}
    if not any(p.split("+")[0] in ("dense", "hybrid") for p in config.pipelines):
        return
    dense = runner.models.dense()
    # Shared only when the dense stage is that same model in-process and embeds documents without a prompt
    # (the reranker's bi-encoder path embeds the bare passage).
    if config.rerank_model != config.dense_model or not isinstance(dense, LocalEncoder) \
            or dense.key != runner.models.fingerprint(config.dense_model):
        return
    emb = runner.doc_embeddings()
    reranker.doc_embeddings = dict(zip(runner.ds.doc_ids, emb, strict=True))
    runner.rerank_shares_encode = True
    runner.notes.append("rerank: the reranker is the dense bi-encoder; its scores are cosines of the same cached "
                        "corpus embeddings, so +rerank rows count dense.encode in their seconds")

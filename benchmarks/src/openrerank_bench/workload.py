"""The benchmark workload (TREC DL19 queries with their BM25 top-100, real MS MARCO text) and its models."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

DATASET = "msmarco-trec-dl19-pooled"


class WorkloadError(ValueError):
    """A workload that cannot be built from the flags given (no run file, no candidates): one line, exit 2."""


@dataclass
class Workload:
    queries: list[str]
    passages: list[list[str]]
    query_ids: list[str] = field(default_factory=list)
    doc_ids: list[list[str]] = field(default_factory=list)
    qrels: dict[str, dict[str, int]] = field(default_factory=dict)

    @property
    def pairs(self) -> int:
        return sum(len(p) for p in self.passages)


def default_data_dir() -> Path:
    """`shared/data/<dl19>` beside the current directory (a checkout run from its root) or inside it."""
    candidates = [Path.cwd().parent, Path.cwd()]
    for base in candidates:
        path = base / "shared" / "data" / DATASET
        if path.is_dir():
            return path
    return candidates[0] / "shared" / "data" / DATASET


def load_workload(data: Path, run_file: str, queries: int | None, passages: int) -> Workload:
    from openrerank.eval.data import load_dataset, read_trec_run
    from openrerank.eval.metrics import ranked

    if not (data / run_file).is_file():  # found before the dataset is read, not as a FileNotFoundError after it
        raise WorkloadError(f"--run {run_file}: no such file in {data}")
    ds = load_dataset(data, split="test_full", limit_queries=queries)
    run = read_trec_run(data / run_file)
    wl = Workload([], [], qrels=ds.qrels)
    for qid, text in ds.queries.items():
        docs = [d for d, _ in ranked(run.get(qid, {}))[:passages] if d in ds.corpus]
        if docs:
            wl.queries.append(text)
            wl.passages.append([ds.corpus[d].passage() for d in docs])
            wl.query_ids.append(qid)
            wl.doc_ids.append(docs)
    if not wl.queries:
        raise WorkloadError(f"--run {run_file}: no query of {data}'s split has candidates in it")
    return wl


def build_bench_cross_encoder(out: Path, seed: int = 0) -> Path:
    """BertForSequenceClassification(num_labels=1) with the packaged MiniLM-L6 encoder weights, saved like a hub model.

    The compute of ms-marco-MiniLM-L-6-v2 (its scores are not meaningful rankings, its speed is). The head is
    seeded, so the saved weights are byte-identical across runs and the converted-model caches stay valid.
    """
    import torch
    from transformers import AutoTokenizer, BertForSequenceClassification
    from transformers.utils import logging as hf_logging

    from openrerank.sources.source import default_model_dir

    src = default_model_dir()
    torch.manual_seed(seed)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the new head's "newly initialized weights" report is expected
    try:
        model = BertForSequenceClassification.from_pretrained(str(src), num_labels=1, local_files_only=True).eval()
    finally:
        hf_logging.set_verbosity(verbosity)
    model.save_pretrained(out, safe_serialization=True)
    AutoTokenizer.from_pretrained(str(src), local_files_only=True).save_pretrained(out)
    return out


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")

"""Shared fixtures: a tiny synthetic BEIR folder, and the real datasets beside the repo (skipped if absent)."""

from __future__ import annotations

import gzip
import json
import warnings
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
DATA = (REPO_ROOT / ".." / "shared" / "data").resolve()

warnings.filterwarnings("ignore", module="numba")  # ranx's unsigned->signed cast notices

CORPUS = [
    {"_id": "d1", "title": "Cats", "text": "cats purr and sleep all day"},
    {"_id": "d2", "title": "Dogs", "text": "dogs bark at the mailman"},
    {"_id": "d3", "title": "", "text": "the stock market fell sharply today"},
    {"_id": "d4", "title": "Kittens", "text": "young cats are called kittens and they purr"},
    {"_id": "q2", "title": "", "text": "a document that shares its id with query q2 about dogs barking"},
    {"_id": "d6", "title": "Weather", "text": "rain and wind expected tomorrow"},
]
QUERIES = [
    {"_id": "q1", "text": "why do cats purr"},
    {"_id": "q2", "text": "dogs barking"},
    {"_id": "q3", "text": "stock market news"},
    {"_id": "q9", "text": "a train query without test judgments"},
]
TEST_QRELS = [("q1", "d1", 2), ("q1", "d4", 1), ("q2", "d2", 1), ("q3", "d3", 1), ("q3", "d6", 0)]


def write_beir(folder: Path, *, gz: bool = True, qrels: list | None = None) -> Path:
    """Write a BEIR-layout folder: gzipped corpus, queries, qrels/test.tsv (+ a train split)."""
    folder.mkdir(parents=True, exist_ok=True)
    lines = "".join(json.dumps({**d, "metadata": {}}) + "\n" for d in CORPUS)
    if gz:
        with gzip.open(folder / "corpus.jsonl.gz", "wt", encoding="utf-8") as f:
            f.write(lines)
    else:
        (folder / "corpus.jsonl").write_text(lines, encoding="utf-8")
    (folder / "queries.jsonl").write_text("".join(json.dumps(q) + "\n" for q in QUERIES), encoding="utf-8")
    (folder / "qrels").mkdir(exist_ok=True)
    rows = qrels if qrels is not None else TEST_QRELS
    (folder / "qrels" / "test.tsv").write_text(
        "query-id\tcorpus-id\tscore\n" + "".join(f"{q}\t{d}\t{s}\n" for q, d, s in rows), encoding="utf-8")
    (folder / "qrels" / "train.tsv").write_text("query-id\tcorpus-id\tscore\nq9\td6\t1\n", encoding="utf-8")
    return folder


@pytest.fixture
def tiny_beir(tmp_path: Path) -> Path:
    return write_beir(tmp_path / "tiny")


@pytest.fixture
def make_beir():
    """The folder writer itself, for tests that need several or altered folders."""
    return write_beir


def data_dir(name: str) -> Path:
    path = DATA / name
    if not path.is_dir():
        pytest.skip(f"evaluation data {path} not present (expected ../shared/data beside the repository)")
    return path


@pytest.fixture
def shared_data():
    """`shared_data(name)` -> the dataset folder under ../shared/data, or skip the test if it is absent."""
    return data_dir

from __future__ import annotations

import gzip
from pathlib import Path

import pytest

from openrerank.eval.data import DatasetError, Doc, load_dataset, load_qrels, read_trec_run


def test_load_beir_gz_and_split(tiny_beir: Path) -> None:
    ds = load_dataset(tiny_beir, "test")
    assert ds.name == "tiny"
    assert len(ds.corpus) == 6
    assert ds.corpus["d1"] == Doc("Cats", "cats purr and sleep all day")
    # only queries with a positive judgment in the split; the train-only query is left out
    assert list(ds.queries) == ["q1", "q2", "q3"]
    assert ds.qrels["q3"] == {"d3": 1, "d6": 0}
    train = load_dataset(tiny_beir, "train")
    assert list(train.queries) == ["q9"]


def test_plain_jsonl_and_limit(tmp_path: Path, make_beir) -> None:
    folder = make_beir(tmp_path / "plain", gz=False)
    ds = load_dataset(folder, limit_queries=2)
    assert ds.corpus_file.name == "corpus.jsonl"
    assert list(ds.queries) == ["q1", "q2"]
    assert set(ds.qrels) == {"q1", "q2"}


def test_passage_text_joins_title_like_beir() -> None:
    assert Doc("Cats", "purr").passage() == "Cats purr"
    assert Doc("", "purr").passage() == "purr"


def test_corpus_hash_changes_with_content(tmp_path: Path, make_beir) -> None:
    a = load_dataset(make_beir(tmp_path / "a"))
    b_folder = make_beir(tmp_path / "b")
    with gzip.open(b_folder / "corpus.jsonl.gz", "at", encoding="utf-8") as f:
        f.write('{"_id": "d7", "title": "", "text": "new"}\n')
    assert a.corpus_hash() != load_dataset(b_folder).corpus_hash()
    assert a.corpus_hash() == load_dataset(make_beir(tmp_path / "c")).corpus_hash()


def test_missing_split_and_unknown_query(tmp_path: Path, make_beir) -> None:
    folder = make_beir(tmp_path / "x")
    with pytest.raises(DatasetError, match=r"qrels/dev\.tsv"):
        load_dataset(folder, "dev")
    bad = make_beir(tmp_path / "bad", qrels=[("nope", "d1", 1)])
    with pytest.raises(DatasetError, match="absent from queries"):
        load_dataset(bad)


def test_qrels_without_header(tmp_path: Path) -> None:
    path = tmp_path / "q.tsv"
    path.write_text("1\tA\t2\n1\tB\t0\n2\tC\t1\n", encoding="utf-8")
    assert load_qrels(path) == {"1": {"A": 2, "B": 0}, "2": {"C": 1}}


def test_a_trec_run_reads_plain_and_gzipped(tmp_path: Path) -> None:
    run = {"q1": {"d1": 3.5, "d2": 1.25}, "q2": {"d3": -0.5}}
    plain = tmp_path / "run.trec"  # query Q0 doc rank score tag, as trec_eval reads it
    plain.write_text("q1 Q0 d1 1 3.500000 bm25\nq1 Q0 d2 2 1.250000 bm25\nq2 Q0 d3 1 -0.500000 bm25\n")
    assert read_trec_run(plain) == run
    gz = tmp_path / "run.trec.gz"
    gz.write_bytes(gzip.compress(plain.read_bytes()))
    assert read_trec_run(gz) == run
    bad = tmp_path / "bad.trec"
    bad.write_text("q1 Q0 d1\n")
    with pytest.raises(DatasetError):
        read_trec_run(bad)

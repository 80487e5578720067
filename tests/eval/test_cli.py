"""End to end on a tiny synthetic BEIR folder with the real embedded model: flags, outputs, cache."""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import pytest
from tests.support import run_eval as main

from openrerank.cli.eval import add_parser
from openrerank.eval.pipeline import PipelineError, parse_pipelines


def test_parse_pipelines() -> None:
    assert parse_pipelines("all") == ["sparse", "dense", "hybrid", "sparse+rerank", "dense+rerank", "hybrid+rerank"]
    assert parse_pipelines("Sparse, dense+rerank,sparse") == ["sparse", "dense+rerank"]
    with pytest.raises(PipelineError):
        parse_pipelines("sparse+magic")


def test_add_parser_registers_eval_subcommand() -> None:
    parser = argparse.ArgumentParser(prog="openrerank")
    sub = parser.add_subparsers(dest="command")
    add_parser(sub)
    args = parser.parse_args(["eval", "--dataset", "x", "--dataset", "y", "--server", "http://h:1",
                              "--runs", "a.trec", "b.trec", "--limit-queries", "3", "--backend", "onnx",
                              "--dtype", "int8", "--rel-threshold", "2"])
    assert args.dataset == ["x", "y"] and args.server == "http://h:1" and args.runs == ["a.trec", "b.trec"]
    assert args.limit_queries == 3 and args.backend == "onnx" and args.dtype == "int8"
    assert args.rel_threshold == [2] and args.top_k == 100 and callable(args.func)
    with pytest.raises(SystemExit):  # --rerank-model and --server exclude each other
        parser.parse_args(["eval", "--dataset", "x", "--server", "u", "--rerank-model", "m"])


def test_the_eval_flags_take_their_defaults_from_the_configs(monkeypatch) -> None:
    """`EvalConfig` and `BM25Config` own the defaults (library use gets the same numbers as the CLI): before, the
    flags wrote their own copies, and a default changed in one place silently diverged from the other."""
    from openrerank.cli import eval as eval_cli
    from openrerank.eval.pipeline import EvalConfig
    from openrerank.eval.sparse import BM25Config

    config = EvalConfig(pipelines=["sparse"], top_k=7, concurrency=3, backend="onnx", dtype="int8", fusion="wsum",
                        rrf_k=9, dense_weight=0.25, dense_from="local", dense_model="d", rerank_model="r",
                        bi_encoder_via_embeddings=False)
    monkeypatch.setattr(eval_cli, "EvalConfig", lambda: config, raising=False)
    monkeypatch.setattr(eval_cli, "BM25Config", lambda: BM25Config(k1=1.2, b=0.75, stemmer=None, stopwords="fr"),
                        raising=False)
    parser = argparse.ArgumentParser(prog="openrerank")
    add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["eval", "--dataset", "x"])
    assert (args.pipelines, args.top_k, args.concurrency, args.backend, args.dtype, args.fusion, args.rrf_k,
            args.dense_weight, args.dense_from, args.dense_model, args.rerank_model, args.rerank_path) == \
        ("sparse", 7, 3, "onnx", "int8", "wsum", 9, 0.25, "local", "d", "r", "score")
    assert (args.k1, args.b, args.stemmer, args.stopwords) == (1.2, 0.75, "none", "fr")


def test_end_to_end_outputs_and_cache(tiny_beir: Path, tmp_path: Path, make_beir, capsys) -> None:
    run_file = tiny_beir / "runs.trec"
    run_file.write_text("q1 Q0 d3 1 9.0 t\nq1 Q0 d1 2 8.0 t\nq2 Q0 q2 1 5.0 t\nq2 Q0 d2 2 4.0 t\n")
    other = make_beir(tmp_path / "other")
    out_json, out_csv, out_png = tmp_path / "t.json", tmp_path / "t.csv", tmp_path / "t.png"
    cache = tmp_path / "cache"
    argv = ["--dataset", str(tiny_beir), "--dataset", str(other), "--pipelines", "all", "--top-k", "3",
            "--runs", str(run_file), "--cache-dir", str(cache), "--quiet",
            "--json", str(out_json), "--csv", str(out_csv), "--plot", str(out_png)]
    assert main(argv) == 0
    doc = json.loads(out_json.read_text())
    assert doc["dataset"] == "average(tiny,other)"
    tiny = doc["per_dataset"][0]
    assert tiny["dataset"] == "tiny" and tiny["queries"] == 3
    ran = tiny["engines"]["default"]  # what ran the embedded model, not the `auto` asked for
    assert ran["backend"] in ("openvino", "onnx", "torch") and ran["dtype"] == "fp32" and ran["reason"]
    assert ran["runtime"] == f"{ran['backend']}-fp32-cpu"
    pipes = [r["pipeline"] for r in tiny["rows"]]
    assert pipes == ["sparse", "dense", "hybrid", "sparse+rerank", "dense+rerank", "hybrid+rerank",
                     "run:runs", "run:runs+rerank"]
    for row in tiny["rows"]:
        assert set(row["metrics"]) == {"recall@3", "ndcg@10", "mrr@10"}  # --top-k 3: recall@5 and @100 are @3
        assert all(0.0 <= v <= 1.0 for v in row["metrics"].values())
        assert row["seconds"]["total"] >= 0
    by = {r["pipeline"]: r for r in tiny["rows"]}
    assert {"sparse.index", "sparse.retrieve", "sparse.score"} <= set(by["sparse"]["seconds"])
    assert {"dense.encode", "hybrid.fuse", "hybrid+rerank.rerank"} <= set(by["hybrid+rerank"]["seconds"])
    # the default reranker is the dense model: reranking dense candidates changes nothing
    assert by["dense+rerank"]["metrics"] == by["dense"]["metrics"]
    # the run file's q2 -> q2 self hit is dropped: d2 is first, so MRR for q2 is 1; q3 missing -> 0
    assert by["run:runs"]["metrics"]["mrr@10"] == pytest.approx((0.5 + 1.0 + 0.0) / 3)
    avg = {r["pipeline"]: r for r in doc["rows"]}
    assert avg["sparse"]["datasets"] == 2 and avg["run:runs"]["datasets"] == 1
    with open(out_csv, newline="") as f:
        lines = list(csv.DictReader(f))
    assert lines[0]["dataset"] == "tiny" and "ndcg@10" in lines[0]
    assert any(line["dataset"] == "average" for line in lines)
    assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    stdout = capsys.readouterr().out
    assert "Dense+Sparse+Rerank" in stdout and "encoded 6 docs" in stdout
    # second run: corpus embeddings come from the cache
    again = [*argv[:2], "--pipelines", "dense", "--cache-dir", str(cache), "--quiet", "--json", str(out_json)]
    assert main(again) == 0
    assert "from cache" in capsys.readouterr().out
    single = json.loads(out_json.read_text())
    assert single["dataset"] == "tiny" and [r["pipeline"] for r in single["rows"]] == ["dense"]


def test_recall_deeper_than_top_k_is_named_by_top_k_in_table_json_and_csv(tiny_beir: Path, tmp_path: Path,
                                                                           capsys) -> None:
    """The recall@100 column held recall over --top-k candidates (recall@2 here) under its usual name."""
    out = ["--json", str(tmp_path / "t.json"), "--csv", str(tmp_path / "t.csv")]
    assert main(["--dataset", str(tiny_beir), "--pipelines", "sparse", "--top-k", "2", "--no-cache", *out]) == 0
    doc = json.loads((tmp_path / "t.json").read_text())
    assert list(doc["rows"][0]["metrics"]) == ["recall@2", "ndcg@10", "mrr@10"]
    assert "recall@5, recall@100 shown as recall@2: every run holds at most top-k 2 candidates" in doc["notes"]
    with open(tmp_path / "t.csv", newline="") as f:
        assert next(csv.reader(f))[3:6] == ["recall@2", "ndcg@10", "mrr@10"]
    table = capsys.readouterr().out
    assert "recall@2" in table and "recall@100" not in table.replace("recall@100 shown", "")


def test_dense_search_drops_query_id_from_candidates(tiny_beir: Path, tmp_path: Path) -> None:
    """Doc `q2` shares its id with query q2 and is its best dense hit; BEIR drops it before scoring."""
    from openrerank.eval.data import load_dataset
    from openrerank.eval.pipeline import DatasetRunner, EvalConfig, Models
    from openrerank.eval.progress import Reporter

    ds = load_dataset(tiny_beir)
    cfg = EvalConfig(pipelines=["dense", "sparse"], top_k=6, cache_dir=None)
    reporter = Reporter(quiet=True)
    models = Models(cfg, reporter)
    try:
        runner = DatasetRunner(ds, cfg, models, None, reporter)
        for stage in ("dense", "sparse"):
            run = runner.first_stage(stage)
            assert "q2" not in run["q2"]
            assert len(run["q2"]) <= 5
    finally:
        models.close()


def test_bad_inputs_exit_cleanly(tmp_path: Path, capsys) -> None:
    assert main(["--dataset", str(tmp_path / "nope"), "--pipelines", "sparse", "--quiet"]) == 2
    assert "not a directory" in capsys.readouterr().err
    assert main(["--dataset", str(tmp_path), "--pipelines", "bogus", "--quiet"]) == 2


@pytest.mark.parametrize(("flag", "value"), [("--top-k", "-5"), ("--top-k", "0"), ("--limit-queries", "0"),
                                           ("--limit-queries", "-1"), ("--concurrency", "0")])
def test_a_count_below_one_is_one_line_naming_its_flag(tiny_beir: Path, flag, value, capsys) -> None:
    """Before: --top-k -5 was a bm25s traceback, --top-k 0 a table of zeros, --limit-queries 0 every query
    and -1 all but the last."""
    with pytest.raises(SystemExit) as caught:
        main(["--dataset", str(tiny_beir), "--pipelines", "sparse", flag, value, "--quiet"])
    err = capsys.readouterr().err.strip()
    assert caught.value.code == 2 and len(err.splitlines()) == 1
    assert f"argument {flag}: {value}: must be at least 1" in err


def test_argument_mistakes_found_after_parsing_exit_2_too(tiny_beir: Path, tmp_path: Path, capsys) -> None:
    """They were `raise SystemExit(message)`: one line, but exit status 1."""
    assert main(["--dataset", str(tiny_beir), "--runs", str(tmp_path / "none.trec"), "--quiet"]) == 2
    assert "--runs" in capsys.readouterr().err
    twice = ["--dataset", str(tiny_beir), "--dataset", str(tiny_beir)]
    assert main([*twice, "--split", "test", "--split", "test", "--split", "test", "--quiet"]) == 2
    assert "give --split once or once per --dataset" in capsys.readouterr().err


def test_a_dataset_with_nothing_to_evaluate_is_one_line(tmp_path: Path, make_beir, capsys) -> None:
    """No query judged above 0: it was a ranx traceback (max() of an empty sequence)."""
    folder = make_beir(tmp_path / "unjudged", qrels=[])
    assert main(["--dataset", str(folder), "--pipelines", "sparse", "--quiet"]) == 2
    assert "nothing to evaluate" in capsys.readouterr().err


def test_missing_eval_extra_is_one_line_naming_the_install_command(tiny_beir: Path, monkeypatch, capsys) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "bm25s", None)  # as if the eval extra were not installed
    assert main(["--dataset", str(tiny_beir), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert "'eval' extra" in err and "bm25s" in err and "scripts/setup.sh eval" in err


def test_bare_output_names_go_to_the_out_dir(tiny_beir: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    argv = ["--dataset", str(tiny_beir), "--pipelines", "sparse,sparse+rerank", "--quiet", "--no-cache",
            "--json", "t.json", "--plot", "t.png", "--csv", str(tmp_path / "elsewhere" / "t.csv")]
    assert main(argv) == 0
    assert (tmp_path / "runs" / "t.json").is_file() and (tmp_path / "runs" / "t.png").is_file()
    assert (tmp_path / "elsewhere" / "t.csv").is_file() and not (tmp_path / "t.json").exists()


def _no_loading(monkeypatch) -> None:
    """Loading a dataset fails the test: what is checked here must be refused before any work starts."""
    import openrerank.eval.data

    def load(*args, **kwargs):
        raise AssertionError("the dataset was loaded before the refusal")

    monkeypatch.setattr(openrerank.eval.data, "load_dataset", load)


@pytest.mark.parametrize("where", ["out-dir is a file", "folder under a file", "a directory", "unmakeable"])
def test_an_output_that_cannot_be_written_is_refused_before_the_evaluation(tiny_beir: Path, tmp_path: Path, where,
                                                                            monkeypatch, capsys) -> None:
    """They were found by the writers after the whole evaluation (minutes for a real dataset), as a traceback, the
    table lost."""
    afile = tmp_path / "afile"
    afile.write_text("")
    flags = {"out-dir is a file": ["--out-dir", str(afile), "--csv", "r.csv"],
             "folder under a file": ["--json", str(afile / "sub" / "t.json")],
             "a directory": ["--plot", str(tmp_path)],
             "unmakeable": ["--json", "/proc/openrerank-nope/t.json"]}[where]
    if where == "unmakeable" and not Path("/proc/self").is_dir():
        pytest.skip("needs Linux's /proc, where no folder can be made, even by root")
    _no_loading(monkeypatch)
    assert main(["--dataset", str(tiny_beir), "--pipelines", "sparse", "--quiet", *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith(f"openrerank eval: error: {flags[-2]} ")
    assert {"out-dir is a file": f"{afile} is not a directory", "folder under a file": f"{afile} is not a directory",
            "a directory": "is a directory", "unmakeable": "cannot write into /proc/openrerank-nope"}[where] in err


def test_an_output_that_exists_needs_only_to_be_writable_itself(tiny_beir: Path, tmp_path: Path) -> None:
    """The up-front check wrote a scratch file beside the output: `--json >(jq .)` (a pipe at /dev/fd/N) and a
    writable file in a folder that takes no new files were refused, where the evaluation had written them."""
    import os
    import threading

    read, write = os.pipe()
    got: list[bytes] = []
    reader = threading.Thread(target=lambda: got.append(os.fdopen(read, "rb").read()))
    reader.start()
    try:
        assert main(["--dataset", str(tiny_beir), "--pipelines", "sparse", "--quiet", "--no-cache",
                     "--json", f"/dev/fd/{write}"]) == 0
    finally:
        os.close(write)
        reader.join(timeout=60)
    assert json.loads(got[0])["rows"]


def test_pystemmers_aliases_are_stemmers(tiny_beir: Path, tmp_path: Path) -> None:
    """`--stemmer en` ran before the up-front check, which knew only the names `Stemmer.algorithms()` lists."""
    out = tmp_path / "t.json"
    assert main(["--dataset", str(tiny_beir), "--pipelines", "sparse", "--quiet", "--no-cache", "--stemmer", "en",
                 "--json", str(out)]) == 0
    assert json.loads(out.read_text())["rows"]


@pytest.mark.parametrize(("flag", "named"), [("--stemmer", "is not a PyStemmer algorithm"),
                                             ("--stopwords", "is not a bm25s stopword list")])
def test_an_unknown_stemmer_or_stopword_list_is_one_line_before_the_evaluation(tiny_beir: Path, flag, named,
                                                                               monkeypatch, capsys) -> None:
    """They were a KeyError (PyStemmer) and a ValueError (bm25s) traceback from inside the BM25 index."""
    _no_loading(monkeypatch)
    assert main(["--dataset", str(tiny_beir), "--pipelines", "sparse", "--quiet", flag, "klingon"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith(f"openrerank eval: error: {flag} 'klingon' {named}")


def test_an_output_failing_after_the_evaluation_is_one_line_and_the_others_are_written(
        tiny_beir: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    import openrerank.eval.report

    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(openrerank.eval.report, "write_csv", full)
    out = ["--json", str(tmp_path / "t.json"), "--csv", str(tmp_path / "t.csv")]
    assert main(["--dataset", str(tiny_beir), "--pipelines", "sparse", "--quiet", "--no-cache", *out]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"openrerank eval: error: --csv {tmp_path / 't.csv'}: No space left on device"
    assert json.loads((tmp_path / "t.json").read_text())["rows"]


def test_progress_lines_when_stderr_is_not_a_terminal() -> None:
    import io

    from rich.console import Console

    from openrerank.eval.progress import Reporter, progress_line

    buf = io.StringIO()
    reporter = Reporter(console=Console(file=buf, force_terminal=False), every=0.0)
    with reporter.step("encode corpus", 4) as advance:
        for _ in range(4):
            advance(1)
    lines = buf.getvalue().splitlines()
    assert lines[0] == "encode corpus: started (4 to do)"
    assert any(line.startswith("encode corpus: 2/4 (50%), ") and "/s, ETA " in line for line in lines)
    assert lines[-1].startswith("encode corpus: done 4/4 in ")
    assert progress_line("x", 25, 100, 5.0) == "x: 25/100 (25%), 5.0/s, ETA 15s"


def test_plot_pairs_each_first_stage_with_its_rerank() -> None:
    from openrerank.eval.report import _zoomed_limits, rerank_pairs

    pipes = ["sparse", "dense", "hybrid", "sparse+rerank", "dense+rerank", "run:bm25", "run:bm25+rerank",
             "hybrid+rerank"]
    assert rerank_pairs(pipes) == [("Sparse", "sparse", "sparse+rerank"), ("Dense", "dense", "dense+rerank"),
                                   ("Dense+Sparse", "hybrid", "hybrid+rerank"),
                                   ("run:bm25", "run:bm25", "run:bm25+rerank")]
    assert rerank_pairs(["dense+rerank"]) == [("Dense", None, "dense+rerank")]
    lo, hi = _zoomed_limits([0.64, 0.72])
    assert 0.5 < lo < 0.64 and hi > 0.72  # zoomed, not from 0


@pytest.mark.parametrize("flag", ["--rerank-model", "--dense-model"])
def test_a_model_that_cannot_load_is_one_line_naming_evals_flag(tiny_beir: Path, tmp_path: Path, flag, capsys):
    pipelines = "sparse+rerank" if flag == "--rerank-model" else "dense"
    assert main(["--dataset", str(tiny_beir), "--pipelines", pipelines, flag, "./nope", "--quiet",
                 "--no-cache"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert f"{flag} ./nope" in err and "no such directory" in err and "--model " not in err


def test_help_shows_defaults_and_every_engine(capsys) -> None:
    with pytest.raises(SystemExit):
        main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "{auto,openvino,onnx,torch}" in text
    assert "(default: 100)" in text and "(default: fp32)" in text  # --top-k, --dtype


def test_sparse_only_rerank_rows_embed_only_the_candidates(tiny_beir: Path, tmp_path: Path) -> None:
    """Before, with the default bi-encoder reranker, a sparse-only table (here one query, two candidates) still
    embedded the whole corpus to share it with a dense stage that no row used."""
    out = tmp_path / "sparse.json"
    assert main(["--dataset", str(tiny_beir), "--pipelines", "sparse,sparse+rerank", "--limit-queries", "1",
                 "--top-k", "2", "--no-cache", "--quiet", "--json", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert not any("dense" in note for note in doc["notes"]), doc["notes"]
    assert "sparse+rerank: 2 pairs, 2 newly scored" in " ".join(doc["notes"])
    by = {r["pipeline"]: r for r in doc["rows"]}
    assert "dense.encode" not in by["sparse+rerank"]["seconds"]


def test_datasets_named_alike_are_told_apart_and_piped_tables_keep_their_numbers(tmp_path: Path, make_beir,
                                                                                 capsys) -> None:
    """Before, two folders named `syn` were two identical columns and CSV rows, and off a terminal (CI, a log)
    rich's 80 columns squeezed the per-dataset table's numbers to `0.…`."""
    a, b = make_beir(tmp_path / "a" / "syn"), make_beir(tmp_path / "b" / "syn")
    out_csv = tmp_path / "t.csv"
    capsys.readouterr()
    assert main(["--dataset", str(a), "--dataset", str(b), "--pipelines", "sparse,dense,hybrid", "--quiet",
                 "--no-cache", "--csv", str(out_csv)]) == 0
    out = capsys.readouterr().out
    assert "…" not in out, out
    assert "a/syn" in out and "b/syn" in out
    with open(out_csv, newline="") as f:
        names = {line["dataset"] for line in csv.DictReader(f)}
    assert names == {"a/syn", "b/syn", "average"}


def test_dataset_labels_add_folders_only_where_names_clash(tmp_path: Path) -> None:
    from openrerank.eval.data import dataset_labels

    a, b, c = tmp_path / "a" / "syn", tmp_path / "b" / "syn", tmp_path / "scifact"
    labels = dataset_labels([a, b, c, a])  # the same folder twice (two splits) keeps one name
    assert labels == {a.resolve(): "a/syn", b.resolve(): "b/syn", c.resolve(): "scifact"}


def test_ranx_is_compiled_in_a_step_of_its_own_before_any_dataset(tiny_beir: Path, monkeypatch) -> None:
    """ranx compiles its metrics and fusion on first use in a process (seconds to minutes): that time was
    counted in the first dataset's `sparse.score` and `hybrid.fuse` (89 s and 124 s for milliseconds of work)
    with no progress line. Now a step of its own, first, calls both."""
    import openrerank.eval.pipeline as pipeline
    from openrerank.eval.data import load_dataset
    from openrerank.eval.progress import Reporter

    order: list[str] = []
    real_evaluate, real_fuse = pipeline.evaluate, pipeline.fuse
    monkeypatch.setattr(pipeline, "evaluate", lambda *a, **k: order.append("evaluate") or real_evaluate(*a, **k))
    monkeypatch.setattr(pipeline, "fuse", lambda *a, **k: order.append("fuse") or real_fuse(*a, **k))

    class Recording(Reporter):
        def step(self, description, total):
            order.append(description)
            return super().step(description, total)

    cfg = pipeline.EvalConfig(pipelines=["sparse", "hybrid"], top_k=6, cache_dir=None)
    pipeline.evaluate_datasets([load_dataset(tiny_beir)], cfg, rel_thresholds=[1], reporter=Recording(quiet=True))
    assert order[0].startswith("ranx: compile its metrics and fusion") and order[1:3] == ["evaluate", "fuse"], order

"""`openrerank bench`'s arguments are checked before anything is timed."""

from __future__ import annotations

import pytest
from openrerank_bench.cli import _runnable
from rich.console import Console

from openrerank.runtimes import selection
from openrerank.runtimes.selection import RuntimeConfigError


def test_a_default_engine_this_cpu_refuses_is_left_out_and_a_named_one_ends_the_bench(monkeypatch):
    """On a CPU without bf16 every plain `openrerank bench` exited 1: the default list's bf16 rows failed."""
    monkeypatch.setattr(selection, "cpu_flags", lambda: frozenset({"avx2", "fma"}))
    console = Console(stderr=True)
    assert _runnable(["openvino:bf16", "onnx:fp32", "torch:bf16"], given=False, console=console) == ["onnx:fp32"]
    with pytest.raises(RuntimeConfigError, match=r"--backends openvino:bf16: .*AVX512-BF16"):
        _runnable(["onnx:fp32", "openvino:bf16"], given=True, console=console)
    with pytest.raises(RuntimeConfigError, match=r"^--backends foo:fp32: backend 'foo': unknown runtime; choose one"):
        _runnable(["foo:fp32"], given=True, console=console)


@pytest.mark.parametrize("flag", ["--threads", "--rounds", "--clients", "--concurrent-requests", "--embed-texts"])
def test_counts_below_one_are_refused(flag, capsys):
    """Before, --threads -3 ran for minutes and ended in a PyTorch traceback; 0 meant the default silently."""
    from openrerank.cli.main import main

    with pytest.raises(SystemExit) as done:
        main(["bench", flag, "0"])
    assert done.value.code == 2 and flag in capsys.readouterr().err


class _Reached(Exception):
    """The bench got past its argument checks (to loading the workload)."""


def _bench(argv, monkeypatch, tmp_path, flags):
    import openrerank_bench.cli as bench_cli

    from openrerank.cli.main import main

    monkeypatch.setattr(selection, "cpu_flags", lambda: frozenset(flags))

    def reached(*_a, **_k):
        raise _Reached

    monkeypatch.setattr(bench_cli, "load_workload", reached)
    return main(["bench", "--data", str(tmp_path), *argv])


NO_BF16 = {"avx2", "fma"}
BF16 = {"avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_bf16", "avx512_vnni"}


@pytest.mark.parametrize("flags", [NO_BF16, BF16], ids=["cpu-without-bf16", "cpu-with-bf16"])
@pytest.mark.parametrize("tasks", ["rerank", "embed", "rerank,embed"])
def test_the_default_lists_run_on_any_cpu(tasks, flags, monkeypatch, tmp_path, capsys):
    """Before, a plain bench on a CPU without bf16 exited 2: the default --embed-backends (with openvino:bf16) was
    checked as if the user had named it, even with --tasks rerank. Now the default rows it refuses are left out."""
    with pytest.raises(_Reached):
        _bench(["--tasks", tasks], monkeypatch, tmp_path, flags)
    err = capsys.readouterr().err
    assert "error" not in err
    assert ("skipping openvino:bf16" in err) == (flags == NO_BF16)


@pytest.mark.parametrize("tasks", ["rerank", "rerank,embed"])
def test_embed_backends_are_checked_only_when_embed_is_measured(tasks, monkeypatch, tmp_path, capsys):
    """An --embed-backends entry this CPU refuses ends the bench only when the embeddings row runs."""
    argv = ["--tasks", tasks, "--embed-backends", "openvino:bf16,onnx:fp32"]
    if tasks == "rerank":
        with pytest.raises(_Reached):
            _bench(argv, monkeypatch, tmp_path, NO_BF16)
    else:
        assert _bench(argv, monkeypatch, tmp_path, NO_BF16) == 2
        assert "error: --embed-backends openvino:bf16: " in capsys.readouterr().err


@pytest.mark.parametrize(("tasks", "flag"), [("rerank", None), ("embed", "--embed-backends"),
                                             ("rerank,embed", "--embed-backends")])
def test_a_malformed_entry_is_refused_only_for_its_task_naming_its_flag(tasks, flag, monkeypatch, tmp_path, capsys):
    """Before, `--tasks rerank --embed-backends bogus` exited 2 saying `--backends entries are ...`: the embeddings
    list was checked for a task not asked for, and named as the other flag."""
    argv = ["--tasks", tasks, "--embed-backends", "bogus"]
    if flag is None:
        with pytest.raises(_Reached):
            _bench(argv, monkeypatch, tmp_path, NO_BF16)
        return
    assert _bench(argv, monkeypatch, tmp_path, NO_BF16) == 2
    assert f"{flag} entries are BACKEND:DTYPE, got 'bogus'" in capsys.readouterr().err


def test_the_roofline_caption_uses_the_median_gemm_pace(monkeypatch, tmp_path):
    """The caption's pace is the median of the run's GEMMs, as the per-round fractions use (with an even count it
    was the upper middle one: 3.0 here)."""
    from types import SimpleNamespace

    import openrerank_bench.cli as bench_cli

    (tmp_path / "config.json").write_text("{}")
    monkeypatch.setattr(bench_cli, "workload_sequences", lambda *_a: ([10], 1))
    monkeypatch.setattr(bench_cli, "flops_per_pair", lambda *_a: 1e9)
    runner = SimpleNamespace(served=SimpleNamespace(loaded=None))
    roof = bench_cli._roofline(runner, SimpleNamespace(queries=[], passages=[]), tmp_path, 1, [4.0, 1.0, 3.0, 2.0])
    assert roof["gemm_gflops"] == 2.5 and roof["pairs_per_s"] == 2.5


def test_a_run_file_that_is_not_there_is_one_line_before_the_dataset_is_read(monkeypatch, tmp_path, capsys):
    """It was a FileNotFoundError traceback (exit 1) from reading the run, after the whole dataset was loaded."""
    import openrerank.eval.data
    from openrerank.cli.main import main

    monkeypatch.setattr(selection, "cpu_flags", lambda: frozenset(NO_BF16))
    monkeypatch.setattr(openrerank.eval.data, "load_dataset", lambda *_a, **_k: pytest.fail("the dataset was read"))
    assert main(["bench", "--data", str(tmp_path), "--tasks", "rerank", "--backends", "onnx:fp32",
                 "--run", "nope.trec"]) == 2
    assert capsys.readouterr().err == f"openrerank bench: error: --run nope.trec: no such file in {tmp_path}\n"


@pytest.mark.parametrize("counts", ["a", "1,x", "0", "1,-2", ","])
def test_replica_counts_that_are_not_counts_are_one_line(counts, capsys):
    """`--replica-counts a` was an int() ValueError traceback once the scale-out bench had started."""
    from openrerank.cli.main import main

    with pytest.raises(SystemExit) as done:
        main(["bench", "--scale-out", "--replica-counts", counts])
    err = capsys.readouterr().err
    assert done.value.code == 2 and len(err.splitlines()) == 1
    assert f"argument --replica-counts: {counts!r}" in err and "give comma-separated counts, e.g. 1,2,3" in err


def test_replica_counts_parse_to_a_list():
    from openrerank_bench.cli import count_list

    assert count_list("1,2,3") == [1, 2, 3] and count_list(" 4 ") == [4]

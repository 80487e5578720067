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
    with pytest.raises(RuntimeConfigError, match="--backends foo:fp32: unknown backend"):
        _runnable(["foo:fp32"], given=True, console=console)


@pytest.mark.parametrize("flag", ["--threads", "--rounds", "--clients", "--concurrent-requests", "--embed-texts"])
def test_counts_below_one_are_refused(flag, capsys):
    """Before, --threads -3 ran for minutes and ended in a PyTorch traceback; 0 meant the default silently."""
    from openrerank.cli.main import main

    with pytest.raises(SystemExit) as done:
        main(["bench", flag, "0"])
    assert done.value.code == 2 and flag in capsys.readouterr().err

"""`--backend auto` measures: the fastest faithful engine serves, its timings are cached and reused, replicas
starting together time once, `--backend-choice rules` times nothing, and a failing engine hands over.

No test assumes which engine is fastest on this machine: where the winner matters, the timings are faked.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from openrerank.engine.loading import LoadOptions, load_model
from openrerank.runtimes import measure, openvino_convert, selection
from openrerank.runtimes.measure import Throughput, timing_shapes
from openrerank.runtimes.selection import RuntimeConfigError, plan_runtimes

ENCODERS = ("openvino", "onnx", "torch")


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """A private converted-model cache (so timings are not found from another test)."""
    monkeypatch.setenv("OPENRERANK_CACHE_DIR", str(tmp_path))
    return tmp_path


def fake_rates(monkeypatch, rates: dict[str, float]) -> list[str]:
    """Time runtimes at made-up rates (by description, e.g. "onnx-fp32-cpu"); returns what was timed."""
    timed: list[str] = []

    def fake(runtimes, shapes, vocab_size, seconds=measure.TIMING_SECONDS):
        timed.extend(rt.description for rt in runtimes)
        return [Throughput(rates[rt.description], rates[rt.description] * 100, tuple(shapes)) for rt in runtimes]

    monkeypatch.setattr(measure, "time_runtimes", fake)
    return timed


def no_timing(monkeypatch) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError("timed an engine where nothing should be timed")

    monkeypatch.setattr(measure, "time_runtimes", refuse)


def records(cache) -> list[dict]:
    return [json.loads(p.read_text()) for p in (cache / "engine-choice").glob("*.json")]


def planned() -> list[str]:
    return [f"{c.runtime}-{c.dtype}-cpu" for c in plan_runtimes("auto", "auto", "cpu", ENCODERS)]


def test_the_fastest_candidate_serves_and_every_rate_is_shown(tiny_model_dir, cache, monkeypatch):
    candidates = planned()
    if len(candidates) < 2:
        pytest.skip("only one engine is installed")
    for fastest in (candidates[-1], candidates[0]):  # the rule's last, then its first
        monkeypatch.setenv("OPENRERANK_CACHE_DIR", str(cache / fastest))
        timed = fake_rates(monkeypatch, {c: (50.0 if c == fastest else 10.0 + i) for i, c in enumerate(candidates)})
        loaded = load_model(str(tiny_model_dir))
        assert sorted(timed) == sorted(candidates)  # every faithful candidate was timed once
        assert loaded.scorer.description == fastest
        engine = loaded.describe()["engine"]
        assert engine["choice"] == "measure"
        first = engine["measured"][0]  # fastest first
        assert f"{first['backend']}-{first['dtype']}-cpu" == fastest
        assert loaded.throughput is not None and loaded.throughput.pairs_per_s == 50.0
        assert loaded.throughput.tokens_per_s == 5000.0
        assert "50.0/s" in engine["reason"] and "timed at this start" in engine["reason"]
        loaded.close()


def test_timings_are_cached_and_reused_without_timing_again(tiny_model_dir, cache, monkeypatch):
    first = load_model(str(tiny_model_dir))  # really timed, on this machine
    first.close()
    [record] = records(cache)
    assert {(m["backend"], m["dtype"]) for m in record["measurements"]} == {
        (c.runtime, c.dtype) for c in plan_runtimes("auto", "auto", "cpu", ENCODERS)}
    assert record["threads"] >= 1 and record["cpu_flags_sha256"] and record["versions"]["onnxruntime"]
    assert all(m["pairs_per_s"] > 0 for m in record["measurements"] if "error" not in m)
    no_timing(monkeypatch)
    again = load_model(str(tiny_model_dir))
    a, b = again.runtime_choice, first.runtime_choice
    assert (a.runtime, a.dtype) == (b.runtime, b.dtype)
    assert again.throughput == first.throughput
    assert "cached from an earlier start" in again.runtime_choice.reason
    again.close()
    # Another thread count is another machine as far as speed goes: timed again, in its own record.
    monkeypatch.undo()
    monkeypatch.setenv("OPENRERANK_CACHE_DIR", str(cache))
    load_model(str(tiny_model_dir), LoadOptions(threads=1)).close()
    assert len(records(cache)) == 2


def test_rules_choice_times_nothing_and_follows_the_documented_order(tiny_model_dir, cache, monkeypatch):
    no_timing(monkeypatch)
    loaded = load_model(str(tiny_model_dir), LoadOptions(backend_choice="rules"))
    rule = plan_runtimes("auto", "auto", "cpu", ENCODERS)[0]
    assert (loaded.runtime_choice.runtime, loaded.runtime_choice.dtype) == (rule.runtime, rule.dtype)
    assert loaded.runtime_choice.reason == rule.reason and loaded.runtime_choice.choice == "rules"
    assert loaded.throughput is None and "measured" not in loaded.describe()["engine"]
    assert not records(cache)
    loaded.close()
    with pytest.raises(RuntimeConfigError, match="unknown backend choice"):
        load_model(str(tiny_model_dir), LoadOptions(backend_choice="guess"))


def test_an_engine_that_refuses_the_model_hands_over(tiny_model_dir, cache, monkeypatch):
    if not selection.openvino_available():
        pytest.skip("OpenVINO is not installed")

    def refuse(network, out):
        raise openvino_convert.ConversionError("unsupported operation aten::frobnicate")

    monkeypatch.setattr(openvino_convert, "_convert", refuse)
    loaded = load_model(str(tiny_model_dir), LoadOptions(dtype="fp32"))
    assert loaded.runtime_choice.runtime != "openvino" and loaded.runtime_choice.choice == "measure"
    assert "OpenVINO fp32 refused it (ConversionError: unsupported operation" in loaded.runtime_choice.reason
    [failed] = [m for m in loaded.describe()["engine"]["measured"] if m["backend"] == "openvino"]
    assert "frobnicate" in failed["error"] and "pairs_per_s" not in failed
    loaded.close()
    # Asked for explicitly, the refusal is an error, and no record of it is kept (the cause may pass).
    with pytest.raises(openvino_convert.ConversionError, match="frobnicate"):
        load_model(str(tiny_model_dir), LoadOptions(backend="openvino", dtype="fp32"))
    assert len(records(cache)) == 1


def test_the_fastest_failing_to_load_later_hands_over_to_the_next(tiny_model_dir, cache, monkeypatch):
    candidates = planned()
    if "torch-fp32-cpu" not in candidates or len(candidates) < 2:
        pytest.skip("needs PyTorch and another engine")
    fake_rates(monkeypatch, {c: (90.0 if c == "torch-fp32-cpu" else 10.0 + i) for i, c in enumerate(candidates)})
    load_model(str(tiny_model_dir)).close()  # timed: PyTorch "fastest", cached

    from openrerank.runtimes import torch_runtime

    def broken(*args, **kwargs):
        raise RuntimeError("out of file handles")

    no_timing(monkeypatch)
    monkeypatch.setattr(torch_runtime.TorchRuntime, "__init__", broken)
    loaded = load_model(str(tiny_model_dir))
    runner_up = max((c for c in candidates if c != "torch-fp32-cpu"), key=candidates.index)
    assert loaded.scorer.description == runner_up
    assert "PyTorch fp32 failed to load (RuntimeError: out of file handles)" in loaded.runtime_choice.reason
    loaded.close()


def test_replicas_starting_together_time_once(tiny_model_dir, cache):
    """Two processes load the same model at once with an empty cache: one times, the other reads its record."""
    code = ("import json, sys; from openrerank.engine.loading import load_model; m = load_model(sys.argv[1]); "
            "print(json.dumps({'cached': 'cached from an earlier start' in m.runtime_choice.reason, "
            "'engine': m.scorer.description}))")
    env = {**os.environ, "OPENRERANK_CACHE_DIR": str(cache), "TOKENIZERS_PARALLELISM": "false"}
    procs = [subprocess.Popen([sys.executable, "-c", code, str(tiny_model_dir)], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = []
    for p in procs:
        out, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-2000:]
        outs.append(json.loads(out.strip().splitlines()[-1]))
    assert sorted(o["cached"] for o in outs) == [False, True]
    assert outs[0]["engine"] == outs[1]["engine"]
    assert len(records(cache)) == 1


def test_timing_shapes_fit_the_window_and_shrink_for_big_models():
    assert timing_shapes(512) == measure.TIMING_SHAPES
    assert all(w <= 64 for _, w in timing_shapes(64)) and len(timing_shapes(64)) == len(set(timing_shapes(64)))
    big = timing_shapes(512, params=600e6)
    assert all(rows >= 1 for rows, _ in big)
    assert sum(r * w for r, w in big) < sum(r * w for r, w in measure.TIMING_SHAPES)

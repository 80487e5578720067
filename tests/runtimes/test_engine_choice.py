"""`--backend auto` measures: the fastest faithful runtime (and its fastest lane count) serves, its timings are
cached and reused, replicas starting together time once, `--backend-choice rules` times nothing, and a failing
runtime hands over.

No test assumes which runtime is fastest on this machine: where the winner matters, the timings are faked.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest

from openrerank.engine.loading import LoadOptions, load_model
from openrerank.runtimes import openvino_convert, selection, timing_passes
from openrerank.runtimes.base import LANES_ENV, default_threads, lane_counts
from openrerank.runtimes.selection import LANED_RUNTIMES, RuntimeConfigError, plan_runtimes
from openrerank.runtimes.timing_passes import Throughput, timing_shapes

ENCODERS = ("openvino", "onnx", "torch")


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """A private converted-model cache (so timings are not found from another test), lanes not forced."""
    monkeypatch.setenv("OPENRERANK_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv(LANES_ENV, raising=False)
    return tmp_path


def name(rt) -> str:
    """A built runtime as the candidates are named here: description and lanes, e.g. "onnx-fp32-cpu@2"."""
    return f"{rt.description}@{rt.lanes}"


def fake_rates(monkeypatch, rates: dict[str, float]) -> list[str]:
    """Time runtimes at made-up rates (by `name`); returns what was timed."""
    timed: list[str] = []

    def fake(runtimes, shapes, vocab_size, seconds=timing_passes.TIMING_SECONDS):
        timed.extend(name(rt) for rt in runtimes)
        return [Throughput(rates[name(rt)], rates[name(rt)] * 100, tuple(shapes)) for rt in runtimes]

    monkeypatch.setattr(timing_passes, "time_runtimes", fake)
    return timed


def no_timing(monkeypatch) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError("timed an engine where nothing should be timed")

    monkeypatch.setattr(timing_passes, "time_runtimes", refuse)


def records(cache) -> list[dict]:
    return [json.loads(p.read_text()) for p in (cache / "engine-choice").glob("*.json")]


def planned(threads: int | None = None) -> list[str]:
    """The candidates `auto` times here: each faithful runtime, once per lane count where it has lanes."""
    counts = lane_counts(threads or default_threads())
    return [f"{c.runtime}-{c.dtype}-cpu@{n}" for c in plan_runtimes("auto", "auto", "cpu", ENCODERS)
            for n in (counts if c.runtime in LANED_RUNTIMES else (1,))]


def test_the_fastest_candidate_serves_and_every_rate_is_shown(tiny_model_dir, cache, monkeypatch):
    candidates = planned()
    if len(candidates) < 2:
        pytest.skip("only one engine is installed")
    for fastest in (candidates[-1], candidates[0]):  # the rule's last, then its first
        monkeypatch.setenv("OPENRERANK_CACHE_DIR", str(cache / fastest))
        timed = fake_rates(monkeypatch, {c: (50.0 if c == fastest else 10.0 + i) for i, c in enumerate(candidates)})
        loaded = load_model(str(tiny_model_dir))
        assert sorted(timed) == sorted(candidates)  # every faithful candidate was timed once
        assert f"{loaded.scorer.description}@{loaded.scorer.lanes}" == fastest
        engine = loaded.describe()["engine"]
        assert engine["choice"] == "measure" and engine["lanes"] == loaded.scorer.lanes
        first = engine["measured"][0]  # fastest first
        assert f"{first['backend']}-{first['dtype']}-cpu@{first['lanes']}" == fastest
        assert loaded.throughput is not None and loaded.throughput.pairs_per_s == 50.0
        assert loaded.throughput.tokens_per_s == 5000.0
        assert "50.0/s" in engine["reason"] and "timed at this start" in engine["reason"]
        loaded.close()


def test_each_lane_count_is_a_candidate_and_the_fastest_serves_with_its_lanes(tiny_model_dir, cache, monkeypatch):
    laned = [c for c in plan_runtimes("auto", "fp32", "cpu", ENCODERS) if c.runtime in LANED_RUNTIMES]
    if not laned:
        pytest.skip("no lane-capable runtime installed")
    runtime = f"{laned[0].runtime}-fp32-cpu"
    for lanes in (1, 2):  # one lane fastest, then two: neither is assumed
        monkeypatch.setenv("OPENRERANK_CACHE_DIR", str(cache / str(lanes)))
        candidates = planned(threads=2)
        fastest = f"{runtime}@{lanes}"
        timed = fake_rates(monkeypatch, {c: (50.0 if c == fastest else 10.0) for c in candidates})
        loaded = load_model(str(tiny_model_dir), LoadOptions(threads=2))
        assert sorted(timed) == sorted(candidates) and f"{runtime}@1" in timed and f"{runtime}@2" in timed
        assert loaded.scorer.lanes == lanes and loaded.scorer.description == runtime
        engine = loaded.describe()["engine"]
        assert engine["lanes"] == lanes
        assert f"({lanes} lane{'s' * (lanes > 1)}) 50.0/s" in engine["reason"]
        loaded.close()


def test_only_the_configuration_that_serves_keeps_a_compiled_blob(tiny_model_dir, cache, monkeypatch):
    """Every timed OpenVINO configuration compiles, but a blob (a model's size on disk) is kept only for the
    one that serves: in the folder of its own configuration, where the next start finds it."""
    if "openvino" not in [c.runtime for c in plan_runtimes("auto", "fp32", "cpu", ENCODERS)]:
        pytest.skip("OpenVINO is not installed")
    from openrerank.runtimes.openvino_blobs import compiled_config_dir
    from openrerank.runtimes.openvino_runtime import compile_config

    candidates = planned(threads=2)
    fake_rates(monkeypatch, {c: (50.0 if c == "openvino-fp32-cpu@2" else 10.0) for c in candidates})
    loaded = load_model(str(tiny_model_dir), LoadOptions(threads=2, dtype="fp32"))
    assert f"{loaded.scorer.description}@{loaded.scorer.lanes}" == "openvino-fp32-cpu@2"
    loaded.close()
    blobs = list(cache.rglob("*.blob"))
    serving = compiled_config_dir(Path("."), compile_config("fp32", 2, lanes=2)).name
    assert [b.parent.name for b in blobs] == [serving]


def test_fewer_lanes_serve_when_they_time_within_the_tie_of_the_fastest(tiny_model_dir, cache, monkeypatch):
    """Two lanes 3% faster than one is a tie (the timing's noise): one lane serves, so a lone small request
    keeps every thread; 15% faster is not, and two lanes serve."""
    laned = [c for c in plan_runtimes("auto", "fp32", "cpu", ENCODERS) if c.runtime in LANED_RUNTIMES]
    if not laned:
        pytest.skip("no lane-capable runtime installed")
    runtime = f"{laned[0].runtime}-fp32-cpu"
    assert 0.03 < selection.LANES_TIE < 0.15
    for one_lane, serves in ((48.5, 1), (42.5, 2)):
        monkeypatch.setenv("OPENRERANK_CACHE_DIR", str(cache / str(serves)))
        rates = {c: 10.0 for c in planned(threads=2)} | {f"{runtime}@2": 50.0, f"{runtime}@1": one_lane}
        fake_rates(monkeypatch, rates)
        loaded = load_model(str(tiny_model_dir), LoadOptions(threads=2))
        assert loaded.scorer.description == runtime and loaded.scorer.lanes == serves
        engine = loaded.describe()["engine"]
        assert engine["measured"][0]["lanes"] == 2  # the record still ranks by rate
        tied = "of the fastest" in engine["reason"] and "with fewer lanes" in engine["reason"]
        assert tied == (serves == 1), engine["reason"]
        loaded.close()


def test_lanes_set_by_the_operator_are_the_only_count_timed(tiny_model_dir, cache, monkeypatch):
    monkeypatch.setenv(LANES_ENV, "1")
    timed = fake_rates(monkeypatch, {c: 10.0 + i for i, c in enumerate(planned(threads=2))})
    loaded = load_model(str(tiny_model_dir), LoadOptions(threads=2))
    assert timed and all(t.endswith("@1") for t in timed) and loaded.scorer.lanes == 1
    loaded.close()
    # Another setting is another record (the key holds it): timed again, at that count only.
    monkeypatch.setenv(LANES_ENV, "2")
    timed = fake_rates(monkeypatch, {c: 10.0 + i for i, c in enumerate(planned(threads=2))})
    load_model(str(tiny_model_dir), LoadOptions(threads=2)).close()
    assert timed and all(t.endswith("@2") or t.startswith("torch-") for t in timed)
    assert len(records(cache)) == 2


def test_timings_are_cached_and_reused_without_timing_again(tiny_model_dir, cache, monkeypatch):
    first = load_model(str(tiny_model_dir))  # really timed, on this machine
    first.close()
    [record] = records(cache)
    assert sorted(f"{m['backend']}-{m['dtype']}-cpu@{m['lanes']}" for m in record["measurements"]) == sorted(
        planned())
    assert record["threads"] >= 1 and record["cpu_flags_sha256"] and record["versions"]["onnxruntime"]
    assert all(m["pairs_per_s"] > 0 for m in record["measurements"] if "error" not in m)
    no_timing(monkeypatch)
    again = load_model(str(tiny_model_dir))
    a, b = again.runtime_choice, first.runtime_choice
    assert (a.runtime, a.dtype, a.lanes) == (b.runtime, b.dtype, b.lanes)
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

    conversions = []

    def refuse(network, out):
        conversions.append(out)
        raise openvino_convert.ConversionError("unsupported operation aten::frobnicate")

    monkeypatch.setattr(openvino_convert, "_convert", refuse)
    loaded = load_model(str(tiny_model_dir), LoadOptions(dtype="fp32", threads=2))
    assert loaded.runtime_choice.runtime != "openvino" and loaded.runtime_choice.choice == "measure"
    reason = loaded.runtime_choice.reason
    assert "OpenVINO fp32 refused it (ConversionError: unsupported operation" in reason
    assert reason.count("OpenVINO fp32 refused it") == 1  # said once, not once per lane count
    failed = [m for m in loaded.describe()["engine"]["measured"] if m["backend"] == "openvino"]
    assert sorted(m["lanes"] for m in failed) == [1, 2]  # both lane counts recorded as refused ...
    assert all("frobnicate" in m["error"] and "pairs_per_s" not in m for m in failed)
    assert len(conversions) == 1  # ... from one attempt: a runtime that refuses is not tried per lane count
    loaded.close()
    # Asked for explicitly, the refusal is an error, and no record of it is kept (the cause may pass).
    with pytest.raises(openvino_convert.ConversionError, match="frobnicate"):
        load_model(str(tiny_model_dir), LoadOptions(backend="openvino", dtype="fp32"))
    assert len(records(cache)) == 1


def test_the_fastest_failing_to_load_later_hands_over_to_the_next(tiny_model_dir, cache, monkeypatch):
    candidates = planned()
    if "torch-fp32-cpu@1" not in candidates or len(candidates) < 2:
        pytest.skip("needs PyTorch and another engine")
    fake_rates(monkeypatch, {c: (90.0 if c == "torch-fp32-cpu@1" else 10.0 + i) for i, c in enumerate(candidates)})
    load_model(str(tiny_model_dir)).close()  # timed: PyTorch "fastest", cached

    from openrerank.runtimes import torch_runtime

    def broken(*args, **kwargs):
        raise RuntimeError("out of file handles")

    no_timing(monkeypatch)
    monkeypatch.setattr(torch_runtime.TorchRuntime, "__init__", broken)
    loaded = load_model(str(tiny_model_dir))
    runner_up = max((c for c in candidates if c != "torch-fp32-cpu@1"), key=candidates.index)
    assert f"{loaded.scorer.description}@{loaded.scorer.lanes}" == runner_up
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
    assert timing_shapes(512) == timing_passes.TIMING_SHAPES
    assert all(w <= 64 for _, w in timing_shapes(64)) and len(timing_shapes(64)) == len(set(timing_shapes(64)))
    big = timing_shapes(512, params=600e6)
    assert all(rows >= 1 for rows, _ in big)
    assert sum(r * w for r, w in big) < sum(r * w for r, w in timing_passes.TIMING_SHAPES)


@pytest.mark.parametrize("compared", [True, False])
@pytest.mark.parametrize("tied", [False, True])
def test_the_measured_reason_calls_a_runtime_a_runtime(compared, tied):
    """/v1/metadata's `engine.reason` is prose: it says "runtime" (the key keeps its public name)."""
    from openrerank.runtimes.choosing import _measured_reason
    from openrerank.runtimes.measure import Measurement, Timings

    one = Measurement("onnx", "fp32", Throughput(50.0, 5000.0, ((8, 128),)), lanes=1)
    two = Measurement("onnx", "fp32", Throughput(51.0, 5100.0, ((8, 128),)), lanes=2)
    reason = _measured_reason(one, [one, two], [], Timings((one, two), False, 1.0, "k"), compared,
                              two if tied else None)
    assert "runtime" in reason and "engine" not in reason


def test_the_measured_reason_names_an_arm_cpu(cpuinfo):
    """The log and /v1/metadata said "the fastest on this CPU" on every Arm machine: it had no name."""
    from openrerank.runtimes.choosing import _measured_reason
    from openrerank.runtimes.measure import Measurement, Timings

    cpuinfo("graviton3")
    one = Measurement("onnx", "fp32", Throughput(50.0, 5000.0, ((8, 128),)), lanes=1)
    torch = Measurement("torch", "fp32", Throughput(20.0, 2000.0, ((8, 128),)), lanes=1)
    reason = _measured_reason(one, [one, torch], [], Timings((one, torch), False, 1.0, "k"), True)
    assert "the fastest on ARM Neoverse-V1 r1p1 of the runtimes" in reason


@pytest.mark.parametrize("mode", ["rules", "measure"])
def test_no_thread_count_means_the_cpus_available_resolved_once_for_every_candidate(monkeypatch, cache, mode):
    """`threads` None is resolved by `create_runtime` (`default_threads`); the runtimes are given the count."""
    from openrerank.runtimes import choosing
    from openrerank.runtimes.base import Runtime

    class Built(Runtime):
        lanes = 1

        def run(self, features):
            return None

    given: list[object] = []
    products: list[str] = []

    def build(choice, network, device, threads, lanes=None, *, timing=False, gemm="default"):
        given.append(threads)
        products.append(gemm)
        return Built()

    monkeypatch.setattr(choosing, "default_threads", lambda: 3)
    monkeypatch.setattr(choosing, "_build", build)

    def not_timeable(candidates, build, **kw):
        given.append(kw["threads"])
        raise timing_passes.NotTimeableError("faked: the rule serves")

    monkeypatch.setattr(choosing, "measure_candidates", not_timeable)
    network = SimpleNamespace(path=Path("unused"), head="score")  # only `_build` (faked) would read it
    choosing.create_runtime(network, plan_runtimes("torch", "fp32", "cpu", ("torch",)), device="cpu", threads=None,
                            mode=mode)
    assert given and set(given) == {3}
    # PyTorch's fp32 products are timed (`torch_gemm`) where the choice is measured, even when the runtimes
    # could not be (the rule's runtime serves), and left as PyTorch's own where nothing may be timed.
    assert products == ["fastest" if mode == "measure" else "default"]


def test_without_onnxruntime_the_timings_are_kept(tiny_model_dir, cache, monkeypatch):
    """ONNX Runtime was planned though not installed: its ModuleNotFoundError is a cause that may pass, so the
    record was never written and every start timed every runtime again (15 s for MiniLM-L6 on 2 cores)."""
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    candidates = planned()
    assert not [c for c in candidates if c.startswith("onnx-")]
    fake_rates(monkeypatch, {c: 10.0 + i for i, c in enumerate(candidates)})
    load_model(str(tiny_model_dir)).close()
    [record] = records(cache)
    assert all("error" not in m for m in record["measurements"])
    no_timing(monkeypatch)
    again = load_model(str(tiny_model_dir))
    assert "cached from an earlier start" in again.runtime_choice.reason
    again.close()


def int8_served(monkeypatch, backend: str, rates: dict, mode: str = "measure"):
    """Plan `--backend <backend> --dtype int8` and serve it with stand-in runtimes timed at `rates` (by runtime, or
    by (runtime, lanes); one not in it refuses the model, timed or built): the choice, and the RuntimeWarnings
    said on the way."""
    from openrerank.runtimes import choosing
    from openrerank.runtimes.base import Runtime
    from openrerank.runtimes.measure import Measurement, Timings

    class Built(Runtime):
        lanes = 1

        def run(self, features):
            return None

    def build(choice, network, device, threads, lanes=None, *, timing=False, gemm="default"):
        if choice.runtime not in rates:
            raise RuntimeError("refused")
        return Built()

    def rate(runtime: str, lanes: int) -> float:
        return rates.get((runtime, lanes), rates.get(runtime))

    def timed(candidates, build, **kw):
        return Timings(tuple(Measurement(r, d, Throughput(rate(r, n), rate(r, n) * 100, ((8, 128),)), lanes=n)
                             if r in rates else Measurement(r, d, error="refused", lanes=n)
                             for r, d, n in candidates), False, 1.0, "k")

    monkeypatch.setattr(choosing, "_build", build)
    monkeypatch.setattr(choosing, "measure_candidates", timed)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        plan = plan_runtimes(backend, "int8", "cpu", ENCODERS)
        _, choice = choosing.create_runtime(SimpleNamespace(path=Path("unused"), head="score"), plan, device="cpu",
                                            threads=2, mode=mode)
    return choice, [str(w.message) for w in seen if issubclass(w.category, RuntimeWarning)]


def test_the_int8_warning_is_of_the_runtime_that_serves(cpuinfo, monkeypatch):
    """On a Zen 2 (AVX2, no VNNI) `--dtype int8` plans OpenVINO int8 first, and the warning was said of it when
    planned: "OpenVINO computes in fp32 here ... --backend onnx", while the timing served ONNX Runtime int8."""
    cpuinfo("zen2")
    for package in ("openvino_available", "nncf_available", "onnxruntime_available"):
        monkeypatch.setattr(selection, package, lambda: True)
    choice, said = int8_served(monkeypatch, "auto", {"openvino": 65.3, "onnx": 105.0})
    assert (choice.runtime, choice.dtype) == ("onnx", "int8") and said == []  # ONNX Runtime int8 pays on AVX2
    assert "int8 fails the fidelity gate" in choice.reason and "that pass the fidelity gate" not in choice.reason
    # The timing measured ONNX Runtime int8 slower here: the warning keeps what OpenVINO int8 is, and does not
    # advise "--backend onnx" (it said so, right after auto measured it as worse).
    choice, said = int8_served(monkeypatch, "auto", {"openvino": 105.0, "onnx": 65.3})
    assert choice.runtime == "openvino" and len(said) == 1 and "OpenVINO keeps int8 weights" in said[0]
    assert "--backend onnx" not in said[0] and "1.53x" not in said[0]
    assert "ONNX Runtime int8 was timed here too and was slower (65.3 against 105.0 sequences/s)" in said[0]
    choice, said = int8_served(monkeypatch, "auto", {"openvino": 65.3})  # ONNX Runtime int8 refused the model
    assert choice.runtime == "openvino" and len(said) == 1 and "OpenVINO keeps int8 weights" in said[0]
    assert "--backend onnx" not in said[0] and "does not serve this model" in said[0]
    assert "ONNX Runtime int8 refused it (refused)" in choice.reason
    # ONNX Runtime int8 with 2 lanes timed fastest and OpenVINO int8 with 1 within the tie: OpenVINO serves, and
    # the warning said ONNX Runtime int8 "does not serve this model", against the reason's own rates.
    tie = {"onnx": 60.0, ("onnx", 2): 100.0, "openvino": 90.0, ("openvino", 1): 97.0}
    choice, said = int8_served(monkeypatch, "auto", tie)
    assert (choice.runtime, choice.lanes) == ("openvino", 1) and len(said) == 1
    assert "does not serve" not in said[0] and "--backend onnx" not in said[0]
    assert "at 100.0 against 97.0 sequences/s, a tie the timing gave to the fewer lanes" in said[0]
    choice, said = int8_served(monkeypatch, "auto", {"onnx": 105.0}, mode="rules")  # OpenVINO refuses the model
    assert choice.runtime == "onnx" and said == []
    choice, said = int8_served(monkeypatch, "auto", {"openvino": 65.3, "onnx": 105.0}, mode="rules")
    assert choice.runtime == "openvino" and len(said) == 1 and "OpenVINO keeps int8 weights" in said[0]
    assert "--backend onnx" in said[0]  # nothing timed here: the measured advice stands
    choice, said = int8_served(monkeypatch, "openvino", {"openvino": 65.3})  # said when planned, not again
    assert len(said) == 1 and "OpenVINO keeps int8 weights" in said[0] and "--backend onnx" in said[0]

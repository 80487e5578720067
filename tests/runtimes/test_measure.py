"""The candidates' timings and their record (`runtimes/measure.py`; how one group of engines is timed is
test_timing_passes.py): the record (`engine-choice/`) keeps only failures that last, is used where it cannot be
written, lives under $XDG_CACHE_HOME, one of the wrong shape is timed again, and one timed under load is
provisional."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from openrerank.runtimes import artifact_cache, measure, timing_passes
from openrerank.runtimes.artifact_cache import CACHE_ENV
from openrerank.runtimes.base import Runtime
from openrerank.runtimes.measure import Timings, measure_candidates
from openrerank.runtimes.onnx_export import ExportError
from openrerank.runtimes.openvino_convert import ConversionError
from openrerank.runtimes.timing_passes import Throughput


def test_onnx_runtimes_spinning_is_part_of_the_timing_key(tiny_model_dir, monkeypatch):
    from openrerank.runtimes.onnx_runtime import SPIN_ENV

    keys = []
    for value in ("", "1", "0", "off"):
        monkeypatch.setenv(SPIN_ENV, value)
        keys.append(measure.timing_key(tiny_model_dir, "", [("onnx", "fp32", 1)], "cpu", 2, [(8, 128)])[0])
    assert keys[0] == keys[1] != keys[2] == keys[3]


def test_lanes_come_from_the_runtime_default_or_the_environment(monkeypatch):
    import pytest

    from openrerank.runtimes.base import LANES_ENV, lanes_for

    monkeypatch.delenv(LANES_ENV, raising=False)
    assert (lanes_for(8, 2), lanes_for(1, 2), lanes_for(8, 1)) == (2, 1, 1)
    monkeypatch.setenv(LANES_ENV, "3")
    assert (lanes_for(8, 1), lanes_for(2, 1)) == (3, 2)  # never more lanes than threads
    for bad in ("0", "two", "-1"):
        monkeypatch.setenv(LANES_ENV, bad)
        with pytest.raises(ValueError, match=LANES_ENV):
            lanes_for(4, 2)


def test_lane_counts_timed_are_what_the_threads_allow_or_what_the_operator_set(monkeypatch):
    from openrerank.runtimes.base import LANES_ENV, lane_counts

    monkeypatch.delenv(LANES_ENV, raising=False)
    assert (lane_counts(1), lane_counts(2), lane_counts(3), lane_counts(16)) == ((1,), (1, 2), (1, 2), (1, 2, 4))
    monkeypatch.setenv(LANES_ENV, "3")
    assert (lane_counts(8), lane_counts(2)) == ((3,), (2,))


def test_a_measurement_keeps_its_lanes_and_an_older_record_reads_as_one_lane():
    from openrerank.runtimes.measure import Measurement

    m = Measurement("onnx", "fp32", Throughput(50.0, 5000.0, ((8, 128),)), lanes=2)
    assert Measurement.from_metadata(m.as_metadata()) == m and m.as_metadata()["lanes"] == 2
    assert Measurement.from_metadata({"backend": "torch", "dtype": "fp32", "error": "x"}).lanes == 1


def test_a_measurement_names_its_runtime_and_keeps_the_records_backend_key():
    """The attribute says what it is (a runtime); the key stays "backend", as records on disk and
    /v1/metadata's `engine.measured` have it."""
    from openrerank.runtimes.measure import Measurement

    m = Measurement("onnx", "fp32", error="x")
    assert m.runtime == "onnx" and m.as_metadata()["backend"] == "onnx" and "runtime" not in m.as_metadata()


def test_the_runtime_versions_are_the_package_versions_an_absent_package_named_so(monkeypatch):
    """One helper reads package versions (`artifact_cache.package_versions`); the timing key used to carry its
    own copy, which said None where the conversions' keys say "absent"."""
    import numpy as np

    monkeypatch.setattr(measure, "RUNTIME_PACKAGES", ("numpy", "openrerank-no-such-package"))
    assert measure.runtime_versions() == {"numpy": np.__version__, "openrerank-no-such-package": "absent"}


# The runtime-timing record (`measure_candidates`, in `engine-choice/`): what it keeps, where it lives, and what
# it does not trust.

CANDIDATES = [("openvino", "fp32", 1), ("onnx", "fp32", 1), ("torch", "fp32", 1)]


class Timed(Runtime):
    input_names = ("input_ids", "attention_mask")

    def __init__(self, runtime: str) -> None:
        self.runtime = runtime

    def run(self, features) -> None:
        return None


def measure_with(model_dir, refuse: dict[str, BaseException]) -> tuple[Timings, list[str]]:
    """`measure_candidates` on fake runtimes: those named in `refuse` raise it when built; returns what was
    built and timed (timing is faked: a second per candidate is not what these tests are about)."""
    built: list[str] = []

    def build(runtime: str, dtype: str, lanes: int) -> Runtime:
        built.append(runtime)
        if runtime in refuse:
            raise refuse[runtime]
        return Timed(runtime)

    timings = measure_candidates(CANDIDATES, build, model_dir=model_dir, head="score", device="cpu", threads=1,
                                 max_length=64)
    return timings, built


@pytest.fixture
def fake_timing(tmp_path, monkeypatch):
    """A private cache, and rates by runtime (openvino 30/s, onnx 20/s, torch 10/s) instead of timing."""
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    rates = {"openvino": 30.0, "onnx": 20.0, "torch": 10.0}
    monkeypatch.setattr(timing_passes, "time_runtimes", lambda rts, shapes, vocab, seconds=1.0: [
        Throughput(rates[rt.runtime], rates[rt.runtime] * 64, tuple(shapes)) for rt in rts])
    return tmp_path / "cache" / "engine-choice"


def errors(timings: Timings) -> dict[str, str]:
    return {m.runtime: m.error for m in timings.measurements if m.error is not None}


def test_a_failure_that_may_pass_is_not_remembered(tiny_model_dir, fake_timing):
    """A corrupt cached model.onnx made ONNX Runtime fail once; the operator deleted it, and every later start
    still read "ONNX Runtime refused it" from the record and served a slower runtime."""
    corrupt = RuntimeError("[ONNXRuntimeError] : 7 : INVALID_PROTOBUF : Protobuf parsing failed.")
    out_of_disk = ExportError("could not be exported to ONNX: OSError: [Errno 28] No space left on device")
    out_of_disk.__cause__ = OSError(28, "No space left on device")
    for passing in (corrupt, OSError(5, "Input/output error"), MemoryError(), out_of_disk):
        first, _ = measure_with(tiny_model_dir, {"onnx": passing})
        assert "onnx" in errors(first) and not list(fake_timing.glob("*.json"))  # used by this start, not kept
        again, built = measure_with(tiny_model_dir, {})  # the cause is gone: ONNX Runtime is tried again
        assert not again.cached and not errors(again) and "onnx" in built
        for record in fake_timing.glob("*.json"):
            record.unlink()


def test_a_lasting_refusal_is_remembered_and_an_unmarked_one_from_an_older_record_is_not(tiny_model_dir,
                                                                                         fake_timing):
    refusal = ConversionError("unsupported operation aten::frobnicate")
    first, _ = measure_with(tiny_model_dir, {"openvino": refusal})
    assert first.measurements[0].lasting and first.ranked[0].runtime == "onnx"  # the fastest that built
    again, built = measure_with(tiny_model_dir, {})
    assert again.cached and not built and "frobnicate" in errors(again)["openvino"]  # read, nothing tried
    # A record written before failures said whether they last: its failures are not trusted.
    [path] = fake_timing.glob("*.json")
    record = json.loads(path.read_text())
    for m in record["measurements"]:
        m.pop("lasting", None)
    path.write_text(json.dumps(record))
    third, built = measure_with(tiny_model_dir, {})
    assert not third.cached and "openvino" in built and not errors(third)


@pytest.mark.parametrize("stored", [{}, [], "x", {"measurements": {}},
                                    {"measurements": [{"backend": "openvino", "dtype": "fp32", "lanes": 1,
                                                       "pairs_per_s": "fast", "tokens_per_s": 1, "shapes": []}]},
                                    {"measurements": [{"backend": "openvino", "dtype": "fp32", "lanes": 1,
                                                       "pairs_per_s": 0, "tokens_per_s": 0, "shapes": []}]}])
def test_a_record_of_the_wrong_shape_is_timed_again_and_said_once(tiny_model_dir, fake_timing, stored, caplog):
    """Valid JSON of another shape ended the start with exit 3 and a bare KeyError or TypeError."""
    measure_with(tiny_model_dir, {})
    [path] = fake_timing.glob("*.json")
    path.write_text(json.dumps(stored))
    with caplog.at_level("WARNING"):
        timings, built = measure_with(tiny_model_dir, {})
    assert not timings.cached and sorted(built) == sorted(b for b, _, _ in CANDIDATES)
    [said] = [r.getMessage() for r in caplog.records if str(path) in r.getMessage()]
    assert "is not used" in said and "computing it again" in said
    assert json.loads(path.read_text())["measurements"][0]["pairs_per_s"] == 30.0  # rewritten whole


def test_a_read_only_cache_times_once_and_serves_what_it_timed(tiny_model_dir, fake_timing, monkeypatch, caplog):
    """The documented setup (a cache volume `openrerank export` filled, mounted read-only) timed every
    candidate twice at each start: the write failed and the caller timed again."""
    def read_only(path, record):
        raise OSError(30, "Read-only file system", str(path))

    monkeypatch.setattr(artifact_cache, "write_json", read_only)
    with caplog.at_level("INFO"):
        timings, built = measure_with(tiny_model_dir, {})
    assert sorted(built) == sorted(b for b, _, _ in CANDIDATES)  # each built (and timed) once
    assert timings.ranked[0].runtime == "openvino" and not timings.cached
    [said] = [r.getMessage() for r in caplog.records if "Read-only file system" in r.getMessage()]
    assert "not cached" in said


def test_the_record_follows_xdg_cache_home(monkeypatch, tmp_path):
    """Where the ONNX and OpenVINO caches are: `$XDG_CACHE_HOME/openrerank` unless OPENRERANK_CACHE_DIR is set."""
    monkeypatch.delenv(CACHE_ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert measure.cache_dir() == tmp_path / "openrerank" / "engine-choice"
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "mine"))
    assert measure.cache_dir() == tmp_path / "mine" / "engine-choice"


def test_each_cpu_kind_times_under_its_own_key(cpuinfo, tiny_model_dir):
    """On Arm every CPU read as ('', {}): a Graviton3 read the runtime a Graviton2 had timed, from a shared cache.
    Each sample CPU, x86 or Arm, times under a key of its own, and the same CPU under the same one."""
    candidates = [("onnx", "fp32", 1)]
    facts, keys = {}, {}
    samples = ("graviton2", "graviton3", "broadwell", "zen2", "cascadelake", "icelake", "sapphirerapids", "zen5")
    for cpu in (*samples, "graviton2"):
        cpuinfo(cpu)
        key = measure.timing_key(tiny_model_dir, "", candidates, "cpu", 2, [(8, 128)])[0]
        assert keys.setdefault(cpu, key) == key
        facts[cpu] = measure.machine_facts()
    assert (facts["graviton2"]["cpu"], facts["graviton3"]["cpu"]) == ("ARM Neoverse-N1 r3p1", "ARM Neoverse-V1 r1p1")
    assert facts["cascadelake"]["cpu"] == "Intel(R) Xeon(R) Platinum 8259CL CPU @ 2.50GHz"
    assert len({f["cpu_flags_sha256"] for f in facts.values()}) == len(samples)
    assert len(set(keys.values())) == len(samples)



@pytest.fixture
def busy_timing(tmp_path, monkeypatch):
    """A private cache, made-up rates, and made-up CPU use: set `machine["others"]`, the share of the CPU (the
    one the timing's thread has) other processes use while timing (the process itself gets 90% of its time)."""
    from openrerank.runtimes import timing_load
    from openrerank.runtimes.timing_load import Usage
    from openrerank.runtimes.timing_passes import Rates

    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.setattr(timing_load, "BUSY_OTHERS", 0.25)  # the shipped value (tests/conftest.py turns it off)
    monkeypatch.setattr(measure, "load_average", lambda: 1.5)
    machine = {"others": 0.0}
    rates = {"openvino": 30.0, "onnx": 20.0, "torch": 10.0}

    def fake(rts, shapes, vocab, seconds=1.0):
        span = 2.0 * 1  # 2 s on the 1 CPU its 1 thread has (`measure_with`): the others' share is on its core
        return Rates([Throughput(rates[rt.runtime], rates[rt.runtime] * 64, tuple(shapes)) for rt in rts],
                     Usage(cpu_seconds=1.8, wall_seconds=2.0, others_seconds=machine["others"] * span, span=span,
                           cpus=1))

    monkeypatch.setattr(timing_passes, "time_runtimes", fake)
    return machine


def measure_twice_in(model_dir) -> list[tuple[Timings, list[str]]]:
    return [measure_with(model_dir, {}) for _ in range(2)]


def test_a_quiet_timing_says_so_and_is_kept(tiny_model_dir, busy_timing):
    busy_timing["others"] = 0.05
    (first, built), (again, built_again) = measure_twice_in(tiny_model_dir)
    assert built and not first.load.provisional and again.cached and not built_again
    assert (first.load.others_share, first.load.cpu_share, first.load.load_average) == (0.05, 0.9, 1.5)
    assert "other processes used 5% of the CPU meanwhile" in again.when and "load average 1.50" in again.when
    assert "provisional" not in again.when


def test_a_timing_under_load_is_provisional_and_timed_again_at_most_three_times(tiny_model_dir, busy_timing,
                                                                                  caplog):
    """Under a test run's load ONNX Runtime's 2 lanes timed at 1.31-1.69x of 1 lane (0.90x quiet), and the record
    kept that choice with no trace of the load. A host busy at every start must not time at every start."""
    from openrerank.runtimes.timing_load import PROVISIONAL_TRIES

    busy_timing["others"] = 0.5
    tries = []
    with caplog.at_level("WARNING"):
        for _ in range(PROVISIONAL_TRIES + 1):
            timings, built = measure_with(tiny_model_dir, {})
            tries.append((timings.cached, bool(built), timings.load.tries, timings.load.provisional))
    assert tries == [(False, True, 1, True), (False, True, 2, True), (False, True, 3, False), (True, False, 3, False)]
    assert "50% of the CPU meanwhile, 0.5 cores' worth on those its 1 thread ran on" in timings.when
    assert "kept (delete the record" in timings.when
    assert sum("timed under load" in r.getMessage() for r in caplog.records) == PROVISIONAL_TRIES
    busy_timing["others"] = 0.05  # a provisional record timed again on a quiet machine is kept as any
    for record in (Path(measure.cache_dir())).glob("*.json"):
        record.unlink()
    measure_with(tiny_model_dir, {})
    busy_timing["others"] = 0.5
    first, _ = measure_with(tiny_model_dir, {})
    assert first.cached and not first.load.under_load


def test_a_provisional_record_a_replica_wrote_while_this_start_waited_is_used(tiny_model_dir, busy_timing,
                                                                               monkeypatch):
    """Replicas starting together take turns on the lock: the second must read the first one's fresh timing,
    provisional or not, rather than time again behind it."""
    busy_timing["others"] = 0.5
    measure_with(tiny_model_dir, {})
    [path] = Path(measure.cache_dir()).glob("*.json")
    written = path.read_text()
    path.unlink()
    real = measure.ensure_record

    def replica_first(*args, **kwargs):  # the other replica writes its record while this start waits
        path.write_text(written)
        return real(*args, **kwargs)

    monkeypatch.setattr(measure, "ensure_record", replica_first)
    timings, built = measure_with(tiny_model_dir, {})
    assert timings.cached and not built and timings.load.provisional

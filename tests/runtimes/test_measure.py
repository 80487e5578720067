"""`time_runtimes` takes turns: a burst of other work on the machine slows every candidate a little, not one of
them a lot, so the ranking survives it (the fake runtimes' costs are sleeps: the test checks an order with a
5x margin, not a speed). The runtime-timing record (`engine-choice/`) keeps only failures that last, is used
where it cannot be written, lives under $XDG_CACHE_HOME, and one of the wrong shape is timed again."""

from __future__ import annotations

import itertools
import json
import queue
import threading
import time
from pathlib import Path

import pytest

from openrerank.runtimes import artifact_cache, measure, model_size, timing_passes
from openrerank.runtimes.artifact_cache import CACHE_ENV
from openrerank.runtimes.base import Runtime
from openrerank.runtimes.measure import Timings, measure_candidates
from openrerank.runtimes.onnx_export import ExportError
from openrerank.runtimes.openvino_convert import ConversionError
from openrerank.runtimes.timing_passes import Throughput, time_runtimes


class FakeRuntime(Runtime):
    """A runtime whose batch costs `cost` seconds, plus `extra` while the machine is busy (until `busy_until`)."""

    input_names = ("input_ids", "attention_mask")

    def __init__(self, cost: float, machine: dict) -> None:
        self.cost = cost
        self.machine = machine

    def run(self, features) -> None:
        busy = time.monotonic() < self.machine["busy_until"]
        time.sleep(self.cost + (self.machine["extra"] if busy else 0.0))


class LanedRuntime(Runtime):
    """Two lanes: each batch waits at a barrier for one on the other lane, so only batches given at once pass."""

    input_names = ("input_ids", "attention_mask")
    lanes = 2

    def __init__(self) -> None:
        self.barrier = threading.Barrier(2, timeout=10)
        self.batches = 0

    def run(self, features) -> None:
        self.barrier.wait()  # a timer running batches one after the other never gets past this
        self.batches += 1
        time.sleep(0.01)


def test_a_runtime_with_lanes_is_timed_with_its_lanes_at_once_and_credited_for_both():
    shapes = ((2, 8), (1, 16))
    laned, single = LanedRuntime(), FakeRuntime(0.01, {"busy_until": 0.0, "extra": 0.0})
    laned_rate, single_rate = time_runtimes([laned, single], shapes, 100, seconds=0.2)
    assert laned.batches % 2 == 0 and laned.batches >= 2 * len(shapes) * 2  # warm-up + passes, lanes paired
    # The same 10 ms per batch, but two at a time: about twice the rate (a 1.5x margin for scheduling noise).
    assert laned_rate.pairs_per_s > 1.5 * single_rate.pairs_per_s, (laned_rate, single_rate)


class FifoLanes(Runtime):
    """Two lanes handed out like OpenVINO's infer requests (a free one from a FIFO queue); a batch of `slow_rows`
    rows costs 20 ms, any other 1 ms. Notes which lane ran which shape."""

    input_names = ("input_ids", "attention_mask")
    lanes = 2

    def __init__(self, slow_rows: int) -> None:
        self.free: queue.SimpleQueue = queue.SimpleQueue()
        for lane in ("A", "B"):
            self.free.put(lane)
        self.slow_rows = slow_rows
        self.ran: list[tuple[str, tuple[int, int]]] = []

    def run(self, features) -> None:
        lane = self.free.get()
        try:
            shape = features["input_ids"].shape
            self.ran.append((lane, shape))
            time.sleep(0.02 if shape[0] == self.slow_rows else 0.001)
        finally:
            self.free.put(lane)


def test_the_warm_up_runs_every_shape_on_every_lane():
    """A lane compiles a shape's kernels on its own first batch of it: warmed in one mixed pass, the fast shape
    took lane A twice while B ran the slow one, and B's first fast batch fell in a timed pass."""
    shapes = ((2, 8), (1, 16))
    rt = FifoLanes(slow_rows=1)
    time_runtimes([rt], shapes, 100, seconds=0.05)
    warm_up = rt.ran[:len(shapes) * rt.lanes]
    assert set(warm_up) == {(lane, shape) for lane in "AB" for shape in shapes}, warm_up


def test_a_burst_of_other_work_does_not_decide_the_ranking():
    shapes = ((2, 8), (1, 16))

    def rank(together: bool) -> list[float]:
        machine = {"busy_until": 0.0, "extra": 0.05}
        fast, slow = FakeRuntime(0.005, machine), FakeRuntime(0.010, machine)
        machine["busy_until"] = time.monotonic() + 0.5  # a burst longer than one candidate's timing alone
        if together:
            rates = time_runtimes([fast, slow], shapes, 100, seconds=0.3)
        else:  # one after the other: the first candidate gets the whole burst
            rates = [time_runtimes([rt], shapes, 100, seconds=0.3)[0] for rt in (fast, slow)]
        return [r.pairs_per_s for r in rates]

    fast, slow = rank(together=False)
    assert fast < slow  # the control: timed alone in turn, the faster runtime ranked last
    fast, slow = rank(together=True)
    assert fast > 1.5 * slow, (fast, slow)


class Spinning(Runtime):
    """Returns at once, but leaves a thread busy for `tail` seconds after each batch, as ONNX Runtime's
    spinning intra-op workers do after a 1-lane pass."""

    input_names = ("input_ids", "attention_mask")

    def __init__(self, tail: float) -> None:
        self.tail = tail
        self.threads: list[threading.Thread] = []

    def run(self, features) -> None:
        def spin() -> None:
            end = time.perf_counter() + self.tail
            while time.perf_counter() < end:
                pass

        self.threads.append(threading.Thread(target=spin, daemon=True))
        self.threads[-1].start()

    def busy(self) -> bool:
        return any(t.is_alive() for t in self.threads)


class Working(Runtime):
    """A fixed amount of work per batch, which takes three times as long while `neighbour` has a thread busy (the
    cores are shared with it): whether it is slowed does not depend on how the OS schedules the spinning thread."""

    input_names = ("input_ids", "attention_mask")

    def __init__(self, neighbour: Spinning | None = None) -> None:
        self.neighbour = neighbour

    def run(self, features) -> None:
        time.sleep(0.004 * (3 if self.neighbour is not None and self.neighbour.busy() else 1))


def test_a_thread_left_busy_by_one_candidate_does_not_slow_the_next():
    """ONNX Runtime's 1-lane workers spin on after a pass; its 2-lane candidate, always timed next, timed at
    0.875x of 1 lane and served at 0.975x. Here the predecessor's busy thread would slow the next one 3x."""
    shapes = ((2, 8), (1, 16))
    alone, after = [], []
    for _ in range(2):  # interleaved, the best of each: a burst of other work on the machine lowers one try
        alone.append(time_runtimes([Working()], shapes, 100, seconds=0.05)[0].pairs_per_s)
        spinning = Spinning(tail=0.06)
        after.append(time_runtimes([spinning, Working(spinning)], shapes, 100, seconds=0.05)[1].pairs_per_s)
    assert max(after) > 0.8 * max(alone), (after, alone)  # 0.4-0.6 without the wait


def test_every_other_pass_runs_the_candidates_backwards_and_none_twice_in_a_row():
    from openrerank.runtimes.timing_passes import pass_order

    assert pass_order(7, 0) == list(range(7)) and pass_order(7, 1) == [5, 4, 3, 2, 1, 0, 6]
    for count in (3, 4, 7):
        runs = [i for p in range(4) for i in pass_order(count, p)]
        assert all(a != b for a, b in itertools.pairwise(runs))
        before = {(b, a) for a, b in itertools.pairwise(runs)}  # (candidate, its predecessor)
        assert all(len({p for c, p in before if c == i}) == 2 for i in range(count))
    assert pass_order(2, 1) == [0, 1] and pass_order(1, 1) == [0]


def test_settling_waits_while_the_process_works_and_no_longer_than_its_cap():
    """`settle` on a fake clock: the process's threads work (one core) until `busy_until`, then stop."""
    def fake(busy_until: float) -> tuple:
        now = [0.0]
        cpu = lambda: min(now[0], busy_until)  # noqa: E731 - one core busy until then
        return cpu, lambda: now[0], lambda s: now.__setitem__(0, now[0] + s)

    quiet = timing_passes._SETTLE_QUIET * timing_passes._SETTLE_POLL  # the polls that find the process quiet
    assert timing_passes.settle(*fake(0.0)) == pytest.approx(quiet)
    assert 0.03 + quiet <= timing_passes.settle(*fake(0.03)) <= 0.03 + quiet + timing_passes._SETTLE_POLL
    assert timing_passes.settle(*fake(10.0)) == pytest.approx(timing_passes._SETTLE_MAX, abs=timing_passes._SETTLE_POLL)


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


@pytest.mark.parametrize("config", [{"dtype": "bfloat16"}, {"torch_dtype": "bfloat16"},
                                    {"text_config": {"dtype": "float16"}}, {"dtype": "float32"}, {}])
def test_the_parameter_count_reads_the_dtype_under_either_name(tmp_path, config):
    """transformers >= 4.56 writes `dtype`, not `torch_dtype`: a bf16 Qwen3-Reranker-0.6B counted as 0.3B, and a
    bf16 LLM of 2.25-4.5B had both PyTorch candidates (fp32 and bf16) built at once, its fp32 copy 9-18 GB."""
    (tmp_path / "model.safetensors").write_bytes(b"\0" * 2_000_000)
    (tmp_path / "config.json").write_text(json.dumps(config))
    half = "16" in json.dumps(config)
    assert model_size.approximate_params(tmp_path) == (1_000_000 if half else 500_000)


def test_the_timing_charges_openvino_its_shape_grid_as_serving_does():
    """At 8x128 and 4x256 (on OpenVINO's grid) the timing padded nothing for OpenVINO, while serving DL19
    requests its batches computed ~3% more tokens than an ungridded runtime's: the timing's padding for it is
    within 2% of what the batcher's cuts cost it on a reranking request's length mix (100 passages of 40-270
    tokens, ~95 on average, as a DL19 query's BM25 top 100)."""
    from dataclasses import dataclass

    import numpy as np

    from openrerank.engine.batching import CPU_POLICY, exact_shape
    from openrerank.runtimes.openvino_runtime import bucket_shape

    @dataclass
    class Item:
        length: int

    def computed(items, shape) -> int:
        return sum(np.prod(shape(len(b), max(items[i].length for i in b))) for b in CPU_POLICY.split(items, shape))

    served = []
    for seed in range(4):
        lengths = np.random.default_rng(seed).lognormal(np.log(90), 0.35, size=100).clip(40, 270)
        items = [Item(int(n)) for n in lengths]
        served.append(computed(items, bucket_shape) / computed(items, exact_shape))
    shapes = timing_passes.timing_shapes(512)
    timed = sum(np.prod(bucket_shape(*s)) for s in shapes) / sum(r * w for r, w in shapes)
    assert timed > 1.0 and abs(timed - np.mean(served)) < 0.02, (timed, served)


# Timing under load: the record says what the machine was like, and one taken while other processes had a good
# part of the CPUs is provisional (`runtimes/timing_load.py`).


@pytest.fixture
def busy_timing(tmp_path, monkeypatch):
    """A private cache, made-up rates, and made-up CPU use: set `machine["others"]`, the share of the CPUs
    other processes use while timing (the process itself gets 90% of its threads' time)."""
    from openrerank.runtimes import timing_load
    from openrerank.runtimes.timing_load import Usage
    from openrerank.runtimes.timing_passes import Rates

    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.setattr(timing_load, "BUSY_OTHERS", 0.25)  # the shipped value (tests/conftest.py turns it off)
    monkeypatch.setattr(measure, "load_average", lambda: 1.5)
    machine = {"others": 0.0}
    rates = {"openvino": 30.0, "onnx": 20.0, "torch": 10.0}

    def fake(rts, shapes, vocab, seconds=1.0):
        span = 2.0 * 2  # 2 s on 2 CPUs
        return Rates([Throughput(rates[rt.runtime], rates[rt.runtime] * 64, tuple(shapes)) for rt in rts],
                     Usage(cpu_seconds=1.8, wall_seconds=2.0, others_seconds=machine["others"] * span, span=span))

    monkeypatch.setattr(timing_passes, "time_runtimes", fake)
    return machine


def measure_twice_in(model_dir) -> list[tuple[Timings, list[str]]]:
    return [measure_with(model_dir, {}) for _ in range(2)]


def test_a_quiet_timing_says_so_and_is_kept(tiny_model_dir, busy_timing):
    busy_timing["others"] = 0.05
    (first, built), (again, built_again) = measure_twice_in(tiny_model_dir)
    assert built and not first.load.provisional and again.cached and not built_again
    assert (first.load.others_share, first.load.cpu_share, first.load.load_average) == (0.05, 0.9, 1.5)
    assert "other processes used 5% of the CPUs meanwhile" in again.when and "load average 1.50" in again.when
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
    assert "50% of the CPUs" in timings.when and "kept (delete the record" in timings.when
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


def test_other_processes_cpu_time_is_read_for_this_process_cpus_only(tmp_path, monkeypatch):
    import os

    from openrerank.runtimes.timing_load import busy_cpu_seconds

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 2})
    stat = tmp_path / "stat"
    stat.write_text("cpu  900 0 90 0 0 0 0 0 0 0\n"
                    "cpu0 100 1 10 500 7 1 1 2 0 0\n"
                    "cpu1 400 0 40 0 0 0 0 0 0 0\n"
                    "cpu2 200 0 20 300 0 0 0 0 0 0\nintr 5\n")
    tick = os.sysconf("SC_CLK_TCK")
    assert busy_cpu_seconds(stat) == ((115 + 220) / tick, 2)
    assert busy_cpu_seconds(tmp_path / "none") is None

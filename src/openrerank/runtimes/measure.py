"""Time candidate runtimes on the model's own shapes, once per machine, model and runtime versions.

`--backend auto` serves with the runtime that is fastest on *this* machine among the faithful ones, because
CPU flags do not predict speed: on one AVX512-BF16 Xeon a bf16 GEMM ran slower than fp32 (145 against 206
GFLOP/s), on an EPYC with the same flags at 862 GFLOP/s. The candidates are built, warmed up (one pass: the
first batch of a shape compiles kernels and allocates) and timed in turns on a few batches at the lengths a
reranker serves, for about a second each (`timing_passes.time_runtimes`: in an order that changes every other
pass, each pass after the threads of the one before went quiet), then closed. The timings are a JSON record in
the converted-model cache (its `engine-choice/` folder), keyed by the CPU (its name and flags: x86's model
name, Arm's implementer and part, `devices.cpu_facts`), the thread count, whether ONNX Runtime's workers spin
(`onnx_runtime.SPIN_ENV`), the device, the model's content and
head, the candidates, the shapes and the runtime packages' versions; later starts read it, and replicas
starting together wait on the cache's lock while the first one times (`artifact_cache.ensure_record`), so a
machine times once. A record keeps a candidate's failure only when it
lasts (`base.lasting_refusal`: the model cannot be converted, or fails the fidelity gate); one for a cause that
may pass (memory, the disk, a damaged cached file) serves that start and is not written, so the next start
tries that runtime again. A record of the wrong shape is timed again, and one that cannot be written (a
read-only cache volume) serves the start that timed it. The record also says what the machine was like while
timing (`timing_load`: other processes' share of the CPUs, the process's own, the load average); one timed
while other processes had a good part of the CPUs is provisional: served by, and timed again at the next start
(at most three times in a row).

A candidate is a runtime, a precision and a lane count (`runtimes/base.lane_counts`: batches run at once,
each on its share of the threads): whether two lanes beat one depends on the CPU as much as which runtime
wins does, so each lane count of a lane-capable runtime is timed as a candidate of its own.

The winner's rate (`Throughput`, sequences and tokens per second at the timed shapes) travels with the
runtime choice, so what admits requests can size its budgets by what this runtime sustains here.

This module owns what is timed and the record: the candidates, the key (`timing_key`: the machine's facts, the
model, the versions), reading, checking and writing the record (`MEASURE_FORMAT`); how a group of runtimes is
timed is `timing_passes`', the model's size `model_size`'s, the load while timing `timing_load`'s.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from openrerank.runtimes import timing_passes
from openrerank.runtimes.artifact_cache import (
    cache_folder,
    ensure_record,
    key_of,
    model_fingerprint,
    package_versions,
)
from openrerank.runtimes.base import (
    LANES_ENV,
    Runtime,
    default_threads,
    lanes_text,
    lasting_refusal,
)
from openrerank.runtimes.devices import cpu_facts
from openrerank.runtimes.model_size import approximate_params, vocab_size_of
from openrerank.runtimes.onnx_runtime import SPIN_ENV, threads_spin
from openrerank.runtimes.timing_load import TimingLoad, Usage, load_average, provisional_before
from openrerank.runtimes.timing_passes import NotTimeableError, Rates, Throughput, timing_shapes

log = logging.getLogger(__name__)

#: Bump when what is timed or how changes, so old records are not read as new ones (2: runtimes with lanes
#: timed with their lanes at once; 3: lane counts are candidates; 4: the warm-up runs every shape on every lane;
#: 5: shapes off OpenVINO's grid, passes after the last one's threads went quiet, the load while timing
#: recorded, and OpenVINO bf16 checked against fp32 at load: a record from before ranked a bf16 the check
#: may refuse, and each start tried it twice before serving the next; 6: PyTorch fp32 on the CPU multiplies with
#: the faster of its default library and oneDNN, `torch_gemm`: on AMD Zen 5 1.5-1.9x what a record said; 7: the
#: library is kept with its rate, `Measurement.products`, which a format-6 record lacks, so it decided again at
#: every start and could serve another library than it timed).
MEASURE_FORMAT = 7
#: Candidates are built together and timed in turns (`timing_passes.time_runtimes`) while their weights,
#: counted once per candidate, stay under this many parameters (three copies of a 1.5B model); past it each
#: candidate is timed alone, so that only one copy of the weights is in memory.
_TOGETHER_MAX_PARAMS = 4.5e9
#: Packages whose versions decide a runtime's speed (absent ones count as absent).
RUNTIME_PACKAGES = ("openvino", "onnxruntime", "torch", "transformers", "nncf")


#: What is timed: (runtime, precision, lanes); a runtime without lanes has one.
Candidate = tuple[str, str, int]


@dataclass(frozen=True)
class Measurement:
    """One candidate's timing, or why it could not be timed (it failed to build or to run); `lasting`: the
    failure refuses the model for good (`base.lasting_refusal`), so a record may keep it."""

    runtime: str
    dtype: str
    throughput: Throughput | None = None
    error: str | None = None
    lanes: int = 1
    lasting: bool = False
    #: PyTorch fp32 on the CPU: the library its rate was timed with (`torch_gemm.GemmChoice.as_metadata`), which
    #: the runtime built to serve, and later starts reading the record, multiply with; None elsewhere.
    products: dict | None = None

    def as_metadata(self) -> dict:
        # "backend": the key records on disk and /v1/metadata's `engine.measured` have always had.
        out: dict = {"backend": self.runtime, "dtype": self.dtype, "lanes": self.lanes}
        if self.throughput is not None:
            out.update(self.throughput.as_metadata())
        if self.products is not None:
            out["products"] = self.products
        if self.error is not None:
            out["error"] = self.error
            out["lasting"] = self.lasting
        return out

    @classmethod
    def from_metadata(cls, meta: dict) -> Measurement:
        rate = Throughput.from_metadata(meta) if "pairs_per_s" in meta else None
        products = meta.get("products")
        if not (isinstance(products, dict) and products.get("library") in ("default", "onednn")
                and isinstance(products.get("reason"), str)):
            products = None  # absent, or not what this version writes: decided again
        return cls(meta["backend"], meta["dtype"], rate, meta.get("error"), int(meta.get("lanes", 1)),
                   meta.get("lasting") is True, products)


@dataclass(frozen=True)
class Timings:
    """Every candidate's measurement, fastest first (failures last), and where they came from."""

    measurements: tuple[Measurement, ...]
    cached: bool  # read from an earlier start's record
    seconds: float  # what timing cost (on the start that timed)
    key: str
    #: What the machine was like while timing (`timing_load`): None in records that do not say.
    load: TimingLoad | None = None

    @property
    def when(self) -> str:
        """When and how the timings were taken, as the reason says it (the start log, /v1/metadata)."""
        when = (f"timings cached from an earlier start (key {self.key})" if self.cached
                else f"timed at this start in {self.seconds:.1f}s")
        return when + (f", {self.load.text()}" if self.load is not None else "")

    @property
    def ranked(self) -> list[Measurement]:
        ok = [m for m in self.measurements if m.throughput is not None]
        return sorted(ok, key=lambda m: -m.throughput.pairs_per_s) + [m for m in self.measurements
                                                                      if m.throughput is None]


def cache_dir() -> Path:
    """`$OPENRERANK_CACHE_DIR/engine-choice` when set, else `$XDG_CACHE_HOME/openrerank/engine-choice`."""
    return cache_folder("engine-choice")


def measurements_of(record: dict, candidates: Sequence[Candidate]) -> tuple[Measurement, ...]:
    """A record's measurements, one per candidate in order; ValueError when it is not such a record (a
    hand-edited or foreign file that is valid JSON: `{}`, `"pairs_per_s": "fast"`)."""
    try:
        out = tuple(Measurement.from_metadata(m) for m in record["measurements"])
        float(record.get("seconds", 0.0))
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise ValueError(f"{type(exc).__name__}: {exc}") from exc
    if [(m.runtime, m.dtype, m.lanes) for m in out] != [tuple(c) for c in candidates]:
        raise ValueError("its measurements are not this start's candidates")
    for m in out:
        rate = m.throughput.pairs_per_s if m.throughput is not None else None
        if (rate is None) == (m.error is None) or (rate is not None and not (math.isfinite(rate) and rate > 0)):
            raise ValueError(f"{m.runtime} {m.dtype} has {'no rate or error' if rate is None else 'no usable rate'}")
    return out


def record_problem(record: dict, candidates: Sequence[Candidate]) -> str | None:
    """Why a runtime-timing record must not be used or kept, None when it may: it is not one (see
    `measurements_of`), or a candidate failed for a cause that may pass (memory, the disk, a damaged cached
    file, or a record written before failures said whether they last): remembered, it would keep that
    runtime out after the cause is gone."""
    try:
        measurements = measurements_of(record, candidates)
    except ValueError as exc:
        return f"not a runtime-timing record: {exc}"
    passing = next((m for m in measurements if m.error is not None and not m.lasting), None)
    if passing is not None:
        return (f"{passing.runtime} {passing.dtype}, {lanes_text(passing.lanes)}, failed for a cause that may "
                f"pass: {passing.error}")
    return None


def runtime_versions() -> dict[str, str]:
    """The versions of the packages that decide how fast a runtime runs ("absent": not installed)."""
    return package_versions(*RUNTIME_PACKAGES)


def machine_facts() -> dict:
    """What decides a runtime's speed on this machine besides the runtime: the CPU (each kind of x86 or Arm CPU its
    own name and flags: `devices.cpu_facts`) and the CPUs available."""
    return {**cpu_facts(), "cpus_available": default_threads()}


def _model_content(model_dir: Path) -> dict:
    """The model's content hash, and every file's name and size (pre-exported graphs are not weights)."""
    model_dir = Path(model_dir)
    files = sorted((p.name, p.stat().st_size) for p in model_dir.iterdir() if p.is_file())
    return {"model_sha256": model_fingerprint(model_dir), "files": files}


def ort_spin() -> str:
    """`OPENRERANK_ORT_SPIN` as ONNX Runtime reads it ("on"/"off"; a value that is no switch as given): spinning
    workers change ONNX Runtime's speed, so the timing key holds it."""
    try:
        return "on" if threads_spin() else "off"
    except ValueError:
        return os.environ.get(SPIN_ENV, "")


def timing_key(model_dir: Path, head: str, candidates: Sequence[Candidate], device: str, threads: int,
               shapes: Sequence[tuple[int, int]]) -> tuple[str, dict]:
    """The record's key: what decides which runtime is fastest here."""
    facts = {
        "format": MEASURE_FORMAT, **machine_facts(),
        "threads": threads, "lanes": os.environ.get(LANES_ENV), "ort_spin": ort_spin(), "device": device,
        "head": head,
        **_model_content(model_dir),
        "candidates": [list(c) for c in candidates], "shapes": [list(s) for s in shapes],
        "versions": runtime_versions(),
    }
    return key_of(facts), facts


def _products(runtime: Runtime) -> dict | None:
    """The library a timed PyTorch fp32 runtime multiplied with, where it was measured (`torch_gemm`)."""
    gemm = getattr(runtime, "gemm", None)
    return gemm.as_metadata() if gemm is not None and gemm.timed else None


def measure_candidates(candidates: Sequence[Candidate], build: Callable[[str, str, int], Runtime], *,
                       model_dir: Path, head: str, device: str, threads: int, max_length: int) -> Timings:
    """Every candidate (runtime, dtype, lanes) timed on this machine, or read from the cache when timed before.

    `build(runtime, dtype, lanes)` makes the runtime; one that raises is recorded with its error and skipped
    (and so are that runtime's other lane counts: what refuses a model is the runtime, not its lanes); when
    every one raises, the last error is raised and nothing is cached.
    """
    shapes = timing_shapes(max_length, approximate_params(model_dir))
    vocab = vocab_size_of(model_dir)
    key, facts = timing_key(model_dir, head, candidates, device, threads, shapes)
    # A provisional record there now (timed under load) is timed again; one a replica wrote while this start
    # waited on the lock is used.
    before = provisional_before(cache_dir() / f"{key}.json")
    usage = Usage()  # CPU time while timing, every group's

    def compute() -> dict:
        started = time.perf_counter()
        together = approximate_params(model_dir) * len(candidates) <= _TOGETHER_MAX_PARAMS
        results: dict[Candidate, Measurement] = {}
        refused: dict[tuple[str, str], Exception] = {}  # a runtime that failed to build, by (runtime, dtype)
        last_error: Exception | None = None

        def failed(candidate: Candidate, exc: Exception) -> None:  # hands over to the next
            nonlocal last_error
            last_error = exc
            runtime, dtype, lanes = candidate
            results[candidate] = Measurement(runtime, dtype, error=f"{type(exc).__name__}: {str(exc)[:200]}",
                                             lanes=lanes, lasting=lasting_refusal(exc))
            log.warning("%s %s, %s, could not be timed on %s: %s", runtime, dtype, lanes_text(lanes), model_dir,
                        exc)

        def timed(groups: list[list[tuple[Candidate, Runtime]]]) -> None:
            for group in groups:
                try:
                    rates = timing_passes.time_runtimes([rt for _, rt in group], shapes, vocab)
                except NotTimeableError:
                    raise  # no candidate can be timed on made-up inputs: the caller falls back to the rules
                except Exception as exc:  # one of them failed to run: time each alone, to know which
                    if len(group) == 1:
                        failed(group[0][0], exc)
                        continue
                    timed([[member] for member in group])
                    continue
                if isinstance(rates, Rates):
                    usage.add(rates.usage)
                for ((runtime, dtype, lanes), rt), rate in zip(group, rates, strict=True):
                    results[(runtime, dtype, lanes)] = Measurement(runtime, dtype, rate, lanes=lanes,
                                                                   products=_products(rt))
                    log.info("timed %s %s, %s: %.1f sequences/s, %.0f tokens/s at %s", runtime, dtype,
                             lanes_text(lanes), rate.pairs_per_s, rate.tokens_per_s, shapes)

        built: list[tuple[Candidate, Runtime]] = []
        try:
            for candidate in candidates:
                runtime, dtype, lanes = candidate
                if (runtime, dtype) in refused:
                    failed(candidate, refused[(runtime, dtype)])
                    continue
                try:
                    built.append((candidate, build(runtime, dtype, lanes)))
                except Exception as exc:
                    refused[(runtime, dtype)] = exc
                    failed(candidate, exc)
                    continue
                if not together:  # big weights: one copy in memory at a time
                    timed([built[-1:]])
                    built.pop()[1].close()
            timed([built] if built else [])
        finally:
            for _, rt in built:
                rt.close()
        measurements = [results[c] for c in candidates]
        if last_error is not None and all(m.throughput is None for m in measurements):
            raise last_error  # nothing can serve it: say why, and cache nothing (the cause may pass)
        load = TimingLoad.taken(usage, threads, load_average(), before)
        if load.under_load:
            log.warning("timing the runtimes for %s: %s", model_dir, load.text())
        return {**facts, "key": key, "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "seconds": round(time.perf_counter() - started, 2), **load.as_record(),
                "measurements": [m.as_metadata() for m in measurements]}

    def problem(record: dict) -> str | None:
        why = record_problem(record, candidates)
        if why is None and before is not None and before.is_record(record):
            why = f"provisional: other processes used {before.others_share or 0:.0%} of the CPUs while it timed"
        return why

    # A read-only cache volume (an export Job filled it) keeps nothing: the timings serve this start all the same.
    record, cached = ensure_record(cache_dir(), key, compute, "runtime timing", problem)
    return Timings(measurements_of(record, candidates), cached, float(record.get("seconds", 0.0)), key,
                   TimingLoad.of_record(record))

"""The timing passes of `--backend auto`: candidate runtimes run in turns on made-up batches, fastest pass counts.

`measure.py` decides what is timed and keeps the record; this module owns how one group of built runtimes is
timed: the shapes (`timing_shapes`, the model's own lengths), the made-up inputs (`timing_features`), one
warm-up pass each, then passes in an order that changes every other pass (`pass_order`), each after the
threads of the pass before went quiet (`settle`), and the rate each runtime sustained (`Throughput`) with the
CPU time while timing (`Rates`, read by `timing_load`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from openrerank.runtimes.base import POOLING_MASK, Runtime
from openrerank.runtimes.timing_load import Usage, busy_cpu_seconds

#: (sequences, tokens) of the timed batches for a MiniLM-sized model (about `_REFERENCE_PARAMS`), widths capped
#: at the model's window: a batch of short passages and one of long ones, the same number of tokens each
#: (what a reranking request yields). Bigger models get fewer rows (at least one), so that timing costs
#: seconds for an LLM reranker too. The widths are off OpenVINO's shape grid (`openvino_runtime.bucket_shape`
#: pads 100 to 104 and 200 to 208), about as far as served batches are: at 128 and 256 (on the grid) the timing
#: charged OpenVINO no padding, while on DL19 requests it computes ~3% more tokens than the runtimes without
#: a grid (1.054 against 1.022 per real token), a push toward OpenVINO where two runtimes are within the noise.
TIMING_SHAPES: tuple[tuple[int, int], ...] = ((8, 100), (4, 200))
_REFERENCE_PARAMS = 25e6
#: Seconds of timed passes per candidate after its warm-up pass (at least one pass, at most `_MAX_PASSES`).
TIMING_SECONDS = 1.0
_MAX_PASSES = 8
#: `settle`: the process is quiet once its threads kept less than half a core busy over two polls of 3 ms in a
#: row (two: on a busy machine a spinning thread can wait out one poll for a core); it waits at most 0.1 s (a
#: thread that never stops, e.g. another part of the process serving, is not waited for).
_SETTLE_POLL, _SETTLE_QUIET, _SETTLE_BUSY, _SETTLE_MAX = 0.003, 2, 0.5, 0.1


@dataclass(frozen=True)
class Throughput:
    """What a runtime sustained on this machine: sequences (pairs) and padded tokens per second at `shapes`."""

    pairs_per_s: float
    tokens_per_s: float
    shapes: tuple[tuple[int, int], ...]

    def as_metadata(self) -> dict:
        return {"pairs_per_s": round(self.pairs_per_s, 1), "tokens_per_s": round(self.tokens_per_s),
                "shapes": [list(s) for s in self.shapes]}

    @classmethod
    def from_metadata(cls, meta: dict) -> Throughput:
        return cls(float(meta["pairs_per_s"]), float(meta["tokens_per_s"]),
                   tuple((int(r), int(w)) for r, w in meta["shapes"]))


def timing_shapes(max_length: int, params: float = _REFERENCE_PARAMS) -> tuple[tuple[int, int], ...]:
    """TIMING_SHAPES for a model of `params` parameters, widths capped at its window (duplicates dropped)."""
    scale = min(1.0, _REFERENCE_PARAMS / max(params, 1.0))
    shapes: list[tuple[int, int]] = []
    for rows, width in TIMING_SHAPES:
        shape = (max(1, round(rows * scale)), max(2, min(width, max_length)))
        if shape not in shapes:
            shapes.append(shape)
    return tuple(shapes)


class NotTimeableError(ValueError):
    """The network takes an input the timer cannot make up (e.g. a vision model's `pixel_values`)."""


def timing_features(input_names: Sequence[str], rows: int, width: int, vocab_size: int) -> dict[str, np.ndarray]:
    """A full batch of random token ids (no padding: the timed work is all real tokens)."""
    rng = np.random.default_rng(rows * 7919 + width)
    ids = rng.integers(5, max(6, min(vocab_size, 1000)), size=(rows, width)).astype(np.int64)
    feats = {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids),
             POOLING_MASK: np.ones_like(ids)}
    unknown = [n for n in input_names if n not in feats]
    if unknown:
        raise NotTimeableError(f"its inputs {', '.join(unknown)} cannot be made up for timing")
    return {n: feats[n] for n in input_names}


def pass_order(count: int, index: int) -> list[int]:
    """The order of the candidates in timed pass `index`: as given on even passes, backwards on odd ones (from
    the last but one, the last at the end, so no candidate runs twice in a row; two can only alternate), so
    each candidate follows a different one on every other pass and the best-of has passes after each."""
    if index % 2 == 0 or count < 3:
        return list(range(count))
    return [*range(count - 2, -1, -1), count - 1]


def settle(cpu: Callable[[], float] = time.process_time, clock: Callable[[], float] = time.perf_counter,
           sleep: Callable[[float], None] = time.sleep) -> float:
    """Wait, untimed, until the process's threads have stopped working after the last pass (at most
    `_SETTLE_MAX` seconds); returns the seconds waited.

    A runtime's threads can go on burning CPU after its `run` returned: ONNX Runtime's intra-op workers spin
    (`onnx_runtime.SPIN_ENV`) for 20-30 ms of CPU after a 1-lane pass, and whichever candidate was timed next,
    always its 2-lane one in the plan's order, ran about 10% slower (timed 0.875x of 1 lane, served 0.975x).
    The process's own CPU clock counts every thread's work, so other processes do not prolong the wait."""
    started, quiet = clock(), 0
    while True:
        cpu_before, before = cpu(), clock()
        sleep(_SETTLE_POLL)
        busy = (cpu() - cpu_before) / max(clock() - before, 1e-9)  # cores the process kept busy meanwhile
        quiet = quiet + 1 if busy < _SETTLE_BUSY else 0
        if quiet >= _SETTLE_QUIET or clock() - started >= _SETTLE_MAX:
            return clock() - started


class Rates(list[Throughput]):
    """`time_runtimes`' answer: a rate per runtime, and the CPU time while timing (`timing_load.Usage`: the
    process's own, and other processes' on its CPUs), which says whether other processes had the CPUs."""

    def __init__(self, rates: Sequence[Throughput], usage: Usage) -> None:
        super().__init__(rates)
        self.usage = usage


def time_runtimes(runtimes: Sequence[Runtime], shapes: Sequence[tuple[int, int]], vocab_size: int,
                  seconds: float = TIMING_SECONDS) -> Rates:
    """Each runtime's rate on `shapes`: one warm-up pass each, then timed passes in turns (A, B, C, then
    B, A, C, ...: `pass_order`) for about `seconds` per runtime; each runtime's fastest pass counts.

    Taking turns is what makes the comparison fair on a machine that is not idle: a burst of other work
    slows a pass of every candidate instead of the whole timing of one (timed one after the other, a busy
    second once ranked ONNX Runtime at 0.36x of OpenVINO where the two serve at the same speed), and the
    fastest pass is the one least disturbed. Before each pass the process waits, untimed, for the threads of
    the pass before to go quiet (`settle`), and the order changes every other pass: a candidate is not timed
    against what its predecessor left running.

    A runtime with lanes (`Runtime.lanes`) is timed as it serves: a pass gives each lane every shape, and
    the lanes run at once. Its warm-up runs each shape on every lane at once (`lanes` copies together each
    hold a lane), because a lane's first batch of a shape may cost more (kernels compiled per stream): warmed
    in one mixed pass, a fast shape could take the same lane twice and leave that cost to a timed pass."""
    features = [[timing_features(rt.input_names, rows, width, vocab_size) for rows, width in shapes]
                for rt in runtimes]
    for rt, feats in zip(runtimes, features, strict=True):
        for f in feats:
            rt.run_all([f] * rt.lanes)
    batches = [feats * rt.lanes for rt, feats in zip(runtimes, features, strict=True)]
    best = [float("inf")] * len(runtimes)
    timed, cpu, passes = 0.0, 0.0, 0  # in the timed passes: the waits in between are not part of the budget
    busy_before, own_before, started = busy_cpu_seconds(), time.process_time(), time.perf_counter()
    while passes < _MAX_PASSES and (passes == 0 or timed < seconds * len(runtimes)):
        for i in pass_order(len(runtimes), passes):
            settle()
            cpu_before, t = time.process_time(), time.perf_counter()
            runtimes[i].run_all(batches[i])
            took = time.perf_counter() - t
            best[i], timed, cpu = min(best[i], took), timed + took, cpu + time.process_time() - cpu_before
        passes += 1
    busy_after, own, span = busy_cpu_seconds(), time.process_time() - own_before, time.perf_counter() - started
    others = (None if busy_before is None or busy_after is None
              else max(0.0, busy_after[0] - busy_before[0] - own))  # the CPUs' busy time, less the process's own
    cpus = busy_after[1] if busy_after is not None else 0  # the CPUs `others` was busy time on
    rows = sum(r for r, _ in shapes)
    tokens = sum(r * w for r, w in shapes)
    return Rates([Throughput(rows * rt.lanes / b, tokens * rt.lanes / b, tuple(shapes))
                  for rt, b in zip(runtimes, best, strict=True)],
                 Usage(cpu, timed, others, span * cpus, cpus))

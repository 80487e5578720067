"""Build the runtime that serves a model from its plan (`selection.plan_runtimes`), and say why it serves.

`--backend-choice rules`: the plan's first runtime that loads. `measure` (the default): every planned runtime
is timed here (or its cached timings read, `runtimes/measure.py`) and the fastest serves, unless one with fewer
lanes ties with it (`selection.LANES_TIE`). Either way a runtime that refuses the model hands over to the next
and the reason says so. The PyTorch runtime's fp32 CPU products follow the mode too: the faster library timed
at load under `measure` (`runtimes/torch_gemm.py`), PyTorch's own under `rules`. `--dtype int8`'s
warning is said of the runtime that serves (`selection.warn_of_int8`). What is planned, and why, is
`runtimes/selection.py`.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from collections.abc import Sequence

from openrerank.runtimes.base import Network, Runtime, default_threads, lane_counts
from openrerank.runtimes.devices import cpu_info
from openrerank.runtimes.measure import Measurement, Timings, measure_candidates
from openrerank.runtimes.selection import (
    AUTO_MODES,
    DEFAULT_AUTO_MODE,
    FIDELITY_GATE,
    LANED_RUNTIMES,
    LANES_TIE,
    RuntimeChoice,
    RuntimeConfigError,
    label,
    warn_of_int8,
)
from openrerank.runtimes.timing_passes import NotTimeableError
from openrerank.runtimes.torch_gemm import GemmChoice, bound_onednn_caches

log = logging.getLogger(__name__)


def _build(choice: RuntimeChoice, network: Network, device: str, threads: int,
           lanes: int | None = None, *, timing: bool = False, gemm: str | GemmChoice = "default") -> Runtime:
    """The runtime of `choice` on `threads` CPU threads (resolved once, in `create_runtime`); `lanes`
    (lane-capable runtimes only): how many batches at once, None for the runtime's default (`OPENRERANK_LANES`,
    else its own); `timing`: it is only timed, so it leaves no compiled blob behind (OpenVINO's are a model's
    size each); `gemm`: the PyTorch runtime's fp32 CPU products (`torch_gemm.GEMMS`: "fastest" where the
    choice is measured, PyTorch's "default" where nothing is timed; a timing's decision to keep)."""
    if choice.runtime == "openvino":
        from openrerank.runtimes.openvino_runtime import OpenVinoRuntime

        return OpenVinoRuntime(network, dtype=choice.dtype, threads=threads, lanes=lanes, compiled_cache=not timing)
    if choice.runtime == "onnx":
        from openrerank.runtimes.onnx_runtime import OnnxRuntime

        return OnnxRuntime(network, dtype=choice.dtype, threads=threads, lanes=lanes)
    from openrerank.runtimes.torch_runtime import TorchRuntime

    return TorchRuntime(network, dtype=choice.dtype, device=device, threads=threads, gemm=gemm)


def create_runtime(network: Network, plan: Sequence[RuntimeChoice], *, device: str, threads: int | None,
                   mode: str = DEFAULT_AUTO_MODE, max_length: int = 512) -> tuple[Runtime, RuntimeChoice]:
    """Build the runtime for a model's plan (`plan_runtimes`) and say which one serves and why; `threads` None:
    the CPUs this process may use (`default_threads`), resolved here once for every candidate.

    `mode="measure"`: every planned runtime is timed on this machine (or its cached timings read) and the
    fastest serves; with a single planned runtime (an explicit `--backend`) it is timed too, for its
    throughput. `mode="rules"`: the plan's first that loads, nothing timed. Either way a runtime that
    refuses the model (OpenVINO cannot convert it, ONNX cannot export it) hands over to the next and the
    reason says so; when every one fails, the last one's error is raised.
    """
    if mode not in AUTO_MODES:
        raise RuntimeConfigError(f"unknown backend choice {mode!r}; choose one of {', '.join(AUTO_MODES)}")
    plan = list(plan)
    # Before any candidate is built: an ONNX export or OpenVINO conversion traces the model in PyTorch, whose
    # first oneDNN product (a GELU) fixes the cache size for the process (`load_model` outside the CLI, Ray
    # Serve's own replicas).
    bound_onednn_caches()
    runtime, choice = _create(network, plan, device, threads or default_threads(), mode, max_length)
    gemm = getattr(runtime, "gemm", None)  # the PyTorch runtime's fp32 products (`torch_gemm`), where timed
    if gemm is not None and gemm.timed:
        choice = dataclasses.replace(choice, products=gemm.as_metadata())
    if len(plan) > 1:  # a plan of one warned when it was made (`plan_runtimes`), before the server bound
        warn_of_int8(choice)
    return runtime, choice


def _create(network: Network, plan: list[RuntimeChoice], device: str, threads: int, mode: str,
            max_length: int) -> tuple[Runtime, RuntimeChoice]:
    """`create_runtime`'s choice, before anything is said of it."""
    if mode == "rules":
        return _first_that_loads(plan, network, device, threads, gemm="default")
    by_key = {(c.runtime, c.dtype): c for c in plan}
    counts = lane_counts(threads)
    candidates = [(r, d, n) for r, d in by_key for n in (counts if r in LANED_RUNTIMES else (1,))]

    def build(runtime: str, dtype: str, lanes: int, timing: bool = False,
              gemm: str | GemmChoice = "fastest") -> Runtime:
        return _build(by_key[(runtime, dtype)], network, device, threads,
                      lanes if runtime in LANED_RUNTIMES else None, timing=timing, gemm=gemm)

    try:
        timings = measure_candidates(candidates, functools.partial(build, timing=True), model_dir=network.path,
                                     head=network.head, device=device, threads=threads,
                                     max_length=max_length)
    except NotTimeableError as exc:  # e.g. a vision-language model: the rule's choice, and say why
        log.info("runtimes for %s not timed (%s): the rule-based choice serves", network.path, exc)
        return _first_that_loads(plan, network, device, threads, gemm="fastest")
    ranked = timings.ranked
    # What refuses a model is the runtime, whatever its lanes: one line each.
    refused = list(dict.fromkeys(f"{label(m.runtime, m.dtype)} refused it ({m.error})" for m in ranked
                                 if m.throughput is None))
    failed: list[str] = []
    timed = [m for m in ranked if m.throughput is not None]
    if not timed:  # a stale record of failures only (a fresh one is never written): let the runtime say why
        return _first_that_loads(plan, network, device, threads, gemm="fastest")
    fastest, timed = timed[0], _serving_order(timed)
    for i, m in enumerate(timed):
        try:
            runtime = build(m.runtime, m.dtype, m.lanes, gemm=_timed_products(m))
        except Exception as exc:
            if i == len(timed) - 1:
                raise
            failed.append(f"{_label(m)} failed to load ({type(exc).__name__}: {str(exc)[:200]})")
            log.warning("%s could not serve %s: %s; trying %s", _label(m), network.path, exc, _label(timed[i + 1]))
            continue
        tied = m is timed[0] and m is not fastest  # fewer lanes, within LANES_TIE of the fastest
        reason = _measured_reason(m, timed, refused + failed, timings, len(plan) > 1, fastest if tied else None)
        return runtime, RuntimeChoice(m.runtime, m.dtype, reason, "measure", tuple(ranked), m.throughput,
                                      runtime.lanes)
    raise AssertionError("unreachable: the timed list is never empty")


def _label(m: Measurement) -> str:
    return label(m.runtime, m.dtype, m.lanes)


def _rate(m: Measurement) -> float:
    return m.throughput.pairs_per_s if m.throughput is not None else 0.0


def _serving_order(timed: list[Measurement]) -> list[Measurement]:
    """The timed candidates (fastest first) in the order they are tried: the fastest, unless one with fewer
    lanes is within `LANES_TIE` of it; then the fastest of those with the fewest lanes goes first."""
    tied = [m for m in timed if _rate(m) >= _rate(timed[0]) * (1 - LANES_TIE)]
    first = min(tied, key=lambda m: (m.lanes, -_rate(m)))
    return [first, *(m for m in timed if m is not first)]


def _measured_reason(winner: Measurement, timed: list[Measurement], refused: list[str], timings: Timings,
                     compared: bool, tied_with: Measurement | None = None) -> str:
    """Why the winner serves, with every candidate's rate, as the startup log and /v1/metadata show it;
    `tied_with`: the faster candidate it serves instead of (`LANES_TIE`)."""
    assert winner.throughput is not None
    best = winner.throughput.pairs_per_s
    shapes = " and ".join(f"{r}x{w}" for r, w in winner.throughput.shapes)
    rates = ", ".join(f"{_label(m)} {_rate(m):.1f}/s" + ("" if m is winner else f" ({_rate(m) / best:.2f}x)")
                      for m in sorted(timed, key=lambda m: -_rate(m)))
    when = timings.when  # cached or timed now, and what the machine was like while timing
    cpu = cpu_info()[0] or "this CPU"
    lane_counts_timed = len({m.lanes for m in timed if m.runtime == winner.runtime and m.dtype == winner.dtype})
    fewer = ", with fewer lanes, so a lone small request keeps every thread"
    tie = "" if tied_with is None else f"within {LANES_TIE:.0%} of the fastest ({_label(tied_with)})"
    if compared:
        # int8 is planned only when asked for: it fails the gate (runtimes/selection.py), so no reason claims it.
        gate = (f"of the runtimes that pass the fidelity gate ({FIDELITY_GATE})" if winner.dtype != "int8" else
                "of the int8 runtimes, asked for with --dtype int8 (int8 fails the fidelity gate, "
                f"{FIDELITY_GATE}, so auto serves it only when asked)")
        what = f"the fastest on {cpu} {gate}" if not tie else f"on {cpu}, {tie} {gate}{fewer}"
    elif tie:
        what = f"the one runtime asked for, {tie}{fewer}"
    else:
        what = "the one runtime asked for" + (", at its fastest lane count" if lane_counts_timed > 1 else "")
    parts = [f"{what}: sequences/s on {shapes}-token batches: {rates}; {when}"]
    if refused:
        parts.append("; ".join(refused))
    return "; ".join(parts)


def _timed_products(m: Measurement) -> str | GemmChoice:
    """The library the timing multiplied PyTorch fp32 with, so that what serves runs at the rate it was timed at
    (the timing's own build decided it; deciding again could come out the other way on a busy host)."""
    return GemmChoice(m.products["library"], m.products["reason"]) if m.products else "fastest"


def _first_that_loads(plan: list[RuntimeChoice], network: Network, device: str, threads: int,
                      gemm: str) -> tuple[Runtime, RuntimeChoice]:
    """The rule-based choice: the plan's first runtime that loads (`gemm` as `_build` takes it)."""
    refused: list[str] = []
    for i, choice in enumerate(plan):
        try:
            runtime = _build(choice, network, device, threads, gemm=gemm)
        except Exception as exc:
            if i == len(plan) - 1:
                raise
            refused.append(f"{choice.label} refused it ({type(exc).__name__}: {str(exc)[:200]})")
            log.warning("%s could not serve %s: %s; trying %s", choice.label, network.path, exc, plan[i + 1].label)
            continue
        reason = f"{'; '.join(refused)}; so {choice.reason}" if refused else choice.reason
        return runtime, RuntimeChoice(choice.runtime, choice.dtype, reason, lanes=runtime.lanes)
    raise AssertionError("unreachable: the plan is never empty")

"""What every runtime shares: a family's network as the runtimes need it, padded features, runtime failures.

A *runtime* (OpenVINO, ONNX Runtime, PyTorch) runs a family's network on padded numpy features and returns
one float32 row per sequence. It knows nothing of HTTP, dialects, batching policy or which model family it
runs: a family describes its network as a `Network`, and the runtimes build, export and run that. The
per-family *scorer* that turns work items into scores on top of a runtime is `families/scorer.py`.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from openrerank.core.cpus import available_cpus

#: A count, or an integer array of them (`Runtime.padded_shape` answers for many batches at once).
IntOrArray = int | np.ndarray
#: An input a pooling network may take beside the attention mask: 1 where a token is pooled. It is the attention
#: mask with each row's first `pooled_from` tokens zeroed (a prompt that sentence-transformers' Pooling leaves
#: out, `include_prompt: false`); those tokens are still attended to.
POOLING_MASK = "pooling_mask"


@dataclass(frozen=True)
class NetworkBuild:
    """How a runtime wants the torch module: precision, device, and whether it is for an ONNX export."""

    dtype: str = "fp32"  # fp32 | bf16 | fp16 (weights); CPU bf16 keeps fp32 weights under autocast
    device: str = "cpu"
    export: bool = False  # eager attention, traceable code paths


@dataclass(frozen=True)
class Network:
    """A family's network as the runtimes need it.

    `build` returns a `torch.nn.Module` with an `input_names` tuple attribute, whose `forward` takes those
    inputs positionally (int64 tensors, right-padded) and returns one float tensor with one row per sequence:
    scores `(batch,)`, logits `(batch, labels)` or pooled embeddings `(batch, hidden)`.
    """

    path: Path  # the model directory; its files' hashes key the ONNX cache
    head: str  # what the module computes, e.g. "cross-encoder:logits"; part of every cache key
    build: Callable[[NetworkBuild], Any]
    output: str = "scores"  # the ONNX output's name
    fusion: str | None = None  # onnxruntime transformer-optimizer model type ("bert"); None: no fusion recipe
    #: Which version of the family's build code made the graph (`Family.build_format`): keys every converted model
    #: and is recorded in a pre-exported directory, so a graph built by code with other checks is never served.
    build_format: int = field(kw_only=True)


def pad_features(
    seqs: Sequence[list[int]],
    type_seqs: Sequence[list[int] | None] | None,
    pad_id: int,
    input_names: Sequence[str],
    pooled_from: Sequence[int] | None = None,
) -> dict[str, np.ndarray]:
    """Right-pad token id lists into the int64 arrays a transformer takes.

    Right padding keeps every real token at the positions it has alone (position ids count from 0), so a
    sequence scores the same whatever it is batched with, within the rounding of the kernels' sums (which add
    up by the batch's shape: ~1e-7 in fp32, ~1e-3 in bf16); readouts find the last real token by the mask.
    A network that takes `POOLING_MASK` gets it too: each row's tokens from `pooled_from[row]` on (all: None).
    """
    width = max(len(s) for s in seqs)
    n = len(seqs)
    ids = np.full((n, width), pad_id, dtype=np.int64)
    mask = np.zeros((n, width), dtype=np.int64)
    types = np.zeros((n, width), dtype=np.int64)
    for row, seq in enumerate(seqs):
        ids[row, : len(seq)] = seq
        mask[row, : len(seq)] = 1
        if type_seqs is not None and type_seqs[row] is not None:
            types[row, : len(seq)] = type_seqs[row]
    feats = {"input_ids": ids, "attention_mask": mask}
    if "token_type_ids" in input_names:
        feats["token_type_ids"] = types
    if POOLING_MASK in input_names:
        pooled = mask.copy()
        for row, skip in enumerate(pooled_from or ()):
            pooled[row, :skip] = 0
        feats[POOLING_MASK] = pooled
    return feats


def probe_features(input_names: Sequence[str], vocab_size: int) -> dict[str, np.ndarray]:
    """A small padded batch to trace a network on and to check a conversion against PyTorch.

    Padded on purpose: with an all-ones mask transformers may drop the mask, and a trace would bake that in.
    """
    rng = np.random.default_rng(0)
    ids = rng.integers(5, max(6, min(vocab_size, 1000)), size=(3, 17)).astype(np.int64)
    mask = np.ones_like(ids)
    mask[1, 11:] = 0
    mask[2, 5:] = 0
    ids[mask == 0] = 0
    pooled = mask.copy()
    pooled[0, :3] = pooled[1, :1] = pooled[2, :2] = 0  # a prompt left out of the pooling, of several lengths
    feats = {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids), POOLING_MASK: pooled}
    return {n: feats[n] for n in input_names}


class ModelRefusedError(RuntimeError):
    """A runtime cannot serve this model, whatever the machine's state: the conversion or export cannot be
    done, or its result fails the fidelity gate. Only such a refusal is worth remembering (`measure`); a
    failure with any other cause (memory, the disk, a damaged cached file) may pass."""


def lasting_refusal(exc: BaseException) -> bool:
    """Whether `exc` refuses the model for good: a `ModelRefusedError` not caused by an OSError or a shortage of
    memory, threads or file handles (`out_of_resources`; an export that ran out of disk is wrapped as an export
    error too, and a converter's native "Failed to allocate" is a RuntimeError)."""
    if not isinstance(exc, ModelRefusedError):
        return False
    seen: set[int] = set()
    cause: BaseException | None = exc
    while cause is not None and id(cause) not in seen:
        if isinstance(cause, (OSError, MemoryError, DeviceMemoryError)) or out_of_resources(cause):
            return False
        seen.add(id(cause))
        cause = cause.__cause__ or cause.__context__
    return True


class DeviceMemoryError(RuntimeError):
    """One sequence alone does not fit in the device's memory: its request cannot be scored as sent."""


class HostMemoryError(DeviceMemoryError):
    """A runtime on the CPU could not allocate the memory a batch needs (`out_of_memory`): the host's memory, which
    other batches, requests and processes hold too, so a shortage of the moment rather than the request's fault.
    Answered as `DeviceMemoryError` is (503), with a Retry-After (`retry_after` seconds)."""

    retry_after = 1.0

    @classmethod
    def scoring(cls, description: str, rows: int, width: int, cause: BaseException) -> HostMemoryError:
        """The error for a (rows x width) batch that `cause` (a runtime's native allocation failure) stopped."""
        return cls(f"out of host memory scoring a batch of {rows} x {width} tokens on {description} "
                   f"({native_reason(cause)}); retry later")


#: How a failed allocation reads in a runtime's native errors, which reach Python as RuntimeError (OpenVINO) or
#: ONNX Runtime's own exception types, with only their text to tell them apart: OpenVINO's CPU plugin "Failed to
#: allocate 33554432 bytes of memory", ONNX Runtime's arena "Failed to allocate memory for requested buffer of
#: size 603979776" (both seen under `prlimit --as`), a C++ std::bad_alloc, the C library's ENOMEM text.
_ALLOCATION_FAILED = re.compile(r"failed to allocate|bad_alloc|bad allocation|cannot allocate memory", re.IGNORECASE)
#: The same for threads and file handles: EAGAIN's text (a thread the runtime could not start under a low
#: `ulimit -u`), CPython's own, EMFILE's.
_RESOURCES_SHORT = re.compile(r"resource temporarily unavailable|can't start new thread|too many open files",
                              re.IGNORECASE)
_SHORT_ERRNOS = frozenset({errno.ENOMEM, errno.EAGAIN, errno.EMFILE, errno.ENFILE})


def out_of_memory(exc: BaseException) -> bool:
    """Whether `exc` is a failed allocation: a MemoryError, ENOMEM, or a runtime's native error saying so."""
    if isinstance(exc, MemoryError) or (isinstance(exc, OSError) and exc.errno == errno.ENOMEM):
        return True
    return bool(_ALLOCATION_FAILED.search(str(exc)))


def out_of_resources(exc: BaseException) -> bool:
    """Whether `exc` says the machine ran short of memory, threads or file handles: a passing state of the host
    (other processes, limits), never a fault of a model's files or a request's input."""
    if out_of_memory(exc) or (isinstance(exc, OSError) and exc.errno in _SHORT_ERRNOS):
        return True
    return bool(_RESOURCES_SHORT.search(str(exc)))


def native_reason(exc: BaseException) -> str:
    """The part of a native error that says what ran short ("Failed to allocate N bytes of memory"), up to its
    line's end: OpenVINO and ONNX Runtime put source locations and node names first."""
    text = str(exc)
    found = _ALLOCATION_FAILED.search(text) or _RESOURCES_SHORT.search(text)
    if found is None:
        return f"{type(exc).__name__}: {text.strip()[:200]}" if text.strip() else type(exc).__name__
    end = text.find("\n", found.start())
    return text[found.start(): end if end >= 0 else None].strip()[:200]


class RowsFailedError(RuntimeError):
    """Part of a batch could not be scored; the rest was.

    `outputs` holds one row per input row (NaN where the row failed), `failed` the indices of the rows
    that failed even alone, `cause` why. Runtimes raise it instead of failing the whole batch, so the
    scheduler can fail only the requests those rows belong to.
    """

    def __init__(self, outputs: np.ndarray, failed: Sequence[int], cause: BaseException) -> None:
        super().__init__(f"{len(failed)} of {len(outputs)} sequences could not be scored: {cause}")
        self.outputs = outputs
        self.failed = list(failed)
        self.cause = cause

    def with_outputs(self, outputs: np.ndarray) -> RowsFailedError:
        """The same failure over transformed outputs (e.g. logits turned into scores)."""
        return RowsFailedError(outputs, self.failed, self.cause)


def default_threads() -> int:
    """CPUs this process may use (its affinity set: taskset, a cpuset or a Ray replica's binding; capped by a
    container's CPU quota, `core/cpus.py`), the thread count every runtime defaults to."""
    return available_cpus()


#: Batches a lane-capable runtime runs at once, each on its share of the threads (`lanes_for`); unset: timed
#: (`lane_counts`) where `--backend-choice measure` chooses, else the runtime's own default (OpenVINO 2, ONNX
#: Runtime 1: docs/engine.md, "Lanes").
LANES_ENV = "OPENRERANK_LANES"
#: Lane counts timed for a lane-capable runtime when `OPENRERANK_LANES` is unset (`lane_counts`).
TIMED_LANES = (1, 2, 4)


def lanes_for(threads: int, default: int, lanes: int | None = None) -> int:
    """How many batches a lane-capable runtime runs at once with `threads` threads in all: `lanes` if given
    (the measured choice), else `OPENRERANK_LANES` if set, else the runtime's `default`; never more than one
    lane per thread."""
    if lanes is not None:
        return max(1, min(lanes, threads))
    raw = os.environ.get(LANES_ENV, "").strip()
    if not raw:
        return max(1, min(default, threads))
    try:
        lanes = int(raw)
    except ValueError:
        lanes = 0
    if lanes < 1:
        raise ValueError(f"{LANES_ENV}={raw!r}: expected a whole number of lanes >= 1")
    return max(1, min(lanes, threads))


def lanes_text(lanes: int) -> str:
    """"1 lane", "2 lanes": how logs, labels and the bench name a lane count."""
    return f"{lanes} lane{'' if lanes == 1 else 's'}"


def lane_counts(threads: int) -> tuple[int, ...]:
    """The lane counts to time for a lane-capable runtime on `threads` threads: `OPENRERANK_LANES` alone when
    set, else each of `TIMED_LANES` the threads allow. Whether two batches at once beat one on all the threads
    depends on the CPU (how wide its matrix units are, how its cores share caches), so it is measured too."""
    if os.environ.get(LANES_ENV, "").strip():
        return (lanes_for(threads, 1),)
    return tuple(n for n in TIMED_LANES if n <= max(1, threads))


class Computed:
    """What a runtime computed while it was tallied (`tally_computed`): every forward pass's tokens as the
    runtime ran them (rows x width after its own padding: OpenVINO's buckets) and the real tokens among them
    (the attention mask's ones). The padding metrics read it, so they show what ran, not what the items ask."""

    __slots__ = ("real", "runs", "tokens")

    def __init__(self) -> None:
        self.runs = 0
        self.tokens = 0
        self.real = 0


_TALLY = threading.local()


@contextlib.contextmanager
def tally_computed() -> Iterator[Computed]:
    """Tally what the runtimes compute on this thread inside the block (a runtime's `run` computes on the
    thread that calls it). Outside one, `computed` costs an attribute lookup."""
    tally, outer = Computed(), getattr(_TALLY, "current", None)
    _TALLY.current = tally
    try:
        yield tally
    finally:
        _TALLY.current = outer


def computed(rows: int, width: int, mask: Any) -> None:
    """What a runtime calls for each forward pass it ran: `rows` x `width` as it computed them, `mask` the
    attention mask it was given (numpy or torch; its ones are the real tokens; None: every token is real).
    Counted only inside `tally_computed`, so the mask is summed only when someone reads it."""
    tally = getattr(_TALLY, "current", None)
    if tally is not None:
        tally.runs += 1
        tally.tokens += int(rows) * int(width)
        tally.real += int(rows) * int(width) if mask is None else int(mask.sum())


class Runtime(ABC):
    """Runs a network on padded features; returns its output as float32, one row per sequence."""

    #: Feature names the network takes, in order (`token_type_ids` only where the model uses it).
    input_names: tuple[str, ...]
    #: Short description for logs, metrics and /v1/metadata, e.g. "torch-fp32-cpu".
    description: str
    #: Batches `run` may be given at once from different threads, each on its own share of the threads.
    lanes: int = 1
    #: CPU threads it computes on, all lanes together (None on a GPU).
    threads: int | None = None

    @abstractmethod
    def run(self, features: dict[str, np.ndarray]) -> np.ndarray:
        """The network's output for `features`; each forward pass it runs is reported to `computed`."""

    def padded_shape(self, rows: IntOrArray, width: IntOrArray) -> tuple[IntOrArray, IntOrArray]:
        """The shape `run` computes for a (rows x width) batch; a runtime that pads to a grid says so here, so
        the batcher cuts along the grid instead of paying for padding twice. Elementwise on integer arrays
        too: the batcher asks for all its candidate batches at once."""
        return rows, width

    def run_all(self, batches: Sequence[dict[str, np.ndarray]]) -> list[np.ndarray]:
        """Every batch's output, up to `lanes` of them running at once (timing uses it; the scheduler has
        its own lanes, `engine/worker.py`)."""
        if self.lanes <= 1 or len(batches) <= 1:
            return [self.run(b) for b in batches]
        with ThreadPoolExecutor(self.lanes, thread_name_prefix="lane") as pool:
            return list(pool.map(self.run, batches))

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release native resources."""

"""OpenVINO runtime: the fastest CPU runtime for encoder families (fp32, bf16, or NNCF int8).

The IR is converted once and cached by `openrerank.runtimes.openvino_convert`; this class compiles it for
the CPU with:

- `INFERENCE_PRECISION_HINT`: `f32` for fp32 (exact fp32 kernels; OpenVINO's CPU default on a
  bf16-capable CPU would otherwise be bf16) and for the non-matmul parts of int8 (whose int8-weight matrix
  products quantize their activations dynamically), `bf16` for bf16 (matrix products in bf16 on
  AVX512-BF16/AMX, accumulation in fp32);
- `INFERENCE_NUM_THREADS` = `--threads` (default: the cores available), split over `lanes` streams
  (`runtimes/base.lanes_for`: as `--backend auto` measured, else `OPENRERANK_LANES`, else `DEFAULT_LANES`):
  one infer request per stream, so the scheduler's lanes each run a batch at once on their share of the
  threads;
- `ENABLE_CPU_PINNING` off: OpenVINO otherwise pins its worker threads to cores chosen without regard to
  other processes, so two servers on one host (replicas, containers, pods) pin to the same core while
  another idles (measured: two one-thread servers on a 2-core VM both on core 0, `--replicas 2` at 0.91-1.05x
  of one replica). Unpinned, the kernel's scheduler spreads them over the process's affinity set;
- `CACHE_DIR`: OpenVINO's compiled-model cache, so a restart skips kernel compilation (compiled under the
  cache directory's lock: OpenVINO writes the blob in place, so replicas take turns; left out where the
  cache directory is read-only, e.g. a volume an export job filled: each start then compiles). One folder
  per kind of CPU, and in it one per compile configuration (`openvino_blobs`, which also drops the
  blobs nothing reads any more): the CPU plugin names a blob by the model and the device alone (its
  `CACHING_PROPERTIES` are only `FULL_DEVICE_NAME`, the CPUID brand string, generic on many VMs), so in one
  folder every configuration of an IR (fp32 or bf16, threads, streams) imported whichever blob was written
  first, and on a shared volume so would every kind of CPU with the same brand string. On an AMX Xeon a
  bf16 compile that imported an fp32 blob crashed in `infer` (glibc "double free or corruption"); with a
  fresh cache the same start served. Candidates that `--backend auto` only times compile without it
  (`compiled_cache=False`): a blob per timed configuration would cost disk (a model's size each) for
  nothing; the one that serves compiles once more, with it (on the start that times; later starts read the
  timings and import its blob).

- **shape buckets**: OpenVINO's CPU plugin builds and keeps kernel code for every input shape it meets (a
  dynamic-shape model; openvinotoolkit/openvino#20633, #23316), so a server fed the endless variety of
  (pairs x longest pair) batches grew ~25 MiB a minute under steady load and never stopped
  (`CPU_RUNTIME_CACHE_CAPACITY=0` does not bound it). `run` pads each batch up to a bucket
  (`bucket_shape`: widths and rows rounded up on a grid at most 1/8 (widths) or 1/4 (rows) coarser than
  the shape itself), so the shapes, and the memory they hold, are finite. `padded_shape` tells the batcher,
  which then cuts along the grid (`engine/batching.py`) instead of padding pairs twice. Extra columns carry a
  zero attention mask (no real token attends to them) and extra rows repeat the first (a real sequence, so
  no all-masked row); both are cut from the output. The bucket's shape is what `run` reports as computed
  (`base.computed`), so the padding metrics count the bucket's padding too.

A pre-exported directory (`openrerank export --out DIR`: model.onnx + export.json) is compiled from its
ONNX graph as it is, without PyTorch (`openvino_convert.pre_exported_onnx`).

Inputs stay int64 (what the IR was traced with) and are handed over without a copy.

The process's first inference runs alone (`FirstCallAlone`): OpenVINO's Python bindings build tables on first
use that deadlock when two threads build them at once, which two lanes' first batches did.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from openrerank.runtimes.artifact_cache import CachedArtifact, open_cached, package_versions
from openrerank.runtimes.base import (
    HostMemoryError,
    IntOrArray,
    Network,
    Runtime,
    computed,
    lanes_for,
    out_of_memory,
)
from openrerank.runtimes.openvino_blobs import (
    CompiledBlob,
    compiled_cache_dir,
    compiled_config_dir,
    compiling,
    discard,
    model_of,
    writable,
)
from openrerank.runtimes.openvino_convert import (
    META_FILE,
    ConversionError,
    ensure_openvino,
    import_openvino,
    pre_exported_onnx,
    probe_batch,
    recorded_reference,
)

log = logging.getLogger(__name__)

OPENVINO_DTYPES = ("fp32", "bf16", "int8")
_PRECISION = {"fp32": "f32", "bf16": "bf16", "int8": "f32"}


#: Streams (lanes) where nothing measured them (`--backend-choice rules`): two batches at once, each on half the
#: threads, beat one batch on all of them on the encoders' small matrices (fewer threads meet at each operation's
#: barrier, and one stream's single-threaded parts overlap the other's matrix products). Measured on a 2-core EPYC:
#: 1.08-1.13x the pairs/s on DL19 requests, 0.90-0.97x the latency of requests of 4-100 passages, 1.5x that of a
#: one-passage request (one row cannot be shared by two lanes): docs/engine.md, "Lanes".
DEFAULT_LANES = 2


class FirstCallAlone:
    """Lets the process's first inference run alone, later ones at once.

    `InferRequest.infer` converts element types to numpy dtypes through a table the bindings build on first
    use (a function-local static), and building it initializes pybind11's numpy API, which lets go of the GIL
    midway. A second thread entering then holds the GIL and waits on the table's guard, while the first waits
    for the GIL inside it: both stop for good. A server whose two lanes started warm-up together hung before
    ready (openvino 2026.4; both threads' stacks in `to_dtype`, at `data_dispatcher.py`); 8 threads calling
    `ov.Type.f32.to_dtype()` at once in a fresh process hung 2 times in 12. Once one call has been through,
    every table on the path is built and calls run at once."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._done = False

    @contextlib.contextmanager
    def __call__(self) -> Iterator[None]:
        if not self._done:
            with self._lock:
                if not self._done:
                    yield
                    self._done = True
                    return
        yield


#: One per process: the tables it guards are the bindings' own, shared by every runtime.
FIRST_CALL = FirstCallAlone()


def compile_config(dtype: str, threads: int, compiled_dir: Path | None = None, lanes: int = 1) -> dict:
    """How the CPU plugin compiles a model to serve (see the module docstring); `compiled_dir`: the compiled-
    model cache's root, under which this kind of CPU's blobs of this configuration get a folder of their own."""
    config = {
        "INFERENCE_PRECISION_HINT": _PRECISION[dtype],
        "INFERENCE_NUM_THREADS": threads,
        "NUM_STREAMS": lanes,
        "PERFORMANCE_HINT": "LATENCY",
        "ENABLE_CPU_PINNING": False,  # pinned threads of two processes collide (module docstring)
    }
    if compiled_dir is not None:
        config["CACHE_DIR"] = str(compiled_config_dir(compiled_dir, config))
    return config


def bucket(n: IntOrArray, fine: int) -> IntOrArray:
    """`n` rounded up to a grid of `fine` steps per doubling (exact up to `fine`): 1/fine at most added.
    Elementwise on an integer array too (the batcher weighs many candidate batches at once)."""
    bits = np.frexp(np.asarray(n) - 1)[1]  # (n - 1).bit_length(), exact below 2**53
    step = np.left_shift(1, np.maximum(0, bits - fine.bit_length()))
    rounded = -(-n // step) * step
    return rounded if isinstance(n, np.ndarray) else int(rounded)


#: Steps per doubling: widths 8 (<= 12.5% padding), rows 4 (<= 25%; the batcher counts both when it cuts).
WIDTH_STEPS, ROW_STEPS = 8, 4


def bucket_shape(rows: IntOrArray, width: IntOrArray) -> tuple[IntOrArray, IntOrArray]:
    """The shape a (rows x width) batch is padded to: one of a finite set (module docstring)."""
    return bucket(rows, ROW_STEPS), bucket(width, WIDTH_STEPS)


def pad_to_bucket(features: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Features padded to their bucket: zero-masked columns on the right, copies of row 0 below."""
    rows, width = features["attention_mask"].shape
    to_rows, to_width = bucket_shape(rows, width)
    if (to_rows, to_width) == (rows, width):
        return features
    padded = {}
    for name, values in features.items():
        out = np.zeros((to_rows, to_width), dtype=values.dtype)
        out[:rows, :width] = values
        out[rows:, :width] = values[0]
        padded[name] = out
    return padded


#: How far a bf16 compile's outputs on the probe batch may be from fp32 (`bf16_error`: the largest difference
#: over the largest fp32 output). bf16 rounds each matrix product's inputs to 8 significant bits, so an honest
#: compile is off by up to a few hundredths. Measured on an AMD EPYC (Zen 4, AVX512-BF16), openvino 2026.4 and
#: transformers 5.25: the MiniLM-L6 cross-encoder 0.024, the default bi-encoder 0.0053, the tests' tiny
#: cross-encoders 0.0026-0.0046 and bi-encoders 0.00006 (openvino 2025.3 and transformers 4.56: the tiny ones
#: 0.0093-0.0099). A broken compile is off by the outputs' own size: openvino 2025.3 with transformers 4.56 ran
#: the default bi-encoder at 0.97 and the MiniLM-L6 cross-encoder at 1.15 (docs/engine.md, "bf16 checked at
#: load"). The bound sits between: 8x the largest honest error, a fifth of the smallest broken one. It guards
#: against a wrong kernel, not against bf16's rounding (the fidelity gate, measured offline, is that).
BF16_TOLERANCE = 0.2


def bf16_error(outputs: np.ndarray, reference: np.ndarray) -> float:
    """How far bf16 `outputs` are from the fp32 `reference`: the largest difference over the largest fp32 value
    (scale-free: logits and embeddings alike)."""
    scale = float(np.abs(reference).max())
    return float(np.abs(np.asarray(outputs, dtype=np.float32) - reference).max()) / max(scale, 1e-6)


def _f32_reference(conversion: CachedArtifact, probe: dict[str, np.ndarray], threads: int) -> np.ndarray:
    """The model compiled at f32, on `probe`: the reference where the conversion recorded none."""
    compiled = import_openvino().Core().compile_model(str(conversion.path), "CPU", {
        "INFERENCE_PRECISION_HINT": "f32", "INFERENCE_NUM_THREADS": threads, "ENABLE_CPU_PINNING": False})
    with FIRST_CALL():
        return np.asarray(compiled(probe)[0], dtype=np.float32)


def loaded_from_cache(compiled) -> bool | None:
    """Whether OpenVINO imported the compiled model from its blob cache (None where it cannot say)."""
    try:
        return bool(compiled.get_property("LOADED_FROM_CACHE"))
    except Exception:  # a plugin or version without the property
        return None


def check_bf16(runtime: OpenVinoRuntime, network: Network) -> None:
    """Refuse a bf16 compile whose outputs on the probe batch are not fp32's within `BF16_TOLERANCE`.

    OpenVINO chooses its bf16 kernels and fusions per version and per graph, and one of them can be wrong with
    no error: openvino 2025.3 on an IR traced with transformers 4.56 (whose attention mask adds float32's min,
    -inf in bf16) ranked the README's "Bananas" at 0.459 instead of -0.007, every sequence off. The reference
    is what the conversion recorded (PyTorch, or ONNX Runtime for a pre-exported folder), else the same IR
    compiled at f32. A refusal is a `ConversionError`, so `--backend auto` serves the next runtime and an
    explicit `--dtype bf16` fails at start, saying so; the runtime then deletes the compiled blob it wrote or
    imported (`openvino_blobs.discard`: wrong on this OpenVINO either way, a model's size no start serves)."""
    probe = probe_batch(network.path, list(runtime.input_names))
    reference = recorded_reference(runtime.conversion.meta, probe)
    if reference is None:
        reference = _f32_reference(runtime.conversion, probe, runtime.threads)
    error = bf16_error(runtime.run(probe), reference)
    runtime.bf16_error = error
    if error > BF16_TOLERANCE:
        version = package_versions("openvino")["openvino"]
        # Short: `--backend auto`'s reason keeps 200 characters of it, and names the model itself.
        raise ConversionError(
            f"OpenVINO {version} computes this model wrongly in bf16: on the probe batch it is {error:.3g} of the "
            f"outputs' scale from fp32 (bf16's rounding stays within {BF16_TOLERANCE}); use --dtype fp32")


class OpenVinoRuntime(Runtime):
    #: bf16 only: how far its outputs on the probe batch are from fp32 (`check_bf16`), as the start's log says.
    bf16_error: float | None = None

    def __init__(
        self,
        network: Network,
        *,
        dtype: str = "fp32",
        threads: int,
        cache_dir: Path | None = None,
        lanes: int | None = None,
        compiled_cache: bool = True,
    ) -> None:
        """`threads`: CPU threads, all lanes together (`choosing.create_runtime` resolves the default);
        `compiled_cache=False`: compile without OpenVINO's blob cache (a candidate that is only timed)."""
        ov = import_openvino()
        if dtype not in OPENVINO_DTYPES:
            raise ValueError(f"unknown dtype {dtype!r} for the openvino runtime (use one of {OPENVINO_DTYPES})")
        self.threads = threads
        self.lanes = lanes_for(self.threads, DEFAULT_LANES, lanes)
        compiled_dir = writable(compiled_cache_dir(cache_dir)) if compiled_cache else None
        config = compile_config(dtype, self.threads, compiled_dir, self.lanes)
        used = CompiledBlob()  # the blob the compile that serves wrote or imported: `check_bf16` may refuse it

        def compile_(conversion: CachedArtifact) -> object:
            # OpenVINO writes its compiled blob straight to the final file: a replica compiling the same model
            # into the same CACHE_DIR at that moment failed ("cannot set permissions ... .blob") or could read
            # half a blob. One compile per cache directory at a time; the others then import the finished blob,
            # which `compiling` dates.
            nonlocal used
            with compiling(compiled_dir, config, model_of(conversion)) as used:
                compiled = ov.Core().compile_model(str(conversion.path), "CPU", config)
                used.imported = loaded_from_cache(compiled)
                return compiled

        if (conversion := pre_exported_onnx(network, dtype)) is not None:  # a pre-exported folder is never rebuilt
            self.conversion, self.compiled = conversion, compile_(conversion)
        else:  # a cached IR OpenVINO cannot read is converted again, once
            variant = "int8" if dtype == "int8" else "fp32"
            self.conversion, self.compiled = open_cached(
                lambda: ensure_openvino(network, variant=variant, cache_dir=cache_dir), compile_,
                meta_file=META_FILE, what=f"OpenVINO {variant} IR")
        # One infer request per stream: a caller takes a free one, so `lanes` batches run at once.
        self._requests: queue.SimpleQueue = queue.SimpleQueue()
        for _ in range(self.lanes):
            self._requests.put(self.compiled.create_infer_request())
        self.input_names = tuple(p.get_any_name() for p in self.compiled.inputs)
        self.dtype = dtype
        self.description = f"openvino-{dtype}-cpu"
        if dtype == "bf16":
            try:
                check_bf16(self, network)
            except Exception:
                self.close()
                if self.bf16_error is not None:  # measured and refused: so would every start on this OpenVINO
                    discard(used)
                raise
            log.info("OpenVINO bf16 on the probe batch: %.2g of its scale from fp32", self.bf16_error)
        log.info("OpenVINO %s model on %s (%d threads, lanes: %d, %s)", dtype, self.conversion.path,
                 self.threads, self.lanes, "cached" if self.conversion.cached else "fresh conversion")

    def padded_shape(self, rows: IntOrArray, width: IntOrArray) -> tuple[IntOrArray, IntOrArray]:
        return bucket_shape(rows, width)

    def run(self, features: dict[str, np.ndarray]) -> np.ndarray:
        rows, width = features["attention_mask"].shape
        inputs = pad_to_bucket({n: np.ascontiguousarray(features[n]) for n in self.input_names})
        request = self._requests.get()  # waits while every lane is busy
        try:
            try:
                with FIRST_CALL():
                    out = request.infer(inputs, share_inputs=True)[0][:rows]
            except Exception as exc:
                if out_of_memory(exc):  # the host's memory, not the input: a 503 to retry, not a model fault (500)
                    raise HostMemoryError.scoring(self.description, rows, width, exc) from exc
                raise
            computed(*inputs["attention_mask"].shape, features["attention_mask"])  # the bucket's shape
            if out.ndim > 2:  # per-token outputs: cut the bucket's columns too
                out = out[:, :width]
            return np.array(out, dtype=np.float32, copy=True)  # the request reuses its output buffer
        finally:
            self._requests.put(request)

    def close(self) -> None:
        self._requests = None  # type: ignore[assignment]  # a late `run` fails instead of waiting forever
        self.compiled = None  # type: ignore[assignment]

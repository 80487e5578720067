"""ONNX Runtime runtime: the CPU default for encoder families, fp32 (fused graph) or dynamic int8.

The network is exported once and cached by `openrerank.runtimes.onnx_export`; this class only opens a
session on the cached file. A pre-exported directory (`openrerank export --out DIR`, e.g. baked into a
container image) is opened as it is, without PyTorch. Inputs stay int64 (what the graph was exported with)
so no conversion runs per batch.

No telemetry: ONNX Runtime's Linux wheel (1.32) has a built-in telemetry client that looks up Microsoft's
collector (mobile.events.data.microsoft.com) whenever a session opens, unless `ORT_DISABLE_TELEMETRY=1` is in the
environment when onnxruntime is imported (`onnxruntime.disable_telemetry_events()` afterwards does not stop it). A
self-hosted service must not phone home, so every import of onnxruntime here goes through `import_onnxruntime`,
which sets it first (a value the user set wins).
"""

from __future__ import annotations

import importlib
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from types import ModuleType

import numpy as np

from openrerank.core.settings import SWITCH_HINT, switch_value
from openrerank.runtimes.artifact_cache import CachedArtifact
from openrerank.runtimes.base import HostMemoryError, Network, Runtime, computed, lanes_for, out_of_memory

log = logging.getLogger(__name__)

#: The precisions ONNX Runtime runs here: the fused fp32 graph, or its dynamic int8 quantization.
ONNX_DTYPES = ("fp32", "int8")
#: Set to 0 (false/no/off) to stop ORT's worker threads spinning between batches (less idle CPU, a little more
#: latency).
SPIN_ENV = "OPENRERANK_ORT_SPIN"
#: ONNX Runtime's own switch for its telemetry, read when onnxruntime is imported (see the module docstring).
TELEMETRY_ENV = "ORT_DISABLE_TELEMETRY"


def threads_spin(environ: Mapping[str, str] = os.environ) -> bool:
    """Whether ONNX Runtime's worker threads spin between batches (`SPIN_ENV`, on unless switched off); a value
    that is no switch is a ValueError naming it (`openrerank serve` checks it at start)."""
    raw = environ.get(SPIN_ENV, "")
    if not raw.strip():  # empty is unset, as for every other OPENRERANK_ variable
        return True
    if (on := switch_value(raw)) is None:
        raise ValueError(f"{SPIN_ENV}={raw!r}: {SWITCH_HINT}")
    return on


def import_onnxruntime(module: str = "onnxruntime") -> ModuleType:
    """onnxruntime (or one of its submodules, e.g. "onnxruntime.quantization"), imported with its telemetry off:
    the one way openrerank imports it (see the module docstring)."""
    os.environ.setdefault(TELEMETRY_ENV, "1")
    return importlib.import_module(module)


#: Concurrent runs where nothing measured them (`--backend-choice rules`): one. Two (each on half the threads) gave
#: 1.05-1.11x the pairs/s on a 2-core EPYC but 1.15-1.18x the latency of a lone 4-16-passage request, where ONNX
#: Runtime's own threading is already efficient; `OPENRERANK_LANES=2` trades that for throughput (docs/engine.md,
#: "Lanes").
DEFAULT_LANES = 1


class OnnxRuntime(Runtime):
    def __init__(
        self,
        network: Network,
        *,
        dtype: str = "fp32",
        threads: int,
        cache_dir: Path | None = None,
        lanes: int | None = None,
    ) -> None:
        if dtype not in ONNX_DTYPES:
            raise ValueError(f"unknown dtype {dtype!r} for the onnx runtime (use one of {ONNX_DTYPES})")
        from openrerank.runtimes.artifact_cache import open_cached
        from openrerank.runtimes.onnx_export import META_FILE, ensure_onnx, servable_export

        ort = import_onnxruntime()
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        total = threads
        self.lanes = lanes_for(total, DEFAULT_LANES, lanes)
        # A session runs concurrent `run` calls; each lane gets its share of the threads.
        so.intra_op_num_threads = max(1, total // self.lanes)
        so.inter_op_num_threads = 1
        if not threads_spin():
            so.add_session_config_entry("session.intra_op.allow_spinning", "0")

        def session(export: CachedArtifact) -> ort.InferenceSession:
            return ort.InferenceSession(str(export.path), so, providers=["CPUExecutionProvider"])

        if (export := servable_export(network, dtype)) is not None:  # a pre-exported folder is never rebuilt
            self.export, self.session = export, session(export)
        else:  # a cached export ONNX Runtime cannot open is built again, once
            self.export, self.session = open_cached(
                lambda: ensure_onnx(network, dtype=dtype, cache_dir=cache_dir), session, meta_file=META_FILE,
                what=f"ONNX {dtype} export")
        self.input_names = tuple(i.name for i in self.session.get_inputs())
        self._output = self.session.get_outputs()[0].name
        self.dtype = dtype
        self.threads = total
        self.description = f"onnx-{dtype}-cpu"
        log.info("ONNX Runtime session on %s (%d threads, lanes: %d, %s)", self.export.path, self.threads,
                 self.lanes, "cached" if self.export.cached else "fresh export")

    def run(self, features: dict[str, np.ndarray]) -> np.ndarray:
        try:
            out = self.session.run([self._output], {n: features[n] for n in self.input_names})[0]
        except Exception as exc:
            if out_of_memory(exc):  # the host's memory, not the input: a 503 to retry, not a model fault (500)
                rows, width = features[self.input_names[0]].shape[:2]
                raise HostMemoryError.scoring(self.description, rows, width, exc) from exc
            raise
        computed(*features[self.input_names[0]].shape[:2], features.get("attention_mask"))
        return out if out.dtype == np.float32 else out.astype(np.float32)

    def close(self) -> None:
        self.session = None  # type: ignore[assignment]

"""Pick the engine for (the family's engines, --backend, --dtype, --device) and build it.

What can run where (anything else is refused before the server binds its port):

| backend  | device | dtypes                                                          | families |
|----------|--------|-----------------------------------------------------------------|----------|
| openvino | cpu    | fp32, bf16 (needs AVX512-BF16 or AMX), int8 (NNCF; best with VNNI) | encoders |
| onnx     | cpu    | fp32, int8 (dynamic; fast with VNNI, runs without it)           | encoders |
| torch    | cpu    | fp32, bf16 (needs AVX512-BF16 or AMX, else it is emulated)      | all      |
| torch    | cuda   | fp32, bf16, fp16                                                | all      |

`--backend auto` (the default) serves with the fastest *faithful* engine for this CPU: one whose scores on
a fixed probe set correlate >= 0.9999 with fp32 and which leaves the default model's DL19 nDCG@10 within
0.002 of fp32. That is measured in the tests (`tests/runtimes/test_fidelity.py`) and by `openrerank bench`,
not at startup, so the choice is a pure function of the CPU's flags, what is installed and the family:

1. OpenVINO bf16 where the CPU has bf16 units (avx512_bf16 / amx_bf16): bf16 matrix products with fp32
   accumulation pass the gate (probe correlation 0.99995 on the MiniLM-L6 cross-encoder, 0.99999 on the
   default bi-encoder) at 1.5-2x the speed of fp32. int8 is faster still but fails it (OpenVINO int8
   weights 0.9996, ONNX Runtime dynamic int8 0.991), so `auto` never picks int8; ask for it with `--dtype int8`.
2. OpenVINO fp32 on other CPUs (exact, and faster than ONNX Runtime fp32).
3. ONNX Runtime fp32 where OpenVINO is not installed or refuses the model; PyTorch fp32 where ONNX cannot
   export it, and for families that only run on PyTorch (the LLM rerankers), and on CUDA (where
   `--dtype auto` is fp16 or bf16 by the GPU's compute capability: runtimes/devices.py).

With an explicit `--dtype`, `auto` picks the best engine for that dtype (fp32: OpenVINO, then ONNX Runtime;
bf16: OpenVINO, then PyTorch; int8: OpenVINO with NNCF int8 weights, then ONNX Runtime dynamic int8). An
explicit `--backend` gets exactly that engine or a clear error, never a silent substitute.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path

from openrerank.runtimes.base import Network, Runtime
from openrerank.runtimes.devices import cuda_auto_dtype, cuda_capability
from openrerank.runtimes.openvino_runtime import openvino_available
from openrerank.runtimes.torch_runtime import is_cuda

log = logging.getLogger(__name__)

BACKENDS = ("auto", "openvino", "onnx", "torch")
DTYPES = ("auto", "fp32", "bf16", "fp16", "int8")
ALL_ENGINES = ("openvino", "onnx", "torch")
_BF16_FLAGS = ("avx512_bf16", "amx_bf16")
_VNNI_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")
_NAMES = {"openvino": "OpenVINO", "onnx": "ONNX Runtime", "torch": "PyTorch"}
#: What "faithful" means, quoted in the reasons `auto` gives.
FIDELITY_GATE = "probe scores correlate >= 0.9999 with fp32, DL19 nDCG@10 within 0.002"

class BackendConfigError(ValueError):
    """An impossible backend/dtype/device combination; raised before the server starts."""


@dataclass(frozen=True)
class EngineChoice:
    """An engine and precision to serve with, and why (shown in the startup log and /v1/metadata)."""

    backend: str
    dtype: str
    reason: str

    @property
    def label(self) -> str:
        return f"{_NAMES.get(self.backend, self.backend)} {self.dtype}"

    def as_metadata(self) -> dict:
        return {"backend": self.backend, "dtype": self.dtype, "reason": self.reason}


@functools.lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The CPU feature flags from /proc/cpuinfo (empty where unreadable, e.g. not Linux)."""
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.partition(":")[2].split())
    return frozenset()


def nncf_available() -> bool:
    """Whether NNCF (OpenVINO's int8 quantizer) is installed."""
    return importlib.util.find_spec("nncf") is not None


def _has(flags: frozenset[str], wanted: tuple[str, ...]) -> str | None:
    found = sorted(flags & set(wanted))
    return found[0] if found else None


def _bf16_refusal(engine: str) -> BackendConfigError:
    return BackendConfigError(
        f"--dtype bf16 on CPU needs AVX512-BF16 or AMX (cpu flags avx512_bf16/amx_bf16), which this CPU "
        f"lacks: {_NAMES[engine]} would emulate bf16 or quietly run fp32. Use --dtype fp32, or int8")


def _explicit(backend: str, dtype: str, device: str, flags: frozenset[str]) -> EngineChoice:
    """The one engine an explicit --backend means, or why it cannot run that way."""
    gpu = is_cuda(device)
    bf16_unit = _has(flags, _BF16_FLAGS)
    if backend == "torch":
        if dtype == "int8":
            raise BackendConfigError("--dtype int8 needs --backend openvino or onnx (PyTorch runs fp32/bf16/fp16)")
        if dtype == "fp16" and not gpu:
            raise BackendConfigError("--dtype fp16 needs a GPU (--device cuda); on CPU use bf16 or fp32")
        if dtype == "bf16" and not gpu and not bf16_unit:
            raise _bf16_refusal("torch")
        return EngineChoice("torch", "fp32" if dtype == "auto" else dtype, "--backend torch")
    if gpu:
        raise BackendConfigError(f"--backend {backend} runs on CPU only; use --backend torch for --device {device}")
    if dtype == "fp16":
        raise BackendConfigError("--dtype fp16 needs a GPU (--device cuda); on CPU use bf16 or fp32")
    if backend == "onnx":
        if dtype == "bf16":
            raise BackendConfigError("--dtype bf16 needs --backend openvino or torch (ONNX Runtime here runs "
                                     "fp32 or int8)")
        return EngineChoice("onnx", "fp32" if dtype == "auto" else dtype, "--backend onnx")
    # openvino
    if not openvino_available():
        raise BackendConfigError("--backend openvino needs the openvino package (pip install openvino)")
    if dtype == "auto":
        dtype = "bf16" if bf16_unit else "fp32"
    if dtype == "bf16" and not bf16_unit:
        raise _bf16_refusal("openvino")
    if dtype == "int8" and not nncf_available():
        raise BackendConfigError("--backend openvino --dtype int8 needs the nncf package (pip install nncf)")
    return EngineChoice("openvino", dtype, "--backend openvino")


def _auto_cpu(dtype: str, engines: tuple[str, ...], flags: frozenset[str], family: str) -> list[EngineChoice]:
    """Candidates for `--backend auto` on CPU, best first."""
    bf16_unit = _has(flags, _BF16_FLAGS)
    ov = "openvino" in engines and openvino_available()
    ov_note = "" if ov or "openvino" not in engines else " (OpenVINO is not installed)"
    out: list[EngineChoice] = []
    if dtype == "fp16":
        raise BackendConfigError("--dtype fp16 needs a GPU (--device cuda); on CPU use bf16 or fp32")
    if dtype == "bf16" and not bf16_unit:
        raise _bf16_refusal("torch")
    if dtype == "auto":
        if ov and bf16_unit:
            out.append(EngineChoice("openvino", "bf16", f"the CPU has bf16 units ({bf16_unit}): OpenVINO bf16 is the "
                                    f"fastest engine that passes the fidelity gate ({FIDELITY_GATE}); int8 is "
                                    "faster but fails it"))
        if ov:
            out.append(EngineChoice("openvino", "fp32", "no bf16 units (avx512_bf16/amx_bf16): OpenVINO fp32 is the "
                                    "fastest engine that passes the fidelity gate; int8 is faster but fails it"))
        if "onnx" in engines:
            out.append(EngineChoice("onnx", "fp32", "ONNX Runtime fp32, exact" + ov_note))
        if "torch" in engines:
            why = "the only engine this family runs on" if engines == ("torch",) else "fp32, exact"
            out.append(EngineChoice("torch", "fp32", f"PyTorch fp32: {why}"))
        return out
    if dtype == "fp32":
        if ov:
            out.append(EngineChoice("openvino", "fp32", "--dtype fp32: OpenVINO is the fastest exact fp32 engine"))
        if "onnx" in engines:
            out.append(EngineChoice("onnx", "fp32", "--dtype fp32: ONNX Runtime" + ov_note))
        if "torch" in engines:
            out.append(EngineChoice("torch", "fp32", "--dtype fp32: PyTorch"))
    elif dtype == "bf16":
        if ov:
            out.append(EngineChoice("openvino", "bf16", f"--dtype bf16: OpenVINO bf16 ({bf16_unit})"))
        if "torch" in engines:
            out.append(EngineChoice("torch", "bf16", f"--dtype bf16: PyTorch autocast ({bf16_unit})" + ov_note))
    elif dtype == "int8":
        if ov and nncf_available():
            out.append(EngineChoice("openvino", "int8", "--dtype int8: OpenVINO with NNCF int8 weights (closer to "
                                    "fp32 than ONNX Runtime's dynamic int8)"))
        if "onnx" in engines:
            out.append(EngineChoice("onnx", "int8", "--dtype int8: ONNX Runtime dynamic int8"
                                    + ("" if ov and nncf_available() else " (OpenVINO/NNCF not installed)")))
    if not out:
        raise BackendConfigError(f"--dtype {dtype} needs an engine {family} does not run on "
                                 f"(engines: {', '.join(engines)})")
    return out


def plan_engines(backend: str, dtype: str, device: str, engines: tuple[str, ...] = ALL_ENGINES,
                 family: str = "this model") -> list[EngineChoice]:
    """The engines to try, best first (the first that loads serves); refuses impossible combinations.

    Deterministic: the same flags, installed packages, family and options always give the same list.
    """
    if backend not in BACKENDS:
        raise BackendConfigError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if dtype not in DTYPES:
        raise BackendConfigError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    if device != "cpu" and not is_cuda(device):
        raise BackendConfigError(f"unknown device {device!r}; use cpu or cuda[:N]")
    flags = cpu_flags()
    cuda_note = ""
    if is_cuda(device) and dtype == "auto":  # half precision by the GPU's capability (runtimes/devices.py)
        dtype, why = cuda_auto_dtype(cuda_capability(device), decoder=engines == ("torch",))
        cuda_note = f"; --dtype auto on CUDA: {why}"
    if backend != "auto":
        if backend not in engines:
            raise BackendConfigError(f"{family} runs on the {' or '.join(engines)} backend, not {backend}")
        plan = [_explicit(backend, dtype, device, flags)]
        plan[0] = EngineChoice(plan[0].backend, plan[0].dtype, plan[0].reason + cuda_note)
    elif is_cuda(device):
        if "torch" not in engines:
            raise BackendConfigError(f"{family} runs on CPU only (engines: {', '.join(engines)})")
        plan = [_explicit("torch", dtype, device, flags)]
        plan[0] = EngineChoice("torch", plan[0].dtype, "PyTorch is the engine for CUDA devices" + cuda_note)
    else:
        plan = _auto_cpu(dtype, engines, flags, family)
    if plan[0].dtype == "int8" and not _has(flags, _VNNI_FLAGS):
        warnings.warn("--dtype int8 on a CPU without VNNI (avx512_vnni/avx_vnni): it runs, but is usually no "
                      "faster than fp32", RuntimeWarning, stacklevel=2)
    return plan


def check_backend_options(backend: str, dtype: str, device: str, engines: tuple[str, ...] = ALL_ENGINES,
                          family: str = "this model") -> str:
    """Validate flags without loading anything (used by `serve` before binding); returns the planned engine."""
    return plan_engines(backend, dtype, device, engines, family)[0].backend


def _build(choice: EngineChoice, network: Network, device: str, threads: int | None) -> Runtime:
    if choice.backend == "openvino":
        from openrerank.runtimes.openvino_runtime import OpenVinoRuntime

        return OpenVinoRuntime(network, dtype=choice.dtype, threads=threads)
    if choice.backend == "onnx":
        from openrerank.runtimes.onnx_runtime import OnnxRuntime

        return OnnxRuntime(network, dtype=choice.dtype, threads=threads)
    from openrerank.runtimes.torch_runtime import TorchRuntime

    return TorchRuntime(network, dtype=choice.dtype, device=device, threads=threads)


def create_runtime(network: Network, *, engines: tuple[str, ...], backend: str, dtype: str, device: str,
                   threads: int | None, family: str = "this model") -> tuple[Runtime, EngineChoice]:
    """Build the runtime and say which engine serves and why.

    With `--backend auto`, an engine that refuses the model (OpenVINO cannot convert it, ONNX cannot export
    it) hands over to the next candidate, and the reason says so; an explicit backend raises instead.
    """
    plan = plan_engines(backend, dtype, device, engines, family)
    refused: list[str] = []
    for i, choice in enumerate(plan):
        try:
            runtime = _build(choice, network, device, threads)
        except Exception as exc:
            if i == len(plan) - 1:
                raise
            refused.append(f"{choice.label} refused it ({type(exc).__name__}: {str(exc)[:200]})")
            log.warning("%s could not serve %s: %s; trying %s", choice.label, network.path, exc, plan[i + 1].label)
            continue
        if refused:
            choice = EngineChoice(choice.backend, choice.dtype, f"{'; '.join(refused)}; so {choice.reason}")
        return runtime, choice
    raise AssertionError("unreachable: the plan is never empty")

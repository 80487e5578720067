"""Pick a runtime for (the family's engines, --backend, --dtype, --device) and build it.

What can run where (anything else is refused before the server binds its port):

| backend | device | dtypes                                                     | families            |
|---------|--------|------------------------------------------------------------|---------------------|
| onnx    | cpu    | fp32, int8 (dynamic; fast with VNNI, runs without it)      | encoders            |
| torch   | cpu    | fp32, bf16 (needs AVX512-BF16 or AMX, else it is emulated) | all                 |
| torch   | cuda   | fp32, bf16, fp16                                           | all                 |

`auto` picks the family's preferred CPU engine (ONNX Runtime for encoders, PyTorch for decoders) on CPU and
PyTorch on CUDA; a dtype only one engine runs (bf16/fp16 -> torch, int8 -> onnx) decides the engine.
"""

from __future__ import annotations

import functools
import logging
import warnings
from pathlib import Path

from openrerank.backends.base import Network, Runtime
from openrerank.backends.torch_runtime import is_cuda

log = logging.getLogger(__name__)

BACKENDS = ("auto", "torch", "onnx")
DTYPES = ("fp32", "bf16", "fp16", "int8")
ALL_ENGINES = ("onnx", "torch")
_BF16_FLAGS = ("avx512_bf16", "amx_bf16")
_VNNI_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")


class BackendConfigError(ValueError):
    """An impossible backend/dtype/device combination; raised before the server starts."""


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


def resolve_backend_name(backend: str, device: str, dtype: str = "fp32",
                         engines: tuple[str, ...] = ALL_ENGINES) -> str:
    """The engine `backend` means for a family that runs on `engines` (its preferred CPU engine first)."""
    if backend not in BACKENDS:
        raise BackendConfigError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if backend != "auto":
        return backend
    if is_cuda(device) or dtype in ("bf16", "fp16"):
        return "torch"
    if dtype == "int8":
        return "onnx"
    return engines[0]


def check_backend_options(backend: str, dtype: str, device: str, engines: tuple[str, ...] = ALL_ENGINES,
                          family: str = "this model") -> str:
    """Validate flags without loading anything (used by `serve` before binding); returns the engine name."""
    if dtype not in DTYPES:
        raise BackendConfigError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    if device != "cpu" and not is_cuda(device):
        raise BackendConfigError(f"unknown device {device!r}; use cpu or cuda[:N]")
    name = resolve_backend_name(backend, device, dtype, engines)
    if name not in engines:
        if dtype == "int8":
            raise BackendConfigError(f"--dtype int8 needs the onnx backend, which {family} does not run on "
                                     f"(engines: {', '.join(engines)}); use fp32 or bf16")
        raise BackendConfigError(f"{family} runs on the {' or '.join(engines)} backend, not {name}")
    if name == "onnx":
        if is_cuda(device):
            raise BackendConfigError("--backend onnx runs on CPU only; use --backend torch for --device cuda")
        if dtype in ("bf16", "fp16"):
            raise BackendConfigError(f"--dtype {dtype} needs --backend torch (ONNX Runtime here runs fp32 or int8)")
        if dtype == "int8" and not cpu_flags() & set(_VNNI_FLAGS):
            warnings.warn("--dtype int8 on a CPU without VNNI (avx512_vnni/avx_vnni): it runs, but is "
                          "usually no faster than fp32", RuntimeWarning, stacklevel=2)
    else:
        if dtype == "int8":
            raise BackendConfigError("--dtype int8 needs --backend onnx (dynamic int8 quantization)")
        if dtype == "fp16" and not is_cuda(device):
            raise BackendConfigError("--dtype fp16 needs a GPU (--device cuda); on CPU use bf16 or fp32")
        if dtype == "bf16" and not is_cuda(device) and not cpu_flags() & set(_BF16_FLAGS):
            raise BackendConfigError(
                "--dtype bf16 on CPU needs AVX512-BF16 or AMX (cpu flags avx512_bf16/amx_bf16), which this "
                "CPU lacks: bf16 would be emulated and slower than fp32. Use --dtype fp32, or int8 with "
                "--backend onnx")
    return name


def create_runtime(network: Network, *, engines: tuple[str, ...], backend: str, dtype: str, device: str,
                   threads: int | None, family: str = "this model") -> Runtime:
    """Build the runtime; with `--backend auto`, a network ONNX cannot export runs on PyTorch instead."""
    name = check_backend_options(backend, dtype, device, engines, family)
    if name == "onnx":
        from openrerank.backends.onnx_export import ExportError
        from openrerank.backends.onnx_runtime import OnnxRuntime

        try:
            return OnnxRuntime(network, dtype=dtype, threads=threads)
        except ExportError as exc:
            if backend != "auto" or dtype != "fp32" or "torch" not in engines:
                raise
            log.warning("%s; serving it with PyTorch instead", exc)
    from openrerank.backends.torch_runtime import TorchRuntime

    return TorchRuntime(network, dtype=dtype, device=device, threads=threads)

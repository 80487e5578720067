"""Pick a runtime for (model kind, --backend, --dtype) and wrap it in the right scorer."""

from __future__ import annotations

from openrerank.backends.base import Backend, Runtime
from openrerank.backends.bi_encoder import BiEncoderBackend
from openrerank.backends.cross_encoder import CrossEncoderBackend
from openrerank.models.spec import ModelKind, ModelSpec

BACKENDS = ("auto", "torch", "onnx")
DTYPES = ("fp32", "bf16", "fp16", "int8")


class BackendConfigError(ValueError):
    """An impossible backend/dtype/device combination; raised before the server starts."""


def resolve_backend_name(backend: str, device: str) -> str:
    if backend not in BACKENDS:
        raise BackendConfigError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if backend != "auto":
        return backend
    return "torch"


def create_runtime(spec: ModelSpec, *, backend: str, dtype: str, device: str, threads: int | None) -> Runtime:
    name = resolve_backend_name(backend, device)
    classifier = spec.kind is ModelKind.CROSS_ENCODER
    if name == "torch":
        if dtype == "int8":
            raise BackendConfigError("--dtype int8 needs --backend onnx")
        from openrerank.backends.torch_runtime import TorchRuntime

        return TorchRuntime(spec.path, classifier=classifier, dtype=dtype, device=device, threads=threads)
    raise BackendConfigError(f"backend {name!r} is not available in this build")


def create_backend(
    spec: ModelSpec,
    pad_id: int,
    *,
    backend: str = "auto",
    dtype: str = "fp32",
    device: str = "cpu",
    threads: int | None = None,
) -> Backend:
    if dtype not in DTYPES:
        raise BackendConfigError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    runtime = create_runtime(spec, backend=backend, dtype=dtype, device=device, threads=threads)
    if spec.kind is ModelKind.CROSS_ENCODER:
        return CrossEncoderBackend(runtime, pad_id)
    return BiEncoderBackend(runtime, pad_id, pooling=spec.pooling)


def check_backend_options(backend: str, dtype: str, device: str) -> None:
    """Validate flags without loading anything (used by `serve` before binding)."""
    if dtype not in DTYPES:
        raise BackendConfigError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    name = resolve_backend_name(backend, device)
    if name == "torch" and dtype == "int8":
        raise BackendConfigError("--dtype int8 needs --backend onnx")

"""Engine selection and the combinations refused before the server binds."""

from __future__ import annotations

import numpy as np
import pytest

from openrerank.backends import selection
from openrerank.backends.selection import BackendConfigError, check_backend_options, resolve_backend_name
from openrerank.engine.loading import LoadOptions, load_model

MODERN = frozenset({"avx2", "avx512f", "avx512_vnni", "avx512_bf16"})
OLD = frozenset({"avx2", "avx512f"})


@pytest.fixture
def cpu(monkeypatch):
    """Pretend to be a CPU with the given flags."""

    def set_flags(flags: frozenset[str]) -> None:
        monkeypatch.setattr(selection, "cpu_flags", lambda: flags)

    return set_flags


@pytest.mark.parametrize(("device", "dtype", "expected"), [
    ("cpu", "fp32", "onnx"),
    ("cpu", "int8", "onnx"),
    ("cpu", "bf16", "torch"),
    ("cuda", "fp32", "torch"),
    ("cuda:1", "fp16", "torch"),
])
def test_auto_picks_onnx_on_cpu_and_torch_on_gpu(cpu, device, dtype, expected):
    cpu(MODERN)
    assert resolve_backend_name("auto", device, dtype) == expected
    assert check_backend_options("auto", dtype, device) == expected


@pytest.mark.parametrize(("backend", "dtype", "device", "message"), [
    ("torch", "int8", "cpu", "needs --backend onnx"),
    ("onnx", "bf16", "cpu", "needs --backend torch"),
    ("onnx", "fp16", "cpu", "needs --backend torch"),
    ("torch", "fp16", "cpu", "needs a GPU"),
    ("auto", "fp16", "cpu", "needs a GPU"),
    ("onnx", "fp32", "cuda", "CPU only"),
    ("onnx", "int8", "cuda:0", "CPU only"),
    ("tensorrt", "fp32", "cpu", "unknown backend"),
    ("auto", "fp8", "cpu", "unknown dtype"),
    ("auto", "fp32", "tpu", "unknown device"),
])
def test_impossible_combinations_are_refused(cpu, backend, dtype, device, message):
    cpu(MODERN)
    with pytest.raises(BackendConfigError, match=message):
        check_backend_options(backend, dtype, device)


def test_bf16_on_cpu_needs_bf16_hardware(cpu):
    cpu(OLD)
    with pytest.raises(BackendConfigError, match="AVX512-BF16 or AMX"):
        check_backend_options("torch", "bf16", "cpu")
    assert check_backend_options("torch", "bf16", "cuda") == "torch"  # the GPU does bf16 itself
    cpu(frozenset({"amx_bf16"}))
    assert check_backend_options("torch", "bf16", "cpu") == "torch"


def test_int8_without_vnni_warns_but_runs(cpu):
    cpu(OLD)
    with pytest.warns(RuntimeWarning, match="VNNI"):
        assert check_backend_options("onnx", "int8", "cpu") == "onnx"
    cpu(frozenset({"avx_vnni"}))
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_backend_options("onnx", "int8", "cpu")


def test_cpu_flags_reads_this_machine():
    flags = selection.cpu_flags()
    assert isinstance(flags, frozenset)
    if flags:  # Linux: the usual baseline flags are present
        assert "sse2" in flags or "fp" in flags or "neon" in flags


def test_serve_refuses_before_binding(capsys):
    from openrerank.cli import main

    assert main(["serve", "--dtype", "fp16", "--port", "1"]) == 2
    assert "needs a GPU" in capsys.readouterr().err


@pytest.mark.skipif(not selection.cpu_flags() & {"avx512_bf16", "amx_bf16"}, reason="CPU without bf16 units")
def test_torch_bf16_returns_float32_close_to_fp32():
    texts = ["what is the capital of france", "paris is the capital of france", "bananas are yellow"]
    fp32 = load_model("default", LoadOptions(backend="torch"))
    bf16 = load_model("default", LoadOptions(backend="torch", dtype="bf16"))
    assert bf16.backend.description == "torch-bf16-cpu"
    a, b = fp32.score(texts[0], texts[1:]), bf16.score(texts[0], texts[1:])
    assert b.dtype == np.float32
    np.testing.assert_allclose(b, a, atol=0.02)
    assert b[0] > b[1]

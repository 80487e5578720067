"""The ONNX Runtime runtime declares the precisions it runs (`ONNX_DTYPES`) and refuses others, as its siblings do."""

from __future__ import annotations

import pytest

from openrerank.runtimes.onnx_runtime import ONNX_DTYPES, OnnxRuntime


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_a_precision_onnx_runtime_does_not_run_is_refused_before_anything_is_built(dtype):
    with pytest.raises(ValueError, match=f"unknown dtype '{dtype}' for the onnx runtime"):
        OnnxRuntime(None, dtype=dtype, threads=1)  # no network needed: refused before the export is looked for


def test_the_export_and_the_runtime_plan_take_onnx_precisions_from_the_runtime():
    from openrerank.runtimes import onnx_export, selection

    assert onnx_export.ONNX_DTYPES is ONNX_DTYPES and selection.RUNTIME_DTYPES["onnx"] is ONNX_DTYPES

"""The ONNX Runtime runtime declares the precisions it runs (`ONNX_DTYPES`) and refuses others, as its siblings do;
onnxruntime is imported with its telemetry off."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

from openrerank.runtimes.onnx_runtime import ONNX_DTYPES, SPIN_ENV, TELEMETRY_ENV, OnnxRuntime, threads_spin

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_a_precision_onnx_runtime_does_not_run_is_refused_before_anything_is_built(dtype):
    with pytest.raises(ValueError, match=f"unknown dtype '{dtype}' for the onnx runtime"):
        OnnxRuntime(None, dtype=dtype, threads=1)  # no network needed: refused before the export is looked for


def test_the_export_and_the_runtime_plan_take_onnx_precisions_from_the_runtime():
    from openrerank.runtimes import onnx_export, selection

    assert onnx_export.ONNX_DTYPES is ONNX_DTYPES and selection.RUNTIME_DTYPES["onnx"] is ONNX_DTYPES


# Records, in a fresh interpreter, ORT_DISABLE_TELEMETRY as it is when onnxruntime's package actually runs (a
# find_spec alone, as torch's dynamo makes, is no import), then opens the model's ONNX Runtime session the way a
# server start does.
_IMPORT_WATCH = """
import os, sys
from importlib.machinery import PathFinder
seen = []
class Watch:
    def find_spec(self, name, path=None, target=None):
        if name != "onnxruntime":
            return None
        spec = PathFinder.find_spec(name, path)
        run = spec.loader.exec_module
        def exec_module(module):
            seen.append(os.environ.get("ORT_DISABLE_TELEMETRY"))
            run(module)
        spec.loader.exec_module = exec_module
        return spec
sys.meta_path.insert(0, Watch())
from openrerank.engine.loading import LoadOptions, load_model
model = load_model(sys.argv[1], LoadOptions(backend="onnx", backend_choice="rules"))
assert model.scorer.runtime.description == "onnx-fp32-cpu", model.scorer.runtime.description
print("onnxruntime imported with ORT_DISABLE_TELEMETRY=" + ",".join(map(repr, seen)))
"""


def test_onnx_runtime_is_imported_with_its_telemetry_off(tiny_model_dir):
    """ORT 1.32 looked up Microsoft's telemetry collector at every session it opened: only the variable set before
    the import turns that off, so a server must have set it when onnxruntime first loads."""
    env = {k: v for k, v in os.environ.items() if k != TELEMETRY_ENV}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), str(ROOT)])
    done = subprocess.run([sys.executable, "-c", _IMPORT_WATCH, str(tiny_model_dir)], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().endswith("ORT_DISABLE_TELEMETRY='1'"), done.stdout + done.stderr[-2000:]


def test_onnxruntime_is_imported_only_through_import_onnxruntime():
    """Any other import could be the first, and load onnxruntime with its telemetry on."""
    found = []
    for path in sorted((ROOT / "src" / "openrerank").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            found += [f"{path.relative_to(ROOT)}:{node.lineno}" for n in names if n.split(".")[0] == "onnxruntime"]
    assert not found, f"import onnxruntime through onnx_runtime.import_onnxruntime: {found}"


def test_the_spin_switch_reads_every_way_of_saying_off_and_refuses_what_is_no_switch():
    """Only "0" turned spinning off: OPENRERANK_ORT_SPIN=false (or off, no) left the threads spinning."""
    assert threads_spin({}) is True and threads_spin({SPIN_ENV: " "}) is True  # empty is unset, as elsewhere
    for off in ("0", "false", "No", " off "):
        assert threads_spin({SPIN_ENV: off}) is False, off
    for on in ("1", "true", "YES", "on"):
        assert threads_spin({SPIN_ENV: on}) is True, on
    with pytest.raises(ValueError, match=r"^OPENRERANK_ORT_SPIN='maybe': expected one of"):
        threads_spin({SPIN_ENV: "maybe"})

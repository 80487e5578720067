"""Convert a family's network to an OpenVINO IR once, cached on disk like the ONNX export; int8 via NNCF.

Steps:
1. `openvino.convert_model` on the torch module the family builds (eager attention, its readout included:
   logits or pooled embeddings), traced on a padded probe batch; inputs keep the family's names
   (`input_ids`, `attention_mask`, `token_type_ids` where used) and both axes stay dynamic.
2. The converted model, compiled at f32 precision, is compared with PyTorch on that batch; more than 1e-3
   apart and the conversion is refused (`ConversionError`), so `--backend auto` falls back to another runtime.
   PyTorch's outputs on that batch are kept in `convert.json` (`probe_reference`): the fp32 reference that
   every bf16 compile of the IR is held to when it loads (`openvino_runtime.check_bf16`).
3. `openvino.save_model(..., compress_to_fp16=False)`: the IR keeps fp32 weights. bf16 is not a property of
   the IR but of compilation (`INFERENCE_PRECISION_HINT`), so fp32 and bf16 share one cached IR.
4. `--dtype int8`: `nncf.compress_weights` of that IR (INT8_ASYM: int8 weights per output channel). At run
   time OpenVINO's CPU plugin quantizes the activations of those matrix products dynamically (per group of
   32 values, per batch), so they run as int8 dot products (VNNI) without a calibration set. Measured on the
   MiniLM-L6 cross-encoder (DL19 pairs): probe correlation with fp32 0.9996, where NNCF's static
   weights+activations quantization calibrated on generic text reached 0.989-0.997 and ONNX Runtime's
   dynamic int8 0.991, at about the same speed; neither kind of int8 passes `auto`'s fidelity gate.

Cache: `$OPENRERANK_CACHE_DIR/openvino/<key>-<fp32|int8>/` (default `$XDG_CACHE_HOME/openrerank/openvino`) with
`model.xml`, `model.bin` and `convert.json`; the key hashes the model files, the head, the family's build format
(`Family.build_format`), the variant, the conversion format and the transformers / openvino (and nncf) versions
(PyTorch's is recorded, not keyed: a torch-free server finds the IR an export job wrote). OpenVINO's own
compiled-model cache (CPU kernels for this machine, so a restart does not compile again) lives beside it in
`compiled/cpu-<key of this kind of CPU>/` where that is writable (a read-only cache compiles at start):
`openvino_blobs`.

No telemetry: OpenVINO's converter and NNCF send usage events to Google Analytics unless the user opted out
(a missing consent file counts as consent). A self-hosted service must not phone home, so every import and
call of theirs here runs with their CI switch on (`CI=true`), which turns it off (with a HOME where none
resolves: `quiet_openvino`); NNCF's progress bars (printed to stdout) are swallowed and its log is kept to
warnings.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import importlib.util
import io
import json
import logging
import os
import shutil
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from openrerank.runtimes.artifact_cache import (
    CACHE_ENV,
    CachedArtifact,
    cache_folder,
    ensure_artifact,
    key_of,
    model_fingerprint,
    package_versions,
)
from openrerank.runtimes.base import ModelRefusedError, Network, NetworkBuild, probe_features

log = logging.getLogger(__name__)

IR_VARIANTS = ("fp32", "int8")
MODEL_FILE = "model.xml"
META_FILE = "convert.json"
#: The IRs' folder in the cache, beside the ONNX exports (`artifact_cache.cache_folder`).
CACHE_FOLDER = "openvino"
#: Bump when the conversion recipe changes in a way the versions below would not capture.
CONVERT_FORMAT = 1
_TOLERANCE = 1e-3
#: The metadata key of the fp32 outputs on the probe batch (`reference_record`).
REFERENCE_KEY = "probe_reference"
_MIB = 2**20


class ConversionError(ModelRefusedError):
    """OpenVINO could not convert (or faithfully run) the model."""


def _home_resolves() -> bool:
    try:
        Path.home()
    except RuntimeError:  # HOME unset and a uid without a passwd entry
        return False
    return True


@contextlib.contextmanager
def _environ(values: dict[str, str]) -> Iterator[None]:
    """`values` set in os.environ for the block, the previous values (or their absence) restored after it."""
    previous = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in previous.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@contextlib.contextmanager
def quiet_openvino() -> Iterator[None]:
    """OpenVINO tools without telemetry, progress bars or info chatter (see the module docstring).

    Their telemetry's consent check asks for the home folder before it reads the CI switch, and `Path.home()`
    raises where none resolves (HOME unset, a uid without a passwd entry: `docker run --user 1234`), so
    `import openvino` failed and `--backend auto` quietly served without it. There HOME is the temporary folder
    for the block: the check finds a folder, then the CI switch, and declines; nothing is written there."""
    values = {"CI": "true"} if _home_resolves() else {"CI": "true", "HOME": tempfile.gettempdir()}
    nncf_log = logging.getLogger("nncf")
    level = nncf_log.level
    nncf_log.setLevel(max(level, logging.WARNING))
    try:
        with _environ(values), contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tracer chatter about Python booleans; outputs are checked instead
            yield
    finally:
        nncf_log.setLevel(level)


def import_openvino():
    """The openvino module, imported without telemetry (its import initialises it)."""
    with quiet_openvino():
        import openvino
    return openvino


def openvino_available() -> bool:
    """Whether the openvino package is installed (found without importing it; a broken install still fails
    at load, where `--backend auto` falls back to the next runtime)."""
    return importlib.util.find_spec("openvino") is not None


def default_cache_dir() -> Path:
    """`$OPENRERANK_CACHE_DIR/openvino` when set, else `$XDG_CACHE_HOME/openrerank/openvino`."""
    return cache_folder(CACHE_FOLDER)


def _versions(variant: str) -> dict[str, str]:
    """The versions that key an IR; computed without PyTorch (see artifact_cache)."""
    return package_versions("transformers", "openvino", *(("nncf",) if variant == "int8" else ()))


def keyed_facts(variant: str) -> dict:
    """What keys every IR of `variant` on this install besides the model (the recipe number, the versions): an
    entry that recorded others is never read here (`openrerank cache prune` removes it)."""
    return {"format": CONVERT_FORMAT, **_versions(variant)}


def cache_key(network: Network, variant: str) -> tuple[str, dict]:
    facts = {"model_sha256": model_fingerprint(network.path), "head": network.head,
             "build_format": network.build_format, "variant": variant, "format": CONVERT_FORMAT,
             **_versions(variant)}
    return key_of(facts), facts


def _max_diff(out: np.ndarray, expected: np.ndarray) -> float:
    return float(np.abs(np.asarray(out, dtype=np.float32) - expected).max())


def probe_batch(folder: Path, names: list[str]) -> dict[str, np.ndarray]:
    """The probe batch (`base.probe_features`) of the model in `folder`, its ids within its vocabulary."""
    config = json.loads((Path(folder) / "config.json").read_text(encoding="utf-8"))
    return probe_features(names, int(config.get("vocab_size") or 1000))


def _probe_digest(probe: dict[str, np.ndarray]) -> str:
    """What a recorded reference was computed on: a reference of another probe batch is not compared with."""
    digest = hashlib.sha256()
    for name in sorted(probe):
        digest.update(name.encode() + str(probe[name].shape).encode() + np.ascontiguousarray(probe[name]).tobytes())
    return digest.hexdigest()[:16]


def reference_record(probe: dict[str, np.ndarray], outputs: np.ndarray) -> dict:
    """fp32 outputs on `probe`, as `convert.json` keeps them (6 significant digits: far finer than bf16)."""
    values = np.asarray(outputs, dtype=np.float32)
    return {"probe": _probe_digest(probe), "shape": list(values.shape),
            "outputs": [float(f"{v:.6g}") for v in values.ravel().tolist()]}


def recorded_reference(meta: dict, probe: dict[str, np.ndarray]) -> np.ndarray | None:
    """The fp32 outputs on `probe` that a conversion recorded (`reference_record`); None where it recorded none
    (an IR converted by an earlier version) or recorded them for another probe batch."""
    record = meta.get(REFERENCE_KEY)
    if not isinstance(record, dict) or record.get("probe") != _probe_digest(probe):
        return None
    try:
        return np.asarray(record["outputs"], dtype=np.float32).reshape(record["shape"])
    except (KeyError, TypeError, ValueError):  # a record damaged by hand: compute the reference instead
        return None


def _convert(network: Network, out: Path) -> dict:
    """torch module -> IR in `out`, checked against PyTorch on the probe batch."""
    import torch

    ov = import_openvino()
    module = network.build(NetworkBuild(export=True)).eval()
    names = list(module.input_names)
    probe = probe_batch(network.path, names)
    example = tuple(torch.from_numpy(probe[n]) for n in names)
    with torch.inference_mode():
        expected = module(*example).float().numpy()
    try:
        with quiet_openvino(), torch.no_grad():
            model = ov.convert_model(module, example_input=example)
    except Exception as exc:  # an architecture the OpenVINO PyTorch frontend cannot take
        raise ConversionError(f"OpenVINO could not convert {network.path}: {type(exc).__name__}: {exc}") from exc
    if len(model.inputs) != len(names) or len(model.outputs) != 1:
        raise ConversionError(f"OpenVINO converted {network.path} to {len(model.inputs)} inputs and "
                              f"{len(model.outputs)} outputs; expected {len(names)} and 1")
    for port, name in zip(model.inputs, names, strict=True):
        port.get_tensor().set_names({name})
    model.outputs[0].get_tensor().set_names({network.output})
    compiled = ov.Core().compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32",
                                                      "INFERENCE_NUM_THREADS": 1,
                                                      "ENABLE_CPU_PINNING": False})
    diff = _max_diff(compiled(probe)[0], expected)
    if diff > _TOLERANCE:
        raise ConversionError(f"the OpenVINO conversion of {network.path} differs from PyTorch by {diff:.3g}")
    _save(ov, model, out)
    return {"inputs": names, "output": network.output, "max_abs_diff_vs_torch": diff,
            REFERENCE_KEY: reference_record(probe, expected)}


def _save(ov, model, out: Path) -> None:
    """`ov.save_model` into the staging folder `out`, fp32 weights kept. On a full disk OpenVINO says only
    `basic_ios::clear: iostream error`, so a failure is held against the space there: where the IR would not fit,
    it is raised as ENOSPC naming the cache folder, the space free and the space the IR needs."""
    try:
        ov.save_model(model, str(out / MODEL_FILE), compress_to_fp16=False)
    except Exception as exc:
        try:
            needed = sum(op.get_byte_size() for op in model.get_ordered_ops() if op.get_type_name() == "Constant")
            written = sum(f.stat().st_size for f in out.iterdir() if f.is_file())  # freed with the staging folder
            free = shutil.disk_usage(out).free + written
        except Exception:  # the check is best effort: the save's own error says what it can
            raise exc from None
        if free >= needed + needed // 10 + _MIB:  # room enough: something else failed
            raise
        said = str(exc).strip()[:200]
        raise OSError(errno.ENOSPC, f"no space for the OpenVINO IR in the cache folder {out.parent}: "
                                    f"{_size(free)} free, the IR needs about {_size(needed)}; free some or set "
                                    f"{CACHE_ENV} to a larger volume (OpenVINO said: {said})") from exc


def _size(n: float) -> str:
    """Bytes for a message: "512 bytes", "91.6 KiB", "86.7 MiB", "1.2 GiB"."""
    if n < 1024:
        return f"{n:.0f} bytes"
    units = ["KiB", "MiB", "GiB"]
    n /= 1024
    while n >= 1024 and len(units) > 1:
        n /= 1024
        units.pop(0)
    return f"{n:.1f} {units[0]}"


def _compress(fp32: CachedArtifact, out: Path) -> dict:
    """NNCF int8 weight compression of the fp32 IR (activations are quantized dynamically at run time)."""
    ov = import_openvino()
    model = ov.Core().read_model(str(fp32.path))
    with quiet_openvino():
        import nncf

        compressed = nncf.compress_weights(model, mode=nncf.CompressWeightsMode.INT8_ASYM)
    _save(ov, compressed, out)
    return {"inputs": fp32.meta["inputs"], "output": fp32.meta["output"],
            "quantization": "NNCF int8 weight compression (INT8_ASYM, per output channel); activations "
                            "quantized dynamically by the CPU plugin at run time"}


def pre_exported_onnx(network: Network, dtype: str) -> CachedArtifact | None:
    """The fp32 graph of a pre-exported directory (`openrerank export --out DIR`), which OpenVINO reads as it
    is, without PyTorch (the container image serves this way); None for a plain model directory.

    OpenVINO's ONNX frontend takes ONNX Runtime's fused operators (Attention, SkipLayerNormalization, ...);
    its result is compared with ONNX Runtime's on the probe batch and refused past the conversion tolerance,
    so `--backend auto` falls back to ONNX Runtime rather than serve different numbers. ONNX Runtime's outputs
    are the reference a bf16 compile is then held to (`probe_reference` in the returned metadata)."""
    from openrerank.runtimes.onnx_export import ExportError, servable_export
    from openrerank.sources.safety import is_onnx_export

    folder = Path(network.path)
    if not is_onnx_export(folder):
        return None
    if dtype == "int8":
        raise ConversionError(f"{folder} is a pre-exported ONNX directory; OpenVINO runs its fp32 graph in fp32 "
                              "or bf16. For int8, export with --dtype int8 (ONNX Runtime) or serve the model folder")
    try:
        export = servable_export(network, "fp32")
    except ExportError as exc:
        raise ConversionError(str(exc)) from exc
    names = list(export.meta.get("inputs") or [])
    diff, expected = _diff_from_onnxruntime(export.path, names, folder)
    if diff > _TOLERANCE:
        raise ConversionError(f"OpenVINO reads {export.path} {diff:.3g} away from ONNX Runtime")
    return CachedArtifact(export.path, True, export.key, {
        **export.meta, "max_abs_diff_vs_onnxruntime": diff,
        REFERENCE_KEY: reference_record(probe_batch(folder, names), expected)})


def _diff_from_onnxruntime(onnx_file: Path, names: list[str], folder: Path) -> tuple[float, np.ndarray]:
    """How far OpenVINO's f32 compile of `onnx_file` is from ONNX Runtime on the probe batch, and ONNX
    Runtime's outputs."""
    from openrerank.runtimes.onnx_runtime import import_onnxruntime

    ort = import_onnxruntime()
    probe = probe_batch(folder, names)
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    expected = ort.InferenceSession(str(onnx_file), so, providers=["CPUExecutionProvider"]).run(None, probe)[0]
    ov = import_openvino()
    compiled = ov.Core().compile_model(str(onnx_file), "CPU", {"INFERENCE_PRECISION_HINT": "f32",
                                                               "INFERENCE_NUM_THREADS": 1})
    expected = np.asarray(expected, dtype=np.float32)
    return _max_diff(compiled(probe)[0], expected), expected


def ensure_openvino(network: Network, *, variant: str = "fp32", cache_dir: Path | None = None) -> CachedArtifact:
    """Return the cached OpenVINO IR of this network (`variant` fp32 or int8), converting it first if needed."""
    if variant not in IR_VARIANTS:
        raise ConversionError(f"OpenVINO IR variants are {', '.join(IR_VARIANTS)}, not {variant!r}")
    cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
    key, facts = cache_key(network, variant)

    def build(tmp: Path) -> dict:
        if variant == "int8":
            base = ensure_openvino(network, variant="fp32", cache_dir=cache_dir)
            log.info("compressing the weights of %s to int8 with NNCF (first start with these options; cached "
                     "afterwards)", network.path)
            details = _compress(base, tmp)
        else:
            log.info("converting %s to OpenVINO (first start with these options; cached afterwards)",
                     network.path)
            details = _convert(network, tmp)
        return {**details, "source": str(network.path), "torch": package_versions("torch")["torch"]}

    return ensure_artifact(cache_dir, key, variant, model_file=MODEL_FILE, meta_file=META_FILE, facts=facts,
                           build=build, what=f"OpenVINO {variant} IR")

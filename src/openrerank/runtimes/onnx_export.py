"""Export a family's network to an optimized (and optionally int8) ONNX file, cached on disk.

Why a cache: exporting and fusing MiniLM takes several seconds, a large model minutes; a server restart
must not pay that again. The cache key hashes the model's content (config + weights) and everything that
changes the produced graph (the network's head and the family's build format, dtype, opset, exporter format,
transformers/onnxruntime versions; PyTorch's is recorded in export.json, not keyed, so a torch-free server finds
what `export` wrote), so an edited checkpoint, a family whose build now refuses or builds something else, or an
upgraded runtime re-exports while a plain restart reuses the file.

Steps (the same ones optimum and sentence-transformers' ONNX backend take):
1. `torch.onnx.export` (the TorchScript exporter, `dynamo=False`: the dynamo exporter needs `onnxscript`
   and does not produce the attention pattern ONNX Runtime's fusions recognise) of the module the family
   builds (its readout included: logits or pooled embeddings), eager attention, dynamic batch and sequence
   axes, traced on a padded dummy batch so the attention mask stays a real input.
2. `onnxruntime.transformers.optimizer.optimize_model` where the family names a recipe (BERT-like
   encoders): fused embedding+LayerNorm, multi-head Attention, bias+GELU and skip+LayerNorm kernels. The
   fused graph is checked against the plain export on a padded batch; if a fusion changed the numbers, the
   plain export is kept.
3. `--dtype int8`: `onnxruntime.quantization.quantize_dynamic` (int8 weights per output channel,
   activations quantized on the fly), which uses VNNI dot products where the CPU has them.

Caching, keys and the atomic publication two concurrent starts rely on: `runtimes/artifact_cache.py`.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from openrerank.runtimes.artifact_cache import (
    CACHE_ENV,
    CachedArtifact,
    cache_root,
    check_entry,
    ensure_artifact,
    key_of,
    package_versions,
    read_meta,
)
from openrerank.runtimes.artifact_cache import model_fingerprint as model_fingerprint
from openrerank.runtimes.base import ModelRefusedError, Network, NetworkBuild, probe_features
from openrerank.runtimes.onnx_runtime import ONNX_DTYPES, import_onnxruntime
from openrerank.sources.safety import ONNX_EXPORT_FILES, is_onnx_export

log = logging.getLogger(__name__)

DEFAULT_OPSET = 17
#: Bump when the export recipe changes in a way the versions below would not capture.
EXPORT_FORMAT = 4
MODEL_FILE, META_FILE = ONNX_EXPORT_FILES  # the graph and its export record
_FUSION_TOLERANCE = 1e-3
#: What `ensure_onnx` returns: the model.onnx path, whether it was cached, the key and export.json's facts.
ExportResult = CachedArtifact
__all__ = ["CACHE_ENV", "ExportError", "ExportResult", "default_cache_dir", "ensure_onnx", "exported_runtimes",
           "model_fingerprint", "servable_export"]


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """ORT's optimizer and quantizer log every fusion and tensor at INFO (some on the root logger)."""
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)  # incl. the quantizer's generic "consider pre-processing" advice
    try:
        yield
    finally:
        logging.disable(previous)


class ExportError(ModelRefusedError):
    """The model could not be exported to ONNX."""


def default_cache_dir() -> Path:
    """`$OPENRERANK_CACHE_DIR` when set, else `$XDG_CACHE_HOME/openrerank/onnx`."""
    return cache_root()


def _versions() -> dict[str, str]:
    """The versions that key an export; computed without PyTorch (see artifact_cache)."""
    return package_versions("transformers", "onnxruntime")


def keyed_facts() -> dict:
    """What keys every export on this install besides the model and its options (the recipe number, the
    versions): an entry that recorded others is never read here (`openrerank cache prune` removes it)."""
    return {"format": EXPORT_FORMAT, **_versions()}


def cache_key(network: Network, *, dtype: str, opset: int) -> tuple[str, dict]:
    """The cache key and the facts it was built from (kept next to the model for inspection)."""
    facts = {
        "model_sha256": model_fingerprint(network.path),
        "head": network.head,
        "build_format": network.build_format,
        "dtype": dtype,
        "opset": opset,
        "format": EXPORT_FORMAT,
        **_versions(),
    }
    return key_of(facts), facts


def _torch_export(network: Network, out: Path, opset: int) -> tuple[list[str], dict]:
    """Plain ONNX export; returns the input names and a padded probe batch with the torch outputs."""
    import warnings

    import torch

    module = network.build(NetworkBuild(export=True)).eval()
    names = list(module.input_names)
    config = json.loads((Path(network.path) / "config.json").read_text(encoding="utf-8"))
    probe = probe_features(names, int(config.get("vocab_size") or 1000))
    with torch.inference_mode():
        expected = module(*(torch.from_numpy(probe[n]) for n in names)).float().numpy()
    axes = {n: {0: "batch", 1: "sequence"} for n in names}
    axes[network.output] = {0: "batch"}
    with warnings.catch_warnings(), torch.inference_mode(False), torch.no_grad():
        warnings.simplefilter("ignore")  # tracer chatter about Python booleans; checked numerically below
        torch.onnx.export(
            module, tuple(torch.from_numpy(probe[n]) for n in names), str(out),
            input_names=names, output_names=[network.output], dynamic_axes=axes, opset_version=opset,
            do_constant_folding=True, dynamo=False,
        )
    return names, {"inputs": probe, "expected": expected}


def _run_onnx(path: Path, feats: dict[str, np.ndarray]) -> np.ndarray:
    ort = import_onnxruntime()
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    return sess.run(None, feats)[0]


def _max_diff(out: np.ndarray, expected: np.ndarray) -> float:
    return float(np.abs(out.astype(np.float32) - expected).max())


def _fuse(raw: Path, out: Path, network: Network, probe: dict) -> str:
    """Transformer fusions when the architecture has them and they keep the numbers; returns what was done."""
    config = json.loads((Path(network.path) / "config.json").read_text(encoding="utf-8"))
    family = network.fusion
    if family is None:
        shutil.copyfile(raw, out)
        return "none (no fusion recipe for this model type; ORT session optimizations still apply)"
    optimize_model = import_onnxruntime("onnxruntime.transformers.optimizer").optimize_model
    heads = int(config.get("num_attention_heads") or config.get("n_heads") or 0)
    hidden = int(config.get("hidden_size") or config.get("dim") or 0)
    with _quiet():
        optimized = optimize_model(str(raw), model_type=family, num_heads=heads, hidden_size=hidden,
                                   opt_level=0, use_gpu=False)
        fused = {k: v for k, v in optimized.get_fused_operator_statistics().items() if v}
        optimized.save_model_to_file(str(out))
    got = _run_onnx(out, probe["inputs"])
    diff = _max_diff(got, probe["expected"])
    if diff > _FUSION_TOLERANCE:
        log.warning("ORT fusions changed the outputs by %.2g; keeping the unfused export", diff)
        shutil.copyfile(raw, out)
        return f"none (fusion rejected, max diff {diff:.2g})"
    return ", ".join(f"{k}x{v}" for k, v in sorted(fused.items())) or "none found"


def _quantize(src: Path, out: Path) -> None:
    """Dynamic int8: int8 weights per output channel, uint8/int8 activations quantized per batch at run time."""
    from onnx import TensorProto
    quantization = import_onnxruntime("onnxruntime.quantization")

    with _quiet():
        quantization.quantize_dynamic(
            str(src), str(out), weight_type=quantization.QuantType.QInt8, per_channel=True,
            # Fused contrib ops (Attention, SkipLayerNormalization) have no shape-inferred output types.
            extra_options={"DefaultTensorType": TensorProto.FLOAT},
        )


def servable_export(network: Network, dtype: str) -> ExportResult | None:
    """The export inside a pre-exported directory (`openrerank export --out DIR`: model.onnx + export.json
    beside the tokenizer and config), opened as it is, without PyTorch; None for a plain model directory.

    Never rebuilt, so what the cache's key does is checked here: a directory of a newer export format (a layout
    this version may misread) or of another build format of the family (`Family.build_format`: a build without
    this version's checks of the checkpoint, or one this version would build otherwise) is refused, naming both
    numbers."""
    folder = Path(network.path)
    if not is_onnx_export(folder):
        return None
    meta, damage = check_entry(folder, MODEL_FILE, META_FILE)
    if meta is None:
        raise ExportError(f"{folder} is a damaged ONNX export ({damage or f'{META_FILE} is unreadable'}); "
                          "export it again")
    written = meta.get("format")
    if isinstance(written, int) and written > EXPORT_FORMAT:
        raise ExportError(f"{folder} was written by a newer openrerank (export format {written}; this one reads "
                          f"{EXPORT_FORMAT} and older): serve it with that version, or export it again with this one")
    built = meta.get("build_format")
    if built != network.build_format:
        who = "a newer" if isinstance(built, int) and built > network.build_format else "an older"
        shown = "none" if built is None else built
        raise ExportError(f"{folder} was exported by {who} openrerank (network build format {shown}; this one builds "
                          f"format {network.build_format}, which refuses or builds some checkpoints otherwise): "
                          "export it again with this version")
    if meta.get("dtype", dtype) != dtype:
        raise ExportError(f"{folder} holds a {meta['dtype']} ONNX export; serve it with --dtype {meta['dtype']}")
    if meta.get("head", network.head) != network.head:
        raise ExportError(f"{folder} holds an export of {meta['head']!r}, but its files describe {network.head!r}")
    return ExportResult(folder / MODEL_FILE, True, str(meta.get("key", "")), meta)


def exported_runtimes(folder: Path) -> tuple[str, ...]:
    """The runtimes that serve a pre-exported directory: its fp32 graph runs on OpenVINO (read as ONNX, see
    `openvino_convert.pre_exported_onnx`) or ONNX Runtime; an int8 graph (ONNX Runtime's dynamic
    quantization) on ONNX Runtime only."""
    meta = read_meta(Path(folder), MODEL_FILE, META_FILE) or {}
    return ("openvino", "onnx") if meta.get("dtype", "fp32") == "fp32" else ("onnx",)


def ensure_onnx(network: Network, *, dtype: str = "fp32", opset: int = DEFAULT_OPSET,
                cache_dir: Path | None = None) -> ExportResult:
    """Return the cached ONNX model of this network, exporting (and quantizing) it first if needed."""
    if dtype not in ONNX_DTYPES:
        raise ExportError(f"ONNX export supports dtype {', '.join(ONNX_DTYPES)}, not {dtype!r}")
    if opset < 17:
        raise ExportError("opset 17 or newer is needed (LayerNormalization)")
    cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
    key, facts = cache_key(network, dtype=dtype, opset=opset)

    def build(tmp: Path) -> dict:
        if dtype == "int8":
            # Quantize the fused fp32 graph, itself cached (and reused by an fp32 start).
            base = ensure_onnx(network, dtype="fp32", opset=opset, cache_dir=cache_dir)
            _quantize(base.path, tmp / MODEL_FILE)
            details = {"inputs": base.meta["inputs"], "fusions": base.meta["fusions"],
                       "quantization": "dynamic int8, per-channel QInt8 weights"}
        else:
            raw = tmp / "raw.onnx"
            log.info("exporting %s to ONNX (first start with these options; cached afterwards)", network.path)
            try:
                names, probe = _torch_export(network, raw, opset)
            except OSError as exc:
                if exc.errno == errno.ENOSPC:  # the disk, not the model: say which folder and how to move it
                    free = shutil.disk_usage(tmp).free / 2**20
                    raise OSError(errno.ENOSPC, f"no space for the ONNX export in the cache folder {cache_dir}: "
                                                f"{free:.1f} MiB free; free some or set {CACHE_ENV} to a larger "
                                                "volume") from exc
                raise ExportError(f"{network.path} could not be exported to ONNX: {type(exc).__name__}: {exc}") \
                    from exc
            except ModuleNotFoundError as exc:
                if (exc.name or "").partition(".")[0] not in ("torch", "onnx"):
                    raise ExportError(f"{network.path} could not be exported to ONNX: {type(exc).__name__}: {exc}") \
                        from exc
                # A torch-free installation, the serving image's: one line on where an export can run instead.
                raise ExportError(
                    f"{network.path} could not be exported to ONNX: the export needs PyTorch and the onnx package "
                    f"({exc.name} is not installed; the serving image has neither): run it in the export image "
                    "(docs/deploy.md), or install PyTorch's CPU build first (scripts/install-torch.sh PYTHON), then "
                    "openrerank with its requirements (pip install -c constraints.txt ...)") from None
            except Exception as exc:  # an architecture the TorchScript exporter cannot trace
                raise ExportError(f"{network.path} could not be exported to ONNX: {type(exc).__name__}: {exc}") \
                    from exc
            plain_diff = _max_diff(_run_onnx(raw, probe["inputs"]), probe["expected"])
            if plain_diff > _FUSION_TOLERANCE:
                raise ExportError(f"the ONNX export of {network.path} differs from PyTorch by {plain_diff:.3g}")
            fusions = _fuse(raw, tmp / MODEL_FILE, network, probe)
            raw.unlink()
            details = {"inputs": names, "fusions": fusions}
        return {**details, "source": str(network.path), "torch": package_versions("torch")["torch"]}

    result = ensure_artifact(cache_dir, key, dtype, model_file=MODEL_FILE, meta_file=META_FILE, facts=facts,
                             build=build, what=f"ONNX {dtype} export")
    if not result.cached:
        log.info("ONNX fusions: %s", result.meta.get("fusions"))
    return result

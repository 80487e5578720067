"""Export a family's network to an optimized (and optionally int8) ONNX file, cached on disk.

Why a cache: exporting and fusing MiniLM takes several seconds, a large model minutes; a server restart
must not pay that again. The cache key hashes the model's content (config + weights) and everything that
changes the produced graph (the network's head, dtype, opset, exporter format, torch/transformers/onnxruntime
versions), so an edited checkpoint or an upgraded runtime re-exports while a plain restart reuses the file.

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

Each result is written into a temporary directory beside its final place and renamed, so two servers
starting at once never see a half-written model: the first rename wins, the loser discards its copy.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from openrerank.backends.base import Network, NetworkBuild
from openrerank.models.safety import ONNX_EXPORT_FILES, file_sha256, is_onnx_export

log = logging.getLogger(__name__)

CACHE_ENV = "OPENRERANK_CACHE_DIR"
ONNX_DTYPES = ("fp32", "int8")
DEFAULT_OPSET = 17
#: Bump when the export recipe changes in a way the versions below would not capture.
EXPORT_FORMAT = 4
MODEL_FILE, META_FILE = ONNX_EXPORT_FILES  # the graph and its export record

# Files whose bytes decide the exported graph; the tokenizer does not.
_WEIGHT_SUFFIXES = (".safetensors", ".bin")
_FUSION_TOLERANCE = 1e-3
# torch.onnx.export keeps global state (it asserts it is not re-entered), so exports within one process take
# turns; across processes the atomic rename below is what keeps the cache consistent.
_EXPORT_LOCK = threading.RLock()


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """ORT's optimizer and quantizer log every fusion and tensor at INFO (some on the root logger)."""
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)  # incl. the quantizer's generic "consider pre-processing" advice
    try:
        yield
    finally:
        logging.disable(previous)


class ExportError(RuntimeError):
    """The model could not be exported to ONNX."""


@dataclass(frozen=True)
class ExportResult:
    path: Path  # the model.onnx to load
    cached: bool  # True when an earlier export was reused
    key: str
    meta: dict


def default_cache_dir() -> Path:
    """`$OPENRERANK_CACHE_DIR` when set, else `~/.cache/openrerank/onnx`."""
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env).expanduser()
    return Path("~/.cache/openrerank/onnx").expanduser()


def model_fingerprint(model_dir: Path) -> str:
    """Content hash of config.json and the weight files: what the exported graph depends on."""
    model_dir = Path(model_dir)
    weights = sorted(p for p in model_dir.iterdir() if p.is_file() and p.name.endswith(_WEIGHT_SUFFIXES))
    files = [model_dir / "config.json", *weights]
    h = hashlib.sha256()
    for f in files:
        if f.is_file():
            h.update(f.name.encode())
            h.update(file_sha256(f).encode())
    return h.hexdigest()


def _versions() -> dict[str, str]:
    import onnxruntime
    import torch
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__,
            "onnxruntime": onnxruntime.__version__}


def cache_key(network: Network, *, dtype: str, opset: int) -> tuple[str, dict]:
    """The cache key and the facts it was built from (kept next to the model for inspection)."""
    facts = {
        "model_sha256": model_fingerprint(network.path),
        "head": network.head,
        "dtype": dtype,
        "opset": opset,
        "format": EXPORT_FORMAT,
        **_versions(),
    }
    key = hashlib.sha256(json.dumps(facts, sort_keys=True).encode()).hexdigest()[:24]
    return key, facts


def _dummy_inputs(input_names: list[str], vocab_size: int) -> dict[str, np.ndarray]:
    """A padded batch: with an all-ones mask transformers may drop the mask and the trace would bake that in."""
    rng = np.random.default_rng(0)
    ids = rng.integers(5, max(6, min(vocab_size, 1000)), size=(3, 17)).astype(np.int64)
    mask = np.ones_like(ids)
    mask[1, 11:] = 0
    mask[2, 5:] = 0
    ids[mask == 0] = 0
    feats = {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}
    return {n: feats[n] for n in input_names}


def _torch_export(network: Network, out: Path, opset: int) -> tuple[list[str], dict]:
    """Plain ONNX export; returns the input names and a padded probe batch with the torch outputs."""
    import warnings

    import torch

    module = network.build(NetworkBuild(export=True)).eval()
    names = list(module.input_names)
    config = json.loads((Path(network.path) / "config.json").read_text(encoding="utf-8"))
    probe = _dummy_inputs(names, int(config.get("vocab_size") or 1000))
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
    import onnxruntime as ort

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
    from onnxruntime.transformers.optimizer import optimize_model

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
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with _quiet():
        quantize_dynamic(
            str(src), str(out), weight_type=QuantType.QInt8, per_channel=True,
            # Fused contrib ops (Attention, SkipLayerNormalization) have no shape-inferred output types.
            extra_options={"DefaultTensorType": TensorProto.FLOAT},
        )


def _publish(tmp: Path, final: Path) -> bool:
    """Atomically move a finished export into place; False when another process got there first."""
    try:
        os.rename(tmp, final)
        return True
    except OSError:
        if (final / META_FILE).is_file():
            shutil.rmtree(tmp, ignore_errors=True)
            return False
        raise


def _read_meta(folder: Path) -> dict | None:
    try:
        meta = json.loads((folder / META_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return meta if (folder / MODEL_FILE).is_file() else None


def servable_export(network: Network, dtype: str) -> ExportResult | None:
    """The export inside a pre-exported directory (`openrerank export --out DIR`: model.onnx + export.json
    beside the tokenizer and config), opened as it is, without PyTorch; None for a plain model directory."""
    folder = Path(network.path)
    if not is_onnx_export(folder):
        return None
    meta = _read_meta(folder)
    if meta is None:
        raise ExportError(f"{folder}/{META_FILE} is unreadable")
    if meta.get("dtype", dtype) != dtype:
        raise ExportError(f"{folder} holds a {meta['dtype']} ONNX export; serve it with --dtype {meta['dtype']}")
    if meta.get("head", network.head) != network.head:
        raise ExportError(f"{folder} holds an export of {meta['head']!r}, but its files describe {network.head!r}")
    return ExportResult(folder / MODEL_FILE, True, str(meta.get("key", "")), meta)


def ensure_onnx(network: Network, *, dtype: str = "fp32", opset: int = DEFAULT_OPSET,
                cache_dir: Path | None = None) -> ExportResult:
    """Return the cached ONNX model of this network, exporting (and quantizing) it first if needed."""
    if dtype not in ONNX_DTYPES:
        raise ExportError(f"ONNX export supports dtype {', '.join(ONNX_DTYPES)}, not {dtype!r}")
    if opset < 17:
        raise ExportError("opset 17 or newer is needed (LayerNormalization)")
    cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
    key, facts = cache_key(network, dtype=dtype, opset=opset)
    final = cache_dir / f"{key}-{dtype}"
    meta = _read_meta(final)
    if meta is not None:
        log.info("ONNX cache hit: %s", final / MODEL_FILE)
        return ExportResult(final / MODEL_FILE, True, key, meta)
    with _EXPORT_LOCK:
        meta = _read_meta(final)  # another thread may have finished it while we waited
        if meta is not None:
            return ExportResult(final / MODEL_FILE, True, key, meta)
        return _export_into(network, final, key, facts, dtype=dtype, opset=opset, cache_dir=cache_dir)


def _export_into(network: Network, final: Path, key: str, facts: dict, *, dtype: str, opset: int,
                 cache_dir: Path) -> ExportResult:
    cache_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=cache_dir))
    tmp.chmod(0o755)  # mkdtemp makes it private; the cache may be shared by several users' servers
    try:
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
            except Exception as exc:  # an architecture the TorchScript exporter cannot trace
                raise ExportError(f"{network.path} could not be exported to ONNX: {type(exc).__name__}: {exc}") \
                    from exc
            plain_diff = _max_diff(_run_onnx(raw, probe["inputs"]), probe["expected"])
            if plain_diff > _FUSION_TOLERANCE:
                raise ExportError(f"the ONNX export of {network.path} differs from PyTorch by {plain_diff:.3g}")
            fusions = _fuse(raw, tmp / MODEL_FILE, network, probe)
            raw.unlink()
            details = {"inputs": names, "fusions": fusions}
        meta = {**facts, **details, "source": str(network.path), "key": key,
                "export_seconds": round(time.perf_counter() - started, 2)}
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2), encoding="utf-8")
        _publish(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    meta = _read_meta(final) or meta
    log.info("ONNX %s export ready in %.1fs: %s (fusions: %s)", dtype, meta["export_seconds"],
             final / MODEL_FILE, meta.get("fusions"))
    return ExportResult(final / MODEL_FILE, False, key, meta)

"""What a sentence-transformers `modules.json` stack says, read and checked before anything is loaded.

A bi-encoder computes what `SentenceTransformer.encode` computes only if every module of its stack is run, so
the stack is read in full and a module openrerank cannot run is refused at load with one line, never skipped:
Transformer (the model's root folder), one Pooling, any Dense layers after it, and a Normalize at the end.

Pooling is read as sentence-transformers (>= 6) reads it: the `pooling_mode` string (or list, whose pooled
vectors are concatenated), else the legacy `pooling_mode_*` booleans (several true: concatenated in the
legacy keys' order; none: mean). Dense layers are `Linear` + the activation its config names (a `torch.nn`
class) + optionally the residual; their weights are `model.safetensors`, else `pytorch_model.bin`, which (like
the transformer's pickle weights) the loader refuses unless `--allow-pickle` (`BiEncoderFamily.weight_folders`)
and which is then read with `torch.load(weights_only=True)`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from openrerank.families.base import ModelFiles, ModelFormatError, _read_json
from openrerank.sources.safety import is_onnx_export

#: sentence-transformers' Pooling modes, under its names.
POOLING_MODES = ("cls", "max", "mean", "mean_sqrt_len_tokens", "weightedmean", "lasttoken")
#: Legacy boolean keys of 1_Pooling/config.json -> mode, in the order sentence-transformers concatenates them.
LEGACY_POOLING_KEYS = {
    "pooling_mode_cls_token": "cls",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
    "pooling_mode_weightedmean_tokens": "weightedmean",
    "pooling_mode_lasttoken": "lasttoken",
}
#: `torch.nn` activations a Dense config may name (instantiated without arguments, as sentence-transformers does).
DENSE_ACTIVATIONS = ("Identity", "Tanh", "ReLU", "GELU", "Sigmoid", "SiLU", "Softplus", "Mish", "LeakyReLU",
                     "ELU", "Hardtanh", "Softsign")
#: sentence-transformers' Dense default when its config names no activation.
DEFAULT_DENSE_ACTIVATION = "Tanh"
#: Module kinds (the last part of the type's dotted name) the family runs.
KNOWN_MODULES = ("Transformer", "Pooling", "Dense", "Normalize")
DENSE_WEIGHTS = "model.safetensors"
#: What sentence-transformers < 3 saved a Dense layer's weights as (a pickle).
DENSE_PICKLE = "pytorch_model.bin"


def module_kind(mod: Any) -> str | None:
    """`Pooling` for `sentence_transformers.models.Pooling` (or its >= 6 path); None for anything else
    (another library's class of the same name, e.g. PyLate's Dense, is not sentence-transformers')."""
    kind = str(mod.get("type", "")) if isinstance(mod, dict) else ""
    if not kind.startswith("sentence_transformers."):
        return None
    return kind.rsplit(".", 1)[-1]


def pooling_modes(cfg: dict) -> tuple[str, ...]:
    """The Pooling module's modes: its `pooling_mode`, else its legacy booleans (none true: mean)."""
    mode = cfg.get("pooling_mode")
    if mode is not None:
        modes = (mode,) if isinstance(mode, str) else tuple(mode) if isinstance(mode, list) else ()
    else:
        modes = tuple(m for key, m in LEGACY_POOLING_KEYS.items() if cfg.get(key)) or ("mean",)
    bad = [m for m in modes if m not in POOLING_MODES] or ([] if modes else [mode])
    if bad:
        raise ModelFormatError(f"pooling mode {bad[0]!r} is not one openrerank runs ({', '.join(POOLING_MODES)})")
    return modes


def dense_layer(files: ModelFiles, folder: str) -> dict:
    """A Dense module's settings as the network needs them (and /v1/metadata shows them)."""
    where = f"{files.path.name}/{folder}"
    cfg = _read_json(files.path / folder / "config.json")
    if not isinstance(cfg, dict) or "in_features" not in cfg or "out_features" not in cfg:
        raise ModelFormatError(f"{where}/config.json: a Dense module needs in_features and out_features")
    for side, verb in (("input", "over"), ("output", "writing")):
        named = cfg.get(f"module_{side}_name") or "sentence_embedding"
        if named != "sentence_embedding":  # another key: sentence-transformers leaves the embedding as it is
            raise ModelFormatError(f"{where}: a Dense module {verb} {named!r} (not the pooled "
                                   "sentence_embedding) is not one openrerank runs")
    name = str(cfg.get("activation_function") or f"torch.nn.{DEFAULT_DENSE_ACTIVATION}")
    activation = name.rsplit(".", 1)[-1]
    if not name.startswith("torch.nn.") or activation not in DENSE_ACTIVATIONS:
        raise ModelFormatError(f"{where}: activation_function {name!r} is not one openrerank runs (torch.nn "
                               f"{', '.join(DENSE_ACTIVATIONS)})")
    if not is_onnx_export(files.path) and not any((files.path / folder / f).is_file()
                                                  for f in (DENSE_WEIGHTS, DENSE_PICKLE)):
        raise ModelFormatError(f"{where} has no {DENSE_WEIGHTS} (nor {DENSE_PICKLE}, read with --allow-pickle)")
    return {"path": folder, "in_features": int(cfg["in_features"]), "out_features": int(cfg["out_features"]),
            "bias": bool(cfg.get("bias", True)), "activation": activation,
            "residual": bool(cfg.get("use_residual", False))}


def read_stack(files: ModelFiles) -> dict:
    """Pooling modes, Dense layers and Normalize of a modules.json stack; ModelFormatError for a stack (or a
    module) openrerank cannot run exactly."""
    mods = files.modules or []
    kinds = [module_kind(m) for m in mods]
    if "Pooling" not in kinds:
        raise ModelFormatError(f"{files.path}/modules.json has no Pooling module")
    for mod, kind in zip(mods, kinds, strict=True):
        if kind not in KNOWN_MODULES:
            raise ModelFormatError(
                f"{files.path}/modules.json: module {mod.get('type') if isinstance(mod, dict) else mod!r} is not "
                f"one the bi-encoder family runs ({', '.join(KNOWN_MODULES)}); openrerank refuses it rather than "
                "serve embeddings that skip it")
    order = [k for k in kinds if k != "Dense"]
    normalize = kinds[-1] == "Normalize"
    if (kinds[0] != "Transformer" or order.count("Transformer") != 1 or order.count("Pooling") != 1
            or kinds.index("Pooling") != 1 or kinds.count("Normalize") > int(normalize)):
        raise ModelFormatError(f"{files.path}/modules.json: {' -> '.join(map(str, kinds))} is not a stack openrerank "
                               "runs (Transformer -> Pooling -> Dense layers -> Normalize)")
    if str(mods[0].get("path", "")).strip("./"):
        raise ModelFormatError(f"{files.path}/modules.json: the Transformer is in {mods[0]['path']!r}; openrerank "
                               "reads it from the model's root folder")
    pool_cfg = _read_json(files.path / str(mods[1].get("path", "")) / "config.json") or {}
    try:
        modes = pooling_modes(pool_cfg)
    except ModelFormatError as exc:
        raise ModelFormatError(f"{files.path}/{mods[1].get('path', '')}: {exc}") from None
    dense = [dense_layer(files, str(m.get("path", ""))) for m, k in zip(mods, kinds, strict=True) if k == "Dense"]
    return {"pooling": modes, "include_prompt": pool_cfg.get("include_prompt", True) is not False,
            "dense": dense, "normalize": normalize}


def load_dense(path: Path, layer: dict):
    """The Dense module as a torch module: Linear, activation, residual, as sentence-transformers runs it.
    Its weights: `model.safetensors`, else `pytorch_model.bin` (the loader has refused that pickle unless
    --allow-pickle was given), read with `weights_only=True`: tensors only, as transformers reads a model's."""
    import pickle

    import torch
    from safetensors.torch import load_file

    class Dense(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.linear = torch.nn.Linear(layer["in_features"], layer["out_features"], bias=layer["bias"])
            self.activation = getattr(torch.nn, layer["activation"])()
            self.residual = (torch.nn.Linear(layer["in_features"], layer["out_features"], bias=False)
                             if layer["residual"] and layer["in_features"] != layer["out_features"] else None)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            out = self.activation(self.linear(x))
            if layer["residual"]:
                out = out + (x if self.residual is None else self.residual(x))
            return out

    module = Dense()
    file = path / layer["path"] / DENSE_WEIGHTS
    try:
        if file.is_file():
            state = load_file(str(file))
        else:
            file = path / layer["path"] / DENSE_PICKLE
            state = torch.load(str(file), map_location="cpu", weights_only=True)
        module.load_state_dict(state, strict=True)
    except (RuntimeError, OSError, pickle.UnpicklingError) as exc:
        raise ModelFormatError(f"{file}: not the weights its config describes ({exc})") from exc
    return module.eval()

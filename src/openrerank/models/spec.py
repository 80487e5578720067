"""What kind of reranker a model directory holds, read from its files alone."""

from __future__ import annotations

import json
from dataclasses import dataclass
from enum import Enum
from pathlib import Path


class ModelKind(str, Enum):
    CROSS_ENCODER = "cross-encoder"
    BI_ENCODER = "bi-encoder"


class ModelFormatError(ValueError):
    """The directory is not a model openrerank can serve."""


# Models whose position ids start after the padding index: usable length is max_position_embeddings - 2.
_OFFSET_POSITIONS = {"roberta", "xlm-roberta", "camembert", "longformer", "mpnet"}
_UNBOUNDED = 100_000


@dataclass(frozen=True)
class ModelSpec:
    path: Path
    kind: ModelKind
    model_type: str
    architecture: str | None
    num_labels: int
    max_length: int
    pooling: str = "mean"
    normalize: bool = True

    def as_metadata(self) -> dict:
        return {
            "kind": self.kind.value,
            "model_type": self.model_type,
            "architecture": self.architecture,
            "num_labels": self.num_labels,
            "max_length": self.max_length,
            **({"pooling": self.pooling} if self.kind is ModelKind.BI_ENCODER else {}),
        }


def _read_json(path: Path) -> dict | list | None:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelFormatError(f"{path} is not valid JSON: {exc}") from exc


def _pooling_mode(path: Path, modules: list) -> str:
    for mod in modules:
        if str(mod.get("type", "")).endswith("Pooling"):
            cfg = _read_json(path / mod.get("path", "") / "config.json") or {}
            for key, mode in (
                ("pooling_mode_cls_token", "cls"),
                ("pooling_mode_max_tokens", "max"),
                ("pooling_mode_mean_sqrt_len_tokens", "mean_sqrt_len"),
                ("pooling_mode_mean_tokens", "mean"),
            ):
                if cfg.get(key):
                    return mode
            return "mean"
    raise ModelFormatError(f"{path}/modules.json has no Pooling module")


def _max_length(path: Path, config: dict, sbert_max: int | None) -> int:
    """The pair/text window: sentence-transformers' max_seq_length, else the tokenizer's, else positions."""
    positions = int(config.get("max_position_embeddings", 512))
    if config.get("model_type") in _OFFSET_POSITIONS:
        positions -= 2
    candidates = [positions]
    tok_cfg = _read_json(path / "tokenizer_config.json") or {}
    tok_max = tok_cfg.get("model_max_length")
    if isinstance(tok_max, (int, float)) and 0 < tok_max < _UNBOUNDED:
        candidates.append(int(tok_max))
    if sbert_max:
        candidates.append(int(sbert_max))
    return min(candidates)


def _num_labels(config: dict) -> int:
    """As transformers reads it: id2label wins, then num_labels, else its default of 2."""
    if config.get("id2label"):
        return len(config["id2label"])
    return int(config.get("num_labels") or 2)


def detect_spec(path: Path) -> ModelSpec:
    """Cross-encoder if config.json names a *ForSequenceClassification; bi-encoder if modules.json pools."""
    path = Path(path)
    config = _read_json(path / "config.json")
    if not isinstance(config, dict):
        raise ModelFormatError(f"{path} has no config.json: not a Hugging Face model directory")
    model_type = str(config.get("model_type", "unknown"))
    archs = config.get("architectures") or []
    modules = _read_json(path / "modules.json")
    sbert = _read_json(path / "sentence_bert_config.json") or {}
    sbert_max = sbert.get("max_seq_length") if isinstance(sbert, dict) else None

    classifier = next((a for a in archs if a.endswith("ForSequenceClassification")), None)
    if classifier:
        num_labels = _num_labels(config)
        if num_labels not in (1, 2):
            raise ModelFormatError(
                f"{path}: {classifier} has {num_labels} labels; a reranker needs 1 (relevance logit) or 2 (no/yes)"
            )
        return ModelSpec(path, ModelKind.CROSS_ENCODER, model_type, classifier, num_labels,
                         _max_length(path, config, sbert_max))
    if isinstance(modules, list):
        return ModelSpec(path, ModelKind.BI_ENCODER, model_type, archs[0] if archs else None, 0,
                         _max_length(path, config, sbert_max), pooling=_pooling_mode(path, modules),
                         normalize=True)
    raise ModelFormatError(
        f"{path}: neither a sequence-classification cross-encoder (config.json architectures "
        f"*ForSequenceClassification, found {archs or 'none'}) nor a sentence-transformers bi-encoder "
        "(modules.json with a Pooling module)"
    )

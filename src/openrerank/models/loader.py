"""Load a model source into something that scores: spec + tokenizer + text preparer + backend."""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from openrerank.backends.base import Backend
from openrerank.backends.bi_encoder import BiEncoderBackend
from openrerank.backends.registry import create_backend, resolve_backend_name
from openrerank.engine.batching import split_batches
from openrerank.models.safety import check_weights
from openrerank.models.source import resolve_local_dir
from openrerank.models.spec import ModelKind, ModelSpec, detect_spec
from openrerank.schemas.internal import Truncate
from openrerank.text.prepare import TextPreparer

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoadOptions:
    backend: str = "auto"
    dtype: str = "fp32"
    device: str = "cpu"
    threads: int | None = None
    max_length: int | None = None  # override of the model's window (never above it)
    allow_pickle: bool = False
    revision: str | None = None


@dataclass
class LoadedModel:
    spec: ModelSpec
    preparer: TextPreparer
    backend: Backend
    weights_format: str

    @property
    def kind(self) -> ModelKind:
        return self.spec.kind

    @property
    def max_length(self) -> int:
        return self.preparer.max_length

    def score(self, query: str, passages: list[str], truncate: Truncate = Truncate.END,
              max_batch_tokens: int = 16384, max_batch_size: int = 128) -> np.ndarray:
        """Synchronous scoring of one query (eval, bench, tests): one logit per passage.

        Batches follow the server's policy (`split_batches`); chunked passages get their best
        window's score, like the server does.
        """
        prep = self.preparer.prepare(query, passages, truncate)
        scores = np.zeros(len(prep.items), dtype=np.float32)
        for idx in split_batches(prep.items, max_batch_tokens, max_batch_size):
            scores[idx] = self.backend.score([prep.items[i] for i in idx])
        out = np.full(len(passages), -np.inf, dtype=np.float32)
        np.maximum.at(out, np.asarray(prep.owners, dtype=np.int64), scores)
        return out

    def embed(self, texts: list[str], batch_size: int = 64) -> np.ndarray:
        """L2-normalized embeddings (bi-encoders only), truncated to the model window."""
        if not isinstance(self.backend, BiEncoderBackend):
            raise TypeError(f"{self.spec.path} is a {self.kind.value}; only bi-encoders embed")
        out = []
        order = np.argsort([len(t) for t in texts])  # length-sorted batches pad less
        for start in range(0, len(texts), batch_size):
            chunk = [texts[i] for i in order[start : start + batch_size]]
            ids = self.preparer._encode(self.preparer._right, chunk, truncation=True,
                                        max_length=self.max_length)["input_ids"]
            out.append(self.backend.embed_ids(ids))
        emb = np.concatenate(out) if out else np.zeros((0, 0), np.float32)
        result = np.empty_like(emb)
        result[order] = emb
        return result

    def close(self) -> None:
        self.backend.close()


def check_runnable(weights_format: str, options: LoadOptions) -> None:
    """A pre-exported ONNX directory has no PyTorch weights: only ONNX Runtime can serve it."""
    if weights_format == "onnx" and resolve_backend_name(options.backend, options.device, options.dtype) != "onnx":
        raise ValueError("a pre-exported ONNX directory (model.onnx + export.json) is served by ONNX Runtime "
                         "only: use --backend onnx (or auto) on CPU")


def load_model(source: str, options: LoadOptions | None = None) -> LoadedModel:
    """Resolve, check (safetensors unless allowed), detect the kind, load tokenizer and backend."""
    from transformers import AutoTokenizer

    options = options or LoadOptions()
    path: Path = resolve_local_dir(source, allow_pickle=options.allow_pickle, revision=options.revision)
    weights_format = check_weights(path, allow_pickle=options.allow_pickle)
    check_runnable(weights_format, options)
    spec = detect_spec(path)
    if options.max_length:
        spec = replace(spec, max_length=min(spec.max_length, options.max_length))
    tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    preparer = TextPreparer(tokenizer, spec.kind, spec.max_length)
    backend = create_backend(spec, preparer.pad_id, backend=options.backend, dtype=options.dtype,
                             device=options.device, threads=options.threads)
    log.info("loaded %s (%s, %s weights) on %s, window %d tokens", path, spec.kind.value,
             weights_format, backend.description, spec.max_length)
    return LoadedModel(spec, preparer, backend, weights_format)

"""Load a model source into something that scores: the one composition root of the model side.

source (`models/`: where the files are, are they safe) -> files -> family (`families/`: what kind of
reranker) -> tokenizer + text encoder (`text/`) -> runtime + scorer (`backends/`). The packages below know
nothing of each other beyond what this module wires together; the server (`engine/served.py`), `eval`,
`bench` and `export` all load models through here.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace

import numpy as np

from openrerank.backends.base import Backend
from openrerank.backends.bi_scorer import BiEncoderScorer
from openrerank.backends.selection import check_backend_options, create_runtime
from openrerank.engine.batching import BatchPolicy
from openrerank.families.base import Family, ModelFiles, ModelSpec
from openrerank.families.registry import resolve_spec
from openrerank.models.safety import check_weights
from openrerank.models.source import ModelSource, parse_model_arg, resolve_local_dir
from openrerank.schemas.internal import ScoreKind, Truncate
from openrerank.schemas.work import PairItem
from openrerank.text.bi import BiTextEncoder
from openrerank.text.prepare import TextEncoder

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


@dataclass(frozen=True)
class ResolvedModel:
    """A model located, checked and understood, before anything heavy is loaded."""

    source: ModelSource
    weights_format: str
    family: Family
    spec: ModelSpec
    engine: str  # the runtime it will run on (onnx | torch)


@dataclass
class LoadedModel:
    source: ModelSource
    spec: ModelSpec
    family: Family
    encoder: TextEncoder
    backend: Backend
    weights_format: str

    @property
    def score_kind(self) -> ScoreKind:
        return self.family.score_kind

    @property
    def max_length(self) -> int:
        return self.encoder.max_length

    @property
    def embeds(self) -> bool:
        """Whether the model hands out embeddings (bi-encoders), not only pair scores."""
        return isinstance(self.backend, BiEncoderScorer) and isinstance(self.encoder, BiTextEncoder)

    def score(self, query: str, passages: list[str], truncate: Truncate = Truncate.END,
              policy: BatchPolicy | None = None) -> np.ndarray:
        """Synchronous scoring of one query (eval, bench, tests): one score per passage.

        Batches are cut by the server's one batching policy and chunk scores fold to their passage the way
        the server folds them.
        """
        prep = self.encoder.prepare(query, passages, truncate)
        scores = np.zeros(len(prep.items), dtype=np.float32)
        for idx in (policy or BatchPolicy()).split(prep.items):
            scores[idx] = self.backend.score([prep.items[i] for i in idx])
        return prep.fold(scores, len(passages))

    def embed(self, texts: list[str], batch_size: int = 64) -> np.ndarray:
        """L2-normalized embeddings (bi-encoders only), truncated to the model window."""
        if not self.embeds:
            raise TypeError(f"{self.source.served_id} is a {self.family.id}; only bi-encoders embed")
        seqs = [PairItem(ids) for ids in self.encoder.encode_texts(texts)]
        out = np.zeros((len(texts), 0), dtype=np.float32)
        for idx in BatchPolicy(max_size=batch_size).split(seqs):
            emb = self.backend.embed_ids([seqs[i].input_ids for i in idx])  # type: ignore[attr-defined]
            if out.shape[1] == 0:
                out = np.zeros((len(texts), emb.shape[1]), dtype=np.float32)
            out[idx] = emb
        return out

    def describe(self) -> dict:
        """What /v1/metadata and logs say about the model: family, engine, window, family facts."""
        return {"source": self.source.spec, "score": self.score_kind.value, "backend": self.backend.description,
                "weights_format": self.weights_format, **self.spec.as_metadata()}

    def close(self) -> None:
        self.backend.close()


def model_sources(models: list[str], families: list[str] | None = None,
                  instructions: list[str] | None = None) -> list[ModelSource]:
    """`--model` values with the `--model-family NAME=FAMILY` and `--instruction NAME=TEXT` they get.

    NAME is a served id; with a single model it may be left out (`--model-family qwen3-reranker`).
    """
    sources = [parse_model_arg(m) for m in models]
    ids = [s.served_id for s in sources]

    def assign(args: list[str] | None, flag: str) -> dict[str, str]:
        out: dict[str, str] = {}
        for arg in args or []:
            name, sep, value = arg.partition("=")
            if sep and name.strip() in ids:
                out[name.strip()] = value.strip() if flag == "--model-family" else value
            elif len(ids) == 1 and not (flag == "--model-family" and sep):
                out[ids[0]] = arg.strip() if flag == "--model-family" else arg
            else:
                raise ValueError(f"{flag} {arg!r}: use NAME=VALUE with NAME one of the served ids "
                                 f"({', '.join(ids)})")
        return out

    fams = assign(families, "--model-family")
    instr = assign(instructions, "--instruction")
    return [replace(s, family=fams.get(s.served_id), instruction=instr.get(s.served_id)) for s in sources]


def resolve_model(source: ModelSource | str, options: LoadOptions | None = None) -> ResolvedModel:
    """Locate (downloading from the hub if needed), check the weights, detect the family, check the engine."""
    if isinstance(source, str):
        source = ModelSource(source, source)
    options = options or LoadOptions()
    path = resolve_local_dir(source.spec, allow_pickle=options.allow_pickle, revision=options.revision)
    weights_format = check_weights(path, allow_pickle=options.allow_pickle)
    family, spec = resolve_spec(ModelFiles.read(path, name=source.spec), source.family, source.instruction)
    if options.max_length:
        spec = replace(spec, max_length=min(spec.max_length, options.max_length))
    engine = check_backend_options(options.backend, options.dtype, options.device, family.engines, family.id)
    if weights_format == "onnx" and engine != "onnx":
        raise ValueError(f"{source.spec} is a pre-exported ONNX directory (model.onnx + export.json), served by "
                         "ONNX Runtime only: use --backend onnx (or auto) on CPU")
    return ResolvedModel(source, weights_format, family, spec, engine)


def load_model(source: ModelSource | str, options: LoadOptions | None = None) -> LoadedModel:
    """Resolve, then load tokenizer, text encoder, runtime and scorer (blocking; seconds to minutes)."""
    from transformers import AutoTokenizer

    options = options or LoadOptions()
    resolved = resolve_model(source, options)
    family, spec = resolved.family, resolved.spec
    tokenizer = AutoTokenizer.from_pretrained(str(spec.path), local_files_only=True)
    encoder = family.text_encoder(spec, tokenizer)
    runtime = create_runtime(family.network(spec, tokenizer), engines=family.engines, backend=options.backend,
                             dtype=options.dtype, device=options.device, threads=options.threads,
                             family=family.id)
    backend = family.scorer(spec, runtime, encoder.pad_id)
    log.info("loaded %s as %s (%s weights) on %s, window %d tokens", resolved.source.spec, family.id,
             resolved.weights_format, backend.description, spec.max_length)
    return LoadedModel(resolved.source, spec, family, encoder, backend, resolved.weights_format)

"""Load a model source into something that scores: the one composition root of the model side.

source (`models/`: where the files are, are they safe) -> files -> family (`families/`: what kind of
reranker) -> tokenizer + text encoder (`text/`) -> runtime + scorer (`runtimes/`, `families/`). The packages below know
nothing of each other beyond what this module wires together; the server (`engine/served.py`), `eval`,
`bench` and `export` all load models through here.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np

from openrerank.core.images import ImageLimits, check_request_size, open_image, parse_data_url
from openrerank.core.requests import InputType, ScoreKind, Truncate
from openrerank.core.work import EmbedItem, Task
from openrerank.engine.batching import BatchPolicy, default_policy
from openrerank.engine.errors import RequestTooLargeError
from openrerank.families.base import Family, ModelFiles, ModelSpec
from openrerank.families.bi_scorer import BiEncoderScorer
from openrerank.families.registry import resolve_spec
from openrerank.runtimes.base import Backend, TaskNotSupportedError
from openrerank.runtimes.selection import EngineChoice, check_backend_options, create_runtime
from openrerank.sources.safety import check_weights
from openrerank.sources.source import ModelSource, parse_model_arg, resolve_local_dir
from openrerank.text.bi import BiTextEncoder
from openrerank.text.prepare import Prepared, TextEncoder

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoadOptions:
    backend: str = "auto"
    dtype: str = "auto"  # auto: the fastest faithful precision for this CPU (see runtimes/selection.py)
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
    engine: str  # the runtime it is planned to run on (openvino | onnx | torch)
    engines: tuple[str, ...]  # the runtimes these files can run on (a pre-exported ONNX folder: onnx only)


@dataclass
class LoadedModel:
    source: ModelSource
    spec: ModelSpec
    family: Family
    encoder: TextEncoder
    backend: Backend
    weights_format: str
    device: str = "cpu"
    engine: EngineChoice | None = None  # which engine serves and why (None: built by hand, e.g. in tests)

    @property
    def score_kind(self) -> ScoreKind:
        return self.family.score_kind

    @property
    def max_length(self) -> int:
        return self.encoder.max_length

    @property
    def takes_images(self) -> bool:
        """Whether passages may carry an image (a vision-language reranker)."""
        return self.family.takes_images and getattr(self.encoder, "accepts_images", False)

    @property
    def embeds(self) -> bool:
        """Whether the model hands out embeddings (bi-encoders), not only pair scores."""
        return isinstance(self.backend, BiEncoderScorer) and isinstance(self.encoder, BiTextEncoder)

    def score(self, query: str, passages: list[str], truncate: Truncate = Truncate.END,
              policy: BatchPolicy | None = None, images: Sequence[str | None] | None = None) -> np.ndarray:
        """Synchronous scoring of one query (eval, bench, tests): one score per passage.

        `images`: per passage a data URL or None (vision-language models). Batches are cut by the server's one
        batching policy and chunk scores fold to their passage the way the server folds them.
        """
        if images is not None and any(i is not None for i in images):
            prep = self.prepare_images(query, passages, images, truncate)
        else:
            prep = self.encoder.prepare(query, passages, truncate)
        scores = np.zeros(len(prep.items), dtype=np.float32)
        for idx in (policy or default_policy(self.device)).split(prep.items):
            scores[idx] = self.backend.score([prep.items[i] for i in idx])
        return prep.fold(scores, len(passages))

    def prepare_images(self, query: str, passages: list[str], images: Sequence[str | None], truncate: Truncate,
                       *, limits: ImageLimits | None = None, budget: int | None = None,
                       max_chunks_per_passage: int | None = None,
                       max_tokens_per_passage: int | None = None) -> Prepared:
        """Passages with images (data URLs; None: text only) as work items: every image checked from its bytes
        and header first, the request priced (images included) against `budget` before a pixel is decoded,
        then decoded, tiled and tokenized one by one by the family's encoder. The server's and eval's one path."""
        if not self.takes_images:
            raise TaskNotSupportedError(f"{self.source.served_id} is a {self.family.id}; it reads text only")
        limits = limits or ImageLimits()
        check_request_size(list(images), limits)
        opened = [open_image(parse_data_url(url, limits, i), limits, i) if url is not None else None
                  for i, url in enumerate(images)]
        encoder = self.encoder
        cost = sum(encoder.image_cost(*im.size) for im in opened if im is not None)  # type: ignore[attr-defined]
        if budget is not None and cost > budget:
            raise RequestTooLargeError("tokens", cost, budget, "--max-request-tokens",
                                       "each image tile costs its vision patches and placeholder tokens; send "
                                       "fewer or smaller images")
        return encoder.prepare_images(query, passages, opened, truncate,  # type: ignore[attr-defined]
                                      max_chunks_per_passage=max_chunks_per_passage,
                                      max_tokens_per_passage=max_tokens_per_passage)

    def embedding_items(self, texts: list[str], truncate: Truncate = Truncate.END,
                        input_type: InputType | None = None) -> list[EmbedItem]:
        """Texts as embedding work items: the model's prompt for `input_type` prepended, cut (or refused,
        NONE) at the window. The one text path of the server's `/v1/embeddings` and of `embed` below."""
        if not self.embeds:
            raise TaskNotSupportedError(f"{self.source.served_id} is a {self.family.id}; only bi-encoders embed")
        encoder: BiTextEncoder = self.encoder  # type: ignore[assignment]
        return [EmbedItem(ids) for ids in encoder.encode_texts(texts, truncate, input_type)]

    def embed(self, texts: list[str], batch_size: int = 64, *, input_type: InputType | None = None,
              truncate: Truncate = Truncate.END, normalize: bool = True) -> np.ndarray:
        """Synchronous embeddings (eval, bench, tests), `(texts, dim)` float32, batched by the one policy.

        `normalize=True`: unit vectors, so inner products are cosines (what eval searches with);
        `normalize=False`: the model's own output, as `/v1/embeddings` returns it (unit length only when the
        model ends with a Normalize module)."""
        items = self.embedding_items(texts, truncate, input_type)
        out = np.zeros((len(texts), 0), dtype=np.float32)
        for idx in BatchPolicy(max_size=batch_size).split(items):
            batch = [items[i] for i in idx]
            emb = (self.backend.embed_ids([it.input_ids for it in batch])  # type: ignore[attr-defined]
                   if normalize else self.backend.embed(batch))
            if out.shape[1] == 0:
                out = np.zeros((len(texts), emb.shape[1]), dtype=np.float32)
            out[idx] = emb
        return out

    @property
    def tasks(self) -> list[Task]:
        """What the model serves: every model reranks; bi-encoders also embed."""
        return ["rerank", "embed"] if self.embeds else ["rerank"]

    def describe(self) -> dict:
        """What /v1/metadata and logs say about the model: family, engine, window, family facts."""
        meta = {"source": self.source.spec, "tasks": self.tasks, "score": self.score_kind.value,
                "backend": self.backend.description,
                "weights_format": self.weights_format, **self.spec.as_metadata()}
        if self.engine is not None:
            meta["engine"] = self.engine.as_metadata()
        return meta

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
    engines = family.engines
    if weights_format == "onnx":
        if options.backend not in ("auto", "onnx") or options.device != "cpu":
            raise ValueError(f"{source.spec} is a pre-exported ONNX directory (model.onnx + export.json), served by "
                             "ONNX Runtime only: use --backend onnx (or auto) on CPU")
        engines = ("onnx",)
    engine = check_backend_options(options.backend, options.dtype, options.device, engines, family.id)
    return ResolvedModel(source, weights_format, family, spec, engine, engines)


def load_model(source: ModelSource | str, options: LoadOptions | None = None) -> LoadedModel:
    """Resolve, then load tokenizer, text encoder, runtime and scorer (blocking; seconds to minutes)."""
    from transformers import AutoTokenizer

    options = options or LoadOptions()
    resolved = resolve_model(source, options)
    family, spec = resolved.family, resolved.spec
    tokenizer = AutoTokenizer.from_pretrained(str(spec.path), local_files_only=True)
    encoder = family.text_encoder(spec, tokenizer)
    runtime, engine = create_runtime(
        family.network(spec, tokenizer), engines=resolved.engines, backend=options.backend, dtype=options.dtype,
        device=options.device, threads=options.threads, family=family.id)
    backend = family.scorer(spec, runtime, encoder.pad_id)
    log.info("loaded %s as %s (%s weights) on %s, window %d tokens; engine %s: %s", resolved.source.spec,
             family.id, resolved.weights_format, backend.description, spec.max_length, engine.label, engine.reason)
    return LoadedModel(resolved.source, spec, family, encoder, backend, resolved.weights_format,
                       device=options.device, engine=engine)

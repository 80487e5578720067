"""Load a model source into something that scores: the one composition root of the model side.

source (`sources/`: where the files are, are they safe) -> files -> family (`families/`: what kind of
reranker) -> tokenizer + text encoder (`text/`) -> runtime + scorer (`runtimes/`, `families/`). The packages below know
nothing of each other beyond what this module wires together; the server (`engine/served.py`), `eval`,
`bench` and `export` all load models through here.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from openrerank.core.images import ImageLimits, check_request_size, open_image, parse_data_url
from openrerank.core.requests import InputType, ScoreKind, Truncate
from openrerank.core.settings import Shown, setting, setting_item, setting_name
from openrerank.core.work import EmbedItem, Task, TokenEmbedItem
from openrerank.engine.batching import BatchPolicy, default_policy
from openrerank.engine.errors import RequestTooLargeError
from openrerank.families.base import Family, ModelFiles, ModelSpec
from openrerank.families.bi_scorer import BiEncoderScorer
from openrerank.families.cost import activation_bytes_of, knee_of
from openrerank.families.registry import resolve_spec
from openrerank.families.scorer import Scorer, TaskNotSupportedError
from openrerank.runtimes.choosing import create_runtime
from openrerank.runtimes.onnx_export import exported_runtimes
from openrerank.runtimes.selection import DEFAULT_AUTO_MODE, RuntimeChoice, plan_runtimes
from openrerank.runtimes.timing_passes import Throughput
from openrerank.sources.safety import check_weights
from openrerank.sources.source import ModelSource, public_source, resolve_local_dir
from openrerank.text.bi import BiTextEncoder
from openrerank.text.late import LateTextEncoder
from openrerank.text.prepare import InstructionError, Prepared, TextEncoder, WindowTooSmallError

if TYPE_CHECKING:
    from PIL.Image import Image

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoadOptions:
    backend: str = "auto"  # the --backend flag's value: the runtime to run on, or auto (it keeps the flag's name)
    dtype: str = "auto"  # auto: the fastest faithful precision for this CPU (see runtimes/selection.py)
    backend_choice: str = DEFAULT_AUTO_MODE  # how auto picks: measure (timed here, cached) or rules
    device: str = "cpu"
    threads: int | None = None
    max_length: int | None = None  # override of the model's window (never above it)
    allow_pickle: bool = False


@dataclass(frozen=True)
class ResolvedModel:
    """A model located, checked and understood, before anything heavy is loaded.

    `plan` is computed here, once per model start: `load_model` builds the first runtime of it that loads."""

    source: ModelSource
    weights_format: str
    family: Family
    spec: ModelSpec
    runtimes: tuple[str, ...]  # the runtimes these files can run on (a pre-exported ONNX folder: onnx only)
    plan: tuple[RuntimeChoice, ...]  # the runtimes to try, best first

    @property
    def runtime(self) -> str:
        """The runtime it is planned to run on (openvino | onnx | torch)."""
        return self.plan[0].runtime


@dataclass
class LoadedModel:
    source: ModelSource
    spec: ModelSpec
    family: Family
    encoder: TextEncoder
    scorer: Scorer
    weights_format: str
    device: str = "cpu"
    runtime_choice: RuntimeChoice | None = None  # which runtime serves and why (None: built by hand, e.g. in tests)

    @property
    def throughput(self) -> Throughput | None:
        """What the serving engine sustains on this machine (sequences and tokens per second at the timed
        shapes), measured when it was chosen; None when nothing was timed (`--backend-choice rules`)."""
        return self.runtime_choice.throughput if self.runtime_choice is not None else None

    @functools.cached_property
    def knee(self) -> float | None:
        """The length at which attention costs a token as much as the matrices do (`families/cost.py`)."""
        return knee_of(self.spec.path)

    @property
    def token_activation_bytes(self) -> int | None:
        """Bytes a padded token of a full-window batch holds while it runs (`families/cost.py`), an upper bound;
        None where the config does not say the layers' shape."""
        return activation_bytes_of(self.spec.path, self.max_length)

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
        return isinstance(self.scorer, BiEncoderScorer) and isinstance(self.encoder, BiTextEncoder)

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
        outputs: list = [None] * len(prep.items)  # a score per pair, or a listwise block's vectors
        for idx in (policy or default_policy(self.device)).split(prep.items, self.scorer.padded_shape):
            for i, out in zip(idx, self.scorer.score([prep.items[i] for i in idx]), strict=True):
                outputs[i] = out
        return prep.fold(outputs, len(passages))

    def prepare_images(self, query: str, passages: list[str], images: Sequence[str | None], truncate: Truncate,
                       *, limits: ImageLimits | None = None, budget: int | None = None,
                       max_chunks_per_passage: int | None = None,
                       max_tokens_per_passage: int | None = None) -> Prepared:
        """Passages with images (data URLs; None: text only) as work items: `open_images`, then decoded, tiled
        and tokenized one by one by the family's encoder (eval's path; the server runs the encoder a slice at a
        time, `ServedModel`)."""
        opened = self.open_images(images, limits=limits, budget=budget)
        return self.encoder.prepare_images(query, passages, opened, truncate,  # type: ignore[attr-defined]
                                           max_chunks_per_passage=max_chunks_per_passage,
                                           max_tokens_per_passage=max_tokens_per_passage)

    def open_images(self, images: Sequence[str | None], *, limits: ImageLimits | None = None,
                    budget: int | None = None) -> list[Image | None]:
        """Every image checked from its bytes and header, and the request priced (images included) against
        `budget`, before a pixel is decoded; the opened images (None: a text-only passage)."""
        if not self.takes_images:
            raise TaskNotSupportedError(f"{self.source.served_id} is a {self.family.id}; it reads text only")
        limits = limits or ImageLimits()
        check_request_size(list(images), limits)
        opened = [open_image(parse_data_url(url, limits, i), limits, i) if url is not None else None
                  for i, url in enumerate(images)]
        cost = sum(self.encoder.image_cost(*im.size, i)  # type: ignore[attr-defined]
                   for i, im in enumerate(opened) if im is not None)
        if budget is not None and cost > budget:
            raise RequestTooLargeError("tokens", cost, budget, "max-request-tokens",
                                       "each image tile costs its vision patches and placeholder tokens; send "
                                       "fewer or smaller images")
        return opened

    def embedding_items(self, texts: list[str], truncate: Truncate = Truncate.END,
                        input_type: InputType | None = None) -> list[EmbedItem]:
        """Texts as embedding work items: the model's prompt for `input_type` prepended, cut (or refused,
        NONE) at the window. The one text path of the server's `/v1/embeddings` and of `embed` below."""
        if not self.embeds:
            raise TaskNotSupportedError(f"{self.source.served_id} is a {self.family.id}; only bi-encoders embed")
        encoder: BiTextEncoder = self.encoder  # type: ignore[assignment]
        skip = encoder.prompt_length(input_type)
        return [EmbedItem(ids, skip) for ids in encoder.encode_texts(texts, truncate, input_type)]

    def embed(self, texts: list[str], batch_size: int = 64, *, input_type: InputType | None = None,
              truncate: Truncate = Truncate.END, normalize: bool = True) -> np.ndarray:
        """Synchronous embeddings (eval, bench, tests), `(texts, dim)` float32, batched by the one policy.

        `normalize=True`: unit vectors, so inner products are cosines (what eval searches with);
        `normalize=False`: the model's own output, as `/v1/embeddings` returns it (unit length only when the
        model ends with a Normalize module)."""
        items = self.embedding_items(texts, truncate, input_type)
        out = np.zeros((len(texts), 0), dtype=np.float32)
        for idx in BatchPolicy(max_size=batch_size).split(items, self.scorer.padded_shape):
            batch = [items[i] for i in idx]
            emb = (self.scorer.embed_ids([it.input_ids for it in batch],  # type: ignore[attr-defined]
                                         [it.prompt_length for it in batch])
                   if normalize else self.scorer.embed(batch))
            if out.shape[1] == 0:
                out = np.zeros((len(texts), emb.shape[1]), dtype=np.float32)
            out[idx] = emb
        return out

    @property
    def multi_vector(self) -> bool:
        """Whether the model hands out per-token (multi-vector) embeddings: late-interaction models."""
        return isinstance(self.encoder, LateTextEncoder)

    def token_items(self, texts: list[str], truncate: Truncate = Truncate.END, input_type: InputType = "passage"
                    ) -> list[TokenEmbedItem]:
        """Texts as per-token embedding work items (the multi-vector route): queries with their marker (and
        augmentation, added by the scorer), passages with theirs, cut (or refused, NONE) at the window."""
        if not self.multi_vector:
            raise TaskNotSupportedError(f"{self.source.served_id} is a {self.family.id}; only late-interaction "
                                        "models have multi-vector embeddings")
        encoder: LateTextEncoder = self.encoder  # type: ignore[assignment]
        return encoder.token_items(texts, truncate, query=input_type == "query")

    @property
    def tasks(self) -> list[Task]:
        """What the model serves: every model reranks; bi-encoders also embed."""
        return ["rerank", "embed"] if self.embeds else ["rerank"]

    def describe(self) -> dict:
        """What /v1/metadata and logs say about the model: family, runtime, window, family facts.

        The keys are the API's and stay as they were: "backend" is the scorer's runtime description and
        "engine" the runtime choice (which runtime, which dtype, why). A local folder shows by its name only."""
        meta = {"source": public_source(self.source.spec), "tasks": self.tasks, "score": self.score_kind.value,
                "backend": self.scorer.description,
                "weights_format": self.weights_format, **self.spec.as_metadata()}
        if self.runtime_choice is not None:
            engine = self.runtime_choice.as_metadata()  # a fallback's reason may quote the model's folder
            engine["reason"] = engine["reason"].replace(str(self.spec.path), Path(self.spec.path).name)
            meta["engine"] = engine
        return meta

    def close(self) -> None:
        self.scorer.close()


def resolve_model(source: ModelSource | str, options: LoadOptions | None = None, shown: Shown | None = None
                  ) -> ResolvedModel:
    """Locate (downloading from the hub if needed), check the weights, detect the family, check the runtime.
    `shown`: how an error names the settings not typed as flags (core/settings.py)."""
    if isinstance(source, str):
        source = ModelSource(source, source)
    options = options or LoadOptions()
    path = resolve_local_dir(source.spec, allow_pickle=options.allow_pickle, revision=source.revision,
                             named=setting_item("model", source.spec, shown, quote=False),
                             revision_named=source.revision_named)
    weights_format = check_weights(path, allow_pickle=options.allow_pickle)
    files = ModelFiles.read(path, name=source.spec)
    family, spec = resolve_spec(files, source.family, source.instruction)
    for folder in family.weight_folders(spec):  # pickle there is refused as in the root, unless --allow-pickle
        check_weights(path / folder, allow_pickle=options.allow_pickle)
    files.check_tokenizer()  # after the family: what the folder is comes first
    if options.max_length:
        spec = replace(spec, max_length=min(spec.max_length, options.max_length))
    if options.max_length or source.instruction is not None:
        check_window(family, spec, options.max_length, source.instruction, shown)
    runtimes = family.runtimes
    if weights_format == "onnx":
        runtimes = tuple(e for e in exported_runtimes(path) if e in family.runtimes)
        if options.backend not in ("auto", *runtimes) or options.device != "cpu":
            asked = (setting("backend", options.backend, shown) if options.backend not in ("auto", *runtimes)
                     else setting("device", options.device, shown))
            raise ValueError(f"{asked}: {source.spec} is a pre-exported ONNX directory (model.onnx + export.json), "
                             f"served on CPU by {' or '.join(runtimes)}: serve it with backend "
                             f"{' or '.join(runtimes)} (or auto) on the CPU")
    plan = plan_runtimes(options.backend, options.dtype, options.device, runtimes, family.id, shown)
    return ResolvedModel(source, weights_format, family, spec, runtimes, tuple(plan))


def check_window(family: Family, spec: ModelSpec, max_length: int | None, instruction: str | None = None,
                 shown: Shown | None = None) -> None:
    """`--max-length` must leave room for the family's fixed tokens (special tokens, markers, its prompt's text)
    and a token of query and of passage: a smaller window would start a server refusing every request. Its
    text encoder knows what it needs (`TextEncoder.min_length`); this loads the tokenizer (about a second).
    `--instruction` is held to the rule a request's own instruction is (`with_instruction`), so the startup
    error names the setting as given (`shown`), as its other refusals (`Family.check_instruction`) do."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(spec.path), local_files_only=True)
    flags = [setting("max-length", max_length, shown)] if max_length else []
    flags += [setting_name("instruction", shown)] if instruction is not None else []
    try:
        encoder = family.text_encoder(spec, tokenizer)
        encoder.check_window()
        if instruction is not None:
            encoder.with_instruction(instruction)
    except (WindowTooSmallError, InstructionError) as exc:
        raise ValueError(f"{', '.join(flags)}: {exc}") from None


def load_model(source: ResolvedModel | ModelSource | str, options: LoadOptions | None = None) -> LoadedModel:
    """Resolve (unless `source` is resolved already, with these options), then load tokenizer, text encoder,
    runtime and scorer (blocking; seconds to minutes)."""
    from transformers import AutoTokenizer

    options = options or LoadOptions()
    resolved = source if isinstance(source, ResolvedModel) else resolve_model(source, options)
    family, spec = resolved.family, resolved.spec
    tokenizer = AutoTokenizer.from_pretrained(str(spec.path), local_files_only=True)
    encoder = family.text_encoder(spec, tokenizer)
    runtime, choice = create_runtime(family.network(spec, tokenizer), resolved.plan, device=options.device,
                                     threads=options.threads, mode=options.backend_choice,
                                     max_length=spec.max_length)
    scorer = family.scorer(spec, runtime, encoder.pad_id)
    # The log line keeps its words ("engine X: why") as operators and tests read them.
    log.info("loaded %s as %s (%s weights) on %s, window %d tokens; engine %s: %s", resolved.source.spec,
             family.id, resolved.weights_format, scorer.description, spec.max_length, choice.label, choice.reason)
    return LoadedModel(resolved.source, spec, family, encoder, scorer, resolved.weights_format,
                       device=options.device, runtime_choice=choice)

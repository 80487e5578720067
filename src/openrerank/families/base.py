"""What a model family is: the one place that knows a kind of reranker.

A family owns everything specific to it: detection from the model's files, how a query and a passage
become token ids (pair encoding, separate encodings, or a byte-exact prompt template), the network and its
readout (head logit, pooled embedding, last-real-token yes/no logits), and what its score means
(`ScoreKind`, which travels in every result so dialects never look at the model). Text preparation and the
runtimes call into the family; adding a family is one module here plus its tests.
"""

from __future__ import annotations

import json
import re
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from openrerank.core.requests import ScoreKind
from openrerank.families.scorer import Scorer
from openrerank.runtimes.base import Network, Runtime
from openrerank.text.prepare import TextEncoder


class ModelFormatError(ValueError):
    """The directory is not a model openrerank can serve (or not one of the family asked for)."""


# Models whose position ids start after the padding index: usable length is max_position_embeddings - 2.
_OFFSET_POSITIONS = {"roberta", "xlm-roberta", "camembert", "longformer", "mpnet"}
_UNBOUNDED = 100_000_000
_SLOT = re.compile(r"\{(query|passage)\}")
_FRONT_MATTER = re.compile(r"\A---\s*\n(.*?)\n---\s*\n", re.DOTALL)


def _read_json(path: Path) -> Any:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelFormatError(f"{path} is not valid JSON: {exc}") from exc


def _read_card(path: Path) -> dict:
    """The model card's YAML front matter (pipeline_tag, tags, base_model), {} when absent or unreadable."""
    readme = path / "README.md"
    if not readme.is_file():
        return {}
    try:
        import yaml

        match = _FRONT_MATTER.match(readme.read_text(encoding="utf-8", errors="replace")[:20000])
        data = yaml.safe_load(match.group(1)) if match else None
    except Exception:  # a broken card must never stop a model from loading
        return {}
    return data if isinstance(data, dict) else {}


#: Files that hold a tokenizer's vocabulary (besides a sentencepiece `*.model`); one must be present.
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "vocab.json")


@dataclass(frozen=True)
class ModelFiles:
    """What detection reads from a model directory, parsed once."""

    path: Path
    name: str  # what the user named it (hub id or directory), for families detected by their published name
    config: dict
    modules: list | None = None  # sentence-transformers modules.json
    sbert_config: dict = field(default_factory=dict)  # sentence_bert_config.json
    st_config: dict = field(default_factory=dict)  # config_sentence_transformers.json
    tokenizer_config: dict = field(default_factory=dict)
    card: dict = field(default_factory=dict)  # README.md front matter

    @classmethod
    def read(cls, path: Path, name: str | None = None) -> ModelFiles:
        path = Path(path)
        config = _read_json(path / "config.json")
        if not isinstance(config, dict):
            raise ModelFormatError(f"{path} has no config.json: not a Hugging Face model directory")
        modules = _read_json(path / "modules.json")
        return cls(
            path=path,
            name=name or path.name,
            config=config,
            modules=modules if isinstance(modules, list) else None,
            sbert_config=_dict(_read_json(path / "sentence_bert_config.json")),
            st_config=_dict(_read_json(path / "config_sentence_transformers.json")),
            tokenizer_config=_dict(_read_json(path / "tokenizer_config.json")),
            card=_read_card(path),
        )

    def check_tokenizer(self) -> None:
        """A folder without its tokenizer's vocabulary is refused: transformers would build a tokenizer of the
        special tokens alone, every word [UNK] and every passage the same score."""
        if not any((self.path / f).is_file() for f in TOKENIZER_FILES) and not any(self.path.glob("*.model")):
            raise ModelFormatError(f"{self.path} has no tokenizer files ({', '.join(TOKENIZER_FILES)} or a "
                                   "sentencepiece *.model): copy them from the model's repository")

    @property
    def architectures(self) -> list[str]:
        archs = self.config.get("architectures") or []
        return [str(a) for a in archs] if isinstance(archs, list) else []

    @property
    def model_type(self) -> str:
        return str(self.config.get("model_type", "unknown"))

    @property
    def lowercase(self) -> bool:
        """sentence-transformers lowercases every text first (`do_lower_case` of sentence_bert_config.json).
        It reads that file only for a folder it loads through modules.json (a bi-encoder, a CrossEncoder saved
        by sentence-transformers >= 6); `CrossEncoder` on a plain checkpoint ignores it, so this does too."""
        return self.modules is not None and self.sbert_config.get("do_lower_case") is True

    def window(self) -> int:
        """Tokens one sequence may hold, never more than the position table. In a modules.json folder
        sentence-transformers' max_seq_length replaces the tokenizer's model_max_length (its Transformer module
        passes it to the tokenizer as model_max_length), so it wins when set; otherwise the smallest of the
        position table, the tokenizer's model_max_length and max_seq_length."""
        positions = int(self.config.get("max_position_embeddings") or 512)
        if self.model_type in _OFFSET_POSITIONS:
            positions -= 2
        sbert_max = self.sbert_config.get("max_seq_length")
        if not (isinstance(sbert_max, int) and sbert_max > 0):
            sbert_max = None
        if self.modules is not None and sbert_max is not None:
            return min(positions, sbert_max)
        candidates = [positions]
        tok_max = self.tokenizer_config.get("model_max_length")
        if isinstance(tok_max, (int, float)) and 0 < tok_max < _UNBOUNDED:
            candidates.append(int(tok_max))
        if sbert_max is not None:
            candidates.append(sbert_max)
        return min(candidates)

    def says_reranker(self) -> bool:
        """The model card declares a reranker (pipeline_tag text-ranking, or a rerank tag)."""
        tags = self.card.get("tags") or []
        words = [str(self.card.get("pipeline_tag", ""))] + [str(t) for t in tags if isinstance(tags, list)]
        return any(w.lower() in ("text-ranking", "reranker", "reranking", "rerank") for w in words)


def _dict(value: Any) -> dict:
    return value if isinstance(value, dict) else {}


@dataclass(frozen=True)
class ModelSpec:
    """What a family decided about one model directory."""

    path: Path
    family: str
    model_type: str
    architecture: str | None
    max_length: int
    #: Family facts (labels, pooling, instruction, ...); keys starting with "_" are internal, not metadata.
    options: Mapping[str, Any] = field(default_factory=dict)

    def as_metadata(self) -> dict:
        public = {k: v for k, v in self.options.items() if not k.startswith("_")}
        return {"family": self.family, "model_type": self.model_type, "architecture": self.architecture,
                "max_length": self.max_length, **public}


class Family(ABC):
    """One kind of reranker. Instances are stateless; per-model facts live in `ModelSpec`."""

    id: ClassVar[str]
    title: ClassVar[str]
    input_format: ClassVar[str]  # how a (query, passage) pair is written, for `openrerank families` and docs
    readout: ClassVar[str]  # how the network's output becomes the score
    score_kind: ClassVar[ScoreKind]
    runtimes: ClassVar[tuple[str, ...]]  # runtimes it runs on, the preferred CPU runtime first
    examples: ClassVar[tuple[str, ...]] = ()  # published hub ids served by this family
    takes_instruction: ClassVar[bool] = False
    #: A passage's score depends on the other passages of its request (listwise models): no per-passage cache.
    listwise: ClassVar[bool] = False
    #: Passages may carry an image (vision-language rerankers); the others refuse one with a 4xx.
    takes_images: ClassVar[bool] = False
    #: The number of the family's network build recipe: what `network` (and the code it calls) refuses and what
    #: it builds. It keys every converted model (ONNX export, OpenVINO IR) and is recorded in a pre-exported
    #: directory's export.json, which is refused when it differs: a graph built by code without this version's
    #: checks is never served (a version that did not refuse a cross-encoder lacking its `classifier.*` tensors
    #: cached random scores, and its successor, which refuses it, found that entry by the same key and served it).
    #: A number, rather than the checks run again on each load before the cache is read, because a pre-exported
    #: directory holds no weights to check, because the checks are what transformers finds while loading (its
    #: missing tensors after its own renaming), which headers alone would reimplement, and because a server
    #: without PyTorch cannot build the model to see; a number also covers every check yet to be added.
    #: Bump it when that code changes what it refuses or builds; tests/families/test_base.py fails when the code
    #: a converted family's `network` reaches changes, and holds the number it had.
    #: 1: a checkpoint lacking tensors of the network is refused (`cross_encoder.load_encoder`).
    build_format: ClassVar[int] = 1

    @abstractmethod
    def matches(self, files: ModelFiles) -> bool:
        """True when the files say unambiguously that this is the model's family."""

    @abstractmethod
    def spec(self, files: ModelFiles, instruction: str | None = None) -> ModelSpec:
        """Validate the files for this family (ModelFormatError if they do not fit) and record its facts."""

    def instruction_problem(self, instruction: str) -> str | None:
        """Why this family cannot take `instruction` (None: it can). The one rule for the operator's
        `--instruction` and a request's `instruction` field: refused, never ignored."""
        if not self.takes_instruction:
            return f"the {self.id} family has no prompt instruction to set"
        if not instruction.strip():
            return "the instruction is empty (leave it out for the model's default)"
        if _SLOT.search(instruction):
            return "an instruction may not contain {query} or {passage}"
        return None

    def check_instruction(self, instruction: str) -> None:
        """An operator's `--instruction` must mean something for this family."""
        problem = self.instruction_problem(instruction)
        if problem:
            raise ModelFormatError(f"--instruction: {problem}")

    def weight_folders(self, spec: ModelSpec) -> tuple[str, ...]:
        """Sub-folders of the model holding weights its network loads besides the root's (e.g. a bi-encoder's
        Dense layers); the loader checks them as it checks the root's: pickle only with --allow-pickle."""
        return ()

    @abstractmethod
    def text_encoder(self, spec: ModelSpec, tokenizer) -> TextEncoder: ...

    @abstractmethod
    def network(self, spec: ModelSpec, tokenizer) -> Network: ...

    @abstractmethod
    def scorer(self, spec: ModelSpec, runtime: Runtime, pad_id: int) -> Scorer: ...

    @property
    def unit_score(self) -> str:
        return {ScoreKind.LOGIT: "sigmoid(score)", ScoreKind.COSINE: "(cosine + 1) / 2",
                ScoreKind.MAXSIM: "(maxsim / query vectors + 1) / 2"}[self.score_kind]

    def describe(self) -> dict:
        """The family as `openrerank families` and docs show it (the "engines" key lists its runtimes)."""
        return {"id": self.id, "title": self.title, "input": self.input_format, "readout": self.readout,
                "score": self.score_kind.value, "unit_score": self.unit_score, "engines": list(self.runtimes),
                "instruction": self.takes_instruction, "images": self.takes_images, "examples": list(self.examples)}

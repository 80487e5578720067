"""Tokenized work items: what text preparation hands the scheduler and the scheduler hands a runtime.

They live below every layer that passes them along, so text, engine, families and runtimes share one definition.
Each item says which task it serves: a rerank item comes back as one score, an embed item as one vector, a
listwise block as one small matrix (a vector per passage in the block, then the query's). The scheduler never
batches items of different tasks together, so a scorer call returns one kind of result.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Literal

#: What a work item asks of the model; also the `task` label of the engine metrics.
Task = Literal["rerank", "embed", "listwise"]
TASKS: tuple[Task, ...] = ("rerank", "embed", "listwise")


@dataclass(slots=True)
class PairItem:
    """One sequence scored on its own: `[CLS] query [SEP] passage [SEP]`, or a filled prompt template."""

    input_ids: list[int]
    token_type_ids: list[int] | None = None
    task: ClassVar[Task] = "rerank"

    @property
    def length(self) -> int:
        return len(self.input_ids)


@dataclass(slots=True)
class VisionPairItem:
    """A pair whose passage has an image: the prompt's ids (image placeholders included) and the image's
    tiles, uint8 `(tiles, height, width, 3)` RGB, in the order their placeholders appear.

    Its length counts what it costs, not just its ids: each tile also runs the vision encoder over
    `vision_tokens` patches, so admission, batching and metrics see an image as the work it is.
    """

    input_ids: list[int]
    tiles: Any  # numpy uint8 (tiles, H, W, 3)
    vision_tokens: int  # vision-encoder patches of all tiles together
    task: ClassVar[Task] = "rerank"

    @property
    def length(self) -> int:
        return len(self.input_ids) + self.vision_tokens


@dataclass(slots=True)
class BiItem:
    """Query and passage encoded separately: a bi-encoder compares their pooled vectors by cosine, a
    late-interaction (ColBERT) model their token vectors by MaxSim. The prompt lengths: leading tokens of each
    that the pooling leaves out (a bi-encoder whose Pooling has `include_prompt: false`; else 0)."""

    query_ids: list[int]
    passage_ids: list[int]
    query_prompt_length: int = 0
    passage_prompt_length: int = 0
    task: ClassVar[Task] = "rerank"

    @property
    def length(self) -> int:
        """The item's width in a batch: its passage's. Both scorers run each distinct query apart, once per
        request at most (`families/query_memo.py`), so a batch's rows are passages; counted as the longer of
        the two, a long query made the batcher cut batches of short passages as if they were long."""
        return len(self.passage_ids)


@dataclass(slots=True)
class EmbedItem:
    """One text embedded on its own (`[CLS] text [SEP]`, prompt included); its result is a vector.
    `prompt_length`: its leading tokens the pooling leaves out (`include_prompt: false`; else 0)."""

    input_ids: list[int]
    prompt_length: int = 0
    task: ClassVar[Task] = "embed"

    @property
    def length(self) -> int:
        return len(self.input_ids)


@dataclass(slots=True)
class BlockItem:
    """A listwise block: one prompt holding a query and `entries` passages (or passage chunks), read at the
    special token that ends each passage and at the one after the query. Its result is `(entries + 1, dim)`:
    the passages' vectors in prompt order, then the query's. The block, not a pair, is the unit a batch holds."""

    input_ids: list[int]
    entries: int
    task: ClassVar[Task] = "listwise"

    @property
    def length(self) -> int:
        return len(self.input_ids)


@dataclass(slots=True)
class TokenEmbedItem(EmbedItem):
    """One text embedded token by token (late interaction, e.g. ColBERT); `query` picks the query side
    (query marker, expansion) or the document side (document marker, skiplist)."""

    query: bool = False


WorkItem = PairItem | VisionPairItem | BiItem | EmbedItem | BlockItem

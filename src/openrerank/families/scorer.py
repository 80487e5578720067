"""The scorer: the per-family object that turns a batch of work items into one float32 row per item.

The scheduler hands a scorer tokenized work items of one task and gets back a score per query+passage pair
(or chunk), or an embedding per text (bi-encoders only). A scorer (one score per sequence: `PairScorer`; or a
bi-encoder's cosine: `BiEncoderScorer`) runs on top of a runtime (`runtimes/`), which runs the family's network.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence

import numpy as np

from openrerank.core.work import EmbedItem, WorkItem
from openrerank.runtimes.base import IntOrArray, Runtime


class TaskNotSupportedError(TypeError):
    """A scorer asked for a task its model cannot do (e.g. embeddings from a cross-encoder)."""


class Scorer(ABC):
    """Runs work items; the only thing the scheduler calls (always off the event loop)."""

    runtime: Runtime
    pad_id: int

    def compute(self, items: Sequence[WorkItem]) -> np.ndarray:
        """What the scheduler calls with a batch of one task: scores `(n,)` or embeddings `(n, dim)`."""
        if items and isinstance(items[0], EmbedItem):
            return self.embed(items)  # type: ignore[arg-type]
        return self.score(items)

    @abstractmethod
    def score(self, items: Sequence[WorkItem]) -> np.ndarray:
        """One float32 score per item, in item order."""

    def embed(self, items: Sequence[EmbedItem]) -> np.ndarray:
        """One float32 embedding per text, in item order; only models that embed implement it."""
        raise TaskNotSupportedError(f"{type(self).__name__} does not produce embeddings")

    @property
    def description(self) -> str:
        return self.runtime.description

    @property
    def lanes(self) -> int:
        """Batches the scheduler may run at once on this scorer (its runtime's lanes); `compute` is then
        called from that many threads."""
        return self.runtime.lanes

    def padded_shape(self, rows: IntOrArray, width: IntOrArray) -> tuple[IntOrArray, IntOrArray]:
        """The shape its runtime computes for a (rows x width) batch (elementwise on arrays): the batcher cuts
        along it."""
        return self.runtime.padded_shape(rows, width)

    def close(self) -> None:
        self.runtime.close()

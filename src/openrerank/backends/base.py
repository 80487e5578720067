"""The seam between the scheduler and the engines.

The scheduler hands a backend a list of tokenized work items (one per query+passage pair, or per
chunk) and gets one float32 logit per item back. A backend is a *scorer* (cross-encoder logits or
bi-encoder cosine) on top of a *runtime* (PyTorch or ONNX Runtime) that runs the network on padded
numpy features. Neither knows about HTTP, dialects or batching policy.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(slots=True)
class PairItem:
    """A cross-encoder input: `[CLS] query [SEP] passage [SEP]` as token ids."""

    input_ids: list[int]
    token_type_ids: list[int] | None

    @property
    def length(self) -> int:
        return len(self.input_ids)


@dataclass(slots=True)
class BiItem:
    """A bi-encoder input: query and passage encoded separately, compared by cosine."""

    query_ids: list[int]
    passage_ids: list[int]

    @property
    def length(self) -> int:
        return max(len(self.query_ids), len(self.passage_ids))


WorkItem = PairItem | BiItem


def pad_features(
    seqs: Sequence[list[int]],
    type_seqs: Sequence[list[int] | None] | None,
    pad_id: int,
    input_names: Sequence[str],
) -> dict[str, np.ndarray]:
    """Right-pad token id lists into the int64 arrays a transformer takes."""
    width = max(len(s) for s in seqs)
    n = len(seqs)
    ids = np.full((n, width), pad_id, dtype=np.int64)
    mask = np.zeros((n, width), dtype=np.int64)
    types = np.zeros((n, width), dtype=np.int64)
    for row, seq in enumerate(seqs):
        ids[row, : len(seq)] = seq
        mask[row, : len(seq)] = 1
        if type_seqs is not None and type_seqs[row] is not None:
            types[row, : len(seq)] = type_seqs[row]
    feats = {"input_ids": ids, "attention_mask": mask}
    if "token_type_ids" in input_names:
        feats["token_type_ids"] = types
    return feats


class Runtime(ABC):
    """Runs the network on padded features; returns its first output as float32.

    For a sequence classifier that is the logits `(batch, num_labels)`; for a bi-encoder's
    transformer it is the last hidden state `(batch, tokens, hidden)`.
    """

    #: Feature names the network accepts (`token_type_ids` is absent for RoBERTa-like models).
    input_names: tuple[str, ...]
    #: Short description for logs, metrics and /v1/metadata, e.g. "torch-fp32-cpu".
    description: str

    @abstractmethod
    def run(self, features: dict[str, np.ndarray]) -> np.ndarray: ...

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release native resources."""


class Backend(ABC):
    """Scores work items; the only thing the scheduler calls (always off the event loop)."""

    runtime: Runtime
    pad_id: int

    @abstractmethod
    def score(self, items: Sequence[WorkItem]) -> np.ndarray:
        """One float32 logit per item, in item order."""

    @property
    def description(self) -> str:
        return self.runtime.description

    def close(self) -> None:
        self.runtime.close()

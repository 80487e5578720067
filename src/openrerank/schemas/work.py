"""Tokenized work items: what text preparation hands the scheduler and the scheduler hands a runtime.

They live below every layer that passes them along, so text, engine and backends share one definition.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(slots=True)
class PairItem:
    """One sequence scored on its own: `[CLS] query [SEP] passage [SEP]`, or a filled prompt template."""

    input_ids: list[int]
    token_type_ids: list[int] | None = None

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

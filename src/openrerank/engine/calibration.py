"""int8 calibration batches: openrerank's fixed sample text, encoded the way the model's own family does.

A cross-encoder sees `[CLS] query [SEP] passage [SEP]` pairs, a bi-encoder the queries and the passages on
their own, an LLM reranker its prompt template: calibrating on anything else would measure activation
ranges the model never produces when serving. The batches are length-sorted and padded like the
scheduler's, with every feature a network may take (the runtime keeps those its model has).
"""

from __future__ import annotations

import numpy as np

from openrerank.backends.base import pad_features
from openrerank.schemas.internal import Truncate
from openrerank.schemas.work import BiItem
from openrerank.text.prepare import TextEncoder
from openrerank.text.samples import SAMPLE_QUERIES

_FEATURES = ("input_ids", "attention_mask", "token_type_ids")


def calibration_batches(encoder: TextEncoder, batch_size: int = 8) -> list[dict[str, np.ndarray]]:
    seqs: dict[tuple[int, ...], list[int] | None] = {}  # distinct sequences -> their token type ids
    for query, passages in SAMPLE_QUERIES:
        for item in encoder.prepare(query, list(passages), Truncate.END).items:
            if isinstance(item, BiItem):
                seqs.setdefault(tuple(item.query_ids), None)
                seqs.setdefault(tuple(item.passage_ids), None)
            else:
                seqs.setdefault(tuple(item.input_ids), item.token_type_ids)
    ordered = sorted(seqs, key=len)
    batches = []
    for start in range(0, len(ordered), batch_size):
        part = ordered[start:start + batch_size]
        batches.append(pad_features([list(s) for s in part], [seqs[s] for s in part], encoder.pad_id, _FEATURES))
    return batches

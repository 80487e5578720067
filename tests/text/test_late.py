"""Late-interaction text encoding: the marker right after [CLS], cuts that keep [SEP], every truncation mode."""

from __future__ import annotations

import pytest

from openrerank.core.requests import Truncate
from openrerank.text.late import LateSettings, LateTextEncoder
from openrerank.text.prepare import InputTooLongError

Q, D, MASK = 1, 2, 6


@pytest.fixture(scope="module")
def encoder(tmp_path_factory):
    from transformers import AutoTokenizer

    from tests.families.colbert_builders import build_pylate_colbert

    path = build_pylate_colbert(tmp_path_factory.mktemp("colbert") / "m")
    tok = AutoTokenizer.from_pretrained(str(path))
    settings = LateSettings(query_marker=Q, document_marker=D, query_length=8, document_length=12,
                            expansion_id=MASK, attend_to_expansion=False, skiplist=frozenset())
    return LateTextEncoder(tok, settings)


def test_markers_follow_cls_and_cuts_keep_sep(encoder):
    cls, sep = encoder.tokenizer.cls_token_id, encoder.tokenizer.sep_token_id
    (q,) = encoder.encode_queries(["what is the capital of france and of germany and the sea"])
    assert len(q) == 8 and q[:2] == [cls, Q] and q[-1] == sep
    (short,) = encoder.encode_queries(["  paris  "])
    assert short == [cls, Q, encoder.tokenizer.convert_tokens_to_ids("paris"), sep]  # no augmentation here
    long = "the river flows from the mountain to the sea and the city of paris is on a river"
    (end,) = encoder.encode_documents([long], Truncate.END)
    (start,) = encoder.encode_documents([long], Truncate.START)
    assert len(end) == len(start) == 12
    assert end[:2] == start[:2] == [cls, D] and end[-1] == start[-1] == sep
    ids = encoder.tokenizer.convert_tokens_to_ids
    assert end[2] == ids("the") and start[-2] == ids("river")
    with pytest.raises(InputTooLongError):
        encoder.encode_documents([long], Truncate.NONE)
    assert encoder.query_vectors("paris") == 8  # augmentation: every query has query_length vectors


def test_chunk_windows_are_whole_document_sequences(encoder):
    cls, sep = encoder.tokenizer.cls_token_id, encoder.tokenizer.sep_token_id
    long = " ".join(["paris", "france", "river", "sea", "city"] * 6)
    prep = encoder.prepare("where is paris", ["paris", long], Truncate.CHUNK, max_chunks_per_passage=16)
    windows = [it.passage_ids for it, o in zip(prep.items, prep.owners, strict=True) if o == 1]
    assert len(windows) > 3 and prep.owners[0] == 0
    for w in windows:
        assert len(w) <= 12 and w[:2] == [cls, D] and w[-1] == sep
    text = [t for w in windows for t in w[2:-1]]
    assert set(text) == set(encoder.tok.ids(long))  # the windows cover the passage
    capped = encoder.prepare("where is paris", [long], Truncate.CHUNK, max_chunks_per_passage=2)
    assert len(capped.items) == 2


def test_none_cuts_any_query_and_refuses_only_a_long_passage(encoder):
    """The query is always cut to its query length; under NONE a query of several document windows was
    refused with the document's limit (and a shorter long one cut), while the multi-vector route cut it."""
    long_query = " ".join(["paris", "france", "river", "sea"] * 30)  # far past NONE's four document windows
    prep = encoder.prepare(long_query, ["paris"], Truncate.NONE)
    assert prep.items[0].query_ids == encoder.prepare(long_query, ["paris"], Truncate.END).items[0].query_ids
    assert len(prep.items[0].query_ids) == 8
    with pytest.raises(InputTooLongError):
        encoder.prepare("paris", [long_query], Truncate.NONE)

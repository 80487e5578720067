"""LangChain's NVIDIARerank, unchanged, against the running server (base_url=.../v1)."""

from __future__ import annotations

import pytest

pytest.importorskip("langchain_nvidia_ai_endpoints")

from langchain_core.documents import Document
from langchain_nvidia_ai_endpoints import NVIDIARerank

DOCS = [
    "Bananas are a yellow fruit rich in potassium.",
    "The Eiffel Tower is in Paris, the capital of France.",
    "Berlin is the capital of Germany.",
    "The Pacific is the largest ocean on Earth.",
    "Paris is the capital and most populous city of France.",
    "Photosynthesis turns light into chemical energy.",
]


@pytest.mark.parametrize("with_model", [True, False])
def test_nvidia_rerank_reorders(default_server, with_model):
    kwargs = {"base_url": f"{default_server.url}/v1", "top_n": 3}
    if with_model:
        kwargs["model"] = "sentence-transformers/all-MiniLM-L6-v2"
    ranker = NVIDIARerank(**kwargs)
    out = ranker.compress_documents(
        query="What is the capital of France?", documents=[Document(page_content=d) for d in DOCS]
    )
    assert len(out) == 3
    assert out[0].page_content == DOCS[4]
    assert {d.page_content for d in out[:2]} == {DOCS[4], DOCS[1]}
    scores = [d.metadata["relevance_score"] for d in out]
    assert scores == sorted(scores, reverse=True)

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


def test_nvidia_embeddings_unchanged(default_server):
    import httpx
    import numpy as np
    from langchain_nvidia_ai_endpoints import NVIDIAEmbeddings

    emb = NVIDIAEmbeddings(base_url=f"{default_server.url}/v1", model="sentence-transformers/all-MiniLM-L6-v2")
    docs = emb.embed_documents(DOCS)
    query = emb.embed_query("What is the capital of France?")
    with httpx.Client(base_url=default_server.url, timeout=60) as c:
        direct = c.post("/v1/embeddings", json={"input": DOCS, "input_type": "passage"}).json()["data"]
    np.testing.assert_array_equal(np.asarray(docs, np.float32),
                                  np.asarray([d["embedding"] for d in direct], np.float32))
    assert len(query) == 384
    best = int(np.argmax(np.asarray(docs) @ np.asarray(query)))
    assert DOCS[best] == DOCS[4]
    # NVIDIAEmbeddings' default truncate NONE: an over-long text is the server's 400, raised by the client
    with pytest.raises(Exception, match="exceeds maximum allowed token size"):
        emb.embed_documents(["paris " * 400])
    assert len(NVIDIAEmbeddings(base_url=f"{default_server.url}/v1", model="sentence-transformers/all-MiniLM-L6-v2",
                                truncate="END").embed_documents(["paris " * 400])[0]) == 384

"""The official `openai` SDK, unchanged, against `/v1/embeddings` (it asks for base64 unless told otherwise)."""

from __future__ import annotations

import asyncio

import httpx
import numpy as np
import pytest

openai = pytest.importorskip("openai")

from tests.server.conftest import DEFAULT_ID  # noqa: E402

TEXTS = ["What is the capital of France?", "Paris is the capital of France.", "Bananas are yellow."]


def raw_floats(server, **extra) -> np.ndarray:
    with httpx.Client(base_url=server.url, timeout=60) as c:
        r = c.post("/v1/embeddings", json={"input": TEXTS, "encoding_format": "float", **extra})
    assert r.status_code == 200, r.text
    return np.asarray([d["embedding"] for d in r.json()["data"]], dtype=np.float32)


def test_embeddings_create(default_server):
    client = openai.OpenAI(base_url=f"{default_server.url}/v1", api_key="unused", max_retries=0)
    default = client.embeddings.create(model=DEFAULT_ID, input=TEXTS)  # base64 on the wire
    floats = client.embeddings.create(model=DEFAULT_ID, input=TEXTS, encoding_format="float", dimensions=384)
    one = client.embeddings.create(model=DEFAULT_ID, input=TEXTS[0])
    expected = raw_floats(default_server)
    assert default.model == DEFAULT_ID and default.usage.prompt_tokens == default.usage.total_tokens > 0
    assert [d.index for d in default.data] == [0, 1, 2]
    np.testing.assert_array_equal(np.asarray([d.embedding for d in default.data], np.float32), expected)
    np.testing.assert_array_equal(np.asarray([d.embedding for d in floats.data], np.float32), expected)
    np.testing.assert_allclose(one.data[0].embedding, expected[0], atol=1e-6)
    with pytest.raises(openai.NotFoundError) as err:
        client.embeddings.create(model="text-embedding-3-small", input=TEXTS)
    assert "served embedding models" in str(err.value)
    with pytest.raises(openai.BadRequestError):
        client.embeddings.create(model=DEFAULT_ID, input=TEXTS, dimensions=64)


def test_async_embeddings_create_with_nim_extensions(default_server):
    async def go():
        client = openai.AsyncOpenAI(base_url=f"{default_server.url}/v1", api_key="unused", max_retries=0)
        resp = await client.embeddings.create(model=DEFAULT_ID, input=TEXTS,
                                              extra_body={"input_type": "query", "truncate": "END"})
        await client.close()
        return resp

    resp = asyncio.run(go())
    np.testing.assert_array_equal(np.asarray([d.embedding for d in resp.data], np.float32),
                                  raw_floats(default_server, input_type="query", truncate="END"))


def test_models_list_and_retrieve(default_server):
    """`client.models.retrieve` asks `GET /v1/models/{id}` (an id with a slash in it here): it was a 404."""
    client = openai.OpenAI(base_url=f"{default_server.url}/v1", api_key="unused", max_retries=0)
    assert [m.id for m in client.models.list()] == [DEFAULT_ID]
    card = client.models.retrieve(DEFAULT_ID)
    assert card.id == DEFAULT_ID and card.object == "model" and card.owned_by == "openrerank"
    with pytest.raises(openai.NotFoundError) as err:
        client.models.retrieve("text-embedding-3-small")
    assert DEFAULT_ID in str(err.value)

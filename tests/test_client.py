"""openrerank.Client / AsyncClient: against a real server, and retry behaviour over a mock transport."""

from __future__ import annotations

import asyncio
import email.utils
import json
import time

import httpx
import pytest
from openrerank_bench.serve_process import free_port

import openrerank
from openrerank.client import RerankError, error_message, retry_after

PASSAGES = ["banana fruit", "paris is the capital", "the sea"]


# -- against the real tiny server -----------------------------------------------------------------


def test_exports_are_lazy():
    assert openrerank.Client is openrerank.client.Client
    assert {"Client", "AsyncClient", "RerankError"} <= set(openrerank.__all__)
    with pytest.raises(AttributeError):
        openrerank.NoSuchThing  # noqa: B018


def test_sync_client_against_server(tiny_server):
    with openrerank.Client(tiny_server.url) as client:
        assert client.health() is True
        assert client.models() == ["tiny"]
        results = client.rerank("paris", PASSAGES)
        top = client.rerank("paris", PASSAGES, model="tiny", top_n=2, truncate="NONE")
        with pytest.raises(RerankError) as err:
            client.rerank("paris", PASSAGES, model="nope")
    with httpx.Client(base_url=tiny_server.url) as raw:
        nim = raw.post("/v1/ranking", json={"query": {"text": "paris"},
                                            "passages": [{"text": p} for p in PASSAGES]}).json()
    assert [(r.index, r.logit) for r in results] == [(x["index"], x["logit"]) for x in nim["rankings"]]
    assert all(r.text == PASSAGES[r.index] and r.score == r.logit for r in results)
    assert top == results[:2]
    assert err.value.status == 404 and "served models: tiny" in err.value.message


def test_chunk_and_refusal_through_the_client(tiny_server):
    long = " ".join(["paris banana"] * 100)
    with openrerank.Client(tiny_server.url) as client:
        assert len(client.rerank("paris", [long, "sea"], truncate="CHUNK")) == 2
        with pytest.raises(RerankError) as err:
            client.rerank("paris", [long], truncate="NONE")
    assert err.value.status == 422 and "exceeds maximum allowed token size" in err.value.message


def test_async_client_against_server(tiny_server):
    async def go():
        async with openrerank.AsyncClient(tiny_server.url) as client:
            return await client.health(), await client.models(), await client.rerank("paris", PASSAGES, top_n=1)

    healthy, models, top = asyncio.run(go())
    assert healthy and models == ["tiny"] and len(top) == 1 and top[0].text == PASSAGES[top[0].index]


class ByLabel:
    """A pandas Series after a sort or a filter, in small: iterates its values in order, but `[i]` is by label."""

    def __init__(self, labels: list[int], values: list[str]) -> None:
        self.items = dict(zip(labels, values, strict=True))

    def __iter__(self):
        return iter(self.items.values())

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, label: int) -> str:
        return self.items[label]


def test_results_carry_their_own_text_whatever_iterable_the_passages_came_in(tiny_server):
    """A Series-like's `[index]` read another passage's text (by label), and a generator was spent by the request, so
    its lookup failed as a RerankError blaming the server's 200."""
    series = ByLabel([2, 0, 1], PASSAGES)

    async def go():
        async with openrerank.AsyncClient(tiny_server.url) as client:
            return (await client.rerank("paris", ByLabel([2, 0, 1], PASSAGES)),
                    await client.rerank("paris", (p for p in PASSAGES)))

    with openrerank.Client(tiny_server.url) as client:
        expected = client.rerank("paris", PASSAGES)
        answers = [client.rerank("paris", series), client.rerank("paris", (p for p in PASSAGES)), *asyncio.run(go())]
    assert all(r.text == PASSAGES[r.index] for r in expected)
    for results in answers:
        assert results == expected


def test_unreachable_server_raises_without_status():
    client = openrerank.Client(f"http://127.0.0.1:{free_port()}", max_retries=1, backoff=0.01)
    with pytest.raises(RerankError) as err:
        client.models()
    assert err.value.status is None and "cannot reach" in err.value.message


# -- retries and errors over a mock transport -------------------------------------------------------

OK = {"rankings": [{"index": 1, "logit": 2.5}, {"index": 0, "logit": -1.0}],
      "usage": {"prompt_tokens": 9, "total_tokens": 9}}


def scripted(*responses: httpx.Response):
    """A transport answering with the given responses in turn, recording the requests."""
    seen: list[httpx.Request] = []
    queue = list(responses)

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return queue.pop(0)

    return handler, seen


def test_retries_503_honouring_retry_after():
    handler, seen = scripted(httpx.Response(503, json={"message": "busy"}, headers={"Retry-After": "3"}),
                             httpx.Response(429, json={"message": "slow down"}),
                             httpx.Response(200, json=OK))
    client = openrerank.Client("http://x", api_key="k", transport=httpx.MockTransport(handler), backoff=0.1)
    sleeps: list[float] = []
    client._sleep = sleeps.append
    results = client.rerank("q", ["a", "b"], model="m", truncate="CHUNK")
    assert [r.index for r in results] == [1, 0] and results[0].text == "b"
    assert len(seen) == 3 and sleeps[0] >= 3.0 and 0.2 <= sleeps[1] < 1.0  # Retry-After, then backoff
    body = json.loads(seen[0].content)
    assert body == {"query": {"text": "q"}, "passages": [{"text": "a"}, {"text": "b"}], "truncate": "CHUNK",
                    "model": "m"}
    assert seen[0].headers["authorization"] == "Bearer k" and seen[0].url.path == "/v1/ranking"


def test_gives_up_after_max_retries_with_the_server_message():
    handler, seen = scripted(*[httpx.Response(429, json={"error": "Model is overloaded", "error_type": "Overloaded"})
                               for _ in range(3)])
    client = openrerank.Client("http://x", transport=httpx.MockTransport(handler), max_retries=2)
    sleeps: list[float] = []
    client._sleep = sleeps.append
    with pytest.raises(RerankError) as err:
        client.rerank("q", ["a"])
    assert len(seen) == 3 and len(sleeps) == 2 and sleeps[1] > sleeps[0]  # exponential
    assert err.value.status == 429 and err.value.message == "Model is overloaded"
    assert err.value.body["error_type"] == "Overloaded"


def test_client_errors_are_not_retried():
    handler, seen = scripted(httpx.Response(400, json={"object": "error", "message": "bad", "type": "validation"}))
    client = openrerank.Client("http://x", transport=httpx.MockTransport(handler))
    with pytest.raises(RerankError) as err:
        client.rerank("q", ["a"])
    assert len(seen) == 1 and err.value.status == 400 and str(err.value) == "400: bad"


def test_health_reports_loading_without_retrying():
    handler, seen = scripted(httpx.Response(503, json={"status": "not ready"}, headers={"Retry-After": "5"}))
    client = openrerank.Client("http://x", transport=httpx.MockTransport(handler))
    client._sleep = lambda s: pytest.fail("health must not sleep")
    assert client.health() is False and len(seen) == 1


def test_health_of_an_unreachable_server_raises_at_once():
    """A probe answers now: it retried a refused connection (3 times, ~4 s) though it says it does not."""
    def refuse(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        raise httpx.ConnectError("connection refused", request=request)

    seen: list[httpx.Request] = []
    client = openrerank.Client("http://x", transport=httpx.MockTransport(refuse))
    client._sleep = lambda s: pytest.fail("health must not sleep")
    with pytest.raises(RerankError, match="cannot reach"):
        client.health()
    assert len(seen) == 1


def test_a_timeout_says_so_on_both_clients():
    """httpx's async ReadTimeout carries no text: the async client's error read 'request to ... failed: '."""
    def slow(request: httpx.Request) -> httpx.Response:
        raise httpx.ReadTimeout("", request=request)

    with pytest.raises(RerankError, match=r"failed: timed out after 7 s \(ReadTimeout\)"):
        openrerank.Client("http://x", timeout=7, transport=httpx.MockTransport(slow)).models()

    async def go() -> None:
        client = openrerank.AsyncClient("http://x", timeout=7, transport=httpx.MockTransport(slow))
        try:
            await client.models()
        finally:
            await client.aclose()

    with pytest.raises(RerankError, match=r"failed: timed out after 7 s \(ReadTimeout\)"):
        asyncio.run(go())


def test_async_retry():
    handler, seen = scripted(httpx.Response(503, json={"message": "busy"}, headers={"Retry-After": "1"}),
                             httpx.Response(200, json=OK))
    sleeps: list[float] = []

    async def fake_sleep(s: float) -> None:
        sleeps.append(s)

    async def go():
        client = openrerank.AsyncClient("http://x", transport=httpx.MockTransport(handler), backoff=0.01)
        client._sleep = fake_sleep
        try:
            return await client.rerank("q", ["a", "b"], top_n=1)
        finally:
            await client.aclose()

    results = asyncio.run(go())
    assert [r.index for r in results] == [1] and len(seen) == 2 and sleeps[0] >= 1.0


@pytest.mark.parametrize(("body", "expected"), [
    ({"object": "error", "message": "nim says", "type": "validation"}, "nim says"),  # NIM, vLLM
    ({"message": "cohere says"}, "cohere says"),
    ({"error": "tei says", "error_type": "Validation"}, "tei says"),
    ({"error": {"message": "openai says", "type": "x"}}, "openai says"),
    ({"detail": [{"msg": "field required"}]}, "field required"),
])
def test_error_message_from_every_dialect(body, expected):
    assert error_message(httpx.Response(400, json=body)) == expected


def test_error_message_from_plain_text_and_retry_after_forms():
    assert error_message(httpx.Response(502, text="Bad Gateway from proxy")) == "Bad Gateway from proxy"
    assert retry_after(httpx.Response(503, headers={"Retry-After": "7"})) == 7
    later = email.utils.formatdate(time.time() + 30, usegmt=True)
    assert 25 <= retry_after(httpx.Response(503, headers={"Retry-After": later})) <= 31
    assert retry_after(httpx.Response(503)) is None
    assert retry_after(httpx.Response(503, headers={"Retry-After": "soon"})) is None


def test_passages_must_not_be_one_string():
    client = openrerank.Client("http://x", transport=httpx.MockTransport(lambda r: httpx.Response(200, json=OK)))
    with pytest.raises(TypeError):
        client.rerank("q", "not a list")


# -- embeddings ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("answer", [{"text": "<html>oops</html>"}, {"json": {"unexpected": True}},
                                    {"json": {"rankings": [{"index": 7, "logit": 1.0}]}}])
def test_an_answer_that_is_not_the_routes_is_a_rerank_error(answer):
    """A proxy's page or another service on the port answering 200: it was a JSONDecodeError or KeyError."""
    transport = httpx.MockTransport(lambda r: httpx.Response(200, **answer))
    client = openrerank.Client("http://x", transport=transport)
    for call in (lambda: client.rerank("q", ["a"]), lambda: client.embed(["a"]), client.models):
        with pytest.raises(openrerank.RerankError, match="unexpected answer") as caught:
            call()
        assert caught.value.status == 200

    async def main() -> None:
        async with openrerank.AsyncClient("http://x", transport=transport) as aclient:
            with pytest.raises(openrerank.RerankError, match="unexpected answer"):
                await aclient.rerank("q", ["a"])

    asyncio.run(main())


def test_a_negative_top_n_is_refused_before_sending():
    """It sliced `out[:-1]`, dropping the last passage."""
    sent = []
    client = openrerank.Client("http://x", transport=httpx.MockTransport(lambda r: sent.append(r) or
                                                                         httpx.Response(200, json=OK)))
    with pytest.raises(ValueError, match="top_n -1"):
        client.rerank("q", ["a", "b"], top_n=-1)
    assert sent == []
    assert len(client.rerank("q", ["a", "b"], top_n=0)) == 2  # 0: every passage, as Cohere's 0


def test_embed_sync_and_async_against_the_default_server(default_server):
    import numpy as np

    texts = ["paris is the capital of france", "bananas are yellow", "the sea"]
    with openrerank.Client(default_server.url) as client:
        sync = client.embed(texts)
        query = client.embed(texts[:1], input_type="query", truncate="NONE")
        with pytest.raises(RerankError) as err:
            client.embed(texts, model="nope")

    async def go():
        async with openrerank.AsyncClient(default_server.url) as client:
            return await client.embed(texts, input_type="passage")

    asynced = asyncio.run(go())
    with httpx.Client(base_url=default_server.url) as raw:
        floats = raw.post("/v1/embeddings", json={"input": texts}).json()["data"]
    expected = np.asarray([d["embedding"] for d in floats], dtype=np.float32)
    assert sync.dtype == np.float32 and sync.shape == (3, 384)
    np.testing.assert_array_equal(sync, expected)  # base64 on the wire: bit-exact
    np.testing.assert_array_equal(asynced, expected)  # the default model has no prompts
    np.testing.assert_allclose(query[0], expected[0], atol=1e-6)
    assert err.value.status == 404 and "served embedding models" in err.value.message


def test_embed_sends_openai_body_with_nim_extensions():
    import base64

    import numpy as np

    seen = []
    vecs = np.arange(6, dtype=np.float32).reshape(2, 3)

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(json.loads(request.content))
        data = [{"object": "embedding", "index": i, "embedding": base64.b64encode(vecs[i].tobytes()).decode()}
                for i in (1, 0)]  # out of order: the client sorts by index
        return httpx.Response(200, json={"object": "list", "data": data, "model": "m", "usage": {}})

    client = openrerank.Client("http://x", transport=httpx.MockTransport(handler))
    out = client.embed(["a", "b"], "m", input_type="query", dimensions=3)
    np.testing.assert_array_equal(out, vecs)
    assert seen == [{"input": ["a", "b"], "encoding_format": "base64", "truncate": "END", "model": "m",
                     "input_type": "query", "dimensions": 3}]
    with pytest.raises(TypeError):
        client.embed("one string")


def test_ranking_sends_the_body_as_given_and_checks_the_answer():
    """`ranking` is the raw NIM call (image passages, text and image together): the body goes as given, a
    malformed answer is a RerankError like any failure."""
    sent: list[httpx.Request] = []
    answers = [httpx.Response(200, json=OK), httpx.Response(200, json={"rankings": [{"index": "0"}]}),
               httpx.Response(200, json={"limits": {"max_passages": 50}})]

    def handler(request: httpx.Request) -> httpx.Response:
        sent.append(request)
        return answers.pop(0)

    body = {"query": {"text": "q"}, "passages": [{"image": "data:image/png;base64,AAAA"}, {"text": "b"}]}
    client = openrerank.Client("http://x", transport=httpx.MockTransport(handler))
    assert client.ranking(body) == OK and json.loads(sent[0].content) == body
    with pytest.raises(RerankError, match="unexpected answer"):
        client.ranking(body)
    assert client.metadata()["limits"]["max_passages"] == 50 and sent[2].url.path == "/v1/metadata"

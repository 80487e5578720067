"""NIM's gRPC API through Triton's own client (tritonclient[grpc], sync and asyncio), against a real server."""

from __future__ import annotations

import asyncio

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as aioclient
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.server.grpc.support import AUTH, MODEL, failure, infer, ranking_inputs, status_of, text_input
from tests.support import nim_body

PASSAGES = ["banana fruit", "paris is the capital", "the sea is blue"]


@pytest.fixture
def client(grpc_server):
    with grpcclient.InferenceServerClient(grpc_server.grpc_url) as c:
        yield c


def http_logits(server, query: str, passages: list[str], **extra) -> np.ndarray:
    """The HTTP route's logits in passage order, as float32."""
    with server.client() as c:
        r = c.post("/v1/ranking", json=nim_body(query, passages, **extra))
    assert r.status_code == 200, r.text
    out = np.zeros(len(passages), dtype=np.float32)
    for item in r.json()["rankings"]:
        out[item["index"]] = item["logit"]
    return out


def test_ranking_outputs_have_nims_names_shapes_and_types(client):
    result = infer(client, "paris capital", PASSAGES)
    index, logit, tokens = (result.as_numpy(n) for n in ("index", "logit", "token_count"))
    assert index.dtype == np.int32 and index.shape == (3, 1)
    assert logit.dtype == np.float32 and logit.shape == (3, 1)
    assert tokens.dtype == np.int32 and tokens.shape == (1,)
    assert sorted(index[:, 0].tolist()) == [0, 1, 2]
    assert logit[:, 0].tolist() == sorted(logit[:, 0].tolist(), reverse=True)


def test_grpc_scores_equal_http_scores_exactly(grpc_server, client):
    result = infer(client, "paris capital", PASSAGES, parameters={"truncate": "END"})
    grpc_logits = np.zeros(3, dtype=np.float32)
    grpc_logits[result.as_numpy("index")[:, 0]] = result.as_numpy("logit")[:, 0]
    assert np.array_equal(grpc_logits, http_logits(grpc_server, "paris capital", PASSAGES, truncate="END"))
    # usage: the same token count as the HTTP route's usage.prompt_tokens
    with grpc_server.client() as c:
        usage = c.post("/v1/ranking", json=nim_body("paris capital", PASSAGES)).json()["usage"]
    assert int(result.as_numpy("token_count")[0]) == usage["prompt_tokens"]


def test_query_once_per_passage_is_the_same_request(client):
    once = infer(client, "paris", PASSAGES)
    repeated = client.infer(MODEL, ranking_inputs("paris", PASSAGES, repeat_query=True), headers=AUTH)
    assert np.array_equal(once.as_numpy("logit"), repeated.as_numpy("logit"))


def test_passages_is_accepted_as_the_passage_input_name(client):
    inputs = [text_input("query", ["paris"]), text_input("passages", PASSAGES)]
    assert client.infer(MODEL, inputs, headers=AUTH).as_numpy("index").shape == (3, 1)


def test_requested_outputs_only(client):
    result = infer(client, "paris", PASSAGES, outputs=[grpcclient.InferRequestedOutput("logit")])
    assert result.as_numpy("logit").shape == (3, 1)
    assert result.as_numpy("index") is None
    exc = failure(infer, client, "paris", PASSAGES, outputs=[grpcclient.InferRequestedOutput("scores")])
    assert status_of(exc) == "INVALID_ARGUMENT" and "'scores'" in exc.message()


def test_health_live_ready_and_metadata(grpc_server, client):
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready(MODEL)
    assert not client.is_model_ready("not-served")
    meta = client.get_server_metadata(headers=AUTH)
    assert meta.name == "openrerank" and meta.version
    model = client.get_model_metadata(MODEL, headers=AUTH)
    assert model.name == MODEL and list(model.versions) == ["1"]
    assert [(t.name, t.datatype, list(t.shape)) for t in model.inputs] == [
        ("query", "BYTES", [-1, 1]), ("passage", "BYTES", [-1, 1])]
    assert [(t.name, t.datatype, list(t.shape)) for t in model.outputs] == [
        ("index", "INT32", [-1, 1]), ("logit", "FP32", [-1, 1]), ("token_count", "INT32", [1])]
    # grpc.health.v1, as load balancers and Kubernetes' gRPC probes ask it
    with grpc.insecure_channel(grpc_server.grpc_url) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for service in ("", "inference.GRPCInferenceService"):
            reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_model_names_nim_derived_served_id_and_aliases(client):
    """The gRPC name is the id lowercased with every other character as '_'; aliases get one too."""
    base = infer(client, "paris", PASSAGES).as_numpy("logit")
    for name in ("tiny", "my-reranker", "my_reranker"):
        assert np.array_equal(infer(client, "paris", PASSAGES, model=name).as_numpy("logit"), base), name
    exc = failure(infer, client, "paris", PASSAGES, model="nvidia_llama_nemotron_rerank_1b_v2")
    assert status_of(exc) == "NOT_FOUND" and "tiny" in exc.message()
    exc = failure(client.get_model_metadata, "nope", headers=AUTH)
    assert status_of(exc) == "NOT_FOUND"


@pytest.mark.parametrize("scheme", ["bearer", "BEARER", "Bearer "])
def test_the_api_keys_scheme_name_is_case_insensitive_as_over_http(grpc_server, client, scheme):
    """RFC 7235: the scheme name is case-insensitive; the HTTP routes take these, so gRPC must too."""
    headers = {"authorization": f"{scheme} {AUTH['authorization'].split()[1]}"}
    assert infer(client, "paris", PASSAGES, headers=headers).as_numpy("logit") is not None
    with grpc_server.client() as c:
        assert c.post("/v1/ranking", json=nim_body("paris", PASSAGES), headers=headers).status_code == 200


@pytest.mark.parametrize("headers", [None, {"authorization": "Bearer wrong"}, {"authorization": "grpc-secret"},
                                     {"authorization": "Basic grpc-secret"}])
def test_api_key_missing_or_wrong_is_unauthenticated(client, headers):
    exc = failure(infer, client, "paris", PASSAGES, headers=headers)
    assert status_of(exc) == "UNAUTHENTICATED" and "API key" in exc.message()
    assert status_of(failure(client.get_model_metadata, MODEL, headers=headers)) == "UNAUTHENTICATED"
    assert client.is_server_live(headers=headers)  # probes stay open, as the HTTP health routes


def test_truncate_none_over_the_window_fails_with_nims_message_end_cuts(grpc_server, client):
    long_passage = " ".join(["river"] * 300)
    for params in ({"truncate": "NONE"}, None, {"truncate": "none"}):
        exc = failure(infer, client, "paris", ["sea", long_passage], parameters=params)
        assert status_of(exc) == "INVALID_ARGUMENT"
        assert exc.message() == "Input length 304 exceeds maximum allowed token size 128"
    end = infer(client, "paris", ["sea", long_passage], parameters={"truncate": "end"})
    assert int(end.as_numpy("token_count")[0]) == 5 + 128
    # HTTP: the same message, status 422 as NIM 1.9.1+ answers
    with grpc_server.client() as c:
        r = c.post("/v1/ranking", json=nim_body("paris", ["sea", long_passage]))
    assert r.status_code == 422 and r.json()["message"] == exc.message()


# Each bad input of the HTTP NIM route (tests/server/test_nim.py), in its gRPC form: (HTTP body, gRPC inputs,
# gRPC parameters, fragments the gRPC message holds). Where the HTTP body has a gRPC twin, the two messages
# must be identical.
BAD_INPUTS = [
    ("missing query", {"passages": [{"text": "a"}]}, lambda: [text_input("passage", ["a"])], None, ["'query'"]),
    ("missing passages", {"query": {"text": "q"}}, lambda: [text_input("query", ["q"])], None, ["'passage'"]),
    ("no passages", {"query": {"text": "q"}, "passages": []},
     lambda: [text_input("query", ["q"]), text_input("passage", [])], None, ["passages"]),
    ("empty query", {"query": {"text": ""}, "passages": [{"text": "a"}]}, lambda: ranking_inputs("", ["a"]), None,
     ["query.text"]),
    ("empty passage", {"query": {"text": "q"}, "passages": [{"text": ""}]}, lambda: ranking_inputs("q", [""]),
     None, ["passages.0.text"]),
    ("truncate START", {"query": {"text": "q"}, "passages": [{"text": "a"}], "truncate": "START"},
     lambda: ranking_inputs("q", ["a"]), {"truncate": "START"}, ["truncate"]),
    ("unknown field/parameter", {"query": {"text": "q"}, "passages": [{"text": "a"}], "top_n": 3},
     lambda: ranking_inputs("q", ["a"]), {"top_n": 3}, ["'top_n'", "truncate"]),
    ("query not text", {"query": {"text": 5}, "passages": [{"text": "a"}]},
     lambda: [_int_query(), text_input("passage", ["a"])], None, ["query", "BYTES"]),
    ("unknown input", {"query": {"text": "q"}, "passages": [{"text": "a", "id": 1}]},
     lambda: [*ranking_inputs("q", ["a"]), text_input("id", ["1"])], None, ["'id'", "query", "passage"]),
    ("distinct queries", None, lambda: [text_input("query", ["q", "r"]), text_input("passage", ["a", "b"])], None,
     ["distinct queries"]),
    ("query per passage, wrong count", None,
     lambda: [text_input("query", ["q", "q"]), text_input("passage", ["a", "b", "c"])], None, ["2", "3"]),
    ("shape not [N, 1]", None, lambda: [text_input("query", ["q"]), _wide_passages()], None, ["shape"]),
    ("not UTF-8", None,
     lambda: [text_input("query", [b"caf\xe9"]), text_input("passage", ["a"])], None, ["UTF-8"]),
]

#: Cases where both protocols fail in the shared validation (the NIM request model): the very same message.
SAME_MESSAGE = {"no passages", "empty query", "empty passage", "truncate START"}


def _int_query() -> grpcclient.InferInput:
    tensor = grpcclient.InferInput("query", [1, 1], "INT32")
    tensor.set_data_from_numpy(np.array([[5]], dtype=np.int32))
    return tensor


def _wide_passages() -> grpcclient.InferInput:
    tensor = grpcclient.InferInput("passage", [1, 2], "BYTES")
    tensor.set_data_from_numpy(np.array([[b"a", b"b"]], dtype=np.object_))
    return tensor


@pytest.mark.parametrize(("case", "http_body", "inputs", "params", "fragments"), BAD_INPUTS,
                         ids=[c[0] for c in BAD_INPUTS])
def test_bad_input_is_invalid_argument_with_the_http_routes_message(grpc_server, client, case, http_body, inputs,
                                                                      params, fragments):
    exc = failure(client.infer, MODEL, inputs(), parameters=params, headers=AUTH)
    assert status_of(exc) == "INVALID_ARGUMENT", exc
    for fragment in fragments:
        assert fragment in exc.message(), exc.message()
    if http_body is not None:
        with grpc_server.client() as c:
            r = c.post("/v1/ranking", json=http_body)
        assert r.status_code == 400
        if case in SAME_MESSAGE:
            assert r.json()["message"] == exc.message()


def test_limits_passages_and_message_size(grpc_server, client):
    with grpc_server.client() as c:
        http = c.post("/v1/ranking", json=nim_body("q", ["a"] * 9)).json()["message"]
    exc = failure(infer, client, "q", ["a"] * 9)
    assert status_of(exc) == "INVALID_ARGUMENT" and exc.message() == http
    assert infer(client, "q", ["a"] * 8).as_numpy("index").shape == (8, 1)
    # --max-body-bytes bounds a gRPC message as it bounds an HTTP body (HTTP: 413)
    exc = failure(infer, client, "q", ["x" * 30000])
    assert status_of(exc) == "RESOURCE_EXHAUSTED"


def test_model_version(client):
    exc = failure(client.infer, MODEL, ranking_inputs("q", ["a"]), model_version="2", headers=AUTH)
    assert status_of(exc) == "NOT_FOUND" and "version" in exc.message()
    assert client.infer(MODEL, ranking_inputs("q", ["a"]), model_version="1", headers=AUTH) is not None
    # a version that is not served is not ready (as Triton answers), the served one is
    assert client.is_model_ready(MODEL, "1") and client.is_model_ready(MODEL)
    assert not client.is_model_ready(MODEL, "2")


def test_asyncio_client_ranks_concurrently(grpc_server):
    async def main() -> list[np.ndarray]:
        async with aioclient.InferenceServerClient(grpc_server.grpc_url) as c:
            assert await c.is_server_ready()
            calls = [c.infer(MODEL, ranking_inputs(f"query {i}", PASSAGES), headers=AUTH) for i in range(8)]
            return [r.as_numpy("logit") for r in await asyncio.gather(*calls)]

    logits = asyncio.run(main())
    assert len(logits) == 8 and all(x.shape == (3, 1) for x in logits)


def test_request_id_metrics_and_access_log_are_labelled_grpc(grpc_server, client):
    infer(client, "paris", PASSAGES, request_id="req-7", headers={**AUTH, "x-request-id": "trace-grpc-1"})
    failure(infer, client, "paris", [""])
    with grpc_server.client() as c:
        c.post("/v1/ranking", json=nim_body("paris", PASSAGES))
        text = c.get("/v1/metrics").text
    route = "/inference.GRPCInferenceService/ModelInfer"
    assert f'openrerank_requests_total{{protocol="grpc",route="{route}",status="OK"}}' in text
    assert f'openrerank_requests_total{{protocol="grpc",route="{route}",status="INVALID_ARGUMENT"}}' in text
    assert 'openrerank_requests_total{protocol="http",route="/v1/ranking",status="200"}' in text
    log = grpc_server.output()
    line = next(ln for ln in log.splitlines() if "trace-grpc-1" in ln)
    assert "gRPC ModelInfer OK" in line and "protocol=grpc" in line and "passages=3" in line


def test_the_nim_documentations_grpc_example_flow(grpc_server):
    """NIM's "Use the API (gRPC)" example, as written there: StrEnum names (lower case: `query`, `passage`,
    `index`, `logit`, `token_count`), a pydantic parameters model that lowercases `truncate`, the asyncio client,
    the query once per passage, every output requested and read back into numpy arrays."""
    from dataclasses import dataclass
    from enum import StrEnum, auto

    from pydantic import BaseModel, field_validator

    class TritonInputName(StrEnum):
        QUERY = auto()
        PASSAGE = auto()

    class TruncateValue(StrEnum):
        END = auto()
        NONE = auto()

    class TritonInputParameters(BaseModel):
        truncate: TruncateValue | None = None

        @field_validator("truncate", mode="before")
        @classmethod
        def value_to_lower(cls, v):
            return v.lower() if isinstance(v, str) else v

    class TritonOutputName(StrEnum):
        INDEX = auto()
        LOGIT = auto()
        TOKEN_COUNT = auto()

    @dataclass
    class TritonRankingResponse:
        index: np.ndarray
        logit: np.ndarray
        token_count: np.ndarray

    async def compute(model_name: str, query: str, passages: list[str], truncate: str) -> TritonRankingResponse:
        async with aioclient.InferenceServerClient(url=grpc_server.grpc_url) as client:
            queries = np.array([[query.encode("utf-8")]] * len(passages), dtype=np.object_)
            texts = np.array([[p.encode("utf-8")] for p in passages], dtype=np.object_)
            inputs = [aioclient.InferInput(TritonInputName.QUERY, list(queries.shape), "BYTES"),
                      aioclient.InferInput(TritonInputName.PASSAGE, list(texts.shape), "BYTES")]
            inputs[0].set_data_from_numpy(queries)
            inputs[1].set_data_from_numpy(texts)
            outputs = [aioclient.InferRequestedOutput(name) for name in TritonOutputName]
            params = TritonInputParameters(truncate=truncate).model_dump(exclude_none=True)
            result = await client.infer(model_name, inputs, outputs=outputs, parameters=params, headers=AUTH)
            return TritonRankingResponse(*(result.as_numpy(name) for name in TritonOutputName))

    response = asyncio.run(compute(MODEL, "which way should i go?", PASSAGES, "END"))
    assert response.index.shape == response.logit.shape == (3, 1)
    assert response.logit[:, 0].tolist() == sorted(response.logit[:, 0].tolist(), reverse=True)
    assert int(response.token_count[0]) > 0


def test_the_passage_count_is_read_from_the_shape_before_any_value(client):
    """A request whose `passage` shape declares 9 passages (over --max-passages 8) is refused by that count,
    though it carries a single value: the shape decides, before any value is decoded or validated (1.6M
    one-byte passages in 8 MB were decoded and validated for 35 s before their refusal, every other call
    unanswered meanwhile)."""
    passage = text_input("passage", ["a"])
    passage.set_shape([9, 1])
    exc = failure(client.infer, MODEL, [text_input("query", ["q"]), passage], headers=AUTH)
    assert status_of(exc) == "INVALID_ARGUMENT"
    assert exc.message() == "Number of passages (9) exceeds the maximum of 8 (--max-passages)"


def test_the_passage_count_refusal_names_the_variable_that_set_the_limit(env_server):
    """OPENRERANK_MAX_PASSAGES=3 (tests/conftest.py's LIMITS_ENV; gRPC's port from NIM_GRPC_API_PORT) was named
    `--max-passages` over gRPC too."""
    with grpcclient.InferenceServerClient(env_server.grpc_url) as c:
        exc = failure(infer, c, "q", ["a"] * 4, headers=None)
    assert status_of(exc) == "INVALID_ARGUMENT"
    assert exc.message() == "Number of passages (4) exceeds the maximum of 3 (OPENRERANK_MAX_PASSAGES='3')"


def test_a_query_declaring_more_values_than_passages_is_refused_from_its_shape(client):
    query = text_input("query", ["q"])
    query.set_shape([100, 1])
    exc = failure(client.infer, MODEL, [query, text_input("passage", ["a", "b"])], headers=AUTH)
    assert status_of(exc) == "INVALID_ARGUMENT"
    assert exc.message() == "input 'query' has 100 values for 2 passages; send one ([1, 1]) or one per passage"

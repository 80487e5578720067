"""Hugging Face text-embeddings-inference dialect: `POST /rerank`, `POST /embed`, `POST /` and `POST /invocations`
(the model's task), `GET /health` (and TEI's aliases `GET /`, `GET /ping`), `GET /info`.

`POST /rerank` is shared with Infinity (`server/dialects/infinity.py`); the body decides the dialect: `texts`
is TEI's form (bare-array answer, TEI errors), `documents` is Infinity's, which this route hands over.

Errors come back as TEI's `{"error": ..., "error_type": ...}`, with TEI's statuses (v1.9.0 and later): a client
batch above its limit or an over-long input -> 422 `Validation` (TEI answered 413 before 1.9.0), a body over
`--max-body-bytes` -> 413, empty `texts` or `inputs` -> 400 `Empty`, overloaded -> 429, not ready -> 503.
"""

from __future__ import annotations

import codecs
import time
from typing import Any

import numpy as np
import orjson
from fastapi import APIRouter, Request, Response
from pydantic import BaseModel

from openrerank import __version__
from openrerank.core.requests import RerankRequest, RerankResult, Truncate
from openrerank.families.bi_encoder import INPUT_TYPE_PROMPTS
from openrerank.server import body_budget
from openrerank.server.config import ServerConfig
from openrerank.server.dialects import common, embeddings, infinity, list_bounds
from openrerank.server.dialects.score_form import result_relevance
from openrerank.server.errors import ApiError, Dialect, Kind, register_dialect
from openrerank.server.request_messages import body_parse_message
from openrerank.server.responses import OrjsonResponse
from openrerank.sources.source import DEFAULT_MODEL_ID, public_source
from openrerank.wire.infinity import InfinityError, InfinityHealth, InfinityRerankRequest, InfinityRerankResponse
from openrerank.wire.tei import TeiEmbedRequest, TeiError, TeiInfo, TeiRank, TeiRerankRequest

_ERROR_TYPES = {
    Kind.EMPTY: "Empty", Kind.OVERLOADED: "Overloaded", Kind.UNAVAILABLE: "Unhealthy", Kind.INTERNAL: "Backend",
    Kind.TIMEOUT: "Backend", Kind.TOO_LONG: "Validation",
}
#: TEI's auto-truncate: requests without `truncate` are truncated (TEI's default since 1.x).
AUTO_TRUNCATE = True


def tei_error_body(status: int, message: str, kind: Kind) -> dict:
    return {"error": message, "error_type": _ERROR_TYPES.get(kind, "Validation")}


TEI = register_dialect(Dialect(
    "tei",
    ("/rerank", "/embed", "/health", "/info", "/", "/invocations", "/ping"),  # "/": the root alone (`dialect_for`)
    tei_error_body,
    status_for={Kind.VALIDATION: 422, Kind.TOO_MANY: 422, Kind.TOO_LONG: 422, Kind.MODEL_NOT_FOUND: 422,
                Kind.TOO_MUCH_WORK: 422, Kind.OVERLOADED: 429, Kind.TIMEOUT: 424, Kind.INTERNAL: 424},
    request_models={"/rerank": TeiRerankRequest, "/embed": TeiEmbedRequest},
    error_model=TeiError,
))
list_bounds.bound(TeiRerankRequest, texts=list_bounds.PASSAGES)
list_bounds.bound(TeiEmbedRequest, inputs=list_bounds.INPUTS)


#: Request bodies documented for /rerank (the route reads its body itself to pick the form).
OPENAPI_MODELS: tuple[type[BaseModel], ...] = (TeiRerankRequest, InfinityRerankRequest, TeiRank,
                                                InfinityRerankResponse, TeiError, InfinityError)

router = APIRouter(route_class=list_bounds.BoundedRoute)

_ERRORS = TEI.responses(
    400, 401, 408, 413, 415, 422, 424, 429, 503, s400="`texts` is empty",
    s422="Validation error: wrong types, too many texts or tokens, over-long input, unknown model",
    s424="Inference failed or timed out", s503="Not ready, shutting down, or a model worker died")
#: /rerank answers each error in the form the request used: TEI's flat body or Infinity's nested one.
_EITHER_ERROR = {"application/json": {"schema": {"oneOf": [
    {"$ref": f"#/components/schemas/{m.__name__}"} for m in (TeiError, InfinityError)]}}}
_RERANK_ERRORS = {code: {"description": entry["description"], "content": _EITHER_ERROR}
                  for code, entry in _ERRORS.items()}
_RERANK_ERRORS[400] = {"description": "TEI form: `texts` is empty; Infinity form: unknown model",
                       "content": _EITHER_ERROR}
_RERANK_ERRORS[504] = {"description": "Infinity form: deadline exceeded", "content": _EITHER_ERROR}
#: Infinity answers an inference failure with 500 in its own shape (its /rerank turns any engine exception into
#: `InternalServerError`), so the Infinity form does too; the TEI form's is 424.
_RERANK_ERRORS[500] = {"description": "Infinity form: inference failed (the message names the request id)",
                       "content": {"application/json": {"schema": {"$ref": "#/components/schemas/InfinityError"}}}}


def to_internal(body: TeiRerankRequest, *, chunking: bool = False, auto_truncate: bool = AUTO_TRUNCATE
                ) -> RerankRequest:
    """TEI request -> internal request.

    truncate (absent = `auto_truncate`): false -> NONE (over-long fails); true -> END / START by
    `truncation_direction`, or CHUNK when the server runs with `--tei-chunking`.
    """
    if not body.texts:
        raise ApiError(400, "`texts` cannot be empty", kind=Kind.EMPTY)
    truncate = auto_truncate if body.truncate is None else body.truncate
    if not truncate:
        mode = Truncate.NONE
    elif chunking:
        mode = Truncate.CHUNK
    else:
        mode = Truncate.START if body.truncation_direction.lower() == "left" else Truncate.END
    return RerankRequest(query=body.query, passages=list(body.texts), model=body.model, truncate=mode)


def result_to_wire(result: RerankResult, body: TeiRerankRequest) -> list[dict]:
    """Internal result -> TEI's bare array, best first; [0, 1] scores unless `raw_scores`."""
    scores = result.logits.astype(float) if body.raw_scores else result_relevance(result)
    out = []
    for i, _ in result.top():
        rank: dict[str, Any] = {"index": i, "score": float(scores[i])}
        if body.return_text:
            rank["text"] = body.texts[i]
        out.append(rank)
    return out


_FORMS_BODY = {"oneOf": [{"$ref": f"#/components/schemas/{m.__name__}"} for m in OPENAPI_MODELS[:2]]}


@router.post("/rerank", response_model=None, tags=["TEI", "Infinity"],
             responses={200: {"content": {"application/json": {"schema": {"oneOf": [
                 {"type": "array", "items": {"$ref": "#/components/schemas/TeiRank"}},
                 {"$ref": "#/components/schemas/InfinityRerankResponse"}]}}},
                 "description": "TEI form: a bare array of ranks; Infinity form: `results`"},
                 **_RERANK_ERRORS},
             openapi_extra={"requestBody": {"required": True, "content": {"application/json": {
                 "schema": _FORMS_BODY}}}},
             summary="Rerank texts: TEI form (`texts`) or Infinity/Cohere form (`documents`)")
async def rerank(request: Request, response: Response) -> Any:
    """`texts` -> TEI (bare array); `documents` -> Infinity (`results`, Cohere-shaped). Each form answers
    errors in its own shape."""
    payload = await json_object(request, "'query' and 'texts' (TEI) or 'documents' (Infinity/Cohere)")
    # A null field is an absent one (clients that fill every optional field send `"texts": null`).
    given = {name for name in ("texts", "documents") if payload.get(name) is not None}
    if given == {"documents"}:
        return await infinity.rerank(request, response, payload)
    if "documents" in given:
        raise ApiError(422, "send either 'texts' (TEI form) or 'documents' (Infinity/Cohere form), not both")
    if "texts" not in given:
        raise ApiError(422, "field 'texts' is required (TEI form), or 'documents' for the Infinity/Cohere form")
    return await tei_rerank(request, response, payload)


async def json_object(request: Request, fields: str) -> dict:
    """The body of a route that parses it itself (its fields decide what it is): a JSON object, else a 422 naming
    the `fields` it should hold. A leading UTF-8 byte order mark is dropped: orjson refuses it (a 422 here), the
    standard library's `json.loads(bytes)`, which parses every other route's body, skips it."""
    body = (await request.body()).removeprefix(codecs.BOM_UTF8)
    try:  # a big body in its turn (`list_bounds.off_loop`): on the loop, 16 parses at once stalled it for all 16
        payload = await list_bounds.off_loop(len(body), orjson.loads, body)
    except orjson.JSONDecodeError as exc:
        raise ApiError(422, body_parse_message(exc)) from None
    finally:
        body_budget.release(request.scope)  # parsed: admission bounds it from here
    if not isinstance(payload, dict):
        raise ApiError(422, f"request body must be a JSON object with {fields}")
    return payload


async def tei_rerank(request: Request, response: Response, payload: dict) -> list[dict]:
    """TEI's rerank of a parsed body: /rerank's TEI form, and the root routes on a reranker."""
    tei_body = await common.parse_body(request, TeiRerankRequest, payload)
    config: ServerConfig = common.config(request)
    req = to_internal(tei_body, chunking=config.tei_chunking)
    result = await common.rerank(request, response, req)
    compute_headers(response, result.prompt_tokens)
    return result_to_wire(result, tei_body)


def compute_headers(response: Response, tokens: int) -> None:
    """TEI's x-compute-tokens and x-compute-time, which it sends on /embed as on /rerank (clients and proxies
    meter by them); after `record_usage` set x-total-time, which is the compute time here."""
    response.headers["x-compute-tokens"] = str(tokens)
    response.headers["x-compute-time"] = response.headers.get("x-total-time", "0")


_HEALTH: dict[str, Any] = {"tags": ["TEI", "Infinity"], "response_model": None, "responses": {
    200: {"model": InfinityHealth, "description": "Ready"}, 503: {"model": TeiError, "description": "Not ready"}}}


@router.get("/health", **_HEALTH)
@router.get("/", summary="TEI's health alias (the Inference API's probe): /health", **_HEALTH)
@router.get("/ping", summary="TEI's health alias (SageMaker's probe): /health", **_HEALTH)
async def health(request: Request) -> Response:
    """200 once every model is loaded and alive, else 503 (also while the server shuts down). TEI's clients read
    only the status; Infinity's parse the body, `{"unix": <time>}` as Infinity answers, so 200 carries that.
    TEI answers its health on `GET /` and `GET /ping` too (open without the key, as /health: `is_health`)."""
    reason = common.unready_reason(request)
    if reason is None:
        return OrjsonResponse({"unix": time.time()})
    return OrjsonResponse({"error": f"unhealthy: {reason}", "error_type": "Unhealthy"}, status_code=503)


_DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16", "int8": "int8"}


#: TEI's names of pooling modes where sentence-transformers' differ.
_TEI_POOLING = {"lasttoken": "last_token"}


def tei_model_id(spec: str) -> str:
    """TEI's `model_id`: what the model is, its hub id or a local folder by its name (`public_source`: never the
    server's paths), the embedded default by its hub id. The id requests name it by is `served_model_name`."""
    return DEFAULT_MODEL_ID if spec == "default" else public_source(spec)


def model_type(model: Any | None) -> dict:
    """TEI's `model_type`: `embedding` (with its pooling) for a model that embeds, whose root route embeds; else
    `reranker` with one label (every other family yields one relevance score per pair)."""
    if model is not None and model.embeds:
        modes = str(model.loaded.spec.options["pooling"]).split("+")
        return {"embedding": {"pooling": "+".join(_TEI_POOLING.get(m, m) for m in modes)}}
    labels = {"0": "LABEL_0"}
    return {"reranker": {"id2label": labels, "label2id": {v: int(k) for k, v in labels.items()}}}


def info_body(config: ServerConfig, model: Any | None, name: str, spec: str) -> dict:
    """TEI's /info for the first served model `name` from `spec` (TEI serves one; see /v1/models for all)."""
    dtype = (model.dtype if model is not None else None) or config.dtype  # what auto resolved to
    return {
        "model_id": tei_model_id(spec),
        "model_sha": None,
        "model_dtype": _DTYPES.get(dtype, dtype),
        "served_model_name": name,
        "model_type": model_type(model),
        "max_concurrent_requests": config.max_queue,
        "max_input_length": model.max_length if model is not None else 0,
        "max_batch_tokens": config.batch_policy.max_tokens,
        "max_batch_requests": config.batch_policy.max_size,
        "max_client_batch_size": config.max_passages,
        "auto_truncate": AUTO_TRUNCATE,
        "tokenization_workers": 1,
        "version": __version__,
        "sha": None,
        "docker_label": None,
        "engine": (model.loaded.runtime_choice.as_metadata()
                   if model is not None and model.loaded.runtime_choice else None),
    }


@router.get("/info", tags=["TEI"], response_model=TeiInfo, responses=TEI.responses(401))
async def info(request: Request) -> dict:
    reg = common.served_models(request)
    config: ServerConfig = common.config(request)
    models = reg.models()
    model = models[0] if models else None
    if model is not None:
        return info_body(config, model, model.name, model.loaded.source.spec)
    sources = request.app.state.sources  # loading: the first
    first = next((s for s in sources if s.served_id in reg.names), sources[0])
    return info_body(config, None, first.served_id, first.spec)


#: TEI's `prompt_name` -> `input_type`: any name a model may give its query or passage prompt.
PROMPT_INPUT_TYPES = {name: kind for kind, names in INPUT_TYPE_PROMPTS.items() for name in names}

_EMBED_ERRORS = TEI.responses(
    400, 401, 408, 413, 415, 422, 424, 429, 503, s400="`inputs` is empty, or the model has no embeddings",
    s422="Validation error: wrong types, too many inputs, over-long input without truncation, unknown model or "
    "prompt_name, an unsupported dimensions", s424="Inference failed or timed out",
    s503="Not ready, shutting down, or a model worker died")
_VECTORS = {200: {"description": "One vector per input, in input order", "content": {"application/json": {
    "schema": {"type": "array", "items": {"type": "array", "items": {"type": "number"}}}}}}}


def embed_options(body: TeiEmbedRequest, auto_truncate: bool = AUTO_TRUNCATE) -> tuple[Truncate, str | None]:
    """TEI's truncate (absent = `auto_truncate`) and direction, and its `prompt_name` as an input type."""
    truncate = auto_truncate if body.truncate is None else body.truncate
    if not truncate:
        mode = Truncate.NONE
    else:
        mode = Truncate.START if body.truncation_direction.lower() == "left" else Truncate.END
    if body.prompt_name is None:
        return mode, None
    if body.prompt_name not in PROMPT_INPUT_TYPES:
        raise ApiError(422, f"prompt_name '{body.prompt_name}' is not served: name the model's query or passage "
                       f"prompt ({', '.join(PROMPT_INPUT_TYPES)})")
    return mode, PROMPT_INPUT_TYPES[body.prompt_name]


def unit_vectors(vectors: np.ndarray) -> np.ndarray:
    """TEI's `normalize`: each vector L2-normalized (a zero vector stays zero)."""
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return np.divide(vectors, norms, out=np.zeros_like(vectors), where=norms > 0).astype(np.float32)


async def embed_answer(request: Request, body: TeiEmbedRequest) -> OrjsonResponse:
    """TEI's embed: a bare array of vectors, through the embeddings dialect's engine call."""
    if body.inputs == [] or body.inputs == "":
        raise ApiError(400, "`inputs` cannot be empty", kind=Kind.EMPTY)
    if isinstance(body.inputs, list) and all(isinstance(v, str) for v in body.inputs) and "" in body.inputs:
        # TEI encodes each input alone and answers an empty one as it answers empty `inputs` (EncodingInput::is_empty)
        raise ApiError(400, f"`inputs` cannot be empty: inputs[{body.inputs.index('')}] is an empty string",
                       kind=Kind.EMPTY)
    texts = embeddings.input_texts(body.inputs, field="inputs")
    truncate, input_type = embed_options(body)
    result = await embeddings.embed_texts(request, texts, body.model, input_type=input_type, truncate=truncate,
                                          dimensions=body.dimensions)
    vectors = unit_vectors(result.embeddings) if body.normalize else result.embeddings
    response = embeddings.embed_response(request, np.ascontiguousarray(vectors, dtype=np.float32), result, texts)
    compute_headers(response, result.prompt_tokens)
    return response


@router.post("/embed", tags=["TEI"], response_model=None, responses={**_VECTORS, **_EMBED_ERRORS},
             summary="Embed texts (TEI): a bare array of vectors")
async def embed(body: TeiEmbedRequest, request: Request) -> OrjsonResponse:
    common.check_ready(request)
    return await embed_answer(request, body)


#: anyOf: a body may hold both tasks' fields (unknown fields are ignored); the model decides which are read.
_ROOT_BODY = {"anyOf": [{"$ref": f"#/components/schemas/{m.__name__}"} for m in (TeiEmbedRequest, TeiRerankRequest)]}
_ROOT_ANSWER = {"oneOf": [_VECTORS[200]["content"]["application/json"]["schema"],
                          {"type": "array", "items": {"$ref": "#/components/schemas/TeiRank"}}]}
#: What POST / and POST /invocations declare: either task's body, answer and errors.
_ROOT: dict[str, Any] = {
    "response_model": None, "tags": ["TEI"],
    "openapi_extra": {"requestBody": {"required": True, "content": {"application/json": {"schema": _ROOT_BODY}}}},
    "responses": {
        200: {"description": "An embedding model: one vector per input; a reranker: TEI's ranks, best first",
              "content": {"application/json": {"schema": _ROOT_ANSWER}}},
        **TEI.responses(400, 401, 408, 413, 415, 422, 424, 429, 503, s400="`inputs` or `texts` is empty",
                        s422="Validation error: wrong types, fields of the other task, too many inputs or texts, "
                        "over-long input without truncation, unknown model or prompt_name",
                        s424="Inference failed or timed out", s503="Not ready, shutting down, or a model worker died")},
}


@router.post("/", summary="TEI's root route: the model's task, /embed (`inputs`) or /rerank (`query`, `texts`)",
             **_ROOT)
@router.post("/invocations", summary="SageMaker's inference route, as TEI serves it: the same as POST /", **_ROOT)
async def root(request: Request, response: Response) -> Any:
    """TEI serves one model and routes its root to that model's task: `embed` for an embedding model, `rerank`
    for a reranker (TEI's `ModelType::Reranker`; every model here that does not embed scores pairs, one score per
    pair). "The" model is the one `model` names, else the first served, as /rerank and /info pick it."""
    payload = await json_object(request, "'inputs' (an embedding model) or 'query' and 'texts' (a reranker)")
    common.check_ready(request)
    name = payload.get("model")
    model = common.served_models(request).get(name if isinstance(name, str) else None)  # another type: 422 below
    if model.embeds:
        if payload.get("inputs") is None and payload.get("texts") is not None:  # a reranker client's body
            raise ApiError(422, f"POST {request.url.path} on model '{model.name}', an embedding model, embeds as "
                           "TEI's root does: send 'inputs'; rerank 'query' and 'texts' on POST /rerank")
        body = await common.parse_body(request, TeiEmbedRequest, payload)
        return await embed_answer(request, body.model_copy(update={"model": model.name}))
    if payload.get("texts") is None and payload.get("inputs") is not None:
        raise ApiError(422, f"POST {request.url.path} on model '{model.name}', a reranker, reranks as TEI's root "
                       "does: send 'query' and 'texts'; embed with an embedding model on POST /embed")
    return await tei_rerank(request, response, payload)

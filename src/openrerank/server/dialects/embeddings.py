"""OpenAI / NVIDIA NIM embeddings dialect: `POST /v1/embeddings`.

OpenAI's request and response (so the `openai` SDK works unchanged: it asks for base64 by default) with
NIM's extensions (`input_type`, `truncate`, the `<model>-query` / `<model>-passage` names) and NIM's error
body. Every bi-encoder served is an embedding model; the texts go through the model's one scheduler, batched
with whatever else (embeddings or reranking) is in flight.
"""

from __future__ import annotations

import base64
from typing import Any

import numpy as np
from fastapi import APIRouter, Request

from openrerank.core.requests import EmbedRequest, EmbedResult, Truncate
from openrerank.engine.errors import NotAnEmbeddingModelError
from openrerank.server.dialects import common, list_bounds
from openrerank.server.errors import ApiError, Dialect, Kind, NimError, nim_error_body, register_dialect
from openrerank.server.responses import OrjsonResponse
from openrerank.wire.checks import valid_text
from openrerank.wire.embeddings import EmbeddingsRequest, EmbeddingsResponse

EMBEDDINGS = register_dialect(Dialect(
    "embeddings",
    ("/v1/embeddings",),
    nim_error_body,
    request_models={"/v1/embeddings": EmbeddingsRequest},
    error_model=NimError,
))
list_bounds.bound(EmbeddingsRequest, input=list_bounds.INPUTS)

#: Where a late-interaction model's per-token vectors are (dialects/multi_vector.py serves it): named when one is
#: asked for single vectors.
MULTI_VECTOR_PATH = "/v1/embeddings/multi_vector"

#: NIM's model-name suffixes that stand for `input_type` (for OpenAI clients, which cannot send it).
INPUT_TYPE_SUFFIXES = {"-query": "query", "-passage": "passage"}

router = APIRouter(route_class=list_bounds.BoundedRoute)

_ERRORS = EMBEDDINGS.responses(400, 401, 404, 408, 413, 415, 500, 503, 504, s400="Invalid request, an over-long text "
                                "with truncate NONE, an unsupported dimensions, or a model without embeddings")


def input_texts(value: Any, field: str = "input") -> list[str]:
    """`field` (the request's texts: `input`, TEI's `inputs`) as a list of texts: a string or a list of strings;
    token ids and empty texts refused."""
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list):
        raise ApiError(400, f"{field} must be a string or a list of strings, not {_json_type(value)}")
    if not value:
        raise ApiError(400, f"{field} is empty: send at least one text")
    if all(isinstance(v, int) and not isinstance(v, bool) for v in value) or \
            all(isinstance(v, list) for v in value):
        raise ApiError(400, f"{field} as token ids is not supported: send the texts as strings (this server "
                       "tokenizes with the model's own tokenizer; LangChain's OpenAIEmbeddings sends token ids "
                       "unless check_embedding_ctx_length=False)")
    for i, v in enumerate(value):
        if not isinstance(v, str):
            raise ApiError(400, f"{field}[{i}] must be a string, not {_json_type(v)}")
        if not v:
            raise ApiError(400, f"{field}[{i}] is an empty string: every text must have content")
        try:
            valid_text(v)
        except ValueError as exc:
            raise ApiError(400, f"{field}[{i}]: {exc}") from None
    return value


def _json_type(value: Any) -> str:
    names = {bool: "a boolean", int: "a number", float: "a number", dict: "an object", list: "a list",
             type(None): "null"}
    return names.get(type(value), type(value).__name__)


def model_and_input_type(body: EmbeddingsRequest, served: list[str]) -> tuple[str | None, str | None]:
    """The id asked for and the input type, reading NIM's `-query`/`-passage` model names.

    `served`: every id a request may name, aliases included (`ServedModels.ids`), so that an alias takes the
    suffix as the served id does."""
    name, input_type = body.model, body.input_type
    if name is not None and name not in served:
        for suffix, kind in INPUT_TYPE_SUFFIXES.items():
            stem = name.removesuffix(suffix)
            if stem != name and stem in served:
                if input_type is not None and input_type != kind:
                    raise ApiError(400, f"model '{name}' means input_type '{kind}', but input_type is "
                                   f"'{input_type}'")
                return stem, kind
    return name, input_type


def encode_vector(vector: np.ndarray, encoding_format: str) -> np.ndarray | str:
    """base64: OpenAI's little-endian float32 bytes. float: the float32 array itself, which orjson writes
    as the shortest decimal that reads back as the same float32."""
    if encoding_format == "base64":
        return base64.b64encode(np.ascontiguousarray(vector, dtype="<f4").tobytes()).decode("ascii")
    return np.ascontiguousarray(vector, dtype=np.float32)


async def embed_texts(request: Request, texts: list[str], name: str | None, *, input_type: str | None = None,
                      truncate: Truncate = Truncate.NONE, dimensions: int | None = None) -> EmbedResult:
    """The one engine call of every embeddings route (OpenAI/NIM here, Infinity's, TEI's): the model `name` picks
    (None: the first embedding model), through its scheduler, within the request's deadline."""
    common.check_ready(request)
    try:
        model = common.served_models(request).get_embedder(name)
    except NotAnEmbeddingModelError as exc:
        if not exc.multi_vector:
            raise
        raise ApiError(400, f"{exc.what}: its embeddings are on POST {MULTI_VECTOR_PATH}; {exc.where}",
                       kind=Kind.UNSUPPORTED) from None
    req = EmbedRequest(texts=texts, model=model.name, input_type=input_type,  # type: ignore[arg-type]
                       truncate=truncate, dimensions=dimensions)
    return await model.embed(req, deadline=common.deadline(request))


def embed_response(request: Request, content: Any, result: EmbedResult, texts: list[str]) -> OrjsonResponse:
    """`content` as the answer (orjson writes the float32 arrays), with the usage every route reports."""
    response = OrjsonResponse(content)
    common.record_usage(request, response, model=result.model, items=len(texts), tokens=result.prompt_tokens,
                        timings=result.timings, item_kind="texts")
    return response


def openai_list(result: EmbedResult, encoding_format: str) -> dict:
    """OpenAI's embeddings answer (Infinity answers the same shape)."""
    data = [{"object": "embedding", "index": i, "embedding": encode_vector(v, encoding_format)}
            for i, v in enumerate(result.embeddings)]
    return {"object": "list", "data": data, "model": result.model,
            "usage": {"prompt_tokens": result.prompt_tokens, "total_tokens": result.prompt_tokens}}


@router.post("/v1/embeddings", tags=["Embeddings"], response_model=None,
             responses={200: {"model": EmbeddingsResponse}, **_ERRORS},
             summary="Embed texts (OpenAI and NVIDIA NIM compatible)")
async def embeddings(body: EmbeddingsRequest, request: Request) -> OrjsonResponse:
    common.check_ready(request)
    texts = input_texts(body.input)
    name, input_type = model_and_input_type(body, common.served_models(request).ids)
    result = await embed_texts(request, texts, name, input_type=input_type, truncate=Truncate(body.truncate),
                               dimensions=body.dimensions)
    return embed_response(request, openai_list(result, body.encoding_format), result, texts)

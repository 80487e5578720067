"""Multi-vector embeddings: `POST /v1/embeddings/multi_vector`, per-token vectors for late-interaction indexes.

`/v1/embeddings` stays single-vector (one vector per text, what OpenAI clients expect). A user who indexes
ColBERT vectors (PLAID, Qdrant/Vespa/Weaviate multivectors) gets each text's token vectors here, exactly
the ones reranking compares: marker, query augmentation, skiplist and normalization included, so MaxSim
over what this route returns equals the server's rerank score. Passages go through the token cache like
reranking's (an indexed passage reranks later at the cost of the query alone).

vLLM exposes token embeddings on its generic `/pooling` route (`task: token_embed`) with no query/passage
switch; this route keeps `/v1/embeddings`' shape instead, with NIM's required `input_type`.
"""

from __future__ import annotations

from fastapi import APIRouter, Request

from openrerank.core.requests import EmbedRequest, Truncate
from openrerank.engine.errors import UnknownModelError
from openrerank.engine.served import ServedModel
from openrerank.server.config import ServerConfig
from openrerank.server.dialects import common, list_bounds
from openrerank.server.dialects.embeddings import MULTI_VECTOR_PATH, encode_vector, input_texts, model_and_input_type
from openrerank.server.errors import ApiError, Dialect, Kind, NimError, nim_error_body, register_dialect
from openrerank.server.responses import OrjsonResponse
from openrerank.wire.multi_vector import MultiVectorRequest, MultiVectorResponse

PATH = MULTI_VECTOR_PATH
#: Texts per request: a 512-token passage of 128-dimension vectors is ~0.6 MB of JSON floats, so a request
#: stays under ~40 MB of response (the route's own bound; --max-inputs still applies when lower).
MAX_INPUTS = 64

MULTI_VECTOR = register_dialect(Dialect(
    "multi_vector",
    (PATH,),
    nim_error_body,
    request_models={PATH: MultiVectorRequest},
    error_model=NimError,
))

router = APIRouter(route_class=list_bounds.BoundedRoute)

_ERRORS = MULTI_VECTOR.responses(
    400, 401, 404, 408, 413, 415, 500, 503, 504,
    s400="Invalid request, no input_type, an over-long passage with truncate NONE, or a model without "
         "multi-vector embeddings",
    s413="More texts than the route takes in one request")


def input_limit(config: ServerConfig) -> int:
    """Most texts one request may send: the route's own bound, or --max-inputs when lower."""
    return min(MAX_INPUTS, config.max_inputs)


list_bounds.bound(MultiVectorRequest, input=list_bounds.ListBound(
    "inputs", input_limit, " per multi-vector request; send them in several requests", status=413, kind=Kind.TOO_LARGE,
    count=list_bounds.INPUTS.count))


def _model(request: Request, name: str | None) -> ServedModel:
    reg = common.served_models(request)
    multi = reg.late_interaction
    if name is None:
        if not multi:
            raise ApiError(400, "no late-interaction (ColBERT) model is served here: multi-vector embeddings come "
                           "from late-interaction models only")
        return reg.get(multi[0])
    try:
        model = reg.get(name)
    except UnknownModelError:
        raise UnknownModelError(name, multi or reg.names, "late-interaction models" if multi else "models") from None
    if not model.loaded.multi_vector:
        where = f"late-interaction models served here: {', '.join(multi)}" if multi else \
            "no late-interaction model is served here"
        raise ApiError(400, f"Model '{name}' ({model.loaded.family.id}) has no multi-vector embeddings; {where}")
    return model


@router.post(PATH, tags=["Embeddings"], response_model=None,
             responses={200: {"model": MultiVectorResponse}, **_ERRORS},
             summary="Per-token (multi-vector) embeddings of a late-interaction model")
async def multi_vector_embeddings(body: MultiVectorRequest, request: Request) -> OrjsonResponse:
    common.check_ready(request)
    texts = input_texts(body.input)
    name, input_type = model_and_input_type(body, common.served_models(request).ids)  # type: ignore[arg-type]
    if input_type is None:
        raise ApiError(400, "input_type is required: 'query' or 'passage' (a late-interaction model encodes the two "
                       "sides differently), or name the model '<id>-query' / '<id>-passage'")
    model = _model(request, name)
    req = EmbedRequest(texts=texts, model=model.name, input_type=input_type,  # type: ignore[arg-type]
                       truncate=Truncate(body.truncate))
    result = await model.embed_multi_vector(req, deadline=common.deadline(request))
    data = [{"object": "multi_vector_embedding", "index": i, "tokens": int(v.shape[0]), "dimensions": int(v.shape[1]),
             "embedding": encode_vector(v, body.encoding_format)} for i, v in enumerate(result.vectors)]
    response = OrjsonResponse({"object": "list", "data": data, "model": result.model,
                               "usage": {"prompt_tokens": result.prompt_tokens, "total_tokens": result.prompt_tokens}})
    common.record_usage(request, response, model=model.name, items=len(texts), tokens=result.prompt_tokens,
                        timings=result.timings)
    return response

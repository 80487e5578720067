"""NVIDIA NIM dialect: `/v1/ranking` plus models, health, metadata and metrics endpoints."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from openrerank import __version__
from openrerank.core.requests import RerankRequest, Truncate
from openrerank.engine.errors import UnknownModelError
from openrerank.engine.served_models import ServedModels
from openrerank.server.dialects import common, list_bounds
from openrerank.server.engine_config import scheduler_config
from openrerank.server.errors import NIM
from openrerank.server.responses import OrjsonResponse
from openrerank.wire.nim import (
    HealthResponse,
    NimMetadata,
    NimModelCard,
    NimModelList,
    NimRankingRequest,
    NimRankingResponse,
)

router = APIRouter(route_class=list_bounds.BoundedRoute)

#: Model ids NVIDIA renamed: clients written for the old id reach the model served under the new one.
RENAMED_MODELS = {
    "nvidia/llama-3.2-nv-rerankqa-1b-v2": "nvidia/llama-nemotron-rerank-1b-v2",
    "nvidia/llama-3.2-nemoretriever-500m-rerank-v2": "nvidia/llama-nemotron-rerank-500m-v2",
}
NIM.request_models["/v1/ranking"] = NimRankingRequest
list_bounds.bound(NimRankingRequest, passages=list_bounds.PASSAGES)
_AUTH = NIM.responses(401)
_HEALTH = {503: {"model": HealthResponse, "description": "Not ready (loading, failed, or a model worker died)"}}


@router.post("/v1/ranking", response_model=NimRankingResponse, tags=["NIM"],
             responses=NIM.responses(400, 401, 404, 408, 413, 415, 422, 500, 503, 504,
                                     s422="A query+passage pair over the model's window with truncate NONE"),
             summary="Rank passages by relevance to a query (NVIDIA NIM compatible)")
async def ranking(body: NimRankingRequest, request: Request, response: Response) -> dict:
    result = await common.rerank(request, response, rerank_request(body))
    return {
        "rankings": [{"index": i, "logit": s} for i, s in result.top()],
        "usage": {"prompt_tokens": result.prompt_tokens, "total_tokens": result.prompt_tokens},
    }


def rerank_request(body: NimRankingRequest) -> RerankRequest:
    """The NIM request as the engine's request: one conversion for HTTP and gRPC (server/grpc)."""
    images = tuple(p.image for p in body.passages)
    return RerankRequest(
        query=body.query.text,
        passages=[p.text or "" for p in body.passages],
        model=body.model,
        truncate=Truncate(body.truncate),
        max_chunks_per_passage=body.max_chunks_per_passage,
        instruction=body.instruction,
        images=images if any(i is not None for i in images) else None,
    )


def model_aliases(served: list[str], aliases: dict[str, str]) -> dict[str, str]:
    """Every other id a served model answers to: NIM's renamed ids of served models, then --alias."""
    renamed = {old: new for old, new in RENAMED_MODELS.items() if new in served and old not in served}
    return {**renamed, **aliases}


def _model_card(reg: ServedModels, name: str) -> dict:
    served = {m.name: m for m in reg.models()}
    return {"id": name, "object": "model", "owned_by": "openrerank",
            "created": served[name].created if name in served else 0,
            # rerank: /v1/ranking and the other rerank routes; embed: /v1/embeddings ([] while loading)
            "tasks": served[name].tasks if name in served else []}


@router.get("/v1/models", tags=["NIM"], response_model=None, responses={200: {"model": NimModelList}, **_AUTH})
async def models(request: Request) -> dict:
    reg = common.served_models(request)
    return {"object": "list", "data": [_model_card(reg, name) for name in reg.names]}


@router.get("/v1/models/{model_id:path}", tags=["NIM"], response_model=None,
            responses={200: {"model": NimModelCard}, **NIM.responses(404, 401)})
async def model(model_id: str, request: Request) -> dict:
    """One served model (OpenAI's `GET /v1/models/{model}`, `client.models.retrieve`); an alias names its model."""
    reg = common.served_models(request)
    name = reg.aliases.get(model_id, model_id)
    if name not in reg.names:
        raise UnknownModelError(model_id, reg.names)
    return _model_card(reg, name)


@router.get("/v1/health/live", tags=["health"], response_model=HealthResponse, responses=_HEALTH)
async def live(request: Request) -> OrjsonResponse:
    """200 while the process can serve; 503 once a model worker died (restart the process)."""
    reg = common.served_models(request)
    if reg.live:
        return OrjsonResponse({"object": "health.response", "message": "Service is live.", "status": "live"})
    return OrjsonResponse({"object": "health.response", "message": reg.status(), "status": "not live"},
                          status_code=503)


@router.get("/v1/health/ready", tags=["health"], response_model=HealthResponse, responses=_HEALTH)
async def ready(request: Request) -> OrjsonResponse:
    """200 once every model is loaded and warmed and every model worker is alive, else 503 (also while the
    server shuts down)."""
    reason = common.unready_reason(request)
    if reason is None:
        return OrjsonResponse({"object": "health.response", "message": common.served_models(request).status(),
                               "status": "ready"})
    return OrjsonResponse({"object": "health.response", "message": reason, "status": "not ready"},
                          status_code=503)


@router.get("/v1/metadata", tags=["NIM"], response_model=None, responses={200: {"model": NimMetadata}, **_AUTH})
async def metadata(request: Request) -> dict:
    reg = common.served_models(request)
    return {
        "version": __version__,
        "modelInfo": [{"shortName": m.name, "modelUrl": m.metadata()["source"]} for m in reg.models()],
        "models": [_described(m, reg) for m in reg.models()],
        "limits": limits(common.config(request), reg.models()),
    }


def _described(model, reg: ServedModels) -> dict:
    """A model's /v1/metadata entry, with the other ids it answers to (`aliases`) where it has any: a client that
    names it by an alias finds its facts (e.g. `listwise`) under its served id."""
    entry = model.metadata()
    aliases = sorted(alias for alias, name in reg.aliases.items() if name == model.name)
    if aliases:
        entry["aliases"] = aliases
    return entry


def limits(config, models: list | None = None) -> dict:
    """The per-request limits a client may run into (docs/reliability.md). The token budget is each model's
    own (from its measured speed; `models[].max_request_tokens`); this is the smallest."""
    budgets = [m.scheduler.request_budget for m in models or []]
    return {
        "max_passages": config.max_passages,
        "max_inputs": config.max_inputs,
        "max_body_bytes": config.max_body_bytes,
        "max_header_bytes": config.max_header_bytes,
        "max_request_tokens": min(budgets) if budgets else scheduler_config(config).request_budget,
        "max_chunks_per_passage": config.max_chunks_per_passage,
        "max_chunks_per_request": config.max_chunks_per_request,
        "max_image_bytes": config.max_image_bytes,
        "max_image_pixels": config.max_image_pixels,
        "request_timeout_s": config.request_timeout,
    }


@router.get("/v1/metrics", tags=["health"], response_class=Response,
            responses={200: {"content": {"text/plain": {}}, "description": "Prometheus metrics"}, **_AUTH})
@router.get("/metrics", include_in_schema=False, response_class=Response)
async def metrics(request: Request) -> Response:
    return Response(generate_latest(request.app.state.metrics.registry), media_type=CONTENT_TYPE_LATEST)

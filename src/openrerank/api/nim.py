"""NVIDIA NIM dialect: `/v1/ranking` plus models, health, metadata and metrics endpoints."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from openrerank import __version__
from openrerank.api import common
from openrerank.api.errors import NIM
from openrerank.api.responses import OrjsonResponse
from openrerank.schemas.internal import RerankRequest, Truncate
from openrerank.schemas.nim import NimRankingRequest, NimRankingResponse

router = APIRouter()
NIM.request_models["/v1/ranking"] = NimRankingRequest


@router.post("/v1/ranking", response_model=NimRankingResponse, tags=["NIM"],
             summary="Rank passages by relevance to a query (NVIDIA NIM compatible)")
async def ranking(body: NimRankingRequest, request: Request, response: Response) -> dict:
    req = RerankRequest(
        query=body.query.text,
        passages=[p.text for p in body.passages],
        model=body.model,
        truncate=Truncate(body.truncate),
    )
    result = await common.rerank(request, response, req)
    return {
        "rankings": [{"index": i, "logit": s} for i, s in result.top()],
        "usage": {"prompt_tokens": result.prompt_tokens, "total_tokens": result.prompt_tokens},
    }


@router.get("/v1/models", tags=["NIM"])
async def models(request: Request) -> dict:
    reg = common.served_models(request)
    served = {m.name: m for m in reg.models()}
    return {
        "object": "list",
        "data": [
            {"id": name, "object": "model", "owned_by": "openrerank",
             "created": served[name].created if name in served else 0,
             # rerank: /v1/ranking and the other rerank routes; embed: /v1/embeddings ([] while loading)
             "tasks": served[name].tasks if name in served else []}
            for name in reg.names
        ],
    }


@router.get("/v1/health/live", tags=["health"])
async def live() -> dict:
    return {"object": "health.response", "message": "Service is live.", "status": "live"}


@router.get("/v1/health/ready", tags=["health"])
async def ready(request: Request) -> OrjsonResponse:
    reg = common.served_models(request)
    if reg.ready:
        return OrjsonResponse({"object": "health.response", "message": "Service is ready.", "status": "ready"})
    msg = f"Model failed to load: {reg.load_error}" if reg.load_error else "Model is loading."
    return OrjsonResponse({"object": "health.response", "message": msg, "status": "not ready"},
                          status_code=503)


@router.get("/v1/metadata", tags=["NIM"])
async def metadata(request: Request) -> dict:
    reg = common.served_models(request)
    return {
        "version": __version__,
        "modelInfo": [{"shortName": m.name, "modelUrl": m.metadata()["source"]} for m in reg.models()],
        "models": [m.metadata() for m in reg.models()],
        "limits": {
            "max_passages": common.config(request).max_passages,
            "max_inputs": common.config(request).max_inputs,
            "max_body_bytes": common.config(request).max_body_bytes,
        },
    }


@router.get("/v1/metrics", tags=["health"], response_class=Response)
@router.get("/metrics", include_in_schema=False, response_class=Response)
async def metrics(request: Request) -> Response:
    return Response(generate_latest(request.app.state.metrics.registry), media_type=CONTENT_TYPE_LATEST)

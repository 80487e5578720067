"""The OpenAPI document, true to what the routes answer.

FastAPI declares a 422 "Validation Error" on every route with a body; openrerank's NIM, Cohere and
score routes answer 400 for invalid input (TEI 422, in its own error shape), so that generic entry is
dropped and each route declares its own statuses with its dialect's error body. With `--api-key` the
document declares the bearer scheme and the 401 on every protected route; without it, neither. Every route
declares the 431 that the connection's guard answers for any path. The list limits the server enforces are
declared too: non-empty lists, and at most `--max-passages` passages (documents, texts) or `--max-inputs`
embedding inputs (or the multi-vector route's own bound, when lower), as this server was started with. The
examples name a model this server serves.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from operator import attrgetter
from typing import Any

from fastapi import FastAPI

from openrerank.engine.served_models import ServedModels
from openrerank.server.config import ServerConfig
from openrerank.server.dialects.list_bounds import BOUNDED
from openrerank.server.errors import STATUS_DESCRIPTIONS, dialect_for
from openrerank.server.middleware import is_public

SECURITY_SCHEME = "bearerAuth"
_METHODS = ("get", "post", "put", "patch", "delete")


#: What any path may answer before its route runs: the connection's guard (server/http.py) answers these in the
#: error shape of the dialect owning the path, whatever the route.
GUARD_STATUSES = (431,)
#: Statuses answered with a Retry-After (overload, loading, draining), declared so generated clients read it.
RETRYABLE = ("429", "503")
RETRY_AFTER_HEADER = {"description": "Seconds to wait before retrying", "schema": {"type": "integer", "minimum": 1}}


def _is_fastapi_422(entry: dict[str, Any]) -> bool:
    ref = entry.get("content", {}).get("application/json", {}).get("schema", {}).get("$ref", "")
    return ref.endswith("/HTTPValidationError")


def _guard_responses(path: str, schemas: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """GUARD_STATUSES as `path` answers them, with its dialect's error body."""
    model = dialect_for(path).error_model
    entry: dict[str, Any] = {}
    if model is not None and model.__name__ in schemas:
        entry["content"] = {"application/json": {"schema": {"$ref": f"#/components/schemas/{model.__name__}"}}}
    return {str(code): {"description": STATUS_DESCRIPTIONS[code], **entry} for code in GUARD_STATUSES}


def adjust(schema: dict[str, Any], *, api_key: bool) -> dict[str, Any]:
    known = schema.get("components", {}).get("schemas", {})
    for path, item in schema.get("paths", {}).items():
        for method in _METHODS:
            op = item.get(method)
            if op is None:
                continue
            responses = op.setdefault("responses", {})
            responses.update(_guard_responses(path, known))
            for code in RETRYABLE:
                if code in responses:
                    responses[code].setdefault("headers", {})["Retry-After"] = RETRY_AFTER_HEADER
            if "422" in responses and _is_fastapi_422(responses["422"]):
                del responses["422"]
            if api_key and not is_public(method.upper(), path):
                op["security"] = [{SECURITY_SCHEME: []}]
            else:
                responses.pop("401", None)
    components = schema.setdefault("components", {})
    schemas = components.get("schemas", {})
    text = repr(schema.get("paths"))
    for name in ("HTTPValidationError", "ValidationError"):
        if name in schemas and f"/{name}'" not in text and f"/{name}\"" not in text:
            schemas.pop(name)
    if "HTTPValidationError" not in schemas:
        schemas.pop("ValidationError", None)
    if api_key:
        components["securitySchemes"] = {SECURITY_SCHEME: {
            "type": "http", "scheme": "bearer",
            "description": "`openrerank serve --api-key KEY`: send `Authorization: Bearer KEY`."}}
    return schema


def list_limits() -> dict[tuple[str, str], Callable[[ServerConfig], int]]:
    """(request schema, field) -> the bound on that list's length, read off the server's config: the bounds the
    dialects declared (`dialects/list_bounds.py`), which the routes enforce."""
    return {(model.__name__, name): bound.limit for model, fields in BOUNDED.items() for name, bound in fields.items()}


#: (request schema, field) -> the ServerConfig attribute that is the field's largest accepted value.
VALUE_LIMITS = {
    ("NimRankingRequest", "max_chunks_per_passage"): "max_chunks_per_passage",
    ("CohereV1RerankRequest", "max_chunks_per_doc"): "max_chunks_per_passage",
}


def declare_list_limits(schema: dict[str, Any], config: ServerConfig) -> dict[str, Any]:
    """Every list-valued field the server bounds gets `minItems: 1` and `maxItems` = its bound; the
    chunk counts a request may ask for get their `maximum`."""
    schemas = schema.get("components", {}).get("schemas", {})
    for (name, field), attr in VALUE_LIMITS.items():
        prop = schemas.get(name, {}).get("properties", {}).get(field)
        for branch in [] if prop is None else [prop, *prop.get("anyOf", [])]:
            if branch.get("type") == "integer":
                branch["maximum"] = getattr(config, attr)
    for (name, field), limit in list_limits().items():
        prop = schemas.get(name, {}).get("properties", {}).get(field)
        if prop is None:
            continue
        for branch in [prop, *prop.get("anyOf", [])]:
            if branch.get("type") == "array":
                branch.update(minItems=1, maxItems=limit(config))
    return schema


_SERVED = attrgetter("names")
#: Schemas whose examples name a model -> the served ids such an example may name (it names the first): with a
#: fixed id, "Try it out" in /docs answered 404 on a server serving another model.
EXAMPLE_MODELS: dict[str, Callable[[ServedModels], list[str]]] = {
    "NimRankingRequest": _SERVED,
    "CohereV1RerankRequest": _SERVED,
    "CohereV2RerankRequest": _SERVED,
    "CohereRerankResponse": _SERVED,
    "InfinityRerankResponse": _SERVED,
    "ScoreRequest": _SERVED,
    "ScoreResponse": _SERVED,
    "EmbeddingsRequest": attrgetter("embedders"),
    "InfinityEmbeddingsRequest": attrgetter("embedders"),
    "TeiEmbedRequest": attrgetter("embedders"),
    "MultiVectorRequest": attrgetter("late_interaction"),
}


def name_served_models(schema: dict[str, Any], models: ServedModels) -> dict[str, Any]:
    """A copy of `schema` whose examples name a model this server serves; an example naming a model is left
    out where no model fits (no embedding model: no /v1/embeddings example)."""
    schema = copy.deepcopy(schema)  # the examples are the wire models' own objects: never edited in place
    schemas = schema.get("components", {}).get("schemas", {})
    for name, candidates in EXAMPLE_MODELS.items():
        target = schemas.get(name, {})
        if "examples" not in target:
            continue
        served = candidates(models)
        kept = [example if "model" not in example else {**example, "model": served[0]}
                for example in target["examples"] if served or "model" not in example]
        if kept:
            target["examples"] = kept
        else:
            del target["examples"]
    return schema


def install_openapi(app: FastAPI, config: ServerConfig, models: ServedModels) -> None:
    """`app.openapi` answers the adjusted document, its examples naming `models`; it is kept once the models
    are loaded (while they load, which of them embed is not known yet)."""
    build = app.openapi
    adjusted: list[dict[str, Any]] = []
    final: list[dict[str, Any]] = []

    def openapi() -> dict[str, Any]:
        if final:
            return final[0]
        if not adjusted:
            adjusted.append(declare_list_limits(adjust(build(), api_key=bool(config.api_key)), config))
        doc = name_served_models(adjusted[0], models)
        if models.loaded:
            final.append(doc)
        return doc

    app.openapi = openapi  # type: ignore[method-assign]

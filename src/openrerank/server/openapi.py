"""The OpenAPI document, true to what the routes answer.

FastAPI declares a 422 "Validation Error" on every route with a body; openrerank's NIM, Cohere and
score routes answer 400 for invalid input (TEI 422, in its own error shape), so that generic entry is
dropped and each route declares its own statuses with its dialect's error body. With `--api-key` the
document declares the bearer scheme and the 401 on every protected route; without it, neither. The list
limits the server enforces are declared too: non-empty lists, and at most `--max-passages` passages
(documents, texts) or `--max-inputs` embedding inputs, as this server was started with.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI

from openrerank.server.config import ServerConfig
from openrerank.server.middleware import PUBLIC_PATHS

SECURITY_SCHEME = "bearerAuth"
_METHODS = ("get", "post", "put", "patch", "delete")


def _is_fastapi_422(entry: dict[str, Any]) -> bool:
    ref = entry.get("content", {}).get("application/json", {}).get("schema", {}).get("$ref", "")
    return ref.endswith("/HTTPValidationError")


def adjust(schema: dict[str, Any], *, api_key: bool) -> dict[str, Any]:
    for path, item in schema.get("paths", {}).items():
        for method in _METHODS:
            op = item.get(method)
            if op is None:
                continue
            responses = op.setdefault("responses", {})
            if "422" in responses and _is_fastapi_422(responses["422"]):
                del responses["422"]
            if api_key and path not in PUBLIC_PATHS:
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


#: (request schema, field) -> the ServerConfig attribute bounding that list's length.
LIST_LIMITS = {
    ("NimRankingRequest", "passages"): "max_passages",
    ("CohereV1RerankRequest", "documents"): "max_passages",
    ("CohereV2RerankRequest", "documents"): "max_passages",
    ("TeiRerankRequest", "texts"): "max_passages",
    ("InfinityRerankRequest", "documents"): "max_passages",
    ("ScoreRequest", "text_1"): "max_passages",
    ("ScoreRequest", "text_2"): "max_passages",
    ("EmbeddingsRequest", "input"): "max_inputs",
}


#: (request schema, field) -> the ServerConfig attribute that is the field's largest accepted value.
VALUE_LIMITS = {
    ("NimRankingRequest", "max_chunks_per_passage"): "max_chunks_per_passage",
    ("CohereV1RerankRequest", "max_chunks_per_doc"): "max_chunks_per_passage",
}


def declare_list_limits(schema: dict[str, Any], config: ServerConfig) -> dict[str, Any]:
    """Every list-valued field the server bounds gets `minItems: 1` and `maxItems` = the flag's value; the
    chunk counts a request may ask for get their `maximum`."""
    schemas = schema.get("components", {}).get("schemas", {})
    for (name, field), attr in VALUE_LIMITS.items():
        prop = schemas.get(name, {}).get("properties", {}).get(field)
        for branch in [] if prop is None else [prop, *prop.get("anyOf", [])]:
            if branch.get("type") == "integer":
                branch["maximum"] = getattr(config, attr)
    for (name, field), attr in LIST_LIMITS.items():
        prop = schemas.get(name, {}).get("properties", {}).get(field)
        if prop is None:
            continue
        for branch in [prop, *prop.get("anyOf", [])]:
            if branch.get("type") == "array":
                branch.update(minItems=1, maxItems=getattr(config, attr))
    return schema


def install_openapi(app: FastAPI, config: ServerConfig) -> None:
    build = app.openapi
    adjusted: list[dict[str, Any]] = []

    def openapi() -> dict[str, Any]:
        if not adjusted:
            adjusted.append(declare_list_limits(adjust(build(), api_key=bool(config.api_key)), config))
        return adjusted[0]

    app.openapi = openapi  # type: ignore[method-assign]

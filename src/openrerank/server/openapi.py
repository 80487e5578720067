"""The OpenAPI document, true to what the routes answer.

FastAPI declares a 422 "Validation Error" on every route with a body; openrerank's NIM, Cohere and
score routes answer 400 for invalid input (TEI 422, in its own error shape), so that generic entry is
dropped and each route declares its own statuses with its dialect's error body. With `--api-key` the
document declares the bearer scheme and the 401 on every protected route; without it, neither.
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


def install_openapi(app: FastAPI, config: ServerConfig) -> None:
    build = app.openapi
    adjusted: list[dict[str, Any]] = []

    def openapi() -> dict[str, Any]:
        if not adjusted:
            adjusted.append(adjust(build(), api_key=bool(config.api_key)))
        return adjusted[0]

    app.openapi = openapi  # type: ignore[method-assign]

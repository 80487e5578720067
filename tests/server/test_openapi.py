"""The served OpenAPI document (server/openapi.py): statuses every route answers, examples naming what is served."""

from __future__ import annotations

import orjson
from fastapi.testclient import TestClient

from openrerank.server import errors
from openrerank.server.app import create_app
from openrerank.server.config import ServerConfig
from openrerank.server.http import headers_too_large


def test_every_route_declares_the_431_in_the_shape_its_path_answers():
    """Headers over --max-header-bytes get a 431 on any path, in the error shape of the path's dialect (the
    connection's guard answers it); no route declared it."""
    with TestClient(create_app(ServerConfig(models=["default"]), load_models=False)) as c:
        doc = c.get("/openapi.json").json()
    schemas = doc["components"]["schemas"]
    checked = 0
    for path, item in doc["paths"].items():
        for method, op in item.items():
            declared = op["responses"].get("431")
            assert declared is not None, (method, path)
            assert "--max-header-bytes" in declared["description"]
            model = errors.dialect_for(path).error_model
            ref = declared["content"]["application/json"]["schema"]["$ref"]
            assert model is not None and ref == f"#/components/schemas/{model.__name__}", (path, ref)
            answer = headers_too_large(f"{method.upper()} {path} HTTP/1.1\r\n".encode(), 100)
            assert answer.startswith(b"HTTP/1.1 431 ")
            body = orjson.loads(answer.split(b"\r\n\r\n", 1)[1])
            assert set(body) <= set(schemas[model.__name__]["properties"]), (path, body)
            model.model_validate(body)
            checked += 1
    assert checked >= 15

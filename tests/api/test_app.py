"""App-level behaviour that needs no model: readiness before loading, error shapes, metric labels."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from openrerank.api.app import create_app, route_paths
from openrerank.api.errors import format_validation_errors
from openrerank.config import ServerConfig
from openrerank.schemas.nim import NimRankingRequest
from tests.support import nim_body


def test_not_ready_until_models_load():
    app = create_app(ServerConfig(models=["default"]), load_models=False)
    with TestClient(app) as c:
        assert c.get("/v1/health/live").status_code == 200
        ready = c.get("/v1/health/ready")
        assert ready.status_code == 503
        assert ready.json()["status"] == "not ready"
        r = c.post("/v1/ranking", json=nim_body("q", ["a"]))
        assert r.status_code == 503
        assert r.json()["object"] == "error"
        assert "Retry-After" in r.headers
        # listed before loading, so clients that ask /v1/models first still see the id
        assert [m["id"] for m in c.get("/v1/models").json()["data"]] == ["sentence-transformers/all-MiniLM-L6-v2"]


def test_wait_for_models_is_ready_at_startup(tiny_model_dir):
    """Under Ray Serve a replica is ready when the lifespan startup ends: models must be loaded by then."""
    app = create_app(ServerConfig(models=[f"tiny={tiny_model_dir}"]), wait_for_models=True)
    with TestClient(app) as c:
        assert c.get("/v1/health/ready").status_code == 200  # no polling: loaded and warmed up
        assert c.post("/v1/ranking", json=nim_body("q", ["a", "b"])).status_code == 200


def test_wait_for_models_fails_the_startup_on_a_load_error(tmp_path):
    app = create_app(ServerConfig(models=[f"broken={tmp_path / 'missing'}"]), wait_for_models=True)
    with pytest.raises(RuntimeError, match=r"model loading failed: .*missing"), TestClient(app):
        pass


def test_route_paths_cover_included_routers():
    paths = route_paths(create_app(load_models=False))
    assert {"/v1/ranking", "/v1/models", "/v1/health/ready", "/v1/metrics"} <= paths


def test_validation_message_names_allowed_fields():
    errors = [{"type": "extra_forbidden", "loc": ("body", "top_n"), "msg": "Extra inputs are not permitted"},
              {"type": "missing", "loc": ("body", "query"), "msg": "Field required"}]
    msg = format_validation_errors(errors, NimRankingRequest)
    assert msg.startswith("Unknown field(s) 'top_n'; allowed fields are: model, query, passages, truncate")
    assert "field 'query' is required" in msg

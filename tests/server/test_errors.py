"""The failure table and the dialects' error shapes: one list of kinds, one mapping for HTTP and gRPC, and a
setting named as the operator gave it."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from openrerank.core.images import ImageInputError, ImageTooLargeError
from openrerank.engine.errors import DeadlineExceededError, RequestTooLargeError
from openrerank.engine.image_queue import DecodeBacklogError
from openrerank.server import app as app_module  # registers every dialect
from openrerank.server.config import ServerConfig
from openrerank.server.dialects import list_bounds
from openrerank.server.errors import (
    _DIALECTS,
    FAILURES,
    ApiError,
    Dialect,
    Kind,
    failure_for,
    failure_message,
    nim_error_body,
)

SHOWN = {"request-timeout": "NIM_REQUEST_TIMEOUT_S='0.02'"}


def test_an_image_error_is_answered_by_its_class_not_by_an_http_status_it_carries():
    """core/images.py carried 413 or 400, and HTTP and gRPC each turned it back into a kind by hand."""
    assert failure_for(ImageTooLargeError("big", passage_index=0)) == FAILURES[ImageTooLargeError]
    assert (FAILURES[ImageTooLargeError].status, FAILURES[ImageTooLargeError].kind) == (413, Kind.TOO_LARGE)
    assert failure_for(ImageInputError("bad")) == FAILURES[ImageInputError]
    assert (FAILURES[ImageInputError].status, FAILURES[ImageInputError].kind) == (400, Kind.INVALID_IMAGE)
    assert failure_for(DecodeBacklogError(3.0, 1.0, 1.0)).kind is Kind.OVERLOADED  # as its base
    assert failure_for(KeyError("x")) is None


def test_a_failure_names_a_setting_as_the_operator_gave_it():
    assert failure_message(DeadlineExceededError(0.02), SHOWN) == \
        "request timed out after 0.02 s (NIM_REQUEST_TIMEOUT_S='0.02')"
    assert failure_message(DeadlineExceededError(0.02)) == "request timed out after 0.02 s (--request-timeout)"
    assert failure_message(ImageInputError("bad", passage_index=1), SHOWN) == "passage 1: bad"


def test_the_app_answers_with_the_settings_as_shown_to_it():
    """`create_app(shown=...)`: what the CLI hands it (`serve_settings`), read where failures are answered."""
    app = app_module.create_app(ServerConfig(), load_models=False, shown=SHOWN)

    @app.post("/v1/ranking/boom")
    async def boom():
        raise DeadlineExceededError(0.02)

    @app.post("/v1/ranking/work")
    async def work():
        raise RequestTooLargeError("tokens", 9, 5, "max-request-tokens")

    with TestClient(app) as c:
        timed_out, too_much = c.post("/v1/ranking/boom"), c.post("/v1/ranking/work")
    assert timed_out.status_code == 504
    assert timed_out.json()["message"] == "request timed out after 0.02 s (NIM_REQUEST_TIMEOUT_S='0.02')"
    assert too_much.status_code == 400 and too_much.json()["message"].endswith("(--max-request-tokens)")


def test_a_kind_nothing_declares_is_refused_where_it_is_written():
    """A typo in a dialect's overrides was silently no override at all."""
    with pytest.raises(ValueError, match="too_lnog"):
        Dialect("x", ("/x",), nim_error_body, status_for={"too_lnog": 422})  # type: ignore[dict-item]
    with pytest.raises(ValueError, match="overlaoded"):
        ApiError(503, "busy", kind="overlaoded")  # type: ignore[arg-type]
    assert nim_error_body(400, "m", Kind.TOO_LONG)["type"] == "too_long"


def test_no_dialect_restates_the_status_a_kind_already_comes_with():
    """Eleven overrides said what the failure table already did (`model_not_found: 404` in five dialects)."""
    defaults = {failure.kind: failure.status for failure in FAILURES.values()}
    defaults[list_bounds.PASSAGES.kind] = list_bounds.PASSAGES.status
    restated = {d.name: {k: v for k, v in d.status_for.items() if defaults.get(k) == v} for d in _DIALECTS}
    assert {name: same for name, same in restated.items() if same} == {}

"""Errors in each dialect's own shape and status codes.

Handlers raise plain exceptions (ApiError, engine and text errors); the app's exception handlers
find the dialect that owns the request path and let it render the error. Clients of each API then
see exactly the error bodies they already parse.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from pydantic import BaseModel

from openrerank.core.images import ImageInputError, ImageTooLargeError
from openrerank.core.settings import Shown
from openrerank.engine.errors import (
    BatchFailedError,
    DeadlineExceededError,
    DeviceMemoryError,
    EngineError,
    EngineStoppedError,
    ModelOutputError,
    QueueFullError,
    RequestTooLargeError,
    UnknownModelError,
    UnsupportedRequestError,
    WorkerDiedError,
)
from openrerank.runtimes.base import HostMemoryError
from openrerank.server.responses import OrjsonResponse
from openrerank.text.prepare import InputTooLongError, TextInputError


class Kind(StrEnum):
    """What went wrong, in words every dialect shares: each answers a kind with its own status
    (`Dialect.status_for`) and some write it in their bodies (NIM's and Infinity's `type`), so the values are
    API output. The one list of kinds: a kind nothing here names is refused where it is written."""

    VALIDATION = "validation"  # the request is malformed (400, or 422 where the route says)
    EMPTY = "empty"  # TEI: a list of texts is empty
    UNSUPPORTED = "unsupported"  # the model does not do what the request asks
    INVALID_IMAGE = "invalid_image"  # a passage image the server will not decode
    INVALID_HTTP = "invalid_http"  # a request the HTTP parser could not read
    AUTH = "auth"
    NOT_FOUND = "not_found"  # no such route
    MODEL_NOT_FOUND = "model_not_found"
    METHOD_NOT_ALLOWED = "method_not_allowed"
    UNSUPPORTED_MEDIA_TYPE = "unsupported_media_type"  # a Content-Encoding other than gzip or deflate
    NOT_IMPLEMENTED = "not_implemented"  # a transfer coding other than chunked
    HTTP = "http"  # any other HTTP error Starlette raises
    TOO_LARGE = "too_large"  # a body, headers, image or list over its size limit
    TOO_LONG = "too_long"  # a text over the model's window that may not be truncated
    TOO_MANY = "too_many"  # a list over its count limit
    TOO_MUCH_WORK = "too_much_work"  # more tokens or chunks than one request may hold
    OVERLOADED = "overloaded"  # back-pressure: retry later
    UNAVAILABLE = "unavailable"  # not ready, shutting down, or out of device memory
    TIMEOUT = "timeout"  # the request's deadline passed
    TIMEOUT_BODY = "timeout_body"  # the body did not arrive in time
    TIMEOUT_HEADERS = "timeout_headers"  # the headers did not arrive in time
    INTERNAL = "internal"  # the server's fault


class ApiError(Exception):
    """A client or server error with a generic kind that each dialect maps to its status code."""

    def __init__(self, status: int, message: str, *, kind: Kind = Kind.VALIDATION,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.kind = Kind(kind)
        self.headers = headers or {}


@dataclass(frozen=True)
class Failure:
    """How one kind of engine or text failure is answered: a status and a generic kind (each dialect may
    map the kind to its own status, `Dialect.status_for`), and any headers the answer carries."""

    status: int
    kind: Kind
    headers: Callable[[Exception], dict[str, str]] | None = None


def _retry_after(exc: Exception) -> dict[str, str]:
    return {"Retry-After": str(max(1, round(getattr(exc, "retry_after", 1.0))))}


#: Every failure below the server, answered in the request's dialect (a subclass answers as its base, unless it
#: is here itself: `failure_for`). HTTP (app.py) and gRPC (grpc/service.py) both answer from this table.
FAILURES: dict[type[Exception], Failure] = {
    UnknownModelError: Failure(404, Kind.MODEL_NOT_FOUND),
    UnsupportedRequestError: Failure(400, Kind.UNSUPPORTED),
    InputTooLongError: Failure(400, Kind.TOO_LONG),
    # A text the model cannot read as sent (marker text only): answered as the dialect answers an empty text.
    TextInputError: Failure(400, Kind.VALIDATION),
    ImageInputError: Failure(400, Kind.INVALID_IMAGE),
    ImageTooLargeError: Failure(413, Kind.TOO_LARGE),
    RequestTooLargeError: Failure(400, Kind.TOO_MUCH_WORK),
    QueueFullError: Failure(503, Kind.OVERLOADED, _retry_after),
    DeadlineExceededError: Failure(504, Kind.TIMEOUT),
    EngineStoppedError: Failure(503, Kind.UNAVAILABLE, lambda exc: {"Retry-After": "1"}),
    # A CPU runtime's host memory ran short under the load of the moment: the same answer, worth a retry.
    HostMemoryError: Failure(503, Kind.UNAVAILABLE, _retry_after),
    # Capacity, not a client error: one of its sequences does not fit even alone (other requests scored).
    DeviceMemoryError: Failure(503, Kind.UNAVAILABLE),
    WorkerDiedError: Failure(503, Kind.UNAVAILABLE),
}

#: Faults of the model itself: a 500 whose message names the request id, and an error line in the log.
MODEL_FAULTS: tuple[type[Exception], ...] = (BatchFailedError, ModelOutputError)


def failure_for(exc: Exception) -> Failure | None:
    """How `exc` is answered: its own class's entry in `FAILURES`, else its nearest base's (the lookup HTTP's
    exception handlers make), or None when it is no failure below the server."""
    return next((FAILURES[cls] for cls in type(exc).__mro__ if cls in FAILURES), None)


def failure_message(exc: Exception, shown: Shown | None = None) -> str:
    """What a failure below the server answers: its message, a setting it names written as the operator gave it
    (`shown`: how the settings not typed as flags are named, core/settings.py)."""
    return exc.message(shown) if isinstance(exc, EngineError) else str(exc)


class ErrorResponse(OrjsonResponse):
    """An error answer that also leaves its message in the request's state (`error`), where the access log
    line picks it up as `reason`."""

    def __init__(self, content: Any, *, reason: str, **kwargs: Any) -> None:
        super().__init__(content, **kwargs)
        self.reason = reason

    async def __call__(self, scope, receive, send) -> None:
        scope.setdefault("state", {})["error"] = self.reason
        await super().__call__(scope, receive, send)


#: Longest message an error body carries (messages may quote client input, e.g. a model name).
MAX_MESSAGE_CHARS = 2000


def safe_text(text: str, limit: int = MAX_MESSAGE_CHARS) -> str:
    """Text that can always be put in a JSON response: lone surrogates escaped, bounded length."""
    text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text if len(text) <= limit else text[: limit - 3] + "..."


#: What each kind of failure is by default; dialects override some (`Dialect.status_for`).
STATUS_DESCRIPTIONS = {
    400: "Invalid request", 401: "Missing or wrong API key", 404: "Unknown model", 408: "Request body too slow",
    413: "Body too large", 415: "Content-Encoding other than gzip or deflate", 422: "Validation error",
    431: "Request line and headers over --max-header-bytes (the connection is closed)",
    424: "Inference failed", 429: "Overloaded, retry later", 500: "Internal error (the log has the request id)",
    503: "Not ready, shutting down, or overloaded", 504: "Request timed out",
}


@dataclass
class Dialect:
    """How one dialect reports errors."""

    name: str
    prefixes: tuple[str, ...]  # request paths it owns (exact or prefix match)
    render: Callable[[int, str, Kind], Any]  # (status, message, kind) -> JSON body
    #: kind -> this dialect's status, where it differs from the status the failure comes with
    status_for: dict[Kind, int] = field(default_factory=dict)
    request_models: dict[str, type[BaseModel]] = field(default_factory=dict)  # path -> body model
    error_model: type[BaseModel] | None = None  # the error body, for the OpenAPI document

    def __post_init__(self) -> None:
        self.status_for = {Kind(kind): status for kind, status in self.status_for.items()}  # a typo fails here

    def response(self, status: int, message: str, kind: Kind,
                 headers: dict[str, str] | None = None) -> OrjsonResponse:
        kind = Kind(kind)
        status = self.status_for.get(kind, status)
        message = safe_text(message)
        return ErrorResponse(self.render(status, message, kind), reason=message, status_code=status,
                             headers=headers)

    def responses(self, *codes: int, **descriptions: str) -> dict[int | str, dict[str, Any]]:
        """OpenAPI `responses` for a route: each status with this dialect's error body."""
        out: dict[int | str, dict[str, Any]] = {}
        for code in codes:
            entry: dict[str, Any] = {"description": descriptions.get(f"s{code}", STATUS_DESCRIPTIONS[code])}
            if self.error_model is not None:
                entry["model"] = self.error_model
            out[code] = entry
        return out


def _under(path: str, prefix: str) -> bool:
    """`path` is `prefix` or below it; the root "/" (TEI's `POST /`) owns itself alone, not every path."""
    return path == prefix or (prefix != "/" and path.startswith(prefix.rstrip("/") + "/"))


def nim_error_body(status: int, message: str, kind: Kind) -> dict:
    return {"object": "error", "message": message, "type": kind}


class NimError(BaseModel):
    object: str = "error"
    message: str
    type: str


#: NIM 1.9.1+ answers an over-window pair under truncate NONE with 422 (400 before).
NIM = Dialect("nim", ("/v1/ranking",), nim_error_body, status_for={Kind.TOO_LONG: 422}, error_model=NimError)
_DIALECTS: list[Dialect] = [NIM]


def register_dialect(dialect: Dialect) -> Dialect:
    _DIALECTS.insert(0, dialect)
    return dialect


def dialect_for(path: str) -> Dialect:
    """The dialect owning a path, the most specific prefix first (`/v1/embeddings/multi_vector` is not
    `/v1/embeddings`); NIM's shape for everything else (models, metadata, unknown routes)."""
    best, best_len = NIM, -1
    for d in _DIALECTS:
        for p in d.prefixes:
            if _under(path, p) and len(p) > best_len:
                best, best_len = d, len(p)
    return best

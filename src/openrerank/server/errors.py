"""Errors in each dialect's own shape and status codes.

Handlers raise plain exceptions (ApiError, engine and text errors); the app's exception handlers
find the dialect that owns the request path and let it render the error. Clients of each API then
see exactly the error bodies they already parse.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel

from openrerank.engine.errors import (
    BatchFailedError,
    DeadlineExceededError,
    DeviceMemoryError,
    EngineStoppedError,
    ModelOutputError,
    QueueFullError,
    RequestTooLargeError,
    UnknownModelError,
    UnsupportedRequestError,
    WorkerDiedError,
)
from openrerank.server.responses import OrjsonResponse
from openrerank.text.prepare import InputTooLongError, TextInputError


class ApiError(Exception):
    """A client or server error with a generic kind that each dialect maps to its status code."""

    def __init__(self, status: int, message: str, *, kind: str = "validation",
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.kind = kind  # validation | auth | not_found | too_large | overloaded | timeout | backend
        self.headers = headers or {}


@dataclass(frozen=True)
class Failure:
    """How one kind of engine or text failure is answered: a status and a generic kind (each dialect may
    map the kind to its own status, `Dialect.status_for`), and any headers the answer carries."""

    status: int
    kind: str
    headers: Callable[[Exception], dict[str, str]] | None = None


def _retry_after(exc: Exception) -> dict[str, str]:
    return {"Retry-After": str(max(1, round(getattr(exc, "retry_after", 1.0))))}


#: Every failure below the server, answered in the request's dialect (a subclass answers as its base).
FAILURES: dict[type[Exception], Failure] = {
    UnknownModelError: Failure(404, "model_not_found"),
    UnsupportedRequestError: Failure(400, "unsupported"),
    InputTooLongError: Failure(400, "too_long"),
    # A text the model cannot read as sent (marker text only): answered as the dialect answers an empty text.
    TextInputError: Failure(400, "validation"),
    RequestTooLargeError: Failure(400, "too_much_work"),
    QueueFullError: Failure(503, "overloaded", _retry_after),
    DeadlineExceededError: Failure(504, "timeout"),
    EngineStoppedError: Failure(503, "unavailable", lambda exc: {"Retry-After": "1"}),
    # Capacity, not a client error: one of its sequences does not fit even alone (other requests scored).
    DeviceMemoryError: Failure(503, "unavailable"),
    WorkerDiedError: Failure(503, "unavailable"),
}

#: Faults of the model itself: a 500 whose message names the request id, and an error line in the log.
MODEL_FAULTS: tuple[type[Exception], ...] = (BatchFailedError, ModelOutputError)
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
    render: Callable[[int, str, str], Any]  # (status, message, kind) -> JSON body
    status_for: dict[str, int] = field(default_factory=dict)  # kind -> status override
    request_models: dict[str, type[BaseModel]] = field(default_factory=dict)  # path -> body model
    error_model: type[BaseModel] | None = None  # the error body, for the OpenAPI document

    def response(self, status: int, message: str, kind: str,
                 headers: dict[str, str] | None = None) -> OrjsonResponse:
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


def nim_error_body(status: int, message: str, kind: str) -> dict:
    return {"object": "error", "message": message, "type": kind}


class NimError(BaseModel):
    object: str = "error"
    message: str
    type: str


#: NIM 1.9.1+ answers an over-window pair under truncate NONE with 422 (400 before).
NIM = Dialect("nim", ("/v1/ranking",), nim_error_body, status_for={"too_long": 422}, error_model=NimError)
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


#: Errors a message reads at most: more would be cut at `MAX_MESSAGE_CHARS` anyway, after being formatted (600k
#: errors made a 6.5 MB message, a second of work, to send its first 2,000 characters).
MAX_ERRORS_READ = 100


def format_validation_errors(errors: list[dict], model: type[BaseModel] | None) -> str:
    """pydantic errors as one readable sentence (the first `MAX_ERRORS_READ`, and how many more); unknown top-level
    fields name the allowed ones."""
    parts: list[str] = []
    unknown: list[str] = []
    for err in errors[:MAX_ERRORS_READ]:
        loc = [str(x) for x in err.get("loc", ()) if x != "body"]
        where = ".".join(loc)
        typ = err.get("type", "")
        if typ == "extra_forbidden":
            if len(loc) == 1:
                unknown.append(loc[0])
                continue
            parts.append(f"unknown field '{where}'")
        elif typ == "json_invalid":
            ctx = err.get("ctx", {}).get("error", "")
            parts.append(f"request body is not valid JSON: {ctx}".rstrip(": "))
        elif typ == "missing" and not loc:  # FastAPI's missing body: nothing was sent
            parts.append("request body is empty: send a JSON object")
        elif typ == "missing":
            parts.append(f"field '{where}' is required")
        else:
            msg = err.get("msg", "invalid value").removeprefix("Value error, ")
            parts.append(f"{where}: {msg}" if where else msg)
    if unknown:
        allowed = ", ".join(model.model_fields) if model is not None else ""
        names = ", ".join(f"'{u}'" for u in unknown)
        parts.insert(0, f"Unknown field(s) {names}" + (f"; allowed fields are: {allowed}" if allowed else ""))
    if len(errors) > MAX_ERRORS_READ:
        parts.append(f"and {len(errors) - MAX_ERRORS_READ} more errors")
    return "; ".join(parts) or "invalid request"

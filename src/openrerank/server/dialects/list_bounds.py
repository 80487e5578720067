"""The request lists the server bounds (passages, documents, texts, pairs, embedding inputs), refused by count
before any element is validated.

A request over a count limit is refused from its raw JSON: the body is parsed (once), each bounded list's
length is read, and only then does pydantic validate the elements. Validating first cost seconds per megabyte
on the event loop (an 8 MB body of 600k one-letter passages: 14 s, with `/v1/health/live` unanswered all the
while, long enough for a liveness probe to restart the pod) before the count it was refused for.

Every dialect declares its bounded lists with `bound`, next to its request model; one check (`check_lists`)
runs for every route: FastAPI-validated bodies through the routers' `BoundedRoute`, bodies a route parses
itself through `common.parse_body`. The OpenAPI document's `maxItems` come from the same declarations.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request, Response
from fastapi.routing import APIRoute
from pydantic import BaseModel

from openrerank.server.config import ServerConfig
from openrerank.server.errors import ApiError


def _list_length(value: Any) -> int | None:
    return len(value) if isinstance(value, list) else None


@dataclass(frozen=True)
class ListBound:
    """At most `limit(config)` items in a list; past it, a refusal "Number of {what} (N) exceeds the maximum
    of L{where}". `count`: how many items a raw JSON value holds (None: not a list this bound counts)."""

    what: str
    limit: Callable[[ServerConfig], int]
    where: str
    status: int = 400
    kind: str = "too_many"
    count: Callable[[Any], int | None] = field(default=_list_length)

    def require(self, config: ServerConfig, count: int) -> None:
        limit = self.limit(config)
        if count > limit:
            raise ApiError(self.status, f"Number of {self.what} ({count}) exceeds the maximum of {limit}{self.where}",
                           kind=self.kind)


def _max_passages(config: ServerConfig) -> int:
    return config.max_passages


def _max_inputs(config: ServerConfig) -> int:
    return config.max_inputs


#: The rerank dialects' passages (documents, texts): `--max-passages`.
PASSAGES = ListBound("passages", _max_passages, " (--max-passages)")
#: vLLM score's texts: one pair per text of the longer side, `--max-passages` pairs.
PAIRS = ListBound("pairs", _max_passages, " (--max-passages)")


def _texts(value: Any) -> int | None:
    """An embeddings `input` list of texts; a flat list of integers is one text as token ids (refused as
    such by the route, not counted as inputs)."""
    if not isinstance(value, list) or (value and isinstance(value[0], int)):
        return None
    return len(value)


#: Embedding inputs: `--max-inputs`.
INPUTS = ListBound("inputs", _max_inputs, " (--max-inputs)", count=_texts)

#: Request model -> its bounded list fields -> their bound.
BOUNDED: dict[type[BaseModel], dict[str, ListBound]] = {}


def bound(model: type[BaseModel], **fields: ListBound) -> None:
    """Declare `model`'s bounded lists (by field name)."""
    BOUNDED.setdefault(model, {}).update(fields)


def check_lists(config: ServerConfig, model: type[BaseModel], payload: Any) -> None:
    """Refuse a raw (parsed, not validated) body of `model` that holds more items in a bounded list than allowed."""
    if not isinstance(payload, dict):
        return
    for name, limit in BOUNDED.get(model, {}).items():
        count = limit.count(payload.get(name))
        if count is not None:
            limit.require(config, count)


class _ParsedRequest(Request):
    """The request, its body already read and parsed: FastAPI's handler takes both from here."""

    def __init__(self, request: Request, body: bytes, payload: Any) -> None:
        super().__init__(request.scope, request.receive)
        self._raw, self._payload = body, payload

    async def body(self) -> bytes:
        return self._raw

    async def json(self) -> Any:
        return self._payload


class BoundedRoute(APIRoute):
    """A route whose body model has bounded lists refuses an over-count body before FastAPI validates it.

    The body is parsed once, with FastAPI's own parser (the standard library's: orjson reads a few bodies
    differently, an integer beyond 64 bits as a float, and refuses `1e400` or a lone surrogate, which must keep
    their answers), the counts are read, and the parsed body goes on to FastAPI. A body that does not parse is
    left to FastAPI, which answers it as before. (A custom request class: FastAPI's documented way to change
    how a route reads its body.)"""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()
        model = self.body_field.field_info.annotation if self.body_field is not None else None
        if model not in BOUNDED:
            return handler

        async def bounded_handler(request: Request) -> Response:
            body = await request.body()
            try:
                payload = json.loads(body)
            except (ValueError, RecursionError):
                return await handler(request)  # FastAPI parses it again and answers the error
            check_lists(request.app.state.config, model, payload)  # type: ignore[arg-type]
            return await handler(_ParsedRequest(request, body, payload))

        return bounded_handler

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

import asyncio
import contextvars
import functools
import gc
import json
import weakref
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass, field
from typing import Any, get_args

from fastapi import Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from pydantic import BaseModel

from openrerank.core.settings import Shown, setting_name
from openrerank.server import body_budget
from openrerank.server.config import ServerConfig
from openrerank.server.errors import ApiError, Kind
from openrerank.server.request_messages import format_validation_errors

#: A body at least this large is parsed, counted and validated on a worker thread, not on the event loop: a
#: legal 8 MB body (Cohere v1, 512 documents of 1,200 fields) took 91 ms to parse and 245 ms to validate, during
#: which no other request, probe or drain signal was served. Below this size the hop to a thread costs more
#: than it saves.
OFF_LOOP_BYTES = 64 * 1024
#: After one big body's work, when another waits for its turn (`off_loop`), the event loop has this long to
#: itself before the next starts: a parse holds the GIL throughout, so back-to-back parses left the loop only
#: the instants between them, too short to accept and answer a probe's connection.
LOOP_TURN_S = 0.02


def _list_length(value: Any) -> int | None:
    return len(value) if isinstance(value, list) else None


@dataclass(frozen=True)
class ListBound:
    """At most `limit(config)` items in a list; past it, a refusal "Number of {what} (N) exceeds the maximum
    of L{where}", or, for a bound a setting sets, "... of L (the setting)", named as the operator gave it
    (`setting`: its flag without dashes; `shown`, core/settings.py). `count`: how many items a raw JSON value
    holds (None: not a list this bound counts)."""

    what: str
    limit: Callable[[ServerConfig], int]
    where: str = ""
    status: int = 400
    kind: Kind = Kind.TOO_MANY
    count: Callable[[Any], int | None] = field(default=_list_length)
    setting: str | None = None

    def require(self, config: ServerConfig, count: int, shown: Shown | None = None) -> None:
        limit = self.limit(config)
        if count > limit:
            where = f" ({setting_name(self.setting, shown)})" if self.setting else self.where
            raise ApiError(self.status, f"Number of {self.what} ({count}) exceeds the maximum of {limit}{where}",
                           kind=self.kind)


def _max_passages(config: ServerConfig) -> int:
    return config.max_passages


def _max_inputs(config: ServerConfig) -> int:
    return config.max_inputs


#: The rerank dialects' passages (documents, texts): `--max-passages`.
PASSAGES = ListBound("passages", _max_passages, setting="max-passages")
#: vLLM score's texts: one pair per text of the longer side, `--max-passages` pairs.
PAIRS = ListBound("pairs", _max_passages, setting="max-passages")


def _texts(value: Any) -> int | None:
    """An embeddings `input` list of texts; a flat list of integers is one text as token ids (refused as
    such by the route, not counted as inputs)."""
    if not isinstance(value, list) or (value and isinstance(value[0], int)):
        return None
    return len(value)


#: Embedding inputs: `--max-inputs`.
INPUTS = ListBound("inputs", _max_inputs, count=_texts, setting="max-inputs")

#: Request model -> its bounded list fields -> their bound.
BOUNDED: dict[type[BaseModel], dict[str, ListBound]] = {}


def bound(model: type[BaseModel], **fields: ListBound) -> None:
    """Declare `model`'s bounded lists (by field name)."""
    BOUNDED.setdefault(model, {}).update(fields)


def _without_gc(work: Callable[..., Any], *args: Any) -> Any:
    """`work(*args)` with the cyclic garbage collector paused. A JSON tree holds no cycles, yet building one of
    2.8M containers set off ~3,600 collections, 8 of them full passes over every object of the server (its
    models' included): 90% of the parse, 1.5-5 s of it, where the parse alone takes 0.2 s. (The switch is
    process-wide: other threads' collections wait for this work too, a fraction of a second.)"""
    paused = gc.isenabled()
    if paused:
        gc.disable()
    try:
        return work(*args)
    finally:
        if paused:
            gc.enable()


class _OneAtATime:
    """The turn of one big body's work (parse, count, validate) in this process's event loop.

    The standard library's C JSON parser (and orjson) hold the GIL for a whole parse: an 8 MB body of 2.8M
    empty lists, 130-170 MB of Python objects, took 1.5-5 s here (`_without_gc`: 0.2-0.4 s). Each on its own
    worker thread, 16 such bodies at once kept `/v1/health/live` unanswered for 28-42 s (a liveness probe's
    6 x 1 s restarts the pod long before) and raised the RSS by 1 GB. One at a time, the loop runs between
    them (`LOOP_TURN_S`), waiting requests hold no thread, and one body's objects are alive at a time."""

    def __init__(self) -> None:
        self.lock = asyncio.Lock()
        self.waiting = 0

    async def run(self, work: Callable[..., Any], *args: Any) -> Any:
        loop = asyncio.get_running_loop()
        self.waiting += 1
        try:
            await self.lock.acquire()
        finally:
            self.waiting -= 1
        try:
            job = loop.run_in_executor(None, functools.partial(contextvars.copy_context().run, _without_gc, work,
                                                               *args))
        except BaseException:
            self.lock.release()
            raise
        # The turn ends when the thread is done, not when its request is: one cancelled (its client gone)
        # leaves its parse running, and the next must not start beside it.
        job.add_done_callback(lambda done: self._end_turn(loop, done))
        return await asyncio.shield(job)

    def _end_turn(self, loop: asyncio.AbstractEventLoop, done: asyncio.Future) -> None:
        if not done.cancelled():
            # Retrieved here: a request cancelled meanwhile never awaits it, and asyncio would log the unretrieved
            # refusal at ERROR, its repr holding the whole body (a 7 MB body logged 9 MB a disconnect).
            done.exception()
        if self.waiting:
            loop.call_later(LOOP_TURN_S, self.lock.release)
        else:
            self.lock.release()


_TURNS: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _OneAtATime] = weakref.WeakKeyDictionary()


async def off_loop(size: int, work: Callable[..., Any], *args: Any) -> Any:
    """`work(*args)` for a body of `size` bytes: on a worker thread when the body is big (`OFF_LOOP_BYTES`), one
    such body at a time (`_OneAtATime`)."""
    if size < OFF_LOOP_BYTES:
        return work(*args)
    loop = asyncio.get_running_loop()
    turns = _TURNS.get(loop)
    if turns is None:
        turns = _TURNS[loop] = _OneAtATime()
    return await turns.run(work, *args)


def check_lists(config: ServerConfig, model: type[BaseModel], payload: Any, shown: Shown | None = None) -> None:
    """Refuse a raw (parsed, not validated) body of `model` that holds more items in a bounded list than allowed
    (`shown`: how the refusal names a setting not typed as a flag, core/settings.py)."""
    if not isinstance(payload, dict):
        return
    for name, limit in BOUNDED.get(model, {}).items():
        count = limit.count(payload.get(name))
        if count is not None:
            limit.require(config, count, shown)


#: A body with more unknown fields than this, where its model forbids them, is refused from its raw JSON naming
#: the first few, before pydantic validates it: pydantic builds one error per unknown key, and a 7 MB body of
#: 600k of them cost ~10 s (most of it turning those errors into Python objects, a 6.5 MB message cut to 2,000
#: characters), with /v1/health/live unanswered for seconds. Up to this many, pydantic answers as ever (every
#: error it finds, unknown fields named with the allowed ones).
MAX_UNKNOWN_FIELDS = 8


def _closed_model(annotation: Any) -> type[BaseModel] | None:
    """The one model a field's value is (`M`, `list[M]`, `M | None`), else None (no model, or a choice of two)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    found = {m for arg in get_args(annotation) if (m := _closed_model(arg)) is not None}
    return found.pop() if len(found) == 1 else None


def unknown_fields(model: type[BaseModel], payload: Any, loc: tuple[str | int, ...] = ()) -> Iterator[tuple]:
    """Where a raw body holds a key `model` (or a model nested in it, a passage) forbids, in body order."""
    if not isinstance(payload, dict):
        return
    fields = model.model_fields
    if model.model_config.get("extra") == "forbid":
        known = {*fields, *(f.alias for f in fields.values() if f.alias),
                 *(f.validation_alias for f in fields.values() if isinstance(f.validation_alias, str))}
        yield from ((*loc, key) for key in payload if key not in known)
    for name, info in fields.items():
        inner = _closed_model(info.annotation)
        key = info.alias or name
        if inner is None or key not in payload:
            continue
        value = payload[key]
        items = enumerate(value) if isinstance(value, list) else ((None, value),)
        for i, item in items:
            yield from unknown_fields(inner, item, (*loc, key) if i is None else (*loc, key, i))


def check_unknown_fields(model: type[BaseModel], payload: Any) -> None:
    """Refuse a raw body with more than `MAX_UNKNOWN_FIELDS` unknown fields, naming that many: the answer pydantic's
    errors would give, less the rest (`format_validation_errors`), with the dialect's status and shape."""
    found = list(unknown_fields(model, payload))
    if len(found) <= MAX_UNKNOWN_FIELDS:
        return
    named = [{"type": "extra_forbidden", "loc": ("body", *where), "msg": "Extra inputs are not permitted"}
             for where in found[:MAX_UNKNOWN_FIELDS]]
    more = len(found) - MAX_UNKNOWN_FIELDS
    raise ApiError(400, f"{format_validation_errors(named, model)}; and {more} more unknown fields")


class _ParsedRequest(Request):
    """The request, its body already read and validated: FastAPI's handler takes both from here (`json()`: the
    validated model, which FastAPI validates again at no cost: pydantic passes an instance of the model through)."""

    def __init__(self, request: Request, body: bytes, payload: Any) -> None:
        super().__init__(request.scope, request.receive)
        self._raw, self._payload = body, payload

    async def body(self) -> bytes:
        return self._raw

    async def json(self) -> Any:
        return self._payload


class BoundedRoute(APIRoute):
    """A route whose body model has bounded lists refuses an over-count body before FastAPI validates it, and
    validates a big body off the event loop.

    The body is parsed once, with FastAPI's own parser (the standard library's: orjson reads a few bodies
    differently, an integer beyond 64 bits as a float, and refuses `1e400` or a lone surrogate, which must keep
    their answers), the counts are read, then the body is validated as FastAPI would (its own body field, so
    the errors are the ones it reports) and the validated model goes on to FastAPI, which takes a model
    instance as it is. A body that does not parse is left to FastAPI, which answers it as before. (A custom
    request class: FastAPI's documented way to change how a route reads its body.)"""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()
        body_field = self.body_field
        model = body_field.field_info.annotation if body_field is not None else None
        if body_field is None or model not in BOUNDED:
            return handler

        def prepare(config: ServerConfig, shown: Shown, body: bytes) -> Any:
            """The body parsed, counted and validated (`_UNPARSED` when it is not JSON)."""
            try:
                payload = json.loads(body)
            except (ValueError, RecursionError):
                return _UNPARSED
            try:
                check_lists(config, model, payload, shown)  # type: ignore[arg-type]
                check_unknown_fields(model, payload)  # type: ignore[arg-type]
            except ApiError as exc:
                refusal = exc.with_traceback(None)  # its frames held the body's objects until it was answered
            else:
                value, errors = body_field.validate(payload, {}, loc=("body",))
                if errors:
                    raise RequestValidationError(errors, body=payload)
                return value
            del payload  # a refused body's objects are freed here, in its turn, not later on the event loop
            raise refusal

        async def bounded_handler(request: Request) -> Response:
            body = await request.body()  # JSON whatever its content type said: the body guard declared it so
            try:
                state = request.app.state
                value = await off_loop(len(body), prepare, state.config, state.shown, body)
            finally:
                body_budget.release(request.scope)  # parsed: admission bounds it from here
            if value is _UNPARSED:
                return await handler(request)  # FastAPI parses it again and answers the error
            return await handler(_ParsedRequest(request, body, value))

        return bounded_handler


_UNPARSED = object()

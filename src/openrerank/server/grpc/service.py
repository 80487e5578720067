"""The KServe V2 `GRPCInferenceService`: NIM's gRPC API over the same models, limits and scheduler as HTTP.

Every RPC goes through `_call`: once the server's drain has begun, a refusal (UNAVAILABLE) for any but the
probes; API key (a bearer token in the `authorization` metadata, as over HTTP; the
liveness and readiness RPCs are open, as the HTTP health routes are), request id (`x-request-id` metadata
in and out), one access-log line and the request metrics labelled `protocol="grpc"`, and the mapping of
failures to status codes. A client error is never INTERNAL: the status table is `_STATUS` below.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import grpc

from openrerank import __version__
from openrerank.core.settings import Shown
from openrerank.engine.errors import DeadlineExceededError, DeadlineUnreachableError, UnknownModelError
from openrerank.engine.rates import DEADLINE_MARGIN_S
from openrerank.engine.served_models import ServedModels
from openrerank.runtimes.heap import HEAP
from openrerank.server.config import ServerConfig
from openrerank.server.dialects import common, nim
from openrerank.server.drain import CLOSED_MESSAGE
from openrerank.server.errors import MODEL_FAULTS, ApiError, Kind, failure_for, failure_message, safe_text
from openrerank.server.grpc import ranking
from openrerank.server.grpc.protocol import open_inference_pb2 as pb
from openrerank.server.grpc.protocol import open_inference_pb2_grpc as pb_grpc
from openrerank.server.grpc.tensors import TensorError, parameter_value, raw_output, read_bytes_inputs
from openrerank.server.middleware import access_log, bearer_matches, trace_request

log = logging.getLogger(__name__)

SERVICE = "inference.GRPCInferenceService"
Code = grpc.StatusCode

#: A failure's kind (server/errors.py `Kind`: ApiError kinds and FAILURES' kinds) -> status code; any other 4xx is
#: INVALID_ARGUMENT, any other 5xx UNAVAILABLE. The HTTP routes' table (FAILURES) is the one list of failures.
_KIND_STATUS = {Kind.AUTH: Code.UNAUTHENTICATED, Kind.UNAVAILABLE: Code.UNAVAILABLE, Kind.NOT_FOUND: Code.NOT_FOUND,
                Kind.MODEL_NOT_FOUND: Code.NOT_FOUND, Kind.OVERLOADED: Code.RESOURCE_EXHAUSTED,
                Kind.TOO_LARGE: Code.RESOURCE_EXHAUSTED, Kind.TIMEOUT: Code.DEADLINE_EXCEEDED}
_REQUEST_ID_OK = re.compile(r"[A-Za-z0-9._:/+=@-]{1,128}")
#: Probes: their access lines are DEBUG, as the HTTP health routes' are.
_QUIET = ("ServerLive", "ServerReady", "ModelReady")
_PUBLIC = _QUIET
#: The statuses that make a call's span an error: OTel's gRPC conventions for a server span (the others are the
#: client's mistake, as HTTP's 4xx).
_SERVER_FAULTS = (Code.UNKNOWN, Code.DEADLINE_EXCEEDED, Code.UNIMPLEMENTED, Code.INTERNAL, Code.UNAVAILABLE,
                  Code.DATA_LOSS)


def _code(status: int, kind: Kind) -> grpc.StatusCode:
    return _KIND_STATUS.get(kind) or (Code.INVALID_ARGUMENT if status < 500 else Code.UNAVAILABLE)


class _Abort(Exception):
    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class InferenceService(pb_grpc.GRPCInferenceServiceServicer):
    """Serves the models of one app (its `state`: models, config, metrics)."""

    def __init__(self, state: Any) -> None:
        self.state = state
        api_key = state.config.api_key
        self._key = api_key.encode() if api_key else None
        self._running = 0  # calls other than the probes, unfinished
        self._idle = asyncio.Event()
        self._idle.set()

    async def wait_idle(self) -> None:
        """Until no call but the probes is running (`server.py` stops the server only then: see there)."""
        await self._idle.wait()

    @property
    def models(self) -> ServedModels:
        return self.state.models

    @property
    def config(self) -> ServerConfig:
        return self.state.config

    @property
    def shown(self) -> Shown | None:
        """How a refusal names the settings not typed as flags (the app's `shown`; none on a state built bare)."""
        return getattr(self.state, "shown", None)

    # --- the RPCs ---------------------------------------------------------------------------------------

    async def ServerLive(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        return await self._call("ServerLive", context, lambda usage: self._live())

    async def ServerReady(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        return await self._call("ServerReady", context, lambda usage: self._ready())

    async def ModelReady(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        return await self._call("ModelReady", context, lambda usage: self._model_ready(request))

    async def ServerMetadata(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        return await self._call("ServerMetadata", context, lambda usage: self._server_metadata())

    async def ModelMetadata(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        return await self._call("ModelMetadata", context, lambda usage: self._model_metadata(request))

    async def ModelInfer(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        arrival = time.monotonic()
        return await self._call("ModelInfer", context, lambda usage: self._infer(request, context, usage, arrival))

    # --- what each does -----------------------------------------------------------------------------------

    async def _live(self) -> Any:
        return pb.ServerLiveResponse(live=self.models.live)

    def _serving(self) -> bool:
        """Ready, and not draining: what ServerReady and ModelReady say (ModelInfer is refused UNAVAILABLE once the
        drain has begun, and a ModelReady of true meanwhile sent a client's next call to its refusal)."""
        return self.models.ready and not self.state.drain.draining

    async def _ready(self) -> Any:
        return pb.ServerReadyResponse(ready=self._serving())

    async def _model_ready(self, request: Any) -> Any:
        try:
            name = self._served_id(request.name)
            self._check_version(request.version)
        except (UnknownModelError, _Abort):  # not served: not ready (Triton's answer), as for an unknown name
            return pb.ModelReadyResponse(ready=False)
        return pb.ModelReadyResponse(ready=self._serving() and name in {m.name for m in self.models.models()})

    async def _server_metadata(self) -> Any:
        return pb.ServerMetadataResponse(name="openrerank", version=__version__, extensions=[])

    async def _model_metadata(self, request: Any) -> Any:
        name = self._served_id(request.name)
        self._check_version(request.version)
        tensor = pb.ModelMetadataResponse.TensorMetadata
        served = {m.name: m for m in self.models.models()}
        properties = {"model_id": name}
        if name in served:
            properties["max_length"] = str(served[name].max_length)
        return pb.ModelMetadataResponse(
            name=ranking.grpc_model_name(name), versions=["1"], platform="openrerank",
            inputs=[tensor(name=i.name, datatype="BYTES", shape=[-1, 1])
                    for i in ranking.model_inputs(name in served and served[name].takes_images)],
            outputs=[tensor(name=o.name, datatype=o.datatype, shape=ranking.output_shape(o))
                     for o in ranking.OUTPUTS],
            properties=properties)

    async def _infer(self, request: Any, context: grpc.aio.ServicerContext, usage: dict[str, Any],
                     arrival: float) -> Any:
        served_id = self._served_id(request.model_name)
        self._check_version(request.model_version)
        # names first, then counts from the shapes, and only then any value: a request's size alone (hundreds of
        # thousands of unknown inputs, parameters or repeated outputs; 1.6M one-byte passages) cost seconds on the
        # event loop, no other call answered meanwhile, before the refusal its names or counts had decided
        wanted = ranking.requested_outputs(o.name for o in request.outputs)
        ranking.check_input_names(t.name for t in request.inputs)
        ranking.check_parameter_names(request.parameters)
        common.require_passage_count(self.config, ranking.declared_passages(request.inputs), self.shown)
        parameters = {key: parameter_value(value) for key, value in request.parameters.items()}
        body = ranking.parse_request(read_bytes_inputs(request), parameters, served_id)
        req = nim.rerank_request(body)
        common.require_ready(self.models)
        model = self.models.get(served_id)
        if req.has_images:
            self.models.check_images(model)
        deadline, set_by = self._deadline(arrival, context, parameters)
        try:
            result = (await model.rerank_many([req], deadline=deadline))[0]
        except DeadlineExceededError:  # on any path (tokenizing, queue, score cache): the deadline that applied
            if set_by is None:
                raise
            raise _Abort(Code.DEADLINE_EXCEEDED, f"request timed out after {deadline - arrival:.3g} s ({set_by})"
                         ) from None
        except DeadlineUnreachableError as exc:  # refused at admission: name the deadline it would have missed
            if set_by is None:
                raise
            raise exc.set_by(set_by) from None
        t = result.timings
        usage.update(model=model.name, passages=len(req.passages), tokens=result.prompt_tokens,
                     tokenize_ms=t.tokenize_ms, queue_ms=t.queue_ms, inference_ms=t.inference_ms)
        values = ranking.output_values(result)
        response = pb.ModelInferResponse(model_name=request.model_name or ranking.grpc_model_name(model.name),
                                         model_version="1", id=request.id)
        for out in wanted:
            response.outputs.add(name=out.name, datatype=out.datatype, shape=list(values[out.name].shape))
            response.raw_output_contents.append(raw_output(out.datatype, values[out.name]))
        return response

    # --- shared -------------------------------------------------------------------------------------------

    def _served_id(self, name: str) -> str:
        """The served id a gRPC model name means: NIM's derived name, the id itself, or an alias of it."""
        reg = self.models
        if not name:
            if not reg.names:
                raise UnknownModelError("<none>", [])
            return reg.names[0]
        ids = reg.ids
        by_grpc = {ranking.grpc_model_name(i): i for i in ids}
        found = name if name in ids else by_grpc.get(name)
        if found is None:
            raise UnknownModelError(name, [ranking.grpc_model_name(n) for n in reg.names])
        return reg.aliases.get(found, found)

    @staticmethod
    def _check_version(version: str) -> None:
        if version not in ("", "1"):
            raise _Abort(Code.NOT_FOUND, f"model version '{safe_text(version, 100)}' is not served; "
                         "the only version is 1 (or leave it empty)")

    def _deadline(self, arrival: float, context: grpc.aio.ServicerContext,
                  parameters: dict[str, Any]) -> tuple[float, str | None]:
        """The soonest of --request-timeout, the client's gRPC deadline and a Triton `timeout` parameter (µs),
        and what set it when not --request-timeout (a timeout then names that, not the server's flag, which
        the engine's DeadlineExceededError names)."""
        deadline, set_by = arrival + self.config.request_timeout, None
        remaining = context.time_remaining()
        if remaining is not None and (by_client := time.monotonic() + remaining) < deadline:
            deadline, set_by = by_client, "the client's gRPC deadline"
        timeout_us = parameters.get("timeout")
        if isinstance(timeout_us, int) and not isinstance(timeout_us, bool) and 0 < timeout_us:
            by_parameter = arrival + timeout_us / 1e6
            if by_parameter < deadline:
                return by_parameter, "the call's `timeout` parameter"
        return deadline, set_by

    def _authorized(self, context: grpc.aio.ServicerContext) -> bool:
        if self._key is None:
            return True
        given = [v for k, v in context.invocation_metadata() or () if k == "authorization"]
        if len(given) != 1:  # none, or two that could disagree: as HTTP (`ApiKeyMiddleware`), never the first
            return False
        value = given[0]
        return bearer_matches(value.encode() if isinstance(value, str) else value, self._key)

    @staticmethod
    def _request_id(context: grpc.aio.ServicerContext) -> str:
        given = next((v for k, v in context.invocation_metadata() or () if k == "x-request-id"), "")
        return given if isinstance(given, str) and _REQUEST_ID_OK.fullmatch(given) else uuid.uuid4().hex

    def _status(self, exc: Exception, rid: str, method: str) -> tuple[grpc.StatusCode, str]:
        if isinstance(exc, _Abort):
            return exc.code, exc.message
        if isinstance(exc, TensorError):
            return Code.INVALID_ARGUMENT, str(exc)
        if isinstance(exc, ApiError):
            return _code(exc.status, exc.kind), exc.message
        failure = failure_for(exc)
        if failure is not None:
            return _code(failure.status, failure.kind), failure_message(exc, self.shown)
        if isinstance(exc, MODEL_FAULTS):
            log.error("%s on %s (request id %s): %s", type(exc).__name__, method, rid, exc)
            return Code.INTERNAL, f"{exc} (request id {rid})"
        log.error("unhandled %s on gRPC %s (request id %s)", type(exc).__name__, method, rid, exc_info=exc)
        return Code.INTERNAL, f"internal server error (request id {rid})"

    async def _call(self, method: str, context: grpc.aio.ServicerContext,
                    handler: Callable[[dict[str, Any]], Awaitable[Any]]) -> Any:
        """Run one RPC with auth, request id, metrics, access log and status mapping."""
        metrics = self.state.metrics
        start = time.perf_counter()
        rid = self._request_id(context)
        usage: dict[str, Any] = {}
        code, message = Code.OK, ""
        metrics.in_flight.inc()
        counted = method not in _PUBLIC
        if counted:
            self._running += 1
            self._idle.clear()
        try:
            context.set_trailing_metadata((("x-request-id", rid),))
            if counted and self.state.drain.draining:
                raise _Abort(Code.UNAVAILABLE, CLOSED_MESSAGE)
            if method not in _PUBLIC and not self._authorized(context):
                raise _Abort(Code.UNAUTHENTICATED, "missing or invalid API key: send the metadata "
                             "'authorization: Bearer <key>'")
            with HEAP.request():  # as HTTP requests: the idle trim (runtimes/heap.py)
                return await self._within_grace(handler(usage))
        except asyncio.CancelledError:
            remaining = context.time_remaining()
            if remaining is not None and remaining <= DEADLINE_MARGIN_S:
                # the client's deadline ended the call (its client sees DEADLINE_EXCEEDED) before the engine's
                # deadline, the same instant, failed the work: a deadline, not a client that went away
                code = Code.DEADLINE_EXCEEDED
                log.debug("gRPC %s passed the client's gRPC deadline; its work was cancelled (request id %s)",
                          method, rid)
            else:
                code = Code.CANCELLED
                metrics.disconnects.inc()
                log.info("gRPC client cancelled %s or went away before its answer; its work was cancelled "
                         "(request id %s)", method, rid)
            raise
        except Exception as exc:
            code, message = self._status(exc, rid, method)
        finally:
            metrics.in_flight.dec()
            if counted:
                self._running -= 1
                if not self._running:
                    self._idle.set()
            self._record(method, code, rid, usage, (time.perf_counter() - start) * 1e3, context)
        try:
            await context.abort(code, safe_text(message))
        except grpc.aio.AbortError:
            raise  # the status is sent: how grpc ends a call that aborts
        except Exception as exc:  # grpc's ExecuteBatchError: the call ended before its status
            # No status can be sent: the client's deadline passed as the call ended, and grpc already answered it
            # DEADLINE_EXCEEDED. Ended as a cancelled call (grpc logs none), not with grpc's ERROR and traceback.
            log.debug("gRPC %s (request id %s) ended before its status %s could be sent: %s", method, rid,
                      code.name, exc)
            raise asyncio.CancelledError from None

    async def _within_grace(self, work: Awaitable[Any]) -> Any:
        """`work`'s result, unless the server's shutdown grace period ends first: then the work is cancelled
        (its queued scoring dropped) and the call answered UNAVAILABLE, retryable, as HTTP answers 503."""
        done = await self.state.drain.race(work)
        if done is None:
            raise _Abort(Code.UNAVAILABLE, self.state.drain.message())
        return done.result()

    def _record(self, method: str, code: grpc.StatusCode, rid: str, usage: dict[str, Any], total_ms: float,
                context: grpc.aio.ServicerContext) -> None:
        route = f"/{SERVICE}/{method}"
        status = code.name
        metrics = self.state.metrics
        metrics.requests.labels(route, status, "grpc").inc()
        metrics.request_latency.labels(route, status, "grpc").observe(total_ms / 1e3)
        fields = {"protocol": "grpc", "method": method, "route": route, "status": status,
                  "model": usage.get("model"), "passages": usage.get("passages"), "tokens": usage.get("tokens"),
                  "tokenize_ms": usage.get("tokenize_ms"), "queue_ms": usage.get("queue_ms"),
                  "inference_ms": usage.get("inference_ms"), "total_ms": total_ms, "request_id": rid}
        level = logging.DEBUG if method in _QUIET else logging.INFO
        access_log.log(level, "gRPC %s %s", method, status,
                       extra={"fields": fields, "in_message": ("method", "status")})
        tracer = getattr(self.state, "tracer", None)
        if tracer is not None and method not in _QUIET:  # a span as HTTP's, joined to a `traceparent` metadata
            trace_request(tracer, f"{SERVICE}/{method}",
                          {k: v for k, v in context.invocation_metadata() or () if isinstance(v, str)},
                          time.time_ns() - int(total_ms * 1e6), usage,
                          {"rpc.system": "grpc", "rpc.service": SERVICE, "rpc.method": method,
                           "rpc.grpc.status_code": code.value[0], "openrerank.request_id": rid},
                          status if code in _SERVER_FAULTS else None)

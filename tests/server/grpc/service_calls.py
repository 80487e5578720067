"""Run as a script (tests/server/grpc/test_service_calls.py), in a process of its own: the gRPC service's
protocol stubs cannot share a process with tritonclient's, which the other gRPC tests load. Calls the service
with a fake context and a fake set of models, and prints one JSON object: each case's status, message, and
what the service did on the way (values read, counters)."""

from __future__ import annotations

import asyncio
import json
from types import SimpleNamespace
from typing import Any

import grpc

from openrerank.core.images import ImageInputError, ImageTooLargeError
from openrerank.engine.errors import DeadlineExceededError, QueueFullError
from openrerank.engine.served_models import ServedModels
from openrerank.observe.metrics import Metrics
from openrerank.server.config import ServerConfig
from openrerank.server.drain import Drain
from openrerank.server.grpc import service as service_module
from openrerank.server.grpc.protocol import open_inference_pb2 as pb
from openrerank.server.grpc.service import SERVICE, InferenceService

MODEL = "tiny"
#: What the service's readers were handed: a request refused by its names must read no value.
reads = {"inputs": 0, "parameters": 0}
_read_bytes_inputs, _parameter_value = service_module.read_bytes_inputs, service_module.parameter_value


def _counting_read_bytes_inputs(request: Any) -> Any:
    reads["inputs"] += 1
    return _read_bytes_inputs(request)


def _counting_parameter_value(param: Any) -> Any:
    reads["parameters"] += 1
    return _parameter_value(param)


service_module.read_bytes_inputs = _counting_read_bytes_inputs
service_module.parameter_value = _counting_parameter_value


class Context:
    """A servicer context: no metadata; `time_remaining` as grpc's (None: no deadline; 0 once it passed)."""

    def __init__(self, remaining: float | None = None) -> None:
        self.remaining = remaining
        self.status: tuple[str, str] | None = None

    def invocation_metadata(self) -> tuple:
        return ()

    def set_trailing_metadata(self, _metadata: tuple) -> None:
        pass

    def time_remaining(self) -> float | None:
        return self.remaining

    async def abort(self, code: grpc.StatusCode, details: str) -> None:
        self.status = (code.name, details)
        raise grpc.aio.AbortError()


def service() -> InferenceService:
    model = SimpleNamespace(name=MODEL)
    models = SimpleNamespace(names=[MODEL], ids=[MODEL], aliases={}, ready=True, live=True, models=lambda: [model])
    return InferenceService(SimpleNamespace(config=ServerConfig(), metrics=Metrics(), drain=Drain(30.0),
                                            models=models))


def ranking_request() -> Any:
    request = pb.ModelInferRequest(model_name=MODEL)
    request.inputs.add(name="query", datatype="BYTES", shape=[1, 1]).contents.bytes_contents.append(b"q")
    request.inputs.add(name="passage", datatype="BYTES", shape=[1, 1]).contents.bytes_contents.append(b"p")
    return request


async def infer(request: Any) -> dict:
    """ModelInfer's status and message, and how many times values were read."""
    reads.update(inputs=0, parameters=0)
    context = Context()
    try:
        await service().ModelInfer(request, context)
    except grpc.aio.AbortError:
        pass
    status, message = context.status or ("OK", "")
    return {"status": status, "message": message, **reads}


async def many_unknown_inputs() -> dict:
    request = ranking_request()
    for i in range(10_000):
        request.inputs.add(name=f"x{i}", datatype="BYTES", shape=[1]).contents.bytes_contents.append(b"a")
    return await infer(request)


async def many_unknown_parameters() -> dict:
    request = ranking_request()
    request.parameters["truncate"].string_param = "END"
    for i in range(10_000):
        request.parameters[f"p{i}"].int64_param = 1
    return await infer(request)


async def model_ready_while_draining() -> dict:
    served = service()
    ready = {}
    for when in ("before", "draining"):
        if when == "draining":
            served.state.drain.begin()
        server = await served.ServerReady(pb.ServerReadyRequest(), Context())
        model = await served.ModelReady(pb.ModelReadyRequest(name=MODEL), Context())
        ready[when] = {"server": server.ready, "model": model.ready}
    return ready


async def cancelled(remaining: float | None) -> dict:
    """A ModelInfer cancelled by grpc while its work runs, `remaining` of its client's deadline left (None: it
    has none): the client's deadline cancels a call while the server's copy of it has a few ms left."""
    served = service()
    metrics = served.state.metrics

    async def work(_usage: dict) -> None:
        await asyncio.Event().wait()  # scoring that outlasts the call

    call = asyncio.ensure_future(served._call("ModelInfer", Context(remaining), work))
    await asyncio.sleep(0)
    call.cancel()  # what grpc does to the handler when the call ends: deadline or disconnect
    try:
        await call
    except asyncio.CancelledError:
        pass
    route = f"/{SERVICE}/ModelInfer"
    return {status: metrics.registry.get_sample_value("openrerank_requests_total",
                                                      {"route": route, "status": status, "protocol": "grpc"})
            for status in ("DEADLINE_EXCEEDED", "CANCELLED")} | {
        "disconnects": metrics.registry.get_sample_value("openrerank_client_disconnects_total")}


def failures() -> dict:
    """How the service answers failures below the server (`_status`): image errors by their class, and a setting
    named as the operator gave it (`shown`: here the request timeout came from a NIM variable)."""
    served = service()
    served.state.shown = {"request-timeout": "NIM_REQUEST_TIMEOUT_S='0.02'"}
    cases = {"image_too_large": ImageTooLargeError("the image holds 9 bytes", passage_index=0),
             "image_invalid": ImageInputError("the image is truncated", passage_index=0),
             "timeout": DeadlineExceededError(0.02),
             "queue_full": QueueFullError("3 requests", "3", 1.0, "max-queue")}
    answers = {name: served._status(exc, "rid", "ModelInfer") for name, exc in cases.items()}
    return {name: [code.name, message] for name, (code, message) in answers.items()}


async def alias_of_a_failed_model() -> dict:
    """`--allow-partial --model broken=... --model ce=... --alias old=broken`, `broken` failed to load: each RPC's
    status and message for the failed model's id and its alias (ModelMetadata('old') answered OK, describing
    `broken`; ModelInfer('old')'s NOT_FOUND named 'broken', not the name the client sent)."""
    reg = ServedModels()
    reg.expected = ["broken", "ce"]
    reg.add(SimpleNamespace(name="ce", scheduler=SimpleNamespace(failure=None), max_length=512,  # type: ignore[arg-type]
                            takes_images=False))
    reg.failed["broken"] = "SafetensorError: header too large"
    reg.aliases = {"old": "broken", "new": "ce"}
    reg.loaded = True
    served = service()
    served.state.models = reg
    answers: dict = {}
    for name in ("broken", "old", "new"):
        for method, request in (("ModelMetadata", pb.ModelMetadataRequest(name=name)),
                                ("ModelInfer", ranking_request()), ("ModelReady", pb.ModelReadyRequest(name=name))):
            if method == "ModelInfer":
                request.model_name = name
            context = Context()
            try:
                reply = await getattr(served, method)(request, context)
            except grpc.aio.AbortError:
                reply = None
            status, message = context.status or ("OK", "")
            if method == "ModelReady":
                message = str(reply.ready)
            elif method == "ModelMetadata" and reply is not None:
                message = reply.properties["model_id"]
            answers[f"{method}({name})"] = [status, message]
    return answers


async def main() -> dict:
    return {"failures": failures(),
            "unknown_inputs": await many_unknown_inputs(), "unknown_parameters": await many_unknown_parameters(),
            "ready": await model_ready_while_draining(),
            "deadline": [await cancelled(r) for r in (0.0, 0.005)],
            "disconnect": [await cancelled(r) for r in (None, 5.0)],
            "alias_of_failed": await alias_of_a_failed_model()}


if __name__ == "__main__":
    print(json.dumps(asyncio.run(main())))

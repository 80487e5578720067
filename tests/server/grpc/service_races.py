"""Run as a script (tests/server/grpc/test_service_races.py), in a process of its own: the gRPC service's
protocol stubs cannot share a process with tritonclient's, which the other gRPC tests load. Prints one JSON
object: what each race left in the log, and how the call ended."""

from __future__ import annotations

import asyncio
import gc
import json
import logging
from types import SimpleNamespace

import grpc

from openrerank.observe.metrics import Metrics
from openrerank.server.config import ServerConfig
from openrerank.server.drain import Drain
from openrerank.server.grpc.service import InferenceService, _Abort

records: list[str] = []


class Capture(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        if record.levelno >= logging.WARNING:
            records.append(record.getMessage())


class Context:
    """The servicer context of a call grpc already ended (its client's deadline passed): the status cannot be
    sent, as grpc's ExecuteBatchError says."""

    def invocation_metadata(self) -> tuple:
        return ()

    def set_trailing_metadata(self, _metadata: tuple) -> None:
        pass

    async def abort(self, code: grpc.StatusCode, details: str) -> None:
        raise RuntimeError(f'Failed "execute_batch" for {code.name}')


def service() -> InferenceService:
    return InferenceService(SimpleNamespace(config=ServerConfig(), metrics=Metrics(), drain=Drain(30.0)))


async def cancelled_as_the_work_fails() -> str:
    """The call is cancelled (its client's deadline) in the loop turn its work fails (the server's deadline)."""
    async def work() -> None:
        raise _Abort(grpc.StatusCode.DEADLINE_EXCEEDED, "request timed out")

    call = asyncio.ensure_future(service()._within_grace(work()))
    await asyncio.sleep(0)  # the call waits on its work, which runs (and fails) in the next turn
    call.cancel()  # delivered in that same turn, after the work's step
    try:
        await call
    except asyncio.CancelledError:
        return "cancelled"
    except _Abort:
        return "work failed first"
    return "answered"


async def status_after_the_call_ended() -> str:
    async def work(_usage: dict) -> None:
        raise _Abort(grpc.StatusCode.DEADLINE_EXCEEDED, "request timed out")

    try:
        await service()._call("ModelInfer", Context(), work)
    except asyncio.CancelledError:
        return "cancelled"
    except Exception as exc:
        return f"raised {type(exc).__name__}"
    return "returned"


async def main() -> dict:
    loop = asyncio.get_running_loop()
    loop.set_exception_handler(lambda _loop, ctx: records.append(ctx["message"]))
    out = {"race": await cancelled_as_the_work_fails()}
    gc.collect()
    await asyncio.sleep(0)
    out["race_log"] = list(records)
    records.clear()
    out["ended"] = await status_after_the_call_ended()
    out["ended_log"] = list(records)
    return out


if __name__ == "__main__":
    logging.getLogger().addHandler(Capture())
    print(json.dumps(asyncio.run(main())))

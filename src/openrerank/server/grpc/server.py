"""The gRPC server beside HTTP: grpc.aio in the HTTP server's event loop, started and stopped with the app.

It registers as one of the app's companions (`app.state.companions`, server/app.py): it binds and starts
before the models load (so a client can probe it during a long load, as it can HTTP). It drains with HTTP:
when the app's drain begins (SIGTERM, `server/drain.py`) `grpc.health.v1` turns NOT_SERVING and every new
call is refused UNAVAILABLE (retryable) by the service, and the calls in flight have the same
--graceful-timeout as HTTP's requests (past it, UNAVAILABLE with the drain's message:
`service.InferenceService`). The server itself stops listening only when those calls are done (or the grace
period is over): grpc's stop cancels every call it has received but not yet handed to a handler, and a
client sees CANCELLED, which it does not retry (SIGTERM during six 512-passage calls on a loaded 2-core
machine: 6 calls CANCELLED in 8 runs, calls that arrived while the event loop was busy with the others; now
none, those not yet started being refused UNAVAILABLE instead). Without a drain (the app
stopped otherwise) it stops when the app stops, before the models. `grpc.health.v1` reports
NOT_SERVING as the drain begins, and otherwise follows readiness (every model loaded and every worker alive)
within `HEALTH_POLL_S`: nothing announces readiness (a worker dies in its own thread), so it is polled.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from openrerank.core.settings import setting_name
from openrerank.server.drain import UVICORN_MARGIN_S
from openrerank.server.grpc.protocol import open_inference_pb2_grpc as pb_grpc
from openrerank.server.grpc.service import SERVICE, InferenceService

log = logging.getLogger("openrerank")

#: How often the health service looks at readiness (it changes when loading ends or a worker dies): the most
#: `grpc.health.v1` lags it by (docs/api.md says so).
HEALTH_POLL_S = 0.5


class GrpcServer:
    def __init__(self, app: Any, host: str, port: int) -> None:
        self.app = app
        self.host = host
        self.requested_port = port
        self.port: int | None = None  # the bound port, once started
        self._server: grpc.aio.Server | None = None
        self._health = health.aio.HealthServicer()
        self._watch: asyncio.Task | None = None
        self._drain_watch: asyncio.Task | None = None
        self._service: InferenceService | None = None

    @property
    def address(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port if self.port is not None else self.requested_port}"

    async def start(self) -> None:
        config = self.app.state.config
        server = grpc.aio.server(options=[
            ("grpc.max_receive_message_length", config.grpc_message_bytes),
            ("grpc.max_send_message_length", -1),
            ("grpc.so_reuseport", 0),  # a busy port must fail, not be shared with another server
        ])
        self._service = InferenceService(self.app.state)
        pb_grpc.add_GRPCInferenceServiceServicer_to_server(self._service, server)
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        try:
            if config.tls:
                key, cert = Path(config.ssl_keyfile).read_bytes(), Path(config.ssl_certfile).read_bytes()
                ca = Path(config.ssl_ca_certs).read_bytes() if config.ssl_ca_certs else None
                credentials = grpc.ssl_server_credentials([(key, cert)], root_certificates=ca,
                                                          require_client_auth=ca is not None)
                self.port = server.add_secure_port(self.address, credentials)
            else:
                self.port = server.add_insecure_port(self.address)
        except RuntimeError as exc:
            shown = self.app.state.shown
            where = f"{setting_name('grpc-host', shown)}/{setting_name('grpc-port', shown)}"
            raise RuntimeError(f"cannot serve gRPC on {self.address}: {exc} ({where})") from None
        await server.start()
        self._server = server
        self._watch = asyncio.create_task(self._watch_readiness())
        self._drain_watch = asyncio.create_task(self._stop_on_drain())
        scheme = ("mutual TLS" if config.ssl_ca_certs else "TLS") if config.tls else "plaintext"
        log.info("gRPC (KServe V2, NIM's gRPC API) listening on %s (%s)", self.address, scheme)

    async def stop(self) -> None:
        """Stop serving: the drain's stop if one began (awaited), else now."""
        if self._drain_watch is not None:
            if not self.app.state.drain.draining:
                self._drain_watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._drain_watch
        await self._stop_serving()

    async def _stop_on_drain(self) -> None:
        await self.app.state.drain.wait_begun()
        await self._stop_serving()

    async def _stop_serving(self) -> None:
        """Report NOT_SERVING; while draining, wait for the calls in flight (each answers by the end of the
        grace period itself; new ones are refused by the service meanwhile) before grpc stops listening (module
        docstring); grpc cancels whatever still runs a margin later."""
        server, self._server = self._server, None
        if server is None:
            return
        if self._watch is not None:
            self._watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watch
        await self._health.enter_graceful_shutdown()
        drain = self.app.state.drain
        if drain.draining and self._service is not None:
            await drain.race(self._service.wait_idle())
        await server.stop(grace=UVICORN_MARGIN_S if drain.draining else drain.grace + UVICORN_MARGIN_S)

    async def _watch_readiness(self) -> None:
        status = None
        serving, not_serving = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
        while True:
            now = serving if self.app.state.models.ready else not_serving
            if now != status:
                status = now
                for service in ("", SERVICE):
                    await self._health.set(service, status)
            await asyncio.sleep(HEALTH_POLL_S)

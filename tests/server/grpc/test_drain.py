"""SIGTERM with gRPC calls in flight: gRPC drains with HTTP, on one grace period.

Before, the gRPC server stopped only after uvicorn's HTTP drain had ended: for the whole HTTP grace period it
reported SERVING, `ServerReady` said true and new calls were accepted and scored; its own grace period came on
top (a --graceful-timeout of 4 s ended the process 17 s after SIGTERM), and its calls then ended in grpc's
"Cancelling all calls", counted as client disconnects. The assertions are on what the clients see; the only
timings are bounds: NOT_SERVING within half the grace period, the calls' answers within two, the exit within
EXIT_S after them.
"""

from __future__ import annotations

import concurrent.futures
import math
import signal
import time

import grpc
import tritonclient.grpc as grpcclient
from grpc_health.v1 import health_pb2, health_pb2_grpc
from openrerank_bench.serve_process import free_port
from tritonclient.utils import InferenceServerException

from tests.server.faults import until
from tests.server.grpc.support import failure, ranking_inputs, status_of
from tests.server.test_shutdown import in_flight, passages, seconds_per_passage
from tests.support import nim_body, run_server

MODEL = "sentence_transformers_all_minilm_l6_v2"
#: wide enough that the probes below run inside it on a slow, shared machine: with 2 s, CI once saw the end of
#: SERVING late in the period and the probes after it found the port closed (connection refused)
GRACE_S = 5
#: seconds the process may take to end once its calls are answered (a bound, not a timing: before the fix it
#: never ended within the grace period)
EXIT_S = 30
#: how much scoring the in-flight calls hold, in grace periods, on whatever machine runs this
WORK_GRACES = 5


def health_status(address: str) -> int:
    with grpc.insecure_channel(address) as channel:
        return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5).status


def serving(address: str) -> bool:
    """grpc.health.v1 says SERVING (a refused call or NOT_SERVING: no)."""
    try:
        return health_status(address) == health_pb2.HealthCheckResponse.SERVING
    except grpc.RpcError:
        return False


def test_sigterm_drains_grpc_with_http_on_one_grace_period(tmp_path):
    port = free_port()
    address = f"127.0.0.1:{port}"
    args = ["--backend", "torch", "--threads", "1", "--max-batch-size", "1", "--graceful-timeout", str(GRACE_S),
            "--grpc-port", str(port)]
    with run_server(args, tmp_path) as server, server.client() as c:
        per_passage = seconds_per_passage(c)
        n = min(512, math.ceil(WORK_GRACES * GRACE_S / (3 * per_passage)))
        assert health_status(address) == health_pb2.HealthCheckResponse.SERVING
        with concurrent.futures.ThreadPoolExecutor(3) as pool, \
                grpcclient.InferenceServerClient(address) as busy, \
                grpcclient.InferenceServerClient(address) as late:
            assert late.is_server_ready()  # its channel is connected before the drain
            def answered(query: str) -> tuple[InferenceServerException, float]:
                """The call's failure, and when it came."""
                return failure(busy.infer, MODEL, ranking_inputs(query, passages(query, n))), time.monotonic()

            calls = [pool.submit(answered, q) for q in ("a", "b")]
            http = pool.submit(server.client().post, "/v1/ranking", json=nim_body("c", passages("c", n),
                                                                                   truncate="END"))
            until(lambda: in_flight(c) >= 2 + 1 + 1, "the calls all in flight (and this metrics request)")
            server.proc.send_signal(signal.SIGTERM)
            signalled = time.monotonic()

            # within the grace period nothing reports SERVING, and then new calls are refused, even on a
            # channel connected before (seen in the first half, leaving the other half for the probes)
            until(lambda: not serving(address) and time.monotonic() - signalled < GRACE_S / 2,
                  "the drain to end SERVING within the first half of the grace period")
            try:
                # and no probe says ready: ModelReady said true while ServerReady said false and calls were refused
                assert not late.is_server_ready() and not late.is_model_ready(MODEL)
                refused = failure(late.infer, MODEL, ranking_inputs("q", ["p"]))
                assert status_of(refused) == "UNAVAILABLE" and "takes no new requests" in refused.message(), refused
                # by the service, the server still listening: grpc's own stop would cancel (CANCELLED, which clients
                # do not retry) the calls it had received but not yet handed over, so it waits for the calls in flight
                with grpcclient.InferenceServerClient(address) as newcomer:
                    refused = failure(newcomer.infer, MODEL, ranking_inputs("q", ["p"]))
                assert status_of(refused) == "UNAVAILABLE" and "takes no new requests" in refused.message(), refused
            except InferenceServerException as exc:  # the port closed early: say when, and what the server did
                raise AssertionError(f"{exc}, {time.monotonic() - signalled:.2f} s after SIGTERM; the calls in flight "
                                     f"done: {[call.done() for call in calls]}; the server's log:\n"
                                     f"{server.output()[-3000:]}") from exc

            # the calls in flight get the drain's retryable answer at the end of the same grace period: before
            # the second one (before, they were answered after HTTP's grace period and then gRPC's own)
            for call in calls:
                exc, at = call.result(timeout=120)
                assert status_of(exc) == "UNAVAILABLE" and "grace period" in exc.message(), exc
                assert at - signalled < 2 * GRACE_S, f"answered {at - signalled:.1f} s after SIGTERM, grace {GRACE_S} s"
            assert http.result(timeout=120).status_code == 503
        # the process then ends: bounded loosely, as the time to exit stretched under load (10 s past a 2 s grace)
        assert server.proc.wait(timeout=EXIT_S) == 0, server.output()[-3000:]
    log = server.output()
    assert "went away" not in log  # the drained calls are not counted as clients that left

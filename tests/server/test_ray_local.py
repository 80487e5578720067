"""`openrerank serve --replicas N` stopping (server/ray_local.py): Ctrl-C drains the requests in flight.

Before, the launcher called serve.shutdown() at once, which took Serve's proxy down under the requests still
being scored: the client lost its answer ("Server disconnected without sending a response") although the
replica computed it. The work each request holds is sized on this machine (tests/server/test_shutdown.py).
"""

from __future__ import annotations

import concurrent.futures
import math
import signal
import time

import httpx
import pytest

pytest.importorskip("ray.serve")

from tests.server.test_shutdown import passages, seconds_per_passage
from tests.support import ServerProcess, nim_body

#: seconds of scoring each in-flight request holds, on whatever machine runs this: many times the wait before
#: the signal, so both are still being scored when it comes (checked below: they answer after it)
WORK_S = 6
WAIT_S = 1.0


def test_ctrl_c_drains_the_requests_in_flight(tmp_path):
    server = ServerProcess(["--replicas", "2", "--threads", "1", "--graceful-timeout", "60"], tmp_path,
                           env={"RAY_DEDUP_LOGS": "0"})

    def post(tag: str, n: int) -> tuple[httpx.Response, float]:
        with server.client() as c:
            return c.post("/v1/ranking", json=nim_body(tag, passages(tag, n), truncate="END")), time.monotonic()

    try:
        server.wait_ready(240)
        with server.client() as c:
            n = min(512, math.ceil(WORK_S / seconds_per_passage(c)))
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            futures = [pool.submit(post, tag, n) for tag in ("a", "b")]
            # Serve's metrics through the proxy come from one replica, perhaps an idle one: no in-flight count
            # says both requests arrived, so the signal comes after a fraction of their work
            time.sleep(WAIT_S)
            server.proc.send_signal(signal.SIGINT)
            signalled = time.monotonic()
            answers = [f.result(timeout=180) for f in futures]
        for r, done in answers:
            assert r.status_code == 200 and len(r.json()["rankings"]) == n, r.text[:300]
            assert done > signalled, "a request finished before the signal: raise WORK_S"
        assert server.proc.wait(timeout=120) == 0
    finally:
        server.stop()

"""`Drain.race` (server/drain.py): work raced against the end of the shutdown grace period, the one way the
server's parts (the body guard, the gRPC service and server) wait for something or the drain's end; and the
drain's log line."""

from __future__ import annotations

import asyncio
import gc

import pytest

from openrerank.server.drain import Drain
from tests.support import run_server


def run(main) -> list[str]:
    """Run `main()` with the loop's unhandled-exception reports collected: what asyncio would have logged."""
    reports: list[str] = []

    async def wrapped():
        asyncio.get_running_loop().set_exception_handler(lambda _loop, ctx: reports.append(ctx["message"]))
        try:
            return await main()
        finally:
            gc.collect()
            await asyncio.sleep(0)

    asyncio.run(wrapped())
    return reports


def test_the_work_that_ends_first_is_handed_back_finished():
    async def main():
        done = await Drain(30.0).race(asyncio.sleep(0, result="answer"))
        assert done is not None and done.result() == "answer"

    assert run(main) == []


def test_the_grace_periods_end_cancels_the_work():
    cancelled = []

    async def work():
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            cancelled.append(True)
            raise

    async def main():
        drain = Drain(30.0)
        drain.begin()
        racing = asyncio.ensure_future(drain.race(work()))
        await asyncio.sleep(0.01)
        drain.end_now()
        assert await racing is None
        assert cancelled == [True]  # stopped before race returned

    assert run(main) == []


def test_a_timeout_cancels_the_work():
    async def main():
        assert await Drain(30.0).race(asyncio.sleep(30), timeout=0.01) is None

    assert run(main) == []


def test_a_caller_cancelled_in_the_turn_its_work_failed_leaves_nothing_unretrieved():
    """The gRPC call's case: its client's deadline cancelled it in the loop turn its work failed on the server's
    own deadline; the work's exception was never read and asyncio logged it with a traceback."""
    async def work():
        raise TimeoutError("the server's deadline")

    async def main():
        racing = asyncio.ensure_future(Drain(30.0).race(work()))
        await asyncio.sleep(0)  # racing waits on the work, which runs and fails in the next turn
        racing.cancel()  # delivered in that same turn, after the work's step
        with pytest.raises(asyncio.CancelledError):
            await racing

    assert run(main) == []


def test_the_drain_names_the_variable_that_set_the_grace_period(tmp_path, tiny_model_dir):
    """OPENRERANK_GRACEFUL_TIMEOUT=1 was logged as `--graceful-timeout` when the server began its drain."""
    with run_server(["--model", f"tiny={tiny_model_dir}"], tmp_path, env={"OPENRERANK_GRACEFUL_TIMEOUT": "1"}) as s:
        pass  # stopped with SIGINT: the drain begins
    assert "finishing accepted requests for up to 1 s (OPENRERANK_GRACEFUL_TIMEOUT='1')" in s.output()

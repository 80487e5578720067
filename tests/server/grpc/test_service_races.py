"""Races in the gRPC service when a call ends as its work ends (a client deadline of a few milliseconds under
load): each left an ERROR and a traceback in the log of a call the access log already recorded. Run in a process
of its own (service_races.py): the service's stubs cannot be loaded beside tritonclient's."""

from __future__ import annotations

import pytest

from tests.server.grpc.support import run_isolated


@pytest.fixture(scope="module")
def outcome() -> dict:
    return run_isolated("service_races.py")


def test_a_call_cancelled_in_the_turn_its_work_fails_leaves_no_unretrieved_exception(outcome):
    """Cancelled (the client's deadline) in the loop turn its work failed (the server's), the work's exception
    was never read: asyncio logged "Task exception was never retrieved" with a traceback."""
    assert outcome["race"] == "cancelled"
    assert outcome["race_log"] == []


def test_a_status_that_cannot_be_sent_ends_the_call_as_cancelled(outcome):
    """grpc had ended the call (its client's deadline passed) before the service's abort: the abort raised
    grpc's ExecuteBatchError out of the handler, which grpc logged as an ERROR with a traceback."""
    assert outcome["ended"] == "cancelled"
    assert outcome["ended_log"] == []

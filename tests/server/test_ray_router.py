"""LeastBusyRouter's choices, driven directly with stand-in replicas (no cluster): the cases Serve's default
gets wrong, each checked against what the replicas report. tests/test_ray_serve.py covers it on a cluster."""

from __future__ import annotations

import asyncio

import pytest

pytest.importorskip("ray.serve")

from ray.serve._private.common import DeploymentHandleSource, DeploymentID
from ray.serve.request_router import ReplicaID

from openrerank.server.ray_router import PROBE_AT_MOST, LeastBusyRouter

DEPLOYMENT = DeploymentID(name="RerankReplica", app_name="openrerank")


class StandInReplica:
    """What the router reads of a replica: its id, its limit, and its answer to a queue-length probe."""

    def __init__(self, name: str, ongoing: int = 0, max_ongoing: int = 34) -> None:
        self.replica_id = ReplicaID(unique_id=name, deployment_id=DEPLOYMENT)
        self.max_ongoing_requests = max_ongoing
        self.ongoing = ongoing
        self.probes = 0

    async def get_queue_len(self, *, deadline_s: float) -> int:
        self.probes += 1
        await asyncio.sleep(0.001)  # an RPC: other routing tasks run meanwhile
        return self.ongoing


def new_router() -> LeastBusyRouter:
    router = LeastBusyRouter(deployment_id=DEPLOYMENT, handle_source=DeploymentHandleSource.UNKNOWN,
                             use_replica_queue_len_cache=True)
    router.initialize_state()
    return router


def first(ranks) -> StandInReplica:
    return ranks[0][0]


def test_a_finished_request_still_counted_in_the_cache_does_not_hide_the_idle_replica():
    """Both cached counts say busy (a's completion has not reached the cache yet); a has finished: ask, pick a."""
    router = new_router()
    a, b = StandInReplica("a", ongoing=0), StandInReplica("b", ongoing=1)
    for r in (a, b):
        router.replica_queue_len_cache.update(r.replica_id, 1)

    async def go():
        return [first(await router.choose_replicas([b, a])) for _ in range(1)]

    assert asyncio.run(go()) == [a]
    assert a.probes == b.probes == 1


def test_an_idle_replica_in_the_cache_is_taken_without_asking():
    router = new_router()
    a, b = StandInReplica("a", ongoing=0), StandInReplica("b", ongoing=3)
    router.replica_queue_len_cache.update(a.replica_id, 0)
    router.replica_queue_len_cache.update(b.replica_id, 3)
    ranks = asyncio.run(router.choose_replicas([b, a]))
    assert [r[0] for r in ranks] == [a, b]  # every replica is ranked, so a refusal falls through to the next
    assert a.probes == b.probes == 0


def test_requests_arriving_together_spread_over_the_replicas():
    """Routed concurrently, before any is sent: each choice counts the ones made before it."""
    router = new_router()
    replicas = [StandInReplica(name) for name in "abc"]

    async def go():
        return await asyncio.gather(*(router.choose_replicas(replicas) for _ in range(6)))

    chosen = [first(ranks).replica_id.unique_id for ranks in asyncio.run(go())]
    assert sorted(chosen) == ["a", "a", "b", "b", "c", "c"], chosen


def test_sending_turns_the_choice_into_the_cached_count():
    router = new_router()
    a, b = StandInReplica("a"), StandInReplica("b")

    async def go():
        picks = []
        for _ in range(4):
            replica = first(await router.choose_replicas([a, b]))
            router.on_send_request(replica.replica_id)  # Serve's cache counts it now
            picks.append(replica)
        return picks

    picks = asyncio.run(go())
    assert sorted(r.replica_id.unique_id for r in picks) == ["a", "a", "b", "b"]
    assert all(len(q) == 0 for q in router._reserved.values())  # no choice counted twice


def test_idle_replicas_take_turns():
    """A sequential client: both idle every time, so the least recently chosen goes first."""
    router = new_router()
    a, b = StandInReplica("a"), StandInReplica("b")

    async def go():
        picks = []
        for _ in range(6):
            replica = first(await router.choose_replicas([a, b]))
            router.on_send_request(replica.replica_id)
            router.decrement_queue_len_cache(replica.replica_id)  # finished before the next one
            picks.append(replica.replica_id.unique_id)
        return picks

    picks = asyncio.run(go())
    assert picks[0::2] == [picks[0]] * 3 and picks[1::2] == [picks[1]] * 3 and picks[0] != picks[1], picks


def test_a_replica_that_does_not_answer_is_ranked_last():
    class Silent(StandInReplica):
        async def get_queue_len(self, *, deadline_s: float) -> int:
            await asyncio.sleep(deadline_s * 4)
            return 0

    router = new_router()
    router.queue_len_response_deadline_s = 0.05
    silent, busy = Silent("silent"), StandInReplica("busy", ongoing=2)
    ranks = asyncio.run(router.choose_replicas([silent, busy]))
    assert [r[0] for r in ranks] == [busy, silent]


def test_large_deployments_ask_a_sample():
    router = new_router()
    replicas = [StandInReplica(f"r{i}", ongoing=1) for i in range(3 * PROBE_AT_MOST)]
    for r in replicas:
        router.replica_queue_len_cache.update(r.replica_id, 1)
    ranks = asyncio.run(router.choose_replicas(replicas))
    assert len(ranks) == PROBE_AT_MOST
    assert sum(r.probes for r in replicas) == PROBE_AT_MOST


def test_a_replica_that_leaves_is_forgotten():
    """Autoscaling and replacement change the replicas: nothing is kept for ones that are gone."""
    router = new_router()
    a, b = StandInReplica("a"), StandInReplica("b")

    async def go():
        router.update_replicas([a, b])
        await router.choose_replicas([a, b])  # a reservation and a "last chosen" for one of them
        chosen = first(await router.choose_replicas([a, b]))
        router.update_replicas([r for r in (a, b) if r is not chosen])
        return chosen

    gone = asyncio.run(go())
    assert gone.replica_id not in router._reserved and gone.replica_id not in router._last_chosen
    assert len(router._last_chosen) == 1

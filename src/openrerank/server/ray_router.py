"""Serve request router for scoring replicas: each request goes to the replica with the fewest in flight.

Why not Serve's default (power of two choices on a cached queue length): a closed-loop client's next request
is routed before the completion of its last one reaches the cache, so the replica that just finished still
looks busy and a coin flip often pairs the request with another client's on one replica while the other
idles (measured: one replica at 97% CPU, the other at 53%; docs/scale-out.md). A scoring request keeps a
replica's CPUs busy for tens of milliseconds to seconds, so one queue-length RPC per replica when every
cached count says busy costs little and sees the finished request at once. Choices are made one at a time
and remembered until the request is sent, so requests arriving together spread over the replicas.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import defaultdict, deque

from ray.serve.request_router import FIFOMixin, PendingRequest, ReplicaID, RequestRouter, RunningReplica

PROBE_AT_MOST = 8  # replicas asked per choice; larger deployments sample this many
RESERVATION_TTL_S = 5.0  # a choice whose request was never sent (rejected, rerouted) stops counting


class LeastBusyRouter(FIFOMixin, RequestRouter):
    """Fewest in flight first: cached counts plus unsent choices, asked fresh when every replica looks busy."""

    def initialize_state(self, **kwargs) -> None:
        self._lock: asyncio.Lock | None = None
        self._reserved: dict[ReplicaID, deque[float]] = defaultdict(deque)
        self._last_chosen: dict[ReplicaID, float] = {}

    def _expire_reservations(self, now: float) -> None:
        for waiting in self._reserved.values():
            while waiting and now - waiting[0] > RESERVATION_TTL_S:
                waiting.popleft()

    async def _ask(self, replicas: list[RunningReplica]) -> dict[ReplicaID, int]:
        """Fresh in-flight counts from the replicas that answer within Serve's queue-length deadline."""
        deadline = max(self.queue_len_response_deadline_s, 0.05)
        tasks = {r.replica_id: asyncio.ensure_future(r.get_queue_len(deadline_s=deadline)) for r in replicas}
        await asyncio.wait(tasks.values(), timeout=deadline)
        counts: dict[ReplicaID, int] = {}
        for replica_id, task in tasks.items():
            if not task.done():
                task.cancel()
            elif task.exception() is None:
                counts[replica_id] = task.result()
                self.replica_queue_len_cache.update(replica_id, counts[replica_id])
        return counts

    async def choose_replicas(
        self, candidate_replicas: list[RunningReplica], pending_request: PendingRequest | None = None
    ) -> list[list[RunningReplica]]:
        if not candidate_replicas:
            return []
        candidates = list(candidate_replicas)
        if len(candidates) > PROBE_AT_MOST:
            candidates = random.sample(candidates, PROBE_AT_MOST)
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:
            now = time.monotonic()
            self._expire_reservations(now)
            cached = {r.replica_id: self.replica_queue_len_cache.get(r.replica_id) for r in candidates}
            if None in cached.values() or min(cached.values()) > 0:  # unknown, or nobody idle: ask
                cached.update(await self._ask(candidates))
            load = {
                r.replica_id: (cached[r.replica_id] if cached[r.replica_id] is not None else r.max_ongoing_requests)
                + len(self._reserved[r.replica_id])
                for r in candidates
            }
            order = sorted(candidates, key=lambda r: (load[r.replica_id], self._last_chosen.get(r.replica_id, 0.0)))
            best = order[0].replica_id
            self._reserved[best].append(now)
            self._last_chosen[best] = now
        return [[r] for r in order]

    def on_send_request(self, replica_id: ReplicaID) -> None:
        """The request is on its way: Serve's cache now counts it, so the reservation ends."""
        super().on_send_request(replica_id)
        if self._reserved[replica_id]:
            self._reserved[replica_id].popleft()

    def on_replica_actor_died(self, replica_id: ReplicaID) -> None:
        super().on_replica_actor_died(replica_id)
        self._forget({replica_id})

    def update_replicas(self, replicas: list[RunningReplica]) -> None:
        """Replicas come and go (autoscaling, replacement): keep state only for the current ones."""
        current = {r.replica_id for r in replicas}
        self._forget((set(self._reserved) | set(self._last_chosen)) - current)
        super().update_replicas(replicas)

    def _forget(self, replica_ids: set[ReplicaID]) -> None:
        for replica_id in replica_ids:
            self._reserved.pop(replica_id, None)
            self._last_chosen.pop(replica_id, None)

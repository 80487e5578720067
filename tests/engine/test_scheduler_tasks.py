"""Reranking and embedding share one scheduler: batched across requests per task, never mixed in a batch,
each request getting its own rows back (scores or vectors), metrics labelled by task."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence

import numpy as np
import pytest

from openrerank.core.work import BlockItem, EmbedItem, PairItem
from openrerank.engine.batching import BatchPolicy
from openrerank.engine.errors import BatchFailedError
from openrerank.engine.scheduler import Scheduler, SchedulerConfig
from openrerank.observe.metrics import Metrics
from tests.engine.sched_fakes import FakeScorer, Ids, expected, until


class FakeEmbedScorer(FakeScorer):
    """Also embeds: an item's vector is (id, 2 * id, its length), recorded and held like a score batch."""

    def embed(self, items: Sequence[EmbedItem]) -> np.ndarray:
        ids = self.score(items)  # records the batch and honours hold()/release()
        return np.stack([ids, 2 * ids, np.asarray([it.length for it in items], np.float32)], axis=1)


def embed_items(ids: Ids, *lengths: int) -> list[EmbedItem]:
    return [EmbedItem(p.input_ids) for p in ids.items(*lengths)]


def vectors(items: Sequence[EmbedItem]) -> np.ndarray:
    first = np.asarray([it.input_ids[0] for it in items], np.float32)
    return np.stack([first, 2 * first, np.asarray([it.length for it in items], np.float32)], axis=1)


def test_embed_and_rerank_requests_share_the_queue_but_not_a_batch() -> None:
    backend, ids, metrics = FakeEmbedScorer(), Ids(), Metrics()
    embeds = [embed_items(ids, 5, 5), embed_items(ids, 5), embed_items(ids, 5, 5, 5)]
    reranks = [ids.items(5, 5), ids.items(5)]
    blocker_items = ids.items(5)

    async def main():
        sched = Scheduler(backend, SchedulerConfig(BatchPolicy(max_size=16)), name="m", metrics=metrics)
        backend.hold()
        blocker = asyncio.create_task(sched.submit(blocker_items))
        await backend.wait_batch_started()
        tasks = [asyncio.create_task(sched.submit(r)) for r in (*embeds, *reranks)]
        await until(lambda: sched.queued == len(tasks), "all requests queued behind the running batch")
        backend.release()
        out = await asyncio.gather(blocker, *tasks)
        await sched.stop()
        return out

    blocked, *outcomes = asyncio.run(main())
    np.testing.assert_array_equal(blocked.scores, expected(blocker_items))
    for items, out in zip(embeds, outcomes[: len(embeds)], strict=True):
        assert out.scores.shape == (len(items), 3) and out.scores.dtype == np.float32
        np.testing.assert_array_equal(out.scores, vectors(items))
    for items, out in zip(reranks, outcomes[len(embeds):], strict=True):
        np.testing.assert_array_equal(out.scores, expected(items))
    # After the blocker: one batch of all six embedded texts from three requests, one of the three pairs.
    kinds = [{it.task for it in batch} for batch in backend.items_seen[1:]]
    assert kinds == [{"rerank"}, {"embed"}] or kinds == [{"embed"}, {"rerank"}]
    sizes = {next(iter(k)): len(b) for k, b in zip(kinds, backend.items_seen[1:], strict=True)}
    assert sizes == {"embed": 6, "rerank": 3}
    value = metrics.registry.get_sample_value
    assert value("openrerank_batch_size_count", {"model": "m", "task": "embed"}) == 1
    assert value("openrerank_batch_size_sum", {"model": "m", "task": "embed"}) == 6
    assert value("openrerank_batch_size_count", {"model": "m", "task": "rerank"}) == 2
    assert value("openrerank_queue_seconds_count", {"model": "m", "task": "embed"}) == 3


def test_a_backend_without_embeddings_fails_only_the_embed_request() -> None:
    backend, ids = FakeScorer(), Ids()  # scores only, like a cross-encoder's

    async def main():
        sched = Scheduler(backend, SchedulerConfig(), name="m")
        pairs = ids.items(3)
        results = await asyncio.gather(sched.submit(embed_items(ids, 3)), sched.submit(pairs),
                                       return_exceptions=True)
        await sched.stop()
        return pairs, results

    pairs, (embedded, scored) = asyncio.run(main())
    assert isinstance(embedded, BatchFailedError) and "TaskNotSupportedError" in str(embedded)
    np.testing.assert_array_equal(scored.scores, expected(pairs))


def test_a_wrong_shape_from_the_backend_fails_the_request_clearly(caplog) -> None:
    class Flat(FakeEmbedScorer):
        def embed(self, items):
            return self.score(items)  # one number per text instead of a vector

    async def main():
        sched = Scheduler(Flat(), SchedulerConfig(), name="m")
        try:
            await sched.submit(embed_items(Ids(), 2, 3))
        finally:
            await sched.stop()

    with pytest.raises(BatchFailedError, match="RuntimeError"), \
            caplog.at_level(logging.ERROR, logger="openrerank.engine"):
        asyncio.run(main())
    assert "scorer returned shape (2,) for 2 embed items" in caplog.text



class FakeBlockScorer(FakeScorer):
    """Listwise blocks: a block's result is `(entries + 1, 2)` rows of (id, row), held and recorded like a batch."""

    def score(self, items):
        if not items or not isinstance(items[0], BlockItem):
            return super().score(items)
        ids = super().score([PairItem(it.input_ids) for it in items])
        return [np.stack([np.full(it.entries + 1, i), np.arange(it.entries + 1)], axis=1).astype(np.float32)
                for i, it in zip(ids, items, strict=True)]


def test_listwise_blocks_are_the_unit_of_work_and_come_back_whole() -> None:
    """Blocks of concurrent requests are batched together (never with pairs); each request gets its own blocks'
    results, of their own heights, in order."""
    backend, ids, metrics = FakeBlockScorer(), Ids(), Metrics()
    requests = [[BlockItem(p.input_ids, entries) for p, entries in zip(ids.items(40, 60), (3, 5), strict=True)],
                [BlockItem(ids.items(50)[0].input_ids, 1)]]
    pairs = ids.items(5, 5)

    async def main():
        sched = Scheduler(backend, SchedulerConfig(BatchPolicy(max_size=16)), name="m", metrics=metrics)
        backend.hold()
        blocker = asyncio.create_task(sched.submit(ids.items(5)))
        await backend.wait_batch_started()
        tasks = [asyncio.create_task(sched.submit(r)) for r in (*requests, pairs)]
        await until(lambda: sched.queued == len(tasks), "all requests queued behind the running batch")
        backend.release()
        out = await asyncio.gather(blocker, *tasks)
        await sched.stop()
        return out[1:]

    *blocks_out, pairs_out = asyncio.run(main())
    for items, out in zip(requests, blocks_out, strict=True):
        assert out.scores.dtype == object and len(out.scores) == len(items)
        for item, rows in zip(items, out.scores, strict=True):
            assert rows.shape == (item.entries + 1, 2) and rows[0, 0] == item.input_ids[0]
    np.testing.assert_array_equal(pairs_out.scores, expected(pairs))
    block_ids = {it.input_ids[0] for r in requests for it in r}
    pair_ids = {p.input_ids[0] for p in pairs}
    mixed = [b for b in backend.batches if set(b) & block_ids and set(b) & pair_ids]
    assert not mixed, f"a batch mixed blocks and pairs: {mixed}"
    assert any(len(set(b) & block_ids) == 3 for b in backend.batches), "the three blocks should share a batch"

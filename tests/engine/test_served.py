"""What a served model hands dialects: scores JSON can hold, or a clear model fault."""

from __future__ import annotations

import numpy as np
import pytest

from openrerank.engine.errors import ModelOutputError
from openrerank.engine.served import _reportable


def test_infinities_become_the_largest_float32_and_nan_is_a_fault():
    out = _reportable(np.array([1.5, np.inf, -np.inf], dtype=np.float32))
    assert np.isfinite(out).all() and out[0] == 1.5 and out[1] == -out[2] == np.finfo(np.float32).max
    with pytest.raises(ModelOutputError, match="passage 1"):
        _reportable(np.array([0.0, np.nan], dtype=np.float32))


def test_chunk_caps_a_client_may_ask_for_and_dialect_defaults_under_the_server_cap():
    from openrerank.core.requests import RerankRequest, Truncate
    from openrerank.engine.admission import ChunkLimits
    from openrerank.engine.errors import RequestTooLargeError
    from openrerank.engine.served import ServedModel

    model = ServedModel("m", loaded=None, scheduler=None, limits=ChunkLimits(max_chunks_per_passage=5))  # type: ignore[arg-type]
    chunk = {"query": "q", "passages": ["a"], "truncate": Truncate.CHUNK}
    assert model._chunk_cap(RerankRequest(**chunk)) == 5  # the server's default
    assert model._chunk_cap(RerankRequest(**chunk, max_chunks_per_passage=3)) == 3
    assert model._chunk_cap(RerankRequest(**chunk, default_chunks_per_passage=10)) == 5  # Cohere's 10, capped
    with pytest.raises(RequestTooLargeError, match="--max-chunks-per-passage"):
        model._chunk_cap(RerankRequest(**chunk, max_chunks_per_passage=6))
    for truncate in (Truncate.NONE, Truncate.END):  # no chunks scored, but the maximum holds all the same
        assert model._chunk_cap(RerankRequest("q", ["a"], truncate=truncate, max_chunks_per_passage=5)) is None
        with pytest.raises(RequestTooLargeError, match="--max-chunks-per-passage"):
            model._chunk_cap(RerankRequest("q", ["a"], truncate=truncate, max_chunks_per_passage=6))


@pytest.mark.parametrize("task", ["rerank", "embed"])
def test_a_full_queue_refuses_before_the_request_is_tokenized(tmp_path, task):
    """A 300-passage request was refused (503) only after 1.8 s of tokenizing, and every refused retry of an
    overloaded server cost that again; /v1/embeddings goes through the same check (`_submit_texts`)."""
    import asyncio
    import threading
    import time

    from openrerank.core.requests import EmbedRequest, RerankRequest
    from openrerank.engine.admission import SchedulerConfig
    from openrerank.engine.errors import QueueFullError
    from openrerank.engine.loading import LoadOptions
    from openrerank.engine.served import load_served_model
    from openrerank.sources.source import ModelSource
    from tests.support import build_tiny_bi_encoder

    model = build_tiny_bi_encoder(tmp_path / "bi")  # a bi-encoder both reranks and embeds
    served = load_served_model(ModelSource("m", str(model)), LoadOptions(backend="torch", threads=1),
                               SchedulerConfig(max_queue=1), None)
    release = threading.Event()
    score = served.scheduler.scorer.score
    served.scheduler.scorer.score = lambda items: (release.wait(60), score(items))[1]  # the first request holds
    tokenized: list[int] = []  # texts tokenized, a call at a time, whichever the path
    prepare, embedding_items = served.loaded.encoder.prepare, served.loaded.embedding_items
    served.loaded.encoder.prepare = lambda q, passages, *a, **kw: (tokenized.append(len(passages)),
                                                                   prepare(q, passages, *a, **kw))[1]
    served.loaded.embedding_items = lambda texts, *a, **kw: (tokenized.append(len(texts)),
                                                             embedding_items(texts, *a, **kw))[1]
    refused = {"rerank": lambda: served.rerank(RerankRequest("q", ["b"] * 300)),
               "embed": lambda: served.embed(EmbedRequest(["b"] * 300))}[task]

    async def go() -> None:
        await served.scheduler.start()
        try:
            first = asyncio.create_task(served.rerank(RerankRequest("q", ["a"])))
            deadline = time.monotonic() + 60
            while served.scheduler.pending == 0:
                assert time.monotonic() < deadline, "the first request was never admitted"
                await asyncio.sleep(0.01)
            with pytest.raises(QueueFullError, match="--max-queue"):
                await refused()
            assert tokenized == [1]  # the refused request's texts were never tokenized
            release.set()
            await first
        finally:
            release.set()
            await served.scheduler.stop()
            served.loaded.close()

    asyncio.run(go())


@pytest.mark.parametrize("task", ["rerank", "embed"])
def test_a_request_arrives_while_it_is_tokenized_and_a_tiny_one_is_tokenized_on_the_event_loop(tmp_path, task):
    """The worker waits for company only while a request is arriving (engine/worker.py): a served model counts
    one as arriving from its admission check until it submits, on both paths. A tiny one is tokenized on the
    event loop (engine/preparing.py `tiny`): the hand-off to a worker thread cost more than the tokenizing."""
    import asyncio
    import threading

    from openrerank.core.requests import EmbedRequest, RerankRequest
    from openrerank.engine.admission import SchedulerConfig
    from openrerank.engine.loading import LoadOptions
    from openrerank.engine.preparing import INLINE_TEXTS
    from openrerank.engine.served import load_served_model
    from openrerank.sources.source import ModelSource
    from tests.support import build_tiny_bi_encoder

    model = build_tiny_bi_encoder(tmp_path / "bi")  # a bi-encoder both reranks and embeds
    served = load_served_model(ModelSource("m", str(model)), LoadOptions(backend="torch", threads=1),
                               SchedulerConfig(), None)
    admission = served.scheduler._admission
    seen: list[tuple[int, int, bool]] = []  # (texts, requests arriving, on the event loop's thread) per call

    def watch(texts: list[str]) -> None:
        seen.append((len(texts), admission.arriving, threading.current_thread() is threading.main_thread()))

    prepare, embedding_items = served.loaded.encoder.prepare, served.loaded.embedding_items
    served.loaded.encoder.prepare = lambda q, passages, *a, **kw: (watch(passages), prepare(q, passages, *a, **kw))[1]
    served.loaded.embedding_items = lambda texts, *a, **kw: (watch(texts), embedding_items(texts, *a, **kw))[1]
    send = {"rerank": lambda texts: served.rerank(RerankRequest("q", texts)),
            "embed": lambda texts: served.embed(EmbedRequest(texts))}[task]

    async def go() -> None:
        await served.scheduler.start()
        try:
            for n in (1, INLINE_TEXTS + 1):
                await send(["a short text"] * n)
        finally:
            await served.scheduler.stop()
            served.loaded.close()

    asyncio.run(go())
    assert seen == [(1, 1, True), (INLINE_TEXTS + 1, 1, False)]  # before: (1, 0, False), no count, a thread
    assert admission.arriving == 0


def test_a_listwise_models_rerank_work_is_counted_under_the_task_its_scheduler_runs():
    """A listwise model's blocks run (and are refused, and time out) in the scheduler as `listwise`; its
    scored tokens were counted as `rerank`, so one model's metrics split over two task labels."""
    from types import SimpleNamespace

    from prometheus_client import CollectorRegistry

    from openrerank.core.requests import RerankRequest, ScoreKind, Timings
    from openrerank.engine.served import ServedModel
    from openrerank.observe.metrics import Metrics

    registry = CollectorRegistry()
    metrics = Metrics(registry)
    for listwise, task in ((True, "listwise"), (False, "rerank")):
        loaded = SimpleNamespace(family=SimpleNamespace(listwise=listwise), score_kind=ScoreKind.LOGIT)
        model = ServedModel(task, loaded=loaded, scheduler=None, metrics=metrics)  # type: ignore[arg-type]
        assert model.rerank_task == task
        model._result(RerankRequest("q", ["a", "b"]), np.zeros(2, np.float32), 7, Timings(), 0.0, 1)
        assert registry.get_sample_value("openrerank_tokens_total", {"model": task, "task": task}) == 7
    assert registry.get_sample_value("openrerank_tokens_total", {"model": "listwise", "task": "rerank"}) is None


def test_the_served_ids_are_listed_in_order_from_the_start_whether_loaded_yet_or_not():
    """/v1/models went from every id (while loading) to only those loaded so far once one had loaded, then back:
    a client that read the list meanwhile saw models vanish."""
    from types import SimpleNamespace

    from openrerank.engine.served_models import ServedModels

    served = ServedModels()
    served.expected = ["a", "b", "c"]
    assert served.names == ["a", "b", "c"]
    served.add(SimpleNamespace(name="b"))
    assert served.names == ["a", "b", "c"]
    served.failed["c"] = "no weights"
    assert served.names == ["a", "b"]
    served.add(SimpleNamespace(name="extra"))  # added without being expected (as a test app adds one)
    assert served.names == ["a", "b", "extra"]


def test_an_alias_of_a_model_that_failed_to_load_is_no_id_a_request_may_name():
    """`ids` held every alias, also those of a model `--allow-partial` skipped: gRPC looked names up there and
    described the failed model under its alias."""
    from types import SimpleNamespace

    from openrerank.engine.served_models import ServedModels

    served = ServedModels()
    served.expected = ["broken", "ce"]
    served.aliases = {"old": "broken", "new": "ce"}
    assert served.ids == ["broken", "ce", "old", "new"]  # loading: every id may yet be served
    served.add(SimpleNamespace(name="ce"))
    served.failed["broken"] = "no weights"
    assert served.ids == ["ce", "new"]


def test_metadata_gives_each_model_its_own_share_of_the_one_score_cache():
    """Every model's `score_cache` showed the whole cache's entries as its own (5 models read as 5 caches), also a
    listwise model's, which never uses the cache."""
    from types import SimpleNamespace

    from openrerank.engine.score_cache import ENTRY_BYTES, ScoreCache
    from openrerank.engine.served import ServedModel

    cache = ScoreCache(100 * ENTRY_BYTES)
    cache._store("a", [(bytes([i]) * 16, (0.5, 3, 0, 1)) for i in range(4)])
    cache._store("b", [(b"b" * 16, (0.5, 3, 0, 1))])

    def described(name: str, listwise: bool) -> dict:
        loaded = SimpleNamespace(describe=dict, family=SimpleNamespace(listwise=listwise), multi_vector=False)
        scheduler = SimpleNamespace(request_budget=1000, work_per_second=None)
        return ServedModel(name, loaded, scheduler, None, score_cache=cache).metadata()  # type: ignore[arg-type]

    assert described("a", False)["score_cache"] == {"max_bytes": 100 * ENTRY_BYTES, "shared": True, "entries": 4}
    assert described("b", False)["score_cache"]["entries"] == 1
    assert "score_cache" not in described("c", True)

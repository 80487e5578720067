"""A real (tiny, random) BERT cross-encoder behind the scheduler: batching must not change scores."""

from __future__ import annotations

import asyncio
import random
from pathlib import Path

import numpy as np
import pytest

from openrerank.core.requests import RerankRequest, Truncate
from openrerank.engine.batching import BatchPolicy
from openrerank.engine.loading import LoadedModel, LoadOptions, load_model
from openrerank.engine.scheduler import Scheduler, SchedulerConfig
from openrerank.engine.served import ServedModel
from tests.engine.sched_fakes import FakeScorer, until

WORDS = [f"w{i}" for i in range(60)]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> LoadedModel:
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    path: Path = tmp_path_factory.mktemp("tiny-bert")
    vocab = path / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    tokenizer = transformers.BertTokenizerFast(vocab_file=str(vocab))
    tokenizer.save_pretrained(str(path))
    config = transformers.BertConfig(vocab_size=len(WORDS) + 5, hidden_size=32, num_hidden_layers=2,
                                     num_attention_heads=2, intermediate_size=37, num_labels=1,
                                     max_position_embeddings=128)
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(config).eval()
    model.save_pretrained(str(path), safe_serialization=True)
    loaded = load_model(str(path), LoadOptions(backend="torch", threads=1))
    yield loaded
    loaded.close()


def text(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


def test_concurrent_requests_of_different_lengths_score_as_if_alone(tiny_model: LoadedModel) -> None:
    rng = random.Random(3)
    requests = [
        (text(rng, rng.randint(1, 6)), [text(rng, rng.randint(1, 90)) for _ in range(rng.randint(1, 12))])
        for _ in range(8)
    ]
    prepared = [tiny_model.encoder.prepare(q, ps, Truncate.END) for q, ps in requests]
    # reference: every pair scored on its own, so there is no padding at all
    alone = [np.concatenate([tiny_model.scorer.score([it]) for it in p.items]) for p in prepared]

    backend = FakeScorer()
    backend.inner = tiny_model.scorer
    owner = {id(it): r for r, p in enumerate(prepared) for it in p.items}

    async def main() -> list:
        sched = Scheduler(backend, SchedulerConfig(BatchPolicy(max_tokens=600, max_size=16)), name="tiny")
        backend.hold()  # the first request's batch waits until all the others are queued
        first = asyncio.create_task(sched.submit(prepared[0].items))
        await backend.wait_batch_started()
        rest = [asyncio.create_task(sched.submit(p.items)) for p in prepared[1:]]
        await until(lambda: sched.queued == len(rest))
        backend.release()
        out = await asyncio.gather(first, *rest)
        await sched.stop()
        return out

    outcomes = asyncio.run(main())
    for ref, out in zip(alone, outcomes, strict=True):
        np.testing.assert_allclose(out.scores, ref, rtol=0, atol=1e-5)
    mixed = [b for b in backend.items_seen if len({owner[id(it)] for it in b}) > 1]
    assert mixed, "no batch mixed requests"
    assert any(len({it.length for it in b}) > 1 for b in mixed)  # and padding was really involved


def test_served_model_rerank_through_the_scheduler_matches_direct_scoring(tiny_model: LoadedModel) -> None:
    rng = random.Random(4)
    requests = [RerankRequest(text(rng, 3), [text(rng, rng.randint(1, 40)) for _ in range(7)],
                              truncate=Truncate.END) for _ in range(6)]

    async def main() -> list:
        sched = Scheduler(tiny_model.scorer, SchedulerConfig(BatchPolicy(max_tokens=400)), name="tiny")
        served = ServedModel("tiny", tiny_model, sched)
        await sched.start()
        try:
            return await asyncio.gather(*(served.rerank(r) for r in requests))
        finally:
            await sched.stop()

    for req, res in zip(requests, asyncio.run(main()), strict=True):
        np.testing.assert_allclose(res.logits, tiny_model.score(req.query, req.passages), rtol=0, atol=1e-5)
        assert res.timings.total_ms >= res.timings.queue_ms + res.timings.inference_ms - 1e-6


class _Recorded:
    """An OpenVINO infer request that notes the shape of every batch it runs."""

    def __init__(self, request, seen: list) -> None:
        self.request, self.seen = request, seen

    def infer(self, inputs, **kwargs):
        self.seen.append(tuple(inputs["input_ids"].shape))
        return self.request.infer(inputs, **kwargs)


def test_warmup_reaches_every_lane(tiny_model: LoadedModel, tmp_path: Path,
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """A lane's kernels for a shape are its own (an OpenVINO stream compiles them on its first batch of it),
    so the warm-up runs each of its batches on every lane, not only on the one a lone batch would take."""
    pytest.importorskip("openvino")
    monkeypatch.setenv("OPENRERANK_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("OPENRERANK_LANES", "2")
    loaded = load_model(str(tiny_model.spec.path), LoadOptions(backend="openvino", dtype="fp32", threads=2,
                                                               backend_choice="rules"))
    try:
        runtime = loaded.scorer.runtime
        assert runtime.lanes == 2
        seen: list[list] = [[], []]
        for lane_seen in seen:  # the runtime hands out free requests from its queue
            runtime._requests.put(_Recorded(runtime._requests.get(), lane_seen))
        rng = random.Random(5)
        items = loaded.encoder.prepare(text(rng, 3), [text(rng, n) for n in (4, 9, 30, 60)], Truncate.END).items
        sched = Scheduler(loaded.scorer, SchedulerConfig(BatchPolicy(max_tokens=120)), name="tiny")
        sched.warmup(items)
        assert seen[0] and sorted(seen[0]) == sorted(seen[1])  # every warm-up shape, on both lanes
        assert len(seen[0]) >= 2  # more than one batch: the items split under max_tokens
    finally:
        loaded.close()

"""A request's passages as the served model prepares them (engine/preparing.py): a tiny slice of text tokenized on
the event loop, the rest on worker threads; image passages (`Preparing.images`) decoded a slice, one image, at a
time, holding one full-size image at a time, and stopping with the request.

Handing one passage's tokenizing to a worker thread and back cost the server 0.7-1.7 ms, for 0.2 ms of work.

A tester found both broken: every decoded image stayed in memory until the request ended (one server reached
9.4 GB on 8 requests of 38 small 6,000 x 6,000 PNGs), and a request's images were decoded in one worker-thread
call that neither a disconnect nor the deadline could stop (abandoned decodes kept a core busy for 25 s and
delayed another model's one-passage request to 119 s).
"""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest

from openrerank.core.requests import RerankRequest, Truncate
from openrerank.engine.admission import SchedulerConfig
from openrerank.engine.errors import DeadlineExceededError
from openrerank.engine.image_queue import DecodeBacklogError, ImageQueue
from openrerank.engine.loading import LoadOptions
from openrerank.engine.preparing import INLINE_CHARS, INLINE_TEXTS, text_slices, tiny
from openrerank.engine.served import load_served_model
from openrerank.families import nemotron_vl
from openrerank.sources.source import ModelSource
from tests.families.builders import build_nemotron_vl
from tests.images import data_url, picture, watch_decodes
from tests.support import build_tiny_bi_encoder

#: Seconds each decode is made to take in the cancellation test.
DECODE_S = 0.2


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    model_dir = build_nemotron_vl(tmp_path_factory.mktemp("vl") / "tiny-nemotron-vl")
    options = LoadOptions(backend="torch", dtype="fp32", threads=1)
    model = load_served_model(ModelSource("vl", str(model_dir)), options, SchedulerConfig(), None)
    yield model
    asyncio.run(model.scheduler.stop())


def request(images: int, texts: int = 2, width: int = 64) -> RerankRequest:
    urls = [data_url(picture(width, 48, seed)) for seed in range(images)]
    passages = [f"passage {i}" for i in range(images + texts)]
    return RerankRequest("what is on the page", passages, images=(*urls, *[None] * texts))


def test_a_tiny_slice_is_a_few_short_texts():
    assert tiny(["a"] * INLINE_TEXTS) and not tiny(["a"] * (INLINE_TEXTS + 1))
    assert tiny(["a" * (INLINE_CHARS - 8)], "q" * 8) and not tiny(["a" * (INLINE_CHARS - 7)], "q" * 8)
    assert not tiny(["a" * 500] * 4, "q" * 13)  # the query counts once per text: a pair tokenizes it again
    half = INLINE_CHARS // 2  # chunking tokenizes each window again: its characters count double
    assert tiny(["a" * (half - 8)], "q" * 8, Truncate.CHUNK) and not tiny(["a" * (half - 7)], "q" * 8, Truncate.CHUNK)
    assert tiny(["a"], "q", Truncate.START) and tiny(["a"], "q", Truncate.NONE)


@pytest.fixture(scope="module")
def bi(tmp_path_factory):
    model_dir = build_tiny_bi_encoder(tmp_path_factory.mktemp("bi") / "bi")
    model = load_served_model(ModelSource("bi", str(model_dir)), LoadOptions(backend="torch", threads=1),
                              SchedulerConfig(), None)
    yield model
    asyncio.run(model.scheduler.stop())
    model.loaded.close()


def test_a_tiny_slice_is_tokenized_on_the_event_loop_and_the_rest_on_worker_threads(bi, monkeypatch):
    on_loop: list[tuple[int, bool]] = []  # (texts, on the event loop's thread), a call at a time
    prepare = bi.loaded.encoder.prepare

    def watched(query, passages, *args, **kwargs):
        on_loop.append((len(passages), threading.current_thread() is threading.main_thread()))
        return prepare(query, passages, *args, **kwargs)

    monkeypatch.setattr(bi.loaded.encoder, "prepare", watched)
    for req in (RerankRequest("q", ["a short passage"]), RerankRequest("q", ["a short passage"] * INLINE_TEXTS),
                RerankRequest("q", ["a short passage"], truncate=Truncate.CHUNK)):
        on_loop.clear()
        asyncio.run(bi.rerank(req))
        assert on_loop == [(len(req.passages), True)]  # before: on a worker thread
    for req in (RerankRequest("q", ["a short passage"] * (INLINE_TEXTS + 1)),
                RerankRequest("q", ["long " * (INLINE_CHARS // 5 + 1)], truncate=Truncate.END),
                RerankRequest("q", ["long " * (INLINE_CHARS // 10 + 1)], truncate=Truncate.CHUNK)):
        on_loop.clear()
        result = asyncio.run(bi.rerank(req))
        assert len(result.logits) == len(req.passages) and on_loop == [(len(req.passages), False)]
    on_loop.clear()
    asyncio.run(bi.rerank(RerankRequest("q", ["a short passage"] * 66)))  # slices of 64 and 2
    assert on_loop == [(64, False), (2, True)]


def test_slices_hold_one_image_each():
    texts = ["a"] * 7
    assert text_slices(texts, [None, "i", None, "i", "i", None, None]) == [(0, 3), (3, 4), (4, 7)]
    assert text_slices(texts, [None] * 7) == text_slices(texts) == [(0, 7)]


def test_one_full_size_image_is_held_at_a_time(served, monkeypatch):
    alive_at_each = watch_decodes(monkeypatch, nemotron_vl)
    result = asyncio.run(served.rerank(request(4)))
    assert len(result.logits) == 6 and np.isfinite(result.logits).all()
    assert alive_at_each == [0, 0, 0, 0]  # before: [0, 1, 2, 3], every image kept until the request ended


def test_a_request_past_its_deadline_stops_decoding(served, monkeypatch):
    calls: list[float] = []
    lock = threading.Lock()
    decode = nemotron_vl.decode_image

    def slow(image, index=None):
        with lock:
            calls.append(time.monotonic())
        time.sleep(DECODE_S)
        return decode(image, index)

    monkeypatch.setattr(nemotron_vl, "decode_image", slow)
    monkeypatch.setattr(served, "image_queue", ImageQueue())  # no rate measured: admitted, stopped mid-decode
    counted: list[tuple[str, str]] = []
    monkeypatch.setattr(served.scheduler, "count_rejected", lambda task, reason: counted.append((task, reason)))
    images = 12
    with pytest.raises(DeadlineExceededError):
        asyncio.run(served.rerank(request(images, texts=0), deadline=time.monotonic() + 2.5 * DECODE_S))
    ended = time.monotonic()
    assert counted == [("rerank", "deadline")]  # in openrerank_rejected_total, as a deadline passed in the queue
    # Showing that decoding stopped needs a window: as long as all the images would have taken, and more.
    # With the decoding in one call, every image was decoded (before: 12 of 12).
    deadline = ended + images * DECODE_S + 1.0
    while time.monotonic() < deadline and len(calls) < images:
        time.sleep(0.05)
    assert len(calls) <= 4, f"{len(calls)} of {images} images decoded after the request's deadline passed"
    assert all(t < ended + 2 * DECODE_S for t in calls)  # none started after the one in hand


def test_an_error_in_a_later_slice_names_the_requests_passage(served):
    """Each image is prepared in a slice of its own; an error there must name the passage's index in the
    request, not in its slice (`Preparing.images` shifts it)."""
    import base64
    import io

    from openrerank.core.images import ImageInputError

    buf = io.BytesIO()
    picture(64, 48, 9).save(buf, format="PNG")
    # a PNG cut short: its header opens (checked before slicing), its pixels fail to decode, in the third slice
    broken = "data:image/png;base64," + base64.b64encode(buf.getvalue()[: len(buf.getvalue()) // 2]).decode()
    req = request(3)
    req = RerankRequest(req.query, req.passages, images=(*req.images[:2], broken, *req.images[3:]))
    with pytest.raises(ImageInputError) as caught:
        asyncio.run(served.rerank(req))
    assert caught.value.passage_index == 2 and str(caught.value).startswith("passage 2: ")


#: Widths of the images whose decoding has started (`slow_decodes`).
STARTED: set[int] = set()


def slow_decodes(monkeypatch, seconds: float) -> list[tuple[int, float, float]]:
    """Each decode takes `seconds` more; the list gets (image width, start, end) of each, as they end."""
    seen: list[tuple[int, float, float]] = []
    decode = nemotron_vl.decode_image
    STARTED.clear()

    def slow(image, index=None):
        start = time.monotonic()
        STARTED.add(image.width)
        spent = time.thread_time() + seconds  # CPU seconds, as decoding spends them (the queue times those)
        while time.thread_time() < spent:
            pass
        out = decode(image, index)
        seen.append((image.width, start, time.monotonic()))
        return out

    monkeypatch.setattr(nemotron_vl, "decode_image", slow)
    return seen


async def queued(queue: ImageQueue, requests: int, width: int = 64) -> None:
    """Until `requests` requests are in the queue (decoding or waiting), so the order they arrive in is theirs,
    or (code without the queue) the last one, of images `width` wide, decodes."""
    while queue._running + queue.waiting < requests and width not in STARTED:
        await asyncio.sleep(0.005)


def test_image_requests_decode_first_come_first_served(served, monkeypatch):
    """A reviewer's six concurrent requests of 40 large pages all decoded at once, all finished after their
    deadline and all ended 504 (one alone: 50 s). Now the first decodes while the later ones wait their turn (of
    equal size, they are served first come first served; a smaller one goes first, tests/engine/test_image_queue.py)."""
    seen = slow_decodes(monkeypatch, 0.1)
    queue = ImageQueue(slots=1)
    monkeypatch.setattr(served, "image_queue", queue)
    finished: dict[int, float] = {}

    async def one(width: int) -> None:
        await served.rerank(request(3, texts=0, width=width))
        finished[width] = time.monotonic()

    async def three() -> None:
        tasks = []
        for k, width in enumerate((64, 65, 66)):  # each request's images told apart by their width
            tasks.append(asyncio.create_task(one(width)))
            await queued(queue, k + 1, width)
        await asyncio.gather(*tasks)

    asyncio.run(three())
    assert [w for w, _, _ in seen] == [64] * 3 + [65] * 3 + [66] * 3  # before: interleaved
    first = {w: min(s for v, s, _ in seen if v == w) for w in (64, 65, 66)}
    last = {w: max(e for v, _, e in seen if v == w) for w in (64, 65, 66)}
    assert last[64] <= first[65] and last[65] <= first[66]  # each waited for the one before it
    assert finished[64] < finished[65] < finished[66]  # before: all three finished together


def test_a_request_whose_deadline_passes_while_it_waits_decodes_nothing(served, monkeypatch):
    """Refused as a deadline passed in the scheduler's queue is (504, counted as `deadline`), without a decode."""
    seen = slow_decodes(monkeypatch, DECODE_S)
    queue = ImageQueue(slots=1)
    monkeypatch.setattr(served, "image_queue", queue)
    counted: list[tuple[str, str]] = []
    monkeypatch.setattr(served.scheduler, "count_rejected", lambda task, reason: counted.append((task, reason)))

    async def both() -> BaseException | None:
        first = asyncio.create_task(served.rerank(request(6, texts=0)))
        await queued(queue, 1)
        # its deadline passes before the first image is decoded: no rate yet to refuse it by (the next test)
        late = served.rerank(request(2, texts=0, width=65), deadline=time.monotonic() + DECODE_S / 2)
        outcome = (await asyncio.gather(late, return_exceptions=True))[0]
        await first
        return outcome

    outcome = asyncio.run(both())
    assert isinstance(outcome, DeadlineExceededError) and counted == [("rerank", "deadline")]
    assert [w for w, _, _ in seen] == [64] * 6  # before: the late request's images decoded beside the first's


def test_images_that_would_not_be_decoded_in_time_are_refused_at_once(served, monkeypatch):
    """With the decoding rate measured, a request that would wait past its deadline is refused before waiting
    (503, Retry-After, counted as a refusal for a deadline the scheduler could not meet: `queue_full`): here behind
    a request with fewer pixels left than its own (one with more it would go ahead of, tests/engine/
    test_image_queue.py)."""
    seen = slow_decodes(monkeypatch, DECODE_S)
    queue = ImageQueue(slots=1)
    monkeypatch.setattr(served, "image_queue", queue)
    counted: list[tuple[str, str]] = []
    monkeypatch.setattr(served.scheduler, "count_rejected", lambda task, reason: counted.append((task, reason)))

    async def both() -> None:
        await served.rerank(request(1, texts=0, width=63))  # the rate: ~DECODE_S an image
        first = asyncio.create_task(served.rerank(request(6, texts=0)))
        await queued(queue, 1)
        deadline = time.monotonic() + 4 * DECODE_S
        with pytest.raises(DecodeBacklogError) as refused:
            await served.rerank(request(6, texts=0, width=65), deadline=deadline)
        # at once, not after waiting: before its own deadline, with the first request still decoding (a bound on
        # wall time alone failed under load: the first request's decodes spin the CPU beside it)
        assert time.monotonic() < deadline and not first.done()
        assert refused.value.retry_after >= 1.0
        await first

    asyncio.run(both())
    assert queue.seconds_per_pixel is not None and counted == [("rerank", "queue_full")]
    assert 65 not in [w for w, _, _ in seen]

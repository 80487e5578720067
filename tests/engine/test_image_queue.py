"""The image queue (engine/image_queue.py): the request with the least left first (first come first served among
equals) unless that pushes one admitted before it past its deadline, a slot held until the decode in hand ends,
a waiter that leaves takes nothing with it, and the refusal from the measured rate."""

from __future__ import annotations

import asyncio
import math
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest

from openrerank.engine import image_queue
from openrerank.engine.image_queue import IMAGE_OVERHEAD_PIXELS, DecodeBacklogError, ImageQueue, decode_pixels

#: Pixels of a 6,000 x 6,000 page, as the queue counts them.
PAGE = decode_pixels((6000, 6000))


def test_an_image_counts_its_pixels_and_the_tiling_overhead():
    assert decode_pixels((6000, 5999)) == 6000 * 5999 + IMAGE_OVERHEAD_PIXELS and decode_pixels(None) == 0


def test_a_cancelled_request_holds_its_slot_until_its_decode_in_hand_ends():
    """A thread cannot be stopped mid-image: the next request must not start decoding beside it."""
    release = threading.Event()
    order: list[str] = []

    async def main() -> None:
        queue = ImageQueue(slots=1)

        async def first() -> None:
            async with queue.turn(10, math.inf) as decoding:
                await decoding.run(10, release.wait)

        async def second() -> None:
            async with queue.turn(10, math.inf) as decoding:
                order.append("second starts")
                await decoding.run(10, lambda: None)

        a = asyncio.create_task(first())
        await asyncio.sleep(0.05)
        b = asyncio.create_task(second())
        await asyncio.sleep(0.05)
        a.cancel()  # its client left: the decode in hand goes on in its thread
        await asyncio.sleep(0.1)
        assert order == [] and queue.waiting == 1
        order.append("first's decode ends")
        release.set()
        await b

    asyncio.run(main())
    assert order == ["first's decode ends", "second starts"]


def test_a_waiter_that_leaves_takes_no_slot_and_no_backlog():
    async def main() -> None:
        queue = ImageQueue(slots=1)
        hold = asyncio.Event()

        async def holder() -> None:
            async with queue.turn(5, math.inf):
                await hold.wait()

        async def waiter() -> None:
            async with queue.turn(7, math.inf):
                pass

        a = asyncio.create_task(holder())
        await asyncio.sleep(0)
        b = asyncio.create_task(waiter())
        await asyncio.sleep(0.01)
        b.cancel()
        with pytest.raises(asyncio.CancelledError):
            await b
        assert queue.waiting == 0 and queue._pixels == 5
        hold.set()
        await a
        assert queue._running == 0 and queue._pixels == 0  # the holder left: its undecoded pixels go too
        async with queue.turn(1, math.inf):  # the slot is free again
            pass

    asyncio.run(main())


@asynccontextmanager
async def holding(queue: ImageQueue, *pixels: int, deadline: float = math.inf) -> AsyncIterator[None]:
    """Requests of these pixels in the queue, arrived in this order, each holding a slot or waiting for one
    without decoding, until the block ends; then they end."""
    release = asyncio.Event()

    async def one(p: int) -> None:
        async with queue.turn(p, deadline):
            await release.wait()

    held = []
    for p in pixels:
        held.append(asyncio.create_task(one(p)))
        await asyncio.sleep(0)
    await asyncio.sleep(0.01)
    try:
        yield
    finally:
        release.set()
        await asyncio.gather(*held)


async def refusal(queue: ImageQueue, pixels: int, deadline: float) -> DecodeBacklogError | None:
    """Why a request of `pixels` is refused at once, or None: it joins the queue (and is then taken out)."""
    waiting = queue.waiting
    task = asyncio.create_task(_enter(queue, pixels, deadline))
    await asyncio.sleep(0.01)
    if task.done():
        exc = task.exception()
        assert exc is None or isinstance(exc, DecodeBacklogError), exc
        return exc
    assert queue.waiting == waiting + 1
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    return None


async def _enter(queue: ImageQueue, pixels: int, deadline: float) -> None:
    async with queue.turn(pixels, deadline):
        pass


def test_the_refusal_weighs_the_backlog_by_the_measured_rate():
    now = [0.0]

    async def main() -> None:
        queue = ImageQueue(slots=2, clock=lambda: now[0])
        assert await refusal(queue, 10**9, 1.0) is None  # no rate yet: admitted
        queue.seconds_per_pixel = 1e-6
        async with holding(queue, *[1_000_000] * 4):  # 2 s per slot queued ahead
            assert await refusal(queue, 1_000_000, 10.0) is None  # 3 s of 8 allowed
            refused = await refusal(queue, 1_000_000, 3.0)  # 3 s > 80% of 3 s
        assert isinstance(refused, DecodeBacklogError) and refused.retry_after == 2.0
        assert "behind the image requests served before it" in str(refused) and "retry later" in str(refused)
        assert queue._order == [] and queue._running == 0
        # nothing ahead: it decodes at once, left to its deadline (its decode measures the rate afresh)
        assert await refusal(queue, 10**9, 1.0) is None

    asyncio.run(main())


def test_a_small_request_decodes_before_the_rest_of_a_big_one_queued_before_it():
    """First come first served, a one-image request waited for every image of a five-image request that came
    just before it (head-of-line blocking): now it waits for the image in hand only."""
    order: list[str] = []
    in_hand = threading.Event()
    go = threading.Event()

    def decode(name: str) -> None:
        if name == "big 0":
            in_hand.set()
            go.wait(10)
        order.append(name)

    async def main() -> None:
        queue = ImageQueue(slots=1)

        async def big() -> None:
            async with queue.turn(5 * PAGE, math.inf) as decoding:
                for k in range(5):
                    await decoding.run(PAGE, decode, f"big {k}")

        async def small() -> None:
            async with queue.turn(PAGE // 4, math.inf) as decoding:
                await decoding.run(PAGE // 4, decode, "small")

        a = asyncio.create_task(big())
        await asyncio.to_thread(in_hand.wait, 10)
        b = asyncio.create_task(small())
        await asyncio.sleep(0.05)
        assert order == [] and queue.waiting == 1  # the image in hand is never cut short
        go.set()
        await asyncio.gather(a, b)
        assert queue._pixels == 0 and queue._running == 0

    asyncio.run(main())
    assert order == ["big 0", "small", "big 1", "big 2", "big 3", "big 4"]  # before: "small" last


def test_a_small_request_behind_a_big_one_is_not_refused_for_the_big_ones_backlog():
    """Served first, its wait is the image in hand: refusing it for the whole backlog would be a false 503."""
    async def main() -> None:
        queue = ImageQueue(slots=1)
        queue.seconds_per_pixel = 1e-6
        async with holding(queue, 40 * PAGE):  # ~1,480 s of pages ahead
            assert await refusal(queue, PAGE, 60.0) is None  # before: refused, ~1,517 s behind the big request

    asyncio.run(main())


def test_a_newcomer_does_not_go_ahead_of_a_request_it_would_push_past_its_deadline():
    """A stream of small requests going first would starve a big one into a 504: a newcomer passes a request
    with more left only where that one is still decoded within 80% of its time left."""
    now = [0.0]

    async def main() -> None:
        queue = ImageQueue(slots=1, clock=lambda: now[0])
        queue.seconds_per_pixel = 1e-6
        async with holding(queue, 5_000_000, deadline=10.0):  # 5 s of 8 allowed
            assert await refusal(queue, 1_000_000, 5.0) is None  # goes first: it ends by 5 + 1 s of 8
            # going first would push it to 9 s of 8; behind it, 9 s of its own 4 allowed (first: 4 s)
            assert isinstance(await refusal(queue, 4_000_000, 5.0), DecodeBacklogError)

    asyncio.run(main())


def test_a_request_cancelled_between_its_images_gives_its_place_back():
    """Its slot went to a request with less left at its image's end; leaving then, it leaves nothing behind."""
    go = threading.Event()

    async def main() -> None:
        queue = ImageQueue(slots=1)
        small_in = asyncio.Event()
        small_go = asyncio.Event()

        async def big() -> None:
            async with queue.turn(3 * PAGE, math.inf) as decoding:
                for _ in range(3):
                    await decoding.run(PAGE, go.wait, 10)

        async def small() -> None:
            async with queue.turn(PAGE, math.inf):
                small_in.set()
                await small_go.wait()

        a = asyncio.create_task(big())
        await asyncio.sleep(0.05)
        b = asyncio.create_task(small())
        await asyncio.sleep(0.01)
        go.set()  # the big request's first image ends: the slot goes to the small one
        await asyncio.wait_for(small_in.wait(), 5)  # (before: only once the big request had ended)
        assert queue.waiting == 1 and queue._running == 1
        a.cancel()  # its client leaves while it waits for its next image
        with pytest.raises(asyncio.CancelledError):
            await a
        assert queue.waiting == 0 and queue._pixels == PAGE
        small_go.set()
        await b
        assert queue._order == [] and queue._running == 0

    asyncio.run(main())


def test_a_waiter_that_can_no_longer_make_its_deadline_is_refused_as_the_rate_is_measured(monkeypatch):
    """Six requests arriving at once are all queued before any image is decoded (no rate yet): once the first
    image shows the rate, those that would wait past their deadline are refused then, not 504 at their deadline."""
    now = [0.0]
    seconds = iter([0.5, 2.0])  # each unit's CPU seconds, as the decoding thread reports them
    monkeypatch.setattr(image_queue, "_timed", lambda fn, *a, **k: (fn(*a, **k), next(seconds)))

    async def main() -> None:
        queue = ImageQueue(slots=1, clock=lambda: now[0])
        hold = asyncio.Event()
        outcomes: list[str] = []
        second_unit = asyncio.Event()

        async def request(name: str) -> None:
            try:
                async with queue.turn(40, 100.0) as decoding:
                    if name == "first":
                        await decoding.run(1, lambda: None)  # the rate: 0.5 s a unit
                        await second_unit.wait()
                        await decoding.run(1, lambda: None)  # 2 s: the rate moves to 0.95
                        await hold.wait()
                    outcomes.append(f"{name} decoded")
            except DecodeBacklogError:
                outcomes.append(f"{name} refused")

        first = asyncio.create_task(request("first"))
        await asyncio.sleep(0)
        others = [asyncio.create_task(request(n)) for n in ("second", "third")]
        await asyncio.sleep(0.05)
        assert queue.seconds_per_pixel == 0.5 and outcomes == []  # 39 + 40 + 40 units at 0.5 s fit 80 s
        second_unit.set()
        await asyncio.sleep(0.05)
        assert queue.seconds_per_pixel == pytest.approx(0.95)  # 38 + 40 fit 80 s at 0.95; 38 + 40 + 40 do not
        assert outcomes == ["third refused"] and queue.waiting == 1
        hold.set()
        await asyncio.gather(first, *others)
        assert outcomes == ["third refused", "first decoded", "second decoded"]

    asyncio.run(main())


def test_a_request_that_went_aside_for_a_smaller_one_is_decoded_to_its_end(monkeypatch):
    """Only a request that has decoded nothing is refused as the rate moves: one that let a smaller request go
    ahead at an image's end has been promised its turn (as first come first served promised it), and refusing it
    then would waste the images it decoded."""
    now = [0.0]
    seconds = iter([1.0, 30.0, 30.0, 1.0, 1.0, 1.0])  # each unit's CPU seconds, as the decoding thread reports them
    monkeypatch.setattr(image_queue, "_timed", lambda fn, *a, **k: (fn(*a, **k), next(seconds)))
    order: list[str] = []

    async def main() -> None:
        queue = ImageQueue(slots=1, clock=lambda: now[0])
        big_first = asyncio.Event()

        async def big() -> None:
            async with queue.turn(4, 10.0) as decoding:
                for k in range(4):
                    await decoding.run(1, order.append, f"big {k}")
                    big_first.set()
                    await asyncio.sleep(0.01)

        a = asyncio.create_task(big())
        await big_first.wait()  # 1 s a unit: 3 units left, 3 s of 8
        async with queue.turn(2, 10.0) as decoding:  # goes ahead: the big one ends by 5 s of 8
            for k in range(2):  # 30 s a unit now: the big one's 3 units would end past its deadline
                await decoding.run(1, order.append, f"small {k}")
        await a

    asyncio.run(main())
    assert order == ["big 0", "small 0", "small 1", "big 1", "big 2", "big 3"]


def test_the_rate_is_the_decodes_own_cpu_time_not_its_wait():
    """Timed by the wall clock, a decode that waited for a thread or for the GIL (a big body's parse holds it)
    set a rate that refused a legal request on an idle server, every time after. Here the decode only waits."""
    import time

    queue = ImageQueue(slots=1)

    async def scenario() -> None:
        async with queue.turn(1_000_000, math.inf) as decoding:
            await decoding.run(1_000_000, time.sleep, 0.3)

    asyncio.run(scenario())
    assert queue.seconds_per_pixel is not None and queue.seconds_per_pixel < 0.05 / 1_000_000

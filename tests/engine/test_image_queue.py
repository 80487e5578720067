"""The image queue (engine/image_queue.py): first come first served, a slot held until the decode in hand ends,
a waiter that leaves takes nothing with it, and the refusal from the measured rate."""

from __future__ import annotations

import asyncio
import math
import threading

import pytest

from openrerank.engine.image_queue import IMAGE_OVERHEAD_PIXELS, DecodeBacklogError, ImageQueue, decode_pixels


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


def test_the_refusal_weighs_the_backlog_by_the_measured_rate():
    now = [0.0]
    queue = ImageQueue(slots=2, clock=lambda: now[0])
    assert queue.refusal(10**9, 1.0) is None  # no rate yet: admitted
    queue.seconds_per_pixel = 1e-6
    queue._pixels = 4_000_000  # 2 s per slot queued ahead
    assert queue.refusal(1_000_000, 10.0) is None  # 3 s of 8 allowed
    refused = queue.refusal(1_000_000, 3.0)  # 3 s > 80% of 3 s
    assert isinstance(refused, DecodeBacklogError) and refused.retry_after == 2.0
    assert "behind the image requests queued before it" in str(refused) and "retry later" in str(refused)
    queue._pixels = 0  # nothing ahead: it decodes at once, left to its deadline (its decode measures the rate)
    assert queue.refusal(10**9, 1.0) is None


def test_a_waiter_that_can_no_longer_make_its_deadline_is_refused_as_the_rate_is_measured():
    """Six requests arriving at once are all queued before any image is decoded (no rate yet): once the first
    image shows the rate, those that would wait past their deadline are refused then, not 504 at their deadline."""
    now = [0.0]

    async def main() -> None:
        queue = ImageQueue(slots=1, clock=lambda: now[0])
        hold = asyncio.Event()
        outcomes: list[str] = []

        async def request(name: str) -> None:
            try:
                async with queue.turn(40, 100.0) as decoding:
                    if name == "first":
                        await decoding.run(1, lambda: None)  # one unit decoded: the rate is known
                        await hold.wait()
                    outcomes.append(f"{name} decoded")
            except DecodeBacklogError:
                outcomes.append(f"{name} refused")

        first = asyncio.create_task(request("first"))
        await asyncio.sleep(0)
        others = [asyncio.create_task(request(n)) for n in ("second", "third")]
        await asyncio.sleep(0.05)
        assert queue.seconds_per_pixel is not None
        queue.seconds_per_pixel = 1.0  # 39 left of the first + 40 of the second fit 80 s; a third would not
        queue._done(0, 0.0)  # (no pixels: nothing re-checked)
        assert outcomes == []
        queue._done(1, 1.0)  # the first's second unit, at 1 s a unit: 38 + 40 + 40 > 80
        await asyncio.sleep(0.01)
        assert outcomes == ["third refused"] and queue.waiting == 1
        hold.set()
        await asyncio.gather(first, *others)
        assert outcomes == ["third refused", "first decoded", "second decoded"]

    asyncio.run(main())


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

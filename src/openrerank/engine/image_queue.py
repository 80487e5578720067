"""Image requests of one model decoded a few images at a time (`DECODE_SLOTS`), the request with the least left
to decode first.

Why: decoding a page image is the slow part of an image request (seconds per 36-Mpx page on one core), and it
happens before the scheduler sees the request. With every request decoding at once through the worker threads
they all share, six concurrent requests of 40 large pages shared the cores, all finished decoding together after
their deadline and all ended 504 (120 s), where one alone took 50 s; none was refused at once, as the scheduler
refuses what would miss its deadline (docs/reliability.md). Here a few requests decode at a time and finish;
the others wait their turn without decoding a pixel, and a request whose deadline passes while it waits ends as a
deadline passed in the scheduler's queue does.

Which request decodes next: the one with the fewest pixels left, first come first served among equals, chosen
again at every image's end (a thread cannot be stopped mid-image). First come first served alone had a one-image
request wait for every page of a 40-page request queued before it (head-of-line blocking, which the text
scheduler's fair shares avoid); shortest first still finishes requests one after another, never all together.
A newcomer goes ahead of a bigger request only if that one, admitted in time, would still be decoded within
`DEADLINE_SHARE` of its time left (`rates.pushed_past_deadline`'s rule), so a stream of small requests cannot
starve a big one into a 504.

Decoding is timed per pixel, so once the rate is known a request whose images would not be decoded in time
behind those served before it is refused at once (503, Retry-After).
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any, TypeVar

from openrerank.core.cpus import available_cpus
from openrerank.engine.errors import QueueFullError
from openrerank.engine.rates import DEADLINE_SHARE

T = TypeVar("T")

#: Images a model decodes at once: a request decodes one image at a time (one core), and the rest of the cores
#: run the model's batches and the other requests' tokenization.
DECODE_SLOTS = max(1, available_cpus() // 4)
#: Weight of the latest image in the measured seconds per pixel (an exponential moving average).
RATE_WEIGHT = 0.3
#: Pixels an image is counted beyond its own: what tiling it costs whatever its size (up to seven 512-pixel tiles),
#: so small images, whose decode is mostly that, do not make big ones look dear (a false refusal).
IMAGE_OVERHEAD_PIXELS = 1_000_000


def decode_pixels(size: tuple[int, int] | None) -> int:
    """What an image (None: a text passage) counts for in the queue: its pixels plus the overhead."""
    return 0 if size is None else size[0] * size[1] + IMAGE_OVERHEAD_PIXELS


class DecodeBacklogError(QueueFullError):
    """The request's images would not be decoded before its deadline behind the image requests served before
    it: refused at once (503/429, Retry-After) instead of decoding and ending 504."""

    def __init__(self, estimate: float, left: float, retry_after: float) -> None:
        QueueFullError.__init__(self, "", "", retry_after)
        self.args = (f"server overloaded: this request's images would be decoded in about {estimate:.0f} s behind "
                     f"the image requests served before it, too close to its deadline in {max(0.0, left):.0f} s "
                     f"(work is planned into at most {DEADLINE_SHARE:.0%} of the time left); retry later",)


class _Request:
    """One request in the queue, decoding or waiting."""

    __slots__ = ("deadline", "granted", "left", "refused", "started", "woken")

    def __init__(self, pixels: int, deadline: float) -> None:
        self.left = pixels  # not decoded yet, the image in hand included
        self.deadline = deadline
        self.granted = False  # holds a slot (its wake-up may still be on its way)
        self.started = False  # has held one: it is served to its end, never refused for the backlog
        self.woken: asyncio.Future | None = None  # while it waits for a slot
        self.refused: DecodeBacklogError | None = None  # out of the queue: it would not be decoded in time


class ImageQueue:
    """One model's image requests: `slots` images decode at a time, the request with the least left first."""

    def __init__(self, slots: int = DECODE_SLOTS, clock: Callable[[], float] = time.monotonic) -> None:
        self.slots = slots
        self.seconds_per_pixel: float | None = None  # measured on the decodes so far
        self._clock = clock
        self._lock = threading.Lock()  # the state is touched from the event loop and from decode callbacks
        self._order: list[_Request] = []  # every request in the queue, in the order they are served
        self._running = 0  # slots held

    @property
    def waiting(self) -> int:
        """Requests in the queue waiting for a slot."""
        with self._lock:
            return sum(1 for r in self._order if not r.granted)

    @property
    def _pixels(self) -> int:
        """Pixels queued or decoding, not yet decoded."""
        return sum(r.left for r in self._order)

    def _place_locked(self, pixels: int, deadline: float) -> tuple[int, DecodeBacklogError | None]:
        """Where a newcomer of `pixels` goes in the order, and why it would miss `deadline` there, or None.

        It goes ahead of each request, from the last, with more pixels left than its own, unless that one would be
        decoded in time without it and not within `DEADLINE_SHARE` of its time left with it. Never refused until a
        rate is measured, nor with nothing ahead: a request that decodes at once is left to its deadline, as a
        text request is, and its decode measures the rate afresh (a rate measured under contention once refused a
        legal request on an idle server, every time: refused, it never corrected the rate)."""
        rate = self.seconds_per_pixel
        now = self._clock()
        ahead = self._pixels
        index = len(self._order)
        while index > 0:
            other = self._order[index - 1]
            if other.left <= pixels:
                break
            if rate is not None:
                finish = ((ahead - other.left) / self.slots + other.left) * rate
                left = other.deadline - now
                if finish <= left and finish + pixels / self.slots * rate > DEADLINE_SHARE * left:
                    break
            ahead -= other.left
            index -= 1
        if rate is None or ahead <= 0:
            return index, None
        estimate = (ahead / self.slots + pixels) * rate
        left = deadline - now
        if estimate <= DEADLINE_SHARE * left:
            return index, None
        return index, DecodeBacklogError(estimate, left, min(60.0, max(1.0, ahead / self.slots * rate)))

    @asynccontextmanager
    async def turn(self, pixels: int, deadline: float) -> AsyncIterator[Decoding]:
        """Join the queue, wait for a slot, and decode the request's images (`Decoding.run`, which may wait again
        between images, while a request with less left decodes). Refused (DecodeBacklogError) before waiting if
        it would not be decoded within its deadline behind those served before it, or while it waits, as the rate
        is measured; a request cancelled while waiting (its client gone, its deadline passed) leaves the queue,
        and the slot it held once the image in hand is decoded."""
        request = _Request(pixels, deadline)
        with self._lock:
            index, refused = self._place_locked(pixels, deadline)
            if refused is not None:
                raise refused
            self._order.insert(index, request)
            self._wake_locked()
        decoding = Decoding(self, request)
        try:
            await decoding.slot()
            yield decoding
        finally:
            decoding.close()

    def _done(self, request: _Request, pixels: int, seconds: float) -> None:
        """An image of `request`, `pixels`, decoded in `seconds`: the rate moves, and a waiting request that
        would no longer be decoded in time is refused now, not when its deadline has passed."""
        with self._lock:
            request.left -= pixels
            if pixels > 0:
                self._measured_locked(seconds / pixels)

    def _measured_locked(self, rate: float) -> None:
        """`rate` seconds per pixel on the latest image: the rate moves, and each request that has not decoded yet
        and would now miss its deadline behind those served before it is refused (one that has decoded some was
        promised its turn: refusing it would waste them)."""
        old = self.seconds_per_pixel
        self.seconds_per_pixel = rate = rate if old is None else old + RATE_WEIGHT * (rate - old)
        now = self._clock()
        ahead = 0  # pixels of the requests served before the one at hand
        for request in list(self._order):
            if not request.started and ahead > 0:
                estimate = (ahead / self.slots + request.left) * rate
                left = request.deadline - now
                if estimate > DEADLINE_SHARE * left:
                    self._order.remove(request)
                    request.refused = refused = DecodeBacklogError(estimate, left,
                                                                   min(60.0, max(1.0, ahead / self.slots * rate)))
                    if request.woken is not None:
                        request.woken.get_loop().call_soon_threadsafe(_refuse, request.woken, refused)
                    continue
            ahead += request.left

    def _leave(self, request: _Request) -> None:
        """The request has ended: out of the queue, and its slot to the next."""
        with self._lock:
            if request in self._order:
                self._order.remove(request)
            if request.granted:
                request.granted = False
                self._running -= 1
            self._wake_locked()

    def _keeps_slot_locked(self, request: _Request) -> bool:
        """Whether `request`, holding a slot between two images, keeps it: not when a request served before it
        (one with less left, come meanwhile) waits for one; the slot then goes to that one."""
        for other in self._order:
            if other is request:
                return True
            if not other.granted:
                request.granted = False
                self._running -= 1
                self._wake_locked()
                return False
        return True

    def _wake_locked(self) -> None:
        """Free slots to the first requests in order that hold none."""
        for request in self._order:
            if self._running >= self.slots:
                return
            if not request.granted:
                request.granted = request.started = True
                self._running += 1
                if request.woken is not None:
                    request.woken.get_loop().call_soon_threadsafe(_wake, request.woken)


def _refuse(woken: asyncio.Future, refused: DecodeBacklogError) -> None:
    if not woken.done():
        woken.set_exception(refused)


def _wake(woken: asyncio.Future) -> None:
    if not woken.done():  # cancelled meanwhile: its request passes the slot on as it leaves
        woken.set_result(None)


def _timed(fn: Callable[..., T], *args: Any, **kwargs: Any) -> tuple[T, float]:
    """`fn`'s result and the CPU seconds this thread spent on it."""
    start = time.thread_time()
    result = fn(*args, **kwargs)
    return result, time.thread_time() - start


class Decoding:
    """A request's turn: its decodes run on worker threads one at a time, each holding a slot, and the slot is
    held until the one in hand ends, even when the request is cancelled meanwhile (a thread cannot be stopped
    mid-image)."""

    def __init__(self, queue: ImageQueue, request: _Request) -> None:
        self._queue = queue
        self._request = request
        self._in_hand: asyncio.Future | None = None
        self._closed = False

    async def slot(self) -> None:
        """Until the request holds a slot: at once when it still does and no request served before it waits, else
        when it is the first in order that waits. Raises the refusal if it was refused while waiting."""
        request = self._request
        queue = self._queue
        with queue._lock:
            if request.refused is not None:
                raise request.refused
            if request.granted and queue._keeps_slot_locked(request):
                return
            request.woken = woken = asyncio.get_running_loop().create_future()
        try:
            await woken
        finally:
            request.woken = None

    async def run(self, pixels: int, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """`fn(*args, **kwargs)` on a worker thread, decoding `pixels` of the request's images, once the request
        holds a slot. Timed in the thread's own CPU seconds: wall time counted the wait for a thread and for the
        GIL (a big body's parse holds it throughout), and one decode timed beside six parses set a rate that
        refused legal requests."""
        await self.slot()
        task = asyncio.ensure_future(asyncio.to_thread(_timed, fn, *args, **kwargs))
        self._in_hand = task
        result, seconds = await asyncio.shield(task)
        self._in_hand = None
        self._queue._done(self._request, pixels, seconds)
        return result

    def close(self) -> None:
        """Leave the queue and give the slot back: now, or once the decode in hand ends."""
        if self._closed:
            return
        self._closed = True
        task = self._in_hand
        if task is None or task.done():
            self._queue._leave(self._request)
            return

        def ended(t: asyncio.Future) -> None:
            if not t.cancelled():
                t.exception()  # retrieved: the request that started it has gone
            self._queue._leave(self._request)

        task.add_done_callback(ended)

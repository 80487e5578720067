"""Image requests of one model decoded first-in first-out, a few at a time (`DECODE_SLOTS`).

Why: decoding a page image is the slow part of an image request (seconds per 36-Mpx page on one core), and it
happens before the scheduler sees the request. With every request decoding at once through the worker threads
they all share, six concurrent requests of 40 large pages shared the cores, all finished decoding together after
their deadline and all ended 504 (120 s), where one alone took 50 s; none was refused at once, as the scheduler
refuses what would miss its deadline (docs/reliability.md). Here the earliest requests decode first and finish;
later ones wait their turn without decoding a pixel, and a request whose deadline passes while it waits ends as a
deadline passed in the scheduler's queue does. Decoding is timed per pixel, so once the rate is known a request
whose images would not be decoded in time behind those queued before it is refused at once (503, Retry-After).
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any, TypeVar

from openrerank.core.cpus import available_cpus
from openrerank.engine.errors import QueueFullError
from openrerank.engine.rates import DEADLINE_SHARE

T = TypeVar("T")

#: Image requests a model decodes at once: a request decodes one image at a time (one core), and the rest of
#: the cores run the model's batches and the other requests' tokenization.
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
    """The request's images would not be decoded before its deadline behind the image requests queued before
    it: refused at once (503/429, Retry-After) instead of decoding and ending 504."""

    def __init__(self, estimate: float, left: float, retry_after: float) -> None:
        QueueFullError.__init__(self, "", "", retry_after)
        self.args = (f"server overloaded: this request's images would be decoded in about {estimate:.0f} s behind "
                     f"the image requests queued before it, too close to its deadline in {max(0.0, left):.0f} s "
                     f"(work is planned into at most {DEADLINE_SHARE:.0%} of the time left); retry later",)


class _Waiter:
    __slots__ = ("deadline", "granted", "pixels", "woken")

    def __init__(self, woken: asyncio.Future, pixels: int, deadline: float) -> None:
        self.woken = woken
        self.pixels = pixels
        self.deadline = deadline
        self.granted = False  # given a slot (its wake-up may still be on its way)


class ImageQueue:
    """One model's image requests: `slots` decode at a time, the rest wait first-in first-out."""

    def __init__(self, slots: int = DECODE_SLOTS, clock: Callable[[], float] = time.monotonic) -> None:
        self.slots = slots
        self.seconds_per_pixel: float | None = None  # measured on the decodes so far
        self._clock = clock
        self._lock = threading.Lock()  # the state is touched from the event loop and from decode callbacks
        self._waiting: deque[_Waiter] = deque()
        self._running = 0
        self._pixels = 0  # pixels queued or decoding, not yet decoded

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def refusal(self, pixels: int, deadline: float) -> DecodeBacklogError | None:
        """Why a request of `pixels` would miss `deadline` decoding behind the queue, or None; None until a rate
        is measured, and None with nothing queued ahead: a request that decodes at once is left to its deadline,
        as a text request is, and its decode measures the rate afresh (a rate measured under contention once
        refused a legal request on an idle server, every time: refused, it never corrected the rate)."""
        with self._lock:
            rate = self.seconds_per_pixel
            backlog = self._pixels / self.slots
        if rate is None or backlog <= 0:  # nothing ahead: it decodes now, and its decode measures the rate afresh
            return None
        estimate = (backlog + pixels) * rate
        left = deadline - self._clock()
        if estimate <= DEADLINE_SHARE * left:
            return None
        return DecodeBacklogError(estimate, left, min(60.0, max(1.0, backlog * rate)))

    @asynccontextmanager
    async def turn(self, pixels: int, deadline: float) -> AsyncIterator[Decoding]:
        """Wait for a slot, first come first served, and hold it while the request decodes (`Decoding.run`).
        Refused (DecodeBacklogError) before waiting if it would not be decoded within its deadline behind the
        queue, or while it waits, as the rate is measured; a request cancelled while waiting (its client gone,
        its deadline passed) leaves the queue having decoded nothing."""
        refused = self.refusal(pixels, deadline)
        if refused is not None:
            raise refused
        waiter = _Waiter(asyncio.get_running_loop().create_future(), pixels, deadline)
        with self._lock:
            self._pixels += pixels
            self._waiting.append(waiter)
            self._wake_locked()
        try:
            await waiter.woken
        except BaseException:
            with self._lock:
                if waiter.granted:  # given the slot as it was cancelled: pass it on
                    self._running -= 1
                    self._wake_locked()
                    self._pixels -= pixels
                elif waiter in self._waiting:  # (one refused while waiting has left it, and the backlog, already)
                    self._waiting.remove(waiter)
                    self._pixels -= pixels
            raise
        decoding = Decoding(self, pixels)
        try:
            yield decoding
        finally:
            decoding.close()

    def _done(self, pixels: int, seconds: float) -> None:
        """`pixels` decoded in `seconds`: the rate moves, the backlog shrinks, and a waiting request that would
        no longer be decoded in time is refused now, not when its deadline has passed."""
        with self._lock:
            self._pixels -= pixels
            if pixels <= 0:
                return
            rate = seconds / pixels
            old = self.seconds_per_pixel
            self.seconds_per_pixel = rate = rate if old is None else old + RATE_WEIGHT * (rate - old)
            now = self._clock()
            behind = 0  # pixels of the waiters after the one at hand
            for waiter in reversed(list(self._waiting)):
                ahead = self._pixels - behind - waiter.pixels
                estimate = (ahead / self.slots + waiter.pixels) * rate
                left = waiter.deadline - now
                behind += waiter.pixels
                if estimate > DEADLINE_SHARE * left:
                    self._waiting.remove(waiter)
                    self._pixels -= waiter.pixels
                    behind -= waiter.pixels
                    refused = DecodeBacklogError(estimate, left, min(60.0, max(1.0, ahead / self.slots * rate)))
                    waiter.woken.get_loop().call_soon_threadsafe(_refuse, waiter.woken, refused)

    def _release(self, undecoded: int) -> None:
        with self._lock:
            self._pixels -= undecoded
            self._running -= 1
            self._wake_locked()

    def _wake_locked(self) -> None:
        while self._waiting and self._running < self.slots:
            waiter = self._waiting.popleft()
            waiter.granted = True
            self._running += 1
            waiter.woken.get_loop().call_soon_threadsafe(_wake, waiter.woken)


def _refuse(woken: asyncio.Future, refused: DecodeBacklogError) -> None:
    if not woken.done():
        woken.set_exception(refused)


def _wake(woken: asyncio.Future) -> None:
    if not woken.done():  # cancelled meanwhile: its waiter passes the slot on
        woken.set_result(None)


def _timed(fn: Callable[..., T], *args: Any, **kwargs: Any) -> tuple[T, float]:
    """`fn`'s result and the CPU seconds this thread spent on it."""
    start = time.thread_time()
    result = fn(*args, **kwargs)
    return result, time.thread_time() - start


class Decoding:
    """A request's turn: its decodes run on worker threads, and the slot is held until the one in hand ends,
    even when the request is cancelled meanwhile (a thread cannot be stopped mid-image)."""

    def __init__(self, queue: ImageQueue, pixels: int) -> None:
        self._queue = queue
        self.left = pixels  # pixels of this request not yet decoded
        self._in_hand: asyncio.Future | None = None
        self._closed = False

    async def run(self, pixels: int, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """`fn(*args, **kwargs)` on a worker thread, decoding `pixels` of the request's images. Timed in the
        thread's own CPU seconds: wall time counted the wait for a thread and for the GIL (a big body's parse
        holds it throughout), and one decode timed beside six parses set a rate that refused legal requests."""
        task = asyncio.ensure_future(asyncio.to_thread(_timed, fn, *args, **kwargs))
        self._in_hand = task
        result, seconds = await asyncio.shield(task)
        self._in_hand = None
        self._queue._done(pixels, seconds)
        self.left -= pixels
        return result

    def close(self) -> None:
        """Give the slot back: now, or once the decode in hand ends."""
        if self._closed:
            return
        self._closed = True
        task = self._in_hand
        if task is None or task.done():
            self._queue._release(self.left)
            return

        def ended(t: asyncio.Future) -> None:
            if not t.cancelled():
                t.exception()  # retrieved: the request that started it has gone
            self._queue._release(self.left)

        task.add_done_callback(ended)

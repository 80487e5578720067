"""Give the heap's free memory back to the OS after batches (glibc's `malloc_trim`).

Every new batch shape makes the runtimes allocate new tensor sizes, and glibc keeps what they free in its
arenas instead of returning it: measured on the MiniLM-L6 cross-encoder (AMD EPYC, 2 threads), PyTorch went
from 483 to 1,380 MiB RSS over 200 distinct (rows, width) shapes and stayed there, OpenVINO from 266 to 653
MiB over 400, although replaying shapes already seen added nothing. `malloc_trim(0)` after a batch kept
PyTorch at 470 MiB (and OpenVINO at 459) at no measurable cost in tokens/s; one trim takes ~8 ms after a
PyTorch batch, so it runs at most once per `interval_s`, which bounds its cost below 1% of a busy worker's
time. Where the C library is not glibc (musl, macOS) it does nothing.

Work that never reaches a batch frees memory too: a request refused while its body was read, parsed, tokenized
or its images decoded (400, 413, 499, a deadline in preparation). Trimming only after batches left that in RSS
until the next batch ran (1,150 MiB idle for 30 s after such requests, 463 MiB after one tiny batch), so a
memory-limited container looked as if it leaked. So the servers count requests in flight (`request()`), and when
the last one ends the heap is trimmed once more, on a thread of its own, `IDLE_SETTLE_S` later and no sooner than
`interval_s` after the last trim; a request arriving meanwhile puts it off until the process is idle again.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

log = logging.getLogger(__name__)

#: Seconds the process must stay idle before the idle trim: what the ending request's callers free goes first.
IDLE_SETTLE_S = 0.1


def _glibc_trim() -> Callable[[], object] | None:
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        trim = libc.malloc_trim if libc is not None else None
    except (OSError, AttributeError):
        return None
    if trim is None:
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return lambda: trim(0)


def _in_thread(delay: float, fn: Callable[[], None]) -> None:
    timer = threading.Timer(delay, fn)
    timer.daemon = True
    timer.start()


class HeapTrimmer:
    """Trims the process heap after a batch and when the server goes idle, at most once per `interval_s`
    (shared by every worker and server)."""

    def __init__(self, interval_s: float = 1.0, trim: Callable[[], object] | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 schedule: Callable[[float, Callable[[], None]], None] = _in_thread) -> None:
        """`schedule(delay, fn)` runs the idle trim later, off the caller's thread (a timer thread)."""
        self.interval_s = interval_s
        self._trim = trim
        self._clock = clock
        self._schedule = schedule
        self._last = float("-inf")
        self._lock = threading.Lock()
        self._busy = 0  # requests in flight
        self._idle_due = False  # an idle trim is scheduled

    def after_batch(self) -> bool:
        """Trim if the last trim is `interval_s` old; True when it trimmed."""
        if self._trim is None:
            return False
        with self._lock:
            now = self._clock()
            if now - self._last < self.interval_s:
                return False
            self._last = now
        self._call_trim()
        return True

    @contextmanager
    def request(self) -> Iterator[None]:
        """A request in flight; when the last one ends, an idle trim is scheduled (cheap: a counter, and at most
        one timer thread waiting at a time)."""
        with self._lock:
            self._busy += 1
        try:
            yield
        finally:
            with self._lock:
                self._busy -= 1
                due = self._trim is not None and not self._busy and not self._idle_due
                if due:
                    self._idle_due = True
                    delay = max(IDLE_SETTLE_S, self._last + self.interval_s - self._clock())
            if due:
                self._later(delay)

    def _idle_trim(self) -> None:
        with self._lock:
            if self._busy:  # busy again: its end schedules the next idle trim
                self._idle_due = False
                return
            wait = self._last + self.interval_s - self._clock()
            if wait <= 0:
                self._idle_due = False
                self._last = self._clock()
        if wait > 0:  # a batch trimmed meanwhile: keep to the interval
            self._later(wait)
            return
        self._call_trim()

    def _later(self, delay: float) -> None:
        """Schedule the idle trim; best effort: where no thread can start (the process at its thread limit,
        `ulimit -u`) it is skipped, and the next request's end schedules it again. Before, the error escaped
        into a request that had been answered (an "unhandled" error line each) and the flag stayed set, so no
        idle trim ran again in the process's life."""
        try:
            self._schedule(delay, self._idle_trim)
        except RuntimeError as exc:  # "can't start new thread"
            with self._lock:
                self._idle_due = False
            log.debug("idle heap trim skipped: %s", exc)

    def _call_trim(self) -> None:
        assert self._trim is not None
        self._trim()


#: The process's one trimmer: trimming is process-wide, so several models' workers share its interval.
HEAP = HeapTrimmer(trim=_glibc_trim())

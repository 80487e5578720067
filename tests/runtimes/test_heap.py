"""The heap trimmer: freed heap memory goes back to the OS after a batch, at most once per interval."""

from __future__ import annotations

import os

import pytest

from openrerank.runtimes.heap import HEAP, IDLE_SETTLE_S, HeapTrimmer


def test_trims_at_most_once_per_interval():
    calls, now = [], [100.0]
    trimmer = HeapTrimmer(interval_s=1.0, trim=lambda: calls.append(now[0]), clock=lambda: now[0])
    for t in (100.0, 100.2, 100.9, 101.0, 101.5, 103.0):
        now[0] = t
        trimmer.after_batch()
    assert calls == [100.0, 101.0, 103.0]
    assert HeapTrimmer(trim=None).after_batch() is False  # not glibc: nothing to call


def _rss_mib() -> float:
    with open(f"/proc/{os.getpid()}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


@pytest.mark.skipif(HEAP._trim is None or not os.path.exists("/proc/self/status"), reason="needs glibc and /proc")
def test_freed_heap_memory_goes_back_to_the_os():
    # 300 MiB of 96 KiB blocks (below glibc's mmap threshold: they come from the heap), freed while a block
    # allocated after them stays: glibc keeps the free space below it until the heap is trimmed
    blocks = [bytearray(96 * 1024) for _ in range(3200)]
    keep = bytearray(96 * 1024)
    before = _rss_mib()
    del blocks
    freed = _rss_mib()
    trimmer = HeapTrimmer(interval_s=0.0, trim=HEAP._trim)
    assert trimmer.after_batch()
    after = _rss_mib()
    assert freed > before - 100, (before, freed)  # the control: freeing alone returned (almost) nothing
    assert after < freed - 200, (before, freed, after)
    del keep


def test_trims_once_the_last_request_in_flight_ends():
    """Requests refused before any batch (400, 413, 499) free memory that only a trim gives back: the trimmer
    trims when the process goes idle, off the request's thread, within the interval, and not while busy."""
    calls, later, now = [], [], [100.0]
    trimmer = HeapTrimmer(interval_s=1.0, trim=lambda: calls.append(now[0]), clock=lambda: now[0],
                          schedule=lambda delay, fn: later.append((delay, fn)))
    with trimmer.request(), trimmer.request():
        pass
    assert calls == [] and [d for d, _ in later] == [IDLE_SETTLE_S]  # one idle trim, when the last one ended
    with trimmer.request():  # busy again before it ran: put off until this one ends
        later.pop()[1]()
        assert calls == []
    now[0] = 100.5
    later.pop()[1]()
    assert calls == [100.5]  # one trim
    with trimmer.request():
        pass
    assert later[-1][0] == 1.0  # a trim half a second ago: the next waits out the interval
    now[0] = 100.9
    later.pop()[1]()  # run early (a batch may have trimmed since it was scheduled): it waits out the rest
    assert calls == [100.5] and later.pop()[0] == pytest.approx(0.6)
    with HeapTrimmer(trim=None).request():  # not glibc: nothing scheduled
        pass


def test_no_thread_for_the_idle_trim_skips_it_and_the_next_request_schedules_again():
    """At the process's thread limit (`ulimit -u`) the timer thread cannot start: the request that ended is not
    failed by it, and the next one's end schedules the idle trim again (before, none ran again, ever)."""
    later, fail = [], [True]

    def schedule(delay, fn):
        if fail[0]:
            raise RuntimeError("can't start new thread")
        later.append(fn)

    trimmer = HeapTrimmer(interval_s=0.0, trim=lambda: None, schedule=schedule)
    with trimmer.request():
        pass  # its end raised into the request before
    fail[0] = False
    with trimmer.request():
        pass
    assert len(later) == 1

"""`benchmarks/side_by_side.py`: two servers at once are each counted only while both are sent requests, on fake
servers sharing a fake machine (the real run needs minutes and an idle machine)."""

from __future__ import annotations

import importlib.util
import threading
import time
from pathlib import Path

import httpx
import pytest

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "side_by_side.py"
_spec = importlib.util.spec_from_file_location("side_by_side", _PATH)
side_by_side = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(side_by_side)


def test_the_rate_of_each_client_is_counted_over_the_window_both_were_sending():
    """The finding's example: while both run, A gets 0.7 of the machine and B 0.3 (one request = 1 s alone), 4
    requests each. Timed to its own end, B ran alone after A's end at 4 / 0.7 = 5.71 s and read 4 requests in 8 s,
    0.5x. Now A keeps sending until B's 4th request ends at 13.33 s, and each counts what it did by then; A's
    request across that edge counts by its part inside."""
    a = [(i / 0.7, (i + 1) / 0.7) for i in range(10)]  # the 10th ends at 14.29 s, after B's last
    b = [(i / 0.3, (i + 1) / 0.3) for i in range(4)]
    assert side_by_side.common_window_rates([a, b], 1) == pytest.approx([0.7, 0.3])
    assert side_by_side.common_window_rates([a, b], 100) == pytest.approx([70.0, 30.0])
    with pytest.raises(ValueError, match="never sent at the same time"):
        side_by_side.common_window_rates([[(0.0, 1.0)], [(2.0, 3.0)]], 1)


class _Machine:
    """Fake servers on one fake machine: a request needs `work` seconds of the machine alone; while another server
    has a request in flight, each gets its fixed `share` of the machine, else all of it."""

    def __init__(self, work: float, shares: dict[str, float]) -> None:
        self.work, self.shares, self.busy, self.lock = work, shares, dict.fromkeys(shares, 0), threading.Lock()

    def transport(self, name: str) -> httpx.MockTransport:
        def handle(_request: httpx.Request) -> httpx.Response:
            with self.lock:
                self.busy[name] += 1
            done, last = 0.0, time.perf_counter()
            try:
                while done < self.work:
                    time.sleep(0.001)  # compute: the fake server's progress is the time it had, measured
                    now = time.perf_counter()
                    with self.lock:
                        alone = not any(n for other, n in self.busy.items() if other != name)
                    done += (now - last) * (1.0 if alone else self.shares[name])
                    last = now
            finally:
                with self.lock:
                    self.busy[name] -= 1
            return httpx.Response(200, json={"rankings": []})

        return httpx.MockTransport(handle)


def test_an_asymmetric_fight_is_reported_as_such():
    """Server B gets 0.3 of the machine while A runs; each client sends 4 requests. Before, A's client stopped at
    its end and B's then ran alone, reading ~0.5x; now A's keeps sending until B's is through, and B reads ~0.3x."""
    machine = _Machine(work=0.04, shares={"a": 0.7, "b": 0.3})
    bodies = [b"{}"] * 4
    alone = side_by_side.run_clients(["http://a"], bodies, 100, [machine.transport("a")])[0]
    assert alone == pytest.approx(100 / 0.04, rel=0.2)
    pair = side_by_side.run_clients(["http://a", "http://b"], bodies, 100,
                                    [machine.transport("a"), machine.transport("b")])
    a, b = (rate / alone for rate in pair)
    assert b == pytest.approx(0.3, abs=0.08) and a == pytest.approx(0.7, abs=0.12)


def test_a_client_that_fails_ends_the_run_instead_of_keeping_the_other_sending():
    def refuse(_request: httpx.Request) -> httpx.Response:
        return httpx.Response(503, text="overloaded")

    machine = _Machine(work=0.01, shares={"a": 0.5})
    with pytest.raises(AssertionError, match="overloaded"):
        side_by_side.run_clients(["http://a", "http://b"], [b"{}"] * 2, 1,
                                 [machine.transport("a"), httpx.MockTransport(refuse)])

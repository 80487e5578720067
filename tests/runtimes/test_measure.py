"""`time_runtimes` takes turns: a burst of other work on the machine slows every candidate a little, not one of
them a lot, so the ranking survives it (the fake runtimes' costs are sleeps: the test checks an order with a
5x margin, not a speed)."""

from __future__ import annotations

import time

from openrerank.runtimes.measure import time_runtimes


class FakeRuntime:
    """A runtime whose batch costs `cost` seconds, plus `extra` while the machine is busy (until `busy_until`)."""

    input_names = ("input_ids", "attention_mask")

    def __init__(self, cost: float, machine: dict) -> None:
        self.cost = cost
        self.machine = machine

    def run(self, features) -> None:
        busy = time.monotonic() < self.machine["busy_until"]
        time.sleep(self.cost + (self.machine["extra"] if busy else 0.0))


def test_a_burst_of_other_work_does_not_decide_the_ranking():
    shapes = ((2, 8), (1, 16))

    def rank(together: bool) -> list[float]:
        machine = {"busy_until": 0.0, "extra": 0.05}
        fast, slow = FakeRuntime(0.005, machine), FakeRuntime(0.010, machine)
        machine["busy_until"] = time.monotonic() + 0.5  # a burst longer than one candidate's timing alone
        if together:
            rates = time_runtimes([fast, slow], shapes, 100, seconds=0.3)
        else:  # one after the other: the first candidate gets the whole burst
            rates = [time_runtimes([rt], shapes, 100, seconds=0.3)[0] for rt in (fast, slow)]
        return [r.pairs_per_s for r in rates]

    fast, slow = rank(together=False)
    assert fast < slow  # the control: timed alone in turn, the faster engine ranked last
    fast, slow = rank(together=True)
    assert fast > 1.5 * slow, (fast, slow)

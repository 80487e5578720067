"""`openrerank bench --scale-out`'s arithmetic on made-up rounds: each router's configuration is compared with
one replica in the same round and its efficiency divides by its own replica count (the run itself needs Ray
and minutes per round; docs/benchmarks.md has its figures)."""

from __future__ import annotations

import pytest
from openrerank_bench.scaleout import replica_count, summarize


def _round(config: str, r: int, rate: float) -> dict:
    return {"config": config, "round": r, "requests_per_s": rate, "p50_ms": 1000.0, "p99_ms": 2000.0,
            "failures": 0}


def test_router_configurations_are_compared_with_one_replica_round_by_round():
    configs = ["direct", "ray-1", "ray-2/least-busy", "ray-3/power-of-two"]
    rates = {"direct": (1.0, 0.8), "ray-1": (1.0, 0.8), "ray-2/least-busy": (1.8, 1.6),
             "ray-3/power-of-two": (2.4, 2.0)}
    rounds = [_round(c, r + 1, rates[c][r]) for r in range(2) for c in configs]
    out = summarize(rounds, configs)
    two, three = out["ray-2/least-busy"], out["ray-3/power-of-two"]
    assert two["x_one_replica_per_round"] == [1.8, 2.0]
    assert two["x_one_replica"] == pytest.approx(1.7 / 0.9)
    assert two["efficiency"] == pytest.approx(1.7 / 0.9 / 2)
    assert three["x_one_replica_per_round"] == [2.4, 2.5]
    assert three["efficiency"] == pytest.approx(2.2 / 0.9 / 3)
    assert out["ray-1"]["x_direct_per_round"] == [1.0, 1.0]


@pytest.mark.parametrize(("config", "n"), [("ray-1", 1), ("ray-3", 3), ("ray-2/least-busy", 2),
                                           ("ray-12/power-of-two", 12)])
def test_replica_count_reads_the_configuration_name(config, n):
    assert replica_count(config) == n

"""What the machine was like while timing (`runtimes/timing_load.py`); the rule's effect on records is tested with
`measure_candidates` in test_measure.py."""

from __future__ import annotations

import pytest


@pytest.fixture
def shipped_rule(monkeypatch):
    """The shipped threshold (tests/conftest.py turns the rule off for real timings)."""
    from openrerank.runtimes import timing_load

    monkeypatch.setattr(timing_load, "BUSY_OTHERS", 0.25)


def test_other_processes_cpu_time_is_read_for_this_process_cpus_only(tmp_path, monkeypatch):
    import os

    from openrerank.runtimes.timing_load import busy_cpu_seconds

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 2})
    stat = tmp_path / "stat"
    stat.write_text("cpu  900 0 90 0 0 0 0 0 0 0\n"
                    "cpu0 100 1 10 500 7 1 1 2 0 0\n"
                    "cpu1 400 0 40 0 0 0 0 0 0 0\n"
                    "cpu2 200 0 20 300 0 0 0 0 0 0\nintr 5\n")
    tick = os.sysconf("SC_CLK_TCK")
    assert busy_cpu_seconds(stat) == ((115 + 220) / tick, 2)
    assert busy_cpu_seconds(tmp_path / "none") is None


def test_a_records_timing_conditions_are_read_back_and_a_malformed_one_is_not_trusted(tmp_path, shipped_rule):
    """A record is a file on a shared volume that an older version, or a hand, may have written: conditions that
    are not finite numbers, or none at all, read as "not said" (None), never as a quiet or a busy timing; and
    only a record that says `provisional` makes the next start time again."""
    import json

    from openrerank.runtimes.timing_load import TimingLoad, Usage, provisional_before

    busy = TimingLoad.taken(Usage(cpu_seconds=1.0, wall_seconds=1.0, others_seconds=1.0, span=2.0, cpus=2), 2, 3.0,
                            None)
    assert busy.under_load and busy.provisional and busy.tries == 1
    record = busy.as_record()
    assert TimingLoad.of_record(record) == TimingLoad(0.5, 0.5, 3.0, 1, busy.timing_id, 2, 2)
    for bad in ({**record, "others_cpu_share": "high"}, {**record, "load_average": float("nan")},
                {**record, "tries_under_load": "1"}, {"provisional": True}, {**record, "others_cpus": 0},
                {**record, "others_cpus": 2.0}, {**record, "threads": True}):
        assert TimingLoad.of_record(bad) is None, bad
    path = tmp_path / "record.json"
    path.write_text(json.dumps(record))
    assert provisional_before(path) == TimingLoad.of_record(record)
    path.write_text(json.dumps({**record, "provisional": False}))
    assert provisional_before(path) is None
    path.write_text("not json")
    assert provisional_before(path) is None


def judged(cpus: int, others_cores: float, threads: int):
    """`TimingLoad.taken` for 10 s of timing with `threads` threads on `cpus` CPUs while other processes kept
    `others_cores` of them busy, and the same timing as its record reads back."""
    from openrerank.runtimes.timing_load import TimingLoad, Usage

    usage = Usage(cpu_seconds=9.0 * threads, wall_seconds=10.0, others_seconds=10.0 * others_cores,
                  span=10.0 * cpus, cpus=cpus)
    taken = TimingLoad.taken(usage, threads, 1.0, None)
    return taken, TimingLoad.of_record(taken.as_record())


@pytest.mark.parametrize(("cpus", "others_cores", "threads"), [
    (64, 20.0, 2),  # a pod with a 2-CPU quota on a 64-core node (the affinity set is the node): 31% of it busy
    (2, 0.98, 1),  # --threads 1 on 2 cores, the other core busy (49%): the documented two-servers layout
])
def test_other_processes_on_cores_the_timing_left_spare_are_not_load(cpus, others_cores, threads, shipped_rule):
    """Their share of every CPU in the affinity set said "under load" (a warning, and timing again at the next
    starts) though the timing's threads had cores of their own the whole time."""
    for load in judged(cpus, others_cores, threads):
        assert not load.under_load and not load.provisional and load.tries == 0, load
        assert load.others_share == round(others_cores / cpus, 3)


def test_busy_cores_among_a_full_width_timings_threads_are_load(shipped_rule):
    """--threads 16 on 16 cores with 3 cores busy elsewhere is 19% of the CPUs: it read as quiet and the record was
    kept for good, though every one of the barrier-synchronised threads' cores was needed and 3 were shared."""
    for load in judged(16, 3.0, 16):
        assert load.under_load and load.provisional and load.tries == 1, load
        assert load.contended_cores == pytest.approx(3.0, abs=0.01)
    assert "3.0 cores' worth on those its 16 threads ran on" in load.text()


def test_two_threads_on_two_cores_are_under_load_past_half_a_core_as_before(shipped_rule):
    for others_cores, busy in ((0.48, False), (0.52, True), (1.0, True)):
        for load in judged(2, others_cores, 2):
            assert (load.under_load, load.provisional) == (busy, busy), (others_cores, load)


def test_a_record_without_its_cpu_count_is_judged_by_the_share_of_all_cpus(shipped_rule):
    """How a record written before the count was kept says it: the count is not guessed."""
    from openrerank.runtimes.timing_load import TimingLoad

    taken, _ = judged(64, 20.0, 2)
    record = {key: value for key, value in taken.as_record().items() if key != "others_cpus"}
    old = TimingLoad.of_record(record)
    assert old.cpus is None and old.contended_cores is None and old.under_load  # 31% > 25%
    assert "of the CPUs meanwhile" in old.text()

"""What the machine was like while timing (`runtimes/timing_load.py`); the rule's effect on records is tested with
`measure_candidates` in test_measure.py."""

from __future__ import annotations


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


def test_a_records_timing_conditions_are_read_back_and_a_malformed_one_is_not_trusted(tmp_path, monkeypatch):
    """A record is a file on a shared volume that an older version, or a hand, may have written: conditions that
    are not finite numbers, or none at all, read as "not said" (None), never as a quiet or a busy timing; and
    only a record that says `provisional` makes the next start time again."""
    import json

    from openrerank.runtimes import timing_load
    from openrerank.runtimes.timing_load import TimingLoad, Usage, provisional_before

    monkeypatch.setattr(timing_load, "BUSY_OTHERS", 0.25)  # the shipped value (tests/conftest.py turns it off)
    busy = TimingLoad.taken(Usage(cpu_seconds=1.0, wall_seconds=1.0, others_seconds=1.0, span=2.0), 2, 3.0, None)
    assert busy.under_load and busy.provisional and busy.tries == 1
    record = busy.as_record()
    assert TimingLoad.of_record(record) == TimingLoad(0.5, 0.5, 3.0, 1, busy.timing_id)
    for bad in ({**record, "others_cpu_share": "high"}, {**record, "load_average": float("nan")},
                {**record, "tries_under_load": "1"}, {"provisional": True}):
        assert TimingLoad.of_record(bad) is None, bad
    path = tmp_path / "record.json"
    path.write_text(json.dumps(record))
    assert provisional_before(path) == TimingLoad.of_record(record)
    path.write_text(json.dumps({**record, "provisional": False}))
    assert provisional_before(path) is None
    path.write_text("not json")
    assert provisional_before(path) is None

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

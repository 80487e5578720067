"""The served speed kept across starts: what a record holds, what is ignored, what keys it."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from openrerank.engine.knee_fit import KNEE_RANGE
from openrerank.engine.speed_record import KeptSpeed, SpeedRecord, speed_dir
from openrerank.runtimes.artifact_cache import CACHE_ENV


def test_a_saved_speed_is_loaded_with_what_it_was_fitted_for(tmp_path: Path) -> None:
    record = SpeedRecord(tmp_path / "k" / "key.json", 2304.0, {"engine": "openvino-fp32-cpu"})
    assert record.load() is None  # nothing kept yet
    record.save(1190.0, 6100.0, 23.456)
    assert record.load() == KeptSpeed(1190.0, 6100.0)
    kept = json.loads(record.path.read_text())
    assert kept == {"knee": 1190.0, "work_per_second": 6100.0, "flops_knee": 2304.0, "batches": 23.5,
                    "engine": "openvino-fp32-cpu"}
    assert not [p for p in record.path.parent.iterdir() if p.name.startswith(".")]  # no temporary file left
    record.save(1095.0, None, 40)  # a later save replaces it; a rate never measured stays unknown
    assert SpeedRecord(record.path, 2304.0).load() == KeptSpeed(1095.0, None)


@pytest.mark.parametrize("content", [
    "{not json", "[]", '{"knee": "many"}', '{"flops_knee": 2304.0}', '{"knee": null, "flops_knee": 2304.0}',
    '{"knee": 1000, "flops_knee": 2304.0, "work_per_second": "fast"}',
])
def test_a_record_that_cannot_be_read_is_ignored(tmp_path: Path, content: str) -> None:
    path = tmp_path / "key.json"
    path.write_text(content)
    assert SpeedRecord(path, 2304.0).load() is None


@pytest.mark.parametrize("rate", [0.0, -5.0, float("inf"), float("nan")])
def test_a_rate_that_is_no_speed_is_dropped_and_the_knee_kept(tmp_path: Path, rate: float) -> None:
    record = SpeedRecord(tmp_path / "key.json", 2304.0)
    record.save(1000.0, rate, 10)
    assert record.load() == KeptSpeed(1000.0, None)


def test_a_knee_fitted_for_other_flops_or_out_of_range_is_ignored(tmp_path: Path) -> None:
    record = SpeedRecord(tmp_path / "key.json", 2304.0)
    record.save(1000.0, 5000.0, 10)
    assert SpeedRecord(record.path, 2048.0).load() is None  # fitted against another FLOP knee
    for knee in (2304.0 / KNEE_RANGE - 1, 2304.0 * KNEE_RANGE + 1):  # outside what the fit may offer
        record.save(knee, 5000.0, 10)
        assert record.load() is None
    record.save(2304.0 / KNEE_RANGE, 5000.0, 10)
    assert record.load() == KeptSpeed(2304.0 / KNEE_RANGE, 5000.0)


def test_a_cache_that_cannot_be_written_costs_only_the_record(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    record = SpeedRecord(blocker / "speed" / "key.json", 2304.0)  # its folder would sit under a file
    record.save(1000.0, 5000.0, 10)  # no error
    record.save(900.0, 5000.0, 10)  # nor a second attempt
    assert record.load() is None


def loaded(model_dir: Path, *, engine: str = "onnx-fp32-cpu", lanes: int = 1, threads: int = 2,
           knee: float | None = 2304.0, window: int = 512, options: dict | None = None) -> SimpleNamespace:
    """The parts of a `LoadedModel` that decide its speed."""
    runtime = SimpleNamespace(description=engine, lanes=lanes, threads=threads)
    return SimpleNamespace(knee=knee, scorer=SimpleNamespace(runtime=runtime), max_length=window,
                           spec=SimpleNamespace(path=model_dir, options=options or {}),
                           family=SimpleNamespace(id="cross-encoder"))


def test_the_record_is_keyed_by_the_model_engine_and_machine(tmp_path: Path, monkeypatch,
                                                             tiny_model_dir, tiny_model_2label_dir) -> None:
    monkeypatch.setenv(CACHE_ENV, str(tmp_path))
    base = SpeedRecord.of(loaded(tiny_model_dir))
    assert base.path.parent == speed_dir() == tmp_path / "speed"
    assert SpeedRecord.of(loaded(tiny_model_dir)).path == base.path  # the same model here: the same record
    others = [loaded(tiny_model_2label_dir), loaded(tiny_model_dir, engine="openvino-fp32-cpu"),
              loaded(tiny_model_dir, lanes=2), loaded(tiny_model_dir, threads=1), loaded(tiny_model_dir, window=128),
              loaded(tiny_model_dir, options={"head": "yes"})]
    paths = {SpeedRecord.of(o).path for o in others}
    assert len(paths) == len(others) and base.path not in paths
    assert base.facts["cpu_flags_sha256"] and "versions" in base.facts
    assert SpeedRecord.of(loaded(tiny_model_dir, knee=None)) is None  # no attention cost to weigh: nothing kept


def test_each_arm_cpu_kind_keeps_its_own_speed(tmp_path: Path, monkeypatch, tiny_model_dir) -> None:
    """Every Arm CPU read as ('', {}): a Graviton3 sized its admission budgets by a Graviton2's kept speed."""
    from openrerank.runtimes import devices

    monkeypatch.setenv(CACHE_ENV, str(tmp_path))
    samples = Path(__file__).parents[1] / "runtimes" / "cpuinfo"
    paths = []
    try:
        for cpu in ("graviton2", "graviton3"):
            monkeypatch.setattr(devices, "CPUINFO", samples / cpu)
            devices.cpu_info.cache_clear()
            record = SpeedRecord.of(loaded(tiny_model_dir))
            assert record is not None and record.facts["cpu"].startswith("ARM Neoverse-")
            paths.append(record.path)
    finally:
        devices.cpu_info.cache_clear()
    assert paths[0] != paths[1]

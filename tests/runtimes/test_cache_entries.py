"""Cache entries on disk: what a complete one is, replacing a damaged one, and staging folders left by dead builds."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from openrerank.runtimes import cache_entries
from openrerank.runtimes.artifact_cache import ensure_artifact
from openrerank.runtimes.cache_entries import (
    STALE_STAGING_S,
    check_entry,
    publish,
    remove_own_staging,
    remove_stale_staging,
)

MODEL, META = "model.xml", "meta.json"


def _build(tmp: Path) -> dict:
    """A stand-in converter: a model file and its companion."""
    (tmp / MODEL).write_text("<net/>")
    (tmp / "model.bin").write_bytes(b"\0" * 64)
    return {}


def _ensure(cache: Path, builds: list[Path] | None = None):
    def build(tmp: Path) -> dict:
        if builds is not None:
            builds.append(tmp)
        return _build(tmp)

    return ensure_artifact(cache, "k" * 24, "fp32", model_file=MODEL, meta_file=META, facts={}, build=build,
                           what="test")


def test_an_entry_lists_the_files_it_wrote_and_a_hit_checks_them(tmp_path) -> None:
    entry = _ensure(tmp_path)
    assert entry.meta["files"] == {MODEL: 6, "model.bin": 64}
    assert check_entry(entry.path.parent, MODEL, META) == (entry.meta, None)
    assert check_entry(tmp_path / "absent", MODEL, META) == (None, None)


@pytest.mark.parametrize(("damage", "why"), [
    (lambda f: (f / "model.bin").write_bytes(b"\0" * 10), "model.bin has 10 bytes, 64 when it was built"),
    (lambda f: (f / "model.bin").unlink(), "model.bin is missing"),
    (lambda f: (f / MODEL).unlink(), "model.xml is missing"),
    (lambda f: (f / META).write_text('{"key": '), "meta.json is not JSON"),
    (lambda f: (f / META).write_text("[]"), "meta.json holds a JSON list, not an object"),
    (lambda f: (f / META).unlink(), "meta.json is missing"),
], ids=["bin-truncated", "bin-deleted", "model-deleted", "meta-not-json", "meta-a-list", "meta-deleted"])
def test_a_damaged_entry_is_built_again_once_with_a_warning(tmp_path, damage, why, caplog) -> None:
    builds: list[Path] = []
    first = _ensure(tmp_path, builds)
    damage(first.path.parent)
    assert check_entry(first.path.parent, MODEL, META) == (None, why)
    again = _ensure(tmp_path, builds)
    assert not again.cached and len(builds) == 2 and again.path == first.path
    assert check_entry(again.path.parent, MODEL, META)[0] == again.meta
    assert any(r.levelname == "WARNING" and why in r.getMessage() for r in caplog.records)
    assert _ensure(tmp_path, builds).cached and len(builds) == 2
    assert [p.name for p in tmp_path.iterdir()] == [first.path.parent.name]  # nothing set aside is left


def test_a_damaged_entry_that_cannot_be_removed_is_an_error_naming_what_is_wrong(tmp_path, monkeypatch) -> None:
    """A read-only cache volume (an export Job filled it): no bare "rename failed", no build into it."""
    first = _ensure(tmp_path)
    (first.path.parent / "model.bin").unlink()
    monkeypatch.setattr(cache_entries.os, "rename", lambda *a: (_ for _ in ()).throw(
        OSError(30, "Read-only file system")))
    with pytest.raises(OSError, match=r"is damaged \(model.bin is missing\) and cannot be removed \(Read-only"):
        _ensure(tmp_path)


def test_an_entry_from_before_files_were_listed_is_held_to_its_model_file(tmp_path) -> None:
    """A cache an older release filled (perhaps read-only) stays usable: no `files`, a non-empty model file."""
    folder = tmp_path / "old"
    folder.mkdir()
    (folder / META).write_text(json.dumps({"key": "old"}))
    (folder / MODEL).write_text("<net/>")
    assert check_entry(folder, MODEL, META) == ({"key": "old"}, None)
    (folder / MODEL).write_text("")
    assert check_entry(folder, MODEL, META) == (None, "model.xml is empty")


def test_publish_replaces_a_damaged_entry_instead_of_discarding_the_new_build(tmp_path) -> None:
    """The meta of the entry in the way was kept but its model deleted: every start threw its fresh build away."""
    final = tmp_path / "key-fp32"
    final.mkdir()
    (final / META).write_text("{}")
    ours = tmp_path / ".key-tmp"
    ours.mkdir()
    (ours / MODEL).write_text("ours")
    (ours / META).write_text("{}")
    assert publish(ours, final, META, MODEL) is True
    assert (final / MODEL).read_text() == "ours" and not ours.exists()
    assert [p.name for p in tmp_path.iterdir()] == ["key-fp32"]


def _staging(cache: Path, pid: int, start: int, host: str | None = None) -> Path:
    folder = cache / f".{'k' * 24}-fp32~{pid}-{start}@{host or socket.gethostname()}~abc123"
    folder.mkdir(parents=True)
    (folder / "model.onnx").write_bytes(b"\0" * 128)
    return folder


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_a_staging_folder_of_a_dead_writer_is_removed_by_the_next_build(tmp_path) -> None:
    """A conversion killed by SIGKILL (the OOM killer) left its staging folder, a model's size, forever."""
    me = os.getpid()
    dead = _staging(tmp_path, _dead_pid(), 1)
    reused = _staging(tmp_path, me, cache_entries._start_time(me) + 1)  # our PID, another process's start
    live = _staging(tmp_path, me, cache_entries._start_time(me))
    unnamed = tmp_path / f".{'a' * 24}-x1y2z3w4"  # a release before writers were named
    unnamed.mkdir()
    _ensure(tmp_path)
    assert not dead.exists() and not reused.exists()
    assert live.exists() and unnamed.exists()  # a live writer's; an unnamed one not older than the limit


def test_other_hosts_staging_folders_go_only_when_untouched_for_the_limit(tmp_path) -> None:
    """Several pods may share one cache volume: another host's PID says nothing here, its age does."""
    recent = _staging(tmp_path, 1, 1, host="other-pod")
    old = _staging(tmp_path, 2, 1, host="other-pod")
    then = time.time() - STALE_STAGING_S - 60
    for p in (old, old / "model.onnx"):
        os.utime(p, (then, then))
    remove_stale_staging(tmp_path)
    assert recent.exists() and not old.exists()


def test_a_server_exiting_during_a_build_removes_its_staging_folder(tmp_path, monkeypatch) -> None:
    """SIGTERM during a start's conversion: the server exits (`os._exit`) without waiting for the load, whose own
    clean-up then never runs."""
    from openrerank.server import http

    started = []

    def build(tmp: Path) -> dict:
        started.append(tmp)
        monkeypatch.setattr(http.os, "_exit", lambda status: (_ for _ in ()).throw(SystemExit(status)))
        monkeypatch.setattr(http.logging, "shutdown", lambda: None)  # pytest's log handlers stay open
        with pytest.raises(SystemExit):
            http.exit_now(0)  # the shutdown, while this build still runs
        assert not tmp.exists()
        raise RuntimeError("cut short")

    with pytest.raises(RuntimeError):
        ensure_artifact(tmp_path, "k" * 24, "fp32", model_file=MODEL, meta_file=META, facts={}, build=build,
                        what="test")
    assert started and list(tmp_path.iterdir()) == []
    remove_own_staging()  # nothing left to do


def _entry(cache: Path, key: str, facts: dict) -> Path:
    return ensure_artifact(cache, key, "fp32", model_file=MODEL, meta_file=META, facts=facts, build=_build,
                           what="test").path.parent


def _age(path: Path, seconds: float) -> None:
    then = time.time() - seconds
    os.utime(path, (then, then))


HERE = {"format": 2, "pkg": "1.0"}


def test_entries_say_what_they_were_built_with_and_whether_this_install_reads_them(tmp_path) -> None:
    """An upgrade keys new entries; the old ones are told apart by the facts they recorded (`openrerank cache`)."""
    current = _entry(tmp_path, "a" * 24, HERE)
    old_version = _entry(tmp_path, "b" * 24, {"format": 2, "pkg": "0.9"})
    old_recipe = _entry(tmp_path, "c" * 24, {"pkg": "1.0"})
    damaged = _entry(tmp_path, "d" * 24, HERE)
    (damaged / "model.bin").unlink()
    (tmp_path / "openvino").mkdir()  # another kind's folder beside the ONNX exports: not an entry
    found = {e.path: e for e in cache_entries.artifact_entries(tmp_path, "test", MODEL, META, lambda meta: HERE)}
    assert set(found) == {current, old_version, old_recipe, damaged}
    assert found[current].unusable is None and found[current].built_with == HERE
    assert found[current].size == sum(p.stat().st_size for p in current.iterdir())
    assert found[old_version].unusable == "pkg 0.9 (here 1.0)"
    assert found[old_recipe].unusable == "format unrecorded (here 2)"
    assert found[damaged].unusable == "damaged: model.bin is missing"


def test_a_hit_dates_an_entry_and_a_listing_does_not(tmp_path) -> None:
    entry = _entry(tmp_path, "a" * 24, HERE)
    for path in [entry, *entry.iterdir()]:
        _age(path, 10 * 86400)

    def used() -> float:
        return cache_entries.artifact_entries(tmp_path, "test", MODEL, META, lambda meta: HERE)[0].last_used

    assert time.time() - used() > 9 * 86400
    assert time.time() - used() > 9 * 86400  # the first listing read the metadata without dating it
    _entry(tmp_path, "a" * 24, HERE)  # a start's hit
    assert time.time() - used() < 60
    for path in entry.iterdir():  # a volume mounted noatime: reading the files dated nothing
        _age(path, 10 * 86400)
    assert time.time() - used() < 60  # the hit dated the entry itself


def test_records_are_compared_package_by_package(tmp_path) -> None:
    here = {"format": 4, "versions": {"onnxruntime": "1.2", "openvino": "3.4"}}
    (tmp_path / f"{'a' * 24}.json").write_text(json.dumps({**here, "measurements": []}))
    (tmp_path / f"{'b' * 24}.json").write_text(json.dumps({"format": 4, "versions": {"onnxruntime": "1.1",
                                                                                     "openvino": "3.4"}}))
    (tmp_path / f"{'c' * 24}.json").write_text("[1")
    (tmp_path / "notes.json").write_text("{}")  # not a record's name
    found = {e.path.name[0]: e for e in cache_entries.record_entries(tmp_path, "test", lambda record: here)}
    assert set(found) == {"a", "b", "c"}
    assert found["a"].unusable is None and found["a"].built_with == here
    assert found["b"].unusable == "onnxruntime 1.1 (here 1.2)"
    assert found["c"].unusable.startswith("unreadable: ")


def test_unfinished_builds_are_listed_a_live_one_as_building(tmp_path) -> None:
    live = tmp_path / f"{cache_entries.staging_prefix('k' * 24 + '-fp32')}abc"
    live.mkdir()
    dead = tmp_path / f".{'k' * 24}-fp32~999999999-1@{socket.gethostname()}~abc"
    dead.mkdir()
    (dead / MODEL).write_text("<half/>")
    writing, left = tmp_path / f".{'a' * 24}-x1.json", tmp_path / f".{'b' * 24}-x2.json"
    writing.write_text("{")
    left.write_text("{")
    _age(left, STALE_STAGING_S + 60)
    found = {e.path: e for e in cache_entries.unfinished_entries(tmp_path)}
    assert set(found) == {live, dead, writing, left}
    assert found[live].building and found[live].unusable is None
    assert found[writing].building
    assert not found[dead].building and found[dead].unusable == "a build that did not finish"
    assert found[dead].size == len("<half/>")
    assert not found[left].building and found[left].unusable

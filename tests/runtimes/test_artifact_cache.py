"""The converted-model cache: a model's content fingerprint (hashed once per start, again after an edit), damaged
entries built again, timing records that cannot be read."""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from openrerank.runtimes import artifact_cache, cache_entries
from openrerank.runtimes.artifact_cache import ensure_record, model_fingerprint
from openrerank.runtimes.base import probe_features
from tests.support import (
    build_tiny_bi_encoder,
    cross_encoder_network,
    folder_locked_by_another_process,
    without_a_home,
)


def test_a_fingerprint_reads_the_weights_once_and_again_after_they_change(tmp_path: Path, tiny_model_dir,
                                                                           monkeypatch) -> None:
    """One start asks for it several times (runtime timing, conversions, served speed): 7 reads of every weight
    byte for the default model from an empty cache before it was remembered."""
    model = tmp_path / "m"
    shutil.copytree(tiny_model_dir, model)
    reads: list[str] = []
    real = artifact_cache.file_sha256
    monkeypatch.setattr(artifact_cache, "file_sha256", lambda p: reads.append(Path(p).name) or real(p))
    first = model_fingerprint(model)
    assert sorted(reads) == ["config.json", "model.safetensors"]
    assert model_fingerprint(model) == model_fingerprint(Path(str(model))) == first
    assert len(reads) == 2  # remembered: nothing read again

    weights = model / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # the same size, another content
    weights.write_bytes(bytes(data))
    changed = model_fingerprint(model)
    assert changed != first and reads[2:] == ["config.json", "model.safetensors"]

    (model / "config.json").write_text((model / "config.json").read_text() + " ")
    assert model_fingerprint(model) not in (first, changed)


def test_the_weights_of_sentence_transformers_modules_are_part_of_the_fingerprint(tmp_path: Path) -> None:
    """A bi-encoder's Dense layer (`2_Dense/model.safetensors`) is part of its exported graph: a changed one
    must not be served from the export of the old one."""
    pytest.importorskip("sentence_transformers")
    path = build_tiny_bi_encoder(tmp_path / "model", dense=({"out_features": 8},))
    first = model_fingerprint(path)
    weights = path / "2_Dense" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0x01  # the same size, another content
    weights.write_bytes(bytes(data))
    assert model_fingerprint(path) != first


def _truncate(folder: Path, name: str) -> None:
    with (folder / name).open("r+b") as f:
        f.truncate(1000)


def _same_size_garbage(folder: Path, name: str) -> None:
    """Damage the size check cannot see: the runtime fails to open it (`open_cached`)."""
    path = folder / name
    path.write_bytes(b"\xff" * path.stat().st_size)


def _runtime(kind: str, model: Path, cache: Path):
    if kind == "onnx":
        from openrerank.runtimes.onnx_runtime import OnnxRuntime

        return OnnxRuntime(cross_encoder_network(model), threads=1, cache_dir=cache)
    from openrerank.runtimes.openvino_runtime import OpenVinoRuntime

    return OpenVinoRuntime(cross_encoder_network(model), threads=1, cache_dir=cache, compiled_cache=False)


def _artifact(runtime):
    return runtime.export if hasattr(runtime, "export") else runtime.conversion


@pytest.mark.parametrize(("kind", "damage"), [
    ("onnx", lambda f: _truncate(f, "model.onnx")),
    ("onnx", lambda f: (f / "model.onnx").unlink()),
    ("onnx", lambda f: (f / "export.json").write_text('{"key": ')),
    ("onnx", lambda f: _same_size_garbage(f, "model.onnx")),
    ("openvino", lambda f: (f / "model.bin").unlink()),
    ("openvino", lambda f: _truncate(f, "model.xml")),
], ids=["onnx-truncated", "onnx-deleted", "onnx-garbage-meta", "onnx-same-size-garbage", "openvino-bin-deleted",
        "openvino-xml-truncated"])
def test_a_damaged_entry_is_built_again_and_scores_as_the_fresh_build(tmp_path, model_copy, kind, damage,
                                                                       caplog) -> None:
    """Each start failed on a damaged entry (or, under `auto`, served another engine) and nothing rebuilt it."""
    cache = tmp_path / "cache"
    fresh = _runtime(kind, model_copy, cache)
    vocab = json.loads((model_copy / "config.json").read_text())["vocab_size"]
    features = probe_features(fresh.input_names, vocab)
    expected = fresh.run(features)
    damage(_artifact(fresh).path.parent)
    with caplog.at_level(logging.WARNING):
        again = _runtime(kind, model_copy, cache)
    assert not _artifact(again).cached and _artifact(again).path == _artifact(fresh).path
    np.testing.assert_array_equal(again.run(features), expected)
    assert any(r.levelname == "WARNING" and "building it again" in r.getMessage() for r in caplog.records)
    assert _artifact(_runtime(kind, model_copy, cache)).cached  # and it stays


def _fake_cache(cache: Path) -> tuple[list[Path], Callable[[], artifact_cache.CachedArtifact]]:
    """An entry built by a fake build (one model file), and how many builds ran: `ensure` as a runtime passes it."""
    builds: list[Path] = []

    def build(tmp: Path) -> dict:
        builds.append(tmp)
        (tmp / "model.xml").write_text("<net/>")
        return {}

    def ensure() -> artifact_cache.CachedArtifact:
        return artifact_cache.ensure_artifact(cache, "k" * 24, "fp32", model_file="model.xml", meta_file="m.json",
                                              facts={}, build=build, what="test IR")
    return builds, ensure


@pytest.mark.parametrize("error", [
    RuntimeError("Exception from src/inference/src/cpp/core.cpp:112:\nResource temporarily unavailable\n"),
    RuntimeError("can't start new thread"),
    RuntimeError("Exception from src/plugins/intel_cpu/src/cpu_memory.cpp:257:\nFailed to allocate 31457280 bytes "
                 "of memory\n"),
    MemoryError(),
    OSError(errno.EAGAIN, "Resource temporarily unavailable"),
    OSError(errno.EMFILE, "Too many open files"),
], ids=["eagain-text", "no-thread", "ov-allocation", "memory-error", "eagain", "emfile"])
def test_a_shortage_while_opening_a_cached_entry_is_raised_and_the_entry_kept(tmp_path, error, caplog) -> None:
    """Under `ulimit -u 6` OpenVINO could not open a good cached IR (no thread); the entry was deleted as damaged
    and converted again, which failed the same way: a cache volume several servers share lost it for all."""
    builds, ensure = _fake_cache(tmp_path)
    folder = ensure().path.parent
    opens: list[Path] = []

    def open_(artifact):
        opens.append(artifact.path)
        raise error

    with pytest.raises(type(error)) as raised:
        artifact_cache.open_cached(ensure, open_, meta_file="m.json", what="test IR")
    assert raised.value is error and len(opens) == 1
    assert len(builds) == 1 and (folder / "model.xml").read_text() == "<net/>"  # not built again
    assert not any("building it again" in r.getMessage() for r in caplog.records)


def test_a_failure_that_does_not_happen_again_keeps_the_entry(tmp_path, caplog) -> None:
    """A failure with no known text may pass too: the entry is damaged only when a second open fails as well."""
    builds, ensure = _fake_cache(tmp_path)
    ensure()
    failures = [RuntimeError("something passing")]

    def open_(artifact):
        if failures:
            raise failures.pop()
        return "opened"

    with caplog.at_level(logging.WARNING):
        artifact, opened = artifact_cache.open_cached(ensure, open_, meta_file="m.json", what="test IR")
    assert opened == "opened" and artifact.cached and len(builds) == 1
    assert any("second try: kept" in r.getMessage() for r in caplog.records)


def test_a_cached_entry_that_fails_to_open_twice_is_built_again(tmp_path, caplog) -> None:
    builds, ensure = _fake_cache(tmp_path)
    ensure()
    seen: list[bool] = []

    def open_(artifact):
        seen.append(artifact.cached)
        if artifact.cached:
            raise RuntimeError("Check 'false' failed: the XML is not valid")
        return "opened"

    with caplog.at_level(logging.WARNING):
        artifact, opened = artifact_cache.open_cached(ensure, open_, meta_file="m.json", what="test IR")
    assert (opened, artifact.cached, seen, len(builds)) == ("opened", False, [True, True, False], 2)
    assert any("could not be opened, twice" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("runtime", ["onnx", "openvino"])
def test_a_cache_that_cannot_be_written_names_its_folder_and_the_setting(tmp_path, model_copy, monkeypatch,
                                                                          runtime) -> None:
    """A read-only or missing HOME gave a bare `[Errno 30] Read-only file system: '/nonexistent'`. (Tests run as
    root, whom a read-only mode does not stop: the folder's parent is a file.)"""
    from openrerank.runtimes.onnx_export import ensure_onnx
    from openrerank.runtimes.openvino_convert import ensure_openvino

    ensure = ensure_onnx if runtime == "onnx" else ensure_openvino
    (tmp_path / "file").write_text("")
    monkeypatch.setenv(artifact_cache.CACHE_ENV, str(tmp_path / "file" / "cache"))
    with pytest.raises(OSError) as raised:
        ensure(cross_encoder_network(model_copy))
    folder = artifact_cache.cache_root() if runtime == "onnx" else artifact_cache.cache_folder("openvino")
    message = str(raised.value)
    assert raised.value.errno == errno.ENOTDIR and f"cache folder {folder} " in message
    assert f"(OPENRERANK_CACHE_DIR={tmp_path / 'file' / 'cache'})" in message and "Not a directory" in message
    assert "set OPENRERANK_CACHE_DIR (or XDG_CACHE_HOME) to a writable folder" in message
    assert "`openrerank export`" in message

    monkeypatch.delenv(artifact_cache.CACHE_ENV)  # the default, under a HOME that cannot hold it
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "file"))
    with pytest.raises(OSError, match=r"cache folder .*/file/\.cache/openrerank/\S+ \(the default: "
                                      r"OPENRERANK_CACHE_DIR is unset\): Not a directory; set OPENRERANK_CACHE_DIR"):
        ensure(cross_encoder_network(model_copy))


NO_HOME_SAID = ("cannot find a home folder for the model cache ~/.cache (HOME is unset and this user has no home "
                "in the passwd database): set OPENRERANK_CACHE_DIR or XDG_CACHE_HOME to a writable folder")


def test_without_a_home_the_cache_names_the_settings_that_place_it(tmp_path, monkeypatch) -> None:
    """HOME unset and a uid with no passwd entry (`docker run --user 1234`): Python's "Could not determine home
    directory." was all `serve` said, and `export` was a traceback."""
    without_a_home(monkeypatch)
    for where in (artifact_cache.user_cache_dir, artifact_cache.cache_root, lambda: artifact_cache.cache_folder("x")):
        with pytest.raises(artifact_cache.NoCacheFolderError) as raised:
            where()
        assert str(raised.value) == NO_HOME_SAID
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))  # either setting places it without a home
    assert artifact_cache.cache_root() == tmp_path / "openrerank" / "onnx"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv(artifact_cache.CACHE_ENV, str(tmp_path / "mine"))
    assert artifact_cache.cache_folder("openvino") == tmp_path / "mine" / "openvino"


def test_a_read_only_cache_folder_names_itself_not_a_staging_folder(tmp_path, monkeypatch) -> None:
    """An existing read-only OPENRERANK_CACHE_DIR named only the staging folder a build could not create."""
    def refuse(prefix: str, dir: Path) -> str:
        raise OSError(errno.EROFS, "Read-only file system", str(Path(dir) / f"{prefix}x1y2"))

    monkeypatch.setattr(artifact_cache.tempfile, "mkdtemp", refuse)
    monkeypatch.setenv(artifact_cache.CACHE_ENV, str(tmp_path))
    _, ensure = _fake_cache(tmp_path)
    with pytest.raises(OSError) as raised:
        ensure()
    assert raised.value.errno == errno.EROFS and raised.value.filename is None
    assert str(raised.value) == (f"[Errno 30] cannot write the test IR into the cache folder {tmp_path} "
                                 f"(OPENRERANK_CACHE_DIR={tmp_path}): Read-only file system; set OPENRERANK_CACHE_DIR "
                                 "(or XDG_CACHE_HOME) to a writable folder, or fill the cache ahead with `openrerank "
                                 "export`")
    # a folder given outright (`export --cache-dir`): the variables do not move it, so they are not the advice
    monkeypatch.delenv(artifact_cache.CACHE_ENV)
    with pytest.raises(OSError) as raised:
        ensure()
    assert str(raised.value) == (f"[Errno 30] cannot write the test IR into the cache folder {tmp_path}: Read-only "
                                 "file system; give a writable folder")


@pytest.mark.parametrize("body", [b'{"format": 4, "measu', b"\xff\xfe not text"])
def test_a_timing_record_that_is_not_json_is_computed_again_with_a_warning(tmp_path, body, caplog) -> None:
    """docs/engine.md: such a record "is timed again like a missing one, and a warning names the file"."""
    path = tmp_path / "k.json"
    path.write_bytes(body)
    record, cached = ensure_record(tmp_path, "k", lambda: {"rate": 1.0}, "runtime timing")
    assert (record, cached) == ({"rate": 1.0}, False) and json.loads(path.read_text()) == record
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and str(path) in warnings[0] and "not JSON" in warnings[0]


def _unused(folder: Path) -> list[Path]:
    """Two entries, one unused for ten days, one used now; returns them."""
    entries = []
    for key in ("a" * 24, "b" * 24):
        entries.append(artifact_cache.ensure_artifact(
            folder, key, "fp32", model_file="model.xml", meta_file="meta.json", facts={},
            build=lambda tmp: (tmp / "model.xml").write_text("<net/>") and {}, what="test").path.parent)
    then = time.time() - 10 * 86400
    for path in [entries[0], *entries[0].iterdir()]:
        os.utime(path, (then, then))
    return entries


def _scan(folder: Path):
    return lambda: cache_entries.artifact_entries(folder, "test", "model.xml", "meta.json", lambda meta: {})


def _older_than_a_day(entry) -> str | None:
    return "unused" if time.time() - entry.last_used > 86400 else None


def test_prune_waits_for_a_build_in_the_folder_and_removes_what_it_is_asked_to(tmp_path) -> None:
    """A build holds the folder's `flock` while it publishes (or OpenVINO writes a blob): prune takes it too, so
    it never removes what a build is replacing or writing, and judges the entries again once it holds it."""
    old, used = _unused(tmp_path)
    assert [p.entry.path for p in artifact_cache.prune(tmp_path, _scan(tmp_path), _older_than_a_day,
                                                         dry_run=True)] == [old]
    assert old.exists()  # a dry run removes nothing
    with folder_locked_by_another_process(tmp_path, 1.5):
        started = time.monotonic()
        pruned = artifact_cache.prune(tmp_path, _scan(tmp_path), _older_than_a_day)
        waited = time.monotonic() - started
    assert waited > 1.0, "pruned while a build held the folder"
    assert [(p.entry.path, p.why, p.error) for p in pruned] == [(old, "unused", None)]
    assert not old.exists() and used.exists()
    assert [p.name for p in tmp_path.iterdir()] == [used.name]  # nothing set aside is left


def test_prune_reports_what_it_cannot_remove(tmp_path, monkeypatch) -> None:
    old, _ = _unused(tmp_path)
    monkeypatch.setattr(artifact_cache, "remove_entry", lambda entry: (_ for _ in ()).throw(
        OSError(30, "Read-only file system")))
    pruned = artifact_cache.prune(tmp_path, _scan(tmp_path), _older_than_a_day)
    assert [(p.entry.path, p.error) for p in pruned] == [(old, "Read-only file system")] and old.exists()


def test_a_record_hit_dates_the_record(tmp_path) -> None:
    ensure_record(tmp_path, "k", lambda: {"x": 1}, "test")
    then = time.time() - 10 * 86400
    os.utime(tmp_path / "k.json", (then, then))
    assert ensure_record(tmp_path, "k", lambda: {"x": 2}, "test") == ({"x": 1}, True)
    assert time.time() - (tmp_path / "k.json").stat().st_mtime < 60

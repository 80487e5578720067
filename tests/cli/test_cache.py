"""`openrerank cache ls` / `prune`: after an upgrade, the entries this install never reads are told apart and
removed, beside those it uses and a build in progress."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from openrerank.cli.main import main
from openrerank.engine.speed_record import SPEED_FORMAT
from openrerank.families.cross_encoder import CrossEncoderFamily
from openrerank.runtimes import onnx_export
from openrerank.runtimes import openvino_convert as ov
from openrerank.runtimes.artifact_cache import CACHE_ENV
from openrerank.runtimes.cache_entries import staging_prefix
from openrerank.runtimes.measure import MEASURE_FORMAT, runtime_versions
from openrerank.runtimes.openvino_blobs import COMPILED_DIR, compiled_cache_dir, compiled_cpu_dir
from tests.support import folder_locked_by_another_process, without_a_home


def _artifact(folder: Path, key: str, variant: str, model_file: str, meta_file: str, facts: dict) -> Path:
    entry = folder / f"{key}-{variant}"
    entry.mkdir(parents=True)
    (entry / model_file).write_bytes(b"\0" * 100)
    (entry / meta_file).write_text(json.dumps({**facts, "variant": variant, "files": {model_file: 100}}))
    return entry


def _record(folder: Path, key: str, record: dict) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{key}.json").write_text(json.dumps(record))
    return folder / f"{key}.json"


@pytest.fixture
def cache(tmp_path, monkeypatch) -> dict[str, Path]:
    """A cache after an upgrade: each kind's entry of this install and one of the version before."""
    root = tmp_path / "cache"
    monkeypatch.setenv(CACHE_ENV, str(root))
    old = {**runtime_versions(), "onnxruntime": "1.0.0"}
    irs = root / ov.CACHE_FOLDER
    built = {"build_format": CrossEncoderFamily.build_format}  # the family's build code keys converted models too
    paths = {
        "export": _artifact(root, "a" * 24, "fp32", onnx_export.MODEL_FILE, onnx_export.META_FILE,
                            {**onnx_export.keyed_facts(), **built}),
        "old export": _artifact(root, "b" * 24, "fp32", onnx_export.MODEL_FILE, onnx_export.META_FILE,
                                {**onnx_export.keyed_facts(), **built, "onnxruntime": "1.0.0"}),
        "ir": _artifact(irs, "c" * 24, "int8", ov.MODEL_FILE, ov.META_FILE, {**ov.keyed_facts("int8"), **built}),
        "old ir": _artifact(irs, "d" * 24, "fp32", ov.MODEL_FILE, ov.META_FILE,
                            {**ov.keyed_facts("fp32"), **built, "format": ov.CONVERT_FORMAT - 1}),
        "unnumbered build": _artifact(root, "7" * 24, "fp32", onnx_export.MODEL_FILE, onnx_export.META_FILE,
                                      onnx_export.keyed_facts()),  # made before build formats were recorded
        "choice": _record(root / "engine-choice", "e" * 24, {"format": MEASURE_FORMAT, "versions": runtime_versions()}),
        "old choice": _record(root / "engine-choice", "f" * 24, {"format": MEASURE_FORMAT, "versions": old}),
        "speed": _record(root / "speed", "1" * 24, {"format": SPEED_FORMAT, "versions": runtime_versions()}),
        "old speed": _record(root / "speed", "2" * 24, {"format": SPEED_FORMAT - 1, "versions": runtime_versions()}),
        "shared blob": irs / COMPILED_DIR / "123.blob",
        "blob before per-CPU folders": irs / COMPILED_DIR / "f32-0123456789abcdef" / "456.blob",
        "building": root / f"{staging_prefix('3' * 24 + '-fp32')}xyz",
    }
    for blob in ("shared blob", "blob before per-CPU folders"):
        paths[blob].parent.mkdir(parents=True, exist_ok=True)
        paths[blob].write_bytes(b"an old blob")
    paths["building"].mkdir()
    return paths


def _ls(capsys) -> dict[Path, dict]:
    assert main(["cache", "ls", "--json"]) == 0
    return {Path(e["path"]): e for e in json.loads(capsys.readouterr().out)}


def test_ls_tells_this_installs_entries_from_the_old_ones(cache, capsys) -> None:
    listed = _ls(capsys)
    assert set(listed) == set(cache.values())
    assert {name for name, path in cache.items() if listed[path]["usable"]} == \
        {"export", "ir", "choice", "speed", "building"}
    assert listed[cache["old export"]]["unusable"].startswith("onnxruntime 1.0.0 (here ")
    assert listed[cache["old ir"]]["unusable"] == f"format {ov.CONVERT_FORMAT - 1} (here {ov.CONVERT_FORMAT})"
    assert listed[cache["old choice"]]["unusable"].startswith("onnxruntime 1.0.0 (here ")
    assert listed[cache["unnumbered build"]]["unusable"] == \
        f"build_format unrecorded (here {CrossEncoderFamily.build_format})"
    assert listed[cache["ir"]]["built_with"] == {**ov.keyed_facts("int8"), "build_format": 1}  # nncf keys int8 IRs
    assert listed[cache["building"]]["building"]
    assert main(["cache", "ls"]) == 0
    table = capsys.readouterr().out
    assert str(cache["old export"]) in table and "12 entries" in table and "7 not usable here" in table


def test_prune_removes_what_this_install_never_reads_and_nothing_in_a_dry_run(cache, capsys) -> None:
    assert main(["cache", "prune", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert all(p.exists() for p in cache.values())
    assert out.count("would remove") == 7 and "would free" in out
    assert main(["cache", "prune"]) == 0
    assert capsys.readouterr().out.count("removed ") == 7
    assert {name for name, path in cache.items() if path.exists()} == {"export", "ir", "choice", "speed",
                                                                       "building"}


def test_prune_unused_days_removes_usable_entries_nobody_used(cache, capsys, tmp_path) -> None:
    then = time.time() - 10 * 86400
    for path in [cache["export"], *cache["export"].iterdir(), cache["choice"]]:
        os.utime(path, (then, then))
    assert main(["cache", "prune", "--unused-days", "7", "--cache-dir", os.environ[CACHE_ENV]]) == 0
    left = {name for name, path in cache.items() if path.exists()}
    assert left == {"ir", "speed", "building"}  # used today, or a build in progress
    assert main(["cache", "prune", "--unused-days", "0"]) == 0
    assert {name for name, path in cache.items() if path.exists()} == {"building"}


def test_cache_dir_names_the_cache_as_the_variable_does(cache, capsys, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "elsewhere"))
    assert main(["cache", "ls", "--json", "--cache-dir", str(cache["export"].parent)]) == 0
    assert {Path(e["path"]) for e in json.loads(capsys.readouterr().out)} == set(cache.values())


def test_no_cache_is_said_and_not_shown_as_an_empty_one(tmp_path, monkeypatch, capsys) -> None:
    """A mistyped --cache-dir listed "0 entries" and pruned "0 B", as if there were nothing to prune."""
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "never-built"))
    assert main(["cache", "ls"]) == 0 and main(["cache", "prune"]) == 0  # nothing built yet: not an error
    assert capsys.readouterr().err.count(f"no cache at {tmp_path / 'never-built'}") == 2
    assert main(["cache", "ls", "--cache-dir", str(tmp_path / "typo")]) == 1
    assert main(["cache", "prune", "--cache-dir", str(tmp_path / "typo")]) == 1
    captured = capsys.readouterr()
    assert captured.err.count(f"no cache at {tmp_path / 'typo'}") == 2 and "entries" not in captured.out


def test_without_a_home_ls_and_prune_say_what_to_set_in_one_line(monkeypatch, capsys) -> None:
    """HOME unset and a uid with no passwd entry: a traceback, as `serve` and `export` had."""
    without_a_home(monkeypatch)
    assert main(["cache", "ls"]) == 2 and main(["cache", "prune"]) == 2
    lines = capsys.readouterr().err.splitlines()
    assert [line.split(": error: ")[0] for line in lines] == ["openrerank cache ls", "openrerank cache prune"]
    assert all(line.endswith("set OPENRERANK_CACHE_DIR or XDG_CACHE_HOME to a writable folder") for line in lines)


def test_a_folder_that_cannot_be_read_is_one_line_and_the_others_are_pruned_and_said(cache, capsys,
                                                                                     monkeypatch) -> None:
    """A later folder that could not be read ended prune with a traceback, after it had removed the earlier
    folders' entries without printing them (they were printed only at the very end)."""
    from openrerank.runtimes import cache_entries

    listing = cache_entries._listing

    def refuse_irs(folder: Path) -> list[Path]:
        if folder.name == ov.CACHE_FOLDER:
            raise PermissionError(13, "Permission denied", str(folder))
        return listing(folder)

    monkeypatch.setattr(cache_entries, "_listing", refuse_irs)
    irs = cache["ir"].parent
    assert main(["cache", "ls"]) == 1
    captured = capsys.readouterr()
    assert f"could not read {irs}: Permission denied" in captured.err and str(cache["export"]) in captured.out
    assert main(["cache", "prune"]) == 1
    captured = capsys.readouterr()
    assert f"removed {cache['old export']}" in captured.out and "removed or read" in captured.out
    assert f"could not read {irs}: Permission denied" in captured.err
    assert not cache["old export"].exists() and cache["old ir"].exists()


def test_prune_says_when_it_waits_for_a_build(cache, capsys) -> None:
    """Waiting silently for a server converting a model (minutes) looked like a hang, inviting a Ctrl-C."""
    root = cache["export"].parent
    with folder_locked_by_another_process(root, 1):
        assert main(["cache", "prune"]) == 0
    assert f"waiting for a build in {root} to finish" in capsys.readouterr().err


def test_a_number_of_days_that_is_not_a_number_is_refused_in_words(capsys) -> None:
    with pytest.raises(SystemExit):
        main(["cache", "prune", "--unused-days", "abc"])
    assert "a number of days, 0 or more, not 'abc'" in capsys.readouterr().err


def test_another_cpus_folder_unused_for_a_week_is_pruned_and_one_in_use_kept(tmp_path, monkeypatch, capsys) -> None:
    """A kernel upgrade changes this host's CPU folder key (a hash of every /proc/cpuinfo flag, `pti` and `ibrs`
    too), and a retired kind of host leaves its folder: `ls` called their blobs usable and `prune` kept them for
    ever. A folder none of whose blobs was used for a week goes, as the next compile drops it; one used within it
    (another host's, on a shared volume) stays whole."""
    from openrerank.runtimes.openvino_blobs import OLD_BLOB_UNUSED_S, _openvino_version

    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    compiled = compiled_cache_dir(ov.default_cache_dir())
    header = f'<compiled_blob ie_version="{_openvino_version()}">'.encode()
    retired, live = compiled / "cpu-000000000000000000000000", compiled / "cpu-111111111111111111111111"
    blobs = {"retired fp32": retired / "f32-0123456789abcdef" / "1.blob", "retired bf16": retired / "bf16-0" / "2.blob",
             "live, old config": live / "f32-0123456789abcdef" / "1.blob", "live": live / "bf16-0" / "2.blob",
             "mine": compiled_cpu_dir(compiled) / "f32-0123456789abcdef" / "1.blob"}
    week_ago = time.time() - OLD_BLOB_UNUSED_S - 60
    for name, blob in blobs.items():
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(header)
        if name != "live":
            os.utime(blob, (week_ago, week_ago))
    listed = _ls(capsys)
    assert {name for name, blob in blobs.items() if listed[blob]["usable"]} == {"live, old config", "live", "mine"}
    assert listed[blobs["retired fp32"]]["unusable"].startswith("another kind of CPU (cpu-0000")
    assert "none of its blobs used for 7 days" in listed[blobs["retired bf16"]]["unusable"]
    assert main(["cache", "prune"]) == 0
    assert capsys.readouterr().out.count("removed ") == 2
    assert {name for name, blob in blobs.items() if blob.exists()} == {"live, old config", "live", "mine"}


def test_a_blobs_record_is_no_entry_and_goes_with_its_blob(tmp_path, monkeypatch, capsys) -> None:
    """A compile records beside its blob which model wrote it (`<hash>.blob.json`), so that a later start dates
    the blob it imports: `ls` lists the blob alone, and `prune --unused-days` removes the record with it."""
    from openrerank.runtimes.openvino_blobs import _openvino_version

    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    folder = compiled_cpu_dir(compiled_cache_dir(ov.default_cache_dir())) / "f32-0123456789abcdef"
    folder.mkdir(parents=True)
    used, unused = folder / "1.blob", folder / "2.blob"
    for blob in (used, unused):
        blob.write_bytes(f'<compiled_blob ie_version="{_openvino_version()}">'.encode())
        (folder / f"{blob.name}.json").write_text(json.dumps({"model": f"{blob.stem * 24}/model.xml"}))
    days_40 = time.time() - 40 * 86400
    os.utime(unused, (days_40, days_40))
    assert set(_ls(capsys)) == {used, unused}
    assert main(["cache", "prune", "--unused-days", "30"]) == 0
    assert capsys.readouterr().out.count("removed ") == 1
    assert sorted(p.name for p in folder.iterdir()) == ["1.blob", "1.blob.json"]


def test_ls_says_which_cpu_another_cpus_blob_is_for(tmp_path, monkeypatch, capsys) -> None:
    """The folder of each kind of CPU is keyed by a hash: `ls` showed another CPU's blobs as "yes", and an
    operator could not tell a live folder (another host on the volume) from a dead one (this host before a kernel
    upgrade changed its flags). Each says which CPU it is for, from the name the compile wrote in its folder."""
    from openrerank.runtimes.devices import cpu_facts
    from openrerank.runtimes.openvino_blobs import CPU_FILE, _openvino_version

    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    compiled = compiled_cache_dir(ov.default_cache_dir())
    folders = {"mine": compiled_cpu_dir(compiled), "zen2": compiled / "cpu-000000000000000000000000",
               "this before an update": compiled / "cpu-111111111111111111111111",
               "unnamed": compiled / "cpu-222222222222222222222222"}
    names = {"mine": cpu_facts(), "zen2": {"cpu": "AMD EPYC 7R32", "cpu_flags_sha256": "1a2b3c4d" + "0" * 56},
             "this before an update": {**cpu_facts(), "cpu_flags_sha256": "5e6f7a8b" + "0" * 56}}
    blobs = {}
    for name, folder in folders.items():
        blobs[name] = folder / "f32-0123456789abcdef" / "1.blob"
        blobs[name].parent.mkdir(parents=True)
        blobs[name].write_bytes(f'<compiled_blob ie_version="{_openvino_version()}">'.encode())
        if name in names:
            (folder / CPU_FILE).write_text(json.dumps(names[name]))
    listed = _ls(capsys)
    assert set(listed) == set(blobs.values())
    here = cpu_facts()["cpu_flags_sha256"][:8]
    assert {name: listed[blob]["note"] for name, blob in blobs.items()} == {
        "mine": None, "zen2": "another CPU: AMD EPYC 7R32 (flags 1a2b3c4d)",
        "this before an update": f"another CPU: {cpu_facts()['cpu']} (flags 5e6f7a8b; this host's: {here})",
        "unnamed": "another CPU: not named (its folder was made before openrerank named it)"}
    assert all(listed[blob]["usable"] for blob in blobs.values())
    assert main(["cache", "ls"]) == 0
    assert "yes (another CPU: AMD EPYC 7R32 (flags 1a2b3c4d))" in capsys.readouterr().out

"""The OpenVINO engine: conversion cache (reuse, invalidation, concurrency), compile options, int8 via NNCF.

Parity with transformers / sentence-transformers is in test_parity.py (every engine), the bf16/int8 fidelity
gates on real models in test_fidelity.py.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from openrerank.engine.loading import LoadOptions, load_model
from openrerank.runtimes import openvino_blobs
from openrerank.runtimes import openvino_convert as convert
from openrerank.runtimes.artifact_cache import CACHE_ENV
from openrerank.runtimes.openvino_blobs import OLD_BLOB_UNUSED_S
from openrerank.runtimes.openvino_convert import ConversionError, ensure_openvino
from openrerank.runtimes.openvino_runtime import OpenVinoRuntime
from tests.support import (
    NO_HOME,
    REPO,
    build_as_an_earlier_version,
    build_tiny_model,
    cross_encoder_network,
    drop_classifier,
    run_concurrently,
    runs_alike_at_once,
)


@pytest.fixture
def conversions(monkeypatch) -> list[Path]:
    """Records every real torch -> OpenVINO conversion."""
    calls: list[Path] = []
    real = convert._convert

    def counting(network, out):
        calls.append(Path(network.path))
        return real(network, out)

    monkeypatch.setattr(convert, "_convert", counting)
    return calls


def test_second_start_reuses_the_ir(tmp_path, model_copy, conversions):
    cache = tmp_path / "cache"
    first = ensure_openvino(cross_encoder_network(model_copy), cache_dir=cache)
    assert not first.cached and len(conversions) == 1
    assert first.path.name == "model.xml" and first.path.with_suffix(".bin").is_file()
    mtime = first.path.stat().st_mtime_ns
    second = ensure_openvino(cross_encoder_network(model_copy), cache_dir=cache)
    assert second.cached and second.path == first.path and second.path.stat().st_mtime_ns == mtime
    assert len(conversions) == 1
    meta = json.loads((first.path.parent / convert.META_FILE).read_text())
    assert meta["variant"] == "fp32" and meta["inputs"][:2] == ["input_ids", "attention_mask"]
    assert meta["max_abs_diff_vs_torch"] < 1e-4 and meta["openvino"]


def test_changed_weights_or_config_invalidate(tmp_path, model_copy, conversions):
    cache = tmp_path / "cache"
    first = ensure_openvino(cross_encoder_network(model_copy), cache_dir=cache)
    build_tiny_model(model_copy, seed=7)  # same files, new weights
    second = ensure_openvino(cross_encoder_network(model_copy), cache_dir=cache)
    assert not second.cached and second.path != first.path
    config = json.loads((model_copy / "config.json").read_text())
    config["layer_norm_eps"] = 1e-6
    (model_copy / "config.json").write_text(json.dumps(config))
    third = ensure_openvino(cross_encoder_network(model_copy), cache_dir=cache)
    assert not third.cached and third.path not in (first.path, second.path)
    assert len(conversions) == 3
    (model_copy / "tokenizer_config.json").write_text("{}")  # the tokenizer does not shape the graph
    assert ensure_openvino(cross_encoder_network(model_copy), cache_dir=cache).cached


def test_an_ir_an_earlier_build_made_is_not_served_where_this_build_refuses_the_model(tmp_path, model_copy,
                                                                                     monkeypatch):
    """A version that let a cross-encoder without its `classifier.*` tensors through cached its IR, random head
    included, and its successor found it by the same key. The family's build format keys the IR: the start
    converts again, and the build refuses the checkpoint."""
    from openrerank.families.base import ModelFormatError

    headless, cache = drop_classifier(model_copy), tmp_path / "cache"
    with monkeypatch.context() as earlier:
        build_as_an_earlier_version(earlier)
        assert not ensure_openvino(cross_encoder_network(headless), cache_dir=cache).cached
    with pytest.raises(ModelFormatError, match=r"lacks 2 tensors of a BertForSequenceClassification"):
        OpenVinoRuntime(cross_encoder_network(headless), dtype="fp32", threads=1, cache_dir=cache)


def test_runtime_second_start_does_not_convert_or_compile_again(tmp_path, model_copy, conversions):
    cache = tmp_path / "cache"
    network = cross_encoder_network(model_copy)
    a = OpenVinoRuntime(network, dtype="fp32", threads=1, cache_dir=cache)
    blobs = sorted((cache / openvino_blobs.COMPILED_DIR).rglob("*.blob"))
    assert blobs, "OpenVINO wrote no compiled-model cache"
    b = OpenVinoRuntime(network, dtype="fp32", threads=1, cache_dir=cache)
    assert not a.conversion.cached and b.conversion.cached and len(conversions) == 1
    assert sorted((cache / openvino_blobs.COMPILED_DIR).rglob("*.blob")) == blobs  # the compiled blob was reused
    assert b.compiled.get_property("LOADED_FROM_CACHE")
    feats = {"input_ids": np.array([[2, 10, 11, 3, 0]]), "attention_mask": np.array([[1, 1, 1, 1, 0]]),
             "token_type_ids": np.zeros((1, 5), dtype=np.int64)}
    np.testing.assert_array_equal(a.run(feats), b.run(feats))


def test_each_compile_configuration_keeps_its_own_blob(tmp_path, model_copy):
    """OpenVINO's CPU plugin names a blob by the model and the device alone, so in one CACHE_DIR a compile
    with other threads, streams or precision imported the first configuration's blob (on an AMX Xeon a bf16
    compile importing an fp32 blob crashed in `infer`). Each configuration compiles its own blob, and finds
    it again on the next start."""
    cache = tmp_path / "cache"
    network = cross_encoder_network(model_copy)
    first = OpenVinoRuntime(network, dtype="fp32", threads=1, lanes=1, cache_dir=cache)
    other = OpenVinoRuntime(network, dtype="fp32", threads=2, lanes=2, cache_dir=cache)
    assert not first.compiled.get_property("LOADED_FROM_CACHE")
    assert not other.compiled.get_property("LOADED_FROM_CACHE"), "compiled from another configuration's blob"
    again = OpenVinoRuntime(network, dtype="fp32", threads=2, lanes=2, cache_dir=cache)
    assert again.compiled.get_property("LOADED_FROM_CACHE")
    assert len(list((cache / openvino_blobs.COMPILED_DIR).rglob("*.blob"))) == 2
    feats = {"input_ids": np.array([[2, 10, 11, 3, 0]]), "attention_mask": np.array([[1, 1, 1, 1, 0]]),
             "token_type_ids": np.zeros((1, 5), dtype=np.int64)}
    np.testing.assert_allclose(first.run(feats), again.run(feats), atol=1e-5)


def _untouched(path: Path, seconds: float) -> None:
    then = time.time() - seconds
    os.utime(path, (then, then))


def _as_under_noatime(monkeypatch) -> None:
    """Compiles as on a volume mounted `noatime`: a blob OpenVINO imports (reads, does not write) keeps the
    access time it had, which the test then sets as it pleases."""
    from openrerank.runtimes import openvino_runtime

    real = openvino_runtime.import_openvino()

    class Core:
        def __init__(self) -> None:
            self._core = real.Core()

        def compile_model(self, model, device, config):
            blobs = list(Path(config["CACHE_DIR"]).glob("*.blob")) if "CACHE_DIR" in config else []
            times = {b: (b.stat().st_atime_ns, b.stat().st_mtime_ns) for b in blobs}
            compiled = self._core.compile_model(model, device, config)
            for blob, (atime, mtime) in times.items():
                if blob.exists() and blob.stat().st_mtime_ns == mtime:  # read, not written: its times stay
                    os.utime(blob, ns=(atime, mtime))
            return compiled

    monkeypatch.setattr(openvino_runtime, "import_openvino", lambda: type("ov", (), {"Core": Core}))


def test_a_compile_from_the_cache_dates_the_blob_it_imported_and_no_other(tmp_path, model_copy, monkeypatch):
    """OpenVINO imports a blob without writing it: on a `noatime` volume a blob imported at every start kept the
    date it was compiled, and `cache prune --unused-days 30` deleted it (the next start compiled again, 90 MB for
    the default model). The compile that writes a blob records whose it is; a later compile of that model from
    the cache dates that blob used, and only that one: a configuration's folder holds every model's blobs. A blob
    with no record (an older version's) is left to its access time, as before."""
    from openrerank.runtimes.cache_entries import last_used
    from openrerank.runtimes.openvino_blobs import compiled_entries

    _as_under_noatime(monkeypatch)
    cache, other = tmp_path / "cache", build_tiny_model(tmp_path / "other", seed=7)
    compiled = openvino_blobs.compiled_cache_dir(cache)
    OpenVinoRuntime(cross_encoder_network(model_copy), dtype="fp32", threads=1, cache_dir=cache)
    [mine] = compiled.glob("cpu-*/*/*.blob")
    OpenVinoRuntime(cross_encoder_network(other), dtype="fp32", threads=1, cache_dir=cache)
    [others] = [b for b in compiled.glob("cpu-*/*/*.blob") if b != mine]
    assert others.parent == mine.parent  # one configuration: one folder for both models
    assert {e.path for e in compiled_entries(compiled)} == {mine, others}  # the records are no entries
    days_40 = time.time() - 40 * 86400
    for blob in (mine, others):
        os.utime(blob, (days_40, days_40))
    again = OpenVinoRuntime(cross_encoder_network(model_copy), dtype="fp32", threads=1, cache_dir=cache)
    assert again.compiled.get_property("LOADED_FROM_CACHE")
    assert time.time() - last_used(mine) < 600, "the blob this start imported is not dated"
    assert last_used(others) < days_40 + 60, "another model's blob was dated by this model's start"
    (others.parent / f"{others.name}.json").unlink()  # as an older version left it
    OpenVinoRuntime(cross_encoder_network(other), dtype="fp32", threads=1, cache_dir=cache)
    assert last_used(others) < days_40 + 60
    [listed] = [e for e in compiled_entries(compiled) if e.path == mine]
    assert listed.companions == (mine.parent / f"{mine.name}.json",)  # removed with it


def test_an_unrecorded_blob_alone_in_its_folder_is_recorded_by_the_start_that_imports_it(tmp_path, model_copy,
                                                                                         monkeypatch):
    """A 0.1.0 build with per-CPU folders wrote its blob with no record, and a start of this version imports it
    as it is: it was never rewritten, so never recorded nor dated, and on a `noatime` volume `cache prune
    --unused-days 30` deleted a blob imported at every start. A compile that writes nothing imported a blob;
    where its folder holds only that one, it is this model's: recorded and dated. Among several it stays
    undated (the test above)."""
    from openrerank.runtimes.cache_entries import last_used
    from openrerank.runtimes.openvino_blobs import compiled_entries

    _as_under_noatime(monkeypatch)
    cache = tmp_path / "cache"
    compiled = openvino_blobs.compiled_cache_dir(cache)
    OpenVinoRuntime(cross_encoder_network(model_copy), dtype="fp32", threads=1, cache_dir=cache)
    [blob] = compiled.glob("cpu-*/*/*.blob")
    record = blob.with_name(f"{blob.name}.json")
    model = json.loads(record.read_text())["model"]
    record.unlink()  # as a 0.1.0 build with per-CPU folders left it
    days_40 = time.time() - 40 * 86400
    os.utime(blob, (days_40, days_40))
    again = OpenVinoRuntime(cross_encoder_network(model_copy), dtype="fp32", threads=1, cache_dir=cache)
    assert again.compiled.get_property("LOADED_FROM_CACHE")
    assert time.time() - last_used(blob) < 600, "the unrecorded blob this start imported is not dated"
    assert json.loads(record.read_text())["model"] == model
    [listed] = compiled_entries(compiled)
    assert listed.path == blob and listed.companions == (record,)


def test_blobs_of_the_old_shared_layout_are_removed_once_unused_for_a_week(tmp_path, model_copy):
    """Blobs an older version wrote into the cache's root (shared by every configuration) are read by nothing
    now; a compile with the cache removes those untouched for `OLD_BLOB_UNUSED_S`, and keeps its own
    configuration's blob and other files."""
    compiled = tmp_path / "cache" / openvino_blobs.COMPILED_DIR
    compiled.mkdir(parents=True)
    (compiled / "1234567890.blob").write_bytes(b"an old blob")
    _untouched(compiled / "1234567890.blob", OLD_BLOB_UNUSED_S + 60)
    (compiled / "notes.txt").write_text("not a blob")
    OpenVinoRuntime(cross_encoder_network(model_copy), dtype="fp32", threads=1, cache_dir=tmp_path / "cache")
    assert not (compiled / "1234567890.blob").exists()
    assert (compiled / "notes.txt").exists()
    assert len(list(compiled.glob("cpu-*/*/*.blob"))) == 1


def test_blobs_of_the_layout_before_per_cpu_folders_are_removed_once_unused_for_a_week(tmp_path, model_copy):
    """A configuration's folder straight under `compiled/` (every kind of CPU in it) is read by nothing now: its
    blob goes once untouched for `OLD_BLOB_UNUSED_S`, and so does the folder it leaves empty; one used within
    the week (an older version still running on the cache) stays."""
    compiled = tmp_path / "cache" / openvino_blobs.COMPILED_DIR
    stale, used = compiled / "f32-0123456789abcdef", compiled / "bf16-0123456789abcdef"
    for folder in (stale, used):
        folder.mkdir(parents=True)
        (folder / "1234567890.blob").write_bytes(b"a blob of the layout before per-CPU folders")
    _untouched(stale / "1234567890.blob", OLD_BLOB_UNUSED_S + 60)
    _untouched(used / "1234567890.blob", 3600)
    OpenVinoRuntime(cross_encoder_network(model_copy), dtype="fp32", threads=1, cache_dir=tmp_path / "cache")
    assert not stale.exists()
    assert (used / "1234567890.blob").exists()
    [mine] = compiled.glob("cpu-*/*/*.blob")
    assert mine.parent.parent == openvino_blobs.compiled_cpu_dir(compiled)


def test_another_cpus_folder_goes_once_none_of_its_blobs_was_used_for_a_week(tmp_path, model_copy):
    """The CPU folder's key hashes every /proc/cpuinfo flag, the kernel's own too (`pti`, `ibrs`): a kernel
    upgrade or a retired kind of host left a folder (a model's size per configuration) for ever. One none of
    whose blobs was used for `OLD_BLOB_UNUSED_S` goes whole with the next compile; one a host of its kind used
    within the week (a shared volume) stays whole, its other configurations' blobs too."""
    compiled = tmp_path / "cache" / openvino_blobs.COMPILED_DIR
    retired, live = compiled / "cpu-000000000000000000000000", compiled / "cpu-111111111111111111111111"
    for folder in (retired, live):
        for config in ("f32-0123456789abcdef", "bf16-0123456789abcdef"):
            (folder / config).mkdir(parents=True)
            (folder / config / "1234567890.blob").write_bytes(b"another kind of CPU's blob")
            (folder / config / "1234567890.blob.json").write_text('{"model": "its model"}')  # its record
            _untouched(folder / config / "1234567890.blob", OLD_BLOB_UNUSED_S + 60)
    (retired / "f32-emptied-by-prune").mkdir()
    (retired / "f32-emptied-by-prune" / "1.blob.json").write_text('{"model": "a model"}')  # a record left behind
    (retired / openvino_blobs.CPU_FILE).write_text('{"cpu": "AMD EPYC", "cpu_flags_sha256": "0123456789"}')
    _untouched(live / "bf16-0123456789abcdef" / "1234567890.blob", 3600)  # a host of that kind started an hour ago
    OpenVinoRuntime(cross_encoder_network(model_copy), dtype="fp32", threads=1, cache_dir=tmp_path / "cache")
    assert not retired.exists()
    assert len(list(live.glob("*/*.blob"))) == 2
    [mine] = [b for b in compiled.glob("cpu-*/*/*.blob") if b.parent.parent != live]
    assert mine.parent.parent == openvino_blobs.compiled_cpu_dir(compiled)


def test_a_compile_names_the_cpu_of_its_folder(tmp_path, model_copy):
    """A CPU folder's key is a hash: `cache ls` could not tell a live folder from a retired host's, or from this
    host's before a kernel upgrade changed its flags. The compile writes the CPU's name and flags' hash in it."""
    from openrerank.runtimes.devices import cpu_facts

    cache = tmp_path / "cache"
    OpenVinoRuntime(cross_encoder_network(model_copy), dtype="fp32", threads=1, cache_dir=cache)
    folder = openvino_blobs.compiled_cpu_dir(openvino_blobs.compiled_cache_dir(cache))
    assert json.loads((folder / openvino_blobs.CPU_FILE).read_text()) == cpu_facts()


def test_each_kind_of_cpu_compiles_into_a_folder_of_its_own(cpuinfo, tmp_path):
    """OpenVINO keys a blob by its CPUID brand string, "AMD EPYC" on a Zen 3 VM and a Zen 4 one alike: on a
    cache volume both share, one imported kernels compiled for the other. The blobs' folder is keyed by the
    CPU's name and flags, the facts that key the runtime timings (`devices.cpu_facts`, one owner)."""
    from openrerank.runtimes import measure
    from openrerank.runtimes.devices import cpu_facts
    from openrerank.runtimes.openvino_blobs import compiled_config_dir
    from openrerank.runtimes.openvino_runtime import compile_config

    compiled = tmp_path / openvino_blobs.COMPILED_DIR
    folders = {}
    for cpu in ("zen2", "cascadelake", "sapphirerapids", "graviton3", "zen5", "zen2"):
        cpuinfo(cpu)
        folder = openvino_blobs.compiled_cpu_dir(compiled)
        assert folders.setdefault(cpu, folder) == folder  # the same CPU: the same folder
        assert folder.parent == compiled and folder.name.startswith(openvino_blobs.COMPILED_CPU_PREFIX)
        assert compiled_config_dir(compiled, compile_config("fp32", 2)).parent == folder
        assert measure.machine_facts().items() >= cpu_facts().items()  # the timing record's CPU facts
    assert len(set(folders.values())) == 5


def test_a_shared_layout_blob_an_older_version_still_uses_is_kept(tmp_path, model_copy):
    """In a rolling update, a rollback or a canary an older version on the same cache imports its blob at each
    start and writes it again where it is gone: deleted at each start of this version, it was rewritten (90 MB)
    at each start of that one. One used (written or read) within the week stays."""
    compiled = tmp_path / "cache" / openvino_blobs.COMPILED_DIR
    compiled.mkdir(parents=True)
    (compiled / "written.blob").write_bytes(b"an old pod wrote it an hour ago")
    _untouched(compiled / "written.blob", 3600)
    (compiled / "read.blob").write_bytes(b"an old pod imported it an hour ago")
    written = time.time() - OLD_BLOB_UNUSED_S - 60
    os.utime(compiled / "read.blob", (time.time() - 3600, written))
    for _ in range(2):
        OpenVinoRuntime(cross_encoder_network(model_copy), dtype="fp32", threads=1, cache_dir=tmp_path / "cache")
    assert (compiled / "written.blob").read_bytes() == b"an old pod wrote it an hour ago"
    assert (compiled / "read.blob").exists()


def test_an_old_blob_that_cannot_be_removed_does_not_stop_the_start(tmp_path, model_copy, monkeypatch):
    compiled = tmp_path / "cache" / openvino_blobs.COMPILED_DIR
    compiled.mkdir(parents=True)
    (compiled / "1234567890.blob").write_bytes(b"an old blob")
    _untouched(compiled / "1234567890.blob", OLD_BLOB_UNUSED_S + 60)
    real_unlink = Path.unlink

    def refuse(self, *args, **kwargs):
        if self.name == "1234567890.blob":
            raise PermissionError(13, "Permission denied", str(self))
        return real_unlink(self, *args, **kwargs)

    monkeypatch.setattr(Path, "unlink", refuse)
    rt = OpenVinoRuntime(cross_encoder_network(model_copy), dtype="fp32", threads=1, cache_dir=tmp_path / "cache")
    assert (compiled / "1234567890.blob").exists() and rt.compiled is not None


def test_a_runtime_only_timed_leaves_no_blob(tmp_path, model_copy):
    """`--backend auto` times every candidate configuration once; only the one that serves keeps a blob."""
    cache = tmp_path / "cache"
    OpenVinoRuntime(cross_encoder_network(model_copy), dtype="fp32", threads=1, cache_dir=cache,
                    compiled_cache=False).close()
    assert not list((cache / openvino_blobs.COMPILED_DIR).rglob("*.blob"))


def test_compile_options_honour_threads_and_precision(tmp_path, model_copy):
    network = cross_encoder_network(model_copy)
    fp32 = OpenVinoRuntime(network, dtype="fp32", threads=1, cache_dir=tmp_path)
    assert fp32.compiled.get_property("INFERENCE_NUM_THREADS") == 1
    # fp32 means f32 kernels even where OpenVINO's CPU default would be bf16
    assert str(fp32.compiled.get_property("INFERENCE_PRECISION_HINT")) in ("<Type: 'float32'>", "f32")
    assert fp32.description == "openvino-fp32-cpu" and fp32.input_names[0] == "input_ids"
    from openrerank.runtimes.selection import _openvino_bf16, cpu_flags

    if _openvino_bf16(cpu_flags()):  # the rule that lets --dtype bf16 run on OpenVINO here
        bf16 = OpenVinoRuntime(network, dtype="bf16", threads=2, cache_dir=tmp_path)
        assert bf16.compiled.get_property("INFERENCE_NUM_THREADS") == 2
        assert "bf" in str(bf16.compiled.get_property("INFERENCE_PRECISION_HINT")).lower()
        assert bf16.conversion.path == fp32.conversion.path  # one IR, precision chosen at compile time


def test_concurrent_starts_share_one_valid_ir(tmp_path, model_copy):
    cache = tmp_path / "cache"
    results = run_concurrently(lambda: ensure_openvino(cross_encoder_network(model_copy), cache_dir=cache))
    assert len({r.path for r in results}) == 1
    assert [p.name for p in cache.iterdir() if p.name.startswith(".")] == []  # no staging folders left
    OpenVinoRuntime(cross_encoder_network(model_copy), threads=1, cache_dir=cache).run(
        {"input_ids": np.array([[2, 3]]), "attention_mask": np.array([[1, 1]]),
         "token_type_ids": np.zeros((1, 2), dtype=np.int64)})


def test_a_conversion_that_drifts_is_refused(tmp_path, model_copy, monkeypatch):
    monkeypatch.setattr(convert, "_TOLERANCE", -1.0)  # any difference at all counts as drift
    with pytest.raises(ConversionError, match="differs from PyTorch"):
        ensure_openvino(cross_encoder_network(model_copy), cache_dir=tmp_path / "cache")
    assert [p for p in (tmp_path / "cache").iterdir()] == []


@pytest.mark.parametrize("free", [1000, 2**40])
def test_a_full_disk_names_the_cache_folder_the_space_free_and_the_space_needed(tmp_path, model_copy, monkeypatch,
                                                                              free):
    """On a full disk `ov.save_model` said only `basic_ios::clear: iostream error` (a 20 MB tmpfs as the cache).
    With room enough, the failure is something else and is raised as it was."""
    import errno
    import shutil

    import openvino

    network = cross_encoder_network(model_copy)
    ir_bytes = ensure_openvino(network, cache_dir=tmp_path / "roomy").path.with_suffix(".bin").stat().st_size
    real_usage = shutil.disk_usage

    def fill_then_fail(model, path, compress_to_fp16=True):
        Path(path).with_suffix(".bin").write_bytes(b"\0" * 100)  # what was written before the disk filled
        raise RuntimeError("basic_ios::clear: iostream error")

    monkeypatch.setattr(openvino, "save_model", fill_then_fail)
    monkeypatch.setattr(convert.shutil, "disk_usage", lambda path: real_usage(path)._replace(free=free))
    cache = tmp_path / "cache"
    with pytest.raises((OSError, RuntimeError)) as raised:
        ensure_openvino(network, cache_dir=cache)
    assert list(cache.iterdir()) == []  # no staging folder left
    if free > ir_bytes:
        assert type(raised.value) is RuntimeError and str(raised.value) == "basic_ios::clear: iostream error"
        return
    message = str(raised.value)
    assert isinstance(raised.value, OSError) and raised.value.errno == errno.ENOSPC
    assert f"no space for the OpenVINO IR in the cache folder {cache}: 1.1 KiB free" in message  # its own 100 too
    assert "(OpenVINO said: basic_ios::clear: iostream error)" in message and "OPENRERANK_CACHE_DIR" in message
    amount, unit = message.split("needs about ")[1].split(";")[0].split()
    assert float(amount) * {"KiB": 2**10, "MiB": 2**20}[unit] == pytest.approx(ir_bytes, rel=0.1)  # the weights


def test_int8_weights_are_compressed_on_top_of_the_cached_fp32_ir(tmp_path, model_copy, conversions):
    cache = tmp_path / "cache"
    network = cross_encoder_network(model_copy)
    q = ensure_openvino(network, variant="int8", cache_dir=cache)
    assert not q.cached and "NNCF int8 weight" in q.meta["quantization"] and q.meta["nncf"]
    assert ensure_openvino(network, cache_dir=cache).cached  # the fp32 IR it started from
    assert ensure_openvino(network, variant="int8", cache_dir=cache).cached
    assert len(conversions) == 1
    fp32_bin = ensure_openvino(network, cache_dir=cache).path.with_suffix(".bin")
    assert q.path.with_suffix(".bin").stat().st_size < 0.5 * fp32_bin.stat().st_size  # int8 weights
    assert 'element_type="u8"' in q.path.read_text() or 'element_type="i8"' in q.path.read_text()


def test_int8_runtime_scores_like_fp32(tiny_model_dir):
    """The tiny model is random, so this checks plumbing (the int8 graph running on real features), not
    fidelity: test_fidelity.py measures that on real models."""
    fp32 = load_model(str(tiny_model_dir), LoadOptions(backend="openvino", dtype="fp32"))
    int8 = load_model(str(tiny_model_dir), LoadOptions(backend="openvino", dtype="int8"))
    assert int8.scorer.description == "openvino-int8-cpu"
    passages = ["paris is the capital of france", "bananas are yellow", "berlin germany", "the river"]
    a, b = fp32.score("capital of france", passages), int8.score("capital of france", passages)
    assert b.dtype == np.float32 and np.isfinite(b).all()
    assert np.abs(a - b).max() < 0.1 * (np.abs(a).max() + 1e-3) + 0.02


def test_bi_encoder_embeddings_run_on_openvino():
    """Embeddings (the default bi-encoder) get the engine too, and bf16 stays close to fp32."""
    from openrerank.runtimes.selection import _openvino_bf16, cpu_flags

    texts = ["what is the capital of france", "paris is the capital of france", "bananas are yellow"]
    fp32 = load_model("default", LoadOptions(backend="openvino", dtype="fp32"))
    emb = fp32.embed(texts)
    assert emb.shape == (3, 384) and np.allclose(np.linalg.norm(emb, axis=1), 1, atol=1e-5)
    if _openvino_bf16(cpu_flags()):  # the rule that lets --dtype bf16 run on OpenVINO here
        bf16 = load_model("default", LoadOptions(backend="openvino", dtype="bf16"))
        assert bf16.scorer.description == "openvino-bf16-cpu"
        assert float(np.min(np.sum(bf16.embed(texts) * emb, axis=1))) > 0.999


def test_export_command_converts_ahead_of_time(tmp_path, model_copy, capsys):
    from openrerank.cli.main import main

    cache = tmp_path / "cache"
    assert main(["export", "--backend", "openvino", "--model", str(model_copy), "--cache-dir", str(cache)]) == 0
    out = capsys.readouterr()
    path = Path(out.out.strip())
    assert path.name == "model.xml" and path.parent.parent == cache / "openvino" and "exported" in out.err
    # bf16 is compiled from the same IR: nothing new to convert.
    assert main(["export", "--backend", "openvino", "--dtype", "bf16", "--model", str(model_copy),
                 "--cache-dir", str(cache), "--out", str(tmp_path / "o")]) == 0
    out = capsys.readouterr()
    assert "cached" in out.err and Path(out.out.strip()) == tmp_path / "o" / "model.xml"
    assert (tmp_path / "o" / "model.bin").is_file() and (tmp_path / "o" / convert.META_FILE).is_file()
    assert main(["export", "--dtype", "bf16", "--model", str(model_copy), "--cache-dir", str(cache)]) == 2
    assert "fp32 or int8" in capsys.readouterr().err


@pytest.fixture
def exported_dir(tmp_path, model_copy) -> Path:
    """`openrerank export --out DIR` of the tiny cross-encoder: model.onnx + export.json, no weights."""
    from openrerank.cli.main import main

    out = tmp_path / "servable"
    assert main(["export", "--model", str(model_copy), "--out", str(out), "--cache-dir", str(tmp_path / "c")]) == 0
    return out


def test_a_pre_exported_directory_is_served_by_openvino(exported_dir, model_copy, conversions):
    """The torch-free image serves `export --out` folders: `auto` picks OpenVINO (its ONNX graph read as it is,
    checked against ONNX Runtime, nothing converted from PyTorch; tests/test_container.py runs it without
    PyTorch installed), with the same numbers as the model folder on PyTorch."""
    reference = load_model(str(model_copy), LoadOptions(backend="torch", dtype="fp32"))
    served = load_model(str(exported_dir), LoadOptions(backend="openvino", dtype="fp32"))
    assert served.weights_format == "onnx" and served.scorer.description == "openvino-fp32-cpu"
    assert served.scorer.runtime.conversion.meta["max_abs_diff_vs_onnxruntime"] < 1e-4
    passages = ["paris is the capital of france", "bananas are yellow"]
    np.testing.assert_allclose(served.score("capital of france", passages),
                               reference.score("capital of france", passages), atol=1e-4)
    auto = load_model(str(exported_dir), LoadOptions(backend_choice="rules"))  # the rule, not a timing
    assert auto.runtime_choice.runtime == "openvino" and auto.scorer.description.startswith("openvino-")
    assert conversions == []  # nothing converted from PyTorch
    with pytest.raises(ConversionError, match="export with --dtype int8"):
        OpenVinoRuntime(cross_encoder_network(exported_dir), dtype="int8", threads=1)


def test_a_pre_exported_graph_openvino_misreads_falls_back_to_onnx_runtime(exported_dir, monkeypatch):
    monkeypatch.setattr(convert, "_diff_from_onnxruntime", lambda *a: (0.5, None))
    served = load_model(str(exported_dir), LoadOptions(backend_choice="rules"))  # the rule's hand-over
    assert served.runtime_choice.runtime == "onnx" and "refused" in served.runtime_choice.reason
    with pytest.raises(ConversionError, match="away from ONNX Runtime"):
        load_model(str(exported_dir), LoadOptions(backend="openvino"))


def test_a_read_only_cache_serves_without_the_compiled_model_cache(tmp_path, model_copy, monkeypatch, caplog):
    """A cache volume an export job filled is mounted read-only: the compiled-model cache is left out."""
    cache = tmp_path / "cache"
    ensure_openvino(cross_encoder_network(model_copy), cache_dir=cache)
    real_mkdir = Path.mkdir

    def read_only(self, *a, **k):
        if self == openvino_blobs.compiled_cache_dir(cache):
            raise PermissionError(13, "Read-only file system", str(self))
        return real_mkdir(self, *a, **k)

    monkeypatch.setattr(Path, "mkdir", read_only)
    with caplog.at_level("INFO", logger=openvino_blobs.__name__):
        runtime = OpenVinoRuntime(cross_encoder_network(model_copy), threads=1, cache_dir=cache)
    assert runtime.conversion.cached
    assert "compiled-model cache off" in caplog.text
    assert not openvino_blobs.compiled_cache_dir(cache).exists()


def test_buckets_are_finite_and_pad_little():
    from openrerank.runtimes.openvino_runtime import bucket_shape

    shapes = {bucket_shape(rows, width) for rows in range(1, 65) for width in range(1, 513)}
    assert len(shapes) <= 20 * 56  # instead of 64 x 512 distinct compiled shapes
    for rows in range(1, 65):
        for width in range(1, 513):
            to_rows, to_width = bucket_shape(rows, width)
            assert rows <= to_rows <= 1.25 * rows and width <= to_width <= 1.125 * width
    assert bucket_shape(4, 8) == (4, 8) and bucket_shape(9, 17) == (10, 18) and bucket_shape(33, 300) == (40, 320)


def test_buckets_of_arrays_are_the_buckets_of_their_elements():
    """The batcher asks for many candidate shapes at once (`padded_shape` on arrays)."""
    import numpy as np

    from openrerank.runtimes.openvino_runtime import bucket_shape

    n = np.arange(1, 5000)
    rows, width = bucket_shape(n[:, None], n[::-1, None])  # 2-D, as the batcher's candidates are
    assert rows.ravel().tolist() == [bucket_shape(int(k), 1)[0] for k in n]
    assert width.ravel().tolist() == [bucket_shape(1, int(k))[1] for k in n[::-1]]


def test_every_batch_runs_at_a_bucket_shape_and_scores_as_sent(tmp_path, model_copy):
    """What bounds OpenVINO's per-shape memory: the compiled model only ever sees bucket shapes, and padding
    changes no score (zero-masked columns, copied rows, both cut from the output)."""
    from openrerank.runtimes import openvino_runtime
    from openrerank.runtimes.torch_runtime import TorchRuntime

    network = cross_encoder_network(model_copy)
    ov = OpenVinoRuntime(network, dtype="fp32", threads=1, cache_dir=tmp_path)
    reference = TorchRuntime(network, dtype="fp32", threads=1)
    seen: list[tuple[int, int]] = []
    request = ov._requests.get()

    class Recording:
        def infer(self, inputs, **kw):
            seen.append(inputs["input_ids"].shape)
            return request.infer(inputs, **kw)

    ov._requests.put(Recording())
    rng = np.random.default_rng(0)
    for rows, width in [(1, 5), (3, 17), (9, 19), (13, 37), (5, 100)]:
        ids = rng.integers(5, 90, size=(rows, width))
        mask = np.ones_like(ids)
        for r in range(rows):  # right padding as pad_features makes it
            mask[r, int(rng.integers(1, width + 1)):] = 0
        ids[mask == 0] = 0
        feats = {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}
        feats = {n: feats[n] for n in ov.input_names}
        out = ov.run(feats)
        assert seen[-1] == openvino_runtime.bucket_shape(rows, width)
        assert out.shape[0] == rows
        np.testing.assert_allclose(out, reference.run(feats), atol=1e-4)
    assert seen[1:] == [(3, 18), (10, 20), (14, 40), (5, 104)]  # padded where off the grid


def test_lanes_are_streams_each_with_its_own_request_and_score_as_one_lane(tmp_path, model_copy, monkeypatch):
    """`OPENRERANK_LANES`: OpenVINO compiles that many streams over the threads and keeps one infer request
    per stream, so batches given at once from several threads run at once and score as one lane does."""
    from openrerank.runtimes.base import LANES_ENV

    network = cross_encoder_network(model_copy)
    monkeypatch.setenv(LANES_ENV, "2")
    laned = OpenVinoRuntime(network, dtype="fp32", threads=2, cache_dir=tmp_path)
    assert laned.lanes == 2 and laned.compiled.get_property("NUM_STREAMS") == 2
    assert laned._requests.qsize() == 2
    monkeypatch.setenv(LANES_ENV, "1")
    single = OpenVinoRuntime(network, dtype="fp32", threads=2, cache_dir=tmp_path)
    assert single.lanes == 1 and single.compiled.get_property("NUM_STREAMS") == 1
    monkeypatch.setenv(LANES_ENV, "4")
    assert OpenVinoRuntime(network, dtype="fp32", threads=2, cache_dir=tmp_path).lanes == 2  # one per thread
    chosen = OpenVinoRuntime(network, dtype="fp32", threads=2, cache_dir=tmp_path, lanes=1)  # as `auto` measured
    assert chosen.lanes == 1 and chosen.compiled.get_property("NUM_STREAMS") == 1
    chosen.close()
    runs_alike_at_once(laned, single, callers=4, seed=1)  # more callers than lanes: they wait for a request
    assert laned._requests.qsize() == 2  # every request handed back


def test_replicas_take_turns_compiling_into_a_shared_cache_dir(tmp_path, model_copy):
    """OpenVINO writes its compiled blob in place: two processes compiling the same model into one CACHE_DIR
    at once failed ("cannot set permissions ... .blob"). While another process holds the compiled cache's
    lock, a starting runtime waits, writes nothing, and compiles once the lock is free."""
    import fcntl
    import os
    import subprocess
    import sys
    import threading
    import time

    cache = tmp_path / "cache"
    ensure_openvino(cross_encoder_network(model_copy), cache_dir=cache)  # the IR, so only the compile is left
    compiled = openvino_blobs.compiled_cache_dir(cache)
    compiled.mkdir(parents=True)
    code = ("import logging, sys; logging.basicConfig(level=logging.INFO, stream=sys.stderr)\n"
            "from pathlib import Path\n"
            "from tests.support import cross_encoder_network\n"
            "from openrerank.runtimes.openvino_runtime import OpenVinoRuntime\n"
            f"OpenVinoRuntime(cross_encoder_network(Path({str(model_copy)!r})), dtype='fp32', threads=1, "
            f"cache_dir=Path({str(cache)!r}))\n"
            "print('compiled', flush=True)\n")
    fd = os.open(compiled, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)  # as another replica compiling would
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=Path(__file__).parents[2], text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stderr), daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 120
        while not any("waiting for it" in line for line in lines):
            assert proc.poll() is None, f"compiled without waiting for the lock: {proc.stdout.read()} {lines}"
            assert time.monotonic() < deadline, f"never waited for the lock: {lines}"
            time.sleep(0.05)
        assert list(compiled.iterdir()) == []  # nothing written while another holds the lock
    finally:
        os.close(fd)  # the other replica is done
    out = proc.stdout.read()
    assert proc.wait(timeout=120) == 0 and "compiled" in out, lines
    assert any(compiled.rglob("*.blob"))


def test_the_first_inference_runs_alone_and_later_ones_at_once(tmp_path, model_copy, monkeypatch):
    """Two lanes' first batches given at once hung a server before ready: OpenVINO's bindings build a table on
    first use that two threads must not build together (`FirstCallAlone`). The process's first call runs
    alone; after it, calls run at once again (the lanes still overlap)."""
    import threading
    import time

    from openrerank.runtimes import openvino_runtime

    monkeypatch.setattr(openvino_runtime, "FIRST_CALL", openvino_runtime.FirstCallAlone())  # as in a new process
    runtime = OpenVinoRuntime(cross_encoder_network(model_copy), dtype="fp32", threads=2, cache_dir=tmp_path,
                              lanes=2)
    spans: list[tuple[float, float]] = []

    class Timed:
        """An infer request that says when each inference ran, and takes long enough to overlap another."""

        def __init__(self, request) -> None:
            self.request = request

        def infer(self, *args, **kwargs):
            start = time.monotonic()
            time.sleep(0.2)
            out = self.request.infer(*args, **kwargs)
            spans.append((start, time.monotonic()))
            return out

    timed = [Timed(runtime._requests.get()) for _ in range(runtime.lanes)]
    for request in timed:
        runtime._requests.put(request)
    ids = np.full((3, 12), 7, dtype=np.int64)
    features = {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids)}
    together = threading.Barrier(4)

    def call() -> np.ndarray:
        together.wait()
        return runtime.run(features)

    scores = run_concurrently(call, times=4)
    assert all(np.array_equal(s, scores[0]) for s in scores)
    spans.sort()
    assert len(spans) == 4
    first_end = spans[0][1]
    assert all(start >= first_end for start, _ in spans[1:]), f"a call ran beside the first: {spans}"
    assert spans[2][0] < spans[1][1], f"after the first call, two lanes did not run at once: {spans}"
    runtime.close()


def test_compiled_blobs_are_listed_with_the_openvino_build_that_wrote_them(tmp_path, model_copy):
    """OpenVINO imports only the blobs its own build wrote; those of another (an upgrade) and of the old shared
    layout are never read here (`openrerank cache prune`)."""
    from openrerank.runtimes.openvino_blobs import compiled_entries

    cache = tmp_path / "cache"
    OpenVinoRuntime(cross_encoder_network(model_copy), dtype="fp32", threads=1, cache_dir=cache)
    compiled = cache / openvino_blobs.COMPILED_DIR
    [mine] = compiled.glob("cpu-*/*/*.blob")
    older = mine.parent / "123.blob"
    older.write_bytes(mine.read_bytes()[:4096].replace(b'ie_version="', b'ie_version="1999.'))
    (compiled / "456.blob").write_bytes(b"an old shared blob")
    (compiled / "f32-0123456789abcdef").mkdir()
    before_cpus = compiled / "f32-0123456789abcdef" / "789.blob"
    before_cpus.write_bytes(mine.read_bytes())
    another_cpu = compiled / "cpu-000000000000000000000000" / mine.parent.name / mine.name
    another_cpu.parent.mkdir(parents=True)
    another_cpu.write_bytes(mine.read_bytes())
    found = {e.path: e for e in compiled_entries(compiled)}
    assert set(found) == {mine, older, compiled / "456.blob", before_cpus, another_cpu}
    assert found[mine].unusable is None and found[mine].size == mine.stat().st_size
    assert found[mine].built_with == {"openvino": convert.import_openvino().get_version(),
                                      "compile": f"{mine.parent.parent.name}/{mine.parent.name}"}
    assert found[another_cpu].unusable is None  # servers on that kind of CPU read it
    assert found[before_cpus].unusable == "the layout of openrerank before per-CPU folders (older versions)"
    assert found[older].unusable.startswith("openvino 1999.")
    assert "shared layout" in found[compiled / "456.blob"].unusable


def test_the_facts_every_ir_is_keyed_by_are_this_installs(model_copy):
    """`keyed_facts` is what `openrerank cache` holds entries to: every fact of the key but the model's."""
    for variant in convert.IR_VARIANTS:
        _, facts = convert.cache_key(cross_encoder_network(model_copy), variant)
        own = {"model_sha256", "head", "build_format", "variant"}  # the model's, its family's
        assert {k: v for k, v in facts.items() if k not in own} == convert.keyed_facts(variant)


def test_openvino_imports_without_a_home_and_writes_no_consent_file(tmp_path):
    """HOME unset and a uid with no passwd entry (`docker run --user 1234`): openvino_telemetry's consent check
    raised "Could not determine home directory." from `import openvino`, so `--backend auto` quietly lost
    OpenVINO and `export --backend openvino` was a traceback. (A fresh interpreter: this one imported it.)"""
    temp = tmp_path / "tmp"
    temp.mkdir()
    code = NO_HOME + (
        "from openrerank.runtimes.openvino_convert import import_openvino\n"
        "ov = import_openvino()\n"
        "print(ov.get_version() != '', 'HOME' in os.environ, 'CI' in os.environ)\n")
    env = {k: v for k, v in os.environ.items() if k not in ("CI", "XDG_CACHE_HOME")}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=REPO,
                          env={**env, "TMPDIR": str(temp), "PYTHONPATH": str(REPO / "src")})
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split() == ["True", "False", "False"]  # imported; HOME and CI as they were
    assert not list(temp.iterdir())  # the consent check declined (CI=true): no intel/openvino_telemetry file


# bf16 checked at load: a bf16 compile is held to fp32 on the probe batch (openvino_runtime.check_bf16).


def _poisoned(reference: np.ndarray | None) -> np.ndarray | None:
    """A reference the bf16 outputs are far from, as a wrong bf16 kernel's outputs are from a right one's."""
    return None if reference is None else -reference + 1.0


def test_the_conversion_records_its_fp32_outputs_on_the_probe_batch(tmp_path, model_copy):
    """The reference a bf16 compile is held to, kept with the IR; one of another probe batch is not used."""
    from openrerank.runtimes.openvino_convert import REFERENCE_KEY, probe_batch, recorded_reference

    ir = ensure_openvino(cross_encoder_network(model_copy), cache_dir=tmp_path)
    on_disk = json.loads((ir.path.parent / convert.META_FILE).read_text())
    probe = probe_batch(model_copy, on_disk["inputs"])
    reference = recorded_reference(on_disk, probe)
    assert reference is not None and reference.shape == (3, 1) and on_disk[REFERENCE_KEY]["shape"] == [3, 1]
    compiled = convert.import_openvino().Core().compile_model(str(ir.path), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    np.testing.assert_allclose(compiled(probe)[0], reference, atol=1e-3)
    other = {**probe, "input_ids": probe["input_ids"][:, ::-1].copy()}
    assert recorded_reference(on_disk, other) is None


def test_a_bf16_compile_far_from_fp32_is_refused(tmp_path, model_copy, monkeypatch):
    """openvino 2025.3 with transformers 4.56 served the default model wrongly in bf16, with no error; such a
    compile is refused at load, saying by how much and what to use instead."""
    from openrerank.runtimes import openvino_runtime

    real = openvino_runtime.recorded_reference
    monkeypatch.setattr(openvino_runtime, "recorded_reference", lambda meta, probe: _poisoned(real(meta, probe)))
    network = cross_encoder_network(model_copy)
    assert OpenVinoRuntime(network, dtype="fp32", threads=1, cache_dir=tmp_path).bf16_error is None  # fp32: exact
    with pytest.raises(ConversionError) as refused:
        OpenVinoRuntime(network, dtype="bf16", threads=1, cache_dir=tmp_path)
    message = str(refused.value)
    assert re.fullmatch(r"OpenVINO \S+ computes this model wrongly in bf16: on the probe batch it is [\d.]+ of the "
                        r"outputs' scale from fp32 \(bf16's rounding stays within 0\.2\); use --dtype fp32", message)
    assert len(message) <= 200  # what `auto`'s reason keeps of it


def test_a_refused_bf16_compile_leaves_no_blob_of_its_own(tmp_path, model_copy, monkeypatch):
    """A bf16 compile the load check refuses left its blob (a model's size) in the compiled cache, which every
    later start on this OpenVINO refused again or never read. The refusal deletes that blob and its record,
    whether this start wrote it or imported it, and nothing else: not the same model's fp32 blob, not another
    model's bf16 blob in the same configuration's folder."""
    from openrerank.runtimes import openvino_runtime

    cache, other = tmp_path / "cache", build_tiny_model(tmp_path / "other", seed=7)
    compiled = openvino_blobs.compiled_cache_dir(cache)
    network = cross_encoder_network(model_copy)
    OpenVinoRuntime(network, dtype="fp32", threads=1, cache_dir=cache)
    [fp32] = compiled.glob("cpu-*/f32-*/*.blob")
    OpenVinoRuntime(cross_encoder_network(other), dtype="bf16", threads=1, cache_dir=cache)
    [others] = compiled.glob("cpu-*/bf16-*/*.blob")
    OpenVinoRuntime(network, dtype="bf16", threads=1, cache_dir=cache)  # honest: kept, to be imported below
    [mine] = [b for b in compiled.glob("cpu-*/bf16-*/*.blob") if b != others]
    kept = {fp32, others, *(b.with_name(f"{b.name}.json") for b in (fp32, others))}
    assert all(p.is_file() for p in kept) and mine.with_name(f"{mine.name}.json").is_file()

    real, imported = openvino_runtime.import_openvino(), []

    class Core:  # notes whether each compile imported its blob
        def compile_model(self, *args):
            compiled_model = real.Core().compile_model(*args)
            imported.append(compiled_model.get_property("LOADED_FROM_CACHE"))
            return compiled_model

    monkeypatch.setattr(openvino_runtime, "import_openvino", lambda: type("ov", (), {"Core": Core}))
    monkeypatch.setattr(openvino_runtime, "BF16_TOLERANCE", -1.0)  # every bf16 compile refused
    for how in ("imported", "written"):
        with pytest.raises(ConversionError, match="wrongly in bf16"):
            OpenVinoRuntime(network, dtype="bf16", threads=1, cache_dir=cache)
        assert imported.pop() == (how == "imported")
        left = {p for p in compiled.glob("cpu-*/*/*") if p.name != openvino_blobs.CPU_FILE}
        assert left == kept, f"the refused blob it {how} (or another) is not as it should be"


def test_a_compile_whose_blob_write_failed_adopts_and_deletes_no_other_models_blob(tmp_path, model_copy,
                                                                                  monkeypatch):
    """OpenVINO 2026.4 does not fail a compile whose blob write fails (a full cache volume): it returns, having
    imported nothing and written nothing. The folder's lone unrecorded blob (a 0.1.0 build's) was then taken for
    this model's, recorded as its, and this model's refused bf16 deleted it: another model's blob."""
    from openrerank.runtimes import openvino_runtime

    cache, other = tmp_path / "cache", build_tiny_model(tmp_path / "other", seed=7)
    mine, theirs = cross_encoder_network(model_copy), cross_encoder_network(other)
    OpenVinoRuntime(theirs, dtype="bf16", threads=1, cache_dir=cache).close()
    [blob] = cache.glob("compiled/cpu-*/bf16-*/*.blob")
    record = blob.with_name(f"{blob.name}.json")
    record.unlink()  # as a 0.1.0 build with per-CPU folders left it
    real = openvino_runtime.import_openvino()

    class Core:  # the cache volume is full: every blob write fails, silently, as OpenVINO's do
        def compile_model(self, path, device, config):
            return real.Core().compile_model(path, device, {k: v for k, v in config.items() if k != "CACHE_DIR"})

    monkeypatch.setattr(openvino_runtime, "import_openvino", lambda: type("ov", (), {"Core": Core}))
    OpenVinoRuntime(mine, dtype="bf16", threads=1, cache_dir=cache).close()
    assert not record.exists(), f"another model's blob recorded as this one's: {record.read_text()}"
    monkeypatch.setattr(openvino_runtime, "BF16_TOLERANCE", -1.0)
    with pytest.raises(ConversionError, match="wrongly in bf16"):
        OpenVinoRuntime(mine, dtype="bf16", threads=1, cache_dir=cache)
    assert blob.exists(), "this model's refused bf16 compile deleted another model's blob"


def test_an_ir_without_a_recorded_reference_is_held_to_its_f32_compile(tmp_path, model_copy, monkeypatch):
    """An IR an earlier version converted recorded no fp32 outputs: the same IR compiled at f32 is the reference."""
    from openrerank.runtimes import openvino_runtime
    from openrerank.runtimes.openvino_convert import REFERENCE_KEY

    network = cross_encoder_network(model_copy)
    meta_file = ensure_openvino(network, cache_dir=tmp_path).path.parent / convert.META_FILE
    meta = json.loads(meta_file.read_text())
    del meta[REFERENCE_KEY]
    meta_file.write_text(json.dumps(meta))
    computed = []
    real = openvino_runtime._f32_reference

    def counting(*args):
        computed.append(real(*args))
        return computed[-1]

    monkeypatch.setattr(openvino_runtime, "_f32_reference", counting)
    honest = OpenVinoRuntime(network, dtype="bf16", threads=1, cache_dir=tmp_path)
    assert len(computed) == 1 and honest.bf16_error < openvino_runtime.BF16_TOLERANCE
    monkeypatch.setattr(openvino_runtime, "_f32_reference", lambda *args: _poisoned(real(*args)))
    with pytest.raises(ConversionError, match="wrongly in bf16"):
        OpenVinoRuntime(network, dtype="bf16", threads=1, cache_dir=tmp_path)


def test_a_pre_exported_graph_is_held_to_onnx_runtime_in_bf16(exported_dir, monkeypatch):
    """A pre-exported folder's bf16 compile is held to ONNX Runtime's outputs, computed as the folder loads."""
    real = convert._diff_from_onnxruntime
    network = cross_encoder_network(exported_dir)
    assert OpenVinoRuntime(network, dtype="bf16", threads=1).bf16_error < 0.2
    monkeypatch.setattr(convert, "_diff_from_onnxruntime", lambda *a: (real(*a)[0], _poisoned(real(*a)[1])))
    with pytest.raises(ConversionError, match="wrongly in bf16"):
        OpenVinoRuntime(network, dtype="bf16", threads=1)


@pytest.mark.parametrize("choice", ["rules", "measure"])
def test_auto_serves_the_next_runtime_when_bf16_is_refused(tmp_path, model_copy, monkeypatch, cpuinfo, choice):
    """On a CPU with bf16 units `auto` plans OpenVINO bf16 first; refused, the next runtime serves, and says why.
    An explicit `--backend openvino --dtype bf16` fails at start with the refusal."""
    from openrerank.runtimes import openvino_runtime

    cpuinfo("sapphirerapids")  # avx512_bf16 and AMX: OpenVINO bf16 is planned (OpenVINO runs it here or in f32)
    real = openvino_runtime.recorded_reference
    monkeypatch.setattr(openvino_runtime, "recorded_reference", lambda meta, probe: _poisoned(real(meta, probe)))
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))  # timings of its own: bf16 timed, then refused
    served = load_model(str(model_copy), LoadOptions(backend_choice=choice))
    assert (served.runtime_choice.runtime, served.runtime_choice.dtype) != ("openvino", "bf16")
    assert "OpenVINO bf16 refused it (ConversionError: OpenVINO" in served.runtime_choice.reason
    assert "wrongly in bf16" in served.runtime_choice.reason
    with pytest.raises(ConversionError, match="use --dtype fp32"):
        load_model(str(model_copy), LoadOptions(backend="openvino", dtype="bf16"))


@pytest.mark.parametrize("choice", ["rules", "measure"])
def test_backend_openvino_with_dtype_auto_falls_back_to_its_fp32_when_bf16_is_refused(tmp_path, model_copy,
                                                                                       monkeypatch, cpuinfo, caplog,
                                                                                       choice):
    """`--backend openvino` with `--dtype auto` planned OpenVINO bf16 alone on a CPU with bf16 units: a bf16
    compile refused at load failed the start (exit 3, "use --dtype fp32"), where only an explicit `--dtype bf16`
    should. It serves OpenVINO fp32, with a warning that says why."""
    from openrerank.runtimes import openvino_runtime

    cpuinfo("sapphirerapids")  # avx512_bf16 and AMX: OpenVINO bf16 is planned (OpenVINO runs it here or in f32)
    real = openvino_runtime.recorded_reference
    monkeypatch.setattr(openvino_runtime, "recorded_reference", lambda meta, probe: _poisoned(real(meta, probe)))
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    with caplog.at_level("WARNING"):
        served = load_model(str(model_copy), LoadOptions(backend="openvino", backend_choice=choice))
    assert (served.runtime_choice.runtime, served.runtime_choice.dtype) == ("openvino", "fp32")
    assert "OpenVINO bf16 refused it (ConversionError: OpenVINO" in served.runtime_choice.reason
    assert any(r.levelname == "WARNING" and "wrongly in bf16" in r.getMessage() for r in caplog.records)


def test_honest_bf16_passes_the_check_on_a_cpu_with_bf16_units(tiny_model_dir):
    """Where OpenVINO runs bf16 (the rule that plans it), an honest compile is well within the bound: the tiny
    cross-encoder and the default bi-encoder (measured 0.0026 and 0.0053, the bound 0.2)."""
    from openrerank.runtimes.openvino_runtime import BF16_TOLERANCE
    from openrerank.runtimes.selection import _openvino_bf16, cpu_flags

    if not _openvino_bf16(cpu_flags()):
        pytest.skip("OpenVINO runs no bf16 on this CPU")
    for model in (str(tiny_model_dir), "default"):
        served = load_model(model, LoadOptions(backend="openvino", dtype="bf16"))
        assert served.scorer.description == "openvino-bf16-cpu"
        assert 0 < served.scorer.runtime.bf16_error < BF16_TOLERANCE / 10

"""The ONNX export cache: reused across starts, invalidated by a changed model, safe under concurrency."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from openrerank.runtimes import onnx_export as export
from openrerank.runtimes.artifact_cache import publish
from openrerank.runtimes.onnx_export import CACHE_ENV, ExportError, default_cache_dir, ensure_onnx
from tests.support import (
    build_as_an_earlier_version,
    build_tiny_model,
    cross_encoder_network,
    drop_classifier,
    run_concurrently,
    runs_alike_at_once,
)


@pytest.fixture
def export_counter(monkeypatch) -> list[Path]:
    """Records every real torch export."""
    calls: list[Path] = []
    real = export._torch_export

    def counting(network, *args, **kwargs):
        calls.append(Path(network.path))
        return real(network, *args, **kwargs)

    monkeypatch.setattr(export, "_torch_export", counting)
    return calls


def test_second_load_reuses_the_cache(tmp_path, model_copy, export_counter):
    cache = tmp_path / "cache"
    first = ensure_onnx(cross_encoder_network(model_copy), cache_dir=cache)
    assert not first.cached and len(export_counter) == 1
    mtime = first.path.stat().st_mtime_ns
    second = ensure_onnx(cross_encoder_network(model_copy), cache_dir=cache)
    assert second.cached and second.path == first.path
    assert len(export_counter) == 1
    assert second.path.stat().st_mtime_ns == mtime
    meta = json.loads((first.path.parent / export.META_FILE).read_text())
    assert meta["dtype"] == "fp32" and meta["opset"] >= 17 and meta["inputs"][0] == "input_ids"
    assert "Attention" in meta["fusions"]  # the transformer optimizer fused the BERT attention


def test_runtime_second_start_does_not_export(model_copy, export_counter, tmp_path, monkeypatch):
    from openrerank.engine.loading import LoadOptions, load_model

    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "fresh-cache"))  # the run's shared cache may hold it

    a = load_model(str(model_copy), LoadOptions(backend="onnx", backend_choice="rules"))  # timing would build it too
    b = load_model(str(model_copy), LoadOptions(backend="onnx", backend_choice="rules"))
    assert not a.scorer.runtime.export.cached
    assert b.scorer.runtime.export.cached
    assert len(export_counter) == 1
    passages = ["paris france", "banana"]
    np.testing.assert_array_equal(a.score("paris", passages), b.score("paris", passages))


def test_changed_weights_or_config_invalidate(tmp_path, model_copy, export_counter):
    cache = tmp_path / "cache"
    first = ensure_onnx(cross_encoder_network(model_copy), cache_dir=cache)
    build_tiny_model(model_copy, seed=7)  # same files, new weights
    second = ensure_onnx(cross_encoder_network(model_copy), cache_dir=cache)
    assert not second.cached and second.path != first.path
    config = json.loads((model_copy / "config.json").read_text())
    config["layer_norm_eps"] = 1e-6
    (model_copy / "config.json").write_text(json.dumps(config))
    third = ensure_onnx(cross_encoder_network(model_copy), cache_dir=cache)
    assert not third.cached and third.path not in (first.path, second.path)
    assert len(export_counter) == 3
    # The tokenizer does not shape the graph: editing it keeps the cache.
    (model_copy / "tokenizer_config.json").write_text("{}")
    assert ensure_onnx(cross_encoder_network(model_copy), cache_dir=cache).cached


def test_int8_is_cached_on_top_of_fp32(tmp_path, model_copy, export_counter):
    cache = tmp_path / "cache"
    q = ensure_onnx(cross_encoder_network(model_copy), dtype="int8", cache_dir=cache)
    assert not q.cached and "int8" in q.meta["quantization"]
    assert ensure_onnx(cross_encoder_network(model_copy), dtype="fp32", cache_dir=cache).cached
    assert ensure_onnx(cross_encoder_network(model_copy), dtype="int8", cache_dir=cache).cached
    assert len(export_counter) == 1
    assert q.path.stat().st_size < ensure_onnx(cross_encoder_network(model_copy), cache_dir=cache).path.stat().st_size


def test_concurrent_starts_share_one_valid_export(tmp_path, model_copy):
    cache = tmp_path / "cache"
    results = run_concurrently(lambda: ensure_onnx(cross_encoder_network(model_copy), cache_dir=cache))
    assert len({r.path for r in results}) == 1
    assert [p.name for p in cache.iterdir() if p.name.startswith(".")] == []  # no temp dirs left behind
    import onnxruntime as ort

    ort.InferenceSession(str(results[0].path), providers=["CPUExecutionProvider"])


def _export_in_a_process(model_dir: Path, cache: Path, ready_dir: Path, index: int) -> bool:
    """Child process: import everything, meet the sibling, then start at once; True if it reused an export."""
    import time

    import onnxruntime  # noqa: F401 - the imports are slow; get them out of the race
    import torch  # noqa: F401
    import transformers  # noqa: F401

    (ready_dir / str(index)).touch()
    deadline = time.monotonic() + 120
    while len(list(ready_dir.iterdir())) < 2 and time.monotonic() < deadline:
        time.sleep(0.005)
    return ensure_onnx(cross_encoder_network(model_dir), cache_dir=cache).cached


def test_processes_starting_together_export_once(tmp_path, model_copy):
    """Two replicas on one cache: the first exports under the cache lock, the other waits and reuses it."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    cache, ready = tmp_path / "cache", tmp_path / "ready"
    ready.mkdir()
    with ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = [pool.submit(_export_in_a_process, model_copy, cache, ready, i) for i in range(2)]
        reused = sorted(f.result(timeout=300) for f in futures)
    assert reused == [False, True]
    assert len([p for p in cache.iterdir() if not p.name.startswith(".")]) == 1


def test_failed_export_leaves_nothing(tmp_path, model_copy, monkeypatch):
    cache = tmp_path / "cache"

    def broken(*args, **kwargs):
        raise ExportError("simulated failure")

    monkeypatch.setattr(export, "_fuse", broken)
    with pytest.raises(ExportError, match="simulated"):
        ensure_onnx(cross_encoder_network(model_copy), cache_dir=cache)
    assert list(cache.iterdir()) == []


def test_a_full_disk_names_the_cache_folder_and_the_setting(tmp_path, model_copy, monkeypatch):
    """On a full disk the export said only "could not be exported to ONNX: OSError: [Errno 28] No space left on
    device", as if the model could not be exported: the disk is named, and the error stays an OSError (ENOSPC), a
    passing state `auto` does not remember as the runtime refusing the model."""
    import errno

    cache = tmp_path / "cache"

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(export, "_torch_export", full)
    with pytest.raises(OSError) as raised:
        ensure_onnx(cross_encoder_network(model_copy), cache_dir=cache)
    assert raised.value.errno == errno.ENOSPC and not isinstance(raised.value, ExportError)
    message = str(raised.value)
    assert f"no space for the ONNX export in the cache folder {cache}" in message and CACHE_ENV in message
    assert list(cache.iterdir()) == []  # the staging folder went with it


def test_bad_options_are_refused(model_copy, tmp_path):
    with pytest.raises(ExportError, match="dtype"):
        ensure_onnx(cross_encoder_network(model_copy), dtype="bf16", cache_dir=tmp_path)
    with pytest.raises(ExportError, match="opset"):
        ensure_onnx(cross_encoder_network(model_copy), opset=13, cache_dir=tmp_path)


def test_cache_dir_env_override(monkeypatch, tmp_path):
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "elsewhere"))
    assert default_cache_dir() == tmp_path / "elsewhere"
    monkeypatch.delenv(CACHE_ENV)
    assert default_cache_dir() == Path.home() / ".cache" / "openrerank" / "onnx"


def test_export_command_prints_the_cached_path(tmp_path, model_copy, capsys):
    from openrerank.cli.main import main

    cache = tmp_path / "cache"
    assert main(["export", "--model", str(model_copy), "--cache-dir", str(cache)]) == 0
    out = capsys.readouterr()
    path = Path(out.out.strip())
    assert path.is_file() and path.parent.parent == cache and "exported" in out.err
    assert main(["export", "--model", str(model_copy), "--cache-dir", str(cache), "--out", str(tmp_path / "o")]) == 0
    out = capsys.readouterr()
    assert Path(out.out.strip()) == tmp_path / "o" / "model.onnx" and "cached" in out.err
    assert (tmp_path / "o" / "export.json").is_file()
    assert main(["export", "--model", str(tmp_path / "missing"), "--cache-dir", str(cache)]) == 2


def test_an_export_without_torch_says_in_one_line_where_one_can_run(tmp_path, model_copy, monkeypatch):
    """The serving image's environment has no PyTorch: `openrerank export` (or serving a model folder there)
    said only "... could not be exported to ONNX: ModuleNotFoundError: No module named 'torch'"."""
    import sys

    cache = tmp_path / "cache"
    network = cross_encoder_network(model_copy)
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` is blocked, as where it is not installed
    with pytest.raises(ExportError) as raised:
        ensure_onnx(network, cache_dir=cache)
    message = str(raised.value)
    assert "\n" not in message and "ModuleNotFoundError" not in message
    assert "the export needs PyTorch and the onnx package (torch is not installed" in message
    assert "export image" in message and "scripts/install-torch.sh" in message
    assert list(cache.iterdir()) == []  # nothing half-written left behind


def test_export_command_rebuilds_a_damaged_entry(tmp_path, model_copy, capsys):
    """A truncated model.onnx was reported "cached" with status 0, and every server start then failed on it."""
    from openrerank.cli.main import main

    cache = tmp_path / "cache"
    assert main(["export", "--model", str(model_copy), "--cache-dir", str(cache)]) == 0
    path = Path(capsys.readouterr().out.strip())
    size = path.stat().st_size
    with path.open("r+b") as f:
        f.truncate(1000)
    assert main(["export", "--model", str(model_copy), "--cache-dir", str(cache)]) == 0
    out = capsys.readouterr()
    assert "exported" in out.err and Path(out.out.strip()) == path and path.stat().st_size == size


def test_a_damaged_pre_exported_directory_is_refused_naming_what_is_wrong(tmp_path, model_copy):
    """`export --out DIR` (a container image's model): never rebuilt, but refused with the reason, not an
    ONNX Runtime protobuf error."""
    from openrerank.cli.main import main
    from openrerank.runtimes.onnx_export import servable_export

    out = tmp_path / "servable"
    assert main(["export", "--model", str(model_copy), "--out", str(out), "--cache-dir", str(tmp_path / "c")]) == 0
    with (out / export.MODEL_FILE).open("r+b") as f:
        f.truncate(1000)
    with pytest.raises(ExportError, match=r"damaged ONNX export \(model.onnx has 1000 bytes, \d+ when it was built"):
        servable_export(cross_encoder_network(out), "fp32")


def test_publish_race_keeps_the_first_copy(tmp_path):
    """Another process renamed its export into place first: ours is discarded, theirs kept intact."""
    final = tmp_path / "key-fp32"
    final.mkdir()
    (final / export.MODEL_FILE).write_bytes(b"theirs")
    (final / export.META_FILE).write_text("{}")
    ours = tmp_path / ".key-tmp"
    ours.mkdir()
    (ours / export.MODEL_FILE).write_bytes(b"ours")
    assert publish(ours, final, export.META_FILE, export.MODEL_FILE) is False
    assert not ours.exists()
    assert (final / export.MODEL_FILE).read_bytes() == b"theirs"
    fresh = tmp_path / ".other-tmp"
    fresh.mkdir()
    assert publish(fresh, tmp_path / "new-fp32", export.META_FILE, export.MODEL_FILE) is True


def test_export_out_is_a_servable_directory_without_torch_weights(tmp_path, model_copy, monkeypatch):
    """`export --out DIR` gives model.onnx + export.json + tokenizer/config, no weights; it loads (on ONNX
    Runtime, never on torch), scores like the source model, and a torch export is never attempted."""
    from openrerank.cli.main import main
    from openrerank.engine.loading import LoadOptions, load_model, resolve_model
    from openrerank.sources.safety import check_weights

    out = tmp_path / "servable"
    assert main(["export", "--model", str(model_copy), "--out", str(out), "--cache-dir", str(tmp_path / "c")]) == 0
    names = {p.name for p in out.iterdir()}
    assert {"model.onnx", "export.json", "config.json", "tokenizer.json"} <= names
    assert not any(n.endswith((".safetensors", ".bin")) for n in names)
    assert check_weights(out, allow_pickle=False) == "onnx"
    source = load_model(str(model_copy), LoadOptions(backend="onnx"))
    monkeypatch.setattr(export, "_torch_export", lambda *a, **k: pytest.fail("exported again"))
    served = load_model(str(out), LoadOptions(backend="onnx"))
    assert served.weights_format == "onnx" and served.scorer.description == "onnx-fp32-cpu"
    passages = ["paris is the capital of france", "bananas are yellow"]
    assert np.allclose(served.score("capital of france", passages), source.score("capital of france", passages),
                       atol=1e-6)
    with pytest.raises(ValueError, match=r"^--backend torch: .* served on CPU by openvino or onnx"):
        load_model(str(out), LoadOptions(backend="torch"))
    with pytest.raises(ValueError, match=r"^OPENRERANK_BACKEND='torch': .* served on CPU by openvino or onnx"):
        resolve_model(str(out), LoadOptions(backend="torch"), {"backend": "OPENRERANK_BACKEND='torch'"})
    with pytest.raises(ExportError, match="serve it with --dtype fp32"):
        load_model(str(out), LoadOptions(backend="onnx", dtype="int8"))


def test_an_entry_an_earlier_build_made_is_not_served_where_this_build_refuses_the_model(tmp_path, model_copy,
                                                                                        monkeypatch):
    """A version that did not refuse a cross-encoder lacking its `classifier.*` tensors cached an export of its
    random head; its successor, which refuses that checkpoint, found the entry by the same key and served random
    scores. The family's build format keys the entry: the build runs again, and refuses."""
    headless, cache = drop_classifier(model_copy), tmp_path / "cache"
    with monkeypatch.context() as earlier:
        build_as_an_earlier_version(earlier)
        assert not ensure_onnx(cross_encoder_network(headless), cache_dir=cache).cached
    with pytest.raises(ExportError, match=r"lacks 2 tensors of a BertForSequenceClassification"):
        ensure_onnx(cross_encoder_network(headless), cache_dir=cache)


def test_an_out_directory_an_earlier_build_made_is_refused_naming_both_build_formats(tmp_path, model_copy,
                                                                                      monkeypatch):
    """`export --out` of that checkpoint by the earlier version (its export.json without a build format) is never
    rebuilt, so it is refused, on either runtime that reads it, rather than served with its random head."""
    from openrerank.cli.main import main
    from openrerank.engine.loading import LoadOptions, load_model
    from openrerank.runtimes.openvino_convert import openvino_available

    out = tmp_path / "servable"
    with monkeypatch.context() as earlier:
        build_as_an_earlier_version(earlier)
        assert main(["export", "--model", str(drop_classifier(model_copy)), "--out", str(out),
                     "--cache-dir", str(tmp_path / "c")]) == 0
    meta = json.loads((out / export.META_FILE).read_text())
    meta.pop("build_format", None)  # as the earlier version wrote it
    (out / export.META_FILE).write_text(json.dumps(meta))
    refused = r"exported by an older openrerank \(network build format none; this one builds format 1, "
    with pytest.raises(ExportError, match=refused):
        load_model(str(out), LoadOptions(backend="onnx"))
    if openvino_available():
        with pytest.raises(Exception, match=refused):
            load_model(str(out), LoadOptions(backend="openvino"))


@pytest.mark.parametrize(("field", "value", "refused"), [
    ("format", export.EXPORT_FORMAT + 1, rf"written by a newer openrerank \(export format {export.EXPORT_FORMAT + 1}; "
                                         rf"this one reads {export.EXPORT_FORMAT} and older\)"),
    ("build_format", 2, r"exported by a newer openrerank \(network build format 2; this one builds format 1, "),
])
def test_an_out_directory_a_newer_version_wrote_is_refused_naming_both_numbers(tmp_path, model_copy, field, value,
                                                                               refused):
    """An older server meeting what an upgraded export job wrote served it whatever its numbers said."""
    from openrerank.cli.main import main
    from openrerank.runtimes.onnx_export import servable_export

    out = tmp_path / "servable"
    assert main(["export", "--model", str(model_copy), "--out", str(out), "--cache-dir", str(tmp_path / "c")]) == 0
    assert servable_export(cross_encoder_network(out), "fp32") is not None  # as written, served
    meta = json.loads((out / export.META_FILE).read_text())
    (out / export.META_FILE).write_text(json.dumps({**meta, field: value}))
    with pytest.raises(ExportError, match=refused):
        servable_export(cross_encoder_network(out), "fp32")


def test_caches_follow_xdg_cache_home(monkeypatch, tmp_path):
    """The XDG base-directory spec: $XDG_CACHE_HOME when set to an absolute path, else ~/.cache."""
    from openrerank.runtimes import openvino_convert
    from openrerank.runtimes.artifact_cache import CACHE_ENV, cache_root

    monkeypatch.delenv(CACHE_ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert cache_root() == tmp_path / "openrerank" / "onnx"
    assert openvino_convert.default_cache_dir() == tmp_path / "openrerank" / "openvino"
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/path")  # not absolute: ignored, as the spec says
    assert cache_root() == Path("~/.cache/openrerank/onnx").expanduser()
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "mine"))  # the explicit setting still wins
    assert cache_root() == tmp_path / "mine"
def test_cache_keys_are_computed_without_torch(tmp_path, model_copy, monkeypatch):
    """A torch-free server (the container image) must find what `openrerank export` wrote into the cache:
    the keys of ONNX exports and OpenVINO IRs are computed without importing PyTorch."""
    import sys

    from openrerank.runtimes import openvino_convert as ovc

    cache = tmp_path / "cache"
    onnx = ensure_onnx(cross_encoder_network(model_copy), cache_dir=cache)
    ir = ovc.ensure_openvino(cross_encoder_network(model_copy), cache_dir=cache / "openvino")
    assert onnx.meta["torch"] and ir.meta["torch"]  # recorded for inspection, not keyed
    monkeypatch.setitem(sys.modules, "torch", None)  # from here on `import torch` raises ImportError
    network = cross_encoder_network(model_copy)
    assert export.cache_key(network, dtype="fp32", opset=export.DEFAULT_OPSET)[0] == onnx.key
    assert ovc.cache_key(network, "fp32")[0] == ir.key
    assert ensure_onnx(network, cache_dir=cache).cached
    assert ovc.ensure_openvino(network, cache_dir=cache / "openvino").cached


def test_onnx_runtime_lanes_split_the_threads_and_run_at_once(tmp_path, model_copy, monkeypatch):
    """With `OPENRERANK_LANES=2` one session takes concurrent runs, each on half the threads, and scores
    as one lane does; unset, ONNX Runtime keeps one lane on every thread."""
    from openrerank.runtimes.base import LANES_ENV
    from openrerank.runtimes.onnx_runtime import OnnxRuntime

    network = cross_encoder_network(model_copy)
    monkeypatch.delenv(LANES_ENV, raising=False)
    single = OnnxRuntime(network, threads=2, cache_dir=tmp_path)
    assert single.lanes == 1 and single.threads == 2
    chosen = OnnxRuntime(network, threads=2, cache_dir=tmp_path, lanes=2)  # as `auto` measured
    assert chosen.lanes == 2 and chosen.session.get_session_options().intra_op_num_threads == 1
    chosen.close()
    monkeypatch.setenv(LANES_ENV, "2")
    laned = OnnxRuntime(network, threads=2, cache_dir=tmp_path)
    assert laned.lanes == 2 and laned.threads == 2
    runs_alike_at_once(laned, single, callers=2, seed=2)


def test_the_facts_every_export_is_keyed_by_are_this_installs(model_copy):
    """`keyed_facts` is what `openrerank cache` holds entries to: every fact of the key but the model's own."""
    _, facts = export.cache_key(cross_encoder_network(model_copy), dtype="fp32", opset=export.DEFAULT_OPSET)
    own = {"model_sha256", "head", "build_format", "dtype", "opset"}  # the model's, its family's
    assert {k: v for k, v in facts.items() if k not in own} == export.keyed_facts()

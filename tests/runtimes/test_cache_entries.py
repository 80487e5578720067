"""Cache entries on disk: what a complete one is, and replacing a damaged one."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from openrerank.runtimes.artifact_cache import ensure_artifact
from openrerank.runtimes.cache_entries import check_entry, publish

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

"""The entries of the converted-model cache on disk: what a complete one is, publishing and discarding one.

An entry's metadata lists every file its build wrote, with its size (`entry_files`); a hit checks them
(`check_entry`), so a truncated, deleted or emptied file (a full disk, a hand copy, a cleaner) or unreadable
metadata is found and built again (`artifact_cache.ensure_artifact`) instead of failing every start.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path

log = logging.getLogger(__name__)


def publish(tmp: Path, final: Path, meta_file: str, model_file: str) -> bool:
    """Atomically move a finished build into place; False when another process got there first (and its
    entry passes `check_entry`). A damaged entry in the way is replaced, not kept over the new build."""
    try:
        os.rename(tmp, final)
        return True
    except OSError:
        if not final.is_dir():
            raise
        meta, damage = check_entry(final, model_file, meta_file)
        if meta is not None:
            shutil.rmtree(tmp, ignore_errors=True)
            return False
        log.warning("cache entry %s is damaged (%s): replacing it with the new build", final, damage)
        discard(final)
        os.rename(tmp, final)
        return True


def entry_files(folder: Path, meta_file: str) -> dict[str, int]:
    """Every file a build wrote into `folder` (path inside it -> size in bytes), its metadata file excepted:
    what `check_entry` holds a later hit to."""
    files = (p for p in sorted(folder.rglob("*")) if p.is_file())
    return {p.relative_to(folder).as_posix(): p.stat().st_size for p in files
            if p.relative_to(folder).as_posix() != meta_file}


def check_entry(folder: Path, model_file: str, meta_file: str) -> tuple[dict | None, str | None]:
    """(metadata, None) for a complete entry; (None, None) when there is none; (None, what is wrong) for a
    damaged one: metadata missing or not a JSON object, a listed file missing or of another size than built.

    Sizes, not hashes: hashing the default model's 87 MB model.onnx took 0.14 s next to 0.35 s to open it,
    and a model of gigabytes would pay seconds every start. Entries from before files were listed (no `files`)
    are held to their model file being there and not empty."""
    try:
        text = (folder / meta_file).read_text(encoding="utf-8")
    except OSError as exc:
        if not folder.exists():
            return None, None
        return None, f"{meta_file} is missing" if isinstance(exc, FileNotFoundError) else \
            f"{meta_file} cannot be read ({exc.strerror or exc})"
    try:
        meta = json.loads(text)
    except ValueError:
        return None, f"{meta_file} is not JSON"
    if not isinstance(meta, dict):
        return None, f"{meta_file} holds a JSON {type(meta).__name__}, not an object"
    files = meta.get("files", {model_file: None})
    if not isinstance(files, dict) or model_file not in files:
        return None, f"{meta_file} does not list {model_file}"
    for name, size in files.items():
        try:
            actual = (folder / name).stat().st_size
        except OSError:
            return None, f"{name} is missing"
        if size is None and actual == 0:
            return None, f"{name} is empty"
        if size is not None and actual != size:
            return None, f"{name} has {actual} bytes, {size} when it was built"
    return meta, None


def read_meta(folder: Path, model_file: str, meta_file: str) -> dict | None:
    """The metadata of a complete cache folder (`check_entry`), None when it is absent, unfinished or damaged."""
    return check_entry(folder, model_file, meta_file)[0]


def discard(folder: Path) -> None:
    """Remove a damaged entry: renamed aside first (atomic: nobody opens half of it), then deleted."""
    aside = folder.parent / f".{folder.name}-discarded-{os.getpid()}-{time.monotonic_ns()}"
    try:
        os.rename(folder, aside)
    except FileNotFoundError:  # another process discarded it first
        return
    shutil.rmtree(aside, ignore_errors=True)

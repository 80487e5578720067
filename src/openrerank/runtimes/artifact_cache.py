"""The on-disk cache of converted models (ONNX exports, OpenVINO IRs): keys, atomic publication, metadata.

Converting a model costs seconds to minutes, so each result is stored once under a key that hashes the
model's content (config + weights, not mtimes) and everything else that shapes the result (the network's
head, dtype, converter versions, recipe number). A plain restart finds the folder and reuses it; an edited
checkpoint or an upgraded converter gets a new key. Versions are read from package metadata, never by
importing, and PyTorch's is recorded but not keyed: a server without PyTorch (the container image, serving
from a read-only cache an `openrerank export` job filled) computes the same key as the exporter did, and
every build is checked numerically against PyTorch when it is made.

Each result is built in a temporary folder beside its final place and renamed into place, so two servers
starting at once never read a half-written model: the first rename wins, the other discards its copy.
Within one process builds take turns on a lock (exporters keep global state); across processes (replicas
starting together) they take turns under a `flock` on the cache directory, so one builds and the others
wait and reuse its result.

Nothing is collected by itself: an upgrade keys new entries, and the old ones stay until `openrerank cache prune`
removes them (`prune`), under the same locks; a hit dates its entry (`cache_entries.mark_used`) for its
`--unused-days`.

A damaged entry is built again, once, under the lock, and a staging folder a killed build left is removed by the
next build (`runtimes/cache_entries.py`); a runtime that cannot open a cached file that passed the checks, twice
and not for want of memory or threads, gets it built again once too (`open_cached`).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from openrerank.runtimes.base import out_of_resources
from openrerank.runtimes.cache_entries import (
    Entry,
    building,
    check_entry,
    discard,
    entry_files,
    mark_used,
    publish,
    read_meta,
    remove_entry,
    remove_stale_staging,
    staging_prefix,
)
from openrerank.sources.safety import file_sha256

log = logging.getLogger(__name__)

#: Root of every converted-model cache (ONNX exports directly in it, OpenVINO IRs in `openvino/`).
CACHE_ENV = "OPENRERANK_CACHE_DIR"

# Files whose bytes decide a converted graph; the tokenizer does not.
_WEIGHT_SUFFIXES = (".safetensors", ".bin")
# One build at a time per process: torch.onnx.export and the OpenVINO converter trace through global state.
BUILD_LOCK = threading.RLock()
_flock_depth = 0  # > 0 while this process holds a cache directory's flock (guarded by BUILD_LOCK)
T = TypeVar("T")


@dataclass(frozen=True)
class CachedArtifact:
    path: Path  # the model file to load (model.onnx, model.xml)
    cached: bool  # True when an earlier build was reused
    key: str
    meta: dict


class NoCacheFolderError(ValueError):
    """No folder can hold the cache: neither `OPENRERANK_CACHE_DIR` nor an absolute `XDG_CACHE_HOME` is set,
    and no home folder resolves (HOME unset and a uid without a passwd entry: `docker run --user 1234` of an
    image that lacks the user, `env -i`). A setting to fix, like a flag's value, not a model's fault."""


def home_path(path: str) -> Path:
    """`path` with a leading `~` expanded. Where there is no home to expand it to, Python says only "Could not
    determine home directory.", so the error names the cache settings that avoid the home instead."""
    try:
        return Path(path).expanduser()
    except RuntimeError:
        raise NoCacheFolderError(f"cannot find a home folder for the model cache {path} (HOME is unset and this user "
                                 f"has no home in the passwd database): set {CACHE_ENV} or XDG_CACHE_HOME to a "
                                 "writable folder") from None


def user_cache_dir() -> Path:
    """`$XDG_CACHE_HOME/openrerank` (the XDG base-directory spec; `~/.cache/openrerank` when it is unset or
    not an absolute path, as the spec says)."""
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    base = Path(xdg) if xdg and Path(xdg).is_absolute() else home_path("~/.cache")
    return base / "openrerank"


def cache_root() -> Path:
    """`$OPENRERANK_CACHE_DIR` when set, else `$XDG_CACHE_HOME/openrerank/onnx` (where ONNX exports always
    lived)."""
    env = os.environ.get(CACHE_ENV)
    if env:
        return home_path(env)
    return user_cache_dir() / "onnx"


def cache_folder(name: str) -> Path:
    """The cache folder `name` beside the ONNX exports: `$OPENRERANK_CACHE_DIR/<name>` when set, else
    `$XDG_CACHE_HOME/openrerank/<name>` (`user_cache_dir`)."""
    env = os.environ.get(CACHE_ENV)
    return (home_path(env) if env else user_cache_dir()) / name


def model_fingerprint(model_dir: Path) -> str:
    """Content hash of config.json and the weight files: what a converted graph depends on.

    The weight files are the folder's own and those in the folders of its sentence-transformers modules
    (`modules.json`: a Dense layer's `2_Dense/model.safetensors` is part of a bi-encoder's graph).

    One start asks for it several times (the runtime timing's key, each conversion's, the served speed's);
    each asking read every weight byte (7 times for the default model from an empty cache: 0.07 s each here,
    seconds each for a model of gigabytes). So the hash is remembered for files whose identity, size and
    modification time are unchanged: a rewritten or edited file is hashed again."""
    model_dir = Path(model_dir)
    folders = [model_dir, *_module_folders(model_dir)]
    weights = sorted(p for d in folders for p in d.iterdir() if p.is_file() and p.name.endswith(_WEIGHT_SUFFIXES))
    files = [f for f in [model_dir / "config.json", *weights] if f.is_file()]
    stats = tuple((f.relative_to(model_dir).as_posix(), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns,
                   st.st_ctime_ns) for f, st in ((f, f.stat()) for f in files))
    return _fingerprint(str(model_dir), stats)


def _module_folders(model_dir: Path) -> list[Path]:
    """The sub-folders `modules.json` names (none when it is absent or unreadable)."""
    try:
        modules = json.loads((model_dir / "modules.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return []
    paths = {str(m.get("path") or "") for m in modules if isinstance(m, dict)} if isinstance(modules, list) else ()
    inside = [p for p in map(Path, sorted(paths)) if p.parts and not p.is_absolute() and ".." not in p.parts]
    return [model_dir / p for p in inside if p != Path(".") and (model_dir / p).is_dir()]


@functools.lru_cache(maxsize=64)
def _fingerprint(model_dir: str, stats: tuple) -> str:
    h = hashlib.sha256()
    for name, *_ in stats:
        h.update(name.encode())
        h.update(file_sha256(Path(model_dir) / name).encode())
    return h.hexdigest()


def package_versions(*names: str) -> dict[str, str]:
    """Installed versions from package metadata, without importing the packages (cheap, and works for a
    package that is absent only as an error naming it)."""
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in names:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "absent"
    return out


def key_of(facts: dict) -> str:
    """A short stable key for the facts a build depends on."""
    return hashlib.sha256(json.dumps(facts, sort_keys=True).encode()).hexdigest()[:24]


@contextlib.contextmanager
def _directory_lock(cache_dir: Path, on_wait: Callable[[Path], None] | None = None) -> Iterator[None]:
    """An exclusive lock on the cache directory across processes, held only around a build (never for a
    hit, so a read-only cache of ready builds needs no lock). Re-entered by a build that needs another
    (int8 from its fp32 base). Where `flock` is unavailable (no fcntl, a file system that refuses it)
    the atomic rename alone keeps the cache consistent. Called under BUILD_LOCK. `on_wait(cache_dir)`: told
    when another process holds it (a command that waits says so; a server logs it)."""
    global _flock_depth
    if _flock_depth:  # this process holds it already (a second flock would wait on itself)
        _flock_depth += 1
        try:
            yield
        finally:
            _flock_depth -= 1
        return
    try:
        import fcntl

        cache_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(cache_dir, os.O_RDONLY)
    except (ImportError, OSError) as exc:
        log.debug("no cross-process lock on %s (%s); relying on the atomic rename", cache_dir, exc)
        yield
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("another process is building into %s; waiting for it", cache_dir)
            if on_wait is not None:
                on_wait(cache_dir)
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError as exc:
            log.debug("flock refused on %s (%s); relying on the atomic rename", cache_dir, exc)
        _flock_depth = 1
        yield
    finally:
        _flock_depth = 0
        os.close(fd)  # releases the lock


@contextlib.contextmanager
def exclusive(cache_dir: Path | None, on_wait: Callable[[Path], None] | None = None) -> Iterator[None]:
    """This process's build lock and the directory's `flock`, around work that another thread or process
    must not do in `cache_dir` at the same time: OpenVINO writes a compiled blob in place, with no lock of
    its own. None (no cache directory) locks nothing."""
    if cache_dir is None:
        yield
        return
    with BUILD_LOCK, _directory_lock(cache_dir, on_wait):
        yield


def ensure_artifact(cache_dir: Path, key: str, variant: str, *, model_file: str, meta_file: str, facts: dict,
                    build: Callable[[Path], dict], what: str) -> CachedArtifact:
    """The cached folder `<key>-<variant>`, built with `build(staging_dir) -> details` if missing.

    `build` writes `model_file` (and its side files) into the staging folder; its returned details and the
    `facts` become the folder's metadata. A failed build leaves nothing behind.
    """
    final = cache_dir / f"{key}-{variant}"
    meta, _ = check_entry(final, model_file, meta_file)
    if meta is not None:
        log.info("%s cache hit: %s", what, final / model_file)
        mark_used(final)
        return CachedArtifact(final / model_file, True, key, meta)
    with BUILD_LOCK, _directory_lock(cache_dir):
        meta, damage = check_entry(final, model_file, meta_file)  # another thread or process may have built it
        if meta is not None:
            log.info("%s cache hit after waiting for another build: %s", what, final / model_file)
            return CachedArtifact(final / model_file, True, key, meta)
        try:
            cache_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise _unwritable(cache_dir, what, exc) from exc
        remove_stale_staging(cache_dir)
        if damage is not None:
            log.warning("%s cache entry %s is damaged (%s): building it again", what, final, damage)
            try:
                discard(final)
            except OSError as exc:  # a read-only cache volume: say what is wrong, not only that a rename failed
                raise OSError(exc.errno, f"{final} is damaged ({damage}) and cannot be removed "
                                         f"({exc.strerror or exc}); delete it or fill the cache again") from exc
        started = time.perf_counter()
        try:
            tmp = Path(tempfile.mkdtemp(prefix=staging_prefix(final.name), dir=cache_dir))
        except OSError as exc:
            raise _unwritable(cache_dir, what, exc) from exc
        building.add(tmp)
        try:
            tmp.chmod(0o755)  # mkdtemp makes it private; the cache may be shared by several users' servers
            details = build(tmp)
            meta = {**facts, **details, "key": key, "build_seconds": round(time.perf_counter() - started, 2),
                    "files": entry_files(tmp, meta_file)}
            (tmp / meta_file).write_text(json.dumps(meta, indent=2), encoding="utf-8")
            publish(tmp, final, meta_file, model_file)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        finally:
            building.discard(tmp)
    meta = read_meta(final, model_file, meta_file) or meta
    log.info("%s ready in %.1fs: %s", what, meta["build_seconds"], final / model_file)
    return CachedArtifact(final / model_file, False, key, meta)


def _unwritable(cache_dir: Path, what: str, exc: OSError) -> OSError:
    """Why a build cannot start in `cache_dir`, and what to set: a read-only root or a missing HOME gave a bare
    `[Errno 30] Read-only file system: '/nonexistent'`, naming neither the cache nor the setting that moves it.
    The errno is kept: the failure may pass (`base.lasting_refusal`)."""
    env = os.environ.get(CACHE_ENV)
    try:
        default = home_path(env) if env else user_cache_dir()
    except NoCacheFolderError:  # no home: the folder was given outright
        default = None
    if env and default and cache_dir.is_relative_to(default):
        whence = f" ({CACHE_ENV}={env})"
    elif not env and default and cache_dir.is_relative_to(default):
        whence = f" (the default: {CACHE_ENV} is unset)"
    else:  # a folder given outright (`openrerank export --cache-dir`): where the variables do not reach
        return OSError(exc.errno, f"cannot write the {what} into the cache folder {cache_dir}: "
                                  f"{exc.strerror or exc}; give a writable folder")
    return OSError(exc.errno, f"cannot write the {what} into the cache folder {cache_dir}{whence}: "
                              f"{exc.strerror or exc}; set {CACHE_ENV} (or XDG_CACHE_HOME) to a writable folder, "
                              "or fill the cache ahead with `openrerank export`")


def open_cached(ensure: Callable[[], CachedArtifact], open_: Callable[[CachedArtifact], T], *, meta_file: str,
                what: str) -> tuple[CachedArtifact, T]:
    """`open_(ensure())`; where a runtime cannot open a cached entry that passed `check_entry` (damaged inside,
    at the same size), the entry is removed, under the locks, and built and opened once more, with a warning:
    a failure to open what was just built is raised as it is.

    Only damage deletes an entry: a shortage of memory, threads or file handles (`out_of_resources`: OpenVINO
    could not start a thread under a low `ulimit -u`) is raised as it is, and any other failure must happen
    again on a second open. On a cache volume several servers share, an entry deleted for one server's passing
    failure cost every server a conversion, and the rebuild failed the same way."""
    artifact = ensure()
    failure: Exception | None = None
    for _ in range(2):
        try:
            opened = open_(artifact)
        except Exception as exc:
            if not artifact.cached or out_of_resources(exc):
                raise
            failure = exc
            continue
        if failure is not None:
            log.warning("%s %s could not be opened (%s: %s), and was on a second try: kept", what, artifact.path,
                        type(failure).__name__, str(failure)[:300])
        return artifact, opened
    assert failure is not None
    folder = artifact.path.parent
    with BUILD_LOCK, _directory_lock(folder.parent):
        if read_meta(folder, artifact.path.name, meta_file) == artifact.meta:  # nobody rebuilt it meanwhile
            log.warning("%s %s could not be opened, twice (%s: %s): building it again", what, artifact.path,
                        type(failure).__name__, str(failure)[:300])
            try:
                discard(folder)
            except OSError as cannot:  # a read-only cache volume: the runtime's own error says more
                log.warning("%s cannot be removed (%s)", folder, cannot)
                raise failure from None
    artifact = ensure()
    return artifact, open_(artifact)


def ensure_record(cache_dir: Path, key: str, compute: Callable[[], dict], what: str,
                  unusable: Callable[[dict], str | None] = lambda record: None) -> tuple[dict, bool]:
    """The JSON record `<key>.json` in `cache_dir`, computed with `compute()` if missing; (record, cached).

    For results that are facts about this machine rather than files (the runtime timings `--backend auto`
    chooses by): computed under the same locks as a build, so replicas starting together compute once and
    the others wait and read it; written to a temporary file and renamed, so nobody reads half a record.

    `unusable(record)` says why a record must not be used or kept (None: it may): a stored one that fails it
    is computed again, like a missing or truncated one; a computed one that fails it is used but not written,
    so the next start computes again. A record that cannot be written (a read-only cache volume) is used
    all the same: computing it twice would only cost time.
    """
    path = cache_dir / f"{key}.json"
    warned = False

    def read() -> dict | None:
        nonlocal warned
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
        except OSError:  # none yet
            return None
        except ValueError as exc:  # UnicodeDecodeError included
            record, why = None, f"not JSON: {exc}"
        else:
            why = unusable(record) if isinstance(record, dict) else f"a JSON {type(record).__name__}, not an object"
        if why is None:
            return record
        if not warned:  # the read under the lock meets it again: say it once
            warned = True
            log.warning("%s record %s is not used (%s): computing it again", what, path, why)
        return None

    record = read()
    if record is not None:
        log.info("%s cache hit: %s", what, path)
        mark_used(path)
        return record, True
    with BUILD_LOCK, _directory_lock(cache_dir):
        record = read()
        if record is not None:
            log.info("%s cache hit after waiting for another process: %s", what, path)
            return record, True
        record = compute()
        why = unusable(record)
        if why is not None:
            log.info("%s not kept (%s): the next start computes it again", what, why)
            return record, False
        try:
            write_json(path, record)
        except OSError as exc:  # a read-only cache volume (an export Job filled it)
            log.info("%s not cached (%s): every start computes it", what, exc)
    return record, False


@dataclass(frozen=True)
class Pruned:
    entry: Entry
    why: str  # why it goes
    error: str | None = None  # why it could not be removed; None: removed (or, in a dry run, would be)


def prune(folder: Path, scan: Callable[[], list[Entry]], why: Callable[[Entry], str | None], *,
          dry_run: bool = False, on_wait: Callable[[Path], None] | None = None) -> list[Pruned]:
    """Remove the entries of `folder` that `why` names a reason for; `scan()` lists them. Done under the locks
    builds take in `folder` (this process's and the directory's `flock`), so no build is publishing, replacing
    or compiling there meanwhile, and `scan()` runs again under them: what changed since (a hit marked an entry
    used) is judged as it is now. A build's staging folder is never `why`'s (`Entry.building`). A dry run lists
    what would go, without the locks (it waits for no build). `on_wait`: told when it waits for a build."""
    if dry_run or not folder.is_dir():
        return [Pruned(e, reason) for e in scan() if not e.building and (reason := why(e))]
    out = []
    with exclusive(folder, on_wait):
        for entry in scan():
            if entry.building or not (reason := why(entry)):
                continue
            try:
                remove_entry(entry)
            except OSError as exc:  # a read-only cache volume, another user's entry
                out.append(Pruned(entry, reason, exc.strerror or str(exc)))
            else:
                log.info("removed %s (%s)", entry.path, reason)
                out.append(Pruned(entry, reason))
    return out


def write_json(path: Path, record: dict) -> None:
    """Write `record` to `path` whole or not at all (a temporary file beside it, renamed over it), readable by
    every user (the cache may be shared by several users' servers); creates the folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}-", suffix=".json", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(record, f, indent=2)
        os.chmod(tmp, 0o644)  # mkstemp makes it private
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise

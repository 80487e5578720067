"""The entries of the converted-model cache on disk: what a complete one is, publishing and discarding one, and
the staging folders builds write into.

An entry's metadata lists every file its build wrote, with its size (`entry_files`); a hit checks them
(`check_entry`), so a truncated, deleted or emptied file (a full disk, a hand copy, a cleaner) or unreadable
metadata is found and built again (`artifact_cache.ensure_artifact`) instead of failing every start.

Staging folders are named for their writer (PID, its start time, the host: `staging_prefix`), so one that a
killed build left behind (SIGKILL, the OOM killer, a pod stopped mid-build; each is the size of a model) is
removed by the next build in that directory (`remove_stale_staging`), and a server that exits without waiting
for a load it cut short removes its own (`remove_own_staging`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

#: Staging folder names: `.<entry>~<pid>-<its start time>@<host>~<random>` (`staging_prefix`).
_STAGING = re.compile(r"^\.(?P<entry>.+)~(?P<pid>\d+)-(?P<start>\d+)@(?P<host>[^~]+)~[^~]*$")
#: Staging folders of releases that did not name their writer: `.<key>-<random>`.
_UNNAMED_STAGING = re.compile(r"^\.[0-9a-f]{24}-[a-z0-9_]{8}$")
#: A staging folder of another host (or one that names no writer), untouched this long, is a dead build's: its
#: PID cannot be checked from here, and no build goes a day without writing.
STALE_STAGING_S = 24 * 3600
building: set[Path] = set()  # this process's staging folders, for `remove_own_staging` at a hard exit
#: Entry folders, `<key>-<variant>` (`artifact_cache.ensure_artifact`), and records, `<key>.json`
#: (`artifact_cache.ensure_record`); `artifact_cache.write_json` writes a record as `.<key>-<random>.json` first.
_ENTRY = re.compile(r"^[0-9a-f]{24}-[a-z0-9]+$")
_RECORD = re.compile(r"^[0-9a-f]{24}\.json$")
_UNFINISHED_WRITE = re.compile(r"^\.[0-9a-f]{24}-[^/]*\.json$")
#: What keys an entry on this install besides the model (a recipe number, package versions), from its metadata.
KeyedFacts = Callable[[dict], dict]


@dataclass(frozen=True)
class Entry:
    """One entry of the cache, as `openrerank cache` lists and prunes it."""

    path: Path  # a folder or a file
    kind: str
    size: int  # bytes, every file in it
    last_used: float  # seconds since the epoch: its last hit, access or write
    built_with: dict  # what it recorded of the facts that key it (recipe number, versions)
    unusable: str | None = None  # why this install never reads it; None: it may
    building: bool = False  # a build writes it now: never removed
    companions: tuple[Path, ...] = ()  # small files that describe it (a compiled blob's record): removed with it
    note: str | None = None  # what `cache ls` says beside whether it is usable (another kind of CPU's: which)


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


def _read_text(path: Path) -> str:
    return path.read_text(encoding="utf-8")


def check_entry(folder: Path, model_file: str, meta_file: str,
                read: Callable[[Path], str] = _read_text) -> tuple[dict | None, str | None]:
    """(metadata, None) for a complete entry; (None, None) when there is none; (None, what is wrong) for a
    damaged one: metadata missing or not a JSON object, a listed file missing or of another size than built.

    Sizes, not hashes: hashing the default model's 87 MB model.onnx took 0.14 s next to 0.35 s to open it,
    and a model of gigabytes would pay seconds every start. Entries from before files were listed (no `files`)
    are held to their model file being there and not empty. `read`: how the metadata is read."""
    try:
        text = read(folder / meta_file)
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
    """Remove a damaged entry: renamed aside first (atomic: nobody opens half of it), then deleted; a rest left
    by a failed delete carries this writer's name and goes with `remove_stale_staging`. Raises OSError where it
    cannot be moved (a read-only cache volume)."""
    aside = folder.parent / f"{staging_prefix(folder.name)}discarded{time.monotonic_ns()}"
    try:
        os.rename(folder, aside)
    except FileNotFoundError:  # another process discarded it first
        return
    shutil.rmtree(aside, ignore_errors=True)


def _start_time(pid: int) -> int:
    """When process `pid` started (clock ticks since boot, Linux); 0 where that cannot be read. With the PID it
    names a process: a restarted container's server often has the PID its dead predecessor had."""
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[19])
    except (OSError, ValueError, IndexError):
        return 0


def staging_prefix(entry: str) -> str:
    """`.<entry>~<pid>-<start time>@<host>~`: a staging folder says who writes it (`remove_stale_staging`)."""
    pid = os.getpid()
    return f".{entry}~{pid}-{_start_time(pid)}@{socket.gethostname()}~"


def _alive(pid: int, start: int) -> bool:
    """Whether the process that named a staging folder on this host still runs."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # another user's process: it exists
        pass
    now = _start_time(pid)
    return not (start and now and now != start)  # the PID is another process's now


def _last_write(folder: Path) -> float:
    """The newest modification time of `folder` and everything in it."""
    times = [folder.stat().st_mtime]
    for p in folder.rglob("*"):
        with contextlib.suppress(OSError):
            times.append(p.stat().st_mtime)
    return max(times)


def _staging_dead(folder: Path) -> bool | None:
    """Whether a staging folder's build died; None for what is no staging folder (or is gone). On this host a
    folder whose writer's PID (and start time) no longer runs is dead; a folder from another host (several pods
    may share one cache volume), or one that names no writer, is dead when nothing in it was written for
    `STALE_STAGING_S`."""
    match = _STAGING.match(folder.name)
    if not (match or _UNNAMED_STAGING.match(folder.name)) or not folder.is_dir():
        return None
    try:
        if match and match["host"] == socket.gethostname():
            return not _alive(int(match["pid"]), int(match["start"]))
        return time.time() - _last_write(folder) > STALE_STAGING_S
    except OSError:  # removed meanwhile
        return None


def remove_stale_staging(cache_dir: Path) -> None:
    """Delete the staging folders of builds that died (SIGKILL, OOM, a pod stopped mid-build; `_staging_dead`):
    each is the size of a model. Called holding the directory's lock."""
    for folder in cache_dir.iterdir():
        if _staging_dead(folder):
            log.info("removing %s, the staging folder of a build that did not finish", folder)
            shutil.rmtree(folder, ignore_errors=True)


def remove_own_staging() -> None:
    """Delete this process's staging folders: called when it exits without waiting for a model load it cut
    short (`server/http.exit_now`), whose own clean-up never runs then."""
    for folder in list(building):
        shutil.rmtree(folder, ignore_errors=True)


def mark_used(path: Path) -> None:
    """Date a cache entry's use (its modification time, now), for `openrerank cache prune --unused-days`; where
    the cache cannot be written (a read-only volume) nothing is dated and nothing needs to be."""
    with contextlib.suppress(OSError):
        os.utime(path)


def read_quietly(path: Path, limit: int = -1) -> bytes:
    """The bytes of `path` (the first `limit`), read without moving its access time where the kernel allows it
    (`O_NOATIME`: the file's owner, or root): a listing must not date as used what it only looked at."""
    flags = os.O_RDONLY | getattr(os, "O_NOATIME", 0)
    try:
        fd = os.open(path, flags)
    except PermissionError:  # another user's file: O_NOATIME is the owner's
        fd = os.open(path, os.O_RDONLY)
    with os.fdopen(fd, "rb") as f:
        return f.read(limit)


def last_used(anchor: Path, *read: Path) -> float:
    """When an entry was last used: `anchor`'s modification time (a build wrote it, a hit marked it) or, for
    files an older version read without marking them, their access time (accurate to a day under the usual
    `relatime`; a volume mounted `noatime` records none). A folder's own access time is not used: listing it
    moves it."""
    times = [anchor.stat().st_mtime]
    for path in (anchor, *read) if anchor.is_file() else read:
        with contextlib.suppress(OSError):
            times.append(path.stat().st_atime)
    return max(times)


def size_of(path: Path) -> int:
    """Bytes in `path`: a file's size, or every file's in a folder."""
    if not path.is_dir():
        return path.stat().st_size
    total = 0
    for p in path.rglob("*"):
        with contextlib.suppress(OSError):
            total += p.stat().st_size if p.is_file() else 0
    return total


def differences(recorded: dict, here: dict) -> str | None:
    """How the facts an entry recorded differ from this install's (`here`: a recipe number, versions; a dict of
    versions is compared package by package), None when they agree: an entry that differs is never read here,
    its key being another."""
    out = []
    for name, value in here.items():
        old = recorded.get(name)
        if isinstance(value, dict):
            out += [d for d in [differences(old if isinstance(old, dict) else {}, value)] if d]
        elif old != value:
            out.append(f"{name} {'unrecorded' if old is None else old} (here {value})")
    return ", ".join(out) or None


def artifact_entries(folder: Path, kind: str, model_file: str, meta_file: str, keyed: KeyedFacts) -> list[Entry]:
    """The entry folders (`<key>-<variant>`) in `folder`: a damaged one (`check_entry`) or one whose recorded
    facts differ from `keyed(meta)` is unusable here."""
    out = []
    for path in _listing(folder):
        if not (_ENTRY.match(path.name) and path.is_dir()):
            continue
        try:
            used = last_used(path, path / meta_file, path / model_file)
            meta, damage = check_entry(path, model_file, meta_file, read=_read_text_quietly)
            size = size_of(path)
        except OSError:  # removed meanwhile
            continue
        if meta is None:
            if damage is None:  # removed meanwhile
                continue
            out.append(Entry(path, kind, size, used, {}, f"damaged: {damage}"))
            continue
        here = keyed(meta)
        out.append(Entry(path, kind, size, used, {k: meta.get(k) for k in here}, differences(meta, here)))
    return out


def record_entries(folder: Path, kind: str, keyed: KeyedFacts) -> list[Entry]:
    """The records (`<key>.json`) in `folder`: one that is not a JSON object, or whose recorded facts differ from
    `keyed(record)`, is unusable here."""
    out = []
    for path in _listing(folder):
        if not (_RECORD.match(path.name) and path.is_file()):
            continue
        try:
            used, size = last_used(path), path.stat().st_size
            record = json.loads(read_quietly(path))
        except FileNotFoundError:  # removed meanwhile
            continue
        except (OSError, ValueError) as exc:
            out.append(Entry(path, kind, 0, 0.0, {}, f"unreadable: {exc}"))
            continue
        if not isinstance(record, dict):
            out.append(Entry(path, kind, size, used, {}, f"a JSON {type(record).__name__}, not a record"))
            continue
        here = keyed(record)
        out.append(Entry(path, kind, size, used, {k: record.get(k) for k in here}, differences(record, here)))
    return out


def unfinished_entries(folder: Path) -> list[Entry]:
    """What builds and record writes left unfinished in `folder`: staging folders (`_staging_dead`) and records'
    temporary files. A live build's is `building`; a dead one's is unusable. A record's write takes
    milliseconds, so its temporary file untouched for `STALE_STAGING_S` is a dead writer's."""
    out = []
    for path in _listing(folder):
        try:
            if _UNFINISHED_WRITE.match(path.name) and path.is_file():
                used = path.stat().st_mtime
                dead: bool | None = time.time() - used > STALE_STAGING_S
            else:
                dead = _staging_dead(path)
                if dead is None:
                    continue
                used = _last_write(path)
            size = size_of(path)
        except OSError:  # removed meanwhile
            continue
        out.append(Entry(path, "unfinished build", size, used, {}, "a build that did not finish" if dead else None,
                         building=not dead))
    return out


def remove_entry(entry: Entry) -> None:
    """Delete an entry: a folder renamed aside first (`discard`: nobody opens half of it), a file unlinked (a
    reader holding it open keeps it), then its companions. Raises OSError where the cache refuses (a read-only
    volume)."""
    if entry.path.is_dir() and not entry.path.is_symlink():
        discard(entry.path)
    else:
        with contextlib.suppress(FileNotFoundError):
            entry.path.unlink()
    for path in entry.companions:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def _listing(folder: Path) -> list[Path]:
    """The paths in `folder`, sorted; none where it is absent."""
    try:
        return sorted(folder.iterdir())
    except (FileNotFoundError, NotADirectoryError):
        return []


def _read_text_quietly(path: Path) -> str:
    return read_quietly(path).decode("utf-8", errors="replace")  # not UTF-8: then not JSON either

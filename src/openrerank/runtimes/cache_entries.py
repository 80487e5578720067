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


def remove_stale_staging(cache_dir: Path) -> None:
    """Delete the staging folders of builds that died (SIGKILL, OOM, a pod stopped mid-build): each is the size
    of a model. Called holding the directory's lock. On this host a folder whose writer's PID (and start time)
    no longer runs is dead; a folder from another host (several pods may share one cache volume), or one that
    names no writer, is dead when nothing in it was written for `STALE_STAGING_S`."""
    host = socket.gethostname()
    for folder in cache_dir.iterdir():
        match = _STAGING.match(folder.name)
        if not (match or _UNNAMED_STAGING.match(folder.name)) or not folder.is_dir():
            continue
        try:
            if match and match["host"] == host:
                dead = not _alive(int(match["pid"]), int(match["start"]))
            else:
                dead = time.time() - _last_write(folder) > STALE_STAGING_S
        except OSError:  # removed meanwhile
            continue
        if dead:
            log.info("removing %s, the staging folder of a build that did not finish", folder)
            shutil.rmtree(folder, ignore_errors=True)


def remove_own_staging() -> None:
    """Delete this process's staging folders: called when it exits without waiting for a model load it cut
    short (`server/http.exit_now`), whose own clean-up never runs then."""
    for folder in list(building):
        shutil.rmtree(folder, ignore_errors=True)

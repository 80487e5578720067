"""OpenVINO's compiled-model cache on disk (`CACHE_DIR`): where a compile's blobs go, dropping those nothing reads
any more, and listing them for `openrerank cache`.

Layout: `<IR cache>/compiled/cpu-<key of this kind of CPU>/<precision>-<hash of the configuration>/<hash>.blob`
(`compiled_cache_dir`, `compiled_cpu_dir`, `compiled_config_dir`). The CPU plugin names a blob by the model and the
device alone (its `CACHING_PROPERTIES` are only `FULL_DEVICE_NAME`, the CPUID brand string, generic on many VMs), so
in one folder every configuration of an IR (fp32 or bf16, threads, streams) imported whichever blob was written
first, and on a shared volume so would every kind of CPU with the same brand string: each gets a folder of its own.
Older versions wrote the shared `compiled/*.blob` and then `compiled/<precision>-<hash>/*.blob` (`_old_layout`);
a compile drops those, and another kind of CPU's folder none of whose blobs was used, once a week has passed
(`drop_old_blobs`). The compile itself is `openvino_runtime`'s, inside `compiling`: under the `compiled/` folder's
lock, which also dates the blob the compile used.

Dating a blob: OpenVINO imports a blob without writing it, and names it by a hash of its own, so nothing else
told which blob a start used, and on a volume mounted `noatime` (common for container and network volumes) a blob
imported at every start kept the date it was written: `cache prune --unused-days N` deleted it and the next start
compiled again (90 MB for the default model). The blob a compile writes is the one file of its configuration's
folder that changed meanwhile; its record beside it (`<hash>.blob.json`, `_RECORD_SUFFIX`) names the model that
wrote it (`model_of`), and a later compile of that model that writes nothing imported it and dates it
(`cache_entries.mark_used`), as a hit dates an ONNX export or IR. Only the recorded blob: a configuration's folder
holds every model's blobs. A blob an older version wrote has no record: the first compile that imports it
records it as its model's where it is its folder's only blob (`_only_unrecorded`); among others it is dated by
its access time only.

A blob whose compile the bf16 load check refuses (`openvino_runtime.check_bf16`) is deleted with its record
(`discard`): every later start on this OpenVINO would refuse it again.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from openrerank.runtimes.artifact_cache import CachedArtifact, exclusive, key_of, write_json
from openrerank.runtimes.cache_entries import Entry, differences, last_used, mark_used, read_quietly
from openrerank.runtimes.devices import cpu_facts
from openrerank.runtimes.openvino_convert import default_cache_dir, import_openvino, openvino_available

log = logging.getLogger(__name__)

COMPILED_DIR = "compiled"
#: The compiled-model cache's folder of each kind of CPU: `compiled/cpu-<key>/` (`compiled_cpu_dir`).
COMPILED_CPU_PREFIX = "cpu-"
#: A blob's record, beside it: `<hash>.blob.json`, the model that wrote it (module docstring).
_RECORD_SUFFIX = ".json"
#: The file in each kind of CPU's folder that names the CPU (`devices.cpu_facts`), for `cache ls`: the folder's
#: key is a hash, which told a live folder from a dead one (a retired host's, or this host's before a kernel
#: upgrade changed its flags) to no one.
CPU_FILE = "cpu.json"


def compiled_cache_dir(cache_dir: Path | None = None) -> Path:
    """Where OpenVINO keeps compiled models, next to the IRs (`cache_dir`, default the IR cache): each kind of CPU
    in its own folder (`compiled_cpu_dir`), each compile configuration in its own below it
    (`compiled_config_dir`)."""
    return (Path(cache_dir) if cache_dir else default_cache_dir()) / COMPILED_DIR


def compiled_cpu_dir(compiled_dir: Path) -> Path:
    """This kind of CPU's folder in the compiled-model cache `compiled_dir`, keyed by the CPU's name and flags as
    the runtime timings are (`devices.cpu_facts`). OpenVINO keys a blob by its own device name, the CPUID brand
    string, which a VM may report as bare "AMD EPYC" on a Zen 3 and a Zen 4 alike: on a cache volume hosts of
    both kinds share, one would import kernels compiled for the other's instruction set. The flags include the
    kernel's own (`pti`, `ibrs`): a kernel upgrade gives a new folder, and a compile deletes another key's once
    none of its blobs was used for a week (`_idle_cpu_folders`)."""
    return Path(compiled_dir) / f"{COMPILED_CPU_PREFIX}{key_of(cpu_facts())}"


def compiled_config_dir(compiled_dir: Path, config: dict) -> Path:
    """The folder of one compile configuration's blobs on this kind of CPU under the compiled-model cache
    `compiled_dir`: OpenVINO keys a blob by the model and the device name only, so neither a configuration nor
    a kind of CPU may see another's (module docstring)."""
    settings = {k: v for k, v in config.items() if k != "CACHE_DIR"}
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
    return compiled_cpu_dir(compiled_dir) / f"{settings['INFERENCE_PRECISION_HINT']}-{digest}"


def writable(folder: Path) -> Path | None:
    """`folder`, created if needed, or None where it cannot be written (a read-only cache volume)."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        log.info("OpenVINO compiled-model cache off (%s): every start compiles the model", exc)
        return None
    if not os.access(folder, os.W_OK):
        log.info("OpenVINO compiled-model cache off (%s is read-only): every start compiles the model", folder)
        return None
    return folder


def model_of(conversion: CachedArtifact) -> str:
    """What names a model in a blob's record: its converted file's content key (an IR's, or a pre-exported
    folder's), the same wherever the cache volume is mounted."""
    return f"{conversion.key}/{conversion.path.name}"


@dataclass
class CompiledBlob:
    """Which blob a compile (`compiling`) wrote or imported, once it is done: None where there is no compiled
    cache, or where it cannot tell (an imported blob an older version wrote, which has no record, among others in
    its folder: `_only_unrecorded`)."""

    compiled_dir: Path | None = None
    blob: Path | None = None
    #: What the compiled model says (`LOADED_FROM_CACHE`), set by the compile inside `compiling`; None: not said.
    imported: bool | None = None


@contextlib.contextmanager
def compiling(compiled_dir: Path | None, config: dict, model: str) -> Iterator[CompiledBlob]:
    """Around a compile of `model` with `config` (`CACHE_DIR` in `compiled_dir`; None: no compiled cache): under
    the folder's lock (OpenVINO writes a blob in place, with no lock of its own, so replicas take turns), drops
    what nothing reads (`drop_old_blobs`), then records the blob the compile wrote or dates the one it imported
    (module docstring), and names it in what it yields, for `discard`."""
    used = CompiledBlob(compiled_dir)
    with exclusive(compiled_dir):
        if compiled_dir is None:
            yield used
            return
        drop_old_blobs(compiled_dir)
        folder = Path(config["CACHE_DIR"])
        before = _blob_states(folder)
        yield used
        _name_cpu_folder(compiled_dir)
        used.blob = _date(folder, before, model, used.imported)


def discard(used: CompiledBlob) -> None:
    """Delete the blob a compile wrote or imported (`compiling`), and its record: the load refused what it
    computes (`openvino_runtime.check_bf16`), so every later start with this configuration would refuse it
    again, and it is a model's size of disk that nothing serves from. Imported or written this time alike: the
    CPU plugin imports only its own build's blobs, so this OpenVINO computes wrongly from it either way (a
    compile that writes it anew is refused the same). Only that blob: its folder holds other models' blobs, and
    other configurations have folders of their own. Under the folder's lock, so no replica is importing it
    meanwhile; best effort, as the dating is."""
    if used.compiled_dir is None or used.blob is None:
        return
    with exclusive(used.compiled_dir):
        try:
            used.blob.unlink(missing_ok=True)
            _record_of(used.blob).unlink(missing_ok=True)
        except OSError as exc:  # a read-only volume: the next start refuses it again
            log.debug("refused OpenVINO blob %s not removed: %s", used.blob, exc)
            return
    log.info("removed %s: a compiled blob the load check refused", used.blob)


def _name_cpu_folder(compiled_dir: Path) -> None:
    """Write `CPU_FILE` into this kind of CPU's folder where it is missing (a folder made before it was)."""
    folder = compiled_cpu_dir(compiled_dir)
    if folder.is_dir() and not (folder / CPU_FILE).exists():
        try:
            write_json(folder / CPU_FILE, cpu_facts())
        except OSError as exc:  # the listing then says the folder is not named
            log.debug("%s not written: %s", folder / CPU_FILE, exc)


def _cpu_named(folder: Path) -> str:
    """Which CPU another kind of CPU's folder is for, as `cache ls` says it: its name and the start of its flags'
    hash (`CPU_FILE`), e.g. "AMD EPYC (flags 1a2b3c4d)"; where the name is this host's, this host's flags too
    (a kernel or microcode update changes them)."""
    try:
        facts = json.loads(read_quietly(folder / CPU_FILE))
        name, flags = str(facts["cpu"]), str(facts["cpu_flags_sha256"])[:8]
    except (OSError, ValueError, KeyError, TypeError):
        return "not named (its folder was made before openrerank named it)"
    here = cpu_facts()
    return f"{name} (flags {flags}" + (f"; this host's: {here['cpu_flags_sha256'][:8]})" if name == here["cpu"]
                                        else ")")


def _blob_states(folder: Path) -> dict[str, tuple[int, int, int]]:
    """Each blob in `folder` by name, with what a write changes (inode, size, modification time)."""
    states = {}
    for blob in folder.glob("*.blob"):
        with contextlib.suppress(OSError):  # removed meanwhile
            st = blob.stat()
            states[blob.name] = (st.st_ino, st.st_size, st.st_mtime_ns)
    return states


def _records(folder: Path) -> dict[Path, str | None]:
    """The blobs of `folder` that have a record, with the model it names (None: unreadable)."""
    out: dict[Path, str | None] = {}
    for record in folder.glob(f"*.blob{_RECORD_SUFFIX}"):
        try:
            model = json.loads(read_quietly(record)).get("model")
        except (OSError, ValueError, AttributeError):
            model = None
        out[record.with_suffix("")] = model if isinstance(model, str) else None
    return out


def _record_of(blob: Path) -> Path:
    return blob.with_name(blob.name + _RECORD_SUFFIX)


def _date(folder: Path, before: dict[str, tuple[int, int, int]], model: str,
          imported: bool | None = None) -> Path | None:
    """After a compile of `model` into `folder`: the one blob that changed is the one it wrote, recorded as
    `model`'s (in place of any older record of it); none changed, it imported `model`'s recorded blob, or where
    none is recorded, the folder's one unrecorded blob (`_only_unrecorded`, recorded now), dated used now. A
    record whose blob is gone goes too. Best effort: a cache that cannot be written stays as it is.
    `imported` False (OpenVINO says it compiled, yet no blob changed: its write failed, e.g. a full volume, which
    OpenVINO 2026.4 does not report) means no blob was used, so none is dated or adopted. Returns that blob, None
    where it is not known (`CompiledBlob`)."""
    written = [name for name, state in _blob_states(folder).items() if before.get(name) != state]
    records = _records(folder)
    used = None
    try:
        for blob, named in records.items():
            if not blob.exists() or (written and named == model):
                _record_of(blob).unlink(missing_ok=True)
        if len(written) == 1:
            used = folder / written[0]
            write_json(_record_of(used), {"model": model, "written": time.time()})
        elif not written and imported is not False:
            blobs = [blob for blob, named in records.items() if named == model and blob.exists()]
            if not blobs and (only := _only_unrecorded(folder, records)) is not None:
                write_json(_record_of(only), {"model": model, "adopted": time.time()})
                blobs = [only]
            for blob in blobs:
                mark_used(blob)
            used = blobs[0] if len(blobs) == 1 else None
    except OSError as exc:
        log.debug("compiled blob of %s in %s not recorded: %s", model, folder, exc)
    return used


def _only_unrecorded(folder: Path, records: dict[Path, str | None]) -> Path | None:
    """The blob a compile of `folder`'s configuration imported where no record names it: the folder's only blob,
    if it has no record (a 0.1.0 build with per-CPU folders wrote it). Asked only where the compile imported a
    blob (`LOADED_FROM_CACHE`, or, where OpenVINO cannot say, a compile that wrote none: a write that fails, e.g.
    on a full volume, is no error in OpenVINO 2026.4, so "wrote none" alone does not mean "imported"), and this
    one is the only one there. Where the folder holds several, which was imported is not known: None, and they
    stay dated by their access time."""
    blobs = list(folder.glob("*.blob"))
    return blobs[0] if len(blobs) == 1 and blobs[0] not in records else None


#: How long a compiled blob of an older layout is kept untouched before a compile deletes it: the shared one
#: (`compiled/*.blob`) or one configuration's folder for every CPU (`compiled/<precision>-<hash>/*.blob`). No
#: version since reads it, but an older one still running on a shared cache volume (a rolling update, a rollback,
#: a canary) imports it at each start and, where it is gone, compiles and writes it again (90 MB for the default
#: model): deleted at each start of this version, it was rewritten at each start of that one. Untouched for a
#: week, no such server has started; `openrerank cache prune` removes it sooner. Another kind of CPU's folder
#: (`compiled/cpu-<key>/`) goes the same way once none of its blobs was used for as long (`_idle_cpu_folders`).
OLD_BLOB_UNUSED_S = 7 * 24 * 3600
#: The OpenVINO build a compiled blob was written by, from its header: the CPU plugin imports only its own.
_BLOB_VERSION = re.compile(rb'<compiled_blob [^>]*ie_version="([^"]+)"')


def _old_layout(compiled_dir: Path, blob: Path) -> str | None:
    """Which older layout of the compiled-model cache `blob` is in, which no configuration here reads; None
    for this one's (`compiled/cpu-<key>/<configuration>/`)."""
    if blob.parent == compiled_dir:
        return "the shared layout of openrerank before per-configuration folders (older versions)"
    if blob.parent.parent == compiled_dir:
        return "the layout of openrerank before per-CPU folders (older versions)"
    return None


def _idle_cpu_folders(compiled_dir: Path, now: float) -> dict[Path, str]:
    """The folders of other kinds of CPU (each `compiled/cpu-<key>/` other than this one's) none of whose blobs was used
    for `OLD_BLOB_UNUSED_S`, each with what it is. The key hashes every /proc/cpuinfo flag, the kernel's own
    too (`pti`, `ibrs`, ...), so a kernel upgrade or a retired kind of host leaves a folder (a model's size per
    configuration) that no server reads again. One a host of its kind started from within the week stays: its
    start dated the blob it imported (`compiling`; a blob an older version wrote that no start recorded
    (`_only_unrecorded`), by its access time, `last_used`: to a day under `relatime`, never on a volume mounted
    `noatime`)."""
    mine = compiled_cpu_dir(compiled_dir)
    idle = {}
    for folder in compiled_dir.glob(f"{COMPILED_CPU_PREFIX}*"):
        if folder == mine or not folder.is_dir():
            continue
        try:
            used = max((last_used(blob) for blob in folder.glob("*/*.blob")), default=0.0)
        except OSError:  # a blob removed meanwhile: judged at the next compile
            continue
        if now - used > OLD_BLOB_UNUSED_S:
            idle[folder] = (f"another kind of CPU ({folder.name}, {_cpu_named(folder)}: a host of another kind, "
                            "or this one before a kernel upgrade changed its /proc/cpuinfo flags)")
    return idle


def drop_old_blobs(compiled_dir: Path) -> None:
    """Delete the blobs an older openrerank wrote in an older layout (`_old_layout`), once untouched for
    `OLD_BLOB_UNUSED_S`, and those of another kind of CPU's folder none of whose blobs was used for as long
    (`_idle_cpu_folders`); a folder left empty goes too. Called under the folder's lock, so no replica is
    importing one meanwhile."""
    now = time.time()
    idle = _idle_cpu_folders(compiled_dir, now)
    for blob in [*compiled_dir.glob("*.blob"), *compiled_dir.glob("*/*.blob"),
                 *(blob for folder in idle for blob in folder.glob("*/*.blob"))]:
        if (layout := _old_layout(compiled_dir, blob) or idle.get(blob.parent.parent)) is None:
            continue
        try:
            if now - last_used(blob) <= OLD_BLOB_UNUSED_S:
                continue  # an older version on this cache still uses it
            blob.unlink()
        except OSError as exc:  # another start removed it first, or the volume refuses: harmless either way
            log.debug("stale OpenVINO blob %s not removed: %s", blob, exc)
            continue
        log.info("removed %s: a compiled blob of %s, unused for %d days", blob, layout, OLD_BLOB_UNUSED_S // 86400)
        with contextlib.suppress(OSError):
            _record_of(blob).unlink(missing_ok=True)
        if blob.parent != compiled_dir:
            with contextlib.suppress(OSError):  # not empty (another blob, a file of its own): kept
                blob.parent.rmdir()
    for folder in idle:  # emptied above, or by `openrerank cache prune`, which removes blobs and their records
        for config in folder.glob("*/"):
            for blob in _records(config):
                if not blob.exists():
                    with contextlib.suppress(OSError):
                        _record_of(blob).unlink()
            with contextlib.suppress(OSError):  # not empty (a blob, a file of its own): kept
                config.rmdir()
        with contextlib.suppress(OSError):
            if not any(p.name != CPU_FILE for p in folder.iterdir()):
                (folder / CPU_FILE).unlink(missing_ok=True)
                folder.rmdir()


def compiled_entries(compiled_dir: Path) -> list[Entry]:
    """The compiled blobs in OpenVINO's cache (`openrerank cache`): each kind of CPU's and configuration's
    (`compiled_config_dir`), unusable here when another OpenVINO build wrote it, and those of older layouts
    (`_old_layout`), which no configuration reads. Another kind of CPU's blob is usable: by servers on that
    kind sharing the cache (as its runtime timings are), unless none of its folder's blobs was used for
    `OLD_BLOB_UNUSED_S`, the folders the next compile here deletes (`_idle_cpu_folders`): `prune` removes
    them, as it does the older layouts'. Each of another kind's says which CPU it is for (`Entry.note`,
    `_cpu_named`)."""
    here = _openvino_version()
    idle = _idle_cpu_folders(compiled_dir, time.time())
    mine = compiled_cpu_dir(compiled_dir)
    named: dict[Path, str] = {}
    days = OLD_BLOB_UNUSED_S // 86400
    out = []
    blobs = [*compiled_dir.glob("*.blob"), *compiled_dir.glob("*/*.blob"),
             *compiled_dir.glob(f"{COMPILED_CPU_PREFIX}*/*/*.blob")]
    for blob in sorted(blobs):
        try:
            used, size = last_used(blob), blob.stat().st_size
            found = _BLOB_VERSION.search(read_quietly(blob, 4096))
        except OSError:  # removed meanwhile
            continue
        version = found.group(1).decode(errors="replace") if found else None
        built_with = {"openvino": version, "compile": blob.parent.relative_to(compiled_dir).as_posix()}
        if blob.parent == compiled_dir:
            built_with.pop("compile")
        cpu = idle.get(blob.parent.parent)
        why = _old_layout(compiled_dir, blob) or (
            f"{cpu}, none of its blobs used for {days} days: the next compile here removes them" if cpu else
            "openvino is not installed here" if here is None else differences(built_with, {"openvino": here}))
        record = _record_of(blob)
        companions = (record,) if record.is_file() else ()  # never an entry of its own: it goes with its blob
        cpu_folder = blob.parent.parent
        note = None
        if cpu_folder.parent == compiled_dir and cpu_folder != mine:
            if cpu_folder not in named:
                named[cpu_folder] = _cpu_named(cpu_folder)
            note = f"another CPU: {named[cpu_folder]}"
        out.append(Entry(blob, "openvino compiled", size, used, built_with, why, companions=companions,
                         note=note))
    return out


def _openvino_version() -> str | None:
    """The build of the installed OpenVINO, as its blobs' headers name it; None where it is absent."""
    if not openvino_available():
        return None
    return str(import_openvino().get_version())

"""`openrerank cache ls` and `openrerank cache prune`: what the converted-model cache holds, and removing what
this install never reads.

Every upgrade that changes transformers, ONNX Runtime or OpenVINO (or a recipe number, or openrerank's cache
layout) keys new entries: ONNX exports, OpenVINO IRs, compiled blobs, engine-choice and speed records. Nothing
collects the old ones (but compiled blobs of an older layout or another kind of CPU, unused for a week:
`openvino_blobs.drop_old_blobs`), and each export, IR or blob is a model's size. As `hf cache ls` /
`hf cache prune` do for the hub's cache, `ls` shows each entry's size, last use, what it was built with and
whether this install can use it, and `prune` removes those it cannot (with `--unused-days N`, also those unused
for N days), under the locks builds take (`artifact_cache.prune`).
Where each kind lives and what keys it on this install is its owner's to say; this module only gathers them.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

from openrerank.cli.options import fail
from openrerank.families.registry import FAMILIES
from openrerank.runtimes.artifact_cache import NoCacheFolderError
from openrerank.runtimes.cache_entries import Entry

_DAY = 86400.0
Section = tuple[Path, Callable[[], list[Entry]]]  # a folder builds lock, and how its entries are listed


def sections() -> list[Section]:
    """Each cache folder (locked as its builds lock it) with its entries: the ONNX exports, the OpenVINO IRs
    and compiled blobs, the engine-choice and speed records, and what unfinished builds left beside them."""
    from openrerank.engine.speed_record import SPEED_FORMAT, speed_dir
    from openrerank.runtimes import onnx_export
    from openrerank.runtimes import openvino_convert as ov
    from openrerank.runtimes.cache_entries import artifact_entries, record_entries, unfinished_entries
    from openrerank.runtimes.measure import MEASURE_FORMAT, runtime_versions
    from openrerank.runtimes.measure import cache_dir as choice_dir
    from openrerank.runtimes.openvino_blobs import compiled_cache_dir, compiled_entries

    onnx, ir, choices, speeds = onnx_export.default_cache_dir(), ov.default_cache_dir(), choice_dir(), speed_dir()
    compiled = compiled_cache_dir(ir)
    export_facts, versions = onnx_export.keyed_facts(), runtime_versions()
    ir_facts = {variant: ov.keyed_facts(variant) for variant in ov.IR_VARIANTS}

    def exports() -> list[Entry]:
        found = artifact_entries(onnx, "onnx export", onnx_export.MODEL_FILE, onnx_export.META_FILE,
                                 lambda meta: built_here(meta, export_facts))
        return found + unfinished_entries(onnx)

    def irs() -> list[Entry]:
        found = artifact_entries(ir, "openvino ir", ov.MODEL_FILE, ov.META_FILE,
                                 lambda meta: built_here(meta, ir_facts.get(meta.get("variant"), ir_facts["fp32"])))
        return found + unfinished_entries(ir)

    def records(folder: Path, kind: str, fmt: int) -> Callable[[], list[Entry]]:
        return lambda: (record_entries(folder, kind, lambda record: {"format": fmt, "versions": versions})
                        + unfinished_entries(folder))

    return [(onnx, exports), (ir, irs), (compiled, lambda: compiled_entries(compiled)),
            (choices, records(choices, "engine choice", MEASURE_FORMAT)),
            (speeds, records(speeds, "speed record", SPEED_FORMAT))]


def built_here(meta: dict, facts: dict) -> dict:
    """`facts` and the family build format an entry must have been made with to be read here
    (`Family.build_format`, which keys converted models): one some family builds today; an entry of an older
    build (or none recorded: made before the number existed) is never read, its key being another. The entry does
    not say its family, so a format another family still builds passes: prune keeps rather than removes."""
    formats = {family.build_format for family in FAMILIES}
    built = meta.get("build_format")
    return {**facts, "build_format": built if built in formats else max(formats)}


def prune_reason(unused_days: float | None, now: float) -> Callable[[Entry], str | None]:
    """Why `prune` removes an entry: this install never reads it, or (`unused_days`) nothing used it that long."""
    def why(entry: Entry) -> str | None:
        if entry.unusable:
            return entry.unusable
        if unused_days is not None and now - entry.last_used > unused_days * _DAY:
            return f"unused for {_age(now - entry.last_used)}"
        return None
    return why


def run_ls(args: argparse.Namespace) -> int:
    _use_cache_dir(args)
    try:
        found = _scanned(sections())
    except NoCacheFolderError as exc:  # no cache setting and no home: one line, as `serve` and `export` say it
        return fail("openrerank cache ls", str(exc))
    if found is None:
        return _no_cache(args)
    entries, unreadable = found
    if args.json:
        print(json.dumps([_as_json(e) for e in entries], indent=2))
        return 1 if unreadable else 0
    now = time.time()
    rows = [(_size(e.size), _age(now - e.last_used, ago=True), e.kind,
             "building now" if e.building else f"no: {e.unusable}" if e.unusable else
             f"yes ({e.note})" if e.note else "yes",
             _built_with(e.built_with), str(e.path)) for e in entries]
    _print_table(("SIZE", "LAST USED", "KIND", "USABLE HERE", "BUILT WITH", "PATH"), rows)
    unusable = [e for e in entries if e.unusable and not e.building]
    print(f"{_count(len(entries))}, {_size(sum(e.size for e in entries))}; {len(unusable)} not usable here "
          f"({_size(sum(e.size for e in unusable))})" + (": `openrerank cache prune` removes them" if unusable else ""))
    return 1 if unreadable else 0


def run_prune(args: argparse.Namespace) -> int:
    """Each folder's removals are printed as soon as that folder is done (an interrupted prune has said what it
    removed), and a folder that cannot be read is one line on stderr, the others pruned all the same."""
    from openrerank.runtimes.artifact_cache import prune

    _use_cache_dir(args)
    try:
        folders = sections()
    except NoCacheFolderError as exc:
        return fail("openrerank cache prune", str(exc))
    if not any(folder.is_dir() for folder, _ in folders):
        return _no_cache(args)
    why = prune_reason(args.unused_days, time.time())
    done = failed = 0
    freed = 0

    def waiting(folder: Path) -> None:
        print(f"waiting for a build in {folder} to finish (a server is converting a model there) ...",
              file=sys.stderr, flush=True)

    for folder, scan in folders:
        try:
            results = prune(folder, scan, why, dry_run=args.dry_run, on_wait=waiting)
        except OSError as exc:
            print(f"could not read {folder}: {exc.strerror or exc}", file=sys.stderr)
            failed += 1
            continue
        for p in results:
            if p.error is None:
                done += 1
                freed += p.entry.size
                print(f"{'would remove' if args.dry_run else 'removed'} {p.entry.path} ({p.entry.kind}, "
                      f"{_size(p.entry.size)}): {p.why}", flush=True)
            else:
                failed += 1
                print(f"could not remove {p.entry.path}: {p.error}", file=sys.stderr)
    print(f"{'would free' if args.dry_run else 'freed'} {_size(freed)} ({_count(done)})"
          + (f"; {failed} could not be removed or read" if failed else ""))
    return 1 if failed else 0


def _scanned(folders: list[Section]) -> tuple[list[Entry], bool] | None:
    """Every folder's entries, and whether a folder could not be read (said on stderr); None: no cache at all."""
    if not any(folder.is_dir() for folder, _ in folders):
        return None
    entries: list[Entry] = []
    unreadable = False
    for folder, scan in folders:
        try:
            entries += scan()
        except OSError as exc:
            print(f"could not read {folder}: {exc.strerror or exc}", file=sys.stderr)
            unreadable = True
    return entries, unreadable


def _no_cache(args: argparse.Namespace) -> int:
    """No cache folder exists: said, not shown as an empty cache (a mistyped --cache-dir, the wrong user's HOME).
    An explicit --cache-dir that is not there is an error."""
    from openrerank.runtimes.onnx_export import default_cache_dir

    root = default_cache_dir()
    print(f"no cache at {root} (nothing built there yet, or not the folder `serve` uses: OPENRERANK_CACHE_DIR, "
          "--cache-dir)", file=sys.stderr)
    return 1 if args.cache_dir else 0


def _count(n: int) -> str:
    return f"{n} {'entry' if n == 1 else 'entries'}"


def _use_cache_dir(args: argparse.Namespace) -> None:
    """`--cache-dir DIR` stands for OPENRERANK_CACHE_DIR=DIR, as in `serve` (ONNX exports in it, the rest in
    its folders)."""
    from openrerank.runtimes.artifact_cache import CACHE_ENV

    if args.cache_dir:
        os.environ[CACHE_ENV] = args.cache_dir


def _as_json(e: Entry) -> dict:
    return {"path": str(e.path), "kind": e.kind, "size": e.size,
            "last_used": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(e.last_used)),
            "built_with": e.built_with, "usable": e.unusable is None, "unusable": e.unusable, "building": e.building,
            "note": e.note}


def _built_with(facts: dict) -> str:
    parts = []
    for name, value in facts.items():
        if isinstance(value, dict):
            parts += [f"{k} {v}" for k, v in value.items()]
        elif value is not None:
            parts.append(f"{name} {value}")
    return ", ".join(parts) or "-"


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError  # unreachable


def _age(seconds: float, ago: bool = False) -> str:
    seconds = max(0.0, seconds)
    if seconds < 3600:
        text = f"{seconds / 60:.0f} min"
    elif seconds < _DAY:
        text = f"{seconds / 3600:.0f} h"
    else:
        text = f"{seconds / _DAY:.0f} days"
    return f"{text} ago" if ago else text


def _print_table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> None:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())


def _days(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"a number of days, 0 or more, not {text!r}")
    return value


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("cache", help="list or prune the converted-model cache (ONNX exports, OpenVINO IRs, ...)",
                       description="The converted-model cache `serve` and `export` fill (OPENRERANK_CACHE_DIR, "
                       "default $XDG_CACHE_HOME/openrerank): ONNX exports, OpenVINO IRs and compiled blobs, "
                       "engine-choice and speed records. An upgrade keys new entries and leaves the old ones.")
    actions = p.add_subparsers(dest="cache_command", metavar="ACTION", required=True)
    cache_dir = argparse.ArgumentParser(add_help=False)
    cache_dir.add_argument("--cache-dir", metavar="DIR",
                           help="the cache, as OPENRERANK_CACHE_DIR names it (default: $OPENRERANK_CACHE_DIR, else "
                           "$XDG_CACHE_HOME/openrerank's onnx/, openvino/, engine-choice/ and speed/ folders)")
    ls = actions.add_parser("ls", parents=[cache_dir], help="each entry: size, last use, kind, whether this "
                            "install can use it, what it was built with",
                            description="List the cache's entries: size, last use (a start that read it, or the "
                            "build), kind, whether this install can use it (the recipe number and package "
                            "versions it recorded are this install's) and what it was built with.")
    ls.add_argument("--json", action="store_true", help="machine-readable output")
    ls.set_defaults(func=run_ls)
    prune = actions.add_parser("prune", parents=[cache_dir], help="remove the entries this install never reads",
                               description="Remove the entries this install never reads (built with another "
                               "recipe number or package versions, damaged, older compiled-blob layouts, "
                               "unfinished builds), under the locks builds take: safe beside running servers. "
                               "Entries an older version sharing the cache still uses go too: prune once every "
                               "server on the cache runs this version.")
    prune.add_argument("--unused-days", type=_days, metavar="N",
                       help="also remove entries no start used for N days (default: keep every usable entry)")
    prune.add_argument("--dry-run", action="store_true", help="list what would be removed, remove nothing")
    prune.set_defaults(func=run_prune)

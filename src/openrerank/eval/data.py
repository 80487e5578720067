"""Read evaluation data in BEIR layout and TREC run files.

A BEIR folder holds `corpus.jsonl[.gz]`, `queries.jsonl[.gz]` and `qrels/<split>.tsv`. A page-image corpus is
the same layout whose rows also (or only) name an `image`: a PNG or JPEG file, relative to the folder, that a
vision-language reranker reads with the row's text (`title`/`text` may be empty). Only the queries
that have a judged-relevant document in the split's qrels are evaluated (SciFact's `queries.jsonl` also holds
the train queries), the convention BEIR and trec_eval share.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from openrerank.sources.safety import file_sha256

Run = dict[str, dict[str, float]]
Qrels = dict[str, dict[str, int]]


class DatasetError(ValueError):
    """The folder is not a usable BEIR dataset (missing file, bad line)."""


#: Image file suffix -> the MIME type its data URL declares (what `core/images.py` accepts).
IMAGE_TYPES = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg"}


@dataclass(frozen=True)
class Doc:
    title: str
    text: str
    image: Path | None = None  # a page image (page-image corpora), read when the document is reranked

    def image_url(self) -> str | None:
        """The page image as the base64 data URL a reranker takes (None: a text document)."""
        if self.image is None:
            return None
        import base64

        data = base64.b64encode(self.image.read_bytes()).decode("ascii")
        return f"data:{IMAGE_TYPES[self.image.suffix.lower()]};base64,{data}"

    def passage(self) -> str:
        """The text a reranker or bi-encoder sees: `title + " " + text` when a title exists, as BEIR does."""
        return f"{self.title} {self.text}" if self.title else self.text


def served_text(text: str) -> str:
    """A text as sent to a server: the empty text as one space. The server refuses an empty text (as OpenAI and
    NIM do) and a whole request with it; a blank tokenizes to nothing, so it scores and embeds as the empty text
    does in-process."""
    return text or " "


@dataclass
class Dataset:
    name: str
    path: Path
    split: str
    corpus: dict[str, Doc]
    queries: dict[str, str]  # only the evaluated queries, in qrels order
    qrels: Qrels
    corpus_file: Path
    _hash: str | None = field(default=None, repr=False)
    #: What the tables and CSV call it: `name`, or with parent folders where two datasets share a name.
    label: str = ""

    @property
    def doc_ids(self) -> list[str]:
        return list(self.corpus)

    def corpus_hash(self) -> str:
        """Content hash of the corpus file: embedding caches are keyed by it, so an edited corpus re-encodes."""
        if self._hash is None:
            self._hash = file_sha256(self.corpus_file)
        return self._hash


def _find(folder: Path, stem: str) -> Path:
    for name in (stem, stem + ".gz"):
        if (folder / name).is_file():
            return folder / name
    raise DatasetError(f"{folder}: no {stem} or {stem}.gz")


def _open_text(path: Path) -> io.TextIOBase:
    if path.suffix == ".gz":
        return gzip.open(path, "rt", encoding="utf-8")  # type: ignore[return-value]
    return open(path, encoding="utf-8")


def _jsonl(path: Path) -> Iterator[dict]:
    with _open_text(path) as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    yield json.loads(line)
                except ValueError as exc:
                    raise DatasetError(f"{path}:{n}: not JSON ({exc})") from exc


def load_corpus(path: Path) -> dict[str, Doc]:
    corpus: dict[str, Doc] = {}
    for row in _jsonl(path):
        doc_id = str(row["_id"])
        corpus[doc_id] = Doc((row.get("title") or "").strip(), row.get("text") or "",
                             _image_file(path.parent, row.get("image"), doc_id))
    return corpus


def _image_file(folder: Path, name: object, doc_id: str) -> Path | None:
    """A row's `image`, checked to be a PNG/JPEG file inside the dataset folder."""
    if name is None or name == "":
        return None
    if not isinstance(name, str):
        raise DatasetError(f"corpus row {doc_id}: image must be a file name, not {type(name).__name__}")
    file = (folder / name).resolve()
    if not file.is_relative_to(folder.resolve()):
        raise DatasetError(f"corpus row {doc_id}: image {name!r} is outside the dataset folder")
    if file.suffix.lower() not in IMAGE_TYPES:
        raise DatasetError(f"corpus row {doc_id}: image {name!r} is not a .png, .jpg or .jpeg file")
    if not file.is_file():
        raise DatasetError(f"corpus row {doc_id}: image file {name!r} does not exist")
    return file


#: The qrels split evaluated unless told otherwise (BEIR's evaluation split, qrels/test.tsv).
DEFAULT_SPLIT = "test"


def load_qrels(path: Path) -> Qrels:
    """`query-id<TAB>corpus-id<TAB>score` with a header line (BEIR) or without."""
    qrels: Qrels = {}
    with open(path, encoding="utf-8", newline="") as f:
        for n, row in enumerate(csv.reader(f, delimiter="\t"), 1):
            if not row or (n == 1 and row[0] == "query-id"):
                continue
            if len(row) < 3:
                raise DatasetError(f"{path}:{n}: expected 3 tab-separated columns")
            qrels.setdefault(row[0], {})[row[1]] = int(float(row[2]))
    return qrels


def load_dataset(path: str | Path, split: str = DEFAULT_SPLIT, *, limit_queries: int | None = None) -> Dataset:
    """Load a BEIR folder; keep the queries that have at least one judgment with grade > 0 in the split."""
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise DatasetError(f"{folder}: not a directory")
    qrels_file = folder / "qrels" / f"{split}.tsv"
    if not qrels_file.is_file():
        raise DatasetError(f"{folder}: no qrels/{split}.tsv")
    corpus_file = _find(folder, "corpus.jsonl")
    all_qrels = load_qrels(qrels_file)
    all_queries = {str(r["_id"]): r.get("text") or "" for r in _jsonl(_find(folder, "queries.jsonl"))}
    qids = [q for q, judged in all_qrels.items() if any(g > 0 for g in judged.values())]
    missing = [q for q in qids if q not in all_queries]
    if missing:
        raise DatasetError(f"{folder}: {len(missing)} qrels query ids absent from queries.jsonl, e.g. {missing[0]}")
    if not qids:
        raise DatasetError(f"{folder}: no query has a judgement above 0 in qrels/{split}.tsv: nothing to evaluate")
    if limit_queries is not None:
        if limit_queries < 1:
            raise DatasetError(f"limit_queries {limit_queries}: must be at least 1")
        qids = qids[:limit_queries]
    return Dataset(
        name=folder.resolve().name,
        path=folder,
        split=split,
        corpus=load_corpus(corpus_file),
        queries={q: all_queries[q] for q in qids},
        qrels={q: all_qrels[q] for q in qids},
        corpus_file=corpus_file,
    )


def read_trec_run(path: str | Path) -> Run:
    """TREC run format `qid Q0 docid rank score tag` (whitespace separated, optionally gzipped)."""
    path = Path(path)
    run: Run = {}
    with _open_text(path) as f:
        for n, line in enumerate(f, 1):
            parts = line.split()
            if not parts:
                continue
            if len(parts) < 5:
                raise DatasetError(f"{path}:{n}: expected `qid Q0 docid rank score [tag]`")
            run.setdefault(parts[0], {})[parts[2]] = float(parts[4])
    return run


#: What a TREC run file's name ends with that is not part of its row name (`bm25_top100.trec.gz` -> bm25_top100).
RUN_FILE_SUFFIXES = (".trec", ".run", ".txt", ".tsv")


def _run_stem(path: Path) -> str:
    name = path.name[:-3] if path.name.lower().endswith(".gz") else path.name
    for suffix in RUN_FILE_SUFFIXES:
        if name.lower().endswith(suffix):
            name = name[: -len(suffix)]
            break
    return name or path.name


def run_file_names(paths: list[Path]) -> dict[Path, str]:
    """Each run file's row name (the table shows `run:NAME`): its file name less .gz and RUN_FILE_SUFFIXES, and
    where distinct files share that, the folders above it until the names differ (`a/bm25`, `b/bm25`; the
    whole path as the last resort), so no row silently shows another file's numbers. `paths` are resolved."""
    return distinct_names(paths, _run_stem)


def dataset_labels(folders: list[Path]) -> dict[Path, str]:
    """Each dataset folder's name in the tables and CSV: its own name, and where distinct folders share it, the
    folders above it until the names differ (`a/scifact`, `b/scifact`). The same folder twice (two splits) keeps
    one name: the split tells them apart."""
    return distinct_names(list(dict.fromkeys(f.resolve() for f in folders)), lambda p: p.name)


def distinct_names(paths: list[Path], stem: Callable[[Path], str]) -> dict[Path, str]:
    """`stem(path)` for each of the distinct `paths`, with as many of its parent folders in front as make the
    names differ (the whole path as the last resort)."""
    depth = dict.fromkeys(paths, 0)

    def label(path: Path) -> str:
        if depth[path] > len(path.parents):  # `x.trec` beside `x.trec.gz`
            return str(path)
        folders = [p.name for p in path.parents][: depth[path]][::-1]
        return "/".join([*(n for n in folders if n), stem(path)])

    while True:
        groups: dict[str, list[Path]] = {}
        for path in paths:
            groups.setdefault(label(path), []).append(path)
        clashes = [path for group in groups.values() if len(group) > 1 for path in group]
        if not clashes:
            return {path: label(path) for path in paths}
        for path in clashes:
            depth[path] += 1

"""The one BEIR reader: every stage (pairs, index build, eval, search titles) reads datasets here.

Layout: `corpus.jsonl`, `queries.jsonl`, `qrels/<split>.tsv`, each optionally gzipped; CRLF line
ends and a UTF-8 byte-order mark are tolerated. One policy for every stage:

- A document with a title or a text (or both) is a document. Ids may be JSON strings or integers;
  they become strings, so `4983` in the corpus is the `4983` of the qrels.
- A line that is not a JSON object, a record without an id, a document with neither title nor
  text, a query without text, a duplicate id (the first valid one wins), a qrels line without
  three columns or with a non-integer score: *malformed*. `data.on_malformed` says what happens:
  `fail` stops with the file and line named, `quarantine` drops the row and counts it.
- Qrels keep their graded scores as gains. A score below `data.positive_min` (default 1) is a
  judgment of non-relevance: never a positive, usable as a known negative.
- Judgments naming an unknown query or document, and repeated judgments, are dropped and reported
  (never fatal: collections ship qrels for documents they later removed).

The per-line parsers are plain functions so that the Spark job applies exactly the same rules in
its workers (`pipelines/records.py`).
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.resources
import io
import json
import os
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from towerline.config import DataConfig
from towerline.errors import DataError
from towerline.templates import render_document

DATA_DIR_ENV = "TOWERLINE_DATA_DIR"
BUNDLED_DATASETS = ("scifact",)
CORPUS_FILE = "corpus.jsonl"
QUERIES_FILE = "queries.jsonl"
QRELS_DIR = "qrels"
QRELS_SUFFIXES = (".tsv", ".tsv.gz")
QRELS_HEADERS = frozenset({"query-id", "query_id", "qid"})

MALFORMED_JSON = "malformed JSON"
NOT_AN_OBJECT = "malformed JSON (not an object)"
MISSING_ID = "missing or empty _id"
EMPTY_DOCUMENT = "document has neither title nor text"
EMPTY_QUERY = "query has no text"
DUPLICATE_DOC = "duplicate doc id"
DUPLICATE_QUERY = "duplicate query id"
DUPLICATE_JUDGMENT = "duplicate judgment"
UNKNOWN_QUERY = "unknown query id"
UNKNOWN_DOC = "unknown doc id"
# Dropped and reported whatever `on_malformed` says; every other reason follows that policy.
REPORTED_ONLY = frozenset({UNKNOWN_QUERY, UNKNOWN_DOC, DUPLICATE_JUDGMENT})

# split -> query id -> doc id -> graded score
Qrels = dict[str, dict[str, int]]


@dataclass(frozen=True)
class Document:
    doc_id: str
    title: str
    text: str

    @property
    def full_text(self) -> str:
        """What the doc tower and BM25 read: title and text, whichever exist."""
        return f"{self.title} {self.text}".strip()

    def render(self, template: str) -> str:
        """What a doc tower reads: title and text through its template (towerline.templates)."""
        return render_document(template, self.title, self.text)


class RowRejected(Exception):
    """A line that does not become a record; `reason` is what quarantine and errors report."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


# ---------------------------------------------------------------- per-line parsers (shared with Spark)


def parse_document(raw: str) -> Document:
    record = _json_object(raw)
    title, text = _optional_text(record, "title"), _optional_text(record, "text")
    doc_id = _record_id(record)
    if not title.strip() and not text.strip():
        raise RowRejected(EMPTY_DOCUMENT)
    return Document(doc_id=doc_id, title=title.strip(), text=text.strip())


def parse_query(raw: str) -> tuple[str, str]:
    record = _json_object(raw)
    query_id, text = _record_id(record), _optional_text(record, "text")
    if not text.strip():
        raise RowRejected(EMPTY_QUERY)
    return query_id, text.strip()


def parse_judgment(raw: str) -> tuple[str, str, int]:
    cells = [cell.strip() for cell in raw.lstrip("\ufeff").rstrip("\r\n").split("\t")]
    if len(cells) != 3:
        raise RowRejected(f"expected 3 tab-separated columns, got {len(cells)}")
    query_id, doc_id, score_text = cells
    if not query_id or not doc_id:
        raise RowRejected("empty query or doc id")
    try:
        return query_id, doc_id, int(score_text)
    except ValueError:
        raise RowRejected(f"score {score_text!r} is not an integer") from None


def is_qrels_header(line_no: int, raw: str) -> bool:
    return line_no == 1 and raw.lstrip("\ufeff").split("\t", 1)[0].strip().lower() in QRELS_HEADERS


def _json_object(raw: str) -> dict:
    try:
        record = json.loads(raw.lstrip("\ufeff"))
    except ValueError:
        raise RowRejected(MALFORMED_JSON) from None
    if not isinstance(record, dict):
        raise RowRejected(NOT_AN_OBJECT)
    return record


def _record_id(record: dict) -> str:
    value = record.get("_id")
    # Numeric ids are ids all the same; bools and floats are not (1.0 would not match "1").
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    if isinstance(value, str) and value.strip():
        return value.strip()
    raise RowRejected(MISSING_ID)


def _optional_text(record: dict, name: str) -> str:
    value = record.get(name)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise RowRejected(f"field {name!r} is not a string")
    return value


# ---------------------------------------------------------------- locating a dataset


@dataclass(frozen=True)
class DatasetFiles:
    """Where a dataset's files are; `qrels` maps each split found to its file."""

    name: str
    root: Path
    corpus: Path
    queries: Path
    qrels: dict[str, Path]

    def split_file(self, split: str) -> Path:
        if split not in self.qrels:
            found = ", ".join(sorted(self.qrels)) or "none"
            raise DataError(f"{self.root}: no qrels/{split}.tsv (splits present: {found})")
        return self.qrels[split]

    def all_files(self) -> list[Path]:
        return [self.corpus, self.queries, *(self.qrels[split] for split in sorted(self.qrels))]

    def identity(self) -> dict[str, str]:
        """How results and manifests name a dataset: its name and a content fingerprint, never a path."""
        return {"name": self.name, "fingerprint": content_fingerprint(self.all_files())}


def source_name(path: Path) -> str:
    """How quarantine rows and reports name a file: `corpus.jsonl`, `qrels/test.tsv`."""
    return f"{QRELS_DIR}/{path.name}" if path.parent.name == QRELS_DIR else path.name


def bundled_dir(name: str) -> Path:
    return Path(str(importlib.resources.files("towerline") / "datasets" / name))


def locate_dataset(data: DataConfig) -> DatasetFiles:
    """Explicit dir, else $TOWERLINE_DATA_DIR/<dataset>, else the bundled copy; qrels from data.qrels_dir if set."""
    root, name = _dataset_root(data)
    qrels_dir = Path(data.qrels_dir) if data.qrels_dir is not None else root / QRELS_DIR
    return DatasetFiles(
        name=name,
        root=root,
        corpus=dataset_file(root, CORPUS_FILE),
        queries=dataset_file(root, QUERIES_FILE),
        qrels=_qrels_files(qrels_dir),
    )


def _dataset_root(data: DataConfig) -> tuple[Path, str]:
    if data.dir is not None:
        return _checked_dir(Path(data.dir), "data.dir"), Path(data.dir).resolve().name
    env_root = os.environ.get(DATA_DIR_ENV)
    if env_root:
        return _checked_dir(Path(env_root) / data.dataset, f"{DATA_DIR_ENV}={env_root}"), data.dataset
    if data.dataset in BUNDLED_DATASETS:
        return bundled_dir(data.dataset), data.dataset
    raise DataError(f"dataset {data.dataset!r} is not bundled; set data.dir=DIR or {DATA_DIR_ENV}")


def _checked_dir(path: Path, source: str) -> Path:
    if not path.is_dir():
        raise DataError(f"data dir not found: {path} (from {source})")
    return path


def dataset_file(root: Path, name: str) -> Path:
    for candidate in (root / name, root / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    raise DataError(f"{root}: missing {name} (or {name}.gz); not a BEIR-layout dataset dir")


def _qrels_files(qrels_dir: Path) -> dict[str, Path]:
    files: dict[str, Path] = {}
    if not qrels_dir.is_dir():
        return files
    # Plain files sort before their .gz twins, so a plain file wins when both exist.
    for path in sorted(qrels_dir.iterdir()):
        for suffix in QRELS_SUFFIXES:
            if path.is_file() and path.name.endswith(suffix):
                files.setdefault(path.name.removesuffix(suffix), path)
    return files


def _open_text(path: Path) -> IO[str]:
    # Universal newlines: CRLF files read like LF files; utf-8-sig drops a byte-order mark.
    if path.suffix == ".gz":
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8-sig")
    return path.open(encoding="utf-8-sig")


def numbered_lines(path: Path) -> Iterator[tuple[int, str]]:
    """(1-based line number, line) for every non-blank line."""
    try:
        with _open_text(path) as handle:
            for line_no, line in enumerate(handle, start=1):
                if line.strip():
                    yield line_no, line.rstrip("\n")
    except (OSError, EOFError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: unreadable ({exc.__class__.__name__}: {exc})") from None


def content_fingerprint(files: Iterable[Path]) -> str:
    """sha256 over each file's name and decompressed bytes: gzipping a dataset keeps its fingerprint."""
    digest = hashlib.sha256()
    for path in files:
        digest.update(source_name(path).removesuffix(".gz").encode() + b"\0")
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rb") as handle:
            for block in iter(lambda h=handle: h.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


# ---------------------------------------------------------------- reading a dataset under the policy


@dataclass(frozen=True)
class Rejection:
    """A row that did not make it into the dataset, traceable to its file and line."""

    path: Path
    line: int
    reason: str
    raw: str

    @property
    def source(self) -> str:
        return source_name(self.path)

    @property
    def fatal(self) -> bool:
        """Malformed (follows on_malformed) rather than merely reported."""
        return self.reason not in REPORTED_ONLY

    def error(self) -> DataError:
        return DataError(f"{self.path}:{self.line}: {self.reason}")


@dataclass
class BeirDataset:
    files: DatasetFiles
    corpus: dict[str, Document] = field(default_factory=dict)
    queries: dict[str, str] = field(default_factory=dict)
    qrels: dict[str, Qrels] = field(default_factory=dict)
    rows: Counter[str] = field(default_factory=Counter)
    rejections: list[Rejection] = field(default_factory=list)

    def first_fatal(self) -> Rejection | None:
        """The first malformed row, in file order (corpus, queries, qrels)."""
        return next((rejection for rejection in self.rejections if rejection.fatal), None)

    def rejected_in(self, path: Path) -> int:
        return sum(1 for rejection in self.rejections if rejection.path == path)

    def enforce(self, on_malformed: str) -> BeirDataset:
        """Under `fail`, raise the first malformed row; under `quarantine`, go on."""
        first = self.first_fatal()
        if on_malformed == "fail" and first is not None:
            raise first.error()
        return self

    def split(self, name: str) -> Qrels:
        if name not in self.qrels:
            self.files.split_file(name)  # raises, naming the splits present
        return self.qrels[name]


def read_dataset(files: DatasetFiles, splits: Iterable[str] = ()) -> BeirDataset:
    """Read the corpus, the queries and the named qrels splits, collecting every rejection."""
    dataset = BeirDataset(files=files)
    _read_corpus(dataset)
    _read_queries(dataset)
    for split in splits:
        dataset.qrels[split] = _read_qrels(dataset, files.split_file(split))
    return dataset


def load_dataset(data: DataConfig, splits: Iterable[str] = ()) -> BeirDataset:
    """The entry point for stages: locate, read, and apply `data.on_malformed`."""
    return read_dataset(locate_dataset(data), splits).enforce(data.on_malformed)


def _read_corpus(dataset: BeirDataset) -> None:
    path = dataset.files.corpus
    for line_no, raw in numbered_lines(path):
        dataset.rows[source_name(path)] += 1
        try:
            document = parse_document(raw)
        except RowRejected as rejected:
            dataset.rejections.append(Rejection(path, line_no, rejected.reason, raw))
            continue
        if document.doc_id in dataset.corpus:
            dataset.rejections.append(Rejection(path, line_no, DUPLICATE_DOC, raw))
            continue
        dataset.corpus[document.doc_id] = document


def _read_queries(dataset: BeirDataset) -> None:
    path = dataset.files.queries
    for line_no, raw in numbered_lines(path):
        dataset.rows[source_name(path)] += 1
        try:
            query_id, text = parse_query(raw)
        except RowRejected as rejected:
            dataset.rejections.append(Rejection(path, line_no, rejected.reason, raw))
            continue
        if query_id in dataset.queries:
            dataset.rejections.append(Rejection(path, line_no, DUPLICATE_QUERY, raw))
            continue
        dataset.queries[query_id] = text


def _read_qrels(dataset: BeirDataset, path: Path) -> Qrels:
    qrels: Qrels = {}
    for line_no, raw in numbered_lines(path):
        if is_qrels_header(line_no, raw):
            continue
        dataset.rows[source_name(path)] += 1
        try:
            query_id, doc_id, score = parse_judgment(raw)
            _check_judgment(dataset, qrels, query_id, doc_id)
        except RowRejected as rejected:
            dataset.rejections.append(Rejection(path, line_no, rejected.reason, raw))
            continue
        qrels.setdefault(query_id, {})[doc_id] = score
    return qrels


def _check_judgment(dataset: BeirDataset, qrels: Qrels, query_id: str, doc_id: str) -> None:
    # The same order of checks as the Spark job: query, then document, then repetition.
    if query_id not in dataset.queries:
        raise RowRejected(UNKNOWN_QUERY)
    if doc_id not in dataset.corpus:
        raise RowRejected(UNKNOWN_DOC)
    if doc_id in qrels.get(query_id, {}):
        raise RowRejected(DUPLICATE_JUDGMENT)


def positives(judged: dict[str, int], positive_min: int) -> set[str]:
    """The documents judged relevant: score at or above the threshold (0 is never one)."""
    return {doc_id for doc_id, score in judged.items() if score >= positive_min}

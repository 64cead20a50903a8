"""BEIR-layout datasets (corpus.jsonl, queries.jsonl, qrels/<split>.tsv; each optionally .gz).

Shared by every stage that reads the raw dataset. Malformed input fails with the file and
line named; nothing downstream sees a partial dataset.
"""

from __future__ import annotations

import csv
import gzip
import importlib.resources
import io
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from towerline.config import DataConfig
from towerline.errors import DataError

DATA_DIR_ENV = "TOWERLINE_DATA_DIR"
BUNDLED_DATASETS = ("scifact",)


@dataclass(frozen=True)
class Document:
    doc_id: str
    title: str
    text: str

    @property
    def full_text(self) -> str:
        return f"{self.title} {self.text}".strip() if self.title else self.text


def bundled_dir(name: str) -> Path:
    return Path(str(importlib.resources.files("towerline") / "datasets" / name))


def resolve_dataset_dir(data: DataConfig) -> Path:
    """Explicit dir, else $TOWERLINE_DATA_DIR/<dataset>, else the bundled copy."""
    if data.dir is not None:
        return _check_dataset_dir(Path(data.dir), "data.dir")
    env_root = os.environ.get(DATA_DIR_ENV)
    if env_root:
        return _check_dataset_dir(Path(env_root) / data.dataset, f"{DATA_DIR_ENV}={env_root}")
    if data.dataset in BUNDLED_DATASETS:
        return bundled_dir(data.dataset)
    raise DataError(
        f"dataset {data.dataset!r} is not bundled; set data.dir=DIR or {DATA_DIR_ENV}"
    )


def _check_dataset_dir(path: Path, source: str) -> Path:
    if not path.is_dir():
        raise DataError(f"data dir not found: {path} (from {source})")
    dataset_file(path, "corpus.jsonl")
    return path


def dataset_file(root: Path, name: str) -> Path:
    for candidate in (root / name, root / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    raise DataError(f"{root}: missing {name} (or {name}.gz); not a BEIR-layout dataset dir")


def _open_text(path: Path) -> IO[str]:
    if path.suffix == ".gz":
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8")
    return path.open(encoding="utf-8")


def iter_jsonl(path: Path) -> Iterator[tuple[int, dict]]:
    """Yield (line number, object) for each non-blank line; a bad line raises DataError."""
    with _open_text(path) as handle:
        for line_no, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{line_no}: malformed JSON ({exc.msg})") from None
            if not isinstance(record, dict):
                raise DataError(f"{path}:{line_no}: expected a JSON object")
            yield line_no, record


def _string_field(record: dict, field: str, path: Path, line_no: int, required: bool = True) -> str:
    value = record.get(field)
    if value is None and not required:
        return ""
    if not isinstance(value, (str, int)) or (required and str(value).strip() == ""):
        raise DataError(f"{path}:{line_no}: field {field!r} is missing or not a non-empty string")
    return str(value)


def load_corpus(root: Path) -> dict[str, Document]:
    path = dataset_file(root, "corpus.jsonl")
    corpus: dict[str, Document] = {}
    for line_no, record in iter_jsonl(path):
        doc_id = _string_field(record, "_id", path, line_no)
        if doc_id in corpus:
            raise DataError(f"{path}:{line_no}: duplicate document id {doc_id!r}")
        corpus[doc_id] = Document(
            doc_id=doc_id,
            title=_string_field(record, "title", path, line_no, required=False),
            text=_string_field(record, "text", path, line_no),
        )
    if not corpus:
        raise DataError(f"{path}: the corpus is empty")
    return corpus


def load_queries(root: Path) -> dict[str, str]:
    path = dataset_file(root, "queries.jsonl")
    queries: dict[str, str] = {}
    for line_no, record in iter_jsonl(path):
        query_id = _string_field(record, "_id", path, line_no)
        queries[query_id] = _string_field(record, "text", path, line_no)
    return queries


def load_qrels(root: Path, split: str) -> dict[str, dict[str, int]]:
    path = dataset_file(root / "qrels", f"{split}.tsv")
    qrels: dict[str, dict[str, int]] = {}
    with _open_text(path) as handle:
        reader = csv.reader(handle, delimiter="\t")
        for line_no, row in enumerate(reader, start=1):
            if not row or (line_no == 1 and row[0] == "query-id"):
                continue
            if len(row) != 3:
                raise DataError(f"{path}:{line_no}: expected 3 tab-separated columns, got {len(row)}")
            query_id, doc_id, score = (cell.strip() for cell in row)
            try:
                relevance = int(score)
            except ValueError:
                raise DataError(f"{path}:{line_no}: score {score!r} is not an integer") from None
            qrels.setdefault(query_id, {})[doc_id] = relevance
    if not qrels:
        raise DataError(f"{path}: no judgments")
    return qrels

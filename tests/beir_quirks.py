"""BEIR-format datasets with the quirks real collections have, each made from a clean synthetic one.

Every builder copies the clean dataset to `dest` and changes one thing, so a failing test names
the quirk that broke.
"""

from __future__ import annotations

import gzip
import json
import shutil
from collections.abc import Callable
from pathlib import Path

TITLE_ONLY = ("d0", "d1", "d2")
TEXT_ONLY = ("d3", "d4", "d5")
EMPTY_DOC_LINE = 8  # 1-based corpus line of the document left with neither title nor text


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _write_records(path: Path, records: list[dict]) -> None:
    path.write_text("".join(json.dumps(record) + "\n" for record in records))


def _qrels_rows(path: Path) -> list[list[str]]:
    return [line.split("\t") for line in path.read_text().splitlines()[1:] if line.strip()]


def _write_qrels(path: Path, rows: list[list[str]]) -> None:
    path.write_text("\n".join(["query-id\tcorpus-id\tscore", *("\t".join(row) for row in rows)]) + "\n")


def title_and_text_only(root: Path) -> None:
    corpus = _records(root / "corpus.jsonl")
    for record in corpus:
        if record["_id"] in TITLE_ONLY:
            record["text"] = ""
        if record["_id"] in TEXT_ONLY:
            del record["title"]
    _write_records(root / "corpus.jsonl", corpus)


def numeric_ids(root: Path) -> None:
    """d12 → 12 and q7 → 1007 as JSON integers; the qrels name them as plain numbers."""

    def number(identifier: str) -> int:
        return int(identifier[1:]) + (1000 if identifier.startswith("q") else 0)

    for name in ("corpus.jsonl", "queries.jsonl"):
        records = _records(root / name)
        for record in records:
            record["_id"] = number(record["_id"])
        _write_records(root / name, records)
    for path in (root / "qrels").iterdir():
        _write_qrels(path, [[str(number(q)), str(number(d)), score] for q, d, score in _qrels_rows(path)])


def graded_qrels_with_zeros(root: Path) -> None:
    """Positives graded 2, plus a judged-non-relevant (score 0) document for every query."""
    for path in (root / "qrels").iterdir():
        rows = []
        for query_id, doc_id, _ in _qrels_rows(path):
            rows.append([query_id, doc_id, "2"])
            rows.append([query_id, non_relevant_doc(doc_id), "0"])
        _write_qrels(path, rows)


def non_relevant_doc(doc_id: str) -> str:
    """The document graded_qrels_with_zeros judges non-relevant beside `doc_id` (80 docs)."""
    return f"d{(int(doc_id[1:]) + 41) % 80}"


def gzipped(root: Path) -> None:
    for path in [root / "corpus.jsonl", root / "queries.jsonl", *(root / "qrels").iterdir()]:
        path.with_name(path.name + ".gz").write_bytes(gzip.compress(path.read_bytes()))
        path.unlink()


def no_train_split(root: Path) -> None:
    (root / "qrels" / "train.tsv").unlink()


def crlf_line_ends(root: Path) -> None:
    for path in [root / "corpus.jsonl", root / "queries.jsonl", *(root / "qrels").iterdir()]:
        path.write_bytes(path.read_bytes().replace(b"\n", b"\r\n"))


def empty_document(root: Path) -> None:
    corpus = _records(root / "corpus.jsonl")
    corpus[EMPTY_DOC_LINE - 1]["title"] = ""
    corpus[EMPTY_DOC_LINE - 1]["text"] = "   "
    _write_records(root / "corpus.jsonl", corpus)


QUIRKS: dict[str, Callable[[Path], None]] = {
    "title-and-text-only": title_and_text_only,
    "numeric-ids": numeric_ids,
    "graded-qrels-with-zeros": graded_qrels_with_zeros,
    "gzipped": gzipped,
    "no-train-split": no_train_split,
    "crlf": crlf_line_ends,
    "empty-document": empty_document,
}


def make_quirky(clean: Path, quirk: str, dest: Path) -> Path:
    shutil.copytree(clean, dest)
    QUIRKS[quirk](dest)
    return dest

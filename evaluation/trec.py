"""TREC files: runs (`qid Q0 docid rank score tag`), qrels (`qid iteration docid relevance`) and topics
(the classic SGML `<top>` blocks, whose `<title>` is the query, or `query_id<TAB>text` lines).
A malformed line is named by file and line number."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

from evaluation.metrics import Qrels, Run
from towerline.errors import DataError

T = TypeVar("T", int, float)
TOP = re.compile(r"<top>(.*?)</top>", re.DOTALL | re.IGNORECASE)
NUM = re.compile(r"<num>\s*(?:Number:)?\s*(\S+)", re.IGNORECASE)
TITLE = re.compile(r"<title>\s*(?:Topic:)?\s*(.*?)\s*(?=<[a-z]+>|$)", re.DOTALL | re.IGNORECASE)


def _rows(path: Path, columns: int, layout: str) -> Iterator[tuple[int, list[str]]]:
    """(line number, fields) of every non-blank line, each with exactly `columns` whitespace-separated fields."""
    with Path(path).open() as handle:
        for line_no, line in enumerate(handle, start=1):
            fields = line.split()
            if not fields:
                continue
            if len(fields) != columns:
                raise DataError(f"{path}:{line_no}: expected `{layout}`, found {len(fields)} field(s)")
            yield line_no, fields


def _grouped(path: Path, layout: str, value_column: int, cast: Callable[[str], T], what: str
             ) -> dict[str, dict[str, T]]:
    """query id -> doc id (column 2) -> the cast value of `value_column`, for every line of `layout`."""
    grouped: dict[str, dict[str, T]] = {}
    for line_no, fields in _rows(path, len(layout.split()), layout):
        try:
            value = cast(fields[value_column])
        except ValueError:
            raise DataError(f"{path}:{line_no}: {what} {fields[value_column]!r} is not "
                            f"{'an integer' if cast is int else 'a number'}") from None
        grouped.setdefault(fields[0], {})[fields[2]] = value
    if not grouped:
        raise DataError(f"{path}: no lines of `{layout}`")
    return grouped


def read_trec_run(path: Path) -> Run:
    return _grouped(path, "query_id Q0 doc_id rank score tag", 4, float, "score")


def read_trec_qrels(path: Path) -> Qrels:
    return _grouped(path, "query_id iteration doc_id relevance", 3, int, "relevance")


def read_trec_topics(path: Path) -> dict[str, str]:
    text = path.read_text()
    topics: dict[str, str] = {}
    if "<top>" in text.lower():
        for number, block in enumerate(TOP.findall(text), start=1):
            num, title = NUM.search(block), TITLE.search(block)
            if not num or not title or not title.group(1).strip():
                raise DataError(f"{path}: topic {number} has no <num> or no <title>")
            topics[num.group(1)] = " ".join(title.group(1).split())
    else:
        for line_no, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            query_id, tab, query = line.partition("\t")
            if not tab or not query_id.strip() or not query.strip():
                raise DataError(f"{path}:{line_no}: expected query_id<TAB>text")
            topics[query_id.strip()] = query.strip()
    if not topics:
        raise DataError(f"{path}: no topics")
    return topics


def write_trec_run(path: Path, run: Run) -> None:
    with path.open("w") as handle:
        for query_id, hits in run.items():
            ranked = sorted(hits.items(), key=lambda item: -item[1])
            for rank, (doc_id, score) in enumerate(ranked, start=1):
                # repr: the shortest text that reads back as the same float, so a run scored from its file
                # scores exactly as the run did (rounded scores would add ties, ordered by doc id).
                handle.write(f"{query_id} Q0 {doc_id} {rank} {float(score)!r} towerline\n")


def write_trec_qrels(path: Path, qrels: Qrels) -> None:
    with path.open("w") as handle:
        for query_id, judged in qrels.items():
            for doc_id, grade in judged.items():
                handle.write(f"{query_id} 0 {doc_id} {grade}\n")

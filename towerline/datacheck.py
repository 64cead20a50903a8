"""`towerline data check`: validate a whole BEIR dataset in seconds, before any expensive stage.

Reads the corpus, the queries and every qrels split with the shared reader, and reports counts,
rejected rows by reason, word-length statistics and the splits present. `demo` runs it first;
under `data.on_malformed=fail` a malformed row ends the run here, naming its file and line.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from towerline.beir import BeirDataset, Qrels, locate_dataset, positives, read_dataset
from towerline.config import DataConfig


@dataclass(frozen=True)
class LengthStats:
    """Whitespace-separated words per text."""

    mean: float
    median: float
    p95: float
    max: int

    @classmethod
    def of(cls, texts: list[str]) -> LengthStats:
        words = np.array([len(text.split()) for text in texts] or [0])
        return cls(
            mean=round(float(words.mean()), 1),
            median=float(np.median(words)),
            p95=float(np.percentile(words, 95)),
            max=int(words.max()),
        )


@dataclass(frozen=True)
class SplitStats:
    judgments: int
    positive: int
    non_relevant: int
    # Queries with at least one positive: the ones training uses and evaluation scores.
    queries_with_positives: int
    grades: dict[str, int]

    @classmethod
    def of(cls, qrels: Qrels, positive_min: int) -> SplitStats:
        grades = Counter(score for judged in qrels.values() for score in judged.values())
        positive = sum(count for score, count in grades.items() if score >= positive_min)
        return cls(
            judgments=sum(grades.values()),
            positive=positive,
            non_relevant=sum(grades.values()) - positive,
            queries_with_positives=sum(1 for judged in qrels.values() if positives(judged, positive_min)),
            grades={str(score): grades[score] for score in sorted(grades)},
        )


@dataclass(frozen=True)
class DatasetReport:
    name: str
    fingerprint: str
    on_malformed: str
    positive_min: int
    rows: dict[str, int]
    documents: int
    title_only: int
    text_only: int
    queries: int
    splits: dict[str, SplitStats]
    # (source, reason) -> rows; `fatal` ones follow on_malformed, the rest are only reported.
    rejected: list[dict[str, Any]]
    first_fatal: str | None
    document_words: LengthStats
    query_words: LengthStats

    @property
    def ok(self) -> bool:
        return self.on_malformed == "quarantine" or self.first_fatal is None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def check_dataset(data: DataConfig) -> tuple[BeirDataset, DatasetReport]:
    """Read everything (every split) and report; the caller decides whether to enforce."""
    files = locate_dataset(data)
    dataset = read_dataset(files, sorted(files.qrels))
    return dataset, build_report(dataset, data)


def build_report(dataset: BeirDataset, data: DataConfig) -> DatasetReport:
    identity = dataset.files.identity()
    documents = list(dataset.corpus.values())
    rejected = Counter((r.source, r.reason, r.fatal) for r in dataset.rejections)
    first_fatal = dataset.first_fatal()
    return DatasetReport(
        name=identity["name"],
        fingerprint=identity["fingerprint"],
        on_malformed=data.on_malformed,
        positive_min=data.positive_min,
        rows=dict(dataset.rows),
        documents=len(documents),
        title_only=sum(1 for doc in documents if not doc.text),
        text_only=sum(1 for doc in documents if not doc.title),
        queries=len(dataset.queries),
        splits={split: SplitStats.of(qrels, data.positive_min) for split, qrels in sorted(dataset.qrels.items())},
        rejected=[
            {"source": source, "reason": reason, "fatal": fatal, "rows": count}
            for (source, reason, fatal), count in sorted(rejected.items())
        ],
        first_fatal=str(first_fatal.error()) if first_fatal else None,
        document_words=LengthStats.of([doc.full_text for doc in documents]),
        query_words=LengthStats.of(list(dataset.queries.values())),
    )


def print_report(report: DatasetReport, console: Console) -> None:
    console.print(
        f"[bold]dataset[/] {escape(report.name)}  fingerprint {report.fingerprint[:16]}  "
        f"(on_malformed={report.on_malformed}, positive_min={report.positive_min})"
    )
    console.print(
        f"  {report.documents} documents ({report.title_only} title-only, {report.text_only} text-only), "
        f"{report.queries} queries; splits: {', '.join(report.splits) or 'none'}"
    )
    console.print(_split_table(report))
    console.print(_length_table(report))
    if report.rejected:
        _print_rejected(report, console)
    else:
        console.print("  no rows rejected")


def _split_table(report: DatasetReport) -> Table:
    table = Table(title="qrels splits", title_justify="left")
    for column in ("split", "judgments", "positive", "non-relevant", "queries with positives", "grades"):
        table.add_column(column, justify="left" if column in ("split", "grades") else "right")
    for split, stats in report.splits.items():
        grades = " ".join(f"{score}:{count}" for score, count in stats.grades.items())
        table.add_row(split, str(stats.judgments), str(stats.positive), str(stats.non_relevant),
                      str(stats.queries_with_positives), grades)
    return table


def _length_table(report: DatasetReport) -> Table:
    table = Table(title="length in words", title_justify="left")
    for column in ("texts", "mean", "median", "p95", "max"):
        table.add_column(column, justify="left" if column == "texts" else "right")
    for name, stats in (("documents", report.document_words), ("queries", report.query_words)):
        table.add_row(name, f"{stats.mean:g}", f"{stats.median:g}", f"{stats.p95:g}", str(stats.max))
    return table


def _print_rejected(report: DatasetReport, console: Console) -> None:
    # One line per (file, reason), not a table: reasons stay whole and greppable at any width.
    console.print("rejected rows (malformed: fail or quarantine per data.on_malformed; others dropped and reported):")
    for row in report.rejected:
        kind = "malformed" if row["fatal"] else "dropped, reported"
        console.print(f"  {row['rows']:>7}  {escape(row['source'])}: {escape(row['reason'])} ({kind})")

"""BEIR files as Spark DataFrames of validated rows, each traceable to its file and line.

Every row keeps its source name, 1-based line number and raw text, plus a `reason` column that
is null for a row that passed validation. Rejected rows are never dropped silently: they are
quarantined as-is with their reason, so a bad upstream export can be found and fixed.
"""

from __future__ import annotations

import json
from functools import partial
from typing import Any

from pyspark import RDD
from pyspark.sql import DataFrame, Row, SparkSession, Window
from pyspark.sql import functions as F

from towerline.beir import Document

MALFORMED_JSON = "malformed JSON"
NOT_AN_OBJECT = "malformed JSON (not an object)"
JSON_ERRORS = (MALFORMED_JSON, NOT_AN_OBJECT)

DOC_SCHEMA = "source string, line long, raw string, doc_id string, doc_text string, reason string"
QUERY_SCHEMA = "source string, line long, raw string, query_id string, query_text string, reason string"
QREL_SCHEMA = "source string, line long, raw string, query_id string, doc_id string, score long, reason string"
QREL_HEADER = "query-id"

NumberedLine = tuple[int, str]


def numbered_lines(spark: SparkSession, path: str) -> RDD[NumberedLine]:
    """(1-based line number, line) for every non-blank line; Hadoop decompresses .gz itself."""
    return (
        spark.sparkContext.textFile(path)
        .zipWithIndex()
        .map(lambda pair: (pair[1] + 1, pair[0]))
        .filter(lambda numbered: numbered[1].strip() != "")
    )


def read_documents(spark: SparkSession, path: str, source: str) -> DataFrame:
    """Corpus rows: doc_id and doc_text (title + " " + text), first occurrence of an id wins."""
    rows = numbered_lines(spark, path).map(partial(_jsonl_row, source, True))
    return flag_duplicates(spark.createDataFrame(rows, DOC_SCHEMA), ["doc_id"], "duplicate doc id")


def read_queries(spark: SparkSession, path: str, source: str) -> DataFrame:
    """Query rows: query_id and query_text, first occurrence of an id wins."""
    rows = numbered_lines(spark, path).map(partial(_jsonl_row, source, False))
    return flag_duplicates(spark.createDataFrame(rows, QUERY_SCHEMA), ["query_id"], "duplicate query id")


def read_qrels(spark: SparkSession, path: str, source: str, documents: DataFrame, queries: DataFrame) -> DataFrame:
    """Judgment rows checked for shape, a positive score, known ids; duplicates after the first flagged."""
    rows = numbered_lines(spark, path).filter(lambda numbered: not _is_qrels_header(numbered))
    qrels = spark.createDataFrame(rows.map(partial(_qrel_row, source)), QREL_SCHEMA)
    qrels = flag_unknown(qrels, "query_id", valid_rows(queries).select("query_id"), "unknown query id")
    qrels = flag_unknown(qrels, "doc_id", valid_rows(documents).select("doc_id"), "unknown doc id")
    return flag_duplicates(qrels, ["query_id", "doc_id"], "duplicate judgment")


def valid_rows(rows: DataFrame) -> DataFrame:
    return rows.filter(F.col("reason").isNull()).drop("reason", "raw", "source")


def quarantined_rows(rows: DataFrame) -> DataFrame:
    """The quarantine.parquet columns: source, line, reason, raw."""
    return rows.filter(F.col("reason").isNotNull()).select(
        "source", F.col("line").cast("int").alias("line"), "reason", "raw"
    )


def first_json_error(rows: DataFrame) -> Row | None:
    """The earliest line that is not a JSON object, for fail-fast mode."""
    return rows.filter(F.col("reason").isin(*JSON_ERRORS)).orderBy("line").select("line", "reason").first()


def flag_duplicates(rows: DataFrame, keys: list[str], reason: str) -> DataFrame:
    """Flag valid rows after the first (by line) with the same key; an invalid row never counts as first."""
    is_valid = F.col("reason").isNull()
    occurrence = F.row_number().over(Window.partitionBy(*keys, is_valid).orderBy("line"))
    return rows.withColumn("reason", F.when(is_valid & (occurrence > 1), F.lit(reason)).otherwise(F.col("reason")))


def flag_unknown(rows: DataFrame, column: str, known_ids: DataFrame, reason: str) -> DataFrame:
    """Flag valid rows whose `column` value is not among `known_ids` (a one-column DataFrame)."""
    marker = f"_known_{column}"
    known = known_ids.toDF(column).distinct().withColumn(marker, F.lit(True))
    joined = rows.join(known, on=column, how="left")
    unknown = F.col("reason").isNull() & F.col(marker).isNull()
    flagged = joined.withColumn("reason", F.when(unknown, F.lit(reason)).otherwise(F.col("reason")))
    return flagged.select(*rows.columns)


def _jsonl_row(source: str, with_title: bool, numbered: NumberedLine) -> tuple[Any, ...]:
    """(source, line, raw, id, text, reason) for one JSONL line; docs get title + " " + text."""
    line, raw = numbered
    try:
        record = json.loads(raw)
    except ValueError:
        return (source, line, raw, None, None, MALFORMED_JSON)
    if not isinstance(record, dict):
        return (source, line, raw, None, None, NOT_AN_OBJECT)
    record_id, text = _string(record.get("_id")), _string(record.get("text"))
    if not record_id or not record_id.strip():
        return (source, line, raw, None, None, "missing or empty _id")
    if not text or not text.strip():
        return (source, line, raw, record_id, None, "missing or empty text")
    if with_title:
        text = Document(doc_id=record_id, title=_string(record.get("title")) or "", text=text).full_text
    return (source, line, raw, record_id, text, None)


def _string(value: object) -> str | None:
    # BEIR exports sometimes write numeric ids; they are ids all the same.
    if isinstance(value, str):
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return None


def _is_qrels_header(numbered: NumberedLine) -> bool:
    line, raw = numbered
    return line == 1 and raw.split("\t", 1)[0].strip() == QREL_HEADER


def _qrel_row(source: str, numbered: NumberedLine) -> tuple[Any, ...]:
    """(source, line, raw, query_id, doc_id, score, reason) for one TSV line; CRLF tolerated."""
    line, raw = numbered
    cells = [cell.strip() for cell in raw.rstrip("\r\n").split("\t")]
    if len(cells) != 3:
        return (source, line, raw, None, None, None, f"expected 3 tab-separated columns, got {len(cells)}")
    query_id, doc_id, score_text = cells
    try:
        score = int(score_text)
    except ValueError:
        return (source, line, raw, query_id, doc_id, None, f"score {score_text!r} is not an integer")
    # Only positives become pairs; a 0 ("judged not relevant") is reported rather than guessed at.
    reason = None if score > 0 else f"score {score} is not a positive judgment"
    return (source, line, raw, query_id, doc_id, score, reason)

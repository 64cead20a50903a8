"""BEIR files as Spark DataFrames of validated rows, each traceable to its file and line.

Every row keeps its source name, 1-based line number and raw text, plus a `reason` column that
is null for a row that passed validation. Lines are parsed by the same functions as the local
reader (`towerline/beir.py`), so a row means the same thing in Spark and in every other stage.
Rejected rows are never dropped silently: they are quarantined as-is with their reason.
"""

from __future__ import annotations

from functools import partial
from typing import Any

from pyspark import RDD
from pyspark.sql import DataFrame, SparkSession, Window
from pyspark.sql import functions as F

from towerline.beir import (
    DUPLICATE_DOC,
    DUPLICATE_JUDGMENT,
    DUPLICATE_QUERY,
    UNKNOWN_DOC,
    UNKNOWN_QUERY,
    RowRejected,
    is_qrels_header,
    parse_document,
    parse_judgment,
    parse_query,
)

DOC_SCHEMA = (
    "source string, line long, raw string, doc_id string, doc_text string, doc_title string, doc_body string, "
    "reason string"
)
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
    """Corpus rows: doc_id and doc_text (title and text), first valid occurrence of an id wins."""
    rows = numbered_lines(spark, path).map(partial(_document_row, source))
    return flag_duplicates(spark.createDataFrame(rows, DOC_SCHEMA), ["doc_id"], DUPLICATE_DOC)


def read_queries(spark: SparkSession, path: str, source: str) -> DataFrame:
    """Query rows: query_id and query_text, first valid occurrence of an id wins."""
    rows = numbered_lines(spark, path).map(partial(_query_row, source))
    return flag_duplicates(spark.createDataFrame(rows, QUERY_SCHEMA), ["query_id"], DUPLICATE_QUERY)


def read_qrels(spark: SparkSession, path: str, source: str, documents: DataFrame, queries: DataFrame) -> DataFrame:
    """Judgment rows checked for shape and known ids (query first, then doc); repeats after the first flagged."""
    rows = numbered_lines(spark, path).filter(lambda numbered: not is_qrels_header(*numbered))
    qrels = spark.createDataFrame(rows.map(partial(_qrel_row, source)), QREL_SCHEMA)
    qrels = flag_unknown(qrels, "query_id", valid_rows(queries).select("query_id"), UNKNOWN_QUERY)
    qrels = flag_unknown(qrels, "doc_id", valid_rows(documents).select("doc_id"), UNKNOWN_DOC)
    return flag_duplicates(qrels, ["query_id", "doc_id"], DUPLICATE_JUDGMENT)


def valid_rows(rows: DataFrame) -> DataFrame:
    return rows.filter(F.col("reason").isNull()).drop("reason", "raw", "source")


def quarantined_rows(rows: DataFrame) -> DataFrame:
    """The quarantine.parquet columns: source, line, reason, raw."""
    return rows.filter(F.col("reason").isNotNull()).select(
        "source", F.col("line").cast("int").alias("line"), "reason", "raw"
    )


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


def _document_row(source: str, numbered: NumberedLine) -> tuple[Any, ...]:
    """(source, line, raw, doc_id, doc_text, doc_title, doc_body, reason): the shared parser decides,
    as in every stage; doc_text is what the towers read (title and text)."""
    line, raw = numbered
    try:
        document = parse_document(raw)
    except RowRejected as rejected:
        return (source, line, raw, None, None, None, None, rejected.reason)
    return (source, line, raw, document.doc_id, document.full_text, document.title, document.text, None)


def _query_row(source: str, numbered: NumberedLine) -> tuple[Any, ...]:
    line, raw = numbered
    try:
        query_id, text = parse_query(raw)
    except RowRejected as rejected:
        return (source, line, raw, None, None, rejected.reason)
    return (source, line, raw, query_id, text, None)


def _qrel_row(source: str, numbered: NumberedLine) -> tuple[Any, ...]:
    """(source, line, raw, query_id, doc_id, score, reason); graded scores kept, 0 included."""
    line, raw = numbered
    try:
        query_id, doc_id, score = parse_judgment(raw)
    except RowRejected as rejected:
        return (source, line, raw, None, None, None, rejected.reason)
    return (source, line, raw, query_id, doc_id, score, None)

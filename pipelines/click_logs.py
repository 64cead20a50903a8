"""Impression/click logs as a Spark DataFrame of validated rows, each traceable to its file and line.

One impression per row, as JSON lines (`.jsonl`, `.json`, optionally `.gz`) or Parquet, a file or a
directory of files:

    request_id  string   one result page served for one query
    ts          integer epoch milliseconds, or ISO-8601 text
    query       string   the query as typed
    doc_id      string   a corpus document shown on the page
    position    integer  its 1-based rank on the page
    clicked     boolean  (true / false, or 1 / 0)
    dwell_ms    integer  time on the document after a click (may be absent when not clicked)

Everything runs as Spark SQL expressions in the JVM: at tens of millions of rows a Python pass over
every row would cost more than the whole job. Every field is read as text and checked by the job
itself, so a wrong type gets a reason naming the field instead of silently becoming null. Rows that
fail are kept, with `reason`, for the quarantine; the first reason found wins.
"""

from __future__ import annotations

import time
from pathlib import Path

from pyspark.sql import Column, DataFrame, SparkSession, Window
from pyspark.sql import functions as F
from pyspark.sql.types import StringType, StructField, StructType

from pipelines.hadoop_fs import HadoopFs
from towerline.artifacts import target_uri
from towerline.beir import UNKNOWN_DOC
from towerline.config import ClicksConfig
from towerline.errors import DataError

LOG_FIELDS = ("request_id", "ts", "query", "doc_id", "position", "clicked", "dwell_ms")
REQUIRED_FIELDS = LOG_FIELDS[:-1]
JSON_SUFFIXES = (".jsonl", ".json", ".jsonl.gz", ".json.gz")
CORRUPT = "_corrupt_record"

MALFORMED = "malformed JSON"
EMPTY_QUERY = "empty query"
QUERY_TOO_LONG = "query too long"
DUPLICATE_IMPRESSION = "duplicate impression"
BAD_TIMESTAMP = "bad ts"
# Earliest accepted timestamp (2000-01-01 UTC); the latest is one day past the job's start.
EARLIEST_TS_MS = 946_684_800_000
DAY_MS = 86_400_000

# The validated columns every later step reads.
CLICK_COLUMNS = ("source", "line", "request_id", "ts_ms", "query_text", "query_id", "doc_id", "position",
                 "clicked", "dwell_ms", "reason")


def missing(field: str) -> str:
    return f"missing {field}"


def bad(field: str) -> str:
    return f"bad {field}"


def log_format(spark: SparkSession, logs: str | Path) -> str:
    """"parquet" or "json", from the file names that `logs` matches: a file, a directory's files or a
    glob, on any file system Spark reads (a local path, hdfs://, s3a:// ...)."""
    files = HadoopFs(spark, logs).matching_files()
    if not files:
        raise DataError(f"{logs}: no such click-log file or directory")
    names = [path.getName() for path in files if not path.getName().startswith((".", "_"))]
    if not names:
        raise DataError(f"{logs}: no click-log files")
    if all(name.endswith(".parquet") for name in names):
        return "parquet"
    if all(name.endswith(JSON_SUFFIXES) for name in names):
        return "json"
    raise DataError(f"{logs}: click logs must be all JSON lines ({', '.join(JSON_SUFFIXES)}) or all .parquet; "
                    f"found {', '.join(sorted(set(names))[:5])}")


def read_click_logs(spark: SparkSession, logs: str | Path, doc_ids: DataFrame, settings: ClicksConfig,
                    now_ms: int | None = None) -> DataFrame:
    """CLICK_COLUMNS plus `raw` for every row of the logs. `raw` is the row as read (the line, or the
    Parquet row as JSON) on quarantined rows and null on valid ones: at tens of millions of rows a
    copy of every row would double what the job keeps on disk between its passes."""
    uri = target_uri(logs)
    fields = _read_fields(spark, uri) if log_format(spark, uri) == "parquet" else _parse_json_lines(spark, uri)
    checked = _validate(fields, settings, EARLIEST_TS_MS, (now_ms or int(time.time() * 1000)) + DAY_MS)
    checked = _flag(checked, _unknown(checked, doc_ids), UNKNOWN_DOC)
    # A page shows a document once and one document per position; repeats after the first (by line)
    # are quarantined, so a replayed log line cannot double a click.
    valid = F.col("reason").isNull()
    first_doc = F.row_number().over(Window.partitionBy("request_id", "doc_id", valid).orderBy("source", "line"))
    first_slot = F.row_number().over(Window.partitionBy("request_id", "position", valid).orderBy("source", "line"))
    checked = checked.withColumn("reason", F.when(valid & ((first_doc > 1) | (first_slot > 1)),
                                                  F.lit(DUPLICATE_IMPRESSION)).otherwise(F.col("reason")))
    # Rows flagged after typing (unknown doc, duplicate) were well-formed: their typed fields say it all.
    typed = F.to_json(F.struct(*[F.col(name) for name in CLICK_COLUMNS[2:-1]]))
    raw = F.when(F.col("reason").isNotNull(), F.coalesce(F.col("raw"), typed))
    return checked.select(*CLICK_COLUMNS, raw.alias("raw"))


def normalise_query(text: Column) -> Column:
    """Lower-cased, whitespace runs collapsed, trimmed: one id for the ways a query gets typed."""
    return F.trim(F.regexp_replace(F.lower(text), r"\s+", " "))


def query_id(normalised: Column) -> Column:
    """16 hex digits of the normalised text's SHA-256: stable across runs, jobs and partitionings."""
    return F.substring(F.sha2(normalised, 256), 1, 16)


def _parse_json_lines(spark: SparkSession, uri: str) -> DataFrame:
    # Recursive, as log_format lists: a directory of dated sub-directories is one log.
    text = spark.read.option("recursiveFileLookup", "true").text(uri)
    lines = with_line_numbers(text.withColumnRenamed("value", "raw"))
    lines = lines.filter(F.trim("raw") != "")
    schema = StructType([StructField(name, StringType()) for name in (*LOG_FIELDS, CORRUPT)])
    # Every field as text: a number or a boolean reads as its JSON text and is checked below. A line
    # that does not parse comes back with every field null and itself in the CORRUPT field.
    parsed = lines.withColumn("_fields", F.from_json("raw", schema, {"mode": "PERMISSIVE",
                                                                     "columnNameOfCorruptRecord": CORRUPT}))
    is_object = (F.trim("raw").startswith("{") & F.col("_fields").isNotNull()
                 & F.col("_fields")[CORRUPT].isNull())
    return parsed.select("source", "line", "raw", F.when(~is_object, F.lit(MALFORMED)).alias("reason"),
                         *[F.col("_fields")[name].alias(name) for name in LOG_FIELDS])


def _read_fields(spark: SparkSession, uri: str) -> DataFrame:
    table = spark.read.option("recursiveFileLookup", "true").parquet(uri)
    absent = [name for name in REQUIRED_FIELDS if name not in table.columns]
    if absent:
        raise DataError(f"{uri}: click-log columns missing: {', '.join(absent)} (schema: {', '.join(LOG_FIELDS)})")
    if "dwell_ms" not in table.columns:
        table = table.withColumn("dwell_ms", F.lit(None).cast("long"))
    numbered = with_line_numbers(table)
    return numbered.select(
        "source", "line", F.lit(None).cast("string").alias("raw"), F.lit(None).cast("string").alias("reason"),
        *[F.col(name).cast("string").alias(name) for name in LOG_FIELDS])


def with_line_numbers(rows: DataFrame) -> DataFrame:
    """Add `source` (the file's name) and `line` (1-based, in file order) without a Python pass.

    A file is read in splits, in order, one split per partition, and monotonically_increasing_id
    numbers a partition's rows in order; so each (file, partition) chunk is counted (a tiny
    aggregate) and a row's line is its id within the chunk plus the rows of the file's earlier
    chunks. The reads are deterministic, so both passes see the same chunks. Chunks are keyed by
    the file's full URI: dated sub-directories often hold files of the same name."""
    tagged = rows.select("*", F.input_file_name().alias("_file"), F.spark_partition_id().alias("_part"),
                         F.monotonically_increasing_id().alias("_id"))
    chunks = tagged.groupBy("_file", "_part").agg(F.min("_id").alias("_first"), F.count("*").alias("_rows"))
    earlier = Window.partitionBy("_file").orderBy("_part").rowsBetween(Window.unboundedPreceding, -1)
    offsets = chunks.select("_file", "_part", "_first",
                            F.coalesce(F.sum("_rows").over(earlier), F.lit(0)).alias("_before"))
    numbered = tagged.join(F.broadcast(offsets), on=["_file", "_part"]).withColumn(
        "source", F.element_at(F.split("_file", "/"), -1))
    line = (F.col("_id") - F.col("_first") + F.col("_before") + 1).alias("line")
    return numbered.select(*rows.columns, "source", line)


def _validate(rows: DataFrame, settings: ClicksConfig, earliest_ms: int, latest_ms: int) -> DataFrame:
    """Typed columns and the first failed check's reason (rows already flagged keep theirs)."""
    text = {name: F.trim(F.col(name)) for name in LOG_FIELDS}
    is_integer = {name: text[name].rlike(r"^-?[0-9]{1,18}$") for name in ("ts", "position", "dwell_ms")}
    ts_ms = F.when(is_integer["ts"], text["ts"].cast("long")).otherwise(
        F.unix_millis(F.try_to_timestamp(text["ts"])))
    clicked_text = F.lower(text["clicked"])
    clicked = (F.when(clicked_text.isin("true", "1"), F.lit(True))
               .when(clicked_text.isin("false", "0"), F.lit(False)))
    normalised = normalise_query(F.col("query"))
    dwell = F.when(is_integer["dwell_ms"], text["dwell_ms"].cast("long"))
    typed = rows.select(
        "source", "line", "raw", "reason", text["request_id"].alias("request_id"), ts_ms.alias("ts_ms"),
        normalised.alias("query_text"), query_id(normalised).alias("query_id"), text["doc_id"].alias("doc_id"),
        F.when(is_integer["position"], text["position"].cast("long")).alias("position"), clicked.alias("clicked"),
        F.coalesce(dwell, F.when(text["dwell_ms"].isNull() | (text["dwell_ms"] == ""), F.lit(0))).alias("dwell_ms"),
        *[text[name].alias(f"_{name}") for name in LOG_FIELDS])
    checks: list[tuple[Column, str]] = [
        # A blank query is there but empty (below); any other blank field is as good as missing.
        *[(F.col(f"_{name}").isNull() | ((F.col(f"_{name}") == "") & F.lit(name != "query")), missing(name))
          for name in REQUIRED_FIELDS],
        (F.col("ts_ms").isNull() | (F.col("ts_ms") < earliest_ms) | (F.col("ts_ms") > latest_ms), BAD_TIMESTAMP),
        (F.col("query_text") == "", EMPTY_QUERY),
        (F.length("query_text") > settings.max_query_chars, QUERY_TOO_LONG),
        (F.col("position").isNull() | (F.col("position") < 1), bad("position")),
        (F.col("clicked").isNull(), bad("clicked")),
        (F.col("dwell_ms").isNull() | (F.col("dwell_ms") < 0), bad("dwell_ms")),
    ]
    # A row flagged already (malformed) keeps its reason; otherwise the first failed check's.
    first = F.coalesce(F.col("reason"), _first_failed(checks))
    # A bad row keeps what was read (a Parquet row: its fields as text); a good one keeps nothing.
    as_read = F.coalesce(F.col("raw"), F.to_json(F.struct(*[F.col(f"_{name}").alias(name) for name in LOG_FIELDS])))
    return (typed.withColumn("reason", first)
            .withColumn("raw", F.when(F.col("reason").isNotNull(), as_read))
            .drop(*[f"_{name}" for name in LOG_FIELDS]))


def _first_failed(checks: list[tuple[Column, str]]) -> Column:
    expression = F.lit(None).cast("string")
    for failed, why in reversed(checks):  # built inside out, so the first check listed wins
        expression = F.when(failed, F.lit(why)).otherwise(expression)
    return expression


def _unknown(rows: DataFrame, doc_ids: DataFrame) -> DataFrame:
    known = doc_ids.select("doc_id").distinct().withColumn("_known", F.lit(True))
    # The corpus ids are a small table beside the logs: broadcast, so the logs are never shuffled for it.
    return rows.join(F.broadcast(known), on="doc_id", how="left")


def _flag(rows: DataFrame, joined: DataFrame, reason: str) -> DataFrame:
    flagged = F.when(F.col("reason").isNull() & F.col("_known").isNull(), F.lit(reason)).otherwise(F.col("reason"))
    return joined.withColumn("reason", flagged).select(*rows.columns)

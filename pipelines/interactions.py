"""Spark job: user–item interactions → the recommendation side's training data (`towerline rec data`).

Reads a MovieLens release or the generic schema (`pipelines/interaction_formats.py`), validates every
line with the same per-line parsers in the workers, quarantines or fails on bad rows as the pairs job
does, and writes an "interactions" artifact:

    items.parquet       item_index (1..N; 0 is padding), item_id, title, genres
    users.parquet       user_index (1..U; 0 is an unknown user), user_id, gender, age, occupation
    samples.parquet     one CTR sample per interaction: user_index, item_index, label (rating above
                        rec.data.label_threshold), rating, timestamp, split, long_history (item indexes
                        of the user's interactions strictly before the sample's timestamp, oldest first,
                        the latest rec.data.long_history of them), long_history_labels (the user's
                        label of each of those items, known by then), short_history (the latest
                        rec.data.short_history) and short_history_titles
    sequences.parquet   user_index, item_indexes, timestamps, ratings: each user's chronological sequence
    quarantine.parquet  source, line, reason, raw
    stats.json          counts, label rates, split cut-offs

The split is global in time (train: the earliest interactions, then valid, then test), so no model
trains on anything later than what it is evaluated on; histories only ever look backwards.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable
from functools import partial, reduce
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from pyspark import Broadcast
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql.types import LongType, StructField, StructType

from pipelines.interaction_formats import HEADER, InteractionFormat, detect_format
from pipelines.parquet_output import write_parquet
from pipelines.records import flag_duplicates, flag_unknown, numbered_lines, quarantined_rows, valid_rows
from pipelines.spark import spark_session
from pipelines.target import SparkArtifactWriter
from towerline.artifacts import Manifest, fingerprint_of, sha256_file
from towerline.beir import DATA_DIR_ENV, RowRejected
from towerline.config import RecDataConfig, TowerlineConfig
from towerline.errors import DataError
from towerline.progress import status

KIND = "interactions"
ITEMS_FILE, USERS_FILE = "items.parquet", "users.parquet"
SAMPLES_FILE, SEQUENCES_FILE = "samples.parquet", "sequences.parquet"
QUARANTINE_FILE, STATS_FILE = "quarantine.parquet", "stats.json"
SPLITS = ("train", "valid", "test")

DUPLICATE_ITEM, DUPLICATE_USER = "duplicate item id", "duplicate user id"
UNKNOWN_ITEM, UNKNOWN_USER = "unknown item", "unknown user"
# Dropped and counted, never fatal: a rating of an item missing from the catalogue is not a broken file.
REPORTED_ONLY = (UNKNOWN_ITEM, UNKNOWN_USER)

_ROW = "source string, line long, raw string, "
INTERACTION_SCHEMA = _ROW + "user_id string, item_id string, rating double, timestamp long, reason string"
ITEM_SCHEMA = _ROW + "item_id string, title string, genres array<string>, reason string"
USER_SCHEMA = _ROW + "user_id string, gender string, age string, occupation string, reason string"
SAMPLE_SCHEMA = (
    "user_index long, item_index long, label byte, rating double, timestamp long, split string, "
    "long_history array<long>, long_history_labels array<byte>, short_history array<long>, "
    "short_history_titles array<string>"
)
SAMPLE_COLUMNS = tuple(column.split()[0] for column in SAMPLE_SCHEMA.split(", "))


@dataclasses.dataclass(frozen=True)
class InteractionFiles:
    name: str
    root: Path
    format: InteractionFormat

    def path(self, name: str | None) -> Path | None:
        return self.root / name if name and (self.root / name).is_file() else None

    def identity(self) -> dict[str, str]:
        """Name, format and a fingerprint of the files' content."""
        digests = {name: sha256_file(path) for name in (self.format.interactions, self.format.items, self.format.users)
                   if name and (path := self.path(name)) is not None}
        return {"name": self.name, "format": self.format.name, "fingerprint": fingerprint_of(digests)}


def locate_interactions(settings: RecDataConfig, run_dir: Path) -> InteractionFiles:
    """The dataset directory for rec.data.dataset: generated, a path, or a name under the data dir."""
    if settings.dataset == "synthetic":
        from towerline.synthetic_rec import SyntheticRecSpec, write_synthetic_interactions

        spec = SyntheticRecSpec(users=settings.synthetic_users, items=settings.synthetic_items,
                                seed=settings.synthetic_seed)
        root = run_dir / "data" / f"synthetic-interactions-{spec.users}u-{spec.items}i-seed{spec.seed}"
        if not (root / "interactions.csv").is_file():
            write_synthetic_interactions(root, spec)
        return InteractionFiles("synthetic", root, detect_format(root, "generic"))
    candidates = [Path(settings.dataset)]
    if os.environ.get(DATA_DIR_ENV):
        candidates.append(Path(os.environ[DATA_DIR_ENV]) / settings.dataset)
    for root in candidates:
        if root.is_dir():
            return InteractionFiles(root.name, root, _with_clicks(root, detect_format(root, settings.format)))
    raise DataError(f"rec.data.dataset={settings.dataset!r}: not a directory, nor under ${DATA_DIR_ENV}")


def _with_clicks(root: Path, chosen: InteractionFormat) -> InteractionFormat:
    """The generic schema's value column is `rating` or `click`; its header line says which."""
    if chosen.name != "generic":
        return chosen
    with (root / chosen.interactions).open(encoding=chosen.encoding) as handle:
        header = handle.readline().strip().split(",")
    return dataclasses.replace(chosen, clicks=len(header) > 2 and header[2] == "click")


def run_interactions(config: TowerlineConfig, output: str | Path) -> Manifest:
    settings = config.rec.data
    files = locate_interactions(settings, config.run_dir)
    with status(f"rec data: {files.name} ({files.format.name}) with Spark"):
        spark = spark_session(config.spark, "towerline-interactions")
        tables = read_tables(spark, files)
        try:
            _enforce(tables, settings, files)
            return publish(spark, tables, files, settings, config, output)
        finally:
            for rows in tables.values():
                rows.unpersist()


def read_tables(spark: SparkSession, files: InteractionFiles) -> dict[str, DataFrame]:
    """Every line parsed, flagged with a reason when it is not a usable row; headers dropped."""
    chosen = files.format
    items_path = files.path(chosen.items)
    users_path = files.path(chosen.users)
    interactions_path = files.path(chosen.interactions)
    assert items_path is not None and interactions_path is not None  # detect_format checked both
    items = _parsed(spark, spark.sparkContext.parallelize(_local_lines(items_path, chosen.encoding)),
                    chosen.parse_item, 3, items_path.name, ITEM_SCHEMA)
    items = flag_duplicates(items, ["item_id"], DUPLICATE_ITEM).cache()
    interactions = _parsed(spark, numbered_lines(spark, str(interactions_path)), chosen.parse_interaction, 4,
                           interactions_path.name, INTERACTION_SCHEMA)
    interactions = flag_unknown(interactions, "item_id", valid_rows(items).select("item_id"), UNKNOWN_ITEM)
    tables = {"items": items}
    if users_path is not None and chosen.parse_user is not None:
        users = _parsed(spark, spark.sparkContext.parallelize(_local_lines(users_path, chosen.encoding)),
                        chosen.parse_user, 4, users_path.name, USER_SCHEMA)
        users = flag_duplicates(users, ["user_id"], DUPLICATE_USER).cache()
        interactions = flag_unknown(interactions, "user_id", valid_rows(users).select("user_id"), UNKNOWN_USER)
        tables["users"] = users
    tables["interactions"] = interactions.cache()
    return tables


def _local_lines(path: Path, encoding: str) -> list[tuple[int, str]]:
    """Catalogue files are small and some releases are latin-1: read them here, decoded properly."""
    with path.open(encoding=encoding, newline="") as handle:
        return [(number, line) for number, line in enumerate(handle, start=1) if line.strip()]


def _parsed(spark: SparkSession, lines: Any, parse: Any, width: int, source: str, schema: str) -> DataFrame:
    rows = spark.createDataFrame(lines.map(partial(_parsed_row, parse, width, source)), schema)
    return rows.filter(F.col("reason").isNull() | (F.col("reason") != HEADER))


def _parsed_row(parse: Any, width: int, source: str, numbered: tuple[int, str]) -> tuple[Any, ...]:
    line, raw = numbered
    raw = raw.rstrip("\r\n")
    try:
        values = parse(raw)
    except RowRejected as rejected:
        return (source, line, raw, *([None] * width), rejected.reason)
    return (source, line, raw, *values, None)


def _enforce(tables: dict[str, DataFrame], settings: RecDataConfig, files: InteractionFiles) -> None:
    """on_malformed=fail: stop at the first malformed line (file:line: reason) before anything is written."""
    if settings.on_malformed != "fail":
        return
    for rows in tables.values():
        bad = rows.filter(F.col("reason").isNotNull() & ~F.col("reason").isin(*REPORTED_ONLY))
        first = bad.orderBy("line").select("source", "line", "reason").first()
        if first is not None:
            raise DataError(f"{files.root / first['source']}:{first['line']}: {first['reason']} "
                            "(rec.data.on_malformed=quarantine drops such rows and goes on)")


def publish(spark: SparkSession, tables: dict[str, DataFrame], files: InteractionFiles, settings: RecDataConfig,
            config: TowerlineConfig, output: str | Path) -> Manifest:
    items = _numbered(valid_rows(tables["items"]), "item_id", "item_index")
    interactions = valid_rows(tables["interactions"])
    users = _indexed_users(tables.get("users"), interactions)
    threshold = 0.0 if files.format.clicks else settings.label_threshold
    events = (interactions.join(users.select("user_id", "user_index"), on="user_id")
              .join(items.select("item_id", "item_index"), on="item_id")
              .withColumn("label", (F.col("rating") > threshold).cast("byte")))
    cutoffs = _time_cutoffs(events, settings)
    events = events.withColumn("split", F.when(F.col("timestamp") < cutoffs[0], "train")
                               .when(F.col("timestamp") < cutoffs[1], "valid").otherwise("test"))
    titles = spark.sparkContext.broadcast(
        {row["item_index"]: row["title"] for row in items.select("item_index", "title").collect()})
    try:
        samples = events.select("user_index", "item_index", "label", "rating", "timestamp", "split").groupBy(
            "user_index").applyInPandas(_samples_of_one_user(settings.long_history, settings.short_history,
                                                             titles), SAMPLE_SCHEMA)
        with SparkArtifactWriter(spark, output, KIND, producer="rec data", config=config) as staged:
            write_parquet(items, staged.uri(ITEMS_FILE), ("item_index", "item_id", "title", "genres"),
                          ["item_index"])
            write_parquet(users, staged.uri(USERS_FILE),
                          ("user_index", "user_id", "gender", "age", "occupation"), ["user_index"])
            write_parquet(samples, staged.uri(SAMPLES_FILE), SAMPLE_COLUMNS,
                          ["timestamp", "user_index", "item_index"])
            write_parquet(_sequences(events), staged.uri(SEQUENCES_FILE),
                          ("user_index", "item_indexes", "timestamps", "ratings"), ["user_index"])
            quarantine = _quarantine(tables)
            write_parquet(quarantine, staged.uri(QUARANTINE_FILE), ("source", "line", "reason", "raw"),
                          ["source", "line"])
            stats = _stats(spark, staged, files, settings, cutoffs)
            staged.write_text(STATS_FILE, json.dumps(stats, indent=2) + "\n")
            staged.metadata.update(stats)
    finally:
        titles.destroy()
    assert staged.manifest is not None
    return staged.manifest


def _indexed_users(users: DataFrame | None, interactions: DataFrame) -> DataFrame:
    """Every user of the users file (or, without one, of the interactions), numbered from 1 by id."""
    if users is None:
        known = interactions.select("user_id").distinct().select(
            "user_id", *(F.lit(None).cast("string").alias(c) for c in ("gender", "age", "occupation")))
    else:
        known = valid_rows(users).select("user_id", "gender", "age", "occupation")
    return _numbered(known, "user_id", "user_index")


def _numbered(frame: DataFrame, key: str, column: str) -> DataFrame:
    """`frame` with `column` = 1, 2, … in `key` order. A sort and RDD.zipWithIndex, which run in
    parallel; a row_number over a window without partitions would pull the table into one task."""
    ordered = frame.orderBy(key)
    numbered = ordered.rdd.zipWithIndex().map(lambda pair: (*pair[0], pair[1] + 1))
    return numbered.toDF(StructType([*ordered.schema.fields, StructField(column, LongType(), nullable=False)]))


def _time_cutoffs(events: DataFrame, settings: RecDataConfig) -> tuple[int, int]:
    """Timestamps where valid and test begin (exact quantiles): every train interaction is earlier
    than every valid one, every valid one earlier than every test one."""
    fractions = [1 - settings.valid_fraction - settings.test_fraction, 1 - settings.test_fraction]
    found = events.approxQuantile("timestamp", fractions, 0.0)
    if len(found) != 2:
        raise DataError("no valid interactions to split")
    return int(found[0]), int(found[1])


def _samples_of_one_user(long_length: int, short_length: int, titles: Broadcast[dict[int, str]]
                         ) -> Callable[[pd.DataFrame], pd.DataFrame]:
    # A plain function (not a functools.partial): Spark reads its type hints to pick the UDF kind.
    def samples(frame: pd.DataFrame) -> pd.DataFrame:
        return _user_samples(long_length, short_length, titles, frame)

    return samples


def _user_samples(long_length: int, short_length: int, titles: Broadcast[dict[int, str]],
                  frame: pd.DataFrame) -> pd.DataFrame:
    """One user's samples, each with the items the user interacted with strictly before it."""
    frame = frame.sort_values(["timestamp", "item_index"], kind="stable").reset_index(drop=True)
    timestamps = frame["timestamp"].to_numpy()
    items = frame["item_index"].to_numpy()
    labels = frame["label"].to_numpy()
    # Interactions with the same timestamp are not "before" each other: ties never leak.
    before = np.searchsorted(timestamps, timestamps, side="left")
    long = [items[max(0, count - long_length):count].tolist() for count in before]
    short = [history[-short_length:] for history in long]
    lookup = titles.value
    frame["long_history"] = long
    # Whether the user liked each history item: feedback the user gave before this sample.
    frame["long_history_labels"] = [labels[max(0, count - long_length):count].tolist() for count in before]
    frame["short_history"] = short
    frame["short_history_titles"] = [[lookup.get(item, "") for item in history] for history in short]
    return frame[list(SAMPLE_COLUMNS)]


def _sequences(events: DataFrame) -> DataFrame:
    ordered = events.groupBy("user_index").agg(
        F.sort_array(F.collect_list(F.struct("timestamp", "item_index", "rating"))).alias("events"))
    return ordered.select(
        "user_index",
        F.transform("events", lambda event: event["item_index"]).alias("item_indexes"),
        F.transform("events", lambda event: event["timestamp"]).alias("timestamps"),
        F.transform("events", lambda event: event["rating"]).alias("ratings"),
    )


def _quarantine(tables: dict[str, DataFrame]) -> DataFrame:
    return reduce(DataFrame.unionByName, [quarantined_rows(rows) for rows in tables.values()])


def _stats(spark: SparkSession, staged: SparkArtifactWriter, files: InteractionFiles, settings: RecDataConfig,
           cutoffs: tuple[int, int]) -> dict[str, Any]:
    """Read back from the written files, so they describe exactly what was published."""
    samples = spark.read.parquet(staged.uri(SAMPLES_FILE))
    by_split = {row["split"]: row for row in samples.groupBy("split").agg(
        F.count("*").alias("samples"), F.avg("label").alias("positive_rate"),
        F.countDistinct("user_index").alias("users")).collect()}
    per_split = {split: {"samples": by_split[split]["samples"] if split in by_split else 0,
                         "positive_rate": round(float(by_split[split]["positive_rate"]), 4)
                         if split in by_split else None,
                         "users": by_split[split]["users"] if split in by_split else 0}
                 for split in SPLITS}
    reasons = spark.read.parquet(staged.uri(QUARANTINE_FILE)).groupBy("reason").count()
    return {
        "dataset": files.identity(),
        "users": spark.read.parquet(staged.uri(USERS_FILE)).count(),
        "items": spark.read.parquet(staged.uri(ITEMS_FILE)).count(),
        "samples": sum(split["samples"] for split in per_split.values()),
        "splits": per_split,
        "split_cutoffs": {"valid_from": cutoffs[0], "test_from": cutoffs[1]},
        "label": "click" if files.format.clicks else f"rating > {settings.label_threshold:g}",
        "long_history": settings.long_history,
        "short_history": settings.short_history,
        "quarantined": {row["reason"]: row["count"] for row in reasons.orderBy(F.desc("count"), "reason").collect()},
    }

"""`towerline pairs`: a BEIR dataset → training pairs with BM25 hard negatives, as a Spark job.

Reads the corpus, the queries and one qrels split; validates and dedupes every row (rejects go
to quarantine with a reason, except malformed JSON under `pairs.on_malformed=fail`, which stops
the run before anything is written); mines hard negatives; and writes a `training-pairs`
artifact:

    pairs.parquet/       one row per (query, positive): query_id, query_text, positive_id,
                         positive_text, negative_ids, negative_texts
    quarantine.parquet/  source, line, reason, raw
    stats.json           row counts per input, per quarantine reason, and the BM25 settings
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import reduce
from pathlib import Path
from typing import Any

from pyspark import Broadcast
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from pipelines.negatives import Bm25Index, attach_texts, build_index, negatives_in_spark
from pipelines.records import (
    first_json_error,
    quarantined_rows,
    read_documents,
    read_qrels,
    read_queries,
    valid_rows,
)
from pipelines.spark import spark_session
from towerline.artifacts import ArtifactWriter, Manifest
from towerline.beir import dataset_file, resolve_dataset_dir
from towerline.config import PairsConfig, TowerlineConfig
from towerline.errors import DataError
from towerline.progress import status

KIND = "training-pairs"
PAIRS_FILE = "pairs.parquet"
QUARANTINE_FILE = "quarantine.parquet"
STATS_FILE = "stats.json"
PAIR_COLUMNS = ("query_id", "query_text", "positive_id", "positive_text", "negative_ids", "negative_texts")
QUARANTINE_COLUMNS = ("source", "line", "reason", "raw")
# stats.json keys copied into the manifest, so `index info`-style readers need not open stats.json.
METADATA_KEYS = ("pairs", "queries", "negatives", "quarantined", "dataset_dir", "split", "bm25")


@dataclass(frozen=True)
class InputFiles:
    """The three BEIR files of one split; `source` names a file relative to the dataset dir."""

    root: Path
    corpus: Path
    queries: Path
    qrels: Path

    def source(self, path: Path) -> str:
        return path.relative_to(self.root).as_posix()


@dataclass(frozen=True)
class Inputs:
    """Every input row with its `reason` (null when valid); cached, since each is read several times."""

    documents: DataFrame
    queries: DataFrame
    qrels: DataFrame

    def tables(self) -> dict[str, DataFrame]:
        return {"corpus": self.documents, "queries": self.queries, "qrels": self.qrels}

    def unpersist(self) -> None:
        for rows in self.tables().values():
            rows.unpersist()


def run_pairs(config: TowerlineConfig, output: Path) -> Manifest:
    """Build the training-pairs artifact at `output`; DataError on unusable input, nothing written then."""
    files = input_files(resolve_dataset_dir(config.data), config.pairs.split)
    with status(f"pairs: mining BM25 hard negatives for {config.data.dataset}/{config.pairs.split} with Spark"):
        spark = spark_session(config.spark, "towerline-pairs")
        inputs = read_inputs(spark, files)
        try:
            counts = check_inputs(inputs, files, config.pairs)
            return publish_pairs(spark, inputs, counts, files, config, Path(output))
        finally:
            inputs.unpersist()


def input_files(root: Path, split: str) -> InputFiles:
    """Locate the files up front, so a missing split fails before Spark starts."""
    return InputFiles(
        root=root,
        corpus=dataset_file(root, "corpus.jsonl"),
        queries=dataset_file(root, "queries.jsonl"),
        qrels=dataset_file(root / "qrels", f"{split}.tsv"),
    )


def read_inputs(spark: SparkSession, files: InputFiles) -> Inputs:
    documents = read_documents(spark, str(files.corpus), files.source(files.corpus)).cache()
    queries = read_queries(spark, str(files.queries), files.source(files.queries)).cache()
    qrels = read_qrels(spark, str(files.qrels), files.source(files.qrels), documents, queries).cache()
    return Inputs(documents=documents, queries=queries, qrels=qrels)


def check_inputs(inputs: Inputs, files: InputFiles, settings: PairsConfig) -> dict[str, dict[str, int]]:
    """Refuse unusable input before the artifact's staging dir exists; returns the row counts."""
    if settings.on_malformed == "fail":
        fail_on_malformed(inputs, files)
    counts = count_rows(inputs)
    require_usable(inputs, counts, files)
    return counts


def publish_pairs(
    spark: SparkSession,
    inputs: Inputs,
    counts: dict[str, dict[str, int]],
    files: InputFiles,
    config: TowerlineConfig,
    output: Path,
) -> Manifest:
    """Mine negatives and write pairs, quarantine and stats; the artifact appears only when complete."""
    index = spark.sparkContext.broadcast(index_corpus(inputs.documents, config.pairs.stemmer))
    try:
        with ArtifactWriter(output, KIND, producer="pairs", config=config) as staged:
            write_parquet(build_pairs(inputs, index, config.pairs), staged.path / PAIRS_FILE, PAIR_COLUMNS, ["line"])
            write_parquet(quarantine(inputs), staged.path / QUARANTINE_FILE, QUARANTINE_COLUMNS, ["source", "line"])
            stats = collect_stats(spark, staged.path, counts, files, config.pairs)
            (staged.path / STATS_FILE).write_text(json.dumps(stats, indent=2) + "\n")
            staged.metadata.update({key: stats[key] for key in METADATA_KEYS})
    finally:
        index.destroy()
    assert staged.manifest is not None  # set by ArtifactWriter on a clean exit
    return staged.manifest


def fail_on_malformed(inputs: Inputs, files: InputFiles) -> None:
    for rows, path in ((inputs.documents, files.corpus), (inputs.queries, files.queries)):
        error = first_json_error(rows)
        if error is not None:
            raise DataError(f"{path}:{error['line']}: {error['reason']}")


def count_rows(inputs: Inputs) -> dict[str, dict[str, int]]:
    """rows / valid / quarantined per input file."""
    counts = {}
    for name, rows in inputs.tables().items():
        totals = rows.agg(F.count("*").alias("rows"), F.count_if(F.col("reason").isNull()).alias("valid")).first()
        assert totals is not None  # a global aggregate always yields one row
        counts[name] = {
            "rows": totals["rows"],
            "valid": totals["valid"],
            "quarantined": totals["rows"] - totals["valid"],
        }
    return counts


def require_usable(inputs: Inputs, counts: dict[str, dict[str, int]], files: InputFiles) -> None:
    """Refuse input that would yield no pairs: an empty artifact would only fail later, in training."""
    if counts["corpus"]["valid"] == 0:
        raise DataError(f"{files.corpus}: no valid documents ({counts['corpus']['rows']} rows)")
    if counts["qrels"]["valid"] == 0:
        first = inputs.qrels.filter(F.col("reason").isNotNull()).orderBy("line").first()
        example = f"; e.g. line {first['line']}: {first['reason']}" if first else ""
        raise DataError(f"{files.qrels}: no usable positive judgments ({counts['qrels']['rows']} rows{example})")


def index_corpus(documents: DataFrame, stemmer: str) -> Bm25Index:
    """Collect the valid corpus to the driver and index it; bm25s needs the whole corpus at once."""
    corpus = valid_rows(documents).orderBy("line").select("doc_id", "doc_text").toPandas()
    return build_index(corpus["doc_id"].tolist(), corpus["doc_text"].tolist(), stemmer)


def build_pairs(inputs: Inputs, index: Broadcast[Bm25Index], settings: PairsConfig) -> DataFrame:
    """One row per valid judgment, with the query's hard negatives; `line` is the qrels line."""
    documents = valid_rows(inputs.documents)
    queries = valid_rows(inputs.queries).drop("line")
    positives = valid_rows(inputs.qrels).select("line", "query_id", F.col("doc_id").alias("positive_id"))
    # Every positive of a query is excluded from its negatives, not only the pair's own.
    judged_queries = (
        positives.groupBy("query_id")
        .agg(F.collect_set("positive_id").alias("positive_ids"))
        .join(queries, on="query_id")
    )
    negatives = attach_texts(negatives_in_spark(judged_queries, index, settings), documents)
    positive_docs = documents.select(F.col("doc_id").alias("positive_id"), F.col("doc_text").alias("positive_text"))
    return (
        positives.join(queries, on="query_id")
        .join(positive_docs, on="positive_id")
        .join(negatives, on="query_id")
        .select("line", *PAIR_COLUMNS)
    )


def quarantine(inputs: Inputs) -> DataFrame:
    return reduce(DataFrame.unionByName, [quarantined_rows(rows) for rows in inputs.tables().values()])


def write_parquet(rows: DataFrame, path: Path, columns: tuple[str, ...], order: list[str]) -> None:
    """One sorted file, so the output is stable run to run and easy to read without Spark."""
    rows.repartition(1).sortWithinPartitions(*order).select(*columns).write.parquet(str(path))
    _drop_hadoop_side_files(path)


def _drop_hadoop_side_files(directory: Path) -> None:
    # Hadoop's .crc files and _SUCCESS marker: the manifest already checksums every file.
    for path in directory.iterdir():
        if path.name == "_SUCCESS" or (path.name.startswith(".") and path.name.endswith(".crc")):
            path.unlink()


def collect_stats(
    spark: SparkSession,
    staged: Path,
    counts: dict[str, dict[str, int]],
    files: InputFiles,
    settings: PairsConfig,
) -> dict[str, Any]:
    """Counts read back from the written files, so they describe exactly what was published."""
    pairs = spark.read.parquet(str(staged / PAIRS_FILE))
    negatives = F.size("negative_ids")
    totals = pairs.agg(
        F.count("*").alias("pairs"),
        F.countDistinct("query_id").alias("queries"),
        F.coalesce(F.sum(negatives), F.lit(0)).alias("negatives"),
        F.count_if(negatives < settings.negatives_per_query).alias("short"),
    ).first()
    assert totals is not None  # a global aggregate always yields one row
    reasons = spark.read.parquet(str(staged / QUARANTINE_FILE)).groupBy("source", "reason").count()
    return {
        "dataset_dir": str(files.root),
        "split": settings.split,
        "pairs": totals["pairs"],
        "queries": totals["queries"],
        "negatives": totals["negatives"],
        "pairs_short_of_negatives": totals["short"],
        "quarantined": sum(table["quarantined"] for table in counts.values()),
        "inputs": counts,
        "quarantine_reasons": [row.asDict() for row in reasons.orderBy("source", "reason").collect()],
        "bm25": {
            "top_k": settings.bm25_top_k,
            "skip_top": settings.skip_top,
            "negatives_per_query": settings.negatives_per_query,
            "stemmer": settings.stemmer,
        },
    }

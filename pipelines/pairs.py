"""`towerline pairs`: a BEIR dataset → training pairs with BM25 hard negatives, as a Spark job.

Checks the dataset first with the shared reader (`towerline/beir.py`: under
`data.on_malformed=fail` a malformed row stops the run before Spark starts), then reads the
corpus, the queries and one qrels split in Spark with the same line parsers; rejects go to
quarantine with their reason. Judgments scored at least `data.positive_min` become pairs; lower
scores are judged non-relevant documents and become the query's first negatives, before BM25
hard negatives fill up to `pairs.negatives_per_query`. Writes a `training-pairs` artifact:

    pairs.parquet/       one row per (query, positive): query_id, query_text, positive_id,
                         positive_text, negative_ids, negative_texts
    quarantine.parquet/  source, line, reason, raw
    stats.json           row counts per input, per quarantine reason, and the BM25 settings
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import partial, reduce
from pathlib import Path
from typing import Any

from pyspark import Broadcast
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from pipelines.negatives import attach_texts, negatives_in_spark
from pipelines.parquet_output import write_parquet
from pipelines.records import (
    quarantined_rows,
    read_documents,
    read_qrels,
    read_queries,
    valid_rows,
)
from pipelines.spark import spark_session
from pipelines.target import SparkArtifactWriter
from towerline.artifacts import Manifest
from towerline.beir import BeirDataset, DatasetFiles, load_dataset, positives, source_name
from towerline.bm25 import Bm25Index, build_index
from towerline.config import PairsConfig, TowerlineConfig
from towerline.errors import DataError
from towerline.progress import status
from towerline.templates import DEFAULT_DOC_TEMPLATE, render_document

KIND = "training-pairs"
PAIRS_FILE = "pairs.parquet"
QUARANTINE_FILE = "quarantine.parquet"
STATS_FILE = "stats.json"
PAIR_COLUMNS = ("query_id", "query_text", "positive_id", "positive_text", "negative_ids", "negative_texts")
QUARANTINE_COLUMNS = ("source", "line", "reason", "raw")
# stats.json keys copied into the manifest, so `index info`-style readers need not open stats.json.
METADATA_KEYS = ("pairs", "queries", "negatives", "quarantined", "dataset", "split", "bm25")


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


def run_pairs(config: TowerlineConfig, output: str | Path) -> Manifest:
    """Build the training-pairs artifact at `output`; DataError on unusable input, nothing written then."""
    split = config.pairs.split
    # The dataset check runs before Spark starts: a malformed row fails in seconds, under the same
    # policy as every other stage; the Spark job then quarantines with the same parsers.
    checked = load_dataset(config.data, [split])
    require_positives(checked, split, config.data.positive_min)
    files = PairsInputs(checked.files, split)
    with status(f"pairs: mining BM25 hard negatives for {files.dataset.name}/{split} with Spark"):
        spark = spark_session(config.spark, "towerline-pairs")
        inputs = read_inputs(spark, files)
        try:
            counts = count_rows(inputs)
            return publish_pairs(spark, inputs, counts, files, config, output)
        finally:
            inputs.unpersist()


@dataclass(frozen=True)
class PairsInputs:
    """The dataset and the qrels split the pairs come from."""

    dataset: DatasetFiles
    split: str

    @property
    def qrels(self) -> Path:
        return self.dataset.split_file(self.split)


def require_positives(dataset: BeirDataset, split: str, positive_min: int) -> None:
    """Refuse a split that would yield no pairs: an empty artifact would only fail later, in training."""
    if not any(positives(judged, positive_min) for judged in dataset.split(split).values()):
        raise DataError(
            f"{dataset.files.split_file(split)}: no usable positive judgments "
            f"(score >= data.positive_min={positive_min} for a known query and document)"
        )


def read_inputs(spark: SparkSession, files: PairsInputs) -> Inputs:
    corpus, queries = files.dataset.corpus, files.dataset.queries
    documents = read_documents(spark, str(corpus), source_name(corpus)).cache()
    query_rows = read_queries(spark, str(queries), source_name(queries)).cache()
    qrels = read_qrels(spark, str(files.qrels), source_name(files.qrels), documents, query_rows).cache()
    return Inputs(documents=documents, queries=query_rows, qrels=qrels)


def publish_pairs(
    spark: SparkSession,
    inputs: Inputs,
    counts: dict[str, dict[str, int]],
    files: PairsInputs,
    config: TowerlineConfig,
    output: str | Path,
) -> Manifest:
    """Mine negatives and write pairs, quarantine and stats; the artifact appears only when complete."""
    index = spark.sparkContext.broadcast(index_corpus(inputs.documents, config.pairs.stemmer))
    try:
        with SparkArtifactWriter(spark, output, KIND, producer="pairs", config=config) as staged:
            pairs = build_pairs(inputs, index, config.pairs, config.data.positive_min, config.encoder.doc_template)
            write_parquet(pairs, staged.uri(PAIRS_FILE), PAIR_COLUMNS, ["line"])
            write_parquet(quarantine(inputs), staged.uri(QUARANTINE_FILE), QUARANTINE_COLUMNS, ["source", "line"])
            stats = collect_stats(spark, staged, counts, files, config)
            staged.write_text(STATS_FILE, json.dumps(stats, indent=2) + "\n")
            staged.metadata.update({key: stats[key] for key in METADATA_KEYS})
            staged.metadata["doc_template"] = config.encoder.doc_template
    finally:
        index.destroy()
    assert staged.manifest is not None  # set by SparkArtifactWriter on a clean exit
    return staged.manifest


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


def index_corpus(documents: DataFrame, stemmer: str) -> Bm25Index:
    """Collect the valid corpus to the driver and index it; bm25s needs the whole corpus at once."""
    corpus = valid_rows(documents).orderBy("line").select("doc_id", "doc_text").toPandas()
    return build_index(corpus["doc_id"].tolist(), corpus["doc_text"].tolist(), stemmer)


def build_pairs(
    inputs: Inputs, index: Broadcast[Bm25Index], settings: PairsConfig, positive_min: int,
    doc_template: str = DEFAULT_DOC_TEMPLATE,
) -> DataFrame:
    """One row per positive judgment, with the query's negatives; `line` is the qrels line. Document
    texts are rendered with the doc tower's template (BM25 reads plain title and text)."""
    documents = rendered_documents(valid_rows(inputs.documents), doc_template)
    queries = valid_rows(inputs.queries).drop("line")
    judgments = valid_rows(inputs.qrels)
    is_positive = F.col("score") >= positive_min
    positives = judgments.filter(is_positive).select("line", "query_id", F.col("doc_id").alias("positive_id"))
    # Every positive of a query is excluded from its negatives, not only the pair's own; its judged
    # non-relevant documents (in qrels line order) are negatives known for certain.
    judged_queries = (
        judgments.groupBy("query_id")
        .agg(
            F.collect_set(F.when(is_positive, F.col("doc_id"))).alias("positive_ids"),
            F.sort_array(F.collect_list(F.when(~is_positive, F.struct("line", "doc_id")))).alias("known"),
        )
        .filter(F.size("positive_ids") > 0)
        .select("query_id", "positive_ids", F.transform("known", lambda row: row["doc_id"]).alias("known_negative_ids"))
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


def rendered_documents(documents: DataFrame, doc_template: str) -> DataFrame:
    """doc_text as the doc tower reads it; the default template is what doc_text holds already."""
    if doc_template == DEFAULT_DOC_TEMPLATE:
        return documents
    render = F.udf(partial(_render, doc_template), "string")
    return documents.withColumn("doc_text", render("doc_title", "doc_body"))


def _render(template: str, title: str | None, body: str | None) -> str:
    return render_document(template, title or "", body or "")


def quarantine(inputs: Inputs) -> DataFrame:
    return reduce(DataFrame.unionByName, [quarantined_rows(rows) for rows in inputs.tables().values()])


def collect_stats(
    spark: SparkSession,
    staged: SparkArtifactWriter,
    counts: dict[str, dict[str, int]],
    files: PairsInputs,
    config: TowerlineConfig,
) -> dict[str, Any]:
    """Counts read back from the written files, so they describe exactly what was published."""
    settings = config.pairs
    pairs = spark.read.parquet(staged.uri(PAIRS_FILE))
    negatives = F.size("negative_ids")
    totals = pairs.agg(
        F.count("*").alias("pairs"),
        F.countDistinct("query_id").alias("queries"),
        F.coalesce(F.sum(negatives), F.lit(0)).alias("negatives"),
        F.count_if(negatives < settings.negatives_per_query).alias("short"),
    ).first()
    assert totals is not None  # a global aggregate always yields one row
    reasons = spark.read.parquet(staged.uri(QUARANTINE_FILE)).groupBy("source", "reason").count()
    return {
        "dataset": files.dataset.identity(),
        "split": files.split,
        "positive_min": config.data.positive_min,
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

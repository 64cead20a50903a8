"""`towerline pairs --logs`: impression/click logs + a BEIR corpus → training pairs, as a Spark job.

A positive is a satisfied click (dwell ≥ `clicks.min_dwell_ms`); its weight is how many satisfied
clicks the (query, document) got across requests, and each query keeps its `max_positives_per_query`
heaviest. A query's negatives come from three sources, in this order, without repeats and never one
of its positives (`ClicksConfig`): skipped above a satisfied click, BM25-mined, model-mined from an
existing index (optional), random. The log rows
are validated in the JVM (`click_logs.py`); only distinct queries reach Python (negative mining).
Queries split into train and dev by a hash of their normalised text, so a query lands on the same
side on every run. Writes a `training-pairs` artifact that `towerline train` reads as it reads
BEIR pairs:

    pairs.parquet/       train queries: query_id, query_text, positive_id, positive_text, negative_ids,
                         negative_texts, negative_sources, weight
    dev_pairs.parquet/   the same columns for the dev queries
    quarantine.parquet/  source, line, reason, raw (log rows and corpus lines)
    stats.json           rows per input, quarantine counts per reason, pairs, negatives per source
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from pyspark import Broadcast, StorageLevel
from pyspark.sql import DataFrame, SparkSession, Window
from pyspark.sql import functions as F

from pipelines.click_logs import read_click_logs
from pipelines.negatives import attach_texts, mine_negatives
from pipelines.pairs import (
    KIND,
    PAIR_COLUMNS,
    QUARANTINE_COLUMNS,
    QUARANTINE_FILE,
    STATS_FILE,
    index_corpus,
    rendered_documents,
)
from pipelines.parquet_output import write_parquet
from pipelines.records import quarantined_rows, read_documents, valid_rows
from pipelines.spark import spark_session
from pipelines.target import SparkArtifactWriter
from towerline.artifacts import Manifest
from towerline.beir import locate_dataset, source_name
from towerline.bm25 import Bm25Index
from towerline.config import ClicksConfig, TowerlineConfig
from towerline.errors import ConfigError, DataError
from towerline.progress import status

PAIRS_FILE = "pairs.parquet"
DEV_PAIRS_FILE = "dev_pairs.parquet"
CLICK_PAIR_COLUMNS = (*PAIR_COLUMNS, "negative_sources", "weight")
SOURCES = ("skipped", "bm25", "model", "random")
_MINERS: dict[tuple[str, str], Any] = {}
NEGATIVES_SCHEMA = "query_id string, negative_ids array<string>, negative_sources array<string>"
METADATA_KEYS = ("logs", "pairs", "dev_pairs", "queries", "negatives_by_source", "quarantined", "dataset")


def run_click_pairs(config: TowerlineConfig, logs: str | Path, output: str | Path,
                    model: tuple[Path, Path] | None = None) -> Manifest:
    """Build the training-pairs artifact at `output` from click logs; DataError on unusable input
    (too many bad rows, nothing usable), and then nothing is written. `model` (index, query encoder
    of its space) mines the model negatives that `clicks.model_negatives` asks for."""
    files = locate_dataset(config.data)
    if config.clicks.model_negatives and model is None:
        raise ConfigError(f"clicks.model_negatives={config.clicks.model_negatives} needs an index and its query "
                          "encoder to mine with (pairs --logs ... --index DIR --encoder DIR)")
    miner = check_miner(*model, config.clicks) if model is not None and config.clicks.model_negatives else None
    logs_name = str(logs).rstrip("/").rsplit("/", 1)[-1]
    with status(f"pairs: click logs {logs_name} → pairs over {files.name} with Spark"):
        spark = spark_session(config.spark, "towerline-click-pairs")
        documents = read_documents(spark, str(files.corpus), source_name(files.corpus)).cache()
        # On disk only: read back as a stream, where a memory-and-disk block is read back whole (a
        # 10M-row log's blocks outgrow a 2 GB driver heap).
        rows = read_click_logs(spark, logs, valid_rows(documents), config.clicks).persist(StorageLevel.DISK_ONLY)
        try:
            counts = _count(documents, rows)
            _check_counts(counts, config, files.corpus, logs)
            return _publish(spark, documents, rows, counts, config, output, logs_name, files.identity(), miner)
        finally:
            rows.unpersist()
            documents.unpersist()


def _count(documents: DataFrame, rows: DataFrame) -> dict[str, Any]:
    """Rows and quarantine counts per reason, for the corpus and the logs (small aggregates)."""
    counts: dict[str, Any] = {}
    for name, table in (("corpus", documents), ("logs", rows)):
        reasons = {row["reason"]: row["count"] for row in table.groupBy("reason").count().collect()}
        valid = reasons.pop(None, 0)
        counts[name] = {"rows": valid + sum(reasons.values()), "valid": valid,
                        "quarantined": sum(reasons.values()), "reasons": dict(sorted(reasons.items()))}
    return counts


def _check_counts(counts: dict[str, Any], config: TowerlineConfig, corpus: Path, logs: str | Path) -> None:
    corpus_counts, log_counts = counts["corpus"], counts["logs"]
    if corpus_counts["quarantined"] and config.data.on_malformed == "fail":
        raise DataError(f"{corpus}: {corpus_counts['quarantined']} malformed corpus lines "
                        f"({corpus_counts['reasons']}); fix them or set data.on_malformed=quarantine")
    if not log_counts["rows"]:
        raise DataError(f"{logs}: no click-log rows")
    bad_fraction = log_counts["quarantined"] / log_counts["rows"]
    if bad_fraction > config.clicks.max_bad_fraction:
        raise DataError(f"{logs}: {log_counts['quarantined']} of {log_counts['rows']} rows ({bad_fraction:.1%}) are "
                        f"bad, above clicks.max_bad_fraction={config.clicks.max_bad_fraction}: "
                        f"{log_counts['reasons']}; nothing written")


def _publish(spark: SparkSession, documents: DataFrame, rows: DataFrame, counts: dict[str, Any],
             config: TowerlineConfig, output: str | Path, logs_name: str, dataset: dict[str, str],
             miner: ModelMiner | None) -> Manifest:
    settings = config.clicks
    # Texts as the doc tower reads them (its template); BM25 indexes plain title and text.
    docs = rendered_documents(valid_rows(documents), config.encoder.doc_template).select("doc_id", "doc_text")
    index = spark.sparkContext.broadcast(index_corpus(documents, config.pairs.stemmer))
    doc_ids = spark.sparkContext.broadcast(np.array(sorted(r["doc_id"] for r in docs.select("doc_id").collect())))
    try:
        with SparkArtifactWriter(spark, output, KIND, producer="pairs --logs", config=config) as staged:
            # Cached: the train and dev writes would otherwise each run the whole mining again. The
            # pairs are per (query, positive), a small table next to the log.
            pairs = build_click_pairs(valid_rows(rows), docs, index, doc_ids, config, miner).cache()
            is_dev = _is_dev(settings.dev_fraction)
            write_parquet(pairs.filter(~is_dev), staged.uri(PAIRS_FILE), CLICK_PAIR_COLUMNS,
                          ["query_id", "positive_id"])
            write_parquet(pairs.filter(is_dev), staged.uri(DEV_PAIRS_FILE), CLICK_PAIR_COLUMNS,
                          ["query_id", "positive_id"])
            quarantine = quarantined_rows(rows).unionByName(quarantined_rows(documents))
            write_parquet(quarantine, staged.uri(QUARANTINE_FILE), QUARANTINE_COLUMNS, ["source", "line"])
            stats = _stats(spark, staged, counts, config, logs_name, dataset)
            staged.write_text(STATS_FILE, json.dumps(stats, indent=2) + "\n")
            staged.metadata.update({key: stats[key] for key in METADATA_KEYS})
            staged.metadata["doc_template"] = config.encoder.doc_template
            pairs.unpersist()
    finally:
        index.destroy()
        doc_ids.destroy()
    assert staged.manifest is not None  # set by SparkArtifactWriter on a clean exit
    return staged.manifest


def build_click_pairs(clicks: DataFrame, docs: DataFrame, index: Broadcast[Bm25Index],
                      doc_ids: Broadcast[np.ndarray], config: TowerlineConfig,
                      miner: ModelMiner | None = None) -> DataFrame:
    """CLICK_PAIR_COLUMNS, one row per (query, kept positive), from the valid log rows."""
    settings = config.clicks
    satisfied = clicks.filter(F.col("clicked") & (F.col("dwell_ms") >= settings.min_dwell_ms))
    weighted = satisfied.groupBy("query_id", "doc_id").agg(
        F.count("*").alias("weight"), F.min("query_text").alias("query_text"))
    heaviest = Window.partitionBy("query_id").orderBy(F.desc("weight"), "doc_id")
    positives = (weighted.withColumn("_rank", F.row_number().over(heaviest))
                 .filter(F.col("_rank") <= settings.max_positives_per_query).drop("_rank"))
    queries = positives.groupBy("query_id").agg(F.min("query_text").alias("query_text"),
                                                F.collect_set("doc_id").alias("positive_ids"))
    queries = queries.join(_skipped_above_clicks(clicks, satisfied), on="query_id", how="left")
    mined = queries.mapInPandas(partial(_negatives_for_batches, index, doc_ids, config, miner), NEGATIVES_SCHEMA)
    negatives = attach_texts(mined, docs, aligned=("negative_sources",))
    positive_docs = docs.select(F.col("doc_id").alias("positive_id"), F.col("doc_text").alias("positive_text"))
    return (positives.withColumnRenamed("doc_id", "positive_id")
            .join(positive_docs, on="positive_id")
            .join(negatives, on="query_id", how="left")
            .select(*CLICK_PAIR_COLUMNS[:4],
                    *[F.coalesce(F.col(name), F.array().cast("array<string>")).alias(name)
                      for name in ("negative_ids", "negative_texts", "negative_sources")],
                    F.col("weight").cast("int").alias("weight")))


def _skipped_above_clicks(clicks: DataFrame, satisfied: DataFrame) -> DataFrame:
    """(query_id, skipped_ids): documents shown above a satisfied click of the same request and not
    clicked, most often skipped first (ties: doc id)."""
    deepest = satisfied.groupBy("request_id", "query_id").agg(F.max("position").alias("_deepest"))
    skipped = (clicks.filter(~F.col("clicked")).join(deepest, on=["request_id", "query_id"])
               .filter(F.col("position") < F.col("_deepest"))
               .groupBy("query_id", "doc_id").count())
    ordered = F.sort_array(F.collect_list(F.struct(F.negative("count").alias("order"), "doc_id")))
    return skipped.groupBy("query_id").agg(F.transform(ordered, lambda item: item["doc_id"]).alias("skipped_ids"))


def _negatives_for_batches(index: Broadcast[Bm25Index], doc_ids: Broadcast[np.ndarray], config: TowerlineConfig,
                           miner: ModelMiner | None, batches: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
    settings = config.clicks
    # BM25 is asked for enough candidates that its share survives removing the skipped picks.
    bm25 = config.pairs.model_copy(update={"negatives_per_query": settings.skipped_negatives
                                           + settings.bm25_negatives})
    for batch in batches:
        positives = [set(ids) for ids in batch["positive_ids"]]
        skipped = [[doc_id for doc_id in (ids if ids is not None else []) if doc_id not in judged]
                   [: settings.skipped_negatives] for ids, judged in zip(batch["skipped_ids"], positives, strict=True)]
        mined = (mine_negatives(index.value, batch["query_text"].tolist(), positives, [[] for _ in positives], bm25)
                 if settings.bm25_negatives else [[] for _ in positives])
        ranked = (miner.ranked(batch["query_text"].tolist()) if miner is not None and settings.model_negatives
                  else [[] for _ in positives])
        ids, sources = [], []
        for query, judged, known, candidates, retrieved in zip(batch["query_id"], positives, skipped, mined, ranked,
                                                               strict=True):
            hard = [doc_id for doc_id in candidates if doc_id not in known][: settings.bm25_negatives]
            model = model_negatives(retrieved, judged | set(known) | set(hard), settings, query)
            randoms = random_negatives(doc_ids.value, judged | set(known) | set(hard) | set(model), settings, query)
            ids.append(known + hard + model + randoms)
            sources.append(["skipped"] * len(known) + ["bm25"] * len(hard) + ["model"] * len(model)
                           + ["random"] * len(randoms))
        yield pd.DataFrame({"query_id": batch["query_id"], "negative_ids": ids, "negative_sources": sources})


def model_negatives(retrieved: list[str], excluded: set[str], settings: ClicksConfig, query: str) -> list[str]:
    """`settings.model_negatives` documents drawn (seeded by the query id) from the retrieved ranks
    inside `settings.model_rank_window`, none of them in `excluded`."""
    start, end = settings.model_rank_window
    window = [doc_id for doc_id in retrieved[start:end] if doc_id not in excluded]
    if not window or not settings.model_negatives:
        return []
    rng = query_rng(settings, query, stream=1)
    picks = rng.choice(len(window), size=min(settings.model_negatives, len(window)), replace=False)
    return [window[pick] for pick in sorted(picks)]


@dataclass(frozen=True)
class ModelMiner:
    """An index and the query encoder of its embedding space, loaded once per Python worker."""

    index_path: str
    encoder_path: str
    depth: int

    def ranked(self, texts: list[str]) -> list[list[str]]:
        index, encoder = _miner_parts(self.index_path, self.encoder_path)
        return [[doc_id for doc_id, _ in hits] for hits in index.search(encoder.encode(texts), self.depth)]


def _miner_parts(index_path: str, encoder_path: str) -> tuple[Any, Any]:
    key = (index_path, encoder_path)
    if key not in _MINERS:
        from indexing.load import load_index
        from serving.app import load_query_encoder
        from towerline.config import ServeConfig

        _MINERS[key] = (load_index(Path(index_path)), load_query_encoder(Path(encoder_path), ServeConfig()))
    return _MINERS[key]


def check_miner(index_path: Path, encoder_path: Path, settings: ClicksConfig) -> ModelMiner:
    """Refuse, before Spark starts, an index and encoder of different embedding spaces."""
    from indexing.layout import INDEX_KIND
    from serving.onnx_format import ONNX_KIND
    from towerline.artifacts import read_manifest, require_same_space
    from towerline.tower_spec import QUERY_TOWER_KINDS

    index = read_manifest(index_path, INDEX_KIND)
    encoder = read_manifest(encoder_path, (ONNX_KIND, *QUERY_TOWER_KINDS))
    require_same_space(encoder.metadata["embedding_space"], f"query encoder {encoder_path}",
                       index.metadata["embedding_space"], f"index {index_path}")
    return ModelMiner(str(index_path.resolve()), str(encoder_path.resolve()), settings.model_rank_window[1])


def query_rng(settings: ClicksConfig, query: str, stream: int | None = None) -> np.random.Generator:
    """The generator of one query's draws: the seed and the query id (hex; its first 15 digits), plus
    a stream number per source, so each source draws independently and identically on every run."""
    key = [settings.seed, int(query[:15], 16)]
    return np.random.default_rng(key if stream is None else [*key, stream])


def random_negatives(doc_ids: np.ndarray, excluded: set[str], settings: ClicksConfig, query: str) -> list[str]:
    """`settings.random_negatives` distinct corpus documents outside `excluded`, drawn by a generator
    seeded with the seed and the query id: the same picks wherever and whenever the query is mined."""
    wanted = min(settings.random_negatives, len(doc_ids) - len(excluded))
    rng = query_rng(settings, query)
    picks: list[str] = []
    while len(picks) < wanted:
        candidate = str(doc_ids[rng.integers(len(doc_ids))])
        if candidate not in excluded and candidate not in picks:
            picks.append(candidate)
    return picks


def _is_dev(fraction: float):
    # The query id is hex of a hash: its first 8 digits are uniform on [0, 16^8).
    return F.conv(F.substring("query_id", 1, 8), 16, 10).cast("double") < fraction * 16**8


def _stats(spark: SparkSession, staged: SparkArtifactWriter, counts: dict[str, Any], config: TowerlineConfig,
           logs_name: str, dataset: dict[str, str]) -> dict[str, Any]:
    """Counts read back from the written files, so they describe exactly what was published."""
    written = {name: spark.read.parquet(staged.uri(name)) for name in (PAIRS_FILE, DEV_PAIRS_FILE)}
    both = written[PAIRS_FILE].unionByName(written[DEV_PAIRS_FILE])
    by_source = {row["source"]: row["count"] for row in
                 both.select("query_id", "negative_sources").distinct()
                 .select(F.explode("negative_sources").alias("source")).groupBy("source").count().collect()}
    settings = config.clicks
    return {
        "dataset": dataset,
        "logs": logs_name,
        "pairs": written[PAIRS_FILE].count(),
        "dev_pairs": written[DEV_PAIRS_FILE].count(),
        "queries": both.select("query_id").distinct().count(),
        "negatives_by_source": {source: by_source.get(source, 0) for source in SOURCES},
        "quarantined": counts["logs"]["quarantined"] + counts["corpus"]["quarantined"],
        "inputs": counts,
        "settings": {"min_dwell_ms": settings.min_dwell_ms, "skipped_negatives": settings.skipped_negatives,
                     "bm25_negatives": settings.bm25_negatives, "model_negatives": settings.model_negatives,
                     "model_rank_window": list(settings.model_rank_window),
                     "random_negatives": settings.random_negatives,
                     "max_positives_per_query": settings.max_positives_per_query,
                     "dev_fraction": settings.dev_fraction, "bm25_top_k": config.pairs.bm25_top_k},
    }

"""`towerline pseudo-queries`: unlabeled query texts drawn from the corpus, as a Spark job.

Stage 2 (query-tower distillation) needs query-like texts, not labels: the student learns to
reproduce the teacher's query embedding. Each document offers its title (when it has a few
words) and sentences of its text, as in the Inverse Cloze Task; a seeded draw per document keeps
the output the same run to run. Writes a `pseudo-queries` artifact:

    queries.parquet/  query_text, doc_id, kind ("title" or "sentence"), one sorted file
    stats.json        counts per kind
"""

from __future__ import annotations

import json
import random
import re
import zlib
from collections.abc import Iterator
from functools import partial
from pathlib import Path

from pyspark.sql import Row
from pyspark.sql import functions as F

from pipelines.parquet_output import write_parquet
from pipelines.records import read_documents, valid_rows
from pipelines.spark import spark_session
from pipelines.target import SparkArtifactWriter
from towerline.artifacts import Manifest
from towerline.beir import load_dataset, source_name
from towerline.config import DistillConfig, TowerlineConfig
from towerline.progress import status

KIND = "pseudo-queries"
QUERIES_FILE = "queries.parquet"
QUERY_SCHEMA = "query_text string, doc_id string, kind string"
SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def pseudo_queries_for(doc_id: str, title: str, body: str, settings: DistillConfig) -> list[tuple[str, str, str]]:
    """(query_text, doc_id, kind) rows for one document: its title, then up to N of its sentences."""
    rows = []
    if len(title.split()) >= settings.pseudo_min_words:
        rows.append((title, doc_id, "title"))
    sentences = [
        sentence.strip() for sentence in SENTENCE_END.split(body)
        if settings.pseudo_min_words <= len(sentence.split()) <= settings.pseudo_max_words
    ]
    # Seeded by the document, not the partition: the same documents give the same queries anywhere.
    rng = random.Random(zlib.crc32(f"{settings.seed}:{doc_id}".encode()))
    picked = rng.sample(sentences, min(settings.pseudo_sentences_per_doc, len(sentences)))
    rows.extend((sentence, doc_id, "sentence") for sentence in picked)
    return rows


def run_pseudo_queries(config: TowerlineConfig, output: str | Path) -> Manifest:
    dataset = load_dataset(config.data)  # the shared check: a bad corpus fails before Spark starts
    corpus = dataset.files.corpus
    with status(f"pseudo-queries: titles and sentences from {dataset.files.name} with Spark"):
        spark = spark_session(config.spark, "towerline-pseudo-queries")
        documents = valid_rows(read_documents(spark, str(corpus), source_name(corpus)))
        rows = documents.select("doc_id", "doc_title", "doc_body").rdd.flatMap(
            partial(_rows_for_document, config.distill)
        )
        queries = spark.createDataFrame(rows, QUERY_SCHEMA)
        with SparkArtifactWriter(spark, output, KIND, producer="pseudo-queries", config=config) as staged:
            write_parquet(queries, staged.uri(QUERIES_FILE), ("query_text", "doc_id", "kind"), ["doc_id", "kind"])
            written = spark.read.parquet(staged.uri(QUERIES_FILE))
            counts = {row["kind"]: row["count"] for row in written.groupBy("kind").count().collect()}
            stats = {"queries": sum(counts.values()), "by_kind": counts, "dataset": dataset.files.identity(),
                     "documents": written.select(F.countDistinct("doc_id")).first()[0]}
            staged.write_text("stats.json", json.dumps(stats, indent=2) + "\n")
            staged.metadata.update(stats)
    assert staged.manifest is not None
    return staged.manifest


def _rows_for_document(settings: DistillConfig, row: Row) -> Iterator[tuple[str, str, str]]:
    yield from pseudo_queries_for(row["doc_id"], row["doc_title"] or "", row["doc_body"] or "", settings)

"""`towerline embed`: the doc tower embeds the corpus inside Spark, writing embedding shards that
`towerline index build --embeddings` indexes (format: towerline/doc_embeddings.py).

The corpus is read and validated by the same Spark reader as the pairs job; every Python worker
loads the doc tower once (a per-process cache: Spark reuses its Python workers across tasks) and
embeds its partition in batches with torch, the same `Tower.encode` the local path uses, so the
vectors agree with `index build`'s own within float tolerance. The tower directory must be
readable where the executors run (a shared file system or object store on a cluster).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from pyspark.sql import functions as F

from pipelines.records import read_documents, valid_rows
from pipelines.spark import spark_session
from pipelines.target import SparkArtifactWriter
from towerline.artifacts import Manifest
from towerline.beir import locate_dataset, source_name
from towerline.config import TowerlineConfig
from towerline.doc_embeddings import EMBEDDINGS_FILE, EMBEDDINGS_KIND
from towerline.errors import DataError
from towerline.progress import status
from towerline.tower_spec import DOC_DIR
from towerline.towers import read_dual_encoder

SCHEMA = "doc_id string, vector array<float>"
_TOWERS: dict[str, Any] = {}


def run_embed_corpus(config: TowerlineConfig, encoder_path: Path, output: str | Path,
                     partitions: int | None = None) -> Manifest:
    """Embed `config.data`'s corpus with the doc tower of `encoder_path` into a doc-embeddings artifact."""
    encoder = read_dual_encoder(encoder_path)
    files = locate_dataset(config.data)
    with status(f"embed: {files.name} corpus with the doc tower of {encoder_path.name}, in Spark"):
        spark = spark_session(config.spark, "towerline-embed")
        documents = read_documents(spark, str(files.corpus), source_name(files.corpus))
        bad = documents.filter(F.col("reason").isNotNull()).count()
        if bad and config.data.on_malformed == "fail":
            raise DataError(f"{files.corpus}: {bad} malformed corpus lines; fix them or set "
                            "data.on_malformed=quarantine")
        rows = valid_rows(documents).select("doc_id", "doc_title", "doc_body")
        rows = rows.repartition(partitions or spark.sparkContext.defaultParallelism, "doc_id")
        embed = partial(_embed_batches, str((encoder_path / DOC_DIR).resolve()), config.index.batch_size,
                        max(1, (os.cpu_count() or 1) // spark.sparkContext.defaultParallelism))
        with SparkArtifactWriter(spark, output, EMBEDDINGS_KIND, producer="embed", inputs={"encoder": encoder},
                                 config=config) as staged:
            rows.mapInPandas(embed, SCHEMA).write.parquet(staged.uri(EMBEDDINGS_FILE))
            written = spark.read.parquet(staged.uri(EMBEDDINGS_FILE)).agg(
                F.count("*").alias("count"), F.max(F.size("vector")).alias("dim")).first()
            assert written is not None  # a global aggregate always yields one row
            if written["count"] == 0:
                raise DataError(f"{files.corpus}: no valid document to embed")
            staged.metadata.update(embedding_space=encoder.metadata["embedding_space"], count=written["count"],
                                   dim=written["dim"], dataset=files.identity(),
                                   quarantined_documents=bad,
                                   encoder=str(encoder_path))
    assert staged.manifest is not None
    return staged.manifest


def _embed_batches(tower_dir: str, batch_size: int, threads: int,
                   batches: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
    tower = _doc_tower(tower_dir, threads)
    template = tower.spec.document_template
    from towerline.templates import render_document

    for batch in batches:
        texts = [render_document(template, title or "", body or "")
                 for title, body in zip(batch["doc_title"], batch["doc_body"], strict=True)]
        vectors = tower.encode(texts, batch_size=batch_size) if texts else np.zeros((0, 0), np.float32)
        yield pd.DataFrame({"doc_id": batch["doc_id"], "vector": list(vectors.astype(np.float32))})


def _doc_tower(tower_dir: str, threads: int) -> Any:
    """One tower per Python worker process; torch threads split the cores between the workers."""
    if tower_dir not in _TOWERS:
        import torch

        from towerline.encoder import Tower

        torch.set_num_threads(threads)
        _TOWERS[tower_dir] = Tower.load(Path(tower_dir))
    return _TOWERS[tower_dir]

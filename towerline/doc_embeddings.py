"""The doc-embeddings artifact: corpus vectors written by the Spark job `towerline embed`
(pipelines/embed_corpus.py) and indexed by `towerline index build --embeddings` — shared by both.

    embeddings.parquet/  doc_id, vector (float32 list), one part file per Spark partition
    manifest.json        the doc tower's embedding space, dim, count, the dataset and the encoder
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from towerline.artifacts import Manifest, read_manifest
from towerline.errors import ArtifactError

EMBEDDINGS_KIND = "doc-embeddings"
EMBEDDINGS_FILE = "embeddings.parquet"


def read_embeddings(path: Path) -> tuple[list[str], np.ndarray, Manifest]:
    """(doc ids, float32 [n, dim] embeddings, manifest) of a doc-embeddings artifact, ids sorted."""
    manifest = read_manifest(path, EMBEDDINGS_KIND)
    table = pq.read_table(path / EMBEDDINGS_FILE).sort_by("doc_id")
    doc_ids = table.column("doc_id").to_pylist()
    if len(set(doc_ids)) != len(doc_ids):
        raise ArtifactError(f"{path}: a doc id appears twice in {EMBEDDINGS_FILE}")
    vectors = np.asarray(table.column("vector").combine_chunks().flatten(), dtype=np.float32)
    return doc_ids, vectors.reshape(len(doc_ids), int(manifest.metadata["dim"])), manifest

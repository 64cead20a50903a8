"""The doc embeddings of an index version, by label, with a hash of the text each was made from.

`towerline index update` reuses a vector whenever a document's rendered text hashes the same (and
the doc tower is the same), so that only new and changed documents are embedded again, and index
types that cannot delete in place (flat, HNSW) are rebuilt from these vectors, never re-embedded.
Rows of deleted labels are zero with a null hash.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from towerline.errors import ArtifactError

VECTORS_FILE = "vectors.npy"
HASHES_FILE = "content_hashes.json"


def content_hash(rendered_text: str) -> str:
    return hashlib.sha256(rendered_text.encode()).hexdigest()


def write_embedding_cache(directory: Path, vectors: np.ndarray, hashes: list[str | None]) -> None:
    if len(vectors) != len(hashes):
        raise ValueError(f"{len(vectors)} vectors but {len(hashes)} content hashes")
    np.save(directory / VECTORS_FILE, np.ascontiguousarray(vectors, dtype=np.float32))
    (directory / HASHES_FILE).write_text(json.dumps(hashes))


def read_embedding_cache(directory: Path, labels: int) -> tuple[np.ndarray, list[str | None]]:
    """(vectors, hashes), one row per label; refused when absent or not of `labels` rows."""
    vectors_path, hashes_path = directory / VECTORS_FILE, directory / HASHES_FILE
    if not vectors_path.is_file() or not hashes_path.is_file():
        raise ArtifactError(f"{directory}: no embedding cache ({VECTORS_FILE}); it was built with "
                            "index.embedding_cache=false or by an older towerline: rebuild it with `towerline "
                            "index build` to update it incrementally")
    vectors = np.load(vectors_path, mmap_mode="r")
    hashes = json.loads(hashes_path.read_text())
    if len(vectors) != labels or len(hashes) != labels:
        raise ArtifactError(f"{directory}: embedding cache holds {len(vectors)} vectors / {len(hashes)} hashes "
                            f"for {labels} labels")
    return np.asarray(vectors), hashes

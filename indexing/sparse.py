"""The BM25 side of an index version: a "bm25-index" sub-artifact in the `sparse/` directory of a
"faiss-index" artifact, built from the same corpus in the same run.

Living inside the dense index's directory (and under its manifest's checksums), the two sides can
never drift apart: they are published, verified and rolled back as one version. The row → doc id
map is the dense index's `doc_ids.json`; the sparse manifest records a hash of it and the
tokenisation settings, so queries are tokenised as the documents were.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from towerline.artifacts import ArtifactWriter, read_manifest
from towerline.bm25 import STOPWORDS, Bm25Index, build_index
from towerline.errors import ArtifactError
from towerline.progress import status

SPARSE_KIND = "bm25-index"
SPARSE_DIR = "sparse"


def doc_ids_digest(doc_ids: list[str]) -> str:
    return hashlib.sha256(json.dumps(doc_ids).encode()).hexdigest()


def write_sparse_side(index_dir: Path, doc_ids: list[str], doc_texts: list[str], stemmer: str) -> dict[str, object]:
    """Build the BM25 index of `doc_texts` (row i = doc_ids[i]) into `index_dir/sparse`; returns what
    the dense manifest records about it."""
    with status(f"BM25 index of {len(doc_ids)} documents"):
        index = build_index(doc_ids, doc_texts, stemmer)
    with ArtifactWriter(index_dir / SPARSE_DIR, SPARSE_KIND, producer="index build") as staged:
        index.save(staged.path)
        staged.metadata.update(count=len(doc_ids), stemmer=stemmer, stopwords=STOPWORDS,
                               k1=index.retriever.k1, b=index.retriever.b, method=index.retriever.method,
                               doc_ids_sha256=doc_ids_digest(doc_ids))
    assert staged.manifest is not None
    return {"count": len(doc_ids), "stemmer": stemmer, "fingerprint": staged.manifest.fingerprint}


def load_sparse_side(index_dir: Path, doc_ids: list[str]) -> Bm25Index | None:
    """The BM25 side of an index directory, or None when it was built without one."""
    path = index_dir / SPARSE_DIR
    if not path.exists():
        return None
    manifest = read_manifest(path, SPARSE_KIND, verify=True)
    if manifest.metadata.get("doc_ids_sha256") != doc_ids_digest(doc_ids):
        raise ArtifactError(f"{path}: its rows belong to another document list than {index_dir}'s doc_ids.json")
    return Bm25Index.load(path, doc_ids, str(manifest.metadata["stemmer"]))

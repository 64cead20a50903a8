"""What the ranking term of stage 2 reads from the teacher's index: its document vectors and, per
training query, the rows the teacher ranks highest (the documents whose order the student must keep)."""

from __future__ import annotations

import faiss
import numpy as np

from indexing.embedding_cache import VECTORS_FILE, read_embedding_cache
from indexing.load import LoadedIndex
from towerline.errors import ConfigError


def index_vectors(index: LoadedIndex) -> np.ndarray:
    """Every document vector of the index, by label: from its embedding cache when it has one (exact
    for every index type, and label-aligned after `index update`), else reconstructed from the index
    (exact for flat/HNSW/IVF-flat)."""
    if (index.path / VECTORS_FILE).is_file():
        return read_embedding_cache(index.path, len(index.doc_ids))[0]
    cpu_index = faiss.index_gpu_to_cpu(index.index) if index.on_gpu else index.index
    if isinstance(cpu_index, faiss.IndexIVF):
        cpu_index.make_direct_map()
    try:
        return cpu_index.reconstruct_n(0, cpu_index.ntotal)
    except RuntimeError as exc:
        raise ConfigError(f"distill.rank_weight > 0 needs the index's vectors, which {index.path} cannot give back "
                          f"({str(exc).strip().splitlines()[0]}); set distill.rank_weight=0") from None


def teacher_candidates(index: LoadedIndex, teacher_embeddings: np.ndarray, count: int,
                       batch_size: int = 4096) -> np.ndarray:
    """The teacher's top-`count` index rows per query (-1 where the index has fewer documents)."""
    count = min(count, index.size)
    rows = np.empty((len(teacher_embeddings), count), dtype=np.int64)
    for start in range(0, len(teacher_embeddings), batch_size):
        block = np.ascontiguousarray(teacher_embeddings[start:start + batch_size], dtype=np.float32)
        rows[start:start + len(block)] = index.index.search(block, count)[1]
    return rows

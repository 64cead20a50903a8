"""FAISS structures from `IndexConfig`: flat, HNSW or IVF, all inner product."""

from __future__ import annotations

import faiss
import numpy as np

from towerline.config import IndexConfig

# FAISS warns below ~39 training points per centroid; fewer than that gives poor centroids.
MIN_POINTS_PER_LIST = 39


def effective_nlist(count: int, configured: int) -> int:
    """Cap the number of IVF lists so that small corpora still train meaningful centroids."""
    return max(1, min(configured, count // MIN_POINTS_PER_LIST))


def create_index(doc_embeddings: np.ndarray, config: IndexConfig) -> faiss.Index:
    """Build (train when needed) and fill an index of `config.type` with `doc_embeddings`."""
    count, dim = doc_embeddings.shape
    if config.type == "flat":
        index = faiss.IndexFlatIP(dim)
    elif config.type == "hnsw":
        index = faiss.IndexHNSWFlat(dim, config.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = config.hnsw_ef_construction
    else:
        quantizer = faiss.IndexFlatIP(dim)
        nlist = effective_nlist(count, config.ivf_nlist)
        index = faiss.IndexIVFFlat(quantizer, dim, nlist, faiss.METRIC_INNER_PRODUCT)
        index.train(doc_embeddings)
    index.add(doc_embeddings)
    apply_search_params(index, config)
    return index


def apply_search_params(index: faiss.Index, config: IndexConfig) -> None:
    """Query-time knobs (stored in the index file, and overridable at load time)."""
    if isinstance(index, faiss.IndexHNSW):
        index.hnsw.efSearch = config.hnsw_ef_search
    elif isinstance(index, faiss.IndexIVF):
        index.nprobe = min(config.ivf_nprobe, index.nlist)


def search_params(index: faiss.Index) -> dict[str, int]:
    if isinstance(index, faiss.IndexHNSW):
        return {"hnsw_m": int(index.hnsw.nb_neighbors(1)), "hnsw_ef_search": int(index.hnsw.efSearch)}
    if isinstance(index, faiss.IndexIVF):
        return {"ivf_nlist": int(index.nlist), "ivf_nprobe": int(index.nprobe)}
    return {}

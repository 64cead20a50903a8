"""FAISS structures from `IndexConfig`: flat, HNSW, IVF-Flat or IVF-PQ (optionally OPQ), all inner
product, and the `auto` choice between them."""

from __future__ import annotations

from dataclasses import dataclass

import faiss
import numpy as np

from towerline.config import IndexConfig
from towerline.errors import ConfigError

# FAISS warns below ~39 training points per centroid; fewer than that gives poor centroids.
MIN_POINTS_PER_LIST = 39
# A PQ codebook of 2^nbits centroids wants at least this many training points per centroid.
MIN_POINTS_PER_CODE = 39
TRAIN_SEED = 1234
# OPQ trains its rotation with an 8-bit PQ: k-means of 256 centroids per sub-space.
OPQ_MIN_POINTS = 256


@dataclass(frozen=True)
class IndexChoice:
    type: str
    # Why `auto` chose it (empty for an explicit type).
    reason: str = ""


def effective_nlist(count: int, configured: int) -> int:
    """Cap the number of IVF lists so that small corpora still train meaningful centroids."""
    return max(1, min(configured, count // MIN_POINTS_PER_LIST))


def pq_subquantizers(dim: int, config: IndexConfig) -> int:
    m = config.pq_m if config.pq_m is not None else max(1, dim // 8)
    if dim % m:
        raise ConfigError(f"index.pq_m={m} must divide the embedding dimension {dim}")
    return m


def estimated_bytes(index_type: str, count: int, dim: int, config: IndexConfig) -> int:
    """Resident size of an index of `count` vectors (the vectors, ids and links; FAISS's own estimate
    is not exposed before building)."""
    vectors = count * dim * 4
    if index_type == "flat":
        return vectors
    if index_type == "hnsw":
        # Level-0 links (2 M ids of 4 bytes) dominate the graph; upper levels add ~1/M of that.
        return vectors + int(count * 2 * config.hnsw_m * 4 * 1.1)
    if index_type == "ivf":
        return vectors + count * 8 + config.ivf_nlist * dim * 4
    m = pq_subquantizers(dim, config)
    return count * (m * config.pq_nbits // 8 + 8) + config.ivf_nlist * dim * 4


def choose_index_type(count: int, dim: int, config: IndexConfig) -> IndexChoice:
    """`config.type`, or for `auto`: exact below `auto_exact_below` documents, else the first of HNSW,
    IVF-Flat, IVF-PQ whose estimated size fits `memory_budget_mb`."""
    if config.type != "auto":
        return IndexChoice(config.type)
    budget = None if config.memory_budget_mb is None else int(config.memory_budget_mb * 2**20)
    if count < config.auto_exact_below:
        return IndexChoice("flat", f"{count} documents < index.auto_exact_below={config.auto_exact_below}: exact")
    for candidate in ("hnsw", "ivf", "ivf_pq"):
        size = estimated_bytes(candidate, count, dim, config)
        if budget is None or size <= budget:
            limit = "no memory budget" if budget is None else f"fits index.memory_budget_mb={config.memory_budget_mb:g}"
            return IndexChoice(candidate, f"{count} documents, ~{size / 2**20:.0f} MiB ({limit})")
    raise ConfigError(f"index.type=auto: even IVF-PQ (~{estimated_bytes('ivf_pq', count, dim, config) / 2**20:.0f} "
                      f"MiB) exceeds index.memory_budget_mb={config.memory_budget_mb:g}; raise the budget or "
                      "lower index.pq_m")


def training_sample(doc_embeddings: np.ndarray, config: IndexConfig) -> np.ndarray:
    if len(doc_embeddings) <= config.train_sample:
        return doc_embeddings
    rows = np.random.default_rng(TRAIN_SEED).choice(len(doc_embeddings), config.train_sample, replace=False)
    return doc_embeddings[np.sort(rows)]


def create_index(doc_embeddings: np.ndarray, config: IndexConfig, index_type: str | None = None) -> faiss.Index:
    """Build (train when needed) and fill an index of `index_type` (default: the choice for `config`)."""
    count, dim = doc_embeddings.shape
    index_type = index_type or choose_index_type(count, dim, config).type
    if index_type == "flat":
        index = faiss.IndexFlatIP(dim)
    elif index_type == "hnsw":
        index = faiss.IndexHNSWFlat(dim, config.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = config.hnsw_ef_construction
    else:
        nlist = effective_nlist(count, config.ivf_nlist)
        if index_type == "ivf":
            description = f"IVF{nlist},Flat"
        else:
            m = pq_subquantizers(dim, config)
            if config.opq and count < OPQ_MIN_POINTS:
                raise ConfigError(f"index.opq=true needs at least {OPQ_MIN_POINTS} vectors to train the rotation; "
                                  f"got {count} (set index.opq=false)")
            # PQ codebooks need enough points per code; fewer bits on a small corpus.
            nbits = min(config.pq_nbits, max(4, int(np.log2(max(count // MIN_POINTS_PER_CODE, 16)))))
            description = f"{f'OPQ{m},' if config.opq else ''}IVF{nlist},PQ{m}x{nbits}"
        index = faiss.index_factory(dim, description, faiss.METRIC_INNER_PRODUCT)
        index.train(training_sample(doc_embeddings, config))
    index.add(doc_embeddings)
    apply_search_params(index, config)
    return index


def apply_search_params(index: faiss.Index, config: IndexConfig) -> None:
    """Query-time knobs (stored in the index file, and overridable at load time)."""
    index = without_id_map(index)
    if isinstance(index, faiss.IndexHNSW):
        index.hnsw.efSearch = config.hnsw_ef_search
    elif (ivf := ivf_of(index)) is not None:
        ivf.nprobe = min(config.ivf_nprobe, ivf.nlist)


def search_parameters(index: faiss.Index, nprobe: int | None = None,
                      ef_search: int | None = None) -> faiss.SearchParameters | None:
    """Per-call search knobs (thread-safe, unlike setting them on the shared index); None: the stored ones."""
    index = without_id_map(index)  # an id map hands the parameters to the index it wraps
    if isinstance(index, faiss.IndexHNSW) and ef_search:
        return faiss.SearchParametersHNSW(efSearch=ef_search)
    ivf = ivf_of(index)
    if ivf is None or not nprobe:
        return None
    params = faiss.SearchParametersIVF(nprobe=min(nprobe, ivf.nlist))
    if isinstance(index, faiss.IndexPreTransform):
        return faiss.SearchParametersPreTransform(index_params=params)
    return params


def search_params(index: faiss.Index) -> dict[str, int | bool]:
    index = without_id_map(index)
    if isinstance(index, faiss.IndexHNSW):
        return {"hnsw_m": int(index.hnsw.nb_neighbors(1)), "hnsw_ef_search": int(index.hnsw.efSearch)}
    ivf = ivf_of(index)
    if ivf is None:
        return {}
    params = {"ivf_nlist": int(ivf.nlist), "ivf_nprobe": int(ivf.nprobe)}
    if isinstance(ivf, faiss.IndexIVFPQ):
        params.update(pq_m=int(ivf.pq.M), pq_nbits=int(ivf.pq.nbits), opq=isinstance(index, faiss.IndexPreTransform))
    return params


def without_id_map(index: faiss.Index) -> faiss.Index:
    """The structure inside an IndexIDMap2 (flat / HNSW versions after `index update` deleted labels)."""
    if isinstance(index, faiss.IndexIDMap | faiss.IndexIDMap2):
        return faiss.downcast_index(index.index)
    return index


def ivf_of(index: faiss.Index) -> faiss.IndexIVF | None:
    try:
        return faiss.downcast_index(faiss.extract_index_ivf(index))
    except RuntimeError:  # not an IVF index (flat, HNSW)
        return None

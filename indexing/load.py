"""Load a verified "faiss-index" artifact (or a registry name, via CURRENT) and search it."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path

import faiss
import numpy as np

from indexing.doc_store import DocStore, load_doc_store
from indexing.factory import apply_search_params, search_parameters, search_params
from indexing.gpu import place_index
from indexing.layout import INDEX_FILE, INDEX_KIND, live_doc_ids, read_doc_ids, read_tuned_fusion
from indexing.publish import is_registry_entry, resolve_published
from indexing.sparse import load_sparse_side
from towerline.artifacts import Manifest, read_manifest
from towerline.bm25 import Bm25Index
from towerline.config import FusionConfig, IndexConfig
from towerline.errors import ArtifactError

Hits = list[tuple[str, float]]


@dataclass
class LoadedIndex:
    index: faiss.Index
    # Label → doc id (None: a label deleted by an update); FAISS returns labels.
    doc_ids: list[str | None]
    manifest: Manifest
    path: Path
    # Published version name ("v0003") when loaded from a registry; "" for a bare artifact.
    published_version: str = ""
    on_gpu: bool = False
    # The BM25 side of the same version (indexing.sparse), when it was built with one.
    sparse: Bm25Index | None = None
    # The fusion settings `eval tune-fusion` chose on dev for this version (FUSION_FILE), if any.
    tuned_fusion: FusionConfig | None = None
    # Titles and texts of the documents (indexing.doc_store), when the version was built with them.
    doc_store: DocStore | None = None
    # The search knobs in effect after loading (stored ones, or the config's overrides).
    search_knobs: dict[str, int | bool] = field(default_factory=dict)
    # A GPU index is not safe to search from several threads at once (FAISS's GPU resources are
    # per index); CPU indexes are, and are searched without it.
    _gpu_lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    @property
    def embedding_space(self) -> str:
        return str(self.manifest.metadata["embedding_space"])

    @property
    def dim(self) -> int:
        return int(self.index.d)

    @property
    def size(self) -> int:
        return int(self.index.ntotal)

    @property
    def index_type(self) -> str:
        return str(self.manifest.metadata.get("index_type", ""))

    @property
    def version(self) -> str:
        """What a client sees as the index version: the published name, else a fingerprint prefix."""
        return self.published_version or self.manifest.fingerprint[:12]

    def search(self, query_embeddings: np.ndarray, k: int, *, nprobe: int | None = None,
               ef_search: int | None = None) -> list[Hits]:
        """Top-k (doc_id, score) per query row, best first; slots FAISS could not fill are dropped.
        `nprobe` (IVF) / `ef_search` (HNSW) override the stored search knobs for this call only."""
        queries = np.ascontiguousarray(np.atleast_2d(query_embeddings), dtype=np.float32)
        if queries.shape[1] != self.dim:
            raise ValueError(f"query embeddings have dim {queries.shape[1]}, the index has dim {self.dim}")
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        wanted = min(k, max(self.size, 1))
        if self.on_gpu:
            with self._gpu_lock:
                scores, rows = self._search_gpu(queries, wanted, nprobe)
        else:
            params = search_parameters(self.index, nprobe, ef_search)
            scores, rows = self.index.search(queries, wanted, params=params)
        return [self._hits(row_ids, row_scores) for row_ids, row_scores in zip(rows, scores, strict=True)]

    def _search_gpu(self, queries: np.ndarray, k: int, nprobe: int | None) -> tuple[np.ndarray, np.ndarray]:
        # GPU indexes take the knob through the parameter space (set, search, restore, under the lock).
        if not nprobe:
            return self.index.search(queries, k)
        space = faiss.GpuParameterSpace()
        stored = int(self.search_knobs.get("ivf_nprobe", 0))
        space.set_index_parameter(self.index, "nprobe", nprobe)
        try:
            return self.index.search(queries, k)
        finally:
            if stored:
                space.set_index_parameter(self.index, "nprobe", stored)

    def _hits(self, row_ids: np.ndarray, row_scores: np.ndarray) -> Hits:
        # FAISS pads with row -1 when fewer than k neighbours were found.
        return [
            (self.doc_ids[row], float(score))  # FAISS returns live labels only: never a None id
            for row, score in zip(row_ids.tolist(), row_scores.tolist(), strict=True)
            if row >= 0
        ]


def load_index(path: Path, config: IndexConfig | None = None) -> LoadedIndex:
    """Load an index artifact, or the CURRENT version of a registry entry (`registry_root/name`).

    With `config`, its query-time knobs (hnsw_ef_search, ivf_nprobe) override the stored ones and
    `use_gpu` picks the device; without, the stored knobs are kept and a GPU is used when present.
    """
    path = Path(path)
    published_version = ""
    if is_registry_entry(path):
        path = resolve_published(path)
        published_version = path.name
    manifest = read_manifest(path, INDEX_KIND, verify=True)
    index = _read_faiss(path / INDEX_FILE, mmap=config is not None and config.mmap)
    if config is not None:
        apply_search_params(index, config)
    doc_ids = read_doc_ids(path, int(index.ntotal))
    knobs = search_params(index)
    index, on_gpu = place_index(index, config.use_gpu if config is not None else "auto")
    return LoadedIndex(index, doc_ids, manifest, path, published_version, on_gpu,
                       sparse=load_sparse_side(path, live_doc_ids(doc_ids)), tuned_fusion=read_tuned_fusion(path),
                       search_knobs=knobs, doc_store=load_doc_store(path, int(index.ntotal)))


def _read_faiss(index_path: Path, mmap: bool = False) -> faiss.Index:
    flags = faiss.IO_FLAG_MMAP_IFC | faiss.IO_FLAG_READ_ONLY if mmap else 0
    try:
        return faiss.read_index(str(index_path), flags)
    except RuntimeError as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else "unknown error"
        raise ArtifactError(f"{index_path}: FAISS cannot read the index ({first_line})") from None

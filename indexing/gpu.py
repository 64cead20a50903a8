"""GPU placement for loaded indexes: `index_cpu_to_all_gpus` when faiss-gpu sees a device."""

from __future__ import annotations

import logging

import faiss

from indexing.factory import without_id_map
from towerline.errors import ConfigError

log = logging.getLogger(__name__)


def gpu_count() -> int:
    # faiss-cpu builds may lack the GPU entry points altogether.
    return int(faiss.get_num_gpus()) if hasattr(faiss, "get_num_gpus") else 0


def place_index(index: faiss.Index, use_gpu: str) -> tuple[faiss.Index, bool]:
    """Return (index to search, whether it lives on GPU) for index.use_gpu = auto|never|always."""
    if use_gpu == "never":
        return index, False
    gpus = gpu_count()
    if gpus == 0:
        if use_gpu == "always":
            raise ConfigError(
                "index.use_gpu='always' but FAISS sees no GPU (faiss-cpu installed, or no CUDA device); "
                "install towerline[gpu] on a GPU machine or set index.use_gpu=auto"
            )
        return index, False
    if isinstance(without_id_map(index), faiss.IndexHNSW):
        # FAISS has no GPU HNSW; a graph index keeps serving from CPU.
        if use_gpu == "always":
            raise ConfigError("index.use_gpu='always' but FAISS has no GPU HNSW; use index.type flat or ivf")
        log.info("HNSW index stays on CPU (FAISS has no GPU HNSW)")
        return index, False
    log.info("moving the index to %d GPU(s)", gpus)
    return faiss.index_cpu_to_all_gpus(index), True

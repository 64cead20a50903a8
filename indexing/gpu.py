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
    options = faiss.GpuMultipleClonerOptions()
    options.shard = gpus > 1 and _exceeds_one_device(index)
    log.info("moving the index to %d GPU(s), %s", gpus, "sharded" if options.shard else "replicated")
    return faiss.index_cpu_to_all_gpus(index, co=options), True


def _exceeds_one_device(index: faiss.Index) -> bool:
    """Whether the index (its codes and ids, with 20 % headroom for search buffers) is larger than the
    free memory of one GPU: then it is split over the GPUs instead of copied to each. Without torch
    (the lean serving install) the free memory is unknown and the index is replicated."""
    try:
        import torch
    except ImportError:
        return False
    if not torch.cuda.is_available():
        return False
    free = min(torch.cuda.mem_get_info(device)[0] for device in range(torch.cuda.device_count()))
    # Codes plus an 8-byte id per vector (sa_code_size: the per-vector encoding; no copy of the index).
    return int(index.ntotal * (index.sa_code_size() + 8) * 1.2) > free

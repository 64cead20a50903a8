"""Embedding that survives a crash: texts are embedded in shards, each saved as soon as it is done,
and a rerun with the same tower and the same texts loads the finished shards instead of embedding
them again. `index build` removes its shard directory once the index exists; `distill` keeps the
teacher's query embeddings this way as a cache for its next run.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path

import numpy as np

from indexing.embedding_cache import content_hash


def shard_dir_for(output: Path) -> Path:
    return output.parent / f".{output.name}.embedding-shards"


def embed_resumably(texts: list[str], embed: Callable[[list[str]], np.ndarray], shard_dir: Path,
                    shard_size: int, tower_key: str, on_reused: Callable[[int], None] | None = None) -> np.ndarray:
    """Embed `texts` shard by shard (`embed` takes a list of texts); a shard is named by the doc
    tower (`tower_key`) and a digest of its texts, so a changed corpus or tower never reuses one."""
    shard_dir.mkdir(parents=True, exist_ok=True)
    parts = []
    for start in range(0, len(texts), shard_size):
        chunk = texts[start:start + shard_size]
        digest = hashlib.sha256("\n".join([tower_key, *map(content_hash, chunk)]).encode()).hexdigest()[:24]
        path = shard_dir / f"shard-{start // shard_size:05d}-{digest}.npy"
        if path.is_file():
            vectors = np.load(path)
            if on_reused is not None:
                on_reused(len(chunk))
        else:
            vectors = np.ascontiguousarray(embed(chunk), dtype=np.float32)
            # Written beside and renamed, so a crash mid-write never leaves a shard that loads.
            temp = shard_dir / f".{path.name}.{uuid.uuid4().hex[:8]}.npy"
            np.save(temp, vectors)
            os.replace(temp, path)
        parts.append(vectors)
    return np.concatenate(parts) if parts else np.zeros((0, 0), dtype=np.float32)


def remove_shards(shard_dir: Path) -> None:
    shutil.rmtree(shard_dir, ignore_errors=True)

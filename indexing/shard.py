"""`towerline index shard`: split one "faiss-index" artifact into N shard artifacts, one per service.

Each shard is a complete faiss-index artifact of the source's embedding space (verified, servable by
`towerline serve` as it is) holding a disjoint part of the source's documents, chosen by a hash of
the doc id, so a document lands on the same shard whatever else the corpus holds.
`serving.sharded_client` sends every shard the query and merges the hits into the global top-k.

Labels stay the source's: a shard's `doc_ids.json` names its own documents and is null at the other
shards' labels, as after `index update` retired them. IVF shards are the source index with the other
shards' entries removed, so the trained centroids and codes are the source's own: with the same
nprobe every shard probes the lists the source probes, and the merged top-k is the source's. Flat
shards are rebuilt from the source's stored vectors (exact, so again the source's top-k); HNSW shards
get a graph of their own (approximate, like the source, but not the same candidates).

Left out of a shard, and why (listed in its manifest):
- the BM25 side: IDF and length normalisation are statistics of the whole corpus, so BM25 scores of
  different shards do not compare and cannot be merged by score (shards serve dense only);
- tuned fusion settings: they belong to hybrid retrieval, which needs the BM25 side;
- the embedding cache: a shard is not updated in place; update the source and shard the new version.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import uuid
from pathlib import Path

import faiss
import numpy as np

from indexing.doc_store import DocStore, load_doc_store, write_doc_store
from indexing.factory import create_index, ivf_of, search_params, without_id_map
from indexing.layout import FUSION_FILE, INDEX_FILE, INDEX_KIND, METRIC, live_doc_ids, read_doc_ids, write_doc_ids
from indexing.publish import is_registry_entry, resolve_published
from towerline.artifacts import ArtifactWriter, Manifest, read_manifest
from towerline.config import TowerlineConfig
from towerline.errors import ConfigError, DataError

ASSIGNMENT = "blake2b-64(doc_id) mod shards"
LEFT_OUT = {
    "sparse": "BM25 statistics are per corpus: scores of different shards do not compare",
    "fusion": "hybrid fusion needs the BM25 side",
    "embedding_cache": "shards are not updated in place: update the source, then shard it again",
}
# What a shard keeps of the source's metadata (the rest describes files it does not have).
KEPT_METADATA = ("embedding_space", "dim", "index_type", "auto_choice", "dataset", "encoder", "metric")


def shard_of(doc_id: str, shards: int) -> int:
    """The shard a document belongs to: stable across runs, machines and corpus versions."""
    return int.from_bytes(hashlib.blake2b(doc_id.encode(), digest_size=8).digest(), "big") % shards


def shard_name(shard: int) -> str:
    return f"shard-{shard}"


def shard_index(config: TowerlineConfig, source: Path, shards: int, output: Path) -> list[Manifest]:
    """Write `output/shard-0` … `output/shard-{N-1}` from the index artifact (or registry entry's
    CURRENT version) `source`. The shards appear together or not at all."""
    if shards < 2:
        raise ConfigError(f"--shards {shards}: a split needs at least 2 shards")
    source = resolve_published(source) if is_registry_entry(source) else Path(source)
    manifest = read_manifest(source, INDEX_KIND, verify=True)
    index = faiss.read_index(str(source / INDEX_FILE))
    doc_ids = read_doc_ids(source, int(index.ntotal))
    live = live_doc_ids(doc_ids)
    if shards > len(live):
        raise ConfigError(f"--shards {shards}: {source} holds only {len(live)} documents")
    assignment = [None if doc_id is None else shard_of(doc_id, shards) for doc_id in doc_ids]
    sizes = [assignment.count(shard) for shard in range(shards)]
    if 0 in sizes:
        raise DataError(f"--shards {shards}: shard {sizes.index(0)} would hold none of the {len(live)} documents "
                        "(documents go to shards by a hash of their id); use fewer shards")
    if output.exists() and any(output.iterdir()):
        raise ConfigError(f"--out {output}: exists and is not empty; shards are written into a new directory")
    doc_store = load_doc_store(source, int(index.ntotal))
    staging = output.parent / f".{output.name}.staging-{uuid.uuid4().hex[:8]}"
    try:
        written = [_write_shard(config, source, manifest, index, doc_ids, assignment, shard, shards, doc_store,
                                staging / shard_name(shard)) for shard in range(shards)]
        if output.exists():
            output.rmdir()  # empty, checked above
        os.replace(staging, output)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        if doc_store is not None:
            doc_store.close()
    return written


def _write_shard(config: TowerlineConfig, source: Path, manifest: Manifest, index: faiss.Index,
                 doc_ids: list[str | None], assignment: list[int | None], shard: int, shards: int,
                 doc_store: DocStore | None, dest: Path) -> Manifest:
    labels = np.array([label for label, owner in enumerate(assignment) if owner == shard], dtype=np.int64)
    shard_ids = [doc_id if owner == shard else None for doc_id, owner in zip(doc_ids, assignment, strict=True)]
    part = _part_of(index, labels, config, manifest)
    with ArtifactWriter(dest, INDEX_KIND, producer="index shard", config=config) as staged:
        faiss.write_index(part, str(staged.path / INDEX_FILE))
        write_doc_ids(staged.path, shard_ids)
        if doc_store is not None:
            own = live_doc_ids(shard_ids)
            stored = doc_store.lookup(own)
            write_doc_store(staged.path, own, [stored[doc_id][0] for doc_id in own],
                            [stored[doc_id][1] for doc_id in own])
            staged.metadata["doc_store"] = True
        staged.inputs = {"source": manifest.fingerprint,
                         **({"encoder": manifest.inputs["encoder"]} if "encoder" in manifest.inputs else {})}
        staged.metadata.update({key: value for key, value in manifest.metadata.items() if key in KEPT_METADATA})
        staged.metadata.update(
            count=int(part.ntotal), metric=METRIC, params=search_params(part), faiss_version=faiss.__version__,
            shard={"index": shard, "count": shards, "assignment": ASSIGNMENT, "source": str(source),
                   "source_fingerprint": manifest.fingerprint, "source_count": len(live_doc_ids(doc_ids)),
                   "left_out": {name: why for name, why in LEFT_OUT.items() if _has(source, manifest, name)}},
        )
    assert staged.manifest is not None
    return staged.manifest


def _part_of(index: faiss.Index, labels: np.ndarray, config: TowerlineConfig, manifest: Manifest) -> faiss.Index:
    """The source's entries under `labels`, searched with the source's stored knobs."""
    if ivf_of(index) is not None:
        part = faiss.clone_index(index)
        keep = faiss.IDSelectorBatch(labels)  # held here: the negation only points at it
        part.remove_ids(faiss.IDSelectorNot(keep))
        return part
    stored_labels, vectors = _labelled_vectors(index)
    rows = np.flatnonzero(np.isin(stored_labels, labels))
    params = search_params(index)
    structure = config.index.model_copy(update={key: params[key] for key in ("hnsw_m", "hnsw_ef_search")
                                                if key in params})
    inner = create_index(vectors[:0], structure, str(manifest.metadata.get("index_type") or "flat"))
    part = faiss.IndexIDMap2(inner)
    part.add_with_ids(np.ascontiguousarray(vectors[rows]), np.ascontiguousarray(stored_labels[rows]))
    return part


def _labelled_vectors(index: faiss.Index) -> tuple[np.ndarray, np.ndarray]:
    """(labels, vectors) of a flat or HNSW index, bare or inside an id map (after `index update`)."""
    inner = without_id_map(index)
    vectors = inner.reconstruct_n(0, inner.ntotal)
    if inner is index:
        return np.arange(index.ntotal, dtype=np.int64), vectors
    return faiss.vector_to_array(index.id_map).astype(np.int64), vectors


def _has(source: Path, manifest: Manifest, part: str) -> bool:
    if part == "sparse":
        return "sparse" in manifest.metadata
    if part == "fusion":
        return (source / FUSION_FILE).is_file()
    return bool(manifest.metadata.get("embedding_cache"))

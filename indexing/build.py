"""Build a "faiss-index" artifact: embed the corpus with the doc tower, index, write with manifest."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import faiss
import numpy as np
from pydantic import BaseModel

from indexing.doc_store import write_doc_store
from indexing.embed_shards import embed_resumably, remove_shards, shard_dir_for
from indexing.embedding_cache import content_hash, write_embedding_cache
from indexing.factory import choose_index_type, create_index, search_params
from indexing.layout import INDEX_FILE, INDEX_KIND, METRIC, write_doc_ids
from indexing.sparse import write_sparse_side
from towerline.artifacts import ArtifactWriter, Manifest
from towerline.beir import load_dataset
from towerline.config import IndexConfig, TowerlineConfig
from towerline.doc_embeddings import read_embeddings
from towerline.encoder import Tower
from towerline.errors import ConfigError, DataError
from towerline.progress import progress_bar
from towerline.towers import load_towers


def build_index(config: TowerlineConfig, encoder_path: Path, output: Path, embeddings: Path | None = None) -> Manifest:
    """Embed `config.data`'s corpus with the doc tower of `encoder_path` and write an index artifact;
    with `embeddings` (a doc-embeddings artifact of the Spark job `towerline embed`), index its vectors."""
    dataset = load_dataset(config.data)  # checked before the towers load or anything is embedded
    corpus = dataset.corpus
    _, doc_tower, encoder_manifest = load_towers(encoder_path)
    doc_ids = list(corpus)
    # Rendered with the template the doc tower was trained with (saved in its spec).
    template = doc_tower.spec.document_template
    rendered = [corpus[doc_id].render(template) for doc_id in doc_ids]
    shard_dir = shard_dir_for(output)
    if embeddings is not None:
        doc_embeddings = _precomputed(embeddings, doc_ids, encoder_manifest)
    else:
        doc_embeddings = embed_texts(doc_tower, rendered, config.index,
                                     resume=(shard_dir, encoder_manifest.fingerprint))
    sparse_texts = [corpus[doc_id].full_text for doc_id in doc_ids] if config.index.sparse else None
    documents = ([corpus[doc_id].title for doc_id in doc_ids], [corpus[doc_id].text for doc_id in doc_ids])
    manifest = build_index_from_embeddings(
        doc_embeddings,
        doc_ids,
        output,
        index_config=config.index,
        embedding_space=encoder_manifest.metadata["embedding_space"],
        inputs={"encoder": encoder_manifest},
        config=config,
        metadata={
            "dataset": dataset.files.identity(),
            "quarantined_documents": dataset.rejected_in(dataset.files.corpus),
            "encoder": str(encoder_path),
        },
        sparse_texts=sparse_texts,
        documents=documents if config.index.doc_store else None,
        content_hashes=[content_hash(text) for text in rendered] if config.index.embedding_cache else None,
    )
    remove_shards(shard_dir)
    return manifest


def embed_texts(doc_tower: Tower, texts: list[str], config: IndexConfig,
                resume: tuple[Path, str] | None = None) -> np.ndarray:
    """Embed on the GPU when one is visible (and index.use_gpu allows it), else on the CPU. With
    `resume` (shard directory, doc tower fingerprint), shard by shard, reusing finished shards."""
    import torch

    if config.use_gpu != "never" and torch.cuda.is_available():
        doc_tower.to("cuda")
    elif config.use_gpu == "always":
        raise ConfigError("index.use_gpu='always' but torch sees no CUDA device to embed the corpus on")
    with progress_bar("Embedding corpus", total=len(texts)) as bar:
        if resume is None:
            return doc_tower.encode(texts, batch_size=config.batch_size, on_batch=lambda n: bar.advance(0, n),
                                    bf16=config.precision == "bf16")
        return embed_resumably(
            texts, lambda chunk: doc_tower.encode(chunk, batch_size=config.batch_size, bf16=config.precision == "bf16",
                                                  on_batch=lambda n: bar.advance(0, n)),
            resume[0], config.embed_shard_size, resume[1], on_reused=lambda n: bar.advance(0, n))


def build_index_from_embeddings(
    doc_embeddings: np.ndarray,
    doc_ids: list[str],
    output: Path,
    *,
    index_config: IndexConfig,
    embedding_space: str,
    producer: str = "index build",
    inputs: dict[str, Manifest] | None = None,
    config: BaseModel | None = None,
    metadata: dict[str, Any] | None = None,
    sparse_texts: list[str] | None = None,
    documents: tuple[list[str], list[str]] | None = None,
    content_hashes: list[str] | None = None,
) -> Manifest:
    """Index precomputed, L2-normalised embeddings (row i belongs to doc_ids[i]); with `sparse_texts`
    (row-aligned), a BM25 index of them too, and with `documents` (titles, texts; row-aligned) a
    document store, and with `content_hashes` (of each document's rendered text) the embedding
    cache that `index update` reuses, all in the same version."""
    doc_embeddings = _checked_embeddings(doc_embeddings, doc_ids)
    choice = choose_index_type(*doc_embeddings.shape, index_config)
    index = create_index(doc_embeddings, index_config, choice.type)
    with ArtifactWriter(output, INDEX_KIND, producer=producer, inputs=inputs, config=config) as staged:
        faiss.write_index(index, str(staged.path / INDEX_FILE))
        write_doc_ids(staged.path, doc_ids)
        if sparse_texts is not None:
            staged.metadata["sparse"] = write_sparse_side(staged.path, doc_ids, sparse_texts,
                                                          index_config.sparse_stemmer)
        if documents is not None:
            write_doc_store(staged.path, doc_ids, *documents)
            staged.metadata["doc_store"] = True
        if content_hashes is not None:
            write_embedding_cache(staged.path, doc_embeddings, list(content_hashes))
            staged.metadata["embedding_cache"] = True
        staged.metadata.update(metadata or {})
        staged.metadata.update(
            embedding_space=embedding_space,
            dim=int(doc_embeddings.shape[1]),
            count=int(index.ntotal),
            index_type=choice.type,
            **({"auto_choice": choice.reason} if choice.reason else {}),
            metric=METRIC,
            params=search_params(index),
            faiss_version=faiss.__version__,
        )
    assert staged.manifest is not None
    return staged.manifest


def _precomputed(path: Path, doc_ids: list[str], encoder: Manifest) -> np.ndarray:
    """The doc-embeddings artifact's vectors in corpus order; refused when another doc tower made
    them or when they do not cover exactly the corpus's documents."""
    ids, vectors, manifest = read_embeddings(path)
    if manifest.metadata.get("embedding_space") != encoder.metadata["embedding_space"]:
        raise DataError(f"{path}: embeddings of another doc tower (embedding space "
                        f"{str(manifest.metadata.get('embedding_space'))[:12]}…, the encoder's is "
                        f"{encoder.metadata['embedding_space'][:12]}…)")
    row_of = {doc_id: row for row, doc_id in enumerate(ids)}
    missing = [doc_id for doc_id in doc_ids if doc_id not in row_of]
    if missing or len(ids) != len(doc_ids):
        raise DataError(f"{path}: {len(ids)} embedded documents against {len(doc_ids)} in the corpus "
                        f"({len(missing)} corpus documents missing, e.g. {missing[:3]}); embed this corpus again")
    return vectors[[row_of[doc_id] for doc_id in doc_ids]]


def _checked_embeddings(doc_embeddings: np.ndarray, doc_ids: list[str]) -> np.ndarray:
    if doc_embeddings.ndim != 2 or doc_embeddings.shape[0] == 0:
        shape = doc_embeddings.shape
        raise DataError(f"expected a non-empty (docs, dim) embedding matrix, got shape {shape}")
    if doc_embeddings.shape[0] != len(doc_ids):
        raise DataError(f"{doc_embeddings.shape[0]} embeddings but {len(doc_ids)} doc ids")
    if len(set(doc_ids)) != len(doc_ids):
        raise DataError("doc ids are not unique; each index row must map to one document")
    # FAISS takes C-contiguous float32 only.
    return np.ascontiguousarray(doc_embeddings, dtype=np.float32)

"""`towerline index update`: upsert and delete documents into a new index version.

Labels (FAISS's int64 ids) are stable: an unchanged document keeps its label, a changed one keeps
its label with a new vector, a new one gets the next unused label, a deleted one's label is retired
(null in `doc_ids.json`). Only documents whose rendered text changed are embedded (the embedding
cache); IVF indexes (ivf, ivf_pq) are updated in place with remove_ids / add_with_ids, keeping their
trained centroids and codebooks; flat and HNSW, which FAISS cannot delete from, are rebuilt from the
cached vectors. The BM25 side and the document store are rebuilt from the document store. The base
version is never modified; the new one appears whole or not at all (ArtifactWriter).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from indexing.build import embed_texts
from indexing.doc_store import write_doc_store
from indexing.embedding_cache import content_hash, read_embedding_cache, write_embedding_cache
from indexing.factory import apply_search_params, create_index, ivf_of, search_params
from indexing.layout import INDEX_FILE, INDEX_KIND, METRIC, live_doc_ids, write_doc_ids
from indexing.load import LoadedIndex, load_index
from indexing.sparse import write_sparse_side
from towerline.artifacts import ArtifactWriter, Manifest
from towerline.beir import Document, RowRejected, numbered_lines, parse_document
from towerline.config import TowerlineConfig
from towerline.errors import ArtifactError, DataError
from towerline.towers import load_towers


@dataclass
class UpdatePlan:
    """What an update does, label by label (computed before anything is embedded or written)."""

    labels: dict[str, int]  # every live doc id after the update → its label
    embed: dict[str, Document]  # new or changed documents, to embed
    removed_labels: list[int]  # labels whose vector leaves the index (deleted or changed)
    unchanged: int
    deleted: int
    added: int
    changed: int


def update_index(config: TowerlineConfig, base: Path, encoder_path: Path, output: Path, *,
                 upserts: list[Document], deletes: list[str]) -> Manifest:
    """A new version of `base` with `upserts` (new or changed documents) and without `deletes`."""
    loaded = load_index(base, config.index.model_copy(update={"use_gpu": "never"}))
    if loaded.doc_store is None:
        raise ArtifactError(f"{loaded.path}: no document store, so the BM25 side and the documents of the new "
                            "version cannot be rebuilt; rebuild it with index.doc_store=true")
    vectors, hashes = read_embedding_cache(loaded.path, len(loaded.doc_ids))
    _, doc_tower, encoder_manifest = load_towers(encoder_path)
    if loaded.manifest.inputs.get("encoder") != encoder_manifest.fingerprint:
        raise ArtifactError(f"{encoder_path}: not the doc tower {loaded.path} was built with (encoder fingerprint "
                            f"{loaded.manifest.inputs.get('encoder', '?')[:12]}…); its cached vectors would mix "
                            "spaces: rebuild the index with `towerline index build`")
    template = doc_tower.spec.document_template
    plan = plan_update(loaded.doc_ids, hashes, upserts, deletes, template)
    embedded = embed_texts(doc_tower, [doc.render(template) for doc in plan.embed.values()], config.index) \
        if plan.embed else np.zeros((0, loaded.dim), dtype=np.float32)

    size = max(plan.labels.values(), default=-1) + 1
    size = max(size, len(loaded.doc_ids))  # retired labels are never reused
    new_vectors = np.zeros((size, loaded.dim), dtype=np.float32)
    new_vectors[: len(vectors)] = vectors
    new_hashes: list[str | None] = [*hashes, *[None] * (size - len(hashes))]
    for label in plan.removed_labels:
        new_vectors[label], new_hashes[label] = 0.0, None
    embed_labels = np.array([plan.labels[doc_id] for doc_id in plan.embed], dtype=np.int64)
    for row, doc in enumerate(plan.embed.values()):
        new_vectors[embed_labels[row]] = embedded[row]
        new_hashes[embed_labels[row]] = content_hash(doc.render(template))
    doc_ids: list[str | None] = [None] * size
    for doc_id, label in plan.labels.items():
        doc_ids[label] = doc_id

    index, how = _updated_faiss_index(loaded, plan, embedded, embed_labels, new_vectors, doc_ids, config)
    documents = _documents(loaded, plan, doc_ids)
    live = live_doc_ids(doc_ids)
    with ArtifactWriter(output, INDEX_KIND, producer="index update", inputs={"base": loaded.manifest,
                                                                             "encoder": encoder_manifest},
                        config=config) as staged:
        faiss.write_index(index, str(staged.path / INDEX_FILE))
        write_doc_ids(staged.path, doc_ids)
        write_embedding_cache(staged.path, new_vectors, new_hashes)
        write_doc_store(staged.path, live, [documents[doc_id].title for doc_id in live],
                        [documents[doc_id].text for doc_id in live])
        if loaded.sparse is not None:
            stemmer = str(loaded.manifest.metadata["sparse"]["stemmer"])
            staged.metadata["sparse"] = write_sparse_side(staged.path, live,
                                                          [documents[doc_id].full_text for doc_id in live], stemmer)
        staged.metadata.update({key: value for key, value in loaded.manifest.metadata.items()
                                if key in ("embedding_space", "dim", "index_type", "auto_choice", "dataset")})
        staged.metadata.update(
            count=int(index.ntotal), metric=METRIC, params=search_params(index), faiss_version=faiss.__version__,
            doc_store=True, embedding_cache=True, encoder=str(encoder_path),
            update={"base_version": loaded.version, "how": how, "added": plan.added, "changed": plan.changed,
                    "unchanged": plan.unchanged, "deleted": plan.deleted, "embedded": len(plan.embed)},
        )
    assert staged.manifest is not None
    return staged.manifest


def read_upserts(path: Path) -> list[Document]:
    """BEIR corpus lines (`{"_id", "title", "text"}`); a bad line is refused with its number."""
    documents = []
    for line_no, raw in numbered_lines(path):
        try:
            documents.append(parse_document(raw))
        except RowRejected as rejected:
            raise DataError(f"{path}:{line_no}: {rejected.reason}; nothing was changed") from None
    return documents


def read_deletes(path: Path) -> list[str]:
    """One doc id per line (blank lines skipped)."""
    return [raw.strip() for _, raw in numbered_lines(path)]


def plan_update(doc_ids: list[str | None], hashes: list[str | None], upserts: list[Document], deletes: list[str],
                template: str) -> UpdatePlan:
    """Labels after the update; refuses an unknown delete, a doc both upserted and deleted, or an
    id upserted twice (naming them), before anything is embedded."""
    labels = {doc_id: label for label, doc_id in enumerate(doc_ids) if doc_id is not None}
    unknown = [doc_id for doc_id in deletes if doc_id not in labels]
    if unknown:
        raise DataError(f"delete: {len(unknown)} id(s) not in the index, e.g. {unknown[0]!r}; nothing was changed")
    seen: set[str] = set()
    for doc in upserts:
        if doc.doc_id in seen:
            raise DataError(f"upsert: document {doc.doc_id!r} appears twice; nothing was changed")
        seen.add(doc.doc_id)
    both = seen & set(deletes)
    if both:
        raise DataError(f"document {sorted(both)[0]!r} is both upserted and deleted; nothing was changed")
    removed = [labels.pop(doc_id) for doc_id in dict.fromkeys(deletes)]
    next_label = len(doc_ids)
    embed: dict[str, Document] = {}
    added = changed = 0
    for doc in upserts:
        if doc.doc_id in labels:
            label = labels[doc.doc_id]
            if hashes[label] == content_hash(doc.render(template)):
                continue  # same text: the cached vector stays, and so does the label
            removed.append(label)
            changed += 1
        else:
            labels[doc.doc_id] = next_label
            next_label += 1
            added += 1
        embed[doc.doc_id] = doc
    unchanged = len(labels) - added - changed
    return UpdatePlan(labels, embed, removed, unchanged, len(removed) - changed, added, changed)


def _updated_faiss_index(loaded: LoadedIndex, plan: UpdatePlan, embedded: np.ndarray, embed_labels: np.ndarray,
                         vectors: np.ndarray, doc_ids: list[str | None],
                         config: TowerlineConfig) -> tuple[faiss.Index, str]:
    if ivf_of(loaded.index) is not None:
        index = faiss.clone_index(loaded.index)
        if plan.removed_labels:
            index.remove_ids(np.array(plan.removed_labels, dtype=np.int64))
        if len(embedded):
            index.add_with_ids(np.ascontiguousarray(embedded), embed_labels)
        return index, "in place (remove_ids / add_with_ids)"
    labels = np.array([label for label, doc_id in enumerate(doc_ids) if doc_id is not None], dtype=np.int64)
    index_type = loaded.index_type or "flat"
    live_vectors = np.ascontiguousarray(vectors[labels])
    if np.array_equal(labels, np.arange(len(labels))):
        return create_index(live_vectors, config.index, index_type), "rebuilt from cached vectors"
    # Labels with gaps: the structure inside an id map, which answers with the labels.
    inner = create_index(live_vectors[:0], config.index, index_type)
    index = faiss.IndexIDMap2(inner)
    index.add_with_ids(live_vectors, labels)
    apply_search_params(inner, config.index)
    return index, "rebuilt from cached vectors"


def _documents(loaded: LoadedIndex, plan: UpdatePlan, doc_ids: list[str | None]) -> dict[str, Any]:
    assert loaded.doc_store is not None
    stored = loaded.doc_store.lookup([doc_id for doc_id in live_doc_ids(doc_ids) if doc_id not in plan.embed])
    documents: dict[str, Document] = {doc_id: Document(doc_id, title, text) for doc_id, (title, text) in stored.items()}
    documents.update(plan.embed)
    return documents

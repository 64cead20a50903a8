"""What a "faiss-index" artifact holds: the index file, the row → doc id map, the BM25 side
(indexing.sparse) and the fusion settings tuned for it, and names for them."""

from __future__ import annotations

import json
from pathlib import Path

from pydantic import ValidationError

from towerline.config import FusionConfig
from towerline.errors import ArtifactError

INDEX_KIND = "faiss-index"
INDEX_FILE = "index.faiss"
DOC_IDS_FILE = "doc_ids.json"
# Written by `towerline eval tune-fusion` into a new seal of the same index artifact.
FUSION_FILE = "fusion.json"
# Every index is built over L2-normalised embeddings, so inner product is cosine similarity.
METRIC = "ip"


def write_doc_ids(directory: Path, doc_ids: list[str | None]) -> None:
    """Label → doc id: FAISS returns labels (int64), position i of this list names label i; a label
    deleted by `index update` is null, so that the labels of the other documents never move."""
    (directory / DOC_IDS_FILE).write_text(json.dumps(doc_ids))


def read_doc_ids(directory: Path, expected_count: int) -> list[str | None]:
    path = directory / DOC_IDS_FILE
    try:
        doc_ids = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ArtifactError(f"{path}: unreadable id map ({exc.__class__.__name__})") from None
    live = sum(doc_id is not None for doc_id in doc_ids) if isinstance(doc_ids, list) else None
    if live != expected_count:
        found = live if live is not None else type(doc_ids).__name__
        raise ArtifactError(f"{path}: id map holds {found} ids but the index holds {expected_count} rows")
    return [None if doc_id is None else str(doc_id) for doc_id in doc_ids]


def live_doc_ids(doc_ids: list[str | None]) -> list[str]:
    """The documents an index version holds, in label order (the BM25 side's and doc store's rows)."""
    return [doc_id for doc_id in doc_ids if doc_id is not None]


def read_tuned_fusion(directory: Path) -> FusionConfig | None:
    path = directory / FUSION_FILE
    if not path.is_file():
        return None
    try:
        return FusionConfig.model_validate(json.loads(path.read_text()))
    except (ValueError, ValidationError) as exc:
        raise ArtifactError(f"{path}: unreadable fusion settings ({exc.__class__.__name__})") from None

"""Typed results shared by the in-process service and the gRPC client."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

RETRIEVAL_MODES = ("dense", "sparse", "hybrid")


class Hit(NamedTuple):
    """A document found: `score` ranks the hits of the mode served; `dense_score` (cosine) and
    `sparse_score` (BM25) are each side's own score, None when that side did not return it."""

    doc_id: str
    score: float
    dense_score: float | None = None
    sparse_score: float | None = None
    # Filled when the request asked for documents (the index version's document store).
    title: str | None = None
    snippet: str | None = None

    @property
    def found_by(self) -> tuple[str, ...]:
        return tuple(side for side, score in (("dense", self.dense_score), ("sparse", self.sparse_score))
                     if score is not None)


@dataclass(frozen=True)
class SearchKnobs:
    """Per-request approximate-search settings; 0 keeps the index version's stored value."""

    nprobe: int = 0  # IVF: inverted lists probed
    ef_search: int = 0  # HNSW: search beam


@dataclass(frozen=True)
class SearchResult:
    hits: list[Hit] = field(default_factory=list)
    index_version: str = ""
    latency_ms: float = 0.0
    # The retrieval mode that produced the hits: "dense", "sparse" or "hybrid".
    mode: str = "dense"


@dataclass(frozen=True)
class IndexInfo:
    index_kind: str
    index_type: str
    count: int
    dim: int
    embedding_space: str
    encoder_name: str
    index_fingerprint: str
    index_version: str
    metric: str
    # Whether the version has a BM25 side, the mode a request naming none gets, and the fusion used.
    sparse: bool = False
    default_mode: str = "dense"
    fusion: str = ""
    # The dataset the index was built from (name and content fingerprint; empty when unknown).
    dataset: str = ""
    dataset_fingerprint: str = ""


@dataclass(frozen=True)
class RecommendedItem:
    item_id: str
    score: float
    title: str


@dataclass(frozen=True)
class Recommendation:
    items: list[RecommendedItem]
    strategy: str
    model_version: str
    latency_ms: float = 0.0

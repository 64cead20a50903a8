"""Typed results shared by the in-process service and the gRPC client."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple


class Hit(NamedTuple):
    """A (doc_id, score) pair: unpacks like the tuples `LoadedIndex.search` returns."""

    doc_id: str
    score: float


@dataclass(frozen=True)
class SearchResult:
    hits: list[Hit] = field(default_factory=list)
    index_version: str = ""
    latency_ms: float = 0.0


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

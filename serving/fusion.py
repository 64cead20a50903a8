"""Hybrid search: merge a dense and a BM25 top list into one ranking (pure functions).

Reciprocal-rank fusion needs no score calibration (scores differ in kind: cosine vs BM25); the convex
combination min-max normalises each side per query first. Every fused hit keeps each side's own
score, so a client can see which side found it.
"""

from __future__ import annotations

import numpy as np

from serving.results import Hit
from towerline.config import FusionConfig

Ranked = list[tuple[str, float]]


def fuse(dense: Ranked, sparse: Ranked, settings: FusionConfig, top_k: int) -> list[Hit]:
    """The best `top_k` of the union of both lists (each cut to `settings.depth`), best first; ties go
    to the smaller doc id, so the order never depends on dictionary order."""
    depth = max(settings.depth, top_k)
    dense_scores, sparse_scores = dict(dense[:depth]), dict(sparse[:depth])
    if settings.method == "rrf":
        fused = _rrf([list(dense_scores), list(sparse_scores)], settings.rrf_k)
    else:
        fused = _convex(_min_max(dense_scores), _min_max(sparse_scores), settings.dense_weight)
    # float32, as the wire carries it: a hybrid hit reads the same in-process and through gRPC.
    rounded = {doc_id: float(np.float32(score)) for doc_id, score in fused.items()}
    best = sorted(rounded.items(), key=lambda item: (-item[1], item[0]))[:top_k]
    return [Hit(doc_id, score, dense_scores.get(doc_id), sparse_scores.get(doc_id)) for doc_id, score in best]


def one_side(ranked: Ranked, side: str) -> list[Hit]:
    """Hits of a single-side mode, each carrying its score as that side's score too."""
    if side == "dense":
        return [Hit(doc_id, score, dense_score=score) for doc_id, score in ranked]
    return [Hit(doc_id, score, sparse_score=score) for doc_id, score in ranked]


def describe(settings: FusionConfig) -> str:
    if settings.method == "rrf":
        return f"rrf k={settings.rrf_k} depth={settings.depth}"
    return f"convex dense_weight={settings.dense_weight:g} depth={settings.depth}"


def _rrf(rankings: list[list[str]], k: int) -> dict[str, float]:
    fused: dict[str, float] = {}
    for ranking in rankings:
        for rank, doc_id in enumerate(ranking, start=1):
            fused[doc_id] = fused.get(doc_id, 0.0) + 1.0 / (k + rank)
    return fused


def _min_max(scores: dict[str, float]) -> dict[str, float]:
    if not scores:
        return {}
    low, high = min(scores.values()), max(scores.values())
    span = high - low
    # One hit, or all equal: each is that side's best.
    return {doc_id: (score - low) / span if span > 0 else 1.0 for doc_id, score in scores.items()}


def _convex(dense: dict[str, float], sparse: dict[str, float], dense_weight: float) -> dict[str, float]:
    return {doc_id: dense_weight * dense.get(doc_id, 0.0) + (1 - dense_weight) * sparse.get(doc_id, 0.0)
            for doc_id in dense.keys() | sparse.keys()}

"""The retrieval logic behind the gRPC API, as a plain class: validate → encode → search.

No gRPC here: the servicer translates requests and errors, so this class is tested in-process
and reused by offline evaluation.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from indexing.layout import INDEX_KIND, METRIC
from indexing.load import LoadedIndex
from serving.errors import InvalidArgument
from serving.query_encoder import QueryEncoder
from serving.results import Hit, IndexInfo, SearchResult
from towerline.artifacts import require_same_space
from towerline.config import ServeConfig

# Called between stages; raises (e.g. DeadlineExceeded) to stop before the next expensive step.
Checkpoint = Callable[[], None]


def _no_checkpoint() -> None:
    return None


class RetrievalService:
    def __init__(self, query_encoder: QueryEncoder, index: LoadedIndex, limits: ServeConfig) -> None:
        require_same_space(
            query_encoder.embedding_space,
            f"query encoder {query_encoder.name}",
            index.embedding_space,
            f"index {index.path}",
        )
        self.query_encoder = query_encoder
        self.index = index
        self.limits = limits

    def search(self, query: str, top_k: int, checkpoint: Checkpoint = _no_checkpoint) -> SearchResult:
        self._check_top_k(top_k)
        self._check_query(query, "query")
        return self._run([query], top_k, checkpoint)[0]

    def batch_search(
        self, queries: list[str], top_k: int, checkpoint: Checkpoint = _no_checkpoint
    ) -> list[SearchResult]:
        self._check_top_k(top_k)
        if not queries:
            raise InvalidArgument("queries", "must hold at least one query")
        if len(queries) > self.limits.max_batch:
            raise InvalidArgument(
                "queries", f"{len(queries)} queries, more than serve.max_batch={self.limits.max_batch}"
            )
        for position, query in enumerate(queries):
            self._check_query(query, f"queries[{position}]")
        return self._run(list(queries), top_k, checkpoint)

    def info(self) -> IndexInfo:
        return IndexInfo(
            index_kind=INDEX_KIND,
            index_type=self.index.index_type,
            count=self.index.size,
            dim=self.index.dim,
            embedding_space=self.index.embedding_space,
            encoder_name=self.query_encoder.name,
            index_fingerprint=self.index.manifest.fingerprint,
            index_version=self.index.version,
            metric=str(self.index.manifest.metadata.get("metric", METRIC)),
        )

    def _run(self, queries: list[str], top_k: int, checkpoint: Checkpoint) -> list[SearchResult]:
        started = time.perf_counter()
        checkpoint()
        query_embeddings = self.query_encoder.encode(queries)
        checkpoint()
        ranked = self.index.search(query_embeddings, top_k)
        # One encode + one search serve the whole batch, so every result reports the batch time.
        latency_ms = (time.perf_counter() - started) * 1000.0
        return [
            SearchResult(
                hits=[Hit(doc_id, score) for doc_id, score in hits],
                index_version=self.index.version,
                latency_ms=latency_ms,
            )
            for hits in ranked
        ]

    def _check_top_k(self, top_k: int) -> None:
        if not 1 <= top_k <= self.limits.max_top_k:
            raise InvalidArgument("top_k", f"must be between 1 and {self.limits.max_top_k}, got {top_k}")

    def _check_query(self, query: str, field: str) -> None:
        if not query.strip():
            raise InvalidArgument(field, "must not be empty")
        if len(query) > self.limits.max_query_chars:
            raise InvalidArgument(
                field,
                f"{len(query)} characters, more than serve.max_query_chars={self.limits.max_query_chars}",
            )

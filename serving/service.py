"""The retrieval logic behind the gRPC API, as a plain class: validate → encode → search → fuse.

Three modes per request: dense (query encoder + FAISS), sparse (the index version's BM25 side) and
hybrid (both, in the same batch, fused by serving.fusion with the version's tuned settings).

No gRPC here: the servicer translates requests and errors, so this class is tested in-process
and reused by offline evaluation.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import replace
from typing import Protocol, TypeVar

from indexing.layout import INDEX_KIND, METRIC
from indexing.load import LoadedIndex
from serving.errors import InvalidArgument
from serving.fusion import describe, fuse, one_side
from serving.query_encoder import QueryEncoder
from serving.results import RETRIEVAL_MODES, IndexInfo, SearchKnobs, SearchResult
from towerline.artifacts import require_same_space
from towerline.config import FusionConfig, ServeConfig
from towerline.errors import ConfigError

# Called between stages; raises (e.g. DeadlineExceeded) to stop before the next expensive step.
Checkpoint = Callable[[], None]


T = TypeVar("T")


class StageObserver(Protocol):
    """Where stage timings go (serving.metrics.ServingMetrics); the service works without one."""

    def stage(self, name: str, seconds: float) -> None: ...

    def batch(self, size: int) -> None: ...


def _no_checkpoint() -> None:
    return None


# Upper bound on a per-request nprobe / ef_search: far above any useful value, low enough that one
# request cannot turn an approximate search into a scan of a huge graph.
MAX_KNOB = 1 << 16
DEFAULT_KNOBS = SearchKnobs()


class RetrievalService:
    def __init__(self, query_encoder: QueryEncoder, index: LoadedIndex, limits: ServeConfig,
                 fusion: FusionConfig | None = None) -> None:
        require_same_space(
            query_encoder.embedding_space,
            f"query encoder {query_encoder.name}",
            index.embedding_space,
            f"index {index.path}",
        )
        self.query_encoder = query_encoder
        self.index = index
        self.limits = limits
        self.observer: StageObserver | None = None
        # Settings tuned on dev for this index version win over the configured defaults.
        self.fusion = index.tuned_fusion or fusion or FusionConfig()
        self.default_mode = limits.mode if limits.mode != "auto" else ("hybrid" if index.sparse else "dense")
        if self.default_mode != "dense" and index.sparse is None:
            raise ConfigError(f"serve.mode={self.default_mode}: needs a BM25 side, and index {index.path} has none; "
                              "rebuild it with index.sparse=true")

    def search(self, query: str, top_k: int, checkpoint: Checkpoint = _no_checkpoint,
               mode: str = "", knobs: SearchKnobs = DEFAULT_KNOBS) -> SearchResult:
        """`mode`: "dense", "sparse", "hybrid", or "" for the server's default."""
        return self._run([query], top_k, checkpoint, self.check_search(query, top_k, mode, knobs), knobs)[0]

    def check_search(self, query: str, top_k: int, mode: str = "", knobs: SearchKnobs = DEFAULT_KNOBS) -> str:
        """Validate one search request (InvalidArgument naming the field); returns the mode to run."""
        self._check_top_k(top_k)
        self._check_query(query, "query")
        self._check_knobs(knobs)
        return self._mode(mode)

    def run_checked(self, queries: list[str], top_k: int, mode: str,
                    knobs: SearchKnobs = DEFAULT_KNOBS) -> list[SearchResult]:
        """Requests already through `check_search` (the micro-batcher's groups), as one batch."""
        return self._run(queries, top_k, _no_checkpoint, mode, knobs)

    def batch_search(
        self, queries: list[str], top_k: int, checkpoint: Checkpoint = _no_checkpoint, mode: str = "",
        knobs: SearchKnobs = DEFAULT_KNOBS,
    ) -> list[SearchResult]:
        self._check_top_k(top_k)
        self._check_knobs(knobs)
        if not queries:
            raise InvalidArgument("queries", "must hold at least one query")
        if len(queries) > self.limits.max_batch:
            raise InvalidArgument(
                "queries", f"{len(queries)} queries, more than serve.max_batch={self.limits.max_batch}"
            )
        for position, query in enumerate(queries):
            self._check_query(query, f"queries[{position}]")
        return self._run(list(queries), top_k, checkpoint, self._mode(mode), knobs)

    def check_documents(self) -> None:
        """A request asking for documents needs a version built with a document store."""
        if self.index.doc_store is None:
            raise InvalidArgument("include_documents", f"index version {self.index.version} has no document store "
                                                       "(built with index.doc_store=false)")

    def with_documents(self, results: list[SearchResult]) -> list[SearchResult]:
        """Each hit's title and snippet from the document store (one lookup for all the lists)."""
        store = self.index.doc_store
        assert store is not None  # check_documents ran first
        found = self._timed("documents", lambda: store.lookup([hit.doc_id for result in results
                                                                for hit in result.hits]))
        cut = self.limits.snippet_chars
        return [replace(result, hits=[hit._replace(title=found[hit.doc_id][0], snippet=found[hit.doc_id][1][:cut])
                                      if hit.doc_id in found else hit for hit in result.hits])
                for result in results]

    def info(self) -> IndexInfo:
        built_on = self.index.manifest.metadata.get("dataset") or {}
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
            sparse=self.index.sparse is not None,
            default_mode=self.default_mode,
            fusion=describe(self.fusion) if self.index.sparse is not None else "",
            dataset=str(built_on.get("name", "")),
            dataset_fingerprint=str(built_on.get("fingerprint", "")),
        )

    def _run(self, queries: list[str], top_k: int, checkpoint: Checkpoint, mode: str,
             knobs: SearchKnobs = DEFAULT_KNOBS) -> list[SearchResult]:
        started = time.perf_counter()
        # Hybrid fuses deeper lists than it returns: a document ranked low by one side and high by
        # the other must be in both lists to be fused.
        depth = max(top_k, self.fusion.depth) if mode == "hybrid" else top_k
        dense = sparse = None
        if mode != "sparse":
            checkpoint()
            query_embeddings = self._timed("encode", lambda: self.query_encoder.encode(queries))
            if self.observer is not None:
                self.observer.batch(len(queries))
            checkpoint()
            dense = self._timed("dense_search", lambda: self.index.search(
                query_embeddings, depth, nprobe=knobs.nprobe or None, ef_search=knobs.ef_search or None))
        if mode != "dense":
            checkpoint()
            assert self.index.sparse is not None  # checked by _mode
            sparse_index = self.index.sparse
            sparse = self._timed("sparse_search", lambda: sparse_index.search(queries, depth))
        if dense is not None and sparse is not None:
            both = zip(dense, sparse, strict=True)
            hits = self._timed("fuse", lambda: [fuse(d, s, self.fusion, top_k) for d, s in both])
        elif dense is not None:
            hits = [one_side(ranked, "dense") for ranked in dense]
        else:
            assert sparse is not None
            hits = [one_side(ranked, "sparse") for ranked in sparse]
        # One encode + one search per side serve the whole batch, so every result reports the batch time.
        latency_ms = (time.perf_counter() - started) * 1000.0
        return [SearchResult(hits=found, index_version=self.index.version, latency_ms=latency_ms, mode=mode)
                for found in hits]

    def _timed(self, stage: str, work: Callable[[], T]) -> T:
        started = time.perf_counter()
        result = work()
        if self.observer is not None:
            self.observer.stage(stage, time.perf_counter() - started)
        return result

    def _mode(self, requested: str) -> str:
        mode = requested or self.default_mode
        if mode not in RETRIEVAL_MODES:
            raise InvalidArgument("mode", f"expected one of {', '.join(RETRIEVAL_MODES)}, got {mode!r}")
        if mode != "dense" and self.index.sparse is None:
            raise InvalidArgument("mode", f"{mode!r} needs a BM25 side and index version {self.index.version} "
                                          "has none (built with index.sparse=false)")
        return mode

    def _check_knobs(self, knobs: SearchKnobs) -> None:
        for name, value, stored_as in (("nprobe", knobs.nprobe, "ivf_nprobe"),
                                       ("ef_search", knobs.ef_search, "hnsw_ef_search")):
            if not value:
                continue
            if not 0 < value <= MAX_KNOB:
                raise InvalidArgument(f"knobs.{name}", f"must be between 1 and {MAX_KNOB} (0: the index's own), "
                                                       f"got {value}")
            if stored_as not in self.index.search_knobs:
                raise InvalidArgument(f"knobs.{name}", f"index version {self.index.version} is of type "
                                                       f"{self.index.index_type!r}, which has no {name}")

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

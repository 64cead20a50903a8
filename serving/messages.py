"""Conversions between protobuf messages and the typed results (both directions, one place)."""

from __future__ import annotations

from serving.proto.towerline.v1 import retrieval_pb2 as pb
from serving.results import Hit, IndexInfo, Recommendation, RecommendedItem, SearchKnobs, SearchResult

MODE_TO_PROTO = {"": pb.RETRIEVAL_MODE_UNSPECIFIED, "dense": pb.RETRIEVAL_MODE_DENSE,
                 "sparse": pb.RETRIEVAL_MODE_SPARSE, "hybrid": pb.RETRIEVAL_MODE_HYBRID}
MODE_FROM_PROTO = {number: name for name, number in MODE_TO_PROTO.items()}


def mode_to_proto(mode: str) -> int:
    if mode not in MODE_TO_PROTO:
        raise ValueError(f"mode must be one of dense, sparse, hybrid or '' (the server's default), got {mode!r}")
    return MODE_TO_PROTO[mode]


def knobs_from_proto(knobs: pb.SearchKnobs) -> SearchKnobs:
    return SearchKnobs(nprobe=knobs.nprobe, ef_search=knobs.ef_search)


def knobs_to_proto(knobs: SearchKnobs | None) -> pb.SearchKnobs | None:
    return None if knobs is None else pb.SearchKnobs(nprobe=knobs.nprobe, ef_search=knobs.ef_search)


def mode_from_proto(number: int) -> str:
    """"" for UNSPECIFIED (the server's default); an unknown number (a newer client) is named as such."""
    return MODE_FROM_PROTO.get(number, f"unknown mode {number}")


def to_search_response(result: SearchResult) -> pb.SearchResponse:
    return pb.SearchResponse(
        hits=[pb.Hit(doc_id=hit.doc_id, score=hit.score, dense_score=hit.dense_score, sparse_score=hit.sparse_score,
                     title=hit.title, snippet=hit.snippet)
              for hit in result.hits],
        index_version=result.index_version,
        latency_ms=result.latency_ms,
        mode=MODE_TO_PROTO[result.mode],
    )


def from_search_response(response: pb.SearchResponse) -> SearchResult:
    return SearchResult(
        hits=[Hit(hit.doc_id, hit.score,
                  hit.dense_score if hit.HasField("dense_score") else None,
                  hit.sparse_score if hit.HasField("sparse_score") else None,
                  hit.title if hit.HasField("title") else None,
                  hit.snippet if hit.HasField("snippet") else None)
              for hit in response.hits],
        index_version=response.index_version,
        latency_ms=response.latency_ms,
        mode=mode_from_proto(response.mode),
    )


def to_index_info_response(info: IndexInfo) -> pb.GetIndexInfoResponse:
    return pb.GetIndexInfoResponse(**vars(info))


def from_index_info_response(response: pb.GetIndexInfoResponse) -> IndexInfo:
    return IndexInfo(
        index_kind=response.index_kind,
        index_type=response.index_type,
        count=response.count,
        dim=response.dim,
        embedding_space=response.embedding_space,
        encoder_name=response.encoder_name,
        index_fingerprint=response.index_fingerprint,
        index_version=response.index_version,
        metric=response.metric,
        sparse=response.sparse,
        default_mode=response.default_mode,
        fusion=response.fusion,
        dataset=response.dataset,
        dataset_fingerprint=response.dataset_fingerprint,
    )


def to_recommend_response(result: Recommendation, latency_ms: float) -> pb.RecommendResponse:
    return pb.RecommendResponse(
        items=[pb.RecommendedItem(item_id=item.item_id, score=item.score, title=item.title) for item in result.items],
        model_version=result.model_version,
        strategy=result.strategy,
        latency_ms=latency_ms,
    )


def from_recommend_response(response: pb.RecommendResponse) -> Recommendation:
    return Recommendation(
        items=[RecommendedItem(item.item_id, item.score, item.title) for item in response.items],
        strategy=response.strategy,
        model_version=response.model_version,
        latency_ms=response.latency_ms,
    )

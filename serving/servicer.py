"""Thin gRPC servicer: proto ↔ `RetrievalService`, errors ↔ status codes, execution slots.

Admission (how many calls may be in the server at once) is `serving.admission`'s; here at most
`max_executing` admitted calls run the encoder and the search at a time, the others wait for a slot
within their deadline (that wait is part of the latency a client sees).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from concurrent.futures import TimeoutError as FutureTimeout
from contextlib import contextmanager
from typing import Any, Protocol

import grpc

from serving.batcher import MicroBatcher, QueueFull
from serving.errors import DeadlineExceeded, InvalidArgument
from serving.messages import (
    knobs_from_proto,
    mode_from_proto,
    to_index_info_response,
    to_recommend_response,
    to_search_response,
)
from serving.proto.towerline.v1 import retrieval_pb2 as pb
from serving.proto.towerline.v1 import retrieval_pb2_grpc as pb_grpc
from serving.results import SearchResult
from serving.service import Checkpoint, RetrievalService

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["RetrievalService"].full_name


class RecommendBackend(Protocol):
    """What `Recommend` serves from (personalization.recommender.Recommender); a protocol, so that
    a retrieval-only server never imports the torch models behind it."""

    def recommend(self, user_id: str, recent_item_ids: list[str], top_k: int, checkpoint: Checkpoint) -> Any: ...


class RetrievalServicer(pb_grpc.RetrievalServiceServicer):
    def __init__(self, service: RetrievalService | None, max_executing: int,
                 recommender: RecommendBackend | None = None, max_top_k: int = 1000,
                 max_queue_wait_ms: float | None = None) -> None:
        # None: the server is up but has no index yet; retrieval calls answer UNAVAILABLE.
        self.service = service
        self.recommender = recommender
        self.max_top_k = max_top_k
        self.max_executing = max_executing
        self.max_queue_wait_s = None if max_queue_wait_ms is None else max_queue_wait_ms / 1000.0
        self._executing = threading.BoundedSemaphore(max_executing)
        # Set by the server when serve.batching is on: Search calls then go through it.
        self.batcher: MicroBatcher | None = None

    def Search(self, request: pb.SearchRequest, context: grpc.ServicerContext) -> pb.SearchResponse:
        if self.batcher is not None:
            return to_search_response(self._batched(request, context))
        with self._admitted(context) as service:
            if request.include_documents:
                service.check_documents()
            result = service.search(request.query, request.top_k, _deadline_checkpoint(context),
                                    mode_from_proto(request.mode), knobs_from_proto(request.knobs))
            if request.include_documents:
                result = service.with_documents([result])[0]
        return to_search_response(result)

    def swap(self, service: RetrievalService) -> None:
        """Serve `service` from the next call on (a reference assignment: atomic); calls in flight
        finish on the one they started with."""
        self.service = service
        if self.batcher is not None:
            self.batcher.service = service

    def _batched(self, request: pb.SearchRequest, context: grpc.ServicerContext) -> SearchResult:
        """Through the micro-batcher: the batcher thread encodes and searches, so no execution slot."""
        service, batcher = self._loaded(context), self.batcher
        assert batcher is not None
        with self._mapped_errors(context):
            knobs = knobs_from_proto(request.knobs)
            mode = service.check_search(request.query, request.top_k, mode_from_proto(request.mode), knobs)
            if request.include_documents:
                service.check_documents()
            future = batcher.submit(request.query, request.top_k, mode, _time_remaining(context), knobs)
            # A caller that goes away lets the batcher skip its request.
            context.add_callback(future.cancel)
            try:
                result = future.result(timeout=_time_remaining(context))
                return service.with_documents([result])[0] if request.include_documents else result
            except FutureTimeout:
                future.cancel()
                raise DeadlineExceeded("the deadline ran out while waiting for a batch") from None

    def BatchSearch(self, request: pb.BatchSearchRequest, context: grpc.ServicerContext) -> pb.BatchSearchResponse:
        with self._admitted(context) as service:
            if request.include_documents:
                service.check_documents()
            results = service.batch_search(list(request.queries), request.top_k, _deadline_checkpoint(context),
                                           mode_from_proto(request.mode), knobs_from_proto(request.knobs))
            if request.include_documents:
                results = service.with_documents(results)
        return pb.BatchSearchResponse(results=[to_search_response(result) for result in results])

    def GetIndexInfo(self, request: pb.GetIndexInfoRequest, context: grpc.ServicerContext) -> pb.GetIndexInfoResponse:
        return to_index_info_response(self._loaded(context).info())

    def Recommend(self, request: pb.RecommendRequest, context: grpc.ServicerContext) -> pb.RecommendResponse:
        recommender = self.recommender
        if recommender is None:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                          "this server holds no recommender (start it with `towerline serve --recommender DIR`)")
        assert recommender is not None
        started = time.perf_counter()
        with self._guarded(context):
            if not 1 <= request.top_k <= self.max_top_k:
                raise InvalidArgument("top_k", f"must be between 1 and {self.max_top_k} (serve.max_top_k), "
                                               f"got {request.top_k}")
            result = recommender.recommend(request.user_id, list(request.history_item_ids), request.top_k,
                                           _deadline_checkpoint(context))
        return to_recommend_response(result, latency_ms=(time.perf_counter() - started) * 1000)

    def _loaded(self, context: grpc.ServicerContext) -> RetrievalService:
        service = self.service
        if service is None:
            context.abort(grpc.StatusCode.UNAVAILABLE, "no index loaded on this server yet; retry later")
        assert service is not None
        return service

    @contextmanager
    def _admitted(self, context: grpc.ServicerContext) -> Iterator[RetrievalService]:
        service = self._loaded(context)
        with self._guarded(context):
            yield service

    @contextmanager
    def _guarded(self, context: grpc.ServicerContext) -> Iterator[None]:
        """Hold one of max_executing slots for the call, mapping service errors to codes."""
        remaining = _time_remaining(context)
        bound = self.max_queue_wait_s
        shed_first = bound is not None and (remaining is None or bound < remaining)
        wait = bound if shed_first else remaining
        if not self._executing.acquire(timeout=max(wait, 0.0) if wait is not None else None):
            if shed_first:
                context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                              f"server busy: no execution slot within {bound * 1000:g} ms "
                              "(serve.max_queue_wait_ms); retry with backoff or another replica")
            context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, "the deadline ran out while waiting to execute")
        try:
            with self._mapped_errors(context):
                yield
        finally:
            self._executing.release()

    @contextmanager
    def _mapped_errors(self, context: grpc.ServicerContext) -> Iterator[None]:
        try:
            yield
        except InvalidArgument as error:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(error))
        except DeadlineExceeded as error:
            context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, str(error))
        except QueueFull as full:
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"server busy: {full}; retry with backoff")
        except Exception:
            log.exception("retrieval call failed")
            context.abort(grpc.StatusCode.INTERNAL, "internal error while searching; see the server log")


def _deadline_checkpoint(context: grpc.ServicerContext) -> Checkpoint:
    def check() -> None:
        remaining = _time_remaining(context)
        if remaining is not None and remaining <= 0:
            raise DeadlineExceeded("the deadline ran out before the search finished")

    return check


# gRPC reports a call without a deadline as ~1e18 s remaining, which no timed wait accepts.
_NO_DEADLINE_S = 1e9


def _time_remaining(context: grpc.ServicerContext) -> float | None:
    """Seconds left before the call's deadline; None when the caller set none."""
    remaining = context.time_remaining()
    return None if remaining is None or remaining > _NO_DEADLINE_S else remaining

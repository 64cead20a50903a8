"""The one admission point of the retrieval service, and requests that cannot be decoded.

A gRPC server interceptor wraps every method of `towerline.v1.RetrievalService`:
- at most `serve.max_concurrent_rpcs` calls are admitted at once (executing or waiting for one of
  the `serve.max_workers` execution slots); one more is RESOURCE_EXHAUSTED at once, so the client
  can back off or try another replica;
- a request whose bytes do not decode (garbage, invalid UTF-8 in a string field) is
  INVALID_ARGUMENT naming the request, not gRPC's INTERNAL "Exception deserializing request".
Every call also gets a request id (serving.access_log), returned in its trailing metadata and, with
`serve.access_log`, logged with the call's method, status code and latency.
Health checks and reflection are never counted nor shed: a liveness probe must not restart a busy
pod. The server gives every admitted call a thread of its own plus spare threads for those, so the
bound here, not gRPC's thread pool queue, is what a burst meets.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import grpc

from serving.access_log import ACCESS_LOGGER, REQUEST_ID_KEY, current_request_id, request_id_from
from serving.metrics import ServingMetrics

access_log = logging.getLogger(ACCESS_LOGGER)

# Threads beyond the admitted calls: health checks, reflection and quick rejections always find one.
SPARE_THREADS = 4


class Undecodable:
    """What the wrapped deserializer hands over when the request bytes do not parse."""

    def __init__(self, problem: str) -> None:
        self.problem = problem


class AdmissionInterceptor(grpc.ServerInterceptor):
    def __init__(self, service_name: str, max_admitted: int, metrics: ServingMetrics | None = None,
                 log_calls: bool = False) -> None:
        self.prefix = f"/{service_name}/"
        self.max_admitted = max_admitted
        self.metrics = metrics
        self.log_calls = log_calls
        self._slots = threading.BoundedSemaphore(max_admitted)

    def intercept_service(self, continuation: Callable[[Any], Any], details: grpc.HandlerCallDetails) -> Any:
        handler = continuation(details)
        if handler is None or not details.method.startswith(self.prefix) or handler.unary_unary is None:
            return handler
        behaviour = _observed(self._admitted(handler.unary_unary), details.method.rsplit("/", 1)[-1], self.metrics,
                              self.log_calls)
        return grpc.unary_unary_rpc_method_handler(
            behaviour,
            request_deserializer=_tolerant(handler.request_deserializer),
            response_serializer=handler.response_serializer,
        )

    def _admitted(self, behaviour: Callable[[Any, grpc.ServicerContext], Any]) -> Callable[..., Any]:
        def admitted(request: Any, context: grpc.ServicerContext) -> Any:
            if isinstance(request, Undecodable):
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"request: {request.problem}")
            # Acquired and released in this frame: a call cancelled before it ran never holds a slot.
            if not self._slots.acquire(blocking=False):
                context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                              f"server busy: {self.max_admitted} retrieval calls admitted "
                              "(serve.max_concurrent_rpcs); retry with backoff or another replica")
            if self.metrics is not None:
                self.metrics.admitted.inc()
            try:
                return behaviour(request, context)
            finally:
                self._slots.release()
                if self.metrics is not None:
                    self.metrics.admitted.dec()

        return admitted


def _observed(behaviour: Callable[..., Any], method: str, metrics: ServingMetrics | None,
              log_calls: bool) -> Callable[..., Any]:
    """The request id in and out; status code and latency into the metrics and the access log,
    rejections included."""

    def observed(request: Any, context: grpc.ServicerContext) -> Any:
        started = time.perf_counter()
        request_id = request_id_from(context.invocation_metadata())
        # Trailing metadata goes out with errors as well as answers.
        context.set_trailing_metadata(((REQUEST_ID_KEY, request_id),))
        token = current_request_id.set(request_id)
        code = "OK"
        try:
            return behaviour(request, context)
        except BaseException:
            # After context.abort the code is set on the context; anything else ends as UNKNOWN.
            status = context.code() if hasattr(context, "code") else None
            code = status.name if isinstance(status, grpc.StatusCode) else "UNKNOWN"
            raise
        finally:
            seconds = time.perf_counter() - started
            current_request_id.reset(token)
            if metrics is not None:
                metrics.requests.labels(method=method, code=code).inc()
                metrics.request_seconds.labels(method=method).observe(seconds)
            if log_calls:
                access_log.info("%s %s %.1f ms", method, code, seconds * 1000, extra={
                    "request_id": request_id, "method": method, "code": code,
                    "latency_ms": round(seconds * 1000, 3), "peer": context.peer()})

    return observed


def _tolerant(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    if deserializer is None:
        return None

    def deserialize(data: bytes) -> Any:
        try:
            return deserializer(data)
        except Exception as exc:  # protobuf's DecodeError, and whatever a parser raises on garbage
            return Undecodable(f"cannot be decoded as the method's message ({exc.__class__.__name__}: "
                               "invalid bytes, or invalid UTF-8 in a string field)")

    return deserialize

"""gRPC server: retrieval servicer + grpc.health.v1 + reflection, graceful stop on SIGTERM/SIGINT."""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

import faiss
import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from serving.admission import SPARE_THREADS, AdmissionInterceptor
from serving.batcher import MicroBatcher
from serving.metrics import ServingMetrics
from serving.proto.towerline.v1 import retrieval_pb2_grpc as pb_grpc
from serving.security import auth_interceptors, server_credentials
from serving.service import RetrievalService
from serving.servicer import SERVICE_NAME, RecommendBackend, RetrievalServicer
from towerline.config import ServeConfig
from towerline.errors import ConfigError
from towerline.progress import console

if TYPE_CHECKING:
    from serving.reload import Reloader

log = logging.getLogger(__name__)


def start_server(service: RetrievalService | None, serve: ServeConfig, recommender: RecommendBackend | None = None,
                 metrics: ServingMetrics | None = None) -> tuple[grpc.Server, int]:
    """Start serving on serve.host:serve.port (port 0: an ephemeral port); returns (server, port).
    With `metrics`, calls and stages are recorded there (expose them with metrics.serve_http)."""
    server, port, _, _ = _start(service, serve, recommender, metrics)
    return server, port


def serve_forever(
    service: RetrievalService | None,
    serve: ServeConfig,
    *,
    grace_s: float | None = None,
    stop: threading.Event | None = None,
    on_started: Callable[[int], None] | None = None,
    recommender: RecommendBackend | None = None,
    reloader: Reloader | None = None,
) -> None:
    """Serve until SIGTERM/SIGINT (or `stop` is set), swapping in what `reloader` finds (SIGHUP: look
    now); then health goes NOT_SERVING, new calls are
    still answered for serve.drain_delay_s (load balancers see the status and stop routing here),
    and in-flight calls get `grace_s` (default serve.shutdown_grace_s) to finish."""
    # Concurrency comes from the RPC worker threads; FAISS's own OpenMP threads would oversubscribe.
    faiss.omp_set_num_threads(serve.intra_op_threads)
    metrics = ServingMetrics() if serve.metrics_port is not None else None
    server, port, health_servicer, servicer = _start(service, serve, recommender, metrics)
    if metrics is not None and serve.metrics_port is not None:
        metrics_port = metrics.serve_http(serve.host, serve.metrics_port)
        console.print(f"Prometheus metrics on [bold]http://{serve.host}:{metrics_port}/metrics[/]")
    stop = stop or threading.Event()
    previous_handlers = _install_signal_handlers(stop, reloader.wake if reloader is not None else None)
    if reloader is not None:
        reloader.on_swap = lambda new: install_service(servicer, health_servicer, new, serve, metrics)
        threading.Thread(target=reloader.run, args=(stop,), name="towerline-reload", daemon=True).start()
    try:
        if on_started:
            on_started(port)
        log.info("serving %s on %s:%d", SERVICE_NAME, serve.host, port)
        while not stop.wait(0.5):
            pass
    finally:
        # NOT_SERVING first, so load balancers stop routing here while in-flight calls finish.
        health_servicer.enter_graceful_shutdown()
        if serve.drain_delay_s > 0:
            log.info("NOT_SERVING; answering calls for %.1f s more before stopping", serve.drain_delay_s)
            time.sleep(serve.drain_delay_s)
        server.stop(serve.shutdown_grace_s if grace_s is None else grace_s).wait()
        if servicer.batcher is not None:
            servicer.batcher.stop()
        if metrics is not None:
            metrics.close()
        for signum, handler in previous_handlers.items():
            signal.signal(signum, handler)
        log.info("server stopped")


def _start(service: RetrievalService | None, serve: ServeConfig, recommender: RecommendBackend | None = None,
           metrics: ServingMetrics | None = None) -> tuple[grpc.Server, int, health.HealthServicer, RetrievalServicer]:
    # A thread per admitted call plus spares: calls past the admission bound are refused by the
    # interceptor at once, and health checks never queue behind them (serving.admission).
    server = grpc.server(
        ThreadPoolExecutor(max_workers=serve.max_concurrent_rpcs + SPARE_THREADS, thread_name_prefix="towerline-rpc"),
        # Auth first: an unauthenticated call never takes an admission slot.
        interceptors=[*auth_interceptors(serve),
                      AdmissionInterceptor(SERVICE_NAME, serve.max_concurrent_rpcs, metrics, serve.access_log)],
    )
    servicer = RetrievalServicer(service, serve.max_workers, recommender, serve.max_top_k, serve.max_queue_wait_ms)
    health_servicer = health.HealthServicer()
    if service is not None:
        install_service(servicer, health_servicer, service, serve, metrics)
    else:
        for name in ("", SERVICE_NAME):
            health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    pb_grpc.add_RetrievalServiceServicer_to_server(servicer, server)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
        server,
    )
    address = f"{serve.host}:{serve.port}"
    credentials = server_credentials(serve)
    try:
        port = (server.add_secure_port(address, credentials) if credentials is not None
                else server.add_insecure_port(address))
    except RuntimeError as exc:
        raise ConfigError(f"cannot bind {address} ({exc}); is the port in use?") from None
    if port == 0:
        raise ConfigError(f"cannot bind {address}; is the port in use?")
    server.start()
    return server, port, health_servicer, servicer


def install_service(servicer: RetrievalServicer, health_servicer: health.HealthServicer, service: RetrievalService,
                    serve: ServeConfig, metrics: ServingMetrics | None) -> None:
    """Make `service` the one answering (at start, and on every hot reload) and report SERVING."""
    if metrics is not None:
        service.observer = metrics
        info = service.info()
        metrics.index.clear()
        metrics.index.labels(version=info.index_version, embedding_space=info.embedding_space[:12],
                             sparse=str(info.sparse).lower()).set(1)
    if serve.batching and servicer.batcher is None:
        servicer.batcher = MicroBatcher(service, serve.batch_max_size, serve.batch_max_wait_ms, serve.batch_queue,
                                        metrics, workers=serve.max_workers, length_buckets=serve.batch_length_buckets,
                                        max_queue_wait_ms=serve.max_queue_wait_ms)
    servicer.swap(service)
    for name in ("", SERVICE_NAME):
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)


def _install_signal_handlers(stop: threading.Event, reload_now: threading.Event | None) -> dict[int, object]:
    # Python only lets the main thread install handlers; elsewhere the caller stops via `stop`.
    if threading.current_thread() is not threading.main_thread():
        return {}
    previous: dict[int, object] = {}
    for signum in (signal.SIGTERM, signal.SIGINT):
        previous[signum] = signal.getsignal(signum)
        signal.signal(signum, lambda *_: stop.set())
    if reload_now is not None:
        previous[signal.SIGHUP] = signal.getsignal(signal.SIGHUP)
        signal.signal(signal.SIGHUP, lambda *_: reload_now.set())
    return previous

"""Prometheus metrics of one server process, on their own HTTP port (`serve.metrics_port`).

Each server gets its own registry (several servers may share a process, as in tests), with:
requests by method and status code; end-to-end request latency (admission to answer, so the queue
wait is in it); the time of each stage (`queue_wait`, `encode`, `dense_search`, `sparse_search`,
`fuse`); micro-batch sizes; calls admitted now and the batcher's queue depth; and the index version
served, as an info-style gauge.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

# Seconds: from sub-millisecond BM25 lookups to multi-second CPU encodes of long batches.
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class ServingMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("towerline_requests", "Retrieval-service calls by method and status code",
                                ["method", "code"], registry=self.registry)
        self.request_seconds = Histogram("towerline_request_seconds", "Call latency from admission to answer",
                                         ["method"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.stage_seconds = Histogram("towerline_stage_seconds", "Time per serving stage", ["stage"],
                                       buckets=LATENCY_BUCKETS, registry=self.registry)
        self.batch_size = Histogram("towerline_batch_size", "Queries per encoder call", buckets=BATCH_BUCKETS,
                                    registry=self.registry)
        self.admitted = Gauge("towerline_admitted_calls", "Retrieval calls admitted now", registry=self.registry)
        self.queue_depth = Gauge("towerline_batch_queue_depth", "Searches waiting for a micro-batch",
                                 registry=self.registry)
        self.index = Gauge("towerline_index_info", "The index version served (value 1)",
                           ["version", "embedding_space", "sparse"], registry=self.registry)

    def stage(self, name: str, seconds: float) -> None:
        self.stage_seconds.labels(stage=name).observe(seconds)

    def batch(self, size: int) -> None:
        self.batch_size.observe(size)

    def serve_http(self, host: str, port: int) -> int:
        """Expose /metrics on host:port (0: an ephemeral port); returns the bound port."""
        server, _ = start_http_server(port, addr=host, registry=self.registry)
        self._http = server
        return int(server.server_port)

    def close(self) -> None:
        http = getattr(self, "_http", None)
        if http is not None:
            http.shutdown()
            http.server_close()

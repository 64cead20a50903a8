"""Closed-loop load: N client threads issue a fixed number of calls; latency percentiles and QPS."""

from __future__ import annotations

import statistics
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager
from typing import Any

from evaluation.latency import percentile

# Opens one thread's client and yields its call(i) function (i: the request's number).
CallerFactory = Callable[[], AbstractContextManager[Callable[[int], Any]]]


def run_load(open_caller: CallerFactory, requests: int, concurrency: int) -> dict[str, Any]:
    """`requests` calls split over `concurrency` threads, each with its own client; bounded, self-stopping.
    A call that fails with a RetrievalRpcError (e.g. shed: RESOURCE_EXHAUSTED) is counted by code in
    `errors`; QPS and the latency percentiles are of the calls answered."""
    from serving.errors import RetrievalRpcError

    latencies_ms: list[float] = []
    errors: Counter[str] = Counter()
    lock = threading.Lock()
    per_worker = max(1, requests // concurrency)

    def worker(offset: int) -> None:
        with open_caller() as call:
            for i in range(per_worker):
                started = time.perf_counter()
                try:
                    call(offset + i)
                except RetrievalRpcError as error:
                    with lock:
                        errors[error.code] += 1
                    continue
                elapsed = (time.perf_counter() - started) * 1000
                with lock:
                    latencies_ms.append(elapsed)

    started = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(worker, [n * per_worker for n in range(concurrency)]))
    wall = time.perf_counter() - started
    ordered = sorted(latencies_ms)
    if not ordered:
        return {"requests": 0, "concurrency": concurrency, "qps": 0.0, "errors": dict(errors)}
    return {
        "requests": len(ordered),
        "errors": dict(errors),
        "concurrency": concurrency,
        "qps": len(ordered) / wall,
        "latency_ms_p50": percentile(ordered, 0.50),
        "latency_ms_p95": percentile(ordered, 0.95),
        "latency_ms_p99": percentile(ordered, 0.99),
        "latency_ms_mean": statistics.fmean(ordered),
    }



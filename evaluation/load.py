"""Closed-loop async load: `concurrency` callers on one event loop, bounded by a request count or a
duration; latency percentiles and QPS.

One thread drives every caller (grpc.aio), so the load generator's own cost stays small and flat as
the concurrency grows — client threads would compete for the GIL and the cores with what they
measure. A call that fails with an RPC error (e.g. shed: RESOURCE_EXHAUSTED) is counted by status
code, never fatal.
"""

from __future__ import annotations

import asyncio
import itertools
import statistics
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from typing import Any

from evaluation.latency import percentile

# Opens the client (e.g. one grpc.aio channel) and yields its call(i) coroutine function
# (i: the request's number, to pick its input).
AsyncCallerFactory = Callable[[], AbstractAsyncContextManager[Callable[[int], Awaitable[Any]]]]


def run_load(open_caller: AsyncCallerFactory, concurrency: int, *, requests: int | None = None,
             duration_s: float | None = None) -> dict[str, Any]:
    """Keep `concurrency` calls in flight until `requests` calls were issued or `duration_s` passed
    (whichever is set; both: the first reached). QPS and percentiles are of the calls answered."""
    if requests is None and duration_s is None:
        raise ValueError("run_load: give requests, duration_s or both")
    return asyncio.run(_drive(open_caller, concurrency, requests, duration_s))


async def _drive(open_caller: AsyncCallerFactory, concurrency: int, requests: int | None,
                 duration_s: float | None) -> dict[str, Any]:
    import grpc

    latencies_ms: list[float] = []
    errors: Counter[str] = Counter()
    numbers = itertools.count()

    async with open_caller() as call:
        started = time.perf_counter()
        stop_at = None if duration_s is None else started + duration_s

        async def caller() -> None:
            for number in numbers:
                if (requests is not None and number >= requests) or (stop_at and time.perf_counter() >= stop_at):
                    return
                sent = time.perf_counter()
                try:
                    await call(number)
                except grpc.RpcError as error:
                    errors[error.code().name] += 1
                    continue
                latencies_ms.append((time.perf_counter() - sent) * 1000)

        await asyncio.gather(*(caller() for _ in range(concurrency)))
        wall = time.perf_counter() - started
    ordered = sorted(latencies_ms)
    if not ordered:
        return {"requests": 0, "concurrency": concurrency, "qps": 0.0, "errors": dict(errors)}
    return {
        "requests": len(ordered),
        "errors": dict(errors),
        "concurrency": concurrency,
        "seconds": wall,
        "qps": len(ordered) / wall,
        "latency_ms_p50": percentile(ordered, 0.50),
        "latency_ms_p95": percentile(ordered, 0.95),
        "latency_ms_p99": percentile(ordered, 0.99),
        "latency_ms_mean": statistics.fmean(ordered),
    }


def grpc_caller(address: str, make_call: Callable[[Any, int], Awaitable[Any]]) -> AsyncCallerFactory:
    """A caller factory over one grpc.aio channel to `address`: make_call(stub, i) issues call i on
    the RetrievalService stub."""
    from contextlib import asynccontextmanager

    import grpc

    from serving.proto.towerline.v1 import retrieval_pb2_grpc as pb_grpc

    @asynccontextmanager
    async def open_caller() -> Any:
        async with grpc.aio.insecure_channel(address) as channel:
            stub = pb_grpc.RetrievalServiceStub(channel)
            yield lambda number: make_call(stub, number)

    return open_caller

"""Dynamic micro-batching: concurrent single-query `Search` calls share one encoder call and one
index search.

A caller's request (already validated) joins a bounded queue and waits on a future. When one of
`serve.max_workers` batch workers is free, the batcher thread takes the first waiting request,
gathers more for at most `serve.batch_max_wait_ms` or until `serve.batch_max_size`, and hands the
batch to that worker: so under load, batches grow while every worker is busy, and on a multi-core
CPU several batches encode at once (one batcher thread alone would use one core). The worker drops
requests whose deadline has passed or whose caller gave up (before any encoding) and runs each
(top_k, mode, length bucket) group as one batch: `serve.batch_length_buckets` (upper bounds in
characters) keeps short queries from being padded to a long one's length. A full queue is refused
at once (RESOURCE_EXHAUSTED). The latency a result reports includes its time in the queue.
"""

from __future__ import annotations

import bisect
import queue
import threading
import time
from collections import defaultdict
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace

from serving.errors import DeadlineExceeded
from serving.metrics import ServingMetrics
from serving.results import SearchKnobs, SearchResult
from serving.service import DEFAULT_KNOBS, RetrievalService


class QueueFull(Exception):
    """The batcher's queue holds serve.batch_queue requests already, or a request waited in it
    longer than serve.max_queue_wait_ms: either way the caller is told to back off."""


@dataclass
class Waiting:
    query: str
    top_k: int
    mode: str
    knobs: SearchKnobs
    deadline: float | None  # time.monotonic() seconds; None: no deadline
    enqueued: float = field(default_factory=time.monotonic)
    future: Future[SearchResult] = field(default_factory=Future)


class MicroBatcher:
    def __init__(self, service: RetrievalService, max_size: int, max_wait_ms: float, queue_bound: int,
                 metrics: ServingMetrics | None = None, workers: int = 1, length_buckets: Sequence[int] = (),
                 max_queue_wait_ms: float | None = None) -> None:
        # Replaced by a hot reload (serving.reload); a batch runs on the service it started with.
        self.service = service
        self.metrics = metrics
        self.max_size = max_size
        self.max_wait_s = max_wait_ms / 1000.0
        self.length_buckets = sorted(length_buckets)
        self.max_queue_wait_s = None if max_queue_wait_ms is None else max_queue_wait_ms / 1000.0
        self.queue: queue.Queue[Waiting] = queue.Queue(maxsize=queue_bound)
        self._workers = ThreadPoolExecutor(workers, thread_name_prefix="towerline-batch")
        self._free_workers = threading.Semaphore(workers)
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="towerline-batcher", daemon=True)
        self._thread.start()

    def submit(self, query: str, top_k: int, mode: str, timeout_s: float | None,
               knobs: SearchKnobs = DEFAULT_KNOBS) -> Future[SearchResult]:
        waiting = Waiting(query, top_k, mode, knobs, None if timeout_s is None else time.monotonic() + timeout_s)
        try:
            self.queue.put_nowait(waiting)
        except queue.Full:
            raise QueueFull(f"{self.queue.maxsize} searches already queued (serve.batch_queue)") from None
        if self.metrics is not None:
            self.metrics.queue_depth.set(self.queue.qsize())
        return waiting.future

    def stop(self) -> None:
        self._stopped.set()
        self._thread.join(timeout=5)
        self._workers.shutdown(wait=True)

    def _loop(self) -> None:
        while not self._stopped.is_set():
            # Gather only when a worker can take the batch: meanwhile requests pile up into a bigger one.
            if not self._free_workers.acquire(timeout=0.1):
                continue
            try:
                first = self.queue.get(timeout=0.1)
            except queue.Empty:
                self._free_workers.release()
                continue
            self._workers.submit(self._run_then_free, self._gather(first))

    def _run_then_free(self, batch: list[Waiting]) -> None:
        try:
            self._run(batch)
        finally:
            self._free_workers.release()

    def _bucket(self, query: str) -> int:
        return bisect.bisect_left(self.length_buckets, len(query))

    def _gather(self, first: Waiting) -> list[Waiting]:
        batch = [first]
        until = time.monotonic() + self.max_wait_s
        while len(batch) < self.max_size:
            remaining = until - time.monotonic()
            try:
                batch.append(self.queue.get(timeout=remaining) if remaining > 0 else self.queue.get_nowait())
            except queue.Empty:
                break
        return batch

    def _run(self, batch: list[Waiting]) -> None:
        now = time.monotonic()
        groups: dict[tuple[int, str, SearchKnobs, int], list[Waiting]] = defaultdict(list)
        for waiting in batch:
            if not waiting.future.set_running_or_notify_cancel():
                continue  # the caller gave up (cancelled): never encoded
            if waiting.deadline is not None and waiting.deadline <= now:
                waiting.future.set_exception(DeadlineExceeded("the deadline ran out while queued for a batch"))
                continue
            if self.max_queue_wait_s is not None and now - waiting.enqueued > self.max_queue_wait_s:
                waiting.future.set_exception(QueueFull(
                    f"queued for a batch longer than {self.max_queue_wait_s * 1000:g} ms (serve.max_queue_wait_ms)"))
                continue
            groups[(waiting.top_k, waiting.mode, waiting.knobs, self._bucket(waiting.query))].append(waiting)
            if self.metrics is not None:
                self.metrics.stage("queue_wait", now - waiting.enqueued)
        if self.metrics is not None:
            self.metrics.queue_depth.set(self.queue.qsize())
        service = self.service
        for (top_k, mode, knobs, _), members in groups.items():
            try:
                results = service.run_checked([member.query for member in members], top_k, mode, knobs)
            except Exception as exc:  # every caller of the batch gets the error; the batcher goes on
                for member in members:
                    member.future.set_exception(exc)
                continue
            done = time.monotonic()
            for member, result in zip(members, results, strict=True):
                member.future.set_result(replace(result, latency_ms=(done - member.enqueued) * 1000.0))

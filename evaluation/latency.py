"""Query-encoder speed, measured the same way everywhere (demo table, `towerline bench ...`)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np

# Wall time of every search / Recommend call an evaluation made: `eval compare` draws its histograms.
LATENCY_FILE = "latency.json"


def encoder_throughput(encoder: Any, texts: list[str], batch_size: int) -> float:
    """Texts per second for `encoder.encode` over `texts` in batches of `batch_size` (after a warm-up)."""
    encoder.encode(texts[:batch_size])
    started = time.perf_counter()
    for start in range(0, len(texts), batch_size):
        encoder.encode(texts[start : start + batch_size])
    return len(texts) / (time.perf_counter() - started)


def write_call_latencies(directory: Path, calls_ms: list[float], batch_size: int) -> None:
    (directory / LATENCY_FILE).write_text(json.dumps({"batch_size": batch_size, "calls_ms": calls_ms}))


def read_call_latencies(directory: Path) -> list[float]:
    """The calls' times an evaluation report kept; none for a report made before they were kept."""
    path = directory / LATENCY_FILE
    return json.loads(path.read_text())["calls_ms"] if path.is_file() else []


def call_percentiles(values: list[float]) -> dict[str, float]:
    """Count and p50/p95/p99 of per-call times in ms (numpy's linear interpolation)."""
    array = np.asarray(values, dtype=np.float64)
    if not len(array):
        return {"calls": 0}
    return {"calls": len(array), "p50": float(np.percentile(array, 50)), "p95": float(np.percentile(array, 95)),
            "p99": float(np.percentile(array, 99))}


def percentile(sorted_values: list[float], fraction: float) -> float:
    index = min(len(sorted_values) - 1, round(fraction * (len(sorted_values) - 1)))
    return sorted_values[index]


def encoder_latency(encoder: Any, texts: list[str]) -> dict[str, float]:
    """One query at a time (what an online caller waits for): p50/p95 in ms; and batch-32 throughput."""
    encoder.encode(texts[:1])
    latencies_ms = []
    for text in texts:
        started = time.perf_counter()
        encoder.encode([text])
        latencies_ms.append((time.perf_counter() - started) * 1000)
    ordered = sorted(latencies_ms)
    return {
        "p50_ms_batch1": percentile(ordered, 0.50),
        "p95_ms_batch1": percentile(ordered, 0.95),
        "texts_per_s_batch32": encoder_throughput(encoder, texts, 32),
    }


def search_latency(search: Any, texts: list[str]) -> dict[str, float]:
    """End-to-end `search(text)` calls one at a time (e.g. gRPC Search): p50/p95 in ms."""
    search(texts[0])
    latencies_ms = []
    for text in texts:
        started = time.perf_counter()
        search(text)
        latencies_ms.append((time.perf_counter() - started) * 1000)
    ordered = sorted(latencies_ms)
    return {"search_p50_ms": percentile(ordered, 0.50), "search_p95_ms": percentile(ordered, 0.95)}

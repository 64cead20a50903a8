"""`towerline bench serve`: the retrieval service under load, against its ceiling and a naive baseline.

In one run, on the same machine (ratios are what to read; absolute numbers move with its load):
- query encoders: PyTorch vs ONNX Runtime texts/s at batch 1 and 32, one intra-op thread;
- the ceiling: the ONNX encoder alone with every core, at its best batch size;
- a naive baseline: one request at a time, in-process PyTorch encode + FAISS search, no batching;
- gRPC `Search` on loopback against a `towerline serve` process of its own, at several client
  concurrencies, unbatched and micro-batched (`serve.batching`), and hybrid beside dense at
  `--concurrency`; the load comes from an async generator (evaluation.load) in this process, and calls
  shed with RESOURCE_EXHAUSTED are counted, never fatal.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from benchmarks.serve_process import ServeProcess
from evaluation.latency import encoder_throughput
from evaluation.load import grpc_caller, run_load
from towerline.beir import load_dataset
from towerline.config import ServeConfig, TowerlineConfig
from towerline.progress import console, status
from towerline.results import result_header, write_results

CONCURRENCIES = (1, 8, 32, 64)
CEILING_BATCHES = (1, 8, 32, 64)
# Length buckets (characters) of the bucketed row when the config sets none: SciFact's test queries
# are 43–204 characters long, median 82.
BENCH_BUCKETS = [64, 96, 128]


def _grpc_load(address: str, texts: list[str], requests: int, concurrency: int, top_k: int,
               mode: str = "") -> dict[str, float]:
    """`requests` Search calls with `concurrency` in flight, in retrieval `mode`."""
    from serving.messages import mode_to_proto
    from serving.proto.towerline.v1 import retrieval_pb2 as pb

    def search(stub: Any, number: int) -> Any:
        return stub.Search(pb.SearchRequest(query=texts[number % len(texts)], top_k=top_k, mode=mode_to_proto(mode)),
                           timeout=30)

    return run_load(grpc_caller(address, search), concurrency, requests=requests)


@contextmanager
def _served(config: TowerlineConfig, index_path: Path, onnx_path: Path, serve: ServeConfig) -> Iterator[str]:
    """`towerline serve` in a process of its own, as a deployment runs it; stopped with SIGTERM."""
    with ServeProcess(config, index_path, onnx_path, serve.model_copy(update={"reload_interval_s": 0})) as server:
        yield server.address


def _queue_bound_target(sweep: dict[str, dict[str, dict[str, Any]]], serve: ServeConfig) -> dict[str, Any]:
    """At the highest concurrency every call is served or shed, and the slowest served ones wait at
    most serve.max_queue_wait_ms: p99 within the bound plus the p99 of a call that never waits (c=1)."""
    top = str(max(int(level) for level in sweep["dense"]))
    if "1" not in sweep["dense"] or serve.max_queue_wait_ms is None:
        return {}
    within = {name: levels[top]["latency_ms_p99"] <= serve.max_queue_wait_ms + levels["1"]["latency_ms_p99"]
              for name, levels in sweep.items() if top in levels and "1" in levels}
    return {"max_queue_wait_ms": serve.max_queue_wait_ms, f"p99_at_{top}_within_queue_bound": within}


def run_serve_bench(
    config: TowerlineConfig,
    index_path: Path,
    onnx_path: Path,
    encoder_path: Path,
    results_path: Path,
    *,
    requests: int,
    concurrency: int,
    concurrencies: tuple[int, ...] = CONCURRENCIES,
) -> dict[str, Any]:
    from indexing.load import load_index
    from serving.onnx_encoder import OnnxQueryEncoder
    from serving.torch_encoder import TorchQueryEncoder

    dataset = load_dataset(config.data, [config.eval.split])
    texts = [dataset.queries[qid] for qid in dataset.split(config.eval.split)]
    threads = config.serve.intra_op_threads
    with status("measuring query-encoder throughput (PyTorch vs ONNX Runtime)"):
        torch_encoder = TorchQueryEncoder.from_dual_encoder(encoder_path, threads=threads)
        onnx_encoder = OnnxQueryEncoder(onnx_path, intra_op_threads=threads)
        encoders: dict[str, dict[str, float]] = {}
        for batch_size in (1, 32):
            torch_rate = encoder_throughput(torch_encoder, texts, batch_size)
            onnx_rate = encoder_throughput(onnx_encoder, texts, batch_size)
            encoders[f"batch_{batch_size}"] = {
                "torch_texts_per_s": torch_rate,
                "onnx_texts_per_s": onnx_rate,
                "onnx_over_torch": onnx_rate / torch_rate,
            }
    with status("the ceiling: the ONNX encoder alone, every core, best batch size"):
        cores = os.cpu_count() or 1
        all_cores = OnnxQueryEncoder(onnx_path, intra_op_threads=cores)
        by_batch = {str(size): encoder_throughput(all_cores, texts, size) for size in CEILING_BATCHES}
        best = max(by_batch, key=lambda size: by_batch[size])
        ceiling = {"cores": cores, "texts_per_s_by_batch": by_batch, "best_batch": int(best),
                   "texts_per_s": by_batch[best]}
    with status("the naive baseline: one request at a time, PyTorch encode + FAISS search in-process"):
        index = load_index(index_path, config.index)
        started = time.perf_counter()
        for text in texts:
            index.search(torch_encoder.encode([text]), 10)
        naive = {"qps": len(texts) / (time.perf_counter() - started), "requests": len(texts)}

    serve_config = config.serve.model_copy(update={"host": "127.0.0.1", "port": 0})
    batching = serve_config.model_copy(update={"batching": True})
    bucketed = batching.model_copy(update={"batch_length_buckets": batching.batch_length_buckets or BENCH_BUCKETS})
    sweep: dict[str, dict[str, dict[str, float]]] = {"dense": {}, "dense_batched": {}, "dense_batched_bucketed": {}}
    hybrid = None
    with _served(config, index_path, onnx_path, serve_config) as address:
        from serving.client import RetrievalClient

        with RetrievalClient(address) as client:
            fusion = client.info().fusion
        for level in concurrencies:
            with status(f"gRPC load, dense: {requests} Search calls from {level} callers in flight"):
                sweep["dense"][str(level)] = _grpc_load(address, texts, requests, level, 10, "dense")
        with status(f"gRPC load, hybrid: {requests} Search calls from {concurrency} callers in flight"):
            try:
                hybrid = _grpc_load(address, texts, requests, concurrency, 10, "hybrid")
            except Exception as exc:  # an index without a BM25 side: no hybrid row
                console.print(f"[yellow]no hybrid row: {exc}")
        with status(f"gRPC load, dense: {requests} Search calls from {concurrency} callers in flight"):
            dense_here = _grpc_load(address, texts, requests, concurrency, 10, "dense")
    for name, settings in (("dense_batched", batching), ("dense_batched_bucketed", bucketed)):
        with _served(config, index_path, onnx_path, settings) as address:
            for level in concurrencies:
                with status(f"gRPC load, {name}: {requests} calls from {level} callers in flight"):
                    sweep[name][str(level)] = _grpc_load(address, texts, requests, level, 10, "dense")

    best_32 = max(sweep[name].get("32", {}).get("qps", 0.0) for name in sweep)
    summary = {
        **result_header("serve"),
        "dataset": dataset.files.identity(),
        "queries": len(texts),
        "intra_op_threads": threads,
        "onnx_provider": onnx_encoder.provider,
        "query_encoder": encoders,
        "encoder_ceiling": ceiling,
        "naive_baseline": naive,
        "grpc_search_by_concurrency": sweep,
        "micro_batching": {"batch_max_size": batching.batch_max_size, "batch_max_wait_ms": batching.batch_max_wait_ms,
                           "workers": batching.max_workers, "length_buckets": bucketed.batch_length_buckets},
        "concurrency": concurrency,
        "grpc_search": dense_here,
        "grpc_search_hybrid": hybrid,
        "hybrid_qps_over_dense": hybrid["qps"] / dense_here["qps"] if hybrid else None,
        "fusion": fusion,
        "targets": {
            "qps_at_32_over_ceiling": best_32 / ceiling["texts_per_s"] if best_32 else None,
            "qps_at_32_over_naive": best_32 / naive["qps"] if best_32 else None,
            **_queue_bound_target(sweep, serve_config),
        },
    }
    write_results(results_path, summary)
    console.print_json(data={key: summary[key] for key in ("encoder_ceiling", "naive_baseline", "grpc_search",
                                                           "grpc_search_hybrid", "targets")})
    return summary

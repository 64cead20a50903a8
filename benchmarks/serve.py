"""`towerline bench serve`: query-encoder throughput (PyTorch vs ONNX Runtime) and gRPC latency,
dense-only and (when the index version has a BM25 side) hybrid, at the same concurrency.

Every figure is measured in the same run on the same machine, so the ratios are what to read;
absolute numbers move with the machine's load.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from evaluation.latency import encoder_throughput
from evaluation.load import run_load
from towerline.beir import load_dataset
from towerline.config import TowerlineConfig
from towerline.progress import console, status
from towerline.results import result_header, write_results


def _grpc_load(address: str, texts: list[str], requests: int, concurrency: int, top_k: int,
               mode: str = "") -> dict[str, float]:
    """`requests` Search calls from `concurrency` client threads, in retrieval `mode`."""
    from serving.client import RetrievalClient

    @contextmanager
    def open_caller() -> Iterator[Any]:
        with RetrievalClient(address, timeout_s=30) as client:
            yield lambda i: client.search(texts[i % len(texts)], top_k, mode)

    return run_load(open_caller, requests, concurrency)


def run_serve_bench(
    config: TowerlineConfig,
    index_path: Path,
    onnx_path: Path,
    encoder_path: Path,
    results_path: Path,
    *,
    requests: int,
    concurrency: int,
) -> dict[str, Any]:
    from serving.app import build_service
    from serving.onnx_encoder import OnnxQueryEncoder
    from serving.server import start_server
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
    serve_config = config.serve.model_copy(update={"host": "127.0.0.1", "port": 0})
    service = build_service(config, index_path, onnx_path)
    modes = ("dense", "hybrid") if service.index.sparse is not None else ("dense",)
    server, port = start_server(service, serve_config)
    grpc_modes: dict[str, dict[str, float]] = {}
    try:
        for mode in modes:
            with status(f"gRPC load, {mode}: {requests} Search calls from {concurrency} client threads"):
                grpc_modes[mode] = _grpc_load(f"127.0.0.1:{port}", texts, requests, concurrency, 10, mode)
    finally:
        server.stop(grace=2).wait()
    grpc_figures = grpc_modes["dense"]
    hybrid = grpc_modes.get("hybrid")
    # The same dense load through the micro-batcher (serve.batching), to choose its default here.
    batching = serve_config.model_copy(update={"batching": True})
    server, port = start_server(build_service(config, index_path, onnx_path), batching)
    try:
        with status(f"gRPC load, dense, micro-batched: {requests} Search calls from {concurrency} client threads"):
            batched = _grpc_load(f"127.0.0.1:{port}", texts, requests, concurrency, 10, "dense")
    finally:
        server.stop(grace=2).wait()
    summary = {
        **result_header("serve"),
        "dataset": dataset.files.identity(),
        "queries": len(texts),
        "intra_op_threads": threads,
        "onnx_provider": onnx_encoder.provider,
        "index": str(index_path),
        "query_encoder": encoders,
        "grpc_search": grpc_figures,
        "grpc_search_hybrid": hybrid,
        "fusion": service.info().fusion,
        "hybrid_qps_over_dense": hybrid["qps"] / grpc_figures["qps"] if hybrid else None,
        "grpc_search_batched": {**batched, "batch_max_size": batching.batch_max_size,
                                "batch_max_wait_ms": batching.batch_max_wait_ms},
        "batched_qps_over_dense": batched["qps"] / grpc_figures["qps"],
    }
    write_results(results_path, summary)
    console.print_json(data={"query_encoder": encoders, "grpc_search": grpc_figures, "grpc_search_hybrid": hybrid})
    return summary

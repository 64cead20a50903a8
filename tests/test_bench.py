"""`towerline bench serve` on tiny artifacts: it runs, bounds its load and writes its JSON."""

from __future__ import annotations

import json
from pathlib import Path

from benchmarks.serve import run_serve_bench
from indexing.build import build_index
from serving.onnx_export import run_export
from towerline.config import TowerlineConfig
from training.run import init_dual_encoder


def test_serve_bench_writes_its_results(tiny_config: TowerlineConfig, tmp_path: Path) -> None:
    init_dual_encoder(tiny_config, tmp_path / "encoder")
    run_export(tiny_config, tmp_path / "encoder", tmp_path / "onnx")
    build_index(tiny_config, tmp_path / "encoder", tmp_path / "index")
    results = tmp_path / "serve.json"
    summary = run_serve_bench(
        tiny_config, tmp_path / "index", tmp_path / "onnx", tmp_path / "encoder", results,
        requests=20, concurrency=2,
    )
    assert json.loads(results.read_text()) == summary
    assert summary["grpc_search"]["requests"] == 20
    latencies = summary["grpc_search"]
    assert 0 < latencies["latency_ms_p50"] <= latencies["latency_ms_p95"] <= latencies["latency_ms_p99"]
    for figures in summary["query_encoder"].values():
        assert figures["onnx_texts_per_s"] > 0 and figures["torch_texts_per_s"] > 0

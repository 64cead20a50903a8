"""Offline evaluation: in-process from artifacts and through a live gRPC server give the same scores."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from indexing.build import build_index
from serving.app import build_service
from serving.onnx_export import run_export
from serving.server import start_server
from towerline.cli import app
from towerline.config import TowerlineConfig
from training.run import init_dual_encoder

runner = CliRunner()


def test_eval_in_process_equals_eval_through_grpc(tiny_config: TowerlineConfig, tmp_path: Path) -> None:
    init_dual_encoder(tiny_config, tmp_path / "encoder")
    run_export(tiny_config, tmp_path / "encoder", tmp_path / "onnx")
    build_index(tiny_config, tmp_path / "encoder", tmp_path / "index")
    overrides = [f"data.dir={tiny_config.data.dir}", "eval.top_k=20", f"tracking.uri={tiny_config.tracking.uri}"]

    offline = runner.invoke(app, ["eval", "--index", str(tmp_path / "index"), "--encoder", str(tmp_path / "onnx"),
                                  "--out", str(tmp_path / "offline"), *overrides])
    assert offline.exit_code == 0, offline.output
    serve_config = tiny_config.serve.model_copy(update={"port": 0})
    server, port = start_server(build_service(tiny_config, tmp_path / "index", tmp_path / "onnx"), serve_config)
    try:
        live = runner.invoke(app, ["eval", "--address", f"127.0.0.1:{port}", "--out", str(tmp_path / "live"),
                                   *overrides])
        found = runner.invoke(app, ["search", "alpha beta", "--address", f"127.0.0.1:{port}", "-k", "3",
                                    f"data.dir={tiny_config.data.dir}"])
    finally:
        server.stop(grace=1).wait()
    assert live.exit_code == 0, live.output
    assert found.exit_code == 0, found.output
    assert sum(line.startswith(("  1  ", "  2  ", "  3  ")) for line in found.output.splitlines()) == 3

    # Every mode of the index version (dense, BM25, hybrid) scores the same in-process and through gRPC.
    for mode in ("dense", "sparse", "hybrid"):
        offline_metrics = json.loads((tmp_path / "offline" / mode / "metrics.json").read_text())
        live_metrics = json.loads((tmp_path / "live" / mode / "metrics.json").read_text())
        assert offline_metrics == live_metrics, mode
        assert live_metrics["queries"] == 20
        live_run = (tmp_path / "live" / mode / "run.trec").read_text()
        assert live_run == (tmp_path / "offline" / mode / "run.trec").read_text(), mode
    assert "hybrid" in live.output and "sparse" in live.output
    dense_run = (tmp_path / "live" / "dense" / "run.trec").read_text()
    assert dense_run != (tmp_path / "live" / "hybrid" / "run.trec").read_text()

"""ONNX export of the query tower: parity with PyTorch, the artifact, and refusals."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from serving.onnx_encoder import OnnxQueryEncoder
from serving.onnx_export import run_export
from towerline.config import TowerlineConfig
from towerline.errors import ArtifactError
from towerline.towers import load_towers
from training.run import init_dual_encoder


def test_export_matches_pytorch_and_carries_the_embedding_space(tiny_config: TowerlineConfig, tmp_path: Path) -> None:
    encoder_manifest = init_dual_encoder(tiny_config, tmp_path / "encoder")
    manifest = run_export(tiny_config, tmp_path / "encoder", tmp_path / "onnx")
    assert manifest.kind == "onnx-query-encoder"
    assert manifest.metadata["embedding_space"] == encoder_manifest.metadata["embedding_space"]
    assert manifest.metadata["parity_max_abs_diff"] < tiny_config.export.parity_atol
    onnx_encoder = OnnxQueryEncoder(tmp_path / "onnx")
    query_tower = load_towers(tmp_path / "encoder")[0]
    texts = ["one", "a query of several words", "x " * 40]  # the last one is truncated
    assert np.abs(onnx_encoder.encode(texts) - query_tower.encode(texts)).max() < 1e-4


def test_failed_parity_writes_nothing(tiny_config: TowerlineConfig, tmp_path: Path) -> None:
    init_dual_encoder(tiny_config, tmp_path / "encoder")
    config = tiny_config.model_copy(deep=True)
    config.export.parity_atol = 1e-12
    with pytest.raises(ArtifactError, match="parity check failed"):
        run_export(config, tmp_path / "encoder", tmp_path / "onnx")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["encoder"]


def test_export_refuses_a_non_encoder(tiny_config: TowerlineConfig, tmp_path: Path) -> None:
    init_dual_encoder(tiny_config, tmp_path / "encoder")
    run_export(tiny_config, tmp_path / "encoder", tmp_path / "onnx")
    with pytest.raises(ArtifactError, match="expected 'dual-encoder'"):
        run_export(tiny_config, tmp_path / "onnx", tmp_path / "again")


def test_a_decoder_llm_tower_exports_with_last_token_pooling(
    tiny_config: TowerlineConfig, tiny_decoder: Path, tmp_path: Path
) -> None:
    config = tiny_config.model_copy(deep=True)
    config.encoder.backbone = str(tiny_decoder)
    config.encoder.pooling = "last_token"
    init_dual_encoder(config, tmp_path / "encoder")
    manifest = run_export(config, tmp_path / "encoder", tmp_path / "onnx")
    assert manifest.metadata["parity_max_abs_diff"] < config.export.parity_atol
    texts = ["one", "a query of several words", "x " * 40]  # the last one is truncated and keeps its EOS
    onnx_encoder = OnnxQueryEncoder(tmp_path / "onnx")
    assert np.abs(onnx_encoder.encode(texts) - load_towers(tmp_path / "encoder")[0].encode(texts)).max() < 1e-4


def test_optimised_and_int8_graphs_are_parity_checked_and_scored(
    tiny_config: TowerlineConfig, tmp_path: Path
) -> None:
    from indexing.build import build_index

    config = tiny_config.model_copy(deep=True)
    config.export.optimize = True
    config.export.quantize = "int8"
    init_dual_encoder(config, tmp_path / "encoder")
    build_index(config, tmp_path / "encoder", tmp_path / "index")
    manifest = run_export(config, tmp_path / "encoder", tmp_path / "onnx", index_path=tmp_path / "index")
    variants = manifest.metadata["variants"]
    assert list(variants) == ["fp32", "optimized", "int8"] and manifest.metadata["graph"] == "int8"
    assert variants["optimized"]["max_abs_diff"] < config.export.parity_atol
    assert variants["int8"]["min_cosine"] >= config.export.int8_min_cosine
    assert all(0.0 <= variant["ndcg@10"] <= 1.0 for variant in variants.values())
    assert sorted(p.name for p in (tmp_path / "onnx").glob("*.onnx")) == ["model.onnx"]  # only the served graph
    int8_encoder = OnnxQueryEncoder(tmp_path / "onnx")
    fp32 = load_towers(tmp_path / "encoder")[0].encode(["one query", "another query"])
    cosine = (int8_encoder.encode(["one query", "another query"]) * fp32).sum(axis=1)
    assert cosine.min() >= config.export.int8_min_cosine

    strict = config.model_copy(deep=True)
    strict.export.int8_min_cosine = 1.0
    with pytest.raises(ArtifactError, match="int8 graph"):
        run_export(strict, tmp_path / "encoder", tmp_path / "strict")
    assert not (tmp_path / "strict").exists()


# What a serving-only install (`pip install ".[serve]"`) leaves out; the service must never import them.
NOT_IN_THE_SERVING_INSTALL = ("torch", "pyspark", "mlflow", "peft", "sentence_transformers", "sklearn", "pandas",
                              "pyarrow", "onnx", "onnxscript", "pytrec_eval")


def test_towerline_serve_runs_without_the_training_stack(tiny_config: TowerlineConfig, tmp_path: Path) -> None:
    """`towerline serve` on an ONNX encoder + index, with torch, Spark, MLflow & co. made unimportable,
    answers a search over a real channel and stops on SIGTERM."""
    import os
    import re
    import signal
    import subprocess
    import sys

    from indexing.build import build_index
    from serving.client import RetrievalClient

    init_dual_encoder(tiny_config, tmp_path / "encoder")
    run_export(tiny_config, tmp_path / "encoder", tmp_path / "onnx")
    build_index(tiny_config, tmp_path / "encoder", tmp_path / "index")
    launcher = (f"import sys\nfor name in {NOT_IN_THE_SERVING_INSTALL!r}:\n    sys.modules[name] = None\n"
                "from towerline.cli import main\nsys.argv = ['towerline', *sys.argv[1:]]\nmain()\n")
    server = subprocess.Popen(
        [sys.executable, "-c", launcher, "serve", "--index", str(tmp_path / "index"), "--onnx", str(tmp_path / "onnx"),
         "serve.host=127.0.0.1", "serve.port=0"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**os.environ, "COLUMNS": "200"},
    )
    output: list[str] = []
    try:
        assert server.stdout is not None
        for line in server.stdout:
            output.append(line)
            if found := re.search(r"RetrievalService on 127\.0\.0\.1:(\d+)", line):
                break
        else:
            pytest.fail("the server stopped before serving:\n" + "".join(output))
        with RetrievalClient(f"127.0.0.1:{found.group(1)}", timeout_s=30) as client:
            hits = client.search("a query about topics", top_k=3)
        assert len(hits) == 3
        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=60) == 0, "".join(output) + server.stdout.read()
    finally:
        if server.poll() is None:
            server.kill()

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

"""Evaluate a retrieval service: a live one through its gRPC API, or one built in-process from artifacts."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

from evaluation.run import evaluate
from serving.client import RetrievalClient
from towerline.config import TowerlineConfig


def evaluate_service(config: TowerlineConfig, address: str, output: Path) -> dict[str, float]:
    with RetrievalClient(address) as client:
        client.wait_ready(timeout=30)
        info = client.info()
        metrics, _ = evaluate(config, client.batch_search, output,
                              target={"address": address, "service": asdict(info)})
    return metrics


def evaluate_artifacts(config: TowerlineConfig, index_path: Path, encoder_path: Path, output: Path) -> dict[str, float]:
    """Score an index + query encoder without a server: the same service code, called in-process."""
    from serving.app import build_service

    service = build_service(config, index_path, encoder_path)

    def batch_search(queries: list[str], top_k: int) -> list[list[tuple[str, float]]]:
        return [list(result.hits) for result in service.batch_search(queries, top_k)]

    metrics, _ = evaluate(config, batch_search, output,
                          target={"index": str(index_path), "encoder": str(encoder_path),
                                  "service": asdict(service.info())})
    return metrics

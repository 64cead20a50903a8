"""Evaluate a live retrieval service through its gRPC API."""

from __future__ import annotations

from pathlib import Path

from evaluation.run import evaluate
from serving.client import RetrievalClient
from towerline.config import TowerlineConfig


def evaluate_service(config: TowerlineConfig, address: str, output: Path) -> dict[str, float]:
    with RetrievalClient(address) as client:
        client.wait_ready(timeout=30)
        info = client.info()
        metrics, _ = evaluate(
            config,
            client.batch_search,
            output,
            target={"address": address, "service": info},
        )
    return metrics

"""Evaluate a retrieval service: a live one through its gRPC API, or one built in-process from artifacts,
in one retrieval mode ("dense", "sparse", "hybrid"; "" = the service's default)."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

from evaluation.judged import JudgedQueries
from evaluation.run import evaluate
from serving.client import ClientTls, RetrievalClient
from serving.results import RETRIEVAL_MODES
from towerline.config import TowerlineConfig


def evaluate_service(config: TowerlineConfig, address: str, output: Path, mode: str = "", *,
                     token: str | None = None, tls: ClientTls | None = None, force: bool = False,
                     judged: JudgedQueries | None = None) -> dict[str, float]:
    with RetrievalClient(address, token=token, tls=tls) as client:
        client.wait_ready(timeout=30)
        info = client.info()

        def batch_search(queries: list[str], top_k: int) -> list[list[tuple[str, float]]]:
            return [[(hit.doc_id, hit.score) for hit in hits] for hits in client.batch_search(queries, top_k, mode)]

        metrics, _ = evaluate(config, batch_search, output,
                              target={"address": address, "mode": mode or info.default_mode,
                                      "service": asdict(info)}, force=force, judged=judged)
    return metrics


def evaluate_artifacts(config: TowerlineConfig, index_path: Path, encoder_path: Path, output: Path,
                       mode: str = "", *, force: bool = False, judged: JudgedQueries | None = None,
                       ) -> dict[str, float]:
    """Score an index + query encoder without a server: the same service code, called in-process."""
    from serving.app import build_service

    service = build_service(config, index_path, encoder_path)

    def batch_search(queries: list[str], top_k: int) -> list[list[tuple[str, float]]]:
        return [[(hit.doc_id, hit.score) for hit in result.hits]
                for result in service.batch_search(queries, top_k, mode=mode)]

    metrics, _ = evaluate(config, batch_search, output,
                          target={"index": str(index_path), "encoder": str(encoder_path),
                                  "mode": mode or service.default_mode, "service": asdict(service.info())},
                          force=force, judged=judged)
    return metrics


def modes_served(has_sparse: bool) -> tuple[str, ...]:
    """What `--mode all` scores: every mode the index version supports."""
    return RETRIEVAL_MODES if has_sparse else ("dense",)

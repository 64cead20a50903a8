"""`towerline rec eval`: score the whole Recommend pipeline (two-tower candidates → DIN re-rank) on
the test period, through a live gRPC service or in process from the artifacts.

The protocol is the candidate model's: every test user with a positively rated item they had not
seen before the test period; Recall@K and NDCG@10 of the items Recommend returns for the user id
alone. The recommender must answer from the state at the test period's start
(`serve.recommend_state=test-start`): with the latest histories the test items count as already
seen and are never recommended, so a service in that state is refused rather than scored.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd

from evaluation.latency import percentile, write_call_latencies
from evaluation.metrics import candidate_metrics
from evaluation.trec import write_trec_qrels, write_trec_run
from personalization.interactions import HistoryBeforeTest, load_ctr_data
from personalization.recommender import STATE_SUFFIX, Recommender, RecommenderPaths
from serving.results import Recommendation
from towerline.artifacts import ArtifactWriter, Manifest, read_manifest
from towerline.config import TowerlineConfig
from towerline.errors import ConfigError, DataError
from towerline.progress import progress_bar

REC_EVAL_KIND = "rec-eval-report"
QRELS_FILE = "qrels.trec"
# Items asked per user: Recall@50, as for the candidate model.
EVAL_DEPTH = 50
# (user id, top_k) -> the Recommend answer for that user with no extra recent items.
RecommendCall = Callable[[str, int], Recommendation]


def evaluate_recommend(config: TowerlineConfig, interactions: Path, recommend: RecommendCall, output: Path,
                       top_k: int, target: dict[str, Any]) -> tuple[dict[str, float], Manifest]:
    source = read_manifest(interactions, "interactions")
    qrels = liked_in_test_period(interactions)
    run: dict[str, dict[str, float]] = {}
    latencies_ms: list[float] = []
    strategies: dict[str, int] = {}
    with progress_bar("rec eval", len(qrels)) as bar:
        for user_id in qrels:
            started = time.perf_counter()
            answer = recommend(user_id, top_k)
            latencies_ms.append((time.perf_counter() - started) * 1000)
            if not answer.model_version.endswith(STATE_SUFFIX["test-start"]):
                raise ConfigError(
                    f"the recommender answers from the latest histories (model_version {answer.model_version!r}): "
                    "every test item counts as seen. Serve it with serve.recommend_state=test-start to evaluate")
            if not answer.model_version.startswith(source.fingerprint[:8]):
                raise ConfigError(f"the recommender was built from other interactions than {interactions} "
                                  f"(model_version {answer.model_version!r}, interactions {source.fingerprint[:8]})")
            strategies[answer.strategy] = strategies.get(answer.strategy, 0) + 1
            # Scores from different strategies are not comparable; the rank is what Recommend promises.
            run[user_id] = {item.item_id: float(top_k - rank) for rank, item in enumerate(answer.items)}
            bar.advance(0, 1)
    ordered = sorted(latencies_ms)
    metrics = {**candidate_metrics(qrels, run), "users": len(qrels),
               "latency_ms_p50": percentile(ordered, 0.50), "latency_ms_p99": percentile(ordered, 0.99)}
    with ArtifactWriter(output, REC_EVAL_KIND, producer="rec eval", inputs={"interactions": source},
                        config=config) as staged:
        (staged.path / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
        write_trec_run(staged.path / "run.trec", run)
        # What the run was scored against, and each call's time: `towerline rec compare` reads both.
        write_trec_qrels(staged.path / QRELS_FILE, qrels)
        write_call_latencies(staged.path, latencies_ms, batch_size=1)
        staged.metadata.update({"dataset": source.metadata.get("dataset"), "top_k": top_k, "target": target,
                                "strategies": strategies, **metrics})
    assert staged.manifest is not None
    return metrics, staged.manifest


def liked_in_test_period(interactions: Path) -> dict[str, dict[str, int]]:
    """{user id: {item id: 1}} for the items each user liked in the test period and had not seen before."""
    truth = HistoryBeforeTest.of(load_ctr_data(interactions, history_length=1))
    if not truth.relevant:
        raise DataError(f"{interactions}: no test user has a positive item not seen before the test period")
    users = pd.read_parquet(interactions / "users.parquet", columns=["user_index", "user_id"])
    items = pd.read_parquet(interactions / "items.parquet", columns=["item_index", "item_id"])
    user_ids = dict(zip(users["user_index"].tolist(), users["user_id"].tolist(), strict=True))
    item_ids = dict(zip(items["item_index"].tolist(), items["item_id"].tolist(), strict=True))
    return {user_ids[user]: {item_ids[item]: 1 for item in sorted(truth.relevant[user])}
            for user in sorted(truth.relevant)}


def evaluate_recommend_service(config: TowerlineConfig, address: str, interactions: Path, output: Path,
                               top_k: int) -> dict[str, float]:
    """Score the service at `address`; `interactions` is the artifact that service was built from."""
    from serving.client import RetrievalClient

    with RetrievalClient(address, timeout_s=30) as client:
        metrics, _ = evaluate_recommend(config, interactions, lambda user, k: client.recommend(user, top_k=k),
                                        output, top_k, target={"address": address})
    return metrics


def evaluate_recommend_artifacts(config: TowerlineConfig, root: Path, output: Path, top_k: int) -> dict[str, float]:
    """Score the rec artifacts under `root` in process: the service's own Recommender, replaying test-start."""
    paths = RecommenderPaths.under(root)
    recommender = Recommender(paths, config.index, threads=config.serve.intra_op_threads, state="test-start")
    metrics, _ = evaluate_recommend(config, paths.interactions,
                                    lambda user, k: recommender.recommend(user, [], k), output, top_k,
                                    target={"artifacts": str(root)})
    return metrics

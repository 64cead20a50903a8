"""`towerline bench rec`: the recommendation side on each dataset, mean ± std over seeds.

Per dataset (the synthetic default and, when present in the data dir, ML-100K):
- CTR on the test split (AUC, LogLoss, GAUC) of item popularity, logistic regression and DIN,
  each trained on the train split (DIN: early stopping on valid AUC);
- candidate generation on test users (Recall@50, NDCG@10) of the two-tower model vs most-popular,
  and of the whole Recommend pipeline (two-tower candidates re-ranked by DIN, `rec eval`'s protocol);
- `Recommend` through gRPC on loopback (seed 0's models): p50/p99 latency and QPS at concurrency 1 and 8.
"""

from __future__ import annotations

import os
import statistics
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from towerline.beir import DATA_DIR_ENV
from towerline.config import TowerlineConfig
from towerline.progress import console
from towerline.results import result_header, write_results
from towerline.tracking import Tracker

if TYPE_CHECKING:
    from personalization.recommender import RecommenderPaths

LOAD_REQUESTS = 400
CONCURRENCY = (1, 8)


def available_datasets(requested: list[str]) -> list[str]:
    """The requested datasets that can be read here (ML-100K only from $TOWERLINE_DATA_DIR)."""
    found = []
    for name in requested:
        if name == "synthetic" or Path(name).is_dir() or (
                os.environ.get(DATA_DIR_ENV) and (Path(os.environ[DATA_DIR_ENV]) / name).is_dir()):
            found.append(name)
        else:
            console.print(f"[yellow]skipping {name}: not a directory, nor under ${DATA_DIR_ENV}[/]")
    return found


def run_rec_bench(config: TowerlineConfig, datasets: list[str], seeds: list[int], root: Path,
                  results_path: Path) -> dict[str, Any]:
    started = time.perf_counter()
    tables = {name: _dataset_rows(config, name, seeds, root / Path(name).name) for name in available_datasets(datasets)}
    summary = {**result_header("rec"), "seeds": seeds, "datasets": tables,
               "total_seconds": round(time.perf_counter() - started, 1), "config": config.flat()}
    write_results(results_path, summary)
    console.print_json(data={name: {key: value for key, value in table.items() if key != "per_seed"}
                             for name, table in tables.items()})
    return summary


def _dataset_rows(config: TowerlineConfig, dataset: str, seeds: list[int], root: Path) -> dict[str, Any]:
    from personalization.crm_run import baseline_metrics
    from personalization.interactions import load_ctr_data
    from personalization.train_crm import train_din
    from personalization.two_tower_run import build_item_index, run_train_two_tower
    from pipelines.interactions import run_interactions
    from pipelines.spark import stop_spark

    variant = config.model_copy(deep=True)
    variant.rec.data.dataset = dataset
    console.rule(f"[bold]{dataset}")
    interactions = run_interactions(variant, root / "interactions")
    stop_spark(config.spark)
    data = load_ctr_data(root / "interactions", variant.rec.crm.history_length)
    per_seed: list[dict[str, Any]] = []
    for seed in seeds:
        seeded = variant.model_copy(deep=True)
        seeded.rec.two_tower.seed = seed
        paths = _seed_paths(root, seed)
        din = train_din(data, variant.rec.crm, paths.crm, seed=seed)
        two_tower = run_train_two_tower(seeded, paths.interactions, paths.two_tower, Tracker(None))
        build_item_index(variant, paths.two_tower, paths.item_index)
        pipeline = _recommend_quality(variant, paths, root / f"rec-eval-seed{seed}")
        per_seed.append({"seed": seed, "ctr": {**baseline_metrics(data, seed), "din": din.test},
                         "din_best_epoch": din.best_epoch,
                         "candidates": {**{name: two_tower.metadata[name] for name in ("two_tower", "most_popular")},
                                        "recommend_two_tower_din": pipeline}})
    return {
        "interactions": {key: interactions.metadata[key] for key in ("dataset", "users", "items", "samples",
                                                                     "splits", "label")},
        "ctr_test": _mean_std([row["ctr"] for row in per_seed]),
        "candidates_test": _mean_std([row["candidates"] for row in per_seed]),
        "recommend_grpc": _recommend_load(variant, root, seeds[0]),
        "per_seed": per_seed,
    }


def _mean_std(rows: list[dict[str, dict[str, float]]]) -> dict[str, dict[str, dict[str, float]]]:
    """{model: {metric: {"mean", "std"}}} over seeds (std 0.0 for a single seed)."""
    return {model: metric_mean_std([row[model] for row in rows]) for model in rows[0]}


def metric_mean_std(rows: list[dict[str, float | None]]) -> dict[str, dict[str, float]]:
    """{metric: {"mean", "std"}} over rows, None values left out (std 0.0 for a single value)."""
    table = {}
    for metric in rows[0]:
        values = [row[metric] for row in rows if row[metric] is not None]
        table[metric] = {"mean": statistics.fmean(values) if values else float("nan"),
                         "std": statistics.stdev(values) if len(values) > 1 else 0.0}
    return table


def _seed_paths(root: Path, seed: int) -> RecommenderPaths:
    from personalization.recommender import RecommenderPaths

    return RecommenderPaths(root / "interactions", root / f"two-tower-seed{seed}", root / f"crm-seed{seed}",
                            root / f"item-index-seed{seed}")


def _recommend_quality(config: TowerlineConfig, paths: RecommenderPaths, output: Path) -> dict[str, float]:
    """The whole Recommend pipeline (two-tower → DIN re-rank) in process, from the test period's start."""
    from evaluation.recommend import EVAL_DEPTH, evaluate_recommend
    from personalization.recommender import Recommender

    recommender = Recommender(paths, config.index, threads=config.serve.intra_op_threads, state="test-start")
    metrics, _ = evaluate_recommend(config, paths.interactions, lambda user, k: recommender.recommend(user, [], k),
                                    output, EVAL_DEPTH, target={"artifacts": "benchmark"})
    return {key: metrics[key] for key in ("recall@50", "ndcg@10")}


def _recommend_load(config: TowerlineConfig, root: Path, seed: int) -> dict[str, Any]:
    """Recommend for known users through gRPC on loopback, one intra-op thread per call."""
    from evaluation.load import grpc_caller, run_load
    from personalization.recommender import Recommender
    from serving.proto.towerline.v1 import retrieval_pb2 as pb
    from serving.server import start_server

    recommender = Recommender(_seed_paths(root, seed), config.index, threads=config.serve.intra_op_threads)
    users = sorted(recommender.user_indexes)
    server, port = start_server(None, config.serve.model_copy(update={"port": 0}), recommender)

    def recommend(stub: Any, number: int) -> Any:
        return stub.Recommend(pb.RecommendRequest(user_id=users[number % len(users)], top_k=10), timeout=30)

    try:
        return {f"concurrency_{concurrency}": run_load(grpc_caller(f"127.0.0.1:{port}", recommend), concurrency,
                                                       requests=LOAD_REQUESTS)
                for concurrency in CONCURRENCY}
    finally:
        server.stop(None).wait()

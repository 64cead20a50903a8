"""`towerline rec demo`: the recommendation side end to end on the synthetic default (or any
rec.data.dataset): interactions (Spark) → DIN + baselines → two-tower → item index → `Recommend`
over gRPC on loopback, ending with a few example recommendations."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.table import Table

from towerline.config import TowerlineConfig
from towerline.progress import console
from towerline.tracking import Tracker, track

if TYPE_CHECKING:
    from personalization.recommender import Recommender, RecommendState
    from serving.results import Recommendation

EXAMPLE_USERS = 3


# `rec demo --reclora` trains on this much unless rec.reclora.* says otherwise: minutes on a 2-core CPU.
DEMO_RECLORA = {"train_samples": 512, "eval_samples": 256, "prompt_history": 3, "max_prompt_tokens": 96}


def run_rec_demo(config: TowerlineConfig, reclora: bool = False) -> dict[str, Any]:
    from personalization.crm_run import run_train_crm
    from personalization.two_tower_run import build_item_index, run_train_two_tower
    from pipelines.interactions import run_interactions
    from pipelines.spark import stop_spark

    root = config.run_dir / "rec-demo"
    started = time.perf_counter()
    seconds: dict[str, float] = {}
    with track(config, "rec-demo") as tracker:
        def stage(name: str, work: Any) -> Any:
            console.rule(f"[bold]{name}")
            begun = time.perf_counter()
            result = work()
            seconds[name] = round(time.perf_counter() - begun, 1)
            return result

        data = stage("rec data", lambda: run_interactions(config, root / "interactions"))
        stop_spark(config.spark)
        crm = stage("train-crm", lambda: run_train_crm(config, root / "interactions", root / "crm", tracker))
        two_tower = stage("train-twotower", lambda: run_train_two_tower(config, root / "interactions",
                                                                          root / "two-tower", tracker))
        stage("index", lambda: build_item_index(config, root / "two-tower", root / "item-index"))
        if reclora:
            stage("train-reclora", lambda: _train_reclora(config, root, tracker))
        pipeline = stage("rec eval (gRPC)", lambda: _evaluate_over_grpc(config, root, reclora))
        tracker.metrics({f"rec_eval.{key}": value for key, value in pipeline.items()})
        examples = stage("recommend (gRPC)", lambda: _examples_over_grpc(config, root, reclora))
    stages = "two-tower → DIN → RecLoRA" if reclora else "two-tower → DIN"
    _print_tables(data.metadata, crm.metadata, two_tower.metadata, (stages, pipeline), examples)
    total = round(time.perf_counter() - started, 1)
    console.print(f"rec demo done in {total:.0f} s; artifacts under [bold]{root}[/] "
                  f"(serve them with `towerline serve --recommender {root}`)")
    return {"seconds": seconds, "total_seconds": total}


def _train_reclora(config: TowerlineConfig, root: Path, tracker: Tracker) -> None:
    from personalization.reclora_run import run_train_reclora

    chosen = config.rec.reclora
    demo_sized = {key: value for key, value in DEMO_RECLORA.items() if key not in chosen.model_fields_set}
    sized = config.model_copy(deep=True)
    sized.rec.reclora = chosen.model_copy(update=demo_sized)
    run_train_reclora(sized, root / "interactions", root / "crm", root / "reclora", tracker)


@contextmanager
def _serving(config: TowerlineConfig, root: Path, state: RecommendState, with_reclora: bool
             ) -> Iterator[tuple[Recommender, str]]:
    """A Recommend server on a free loopback port over the artifacts under `root`."""
    from personalization.recommender import Recommender, RecommenderPaths
    from serving.server import start_server

    paths = RecommenderPaths.under(root)
    if not with_reclora:  # a reclora/ left by an earlier `--reclora` run was gated by an earlier CRM
        paths = dataclasses.replace(paths, reclora=None)
    recommender = Recommender(paths, config.index, threads=config.serve.intra_op_threads, state=state,
                              reclora_top_n=config.rec.reclora.rerank_top_n)
    server, port = start_server(None, config.serve.model_copy(update={"port": 0}), recommender)
    try:
        yield recommender, f"127.0.0.1:{port}"
    finally:
        server.stop(None).wait()


def _evaluate_over_grpc(config: TowerlineConfig, root: Path, with_reclora: bool) -> dict[str, float]:
    """`rec eval` against a server replaying the test period's start."""
    from evaluation.recommend import EVAL_DEPTH, evaluate_recommend_service

    with _serving(config, root, "test-start", with_reclora) as (_, address):
        return evaluate_recommend_service(config, address, root / "interactions", root / "rec-eval", EVAL_DEPTH)


def _examples_over_grpc(config: TowerlineConfig, root: Path, with_reclora: bool
                        ) -> list[tuple[str, list[str], Recommendation]]:
    from serving.client import RetrievalClient

    with (_serving(config, root, "latest", with_reclora) as (recommender, address),
          RetrievalClient(address, timeout_s=30) as client):
        users = sorted(recommender.user_indexes, key=lambda user: -len(recommender.histories.get(
            recommender.user_indexes[user], [])))[:EXAMPLE_USERS]
        examples = []
        for user in [*users, ""]:
            history = [recommender.titles[item] for item in
                       recommender.histories.get(recommender.user_indexes.get(user, 0), [])[-3:]]
            examples.append((user or "(new user, no history)", history, client.recommend(user, top_k=5)))
        return examples


def _print_tables(data: dict[str, Any], crm: dict[str, Any], two_tower: dict[str, Any],
                  pipeline: tuple[str, dict[str, float]],
                  examples: list[tuple[str, list[str], Recommendation]]) -> None:
    quality = Table(title=f"{data['dataset']['name']}: {data['users']} users, {data['items']} items, "
                          f"{data['samples']} interactions; test split")
    for column in ("model", "AUC", "LogLoss", "GAUC"):
        quality.add_column(column, justify="left" if column == "model" else "right")
    for name, metrics in (*crm["baselines"].items(), ("din", crm["din"]["test"])):
        quality.add_row(name, *(f"{metrics[key]:.4f}" if metrics[key] is not None else "—"
                                for key in ("auc", "logloss", "gauc")))
    console.print(quality)
    candidates = Table(title=f"candidates for {two_tower['test_users']} test users")
    for column in ("model", "Recall@50", "NDCG@10"):
        candidates.add_column(column, justify="left" if column == "model" else "right")
    for name in ("two_tower", "most_popular"):
        candidates.add_row(name, f"{two_tower[name]['recall@50']:.4f}", f"{two_tower[name]['ndcg@10']:.4f}")
    stages, metrics = pipeline
    candidates.add_row(f"Recommend ({stages}), gRPC", f"{metrics['recall@50']:.4f}",
                       f"{metrics['ndcg@10']:.4f}")
    console.print(candidates)
    for user, history, response in examples:
        table = Table(title=f"Recommend {user} — {response.strategy}, {response.latency_ms:.1f} ms"
                            + (f"; recently: {'; '.join(history)}" if history else ""))
        for column in ("item", "title", "score"):
            table.add_column(column, justify="right" if column == "score" else "left")
        for item in response.items:
            table.add_row(item.item_id, item.title, f"{item.score:.3f}")
        console.print(table)

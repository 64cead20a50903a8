"""`towerline demo`: chain every stage on the bundled dataset and compare zero-shot vs fine-tuned.

The demo only wires stage functions together; each stage is also its own command. Both models
are measured the same way: ONNX query encoder + FAISS index behind a real gRPC server on
loopback, scored by the offline evaluation client.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from rich.table import Table

from towerline.beir import resolve_dataset_dir
from towerline.config import TowerlineConfig
from towerline.progress import console
from towerline.results import result_header, write_results
from towerline.tracking import Tracker, track

T = TypeVar("T")


class StageClock:
    def __init__(self, config: TowerlineConfig) -> None:
        self.config = config
        self.seconds: dict[str, float] = {}

    def run(self, name: str, stage: Callable[[Tracker], T]) -> T:
        """Run one stage in a nested MLflow run and record its wall time."""
        console.rule(f"[bold]{name}")
        started = time.perf_counter()
        with track(self.config, name, nested=True) as tracker:
            result = stage(tracker)
            elapsed = time.perf_counter() - started
            tracker.metrics({"stage.seconds": elapsed})
        self.seconds[name] = round(elapsed, 2)
        return result


@contextmanager
def loopback_service(config: TowerlineConfig, index_dir: Path, onnx_dir: Path) -> Iterator[str]:
    """Start the gRPC service on an ephemeral loopback port; yields its address."""
    from serving.app import build_service
    from serving.server import start_server

    serve_config = config.serve.model_copy(update={"host": "127.0.0.1", "port": 0})
    server, port = start_server(build_service(config, index_dir, onnx_dir), serve_config)
    try:
        yield f"127.0.0.1:{port}"
    finally:
        server.stop(grace=2).wait()


def run_demo(config: TowerlineConfig, results_path: Path) -> dict[str, Any]:
    from evaluation.service import evaluate_service
    from indexing.build import build_index
    from pipelines.pairs import run_pairs
    from pipelines.spark import stop_spark
    from serving.onnx_export import run_export
    from training.run import init_dual_encoder, run_train

    dataset_dir = resolve_dataset_dir(config.data)  # fail on a bad data dir before any work
    root = config.run_dir / "demo"
    clock = StageClock(config)
    started = time.perf_counter()
    scores: dict[str, dict[str, float]] = {}
    with track(config, "demo") as parent:
        clock.run("pairs", lambda t: run_pairs(config, root / "pairs"))
        stop_spark()
        clock.run("train.zero_shot", lambda t: init_dual_encoder(config, root / "encoder-zero-shot"))
        clock.run("train", lambda t: run_train(config, root / "pairs", root / "encoder", t))
        for label, encoder_dir in (("zero_shot", root / "encoder-zero-shot"), ("fine_tuned", root / "encoder")):
            onnx_dir, index_dir = root / f"onnx-{label}", root / f"index-{label}"
            clock.run(f"export.{label}", lambda t, e=encoder_dir, o=onnx_dir: run_export(config, e, o, t))
            clock.run(f"index.{label}", lambda t, e=encoder_dir, i=index_dir: build_index(config, e, i))

            def serve_and_score(tracker: Tracker, i: Path = index_dir, o: Path = onnx_dir,
                                name: str = label) -> dict[str, float]:
                with loopback_service(config, i, o) as address:
                    metrics = evaluate_service(config, address, root / f"eval-{name}")
                    if name == "fine_tuned":
                        _example_search(config, dataset_dir, address)
                tracker.metrics({f"eval.{k}": v for k, v in metrics.items()})
                return metrics

            scores[label] = clock.run(f"eval.{label}", serve_and_score)
        summary = _summary(config, dataset_dir, scores, clock.seconds, time.perf_counter() - started)
        summary["mlflow_run_id"] = parent.run_id
        parent.metrics({f"{label}.{k}": v for label, m in scores.items() for k, v in m.items()})
    _print_table(scores)
    write_results(results_path, summary)
    console.print(f"results written to [bold]{results_path}[/]; artifacts under [bold]{root}[/]")
    return summary


def _example_search(config: TowerlineConfig, dataset_dir: Path, address: str, examples: int = 3) -> None:
    """End on what a user of the service sees: the first test queries, their top hits through gRPC,
    with the judged-relevant documents marked."""
    from serving.client import RetrievalClient
    from towerline.beir import load_corpus, load_qrels, load_queries
    from towerline.display import print_hits

    qrels = load_qrels(dataset_dir, config.eval.split)
    queries, corpus = load_queries(dataset_dir), load_corpus(dataset_dir)
    console.print(f"[bold]Example searches through gRPC[/] (✓ = judged relevant in qrels/{config.eval.split})")
    with RetrievalClient(address) as client:
        for query_id in list(qrels)[:examples]:
            relevant = {doc_id for doc_id, grade in qrels[query_id].items() if grade > 0}
            print_hits(queries[query_id], client.search(queries[query_id], 5), corpus, relevant)


def _summary(config: TowerlineConfig, dataset_dir: Path, scores: dict[str, dict[str, float]],
             stage_seconds: dict[str, float], total_seconds: float) -> dict[str, Any]:
    return {
        **result_header("demo"),
        "dataset": str(dataset_dir),
        "split": config.eval.split,
        "backbone": config.encoder.backbone,
        "measured_through": "gRPC (ONNX Runtime query encoder + FAISS) on loopback",
        "zero_shot": scores["zero_shot"],
        "fine_tuned": scores["fine_tuned"],
        "ndcg@10_gain": scores["fine_tuned"]["ndcg@10"] - scores["zero_shot"]["ndcg@10"],
        "fine_tuned_beats_zero_shot": scores["fine_tuned"]["ndcg@10"] > scores["zero_shot"]["ndcg@10"],
        "stage_seconds": stage_seconds,
        "total_seconds": round(total_seconds, 2),
        "config": config.flat(),
    }


def _print_table(scores: dict[str, dict[str, float]]) -> None:
    table = Table(title="SciFact-style evaluation through gRPC")
    table.add_column("model")
    for metric in ("ndcg@10", "recall@100", "mrr@10"):
        table.add_column(metric, justify="right")
    for label, metrics in scores.items():
        table.add_row(label.replace("_", "-"), *(f"{metrics[m]:.4f}" for m in ("ndcg@10", "recall@100", "mrr@10")))
    console.print(table)

"""`towerline demo`: chain every stage on a BEIR dataset and compare zero-shot vs fine-tuned.

The demo only wires stage functions together; each stage is also its own command. It starts with
the dataset check, so a bad dataset fails in seconds. A dataset without train qrels is evaluated
zero-shot only, unless `--split-test-queries` asks for a seeded split of the eval queries. Every
model is measured the same way: ONNX query encoder + FAISS index behind a real gRPC server on
loopback, scored by the offline evaluation client.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from rich.table import Table

from towerline.beir import QRELS_DIR, BeirDataset, load_dataset, positives
from towerline.config import TowerlineConfig
from towerline.datacheck import DatasetReport, check_dataset, print_report
from towerline.errors import DataError
from towerline.progress import console
from towerline.results import result_header, write_results
from towerline.splits import split_eval_queries, split_summary
from towerline.tracking import Tracker, register_index, track

T = TypeVar("T")
# Single-query gRPC Search calls timed per demo row (the first N eval queries).
LATENCY_QUERIES = 100
# A dataset without train qrels: zero-shot dense, BM25 and their (untuned, default) fusion.
_ROWS_ZERO_SHOT_ONLY = {"zero_shot": "dense", "bm25": "sparse", "zero_shot_hybrid": "hybrid"}


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


def run_demo(
    config: TowerlineConfig, results_path: Path, *, split_test_queries: float | None = None, split_seed: int = 13
) -> dict[str, Any]:
    from distill.run import run_distill
    from evaluation.compare import compare_to_report
    from evaluation.fusion_tuning import tune_fusion
    from indexing.build import build_index
    from pipelines.pairs import run_pairs
    from pipelines.pseudo_queries import run_pseudo_queries
    from pipelines.spark import stop_spark
    from serving.onnx_export import run_export
    from training.run import init_dual_encoder, run_train

    report = check_demo_dataset(config)  # a bad dataset fails here, in seconds, before any work
    root = config.run_dir / "demo"
    clock = StageClock(config)
    started = time.perf_counter()
    scores: dict[str, dict[str, float]] = {}
    with track(config, "demo") as parent:
        config, protocol = _training_plan(config, report, clock, root, split_test_queries, split_seed)
        evaluated = load_dataset(config.data, [config.eval.split])  # read once: latency texts, example searches
        fine_tunes = protocol["fine_tunes"]
        if fine_tunes:
            clock.run("pairs", lambda t: run_pairs(config, root / "pairs"))
            clock.run("pseudo_queries", lambda t: run_pseudo_queries(config, root / "pseudo-queries"))
            stop_spark(config.spark)
        # label -> (artifact holding the query tower, the dual encoder whose doc tower built the index)
        models = {"zero_shot": (root / "encoder-zero-shot", "zero_shot")}
        clock.run("train.zero_shot", lambda t: init_dual_encoder(config, models["zero_shot"][0]))
        if fine_tunes:
            models["fine_tuned"] = (root / "encoder", "fine_tuned")
            clock.run("train", lambda t: run_train(config, root / "pairs", root / "encoder", t))
            # ScalingNote stage 2: only the query tower shrinks; the fine-tuned index is reused as it is.
            models["distilled"] = (root / "student", "fine_tuned")
        # The rows each model's service is scored on: row label -> retrieval mode.
        rows = {"zero_shot": {"zero_shot": "dense"} if fine_tunes else _ROWS_ZERO_SHOT_ONLY,
                "fine_tuned": {"fine_tuned": "dense", "bm25": "sparse", "hybrid": "hybrid"},
                "distilled": {"distilled": "dense", "distilled_hybrid": "hybrid"}}
        fusion: dict[str, Any] | None = None
        for label, (encoder_dir, index_label) in models.items():
            onnx_dir, index_dir = root / f"onnx-{label}", root / f"index-{index_label}"
            if label == "distilled":
                clock.run("distill", lambda t, i=index_dir, e=encoder_dir: run_distill(
                    config, root / "encoder", i, e, t, pseudo_queries=root / "pseudo-queries"))
            clock.run(f"export.{label}", lambda t, e=encoder_dir, o=onnx_dir: run_export(config, e, o, t))
            if index_label == label:
                # Registered like `towerline index build` does, so `promote` and `serve --onnx models:/...`
                # work on the demo's artifacts.
                clock.run(f"index.{label}", lambda t, e=encoder_dir, i=index_dir: register_index(
                    t, config, i, build_index(config, e, i), e))
            if label == "fine_tuned" and config.index.sparse:
                # Hybrid fusion chosen on the train queries the fine-tune held out (never on test).
                fusion = clock.run("tune_fusion", lambda t, i=index_dir, o=onnx_dir: tune_fusion(config, i, o))
            wanted = {row: mode for row, mode in rows[label].items() if mode == "dense" or config.index.sparse}
            scores.update(clock.run(
                f"eval.{label}",
                lambda t, o=onnx_dir, i=index_dir, w=wanted, name=label: _serve_and_score(
                    config, evaluated, root, w, i, o, t, show_examples=name == list(models)[-1]),
            ))
        if len(scores) > 1:
            # Every row against the first (zero-shot), with paired significance tests: report.html.
            clock.run("compare", lambda t: compare_to_report(
                config, [root / f"eval-{row}" for row in scores], root / "compare", names=list(scores),
                title=f"Towerline demo: {report.name} {config.eval.split}"))
        summary = _summary(config, report, protocol, scores, clock.seconds, time.perf_counter() - started)
        summary["fusion"] = fusion
        summary["mlflow_run_id"] = parent.run_id
        parent.metrics({f"{label}.{k}": v for label, m in scores.items() for k, v in m.items()})
    _print_table(report, config.eval.split, scores)
    write_results(results_path, summary)
    console.print(f"results written to [bold]{results_path}[/]; artifacts under [bold]{root}[/]")
    if (root / "compare" / "report.html").is_file():
        console.print(f"comparison report (significance tests, plots): [bold]{root / 'compare' / 'report.html'}[/]")
    return summary


def _serve_and_score(config: TowerlineConfig, evaluated: BeirDataset, root: Path, rows: dict[str, str],
                     index_dir: Path, onnx_dir: Path, tracker: Tracker, *, show_examples: bool,
                     ) -> dict[str, dict[str, float]]:
    """Per row (row label -> retrieval mode): quality and single-query Search latency through the gRPC
    service; dense rows add the ONNX query encoder's own latency on the eval queries."""
    from evaluation.latency import encoder_latency, search_latency
    from evaluation.service import evaluate_service
    from serving.client import RetrievalClient
    from serving.onnx_encoder import OnnxQueryEncoder

    texts = [evaluated.queries[qid] for qid in evaluated.split(config.eval.split)]
    scored: dict[str, dict[str, float]] = {}
    with loopback_service(config, index_dir, onnx_dir) as address:
        with RetrievalClient(address) as client:
            for row, mode in rows.items():
                metrics = evaluate_service(config, address, root / f"eval-{row}", mode)
                latency = search_latency(lambda text, m=mode: client.search(text, 10, m), texts[:LATENCY_QUERIES])
                scored[row] = {**metrics, **latency}
        if show_examples:
            _example_search(config, evaluated, address, list(rows)[-1], list(rows.values())[-1])
    encoder = OnnxQueryEncoder(onnx_dir, intra_op_threads=config.serve.intra_op_threads)
    speed = encoder_latency(encoder, texts)
    for row, mode in rows.items():
        if mode == "dense":
            scored[row].update(speed)
        tracker.metrics({f"eval.{row}.{k}": v for k, v in scored[row].items()})
    return scored


def check_demo_dataset(config: TowerlineConfig) -> DatasetReport:
    """`data check` on the demo's dataset: the policy applied, the eval split present, the report shown."""
    _, report = check_dataset(config.data)
    if not report.ok:
        raise DataError(str(report.first_fatal))
    if config.eval.split not in report.splits:
        found = ", ".join(report.splits) or "none"
        raise DataError(f"{report.name}: no qrels/{config.eval.split}.tsv to evaluate on (splits present: {found}); "
                        "set eval.split=SPLIT")
    console.rule("[bold]data check")
    print_report(report, console)
    return report


def _training_plan(
    config: TowerlineConfig,
    report: DatasetReport,
    clock: StageClock,
    root: Path,
    split_test_queries: float | None,
    split_seed: int,
) -> tuple[TowerlineConfig, dict[str, Any]]:
    """Train on the dataset's train split; else on a seeded part of the eval queries when asked; else not at all."""
    train_split, eval_split = config.pairs.split, config.eval.split
    if split_test_queries is not None:
        manifest = clock.run("split", lambda t: split_eval_queries(config, split_test_queries, split_seed,
                                                                   root / "split"))
        split_config = config.model_copy(deep=True)
        split_config.data.qrels_dir = root / "split" / QRELS_DIR
        console.print(f"[yellow]{manifest.metadata['protocol']}")
        return split_config, {"fine_tunes": True, "kind": "split-test-queries", **split_summary(manifest)}
    if train_split in report.splits:
        return config, {"fine_tunes": True, "kind": "official",
                        "protocol": f"trained on qrels/{train_split}, evaluated on qrels/{eval_split}"}
    console.print(
        f"[yellow]{report.name} has no qrels/{train_split}.tsv: zero-shot evaluation only "
        f"(--split-test-queries FRACTION fine-tunes on a seeded part of the {eval_split} queries)"
    )
    return config, {"fine_tunes": False, "kind": "zero-shot only",
                    "protocol": f"no qrels/{train_split}; zero-shot on qrels/{eval_split}"}


def _example_search(config: TowerlineConfig, dataset: BeirDataset, address: str, label: str, mode: str,
                    examples: int = 3) -> None:
    """End on what a user of the service sees: the first test queries, their top hits through gRPC,
    with the judged-relevant documents marked."""
    from serving.client import RetrievalClient
    from towerline.display import print_hits

    qrels = dataset.split(config.eval.split)
    judged = [qid for qid, docs in qrels.items() if positives(docs, config.data.positive_min)]
    sides = "; D/S = found by dense/BM25" if mode == "hybrid" else ""
    console.print(f"[bold]Example searches through gRPC[/], {label.replace('_', '-')} ({mode}; ✓ = judged "
                  f"relevant in qrels/{config.eval.split}{sides})")
    with RetrievalClient(address) as client:
        for query_id in judged[:examples]:
            relevant = positives(qrels[query_id], config.data.positive_min)
            query = dataset.queries[query_id]
            print_hits(query, client.search(query, 5, mode), dataset.corpus, relevant, show_sides=mode == "hybrid")


def _summary(config: TowerlineConfig, report: DatasetReport, protocol: dict[str, Any],
             scores: dict[str, dict[str, float]], stage_seconds: dict[str, float],
             total_seconds: float) -> dict[str, Any]:
    fine_tuned, distilled = scores.get("fine_tuned"), scores.get("distilled")
    gain = fine_tuned["ndcg@10"] - scores["zero_shot"]["ndcg@10"] if fine_tuned else None
    return {
        **result_header("demo"),
        "dataset": {
            "name": report.name,
            "fingerprint": report.fingerprint,
            "documents": report.documents,
            "queries": report.queries,
            "splits": list(report.splits),
            "rejected": report.rejected,
        },
        "split": config.eval.split,
        "protocol": {key: value for key, value in protocol.items() if key != "fine_tunes"},
        "backbone": config.encoder.backbone,
        "measured_through": "gRPC (ONNX Runtime query encoder + FAISS) on loopback",
        "zero_shot": scores["zero_shot"],
        "fine_tuned": fine_tuned,
        "distilled": distilled,
        # The same index version's BM25 side, and its fusion with each query encoder's dense side.
        "bm25": scores.get("bm25"),
        "hybrid": scores.get("hybrid") or scores.get("zero_shot_hybrid"),
        "distilled_hybrid": scores.get("distilled_hybrid"),
        "ndcg@10_gain": gain,
        "distilled_over_teacher": {
            "ndcg@10": distilled["ndcg@10"] / fine_tuned["ndcg@10"],
            "p50_latency": distilled["p50_ms_batch1"] / fine_tuned["p50_ms_batch1"],
        } if distilled and fine_tuned else None,
        "fine_tuned_beats_zero_shot": gain > 0 if gain is not None else None,
        "stage_seconds": stage_seconds,
        "total_seconds": round(total_seconds, 2),
        "config": config.flat(),
    }


def _print_table(report: DatasetReport, split: str, scores: dict[str, dict[str, float]]) -> None:
    table = Table(title=f"{report.name} (fingerprint {report.fingerprint[:12]}), qrels/{split}, through gRPC")
    table.add_column("model")
    for column in ("nDCG@10", "R@100", "MRR@10", "Search p50 ms", "encoder p50 ms (1 query)",
                   "encoder queries/s (batch 32)"):
        table.add_column(column, justify="right")
    for label, metrics in scores.items():
        quality = (f"{metrics[m]:.4f}" for m in ("ndcg@10", "recall@100", "mrr@10"))
        speed = (f"{metrics['p50_ms_batch1']:.2f}", f"{metrics['texts_per_s_batch32']:.0f}") \
            if "p50_ms_batch1" in metrics else ("—", "—")
        table.add_row(label.replace("_", "-"), *quality, f"{metrics['search_p50_ms']:.2f}", *speed)
    console.print(table)

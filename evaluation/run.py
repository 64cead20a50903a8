"""Offline evaluation: score test queries against a live gRPC service (or any batch searcher)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from evaluation.metrics import Run, score_run
from towerline.artifacts import ArtifactWriter, Manifest
from towerline.beir import load_qrels, load_queries, resolve_dataset_dir
from towerline.config import TowerlineConfig
from towerline.errors import DataError
from towerline.progress import progress_bar

EVAL_KIND = "eval-report"
# (query texts, top_k) -> per query, hits as (doc id, score), best first.
BatchSearch = Callable[[list[str], int], list[list[tuple[str, float]]]]


def collect_run(
    search: BatchSearch, queries: dict[str, str], top_k: int, batch_size: int
) -> Run:
    query_ids = list(queries)
    run: Run = {}
    with progress_bar("evaluate", len(query_ids)) as bar:
        for start in range(0, len(query_ids), batch_size):
            chunk = query_ids[start : start + batch_size]
            results = search([queries[qid] for qid in chunk], top_k)
            for query_id, hits in zip(chunk, results, strict=True):
                run[query_id] = {doc_id: float(score) for doc_id, score in hits}
            bar.advance(0, len(chunk))
    return run


def evaluate(
    config: TowerlineConfig,
    search: BatchSearch,
    output: Path,
    *,
    target: dict[str, Any],
) -> tuple[dict[str, float], Manifest]:
    """Run the split's judged queries through `search` and write an eval-report artifact."""
    dataset_dir = resolve_dataset_dir(config.data)
    qrels = load_qrels(dataset_dir, config.eval.split)
    all_queries = load_queries(dataset_dir)
    missing = [qid for qid in qrels if qid not in all_queries]
    if missing:
        raise DataError(f"{dataset_dir}: qrels/{config.eval.split} names unknown query ids, e.g. {missing[0]!r}")
    queries = {qid: all_queries[qid] for qid in qrels}
    run = collect_run(search, queries, config.eval.top_k, config.eval.batch_size)
    metrics = score_run(qrels, run)
    with ArtifactWriter(output, EVAL_KIND, producer="eval", config=config) as staged:
        (staged.path / "metrics.json").write_text(json.dumps(metrics, indent=2))
        _write_trec_run(staged.path / "run.trec", run)
        staged.metadata.update(metrics=metrics, target=target, split=config.eval.split,
                               dataset=str(dataset_dir))
    assert staged.manifest is not None
    return metrics, staged.manifest


def _write_trec_run(path: Path, run: Run) -> None:
    with path.open("w") as handle:
        for query_id, hits in run.items():
            ranked = sorted(hits.items(), key=lambda item: -item[1])
            for rank, (doc_id, score) in enumerate(ranked, start=1):
                handle.write(f"{query_id} Q0 {doc_id} {rank} {score:.6f} towerline\n")

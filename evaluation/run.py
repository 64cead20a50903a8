"""Offline evaluation: score test queries against a live gRPC service (or any batch searcher)."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from evaluation.judged import JudgedQueries, dataset_judged
from evaluation.latency import call_percentiles, write_call_latencies
from evaluation.metrics import Run, mean_scores, per_query_scores
from evaluation.trec import write_trec_run
from towerline.artifacts import ArtifactWriter, Manifest
from towerline.config import TowerlineConfig
from towerline.errors import DataError
from towerline.progress import progress_bar

EVAL_KIND = "eval-report"
PER_QUERY_FILE = "per_query.json"
# (query texts, top_k) -> per query, hits as (doc id, score), best first.
BatchSearch = Callable[[list[str], int], list[list[tuple[str, float]]]]


def collect_run(
    search: BatchSearch, queries: dict[str, str], top_k: int, batch_size: int,
    latencies_ms: list[float] | None = None,
) -> Run:
    """Every query's hits; each search call's wall time in ms is appended to `latencies_ms` if given."""
    query_ids = list(queries)
    run: Run = {}
    with progress_bar("evaluate", len(query_ids)) as bar:
        for start in range(0, len(query_ids), batch_size):
            chunk = query_ids[start : start + batch_size]
            started = time.perf_counter()
            results = search([queries[qid] for qid in chunk], top_k)
            if latencies_ms is not None:
                latencies_ms.append((time.perf_counter() - started) * 1000)
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
    force: bool = False,
    judged: JudgedQueries | None = None,
) -> tuple[dict[str, float], Manifest]:
    """Run the judged queries (default: the configured dataset's eval split) through `search` and
    write an eval-report artifact.

    Refuses (unless `force`) when the target's index was built from other data than the dataset
    it is to be scored on: `target["service"]` names the index's dataset fingerprint. TREC topics
    carry no corpus, so nothing can be checked for them."""
    judged = judged if judged is not None else dataset_judged(config)  # checked before the first query is sent
    identity = judged.identity
    built_on = target.get("service", {}).get("dataset_fingerprint")
    if judged.from_corpus_dataset and built_on and built_on != identity["fingerprint"] and not force:
        raise DataError(f"the index was built from {target['service'].get('dataset') or 'a dataset'} "
                        f"({built_on[:12]}), not from {identity['name']} ({identity['fingerprint'][:12]}) that it "
                        "would be scored on: rebuild it from that data or pass --force")
    positive_min = config.data.positive_min
    latencies_ms: list[float] = []
    run = collect_run(search, judged.queries, config.eval.top_k, config.eval.batch_size, latencies_ms)
    per_query = per_query_scores(judged.qrels, run, positive_min)
    metrics = mean_scores(per_query)
    with ArtifactWriter(output, EVAL_KIND, producer="eval", config=config) as staged:
        (staged.path / "metrics.json").write_text(json.dumps(metrics, indent=2))
        (staged.path / PER_QUERY_FILE).write_text(json.dumps(per_query))
        write_call_latencies(staged.path, latencies_ms, config.eval.batch_size)  # eval.batch_size queries a call
        write_trec_run(staged.path / "run.trec", run)
        staged.metadata.update(metrics=metrics, target=target, split=judged.split, positive_min=positive_min,
                               dataset=identity, dropped_judgments=judged.dropped, forced=force,
                               latency_ms=call_percentiles(latencies_ms))
    assert staged.manifest is not None
    return metrics, staged.manifest

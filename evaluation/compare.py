"""`towerline eval compare`: several systems' runs on the same judged queries, with paired significance.

Every system is scored per query (pytrec_eval, `evaluation.metrics.per_query_scores`); each one after
the first (the baseline) is compared with it on every metric by a paired t-test and a paired
randomisation test (each query's two scores swapped at random, scipy's `permutation_test`). With
several challengers the p-values of one metric are corrected for multiple comparisons by Holm's
step-down method, which controls the family-wise error rate without assuming independence.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from scipy import stats

from evaluation.judged import JudgedQueries, dataset_judged
from evaluation.latency import call_percentiles, read_call_latencies
from evaluation.metrics import Qrels, Run, per_query_scores, recall_curve
from evaluation.run import EVAL_KIND
from evaluation.trec import read_trec_run
from towerline.artifacts import ArtifactWriter, read_manifest
from towerline.config import TowerlineConfig
from towerline.errors import ArtifactError, DataError

COMPARISON_KIND = "eval-comparison"
COMPARED_METRICS = ("ndcg@10", "recall@100", "mrr@10")
RECALL_CUTOFFS = (1, 3, 5, 10, 20, 50, 100)
# (qrels, run) -> query id -> metric -> score.
PerQueryScorer = Callable[[Qrels, Run], dict[str, dict[str, float]]]


@dataclass
class SystemRun:
    """One compared system: its run, and what its eval report says it was scored on."""

    name: str
    run: Run
    dataset: dict[str, str] | None = None  # {"name", "fingerprint"} from the report; None for a bare TREC file
    split: str | None = None
    positive_min: int | None = None
    latency_ms: list[float] = field(default_factory=list)


def load_system(path: Path, name: str | None = None) -> SystemRun:
    """An eval-report artifact directory (run.trec + manifest), or a bare TREC run file."""
    path = Path(path)
    if path.is_file():
        return SystemRun(name or path.stem, read_trec_run(path))
    if not path.is_dir():
        raise ArtifactError(f"{path}: neither an eval-report directory nor a TREC run file")
    manifest = read_manifest(path, EVAL_KIND)
    return SystemRun(name or path.name, read_trec_run(path / "run.trec"), manifest.metadata.get("dataset"),
                     manifest.metadata.get("split"), manifest.metadata.get("positive_min"), read_call_latencies(path))


def check_comparable(systems: list[SystemRun], dataset: dict[str, str], split: str, positive_min: int,
                     force: bool = False) -> None:
    """Refuse systems scored on another dataset, split or relevance threshold than the qrels at hand
    (an eval report names them; a bare TREC file cannot be checked)."""
    if len(systems) < 2:
        raise DataError("eval compare needs at least two runs")
    names = [system.name for system in systems]
    if len(set(names)) != len(names):
        raise DataError(f"eval compare: two runs share a name ({', '.join(names)}); name them with --name")
    for system in systems:
        problems = []
        if system.dataset and system.dataset.get("fingerprint") != dataset["fingerprint"]:
            problems.append(f"dataset {system.dataset.get('name')} ({system.dataset.get('fingerprint', '')[:12]}) "
                            f"is not {dataset['name']} ({dataset['fingerprint'][:12]})")
        if system.split is not None and system.split != split:
            problems.append(f"split {system.split!r} is not {split!r}")
        if system.positive_min is not None and system.positive_min != positive_min:
            problems.append(f"positive_min {system.positive_min} is not {positive_min}")
        if problems and not force:
            raise DataError(f"run {system.name!r}: " + "; ".join(problems) + " (--force compares anyway)")


def holm(p_values: list[float]) -> list[float]:
    """Holm-Bonferroni adjusted p-values, in the input's order."""
    count = len(p_values)
    adjusted = [0.0] * count
    running = 0.0
    for rank, index in enumerate(sorted(range(count), key=lambda i: p_values[i])):
        running = max(running, min(1.0, (count - rank) * p_values[index]))
        adjusted[index] = running
    return adjusted


def paired_tests(challenger: np.ndarray, baseline: np.ndarray, permutations: int, seed: int) -> dict[str, float]:
    """Two-sided p-values of the paired t-test and the paired randomisation test on per-query scores."""
    differences = challenger - baseline
    if not np.any(differences):
        return {"t_test_p": 1.0, "permutation_p": 1.0}
    if np.ptp(differences) <= 1e-12 * max(1.0, float(np.max(np.abs(differences)))):
        # Every query moved by the same amount: no variance, so the t statistic is infinite.
        t_p = 0.0
    else:
        t_p = float(stats.ttest_rel(challenger, baseline).pvalue)
    permutation = stats.permutation_test(
        (challenger, baseline), lambda x, y, axis: np.mean(x - y, axis=axis), permutation_type="samples",
        vectorized=True, n_resamples=permutations, alternative="two-sided", rng=np.random.default_rng(seed))
    return {"t_test_p": t_p if np.isfinite(t_p) else 1.0, "permutation_p": float(permutation.pvalue)}


def challenger_tests(base: np.ndarray, challengers: dict[str, np.ndarray], *, alpha: float, permutations: int,
                     seed: int, lower_is_better: bool = False) -> dict[str, dict[str, Any]]:
    """Each challenger's paired scores against the baseline's (same units, same order): mean difference,
    wins and losses, raw and Holm-corrected p-values of both tests, and whether both are below `alpha`."""
    tests = {}
    for name, scores in challengers.items():
        better, worse = (scores < base, scores > base) if lower_is_better else (scores > base, scores < base)
        tests[name] = {"delta": float(np.mean(scores - base)), "wins": int(better.sum()), "losses": int(worse.sum()),
                       **paired_tests(scores, base, permutations, seed)}
    for key in ("t_test_p", "permutation_p"):
        for name, adjusted in zip(tests, holm([test[key] for test in tests.values()]), strict=True):
            tests[name][f"{key}_holm"] = adjusted
    for test in tests.values():
        # Significant only when both tests agree after the correction.
        test["significant"] = max(test["t_test_p_holm"], test["permutation_p_holm"]) < alpha
    return tests


def compare_systems(qrels: Qrels, systems: list[SystemRun], positive_min: int = 1, *,
                    metrics: tuple[str, ...] = COMPARED_METRICS, alpha: float = 0.05,
                    permutations: int = 10_000, seed: int = 0, scorer: PerQueryScorer | None = None,
                    recall_cutoffs: tuple[int, ...] = RECALL_CUTOFFS) -> dict[str, Any]:
    """Per-system means, per-query scores, Recall@k curves and every challenger against the first system.
    `scorer` (default: `per_query_scores`) gives each query's `metrics` from (qrels, run)."""
    score = scorer or (lambda judged, run: per_query_scores(judged, run, positive_min))
    per_system = {system.name: score(qrels, system.run) for system in systems}
    query_ids = sorted(next(iter(per_system.values())))
    table = {name: {metric: float(np.mean([scores[q][metric] for q in query_ids])) for metric in metrics}
             for name, scores in per_system.items()}
    baseline = systems[0].name
    comparisons: dict[str, dict[str, Any]] = {system.name: {} for system in systems[1:]}
    for metric in metrics:
        base = np.array([per_system[baseline][q][metric] for q in query_ids])
        challengers = {name: np.array([per_system[name][q][metric] for q in query_ids]) for name in comparisons}
        for name, test in challenger_tests(base, challengers, alpha=alpha, permutations=permutations,
                                           seed=seed).items():
            comparisons[name][metric] = test
    return {
        "baseline": baseline,
        "queries": len(query_ids),
        "positive_min": positive_min,
        "alpha": alpha,
        "permutations": permutations,
        "correction": "holm",
        "metrics": list(metrics),
        "table": table,
        "comparisons": comparisons,
        "per_query": {name: {q: {m: scores[q][m] for m in metrics} for q in query_ids}
                      for name, scores in per_system.items()},
        "recall_curves": {system.name: recall_curve(qrels, system.run, positive_min, recall_cutoffs)
                          for system in systems},
        "latency_ms": {system.name: call_percentiles(system.latency_ms) for system in systems if system.latency_ms},
    }


def compare_to_report(config: TowerlineConfig, paths: list[Path], output: Path, *, names: list[str] | None = None,
                      alpha: float = 0.05, permutations: int = 10_000, force: bool = False,
                      title: str | None = None, seed: int = 0, judged: JudgedQueries | None = None) -> dict[str, Any]:
    """Compare runs on the judged queries (default: the configured dataset's eval split) and write an
    eval-comparison artifact (comparison.json, report.md, report.html, plots/) atomically."""
    from evaluation.report import write_report

    if names and len(names) != len(paths):
        raise DataError(f"--name given {len(names)} time(s) for {len(paths)} run(s): name every run or none")
    systems = [load_system(path, names[i] if names else None) for i, path in enumerate(paths)]
    judged = judged if judged is not None else dataset_judged(config)
    identity, split, positive_min = judged.identity, judged.split, config.data.positive_min
    check_comparable(systems, identity, split, positive_min, force)
    comparison = compare_systems(judged.qrels, systems, positive_min, alpha=alpha, permutations=permutations,
                                 seed=seed)
    comparison["dataset"] = {**identity, "split": split}
    with ArtifactWriter(output, COMPARISON_KIND, producer="eval compare", config=config) as staged:
        write_report(comparison, staged.path, title=title or f"{identity['name']} {split}: "
                     + " vs ".join(system.name for system in systems),
                     dataset=f"{identity['name']} ({split})",
                     latencies={system.name: system.latency_ms for system in systems})
        staged.metadata.update(dataset=identity, split=split, baseline=comparison["baseline"],
                               table=comparison["table"], forced=force)
    return comparison

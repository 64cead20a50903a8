"""`towerline rec compare`: recommendation models compared with the retrieval side's significance tests
and report (`evaluation.compare`, `evaluation.report`): CTR models on the same test samples, or
Recommend pipelines (`rec eval` reports) on the same test users.

Recommend pipelines: per user, NDCG@10 and Recall@50 of the recommended items against the items the
user liked in the test period (the `qrels.trec` each report keeps), paired over users.

The paired unit is the user, as in GAUC: per user with both labels, the AUC of the model's scores
(`user_auc`) and the mean log loss of its probabilities (`logloss`), each challenger against the
first model by paired t-test and randomisation test, Holm-corrected over the challengers. The table
also shows the global AUC, LogLoss and sample-weighted GAUC of every model (`ctr_metrics`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from sklearn.metrics import roc_auc_score

from evaluation.compare import challenger_tests
from personalization.crm_run import CRM_KIND, PREDICTIONS_FILE
from personalization.ctr_metrics import PROBABILITY_EPS, ctr_metrics
from towerline.config import TowerlineConfig
from towerline.errors import DataError

KEY_COLUMNS = ("user_index", "label")
PAIRED_METRICS = ("user_auc", "logloss")
# user_auc: higher is better; logloss: lower is better (its "delta" is reported as is, negative = better).
LOWER_IS_BETTER = {"logloss"}


def per_user_scores(frame: pd.DataFrame, model: str) -> pd.DataFrame:
    """Index user_index; columns user_auc and logloss, for users having both labels."""
    probabilities = np.clip(frame[model].to_numpy(np.float64), PROBABILITY_EPS, 1 - PROBABILITY_EPS)
    labels = frame["label"].to_numpy()
    losses = -(labels * np.log(probabilities) + (1 - labels) * np.log(1 - probabilities))
    rows = {}
    for user, group in frame.assign(_loss=losses).groupby("user_index"):
        if group["label"].nunique() == 2:
            rows[user] = {"user_auc": roc_auc_score(group["label"], group[model]), "logloss": group["_loss"].mean()}
    return pd.DataFrame.from_dict(rows, orient="index")


def compare_ctr(frame: pd.DataFrame, models: list[str], *, alpha: float = 0.05, permutations: int = 10_000,
                seed: int = 0) -> dict[str, Any]:
    """The comparison in `evaluation.compare.compare_systems`'s layout, so that `write_report` draws it."""
    missing = [column for column in (*KEY_COLUMNS, *models) if column not in frame.columns]
    if missing:
        raise DataError(f"predictions lack column(s) {', '.join(missing)}")
    if len(models) < 2:
        raise DataError("rec compare needs at least two models")
    per_model = {model: per_user_scores(frame, model) for model in models}
    users = per_model[models[0]].index
    if not len(users):
        raise DataError("no user has both a clicked and an unclicked test sample")
    table = {}
    for model in models:
        overall = ctr_metrics(frame["label"], frame[model], frame["user_index"])
        table[model] = {"user_auc": float(per_model[model]["user_auc"].mean()), **overall}
    comparisons: dict[str, dict[str, Any]] = {model: {} for model in models[1:]}
    for metric in PAIRED_METRICS:
        base = per_model[models[0]].loc[users, metric].to_numpy()
        challengers = {model: per_model[model].loc[users, metric].to_numpy() for model in comparisons}
        for model, test in challenger_tests(base, challengers, alpha=alpha, permutations=permutations, seed=seed,
                                            lower_is_better=metric in LOWER_IS_BETTER).items():
            comparisons[model][metric] = test
    return {
        "baseline": models[0], "queries": len(users), "unit": "user", "alpha": alpha, "permutations": permutations,
        "correction": "holm", "metrics": [*PAIRED_METRICS, "auc", "gauc"], "table": table,
        "comparisons": comparisons,
        "per_query": {model: {str(user): {m: float(per_model[model].loc[user, m]) for m in PAIRED_METRICS}
                              for user in users} for model in models},
        "recall_curves": {}, "latency_ms": {},
    }


def read_predictions(crm_dir: Path) -> pd.DataFrame:
    path = Path(crm_dir) / PREDICTIONS_FILE
    if not path.is_file():
        raise DataError(f"{crm_dir}: no {PREDICTIONS_FILE} (made by `towerline rec train-crm`)")
    return pd.read_parquet(path)


def crm_predictions(crm_dirs: list[Path], models: list[str] | None) -> tuple[pd.DataFrame, list[str]]:
    """One CRM artifact: its models' columns (default: popularity, logreg, din). Several: their DIN
    columns side by side, named by directory, after checking they scored the same test samples."""
    from towerline.artifacts import read_manifest

    frames = [read_predictions(path) for path in crm_dirs]
    if len(crm_dirs) == 1:
        return frames[0], models or ["popularity", "logreg", "din"]
    sources = {read_manifest(path, CRM_KIND).inputs.get("interactions") for path in crm_dirs}
    first = frames[0]
    if len(sources) != 1 or any(len(frame) != len(first) or not frame["user_index"].equals(first["user_index"])
                                or not frame["label"].equals(first["label"]) for frame in frames[1:]):
        raise DataError("rec compare: the CRM artifacts were trained on different interactions artifacts")
    names = [Path(path).name for path in crm_dirs]
    if len(set(names)) != len(names):
        raise DataError(f"rec compare: two CRM directories share a name ({', '.join(names)})")
    column = (models or ["din"])[0]
    combined = first[list(KEY_COLUMNS)].copy()
    for name, frame in zip(names, frames, strict=True):
        combined[name] = frame[column]
    return combined, names


def compare_crms_to_report(config: TowerlineConfig, crm_dirs: list[Path], output: Path, models: list[str] | None,
                           *, alpha: float = 0.05, permutations: int = 10_000) -> dict[str, Any]:
    """Compare CRM artifacts' CTR models, or `rec eval` reports, and write an eval-comparison artifact
    (the same report as `eval compare`) atomically."""
    from evaluation.compare import COMPARISON_KIND
    from evaluation.recommend import REC_EVAL_KIND
    from evaluation.report import write_report
    from towerline.artifacts import ArtifactWriter, read_manifest

    if read_manifest(crm_dirs[0], (CRM_KIND, REC_EVAL_KIND)).kind == REC_EVAL_KIND:
        names = [Path(path).name for path in crm_dirs]
        comparison = compare_rec_evals(crm_dirs, alpha=alpha, permutations=permutations)
        title = "Recommend: " + " vs ".join(names)
    else:
        frame, names = crm_predictions(crm_dirs, models)
        comparison = compare_ctr(frame, names, alpha=alpha, permutations=permutations)
        title = "CTR models: " + " vs ".join(names)
    with ArtifactWriter(output, COMPARISON_KIND, producer="rec compare", config=config) as staged:
        write_report(comparison, staged.path, title=title, dataset="the test period")
        staged.metadata.update(baseline=comparison["baseline"], table=comparison["table"], unit="user")
    return comparison


def compare_rec_evals(rec_evals: list[Path], *, alpha: float = 0.05, permutations: int = 10_000,
                      seed: int = 0) -> dict[str, Any]:
    """`rec eval` reports of the same test users, paired over users on NDCG@10 and Recall@50."""
    from evaluation.compare import SystemRun, compare_systems
    from evaluation.latency import read_call_latencies
    from evaluation.metrics import CANDIDATE_METRICS, per_user_candidate_scores
    from evaluation.recommend import QRELS_FILE, REC_EVAL_KIND
    from evaluation.trec import read_trec_qrels, read_trec_run
    from towerline.artifacts import read_manifest

    names = [Path(path).name for path in rec_evals]
    if len(set(names)) != len(names):
        raise DataError(f"rec compare: two reports share a name ({', '.join(names)})")
    truths, systems = [], []
    for name, path in zip(names, rec_evals, strict=True):
        read_manifest(path, REC_EVAL_KIND)
        if not (path / QRELS_FILE).is_file():
            raise DataError(f"{path}: no {QRELS_FILE} (made by `towerline rec eval` since it keeps its truth)")
        truths.append(read_trec_qrels(path / QRELS_FILE))
        systems.append(SystemRun(name, read_trec_run(path / "run.trec"), latency_ms=read_call_latencies(path)))
    if any(truth != truths[0] for truth in truths[1:]):
        raise DataError("rec compare: the reports were scored against different test-period items")
    comparison = compare_systems(truths[0], systems, metrics=CANDIDATE_METRICS, alpha=alpha,
                                 permutations=permutations, seed=seed, scorer=per_user_candidate_scores,
                                 recall_cutoffs=(1, 5, 10, 20, 50))
    return {**comparison, "unit": "user"}

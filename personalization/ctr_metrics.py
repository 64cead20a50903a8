"""CTR metrics: AUC, log loss and GAUC (user-weighted AUC, Zhou et al. 2018)."""

from __future__ import annotations

import math

import numpy as np
import numpy.typing as npt
import pandas as pd
from sklearn.metrics import log_loss, roc_auc_score

# Probabilities are clipped away from 0 and 1 so that one confident mistake gives a large, finite loss.
PROBABILITY_EPS = 1e-7


def ctr_metrics(labels: npt.ArrayLike, probabilities: npt.ArrayLike, user_indexes: npt.ArrayLike
                ) -> dict[str, float]:
    """{"auc", "logloss", "gauc"}; AUC is NaN when the labels hold a single class, GAUC when no user has both."""
    y = np.asarray(labels).astype(np.int64).ravel()
    p = np.asarray(probabilities, dtype=np.float64).ravel()
    users = np.asarray(user_indexes).ravel()
    if not len(y) == len(p) == len(users):
        raise ValueError(f"{len(y)} labels, {len(p)} probabilities and {len(users)} user indexes")
    if not len(y):
        raise ValueError("no samples to score")
    auc = float(roc_auc_score(y, p)) if len(np.unique(y)) == 2 else math.nan
    logloss = float(log_loss(y, np.clip(p, PROBABILITY_EPS, 1 - PROBABILITY_EPS), labels=[0, 1]))
    return {"auc": auc, "logloss": logloss, "gauc": group_auc(y, p, users)}


def group_auc(labels: np.ndarray, scores: np.ndarray, groups: np.ndarray) -> float:
    """Σ_u n_u · AUC_u / Σ_u n_u over the groups (users) having both classes, n_u = the group's sample count.

    Each group's AUC comes from the Mann-Whitney statistic over within-group average ranks, which
    equals sklearn's roc_auc_score (ties count one half) without a Python call per user.
    """
    frame = pd.DataFrame({"group": groups, "label": labels, "score": scores})
    frame["positive_rank"] = frame.groupby("group")["score"].rank(method="average") * frame["label"]
    per_group = frame.groupby("group").agg(size=("label", "size"), positives=("label", "sum"),
                                           positive_rank=("positive_rank", "sum"))
    positives = per_group["positives"].to_numpy(dtype=np.float64)
    negatives = per_group["size"].to_numpy(dtype=np.float64) - positives
    both = (positives > 0) & (negatives > 0)
    if not both.any():
        return math.nan
    rank_sum = per_group["positive_rank"].to_numpy(dtype=np.float64)[both]
    aucs = (rank_sum - positives[both] * (positives[both] + 1) / 2) / (positives[both] * negatives[both])
    weights = per_group["size"].to_numpy(dtype=np.float64)[both]
    return float(np.sum(weights * aucs) / np.sum(weights))

"""CTR baselines for the CRM: item popularity and logistic regression over sparse one-hot features."""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
from sklearn.linear_model import LogisticRegression

from personalization.interactions import USER_FIELDS, CtrData, CtrSplit


class ItemPopularity:
    """Train-split click rate per item, smoothed toward the global rate:
    p_i = (clicks_i + prior_weight · global_rate) / (impressions_i + prior_weight).
    Items unseen in training get the global rate."""

    def __init__(self, prior_weight: float = 10.0) -> None:
        if prior_weight <= 0:
            raise ValueError(f"prior_weight must be positive, got {prior_weight}")
        self.prior_weight = prior_weight
        self.global_rate: float | None = None
        self.item_rates: np.ndarray | None = None

    def fit(self, train: CtrSplit) -> ItemPopularity:
        if not len(train):
            raise ValueError("ItemPopularity.fit: empty training split")
        self.global_rate = float(train.label.mean())
        clicks = np.bincount(train.item_index, weights=train.label)
        impressions = np.bincount(train.item_index).astype(np.float64)
        self.item_rates = (clicks + self.prior_weight * self.global_rate) / (impressions + self.prior_weight)
        return self

    def predict_proba(self, split: CtrSplit) -> np.ndarray:
        if self.item_rates is None or self.global_rate is None:
            raise RuntimeError("ItemPopularity.predict_proba before fit")
        known = split.item_index < len(self.item_rates)
        return np.where(known, self.item_rates[np.minimum(split.item_index, len(self.item_rates) - 1)],
                        self.global_rate)


class LogisticRegressionCtr:
    """scikit-learn's LogisticRegression over one-hot user index, item index, item genres (multi-hot)
    and user gender/age/occupation. The tables come from `data`, so the columns are fixed by the
    vocabularies and a split's matrix never depends on which values happen to occur in it."""

    def __init__(self, data: CtrData, c: float = 1.0, max_iter: int = 1000, seed: int = 0) -> None:
        self.item_genres = data.item_genres
        self.user_fields = data.user_fields
        sizes = data.sizes
        widths = [sizes.users, sizes.items, sizes.genres, sizes.genders, sizes.ages, sizes.occupations]
        self.offsets = np.concatenate([[0], np.cumsum(widths)])
        self.model = LogisticRegression(C=c, max_iter=max_iter, random_state=seed)

    def features(self, split: CtrSplit) -> sp.csr_matrix:
        n = len(split)
        samples = np.arange(n)
        rows: list[np.ndarray] = [samples, samples]
        cols: list[np.ndarray] = [self.offsets[0] + split.user_index, self.offsets[1] + split.item_index]
        genres = self.item_genres[split.item_index]
        present = genres != 0
        rows.append(np.broadcast_to(samples[:, None], genres.shape)[present])
        cols.append(self.offsets[2] + genres[present])
        fields = self.user_fields[split.user_index]
        for position in range(len(USER_FIELDS)):
            rows.append(samples)
            cols.append(self.offsets[3 + position] + fields[:, position])
        row, col = np.concatenate(rows), np.concatenate(cols)
        return sp.csr_matrix((np.ones(len(row)), (row, col)), shape=(n, int(self.offsets[-1])))

    def fit(self, train: CtrSplit) -> LogisticRegressionCtr:
        if len(np.unique(train.label)) < 2:
            raise ValueError("LogisticRegressionCtr.fit: the training split needs both labels")
        self.model.fit(self.features(train), train.label.astype(np.int64))
        return self

    def predict_proba(self, split: CtrSplit) -> np.ndarray:
        return self.model.predict_proba(self.features(split))[:, 1]

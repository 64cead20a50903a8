"""`towerline rec train-crm`: the interactions artifact → a "crm" artifact (DIN) with its baselines.

The artifact holds DIN's weights and vocabularies (`model.safetensors`, `crm.json`), the per-epoch
valid metrics (`metrics.json`), every model's test probabilities (`test_predictions.parquet`: user_index,
label, popularity, logreg, din), and in its manifest the valid/test AUC, LogLoss and GAUC of DIN and of
the two baselines (item popularity, logistic regression) computed on the same splits.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from personalization.ctr_baselines import ItemPopularity, LogisticRegressionCtr
from personalization.ctr_metrics import ctr_metrics
from personalization.din import predict_din
from personalization.interactions import CtrData, load_ctr_data
from personalization.train_crm import json_safe, train_din
from towerline.artifacts import ArtifactWriter, Manifest, read_manifest
from towerline.config import TowerlineConfig
from towerline.tracking import Tracker

CRM_KIND = "crm"
PREDICTIONS_FILE = "test_predictions.parquet"
INTERACTIONS_KIND = "interactions"


def run_train_crm(config: TowerlineConfig, interactions: Path, output: Path, tracker: Tracker) -> Manifest:
    settings = config.rec.crm
    source = read_manifest(interactions, INTERACTIONS_KIND)
    data = load_ctr_data(interactions, settings.history_length)
    with ArtifactWriter(output, CRM_KIND, producer="rec train-crm", inputs={"interactions": source},
                        config=config) as staged:
        result = train_din(data, settings, staged.path)
        for entry in result.history:
            tracker.metrics({f"crm.valid_{name}": entry[name] for name in ("auc", "logloss", "gauc")},
                            step=entry["epoch"])
        predictions = baseline_predictions(data, settings.seed)
        predictions["din"] = predict_din(result.model, data.test, settings.eval_batch_size)
        # Every model's test probabilities, for `towerline rec compare`'s paired significance tests.
        pd.DataFrame({"user_index": data.test.user_index, "label": data.test.label, **predictions}).to_parquet(
            staged.path / PREDICTIONS_FILE, index=False)
        staged.metadata.update(json_safe({
            "dataset": source.metadata.get("dataset"),
            "best_epoch": result.best_epoch,
            "epochs_run": result.epochs_run,
            "representation_dim": result.model.representation_dim,
            "din": {"valid": result.valid, "test": result.test},
            "baselines": {name: ctr_metrics(data.test.label, probabilities, data.test.user_index)
                          for name, probabilities in predictions.items() if name != "din"},
        }))
    assert staged.manifest is not None
    return staged.manifest


def baseline_predictions(data: CtrData, seed: int) -> dict[str, np.ndarray]:
    """Item popularity and logistic regression, fitted on train: their test probabilities."""
    predictions = {}
    for name, model in (("popularity", ItemPopularity()), ("logreg", LogisticRegressionCtr(data, seed=seed))):
        model.fit(data.train)
        predictions[name] = model.predict_proba(data.test)
    return predictions


def baseline_metrics(data: CtrData, seed: int) -> dict[str, dict[str, Any]]:
    """Item popularity and logistic regression, fitted on train, scored on test."""
    return {name: ctr_metrics(data.test.label, probabilities, data.test.user_index)
            for name, probabilities in baseline_predictions(data, seed).items()}

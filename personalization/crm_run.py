"""`towerline rec train-crm`: the interactions artifact → a "crm" artifact (DIN) with its baselines.

The artifact holds DIN's weights and vocabularies (`model.safetensors`, `crm.json`), the per-epoch
valid metrics (`metrics.json`), and in its manifest the valid/test AUC, LogLoss and GAUC of DIN and of
the two baselines (item popularity, logistic regression) computed on the same splits.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from personalization.ctr_baselines import ItemPopularity, LogisticRegressionCtr
from personalization.ctr_metrics import ctr_metrics
from personalization.interactions import CtrData, load_ctr_data
from personalization.train_crm import json_safe, train_din
from towerline.artifacts import ArtifactWriter, Manifest, read_manifest
from towerline.config import TowerlineConfig
from towerline.tracking import Tracker

CRM_KIND = "crm"
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
        staged.metadata.update(json_safe({
            "dataset": source.metadata.get("dataset"),
            "best_epoch": result.best_epoch,
            "epochs_run": result.epochs_run,
            "representation_dim": result.model.representation_dim,
            "din": {"valid": result.valid, "test": result.test},
            "baselines": baseline_metrics(data, settings.seed),
        }))
    assert staged.manifest is not None
    return staged.manifest


def baseline_metrics(data: CtrData, seed: int) -> dict[str, dict[str, Any]]:
    """Item popularity and logistic regression, fitted on train, scored on test."""
    rows = {}
    for name, model in (("popularity", ItemPopularity()), ("logreg", LogisticRegressionCtr(data, seed=seed))):
        model.fit(data.train)
        rows[name] = ctr_metrics(data.test.label, model.predict_proba(data.test), data.test.user_index)
    return rows

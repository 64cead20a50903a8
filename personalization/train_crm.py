"""Training the DIN CRM on transformers' Trainer: one evaluation on the valid split per epoch,
early stopping on valid AUC, the best epoch's weights restored at the end, then valid and test metrics.

The Trainer writes one checkpoint per epoch (model weights only) under OUTPUT_DIR/checkpoints,
because that is how it restores the best epoch; they are deleted once the final model is saved
to OUTPUT_DIR (model.safetensors + crm.json, see `personalization.din.save_din`) with metrics.json.
"""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy.special import expit
from transformers import EarlyStoppingCallback, EvalPrediction, PrinterCallback, Trainer, TrainingArguments, set_seed

from personalization.ctr_metrics import ctr_metrics
from personalization.din import DinModel, predict_din, save_din
from personalization.interactions import CtrCollator, CtrData, CtrDataset
from towerline.config import CrmConfig
from towerline.errors import DataError

METRICS_FILE = "metrics.json"
CHECKPOINTS = "checkpoints"


@dataclass
class CrmResult:
    model: DinModel  # the best valid epoch's weights, in eval mode
    model_dir: Path
    best_epoch: int  # 1-based
    epochs_run: int
    # Per epoch: {"epoch", "train_loss", "auc", "logloss", "gauc"} (the last three on the valid split).
    history: list[dict[str, float]] = field(default_factory=list)
    valid: dict[str, float] = field(default_factory=dict)
    test: dict[str, float] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        """Everything but the model, JSON-ready (what metrics.json holds)."""
        return {"best_epoch": self.best_epoch, "epochs_run": self.epochs_run, "history": self.history,
                "valid": self.valid, "test": self.test}


def train_din(data: CtrData, settings: CrmConfig, output_dir: Path | str, seed: int | None = None) -> CrmResult:
    """Train on data.train, select the epoch on data.valid AUC, report valid and test metrics.
    `seed` (default: settings.seed) seeds the initial weights and the shuffling."""
    output_dir = Path(output_dir)
    seed = settings.seed if seed is None else seed
    settings = settings.model_copy(update={"seed": seed})  # crm.json records the seed actually used
    data = data.with_history_length(settings.history_length)
    _check_splits(data)

    set_seed(seed)
    model = DinModel.from_data(data, settings)
    valid_users = data.valid.user_index

    def compute_metrics(prediction: EvalPrediction) -> dict[str, float]:
        # Trainer evaluates sequentially, so predictions are in the valid split's order.
        logits = np.asarray(prediction.predictions, dtype=np.float64).ravel()
        return ctr_metrics(prediction.label_ids, expit(logits), valid_users)

    args = TrainingArguments(
        output_dir=str(output_dir / CHECKPOINTS),
        num_train_epochs=settings.max_epochs,
        per_device_train_batch_size=settings.batch_size,
        per_device_eval_batch_size=settings.eval_batch_size,
        learning_rate=settings.learning_rate,
        weight_decay=settings.weight_decay,
        # DIN is trained with a constant-rate Adam; a decaying schedule would tie the rate to max_epochs,
        # which early stopping makes an upper bound rather than the length of the run.
        lr_scheduler_type="constant",
        optim="adamw_torch",
        eval_strategy="epoch",
        save_strategy="epoch",
        logging_strategy="epoch",
        save_only_model=True,
        save_total_limit=1,  # the best checkpoint is always kept on top of the latest
        load_best_model_at_end=True,
        metric_for_best_model="auc",
        greater_is_better=True,
        seed=seed,
        use_cpu=not torch.cuda.is_available(),
        dataloader_pin_memory=torch.cuda.is_available(),
        dataloader_num_workers=0,
        remove_unused_columns=False,
        report_to="none",
        disable_tqdm=True,
    )
    trainer = Trainer(model=model, args=args, data_collator=CtrCollator(), train_dataset=CtrDataset(data.train),
                      eval_dataset=CtrDataset(data.valid), compute_metrics=compute_metrics,
                      callbacks=[EarlyStoppingCallback(early_stopping_patience=settings.patience)])
    # The per-epoch metrics are returned in CrmResult.history; the printer would dump raw dicts on stdout.
    trainer.remove_callback(PrinterCallback)
    trainer.train()

    history = _epoch_history(trainer.state.log_history)
    best_metric = trainer.state.best_metric
    # The Trainer only replaces its best on a strict improvement: the first epoch reaching the best AUC.
    best_epoch = next(int(entry["epoch"]) for entry in history if entry["auc"] == best_metric)
    model = trainer.model.eval()
    result = CrmResult(model=model, model_dir=output_dir, best_epoch=best_epoch, epochs_run=len(history),
                       history=history)
    for name in ("valid", "test"):
        split = data.splits[name]
        if len(split):
            probabilities = predict_din(model, split, settings.eval_batch_size)
            setattr(result, name, ctr_metrics(split.label, probabilities, split.user_index))
    save_din(model, output_dir, data.vocabularies())
    (output_dir / METRICS_FILE).write_text(json.dumps(json_safe(result.summary()), indent=2) + "\n")
    shutil.rmtree(output_dir / CHECKPOINTS, ignore_errors=True)
    return result


def _check_splits(data: CtrData) -> None:
    if not len(data.train):
        raise DataError("CRM training: the interactions artifact has no train samples")
    if len(np.unique(data.valid.label)) < 2:
        # Valid AUC picks the epoch: it is undefined without both labels.
        raise DataError("CRM training: the valid split needs both clicked and unclicked samples "
                        f"({len(data.valid)} samples)")


def _epoch_history(log_history: list[dict[str, Any]]) -> list[dict[str, float]]:
    train_loss = {round(entry["epoch"]): float(entry["loss"]) for entry in log_history if "loss" in entry}
    history = []
    for entry in log_history:
        if "eval_auc" in entry:
            epoch = round(entry["epoch"])
            history.append({"epoch": epoch, "train_loss": train_loss.get(epoch, math.nan),
                            "auc": float(entry["eval_auc"]), "logloss": float(entry["eval_logloss"]),
                            "gauc": float(entry["eval_gauc"])})
    return history


def json_safe(value: Any) -> Any:
    """NaN (e.g. GAUC without a two-label user) as null: strict JSON has no NaN."""
    if isinstance(value, dict):
        return {key: json_safe(item) for key, item in value.items()}
    if isinstance(value, list):
        return [json_safe(item) for item in value]
    if isinstance(value, float) and math.isnan(value):
        return None
    return value

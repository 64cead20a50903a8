"""`towerline rec train-reclora`: Few2Many training of the RecLoRA scorer and its test metrics.

The CRM (a `crm` artifact: DIN trained on the whole train split) is frozen and gives each sample's
user representation; the LLM's meta-LoRA bank and the gate train on `rec.reclora.train_samples`
train samples. The test metrics (AUC, LogLoss, GAUC) are taken on the test split (or a seeded
sample of `rec.reclora.eval_samples`), with DIN scored on the very same rows beside them.
"""

from __future__ import annotations

import math
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import PrinterCallback, Trainer, TrainingArguments, set_seed

from personalization.ctr_metrics import ctr_metrics
from personalization.din import DinModel, load_din, predict_din
from personalization.interactions import CtrData, load_ctr_data, take_rows
from personalization.reclora import RECLORA_KIND, TITLE_VECTORS_FILE, RecLoraScorer, build_scorer, save_scorer
from personalization.reclora_data import (
    ItemTexts,
    RecLoraCollator,
    RecLoraDataset,
    RecLoraInputs,
    build_inputs,
    few2many_rows,
    scoring_batches,
)
from personalization.train_crm import json_safe
from towerline.artifacts import ArtifactWriter, Manifest, read_manifest
from towerline.config import RecLoraConfig, TowerlineConfig
from towerline.errors import DataError
from towerline.hf_trainer import ProgressAndTracking
from towerline.progress import progress_bar
from towerline.tracking import Tracker


@dataclass
class RecLoraResult:
    scorer: RecLoraScorer
    tokenizer: Any
    test: dict[str, float]  # RecLoRA on the scored test rows
    din_test: dict[str, float]  # DIN on the same rows
    train_samples: int
    test_samples: int
    seconds: dict[str, float]

    def summary(self) -> dict[str, Any]:
        return json_safe({"test": self.test, "din_same_rows": self.din_test, "train_samples": self.train_samples,
                          "test_samples": self.test_samples, "seconds": self.seconds})


def run_train_reclora(config: TowerlineConfig, interactions: Path, crm_dir: Path, output: Path,
                      tracker: Tracker) -> Manifest:
    settings = config.rec.reclora
    source = read_manifest(interactions, "interactions")
    crm_manifest = read_manifest(crm_dir, "crm")
    crm = load_din(crm_dir)
    data = load_ctr_data(interactions, crm.settings.history_length)
    texts = ItemTexts.load(interactions, data.sizes.items, settings.title_encoder)
    result = train_reclora(data, crm, texts, settings, tracker)
    tracker.metrics({f"reclora.test_{key}": value for key, value in result.test.items() if not math.isnan(value)})
    with ArtifactWriter(output, RECLORA_KIND, producer="rec train-reclora",
                        inputs={"interactions": source, "crm": crm_manifest}, config=config) as staged:
        save_scorer(result.scorer, staged.path, extra={"crm": crm_manifest.fingerprint})
        # The retriever's title vectors travel with the scorer: serving needs no text tower.
        np.save(staged.path / TITLE_VECTORS_FILE, texts.title_vectors.astype(np.float32))
        staged.metadata.update({"dataset": source.metadata.get("dataset"), "llm": settings.llm,
                                "gated_by_crm": crm_manifest.fingerprint, **result.summary()})
        if settings.export_onnx:
            from personalization.reclora_onnx import export_and_check

            staged.metadata["onnx"] = export_and_check(result.scorer, parity_batches(data, crm, texts, result),
                                                       staged.path, config.export.opset)
    assert staged.manifest is not None
    return staged.manifest


def parity_batches(data: CtrData, crm: DinModel, texts: ItemTexts, result: RecLoraResult,
                    samples: int = 64, batch_size: int = 16) -> list[dict[str, torch.Tensor]]:
    """Collated test prompts (lengths vary, so padding is covered) to check the ONNX graph on."""
    settings = result.scorer.settings
    inputs = build_inputs(data.test, few2many_rows(data.test, samples, settings.seed + 1), crm, texts, settings)
    return list(scoring_batches(inputs, RecLoraCollator(result.tokenizer, settings.max_prompt_tokens), batch_size))


def train_reclora(data: CtrData, crm: DinModel, texts: ItemTexts, settings: RecLoraConfig,
                  tracker: Tracker | None = None) -> RecLoraResult:
    """Few2Many: the bank and the gate learn from a sample of the train split, the CRM is frozen."""
    seconds: dict[str, float] = {}
    started = time.perf_counter()
    train_rows = few2many_rows(data.train, settings.train_samples, settings.seed)
    train_inputs = build_inputs(data.train, train_rows, crm, texts, settings)
    if len(np.unique(train_inputs.labels)) < 2:
        raise DataError(f"RecLoRA training: the {len(train_rows)} sampled train samples hold a single label")
    test_rows = few2many_rows(data.test, settings.eval_samples or len(data.test), settings.seed)
    test_inputs = build_inputs(data.test, test_rows, crm, texts, settings)
    seconds["prompts"] = round(time.perf_counter() - started, 1)

    set_seed(settings.seed)  # the bank's A matrices and the gate start from the seed
    scorer, tokenizer = build_scorer(settings, crm.representation_dim)
    collator = RecLoraCollator(tokenizer, settings.max_prompt_tokens)
    began = time.perf_counter()
    _fit(scorer, RecLoraDataset(train_inputs), collator, settings, tracker or Tracker(None))
    seconds["train"] = round(time.perf_counter() - began, 1)
    seconds["train_samples_per_s"] = round(len(train_inputs) * settings.epochs / max(seconds["train"], 1e-9), 2)

    began = time.perf_counter()
    probabilities = predict_reclora(scorer, test_inputs, collator, settings.eval_batch_size)
    seconds["test"] = round(time.perf_counter() - began, 1)
    seconds["test_samples_per_s"] = round(len(test_inputs) / max(seconds["test"], 1e-9), 2)
    test_split = take_rows(data.test, test_rows)
    din = predict_din(crm, test_split)
    return RecLoraResult(scorer, tokenizer, ctr_metrics(test_inputs.labels, probabilities, test_inputs.user_index),
                         ctr_metrics(test_split.label, din, test_split.user_index), len(train_inputs),
                         len(test_inputs), seconds)


def _fit(scorer: RecLoraScorer, dataset: RecLoraDataset, collator: RecLoraCollator, settings: RecLoraConfig,
         tracker: Tracker) -> None:
    """transformers' Trainer over the bank and the gate (the LLM's own weights are frozen)."""
    steps = math.ceil(math.ceil(len(dataset) / settings.batch_size) * settings.epochs)
    with tempfile.TemporaryDirectory(prefix="towerline-reclora-") as scratch:
        args = TrainingArguments(
            output_dir=scratch, num_train_epochs=settings.epochs, per_device_train_batch_size=settings.batch_size,
            learning_rate=settings.learning_rate, lr_scheduler_type="linear", warmup_steps=max(1, steps // 20),
            optim="adamw_torch", weight_decay=0.0, save_strategy="no", logging_steps=max(1, steps // 20),
            seed=settings.seed, use_cpu=not torch.cuda.is_available(), remove_unused_columns=False,
            report_to="none", disable_tqdm=True, dataloader_num_workers=0,
        )
        trainer = Trainer(model=scorer, args=args, data_collator=collator, train_dataset=dataset,
                          callbacks=[ProgressAndTracking(tracker, steps, stage="reclora")])
        trainer.remove_callback(PrinterCallback)  # progress and losses go through ProgressAndTracking
        trainer.train()
    scorer.to("cpu").eval()


@torch.no_grad()
def predict_reclora(scorer: RecLoraScorer, inputs: RecLoraInputs, collator: RecLoraCollator,
                    batch_size: int) -> np.ndarray:
    """Click probabilities in the inputs' order."""
    scorer.eval()
    probabilities = []
    with progress_bar("reclora score", len(inputs)) as bar:
        for batch in scoring_batches(inputs, collator, batch_size):
            probabilities.append(torch.sigmoid(scorer(**batch)["logits"]).numpy())
            bar.advance(0, len(batch["input_ids"]))
    return np.concatenate(probabilities) if probabilities else np.zeros(0, dtype=np.float32)

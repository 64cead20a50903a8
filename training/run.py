"""Stage 1 driver: pairs artifact → contrastively trained dual encoder artifact."""

from __future__ import annotations

from pathlib import Path

import torch

from towerline.artifacts import Manifest
from towerline.config import TowerlineConfig
from towerline.towers import save_dual_encoder, towers_from_backbone
from towerline.tracking import Tracker
from training.collator import PairCollator
from training.dataset import load_pairs
from training.model import DualEncoderModel, apply_lora, merge_lora
from training.trainer import Trainer


def init_dual_encoder(config: TowerlineConfig, output: Path) -> Manifest:
    """The untrained towers as an artifact: the zero-shot baseline of the same backbone."""
    query_tower, doc_tower = towers_from_backbone(config.encoder)
    return save_dual_encoder(
        query_tower, doc_tower, output, producer="train --zero-shot", config=config,
        metadata={"trained": False, "steps": 0},
    )


def run_train(config: TowerlineConfig, pairs_path: Path, output: Path, tracker: Tracker) -> Manifest | None:
    """Train and write the dual encoder; under DDP only rank 0 writes (and returns) the manifest."""
    train = config.train
    if train.torch_threads:
        torch.set_num_threads(train.torch_threads)
    examples, pairs_manifest = load_pairs(pairs_path)
    query_tower, doc_tower = towers_from_backbone(config.encoder)
    if train.lora:
        apply_lora(query_tower, train.lora_rank)
        apply_lora(doc_tower, train.lora_rank)
    if train.gradient_checkpointing:
        for tower in (query_tower, doc_tower):
            tower.backbone.gradient_checkpointing_enable()
    model = DualEncoderModel(query_tower, doc_tower, train)
    collator = PairCollator(model.query_tower, model.doc_tower, train.hard_negatives, train.seed)
    trainer = Trainer(model, collator, train, tracker)
    result = trainer.fit(examples)
    tracker.metrics({"train.final_loss": result.final_loss, "train.seconds": result.seconds,
                     "train.examples_per_second": result.examples_per_second})
    if trainer.rank != 0:
        return None
    model.to("cpu")
    if train.lora:
        merge_lora(model.query_tower)
        if not train.shared_towers:
            merge_lora(model.doc_tower)
    return save_dual_encoder(
        model.query_tower,
        model.doc_tower,
        output,
        producer="train",
        config=config,
        inputs={"pairs": pairs_manifest},
        metadata={
            "trained": True,
            "steps": result.steps,
            "final_loss": result.final_loss,
            "mean_loss": result.mean_loss,
            "train_seconds": round(result.seconds, 2),
            "temperature": model.loss.temperature,
        },
    )

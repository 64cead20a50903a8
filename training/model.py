"""Dual-encoder training model: query tower, doc tower, InfoNCE loss."""

from __future__ import annotations

import torch

from towerline.config import TrainConfig
from towerline.encoder import Tower
from training.collator import DualBatch
from training.losses import InfoNCELoss


class DualEncoderModel(torch.nn.Module):
    def __init__(self, query_tower: Tower, doc_tower: Tower, train: TrainConfig) -> None:
        super().__init__()
        self.query_tower = query_tower
        # Shared towers tie the doc tower to the query tower's weights (one backbone).
        self.doc_tower = doc_tower if not train.shared_towers else _share(query_tower, doc_tower)
        self.loss = InfoNCELoss(train.temperature, train.learn_temperature)

    def encode_query(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.query_tower(**batch)

    def encode_passage(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.doc_tower(**batch)

    def compute_loss(self, batch: DualBatch) -> torch.Tensor:
        return self.loss(self.encode_query(batch.queries), self.encode_passage(batch.docs))

    def forward(self, batch: DualBatch) -> torch.Tensor:
        return self.compute_loss(batch)


def _share(query_tower: Tower, doc_tower: Tower) -> Tower:
    return Tower(query_tower.backbone, doc_tower.tokenizer, doc_tower.spec)


def apply_lora(tower: Tower, rank: int) -> None:
    """Wrap the backbone with peft LoRA; peft picks the attention projections by model type."""
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.05)
    tower.backbone = get_peft_model(tower.backbone, lora)


def merge_lora(tower: Tower) -> None:
    """Fold LoRA weights back so the saved tower is a plain Hugging Face model."""
    if hasattr(tower.backbone, "merge_and_unload"):
        tower.backbone = tower.backbone.merge_and_unload()

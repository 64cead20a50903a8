"""Dual-encoder training model: query tower, doc tower, InfoNCE loss (Tevatron-style)."""

from __future__ import annotations

import torch

from towerline.config import TrainConfig
from towerline.encoder import Tower
from training.losses import InfoNCELoss


class DualEncoderModel(torch.nn.Module):
    """`forward` takes a collated batch and returns {"loss": ...}, as transformers' Trainer expects."""

    def __init__(self, query_tower: Tower, doc_tower: Tower, train: TrainConfig) -> None:
        super().__init__()
        self.query_tower = query_tower
        if train.shared_towers:
            # One backbone for both roles. The doc tower is not registered a second time: the
            # state dict (checkpoints, DDP) must hold each weight once.
            self.__dict__["_doc_tower"] = Tower(query_tower.backbone, doc_tower.tokenizer, doc_tower.spec)
        else:
            self._doc_tower = doc_tower
        self.loss = InfoNCELoss(train.temperature, train.learn_temperature)

    @property
    def doc_tower(self) -> Tower:
        return self._doc_tower

    def encode_query(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.query_tower(input_ids=input_ids, attention_mask=attention_mask)

    def encode_passage(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.doc_tower(input_ids=input_ids, attention_mask=attention_mask)

    def forward(
        self,
        query_input_ids: torch.Tensor,
        query_attention_mask: torch.Tensor,
        doc_input_ids: torch.Tensor,
        doc_attention_mask: torch.Tensor,
        doc_keys: torch.Tensor | None = None,
        positive_keys: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        query_embeddings = self.encode_query(query_input_ids, query_attention_mask)
        doc_embeddings = self.encode_passage(doc_input_ids, doc_attention_mask)
        return {"loss": self.loss(query_embeddings, doc_embeddings, doc_keys, positive_keys)}


def prepare_backbone(tower: Tower, lora_rank: int | None, gradient_checkpointing: bool) -> None:
    """Gradient checkpointing, then LoRA (peft picks the attention projections by model type).

    Non-reentrant checkpointing keeps gradients flowing to the adapters even though the frozen
    embeddings' outputs do not require grad (the reentrant variant silently trains nothing).
    """
    if gradient_checkpointing:
        tower.backbone.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if lora_rank is not None:
        from peft import LoraConfig, get_peft_model

        lora = LoraConfig(r=lora_rank, lora_alpha=2 * lora_rank, lora_dropout=0.05)
        tower.backbone = get_peft_model(tower.backbone, lora)


def merge_lora(tower: Tower) -> None:
    """Fold LoRA weights back so the saved tower is a plain Hugging Face model."""
    if hasattr(tower.backbone, "merge_and_unload"):
        tower.backbone = tower.backbone.merge_and_unload()

"""Stage 1 driver: pairs artifact → contrastively trained dual encoder artifact."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from towerline.artifacts import Manifest
from towerline.beir import load_dataset
from towerline.config import TowerlineConfig, TrainConfig
from towerline.encoder import Tower
from towerline.errors import ConfigError
from towerline.hf_trainer import (
    OrderedLossTrainer,
    ProgressAndTracking,
    last_checkpoint,
    leave_process_group,
    training_arguments,
)
from towerline.templates import DEFAULT_DOC_TEMPLATE
from towerline.towers import save_dual_encoder, towers_from_backbone
from towerline.tracking import Tracker
from training.batching import arrange
from training.collator import PairCollator
from training.dataset import ArrangedPairs, load_pairs
from training.dev import KeepBestOnDev, hold_out_dev
from training.grad_cache import GradCacheTrainer
from training.model import DualEncoderModel, merge_lora, prepare_backbone


def init_dual_encoder(config: TowerlineConfig, output: Path) -> Manifest:
    """The untrained towers as an artifact: the zero-shot baseline of the same backbone."""
    query_tower, doc_tower = towers_from_backbone(config.encoder)
    return save_dual_encoder(
        query_tower, doc_tower, output, producer="train --zero-shot", config=config,
        metadata={"trained": False, "steps": 0},
    )


def checkpoint_dir(config: TowerlineConfig, output: Path) -> Path:
    return config.train.checkpoint_dir or output.parent / f"{output.name}.checkpoints"


def run_train(
    config: TowerlineConfig, pairs_path: Path, output: Path, tracker: Tracker, *, resume: bool = False
) -> Manifest | None:
    """Train and write the dual encoder; under DDP only rank 0 writes (and returns) the manifest."""
    train = config.train
    if train.torch_threads:
        torch.set_num_threads(train.torch_threads)
    pairs, pairs_manifest = load_pairs(pairs_path)
    require_same_template(pairs_manifest, config, pairs_path)
    dev = None
    if train.dev_queries:
        corpus = load_dataset(config.data).corpus
        pairs, dev = hold_out_dev(pairs, train.dev_queries, train.dev_pool, corpus, train.seed,
                                 config.encoder.doc_template)
    accumulation = train.gradient_accumulation_steps
    # Under DDP every rank takes one batch of train.batch_size per micro-step, rank r the r-th of each
    # run of world_size consecutive batches (accelerate deals them round-robin). Laying the order out
    # in global batches of batch_size x world_size distinct queries makes those batches the slices of
    # one global batch, so N ranks of B train exactly as one process of N x B (same batches, negatives
    # and loss; tests/test_torchrun_parity.py).
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    global_batch = train.batch_size * world_size
    try:
        order = arrange([e.query_id for e in pairs.examples], global_batch, train.epochs, train.seed,
                        train.max_steps * accumulation if train.max_steps else None)
    except ValueError as exc:
        ranks = f" x {world_size} ranks" if world_size > 1 else ""
        raise ConfigError(f"train.batch_size={train.batch_size}{ranks}: {exc}; lower train.batch_size") from None
    total_steps = max(1, len(order) // global_batch // accumulation)
    torch.manual_seed(train.seed)  # LoRA adapters start from the same random init every run
    model = build_model(config)
    collator = PairCollator(model.query_tower, model.doc_tower, train.hard_negatives, pairs.known_positives,
                            train.seed)
    progress = ProgressAndTracking(tracker, total_steps)
    steps_per_epoch = max(1, len(pairs.examples) // global_batch // accumulation)
    keep_best = KeepBestOnDev(model, dev, tracker, steps_per_epoch) if dev else None
    checkpoints = checkpoint_dir(config, output)
    trainer_class, extra = ((GradCacheTrainer, {"chunk_size": train.grad_cache_chunk}) if train.grad_cache_chunk
                            else (OrderedLossTrainer, {}))
    trainer = trainer_class(
        model=model,
        args=training_arguments(train, checkpoints, total_steps, fsdp_blocks(model, train) if train.fsdp else None),
        data_collator=collator,
        train_dataset=ArrangedPairs(pairs.examples, order),
        callbacks=[progress, *([keep_best] if keep_best else [])],
        **extra,
    )
    outcome = trainer.train(resume_from_checkpoint=last_checkpoint(checkpoints) if resume else None)
    dev_record = keep_best.restore_best() if keep_best else None
    seconds = outcome.metrics.get("train_runtime", 0.0)
    tracker.metrics({"train.final_loss": progress.losses[-1] if progress.losses else outcome.training_loss,
                     "train.seconds": seconds,
                     "train.examples_per_second": outcome.metrics.get("train_samples_per_second", 0.0)})
    try:
        # Under FSDP each rank holds a shard: every rank takes part in gathering the full weights,
        # which rank 0 loads into a fresh copy of the model to save.
        trained = full_model(trainer, config) if train.fsdp else model
        if not trainer.is_world_process_zero():
            return None
        query_tower, doc_tower = finished_towers(trained.to("cpu"), config)
        return save_dual_encoder(
            query_tower,
            doc_tower,
            output,
            producer="train",
            config=config,
            inputs={"pairs": pairs_manifest},
            metadata={
                "trained": True,
                "steps": outcome.global_step,
                "final_loss": progress.losses[-1] if progress.losses else outcome.training_loss,
                "mean_loss": outcome.training_loss,
                # The loss of every logging step (train.log_every), averaged over the ranks' equal shares
                # of the global batch: the curve that runs of other world sizes are compared by.
                "loss_history": progress.history,
                "world_size": world_size,
                "global_batch_size": global_batch,
                "train_seconds": round(seconds, 2),
                "temperature": model.loss.temperature,
                "resumed": resume,
                "dev": dev_record,
            },
        )
    finally:
        leave_process_group()


def fsdp_blocks(model: DualEncoderModel, train: TrainConfig) -> list[str]:
    """The block classes FSDP wraps one by one: train.fsdp_wrap, else the backbones' _no_split_modules."""
    if not torch.cuda.is_available():
        # Checked: on CPU ranks transformers' Trainer leaves FSDP off and trains with DDP, silently.
        raise ConfigError("train.fsdp needs CUDA GPUs (transformers' Trainer shards with FSDP only on GPUs; "
                          "on CPU it would silently replicate the towers with DDP); unset train.fsdp")
    if train.fsdp_wrap:
        return list(train.fsdp_wrap)
    blocks = sorted({name for tower in (model.query_tower, model.doc_tower)
                     for name in getattr(tower.backbone, "_no_split_modules", None) or []})
    if not blocks:
        raise ConfigError("train.fsdp: the backbone names no transformer block class (_no_split_modules); "
                          "set train.fsdp_wrap=[BlockClassName]")
    return blocks


def full_model(trainer: Any, config: TowerlineConfig) -> DualEncoderModel:
    """The trained weights gathered from every FSDP rank (a collective: all ranks call it), loaded on
    rank 0 into a fresh model; other ranks get their wrapped model back unused."""
    state = trainer.accelerator.get_state_dict(trainer.model)
    if not trainer.is_world_process_zero():
        return trainer.model
    fresh = build_model(config)
    fresh.load_state_dict(state)
    return fresh


def require_same_template(pairs_manifest: Manifest, config: TowerlineConfig, pairs_path: Path) -> None:
    """The pairs hold documents already rendered; a tower trained on one template must not be saved
    claiming another (the index would render documents differently from training)."""
    rendered_with = pairs_manifest.metadata.get("doc_template", DEFAULT_DOC_TEMPLATE)
    if rendered_with != config.encoder.doc_template:
        raise ConfigError(f"{pairs_path}: pairs rendered documents with encoder.doc_template={rendered_with!r}, "
                          f"but this run has {config.encoder.doc_template!r}; rebuild the pairs with it")


def build_model(config: TowerlineConfig) -> DualEncoderModel:
    train = config.train
    query_tower, doc_tower = towers_from_backbone(config.encoder)
    lora_rank = train.lora_rank if train.lora else None
    prepare_backbone(query_tower, lora_rank, train.gradient_checkpointing)
    if not train.shared_towers:
        prepare_backbone(doc_tower, lora_rank, train.gradient_checkpointing)
    return DualEncoderModel(query_tower, doc_tower, train)


def finished_towers(model: DualEncoderModel, config: TowerlineConfig) -> tuple[Tower, Tower]:
    """LoRA folded into plain models; shared towers saved as two copies of the one merged backbone."""
    query_tower, doc_tower = model.query_tower, model.doc_tower
    if config.train.lora:
        merge_lora(query_tower)
        if not config.train.shared_towers:
            merge_lora(doc_tower)
    if config.train.shared_towers:
        doc_tower = Tower(query_tower.backbone, doc_tower.tokenizer, doc_tower.spec)
    return query_tower, doc_tower

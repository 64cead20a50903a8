"""transformers' Trainer as the one training loop of every stage (as Tevatron and FlagEmbedding
use it): our models, losses and collators; the library's loop for checkpoints and exact resume
(model, optimizer, scheduler, RNG, data position), mixed precision with a grad scaler for fp16,
weight-decay groups, gradient accumulation and DDP under torchrun. Stage 1 (`training/`) and
stage 2 (`distill/`) both run on it."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset, SequentialSampler
from transformers import PrinterCallback, Trainer, TrainerCallback, TrainingArguments
from transformers.trainer import TRAINER_STATE_NAME

from towerline.config import LoopConfig
from towerline.errors import ConfigError
from towerline.progress import progress_bar
from towerline.tracking import Tracker

log = logging.getLogger(__name__)


class OrderedLossTrainer(Trainer):
    """A Trainer for models whose forward returns {"loss": ...}, over a dataset already laid out in
    training order (shuffled per epoch from a seed by the caller)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # Progress and metrics go through ProgressAndTracking; the default printer would repeat
        # every log line as a raw dict on stdout.
        self.remove_callback(PrinterCallback)

    def compute_loss(self, model: torch.nn.Module, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: Any = None) -> Any:
        outputs = model(**inputs)
        return (outputs["loss"], outputs) if return_outputs else outputs["loss"]

    def _get_train_sampler(self, train_dataset: Dataset | None = None) -> SequentialSampler:
        # The batches are laid out in the dataset already (e.g. distinct queries per batch, per epoch).
        return SequentialSampler(train_dataset if train_dataset is not None else self.train_dataset)


class ProgressAndTracking(TrainerCallback):
    """Our rich progress bar and MLflow tracker, fed from the Trainer's own events."""

    def __init__(self, tracker: Tracker, total_steps: int, stage: str = "train") -> None:
        self.tracker = tracker
        self.total_steps = total_steps
        self.stage = stage
        self.losses: list[float] = []
        # {"step", "loss"} per log: the loss averaged over the steps since the previous log.
        self.history: list[dict[str, float]] = []
        self._bar_context: Any = None
        self._bar: Any = None

    def on_train_begin(self, args: TrainingArguments, state: Any, control: Any, **kwargs: Any) -> None:
        if state.is_world_process_zero:
            self._bar_context = progress_bar(self.stage, self.total_steps)
            self._bar = self._bar_context.__enter__()
            self._bar.update(0, completed=state.global_step)

    def on_step_end(self, args: TrainingArguments, state: Any, control: Any, **kwargs: Any) -> None:
        if self._bar is not None:
            self._bar.update(0, completed=state.global_step)

    def on_log(self, args: TrainingArguments, state: Any, control: Any, logs: dict | None = None,
               **kwargs: Any) -> None:
        if not state.is_world_process_zero or not logs or "loss" not in logs:
            return
        self.losses.append(float(logs["loss"]))
        self.history.append({"step": state.global_step, "loss": float(logs["loss"])})
        model = kwargs.get("model")
        metrics = {f"{self.stage}.loss": float(logs["loss"]),
                   f"{self.stage}.learning_rate": float(logs.get("learning_rate", 0.0))}
        if model is not None and hasattr(getattr(model, "loss", None), "temperature"):
            metrics[f"{self.stage}.temperature"] = model.loss.temperature
        self.tracker.metrics(metrics, step=state.global_step)

    def on_train_end(self, args: TrainingArguments, state: Any, control: Any, **kwargs: Any) -> None:
        if self._bar_context is not None:
            self._bar_context.__exit__(None, None, None)
            self._bar_context = self._bar = None


def mixed_precision(precision: str) -> dict[str, bool]:
    """Trainer flags for train.precision: bf16 autocast, or fp16 with the library's grad scaler (GPU only)."""
    cuda = torch.cuda.is_available()
    if precision == "auto":
        precision = ("bf16" if torch.cuda.is_bf16_supported() else "fp16") if cuda else "fp32"
    if precision == "fp16" and not cuda:
        raise ConfigError("train.precision=fp16 needs a CUDA GPU (fp16 trains with a grad scaler); "
                          "use bf16 or fp32 on CPU")
    return {"bf16": precision == "bf16", "fp16": precision == "fp16"}


def training_arguments(train: LoopConfig, checkpoint_dir: Path, total_steps: int,
                       fsdp_wrap: list[str] | None = None) -> TrainingArguments:
    """`fsdp_wrap`: shard with FSDP (full shard), each block of these classes wrapped on its own."""
    fsdp = {} if fsdp_wrap is None else {
        "fsdp": "full_shard auto_wrap",
        # The full state dict on rank 0 when the artifact is written (gathered by the caller).
        "fsdp_config": {"transformer_layer_cls_to_wrap": fsdp_wrap, "state_dict_type": "FULL_STATE_DICT"},
    }
    return TrainingArguments(
        output_dir=str(checkpoint_dir),
        max_steps=total_steps,
        per_device_train_batch_size=train.batch_size,
        gradient_accumulation_steps=train.gradient_accumulation_steps,
        learning_rate=train.learning_rate,
        weight_decay=train.weight_decay,  # the Trainer exempts biases and norm weights
        warmup_steps=int(total_steps * train.warmup_ratio),
        lr_scheduler_type="linear",
        max_grad_norm=1.0,
        optim="adamw_torch",
        logging_steps=train.log_every,
        save_strategy="steps" if train.save_steps else "no",
        save_steps=train.save_steps or total_steps,
        save_total_limit=train.save_total_limit,
        seed=train.seed,
        use_cpu=not torch.cuda.is_available(),
        report_to="none",
        disable_tqdm=True,
        remove_unused_columns=False,
        dataloader_num_workers=0,
        # Backbones carry parameters our pooling never uses (BERT's pooler head): DDP must expect them.
        ddp_find_unused_parameters=True,
        **mixed_precision(train.precision),
        **fsdp,
    )


def leave_process_group() -> None:
    """Under torchrun: every rank waits until rank 0 has written the artifact, then the group is torn
    down. A rank that exits while gloo still serves the others is aborted (SIGABRT, "terminate called
    without an active exception"), which fails the whole torchrun."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def last_checkpoint(checkpoint_dir: Path) -> str:
    """The newest complete checkpoint-N. The Trainer writes trainer_state.json last, so a process
    killed while writing a checkpoint leaves one without it (or with it cut short): skipped, and the
    run resumes from the one before."""
    numbered = sorted(((int(path.name.split("-")[1]), path) for path in checkpoint_dir.glob("checkpoint-*")
                       if path.is_dir() and path.name.split("-")[1].isdigit()), reverse=True)
    for _, path in numbered:
        try:
            json.loads((path / TRAINER_STATE_NAME).read_text())
        except (OSError, ValueError):
            log.warning("%s: incomplete checkpoint (no readable %s), skipped", path, TRAINER_STATE_NAME)
            continue
        return str(path)
    raise ConfigError(f"--resume: no complete checkpoint-N directory under {checkpoint_dir} (set save_steps)")

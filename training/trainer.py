"""The one training loop: AdamW + linear warmup/decay, autocast on GPU, DDP when launched by torchrun."""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, DistributedSampler, RandomSampler
from transformers import get_linear_schedule_with_warmup

from towerline.config import TrainConfig
from towerline.progress import progress_bar
from towerline.tracking import Tracker
from training.collator import PairCollator
from training.dataset import PairExample
from training.model import DualEncoderModel


@dataclass
class TrainResult:
    steps: int
    final_loss: float
    mean_loss: float
    seconds: float
    examples_per_second: float


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    if precision == "fp32" or (precision == "auto" and device.type != "cuda"):
        return None
    if precision == "fp16":
        return torch.float16
    return torch.bfloat16


def init_distributed() -> tuple[int, int, torch.device]:
    """Returns (rank, world size, device); initialises the process group under torchrun."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    rank = dist.get_rank() if dist.is_initialized() else 0
    if torch.cuda.is_available():
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local_rank)
        return rank, world_size, torch.device("cuda", local_rank)
    return rank, world_size, torch.device("cpu")


class Trainer:
    def __init__(self, model: DualEncoderModel, collator: PairCollator, train: TrainConfig, tracker: Tracker):
        self.model = model
        self.collator = collator
        self.train_config = train
        self.tracker = tracker
        self.rank, self.world_size, self.device = init_distributed()

    def _loader(self, examples: list[PairExample]) -> DataLoader:
        generator = torch.Generator().manual_seed(self.train_config.seed)
        sampler = (
            DistributedSampler(examples, seed=self.train_config.seed)
            if self.world_size > 1
            else RandomSampler(examples, generator=generator)
        )
        return DataLoader(
            examples,
            batch_size=self.train_config.batch_size,
            sampler=sampler,
            collate_fn=self.collator,
            drop_last=len(examples) >= self.train_config.batch_size,
        )

    def total_steps(self, loader: DataLoader) -> int:
        """train.max_steps, when set, overrides train.epochs (as in Hugging Face's Trainer)."""
        return self.train_config.max_steps or math.ceil(len(loader) * self.train_config.epochs)

    def fit(self, examples: list[PairExample]) -> TrainResult:
        config = self.train_config
        torch.manual_seed(config.seed)
        loader = self._loader(examples)
        steps = self.total_steps(loader)
        self.model.to(self.device).train()
        module = self._wrap_ddp()
        optimizer = torch.optim.AdamW(
            [p for p in self.model.parameters() if p.requires_grad],
            lr=config.learning_rate,
            weight_decay=config.weight_decay,
        )
        schedule = get_linear_schedule_with_warmup(optimizer, int(steps * config.warmup_ratio), steps)
        amp_dtype = autocast_dtype(config.precision, self.device)
        losses: list[float] = []
        started = time.perf_counter()
        with progress_bar("train", steps) as bar:
            for step, batch in enumerate(self._batches(loader, steps), start=1):
                with torch.autocast(self.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                    loss = module(self._to_device(batch))
                loss.backward()
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
                optimizer.step()
                schedule.step()
                optimizer.zero_grad(set_to_none=True)
                losses.append(float(loss.detach()))
                bar.advance(0, 1)
                if step % config.log_every == 0 or step == steps:
                    self._log(step, losses, schedule.get_last_lr()[0])
        seconds = time.perf_counter() - started
        return TrainResult(
            steps=len(losses),
            final_loss=losses[-1] if losses else float("nan"),
            mean_loss=sum(losses) / max(len(losses), 1),
            seconds=seconds,
            examples_per_second=len(losses) * config.batch_size / max(seconds, 1e-9),
        )

    def _wrap_ddp(self) -> torch.nn.Module:
        if self.world_size == 1:
            return self.model
        device_ids = [self.device.index] if self.device.type == "cuda" else None
        return torch.nn.parallel.DistributedDataParallel(self.model, device_ids=device_ids)

    def _batches(self, loader: DataLoader, steps: int):
        done, epoch = 0, 0
        while done < steps:
            if isinstance(loader.sampler, DistributedSampler):
                loader.sampler.set_epoch(epoch)
            for batch in loader:
                yield batch
                done += 1
                if done >= steps:
                    return
            epoch += 1

    def _to_device(self, batch):
        batch.queries = {k: v.to(self.device) for k, v in batch.queries.items()}
        batch.docs = {k: v.to(self.device) for k, v in batch.docs.items()}
        return batch

    def _log(self, step: int, losses: list[float], learning_rate: float) -> None:
        if self.rank != 0:
            return
        window = losses[-self.train_config.log_every :]
        self.tracker.metrics(
            {
                "train.loss": sum(window) / len(window),
                "train.learning_rate": learning_rate,
                "train.temperature": self.model.loss.temperature,
            },
            step=step,
        )

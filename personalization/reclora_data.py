"""CTR samples → RecLoRA's inputs: a prompt (short text history picked from the long ID history,
target title) and the CRM's user representation (the gate's input), per sample.

Few2Many: `few2many_rows` draws the LLM's training sample from the train split; the CRM that
computes the representations was trained on all of it.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset

from personalization.din import DinModel
from personalization.interactions import CtrSplit, split_batch
from personalization.reclora_prompt import PromptItem, build_prompt, pick_short_history
from towerline.config import RecLoraConfig


@dataclass(frozen=True)
class ItemTexts:
    """Titles by item index, their L2-normalised text-tower vectors, and each user's rating of each item."""

    titles: list[str]
    title_vectors: np.ndarray
    ratings: Mapping[tuple[int, int], float]

    @classmethod
    def load(cls, interactions: Path, items: int, title_encoder: str) -> ItemTexts:
        """Embeds every title with the text tower `title_encoder`."""
        from personalization.two_tower_run import title_embeddings
        from towerline.config import TwoTowerConfig

        vectors = title_embeddings(interactions, TwoTowerConfig(title_encoder=title_encoder), items)
        norms = np.linalg.norm(vectors, axis=1, keepdims=True)
        return cls.with_vectors(interactions, vectors / np.maximum(norms, 1e-12))

    @classmethod
    def with_vectors(cls, interactions: Path, title_vectors: np.ndarray) -> ItemTexts:
        """Titles and ratings from the interactions artifact, title vectors as given (e.g. saved ones)."""
        table = pd.read_parquet(interactions / "items.parquet", columns=["item_index", "title"])
        titles = [""] * len(title_vectors)
        for index, title in zip(table["item_index"].tolist(), table["title"].fillna("").tolist(), strict=True):
            titles[index] = title
        samples = pd.read_parquet(interactions / "samples.parquet", columns=["user_index", "item_index", "rating"])
        # A history item is strictly earlier than the sample: its rating was known when the sample happened.
        ratings = {(user, item): rating for user, item, rating in zip(
            samples["user_index"].tolist(), samples["item_index"].tolist(), samples["rating"].tolist(), strict=True)
            if rating == rating}  # NaN (a click without a rating) is left out
        return cls(titles, title_vectors, ratings)

    def prompt(self, user: int, long_history: Sequence[int], target: int, settings: RecLoraConfig) -> str:
        """The CTR prompt for `target`: the short history picked from `long_history` (oldest first)."""
        picked = pick_short_history(long_history, target, self.title_vectors, settings.prompt_history,
                                    settings.prompt_history_mode)
        history = [PromptItem(self.titles[item], self.ratings.get((user, item))) for item in picked]
        return build_prompt(history, self.titles[target])


@dataclass(frozen=True)
class RecLoraInputs:
    prompts: list[str]
    user_representation: np.ndarray  # float32 [n, D]
    labels: np.ndarray  # float32 [n]
    user_index: np.ndarray  # int64 [n]

    def __len__(self) -> int:
        return len(self.prompts)


def few2many_rows(split: CtrSplit, count: int, seed: int) -> np.ndarray:
    """A seeded sample of `count` rows (all of them when the split is smaller), in split order."""
    if count >= len(split):
        return np.arange(len(split))
    return np.sort(np.random.default_rng(seed).choice(len(split), size=count, replace=False))


@torch.no_grad()
def build_inputs(split: CtrSplit, rows: np.ndarray, crm: DinModel, texts: ItemTexts, settings: RecLoraConfig,
                 batch_size: int = 1024) -> RecLoraInputs:
    """`split` holds the long ID history (the CRM's length); the prompt gets `settings.prompt_history` of it."""
    representations = []
    for start in range(0, len(rows), batch_size):
        batch = split_batch(split, rows[start:start + batch_size], labels=False)
        representations.append(crm.user_representation(batch).float().numpy())
    prompts = [texts.prompt(int(split.user_index[row]), split.history[row, : split.history_length[row]].tolist(),
                            int(split.item_index[row]), settings) for row in rows.tolist()]
    width = crm.representation_dim
    return RecLoraInputs(prompts, np.concatenate(representations) if representations else np.zeros((0, width)),
                         split.label[rows].astype(np.float32), split.user_index[rows].astype(np.int64))


class RecLoraDataset(Dataset):
    def __init__(self, inputs: RecLoraInputs) -> None:
        self.inputs = inputs

    def __len__(self) -> int:
        return len(self.inputs)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {"prompt": self.inputs.prompts[index], "user_representation": self.inputs.user_representation[index],
                "labels": self.inputs.labels[index]}


class RecLoraCollator:
    """Tokenises prompts (left padding, left truncation to max_prompt_tokens) and stacks the rest."""

    def __init__(self, tokenizer: Any, max_tokens: int) -> None:
        self.tokenizer = tokenizer
        self.max_tokens = max_tokens

    def __call__(self, rows: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        encoded = self.tokenizer([row["prompt"] for row in rows], padding=True, truncation=True,
                                 max_length=self.max_tokens, return_tensors="pt")
        batch = {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"],
                 "user_representation": torch.as_tensor(np.stack([row["user_representation"] for row in rows]),
                                                        dtype=torch.float32)}
        if all(row.get("labels") is not None for row in rows):
            batch["labels"] = torch.as_tensor([row["labels"] for row in rows], dtype=torch.float32)
        return batch


def scoring_batches(inputs: RecLoraInputs, collator: RecLoraCollator, batch_size: int
                    ) -> Iterator[dict[str, torch.Tensor]]:
    """Collated batches of `inputs` in order, without labels (what the scorer and its graph take)."""
    dataset = RecLoraDataset(inputs)
    for start in range(0, len(dataset), batch_size):
        batch = collator([dataset[index] for index in range(start, min(start + batch_size, len(dataset)))])
        batch.pop("labels", None)
        yield batch

"""Batch assembly: tokenise and pad at batch time, with each tower's own tokenizer."""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from towerline.encoder import Tower
from training.dataset import PairExample


@dataclass
class DualBatch:
    queries: dict[str, torch.Tensor]
    # Rows 0..B-1 are the positives (row i belongs to query i), then B*H hard negatives.
    docs: dict[str, torch.Tensor]
    batch_size: int


class PairCollator:
    def __init__(self, query_tower: Tower, doc_tower: Tower, hard_negatives: int, seed: int) -> None:
        self.query_tower = query_tower
        self.doc_tower = doc_tower
        self.hard_negatives = hard_negatives
        self.rng = random.Random(seed)

    def __call__(self, examples: list[PairExample]) -> DualBatch:
        positives = [example.positive_text for example in examples]
        negatives = [text for example in examples for text in self._pick_negatives(example)]
        return DualBatch(
            queries=self.query_tower.tokenize([example.query_text for example in examples]),
            docs=self.doc_tower.tokenize(positives + negatives),
            batch_size=len(examples),
        )

    def _pick_negatives(self, example: PairExample) -> list[str]:
        """A fixed number per query keeps the score matrix rectangular; short lists are padded by repeats."""
        if self.hard_negatives == 0 or not example.negative_texts:
            return []
        pool = list(example.negative_texts)
        if len(pool) >= self.hard_negatives:
            return self.rng.sample(pool, self.hard_negatives)
        return [pool[i % len(pool)] for i in range(self.hard_negatives)]

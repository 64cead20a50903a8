"""Batch assembly: tokenise and pad at batch time with each tower's own tokenizer, and give the
loss what it needs to never score a known positive as a negative (document keys)."""

from __future__ import annotations

import hashlib
import random

import torch

from towerline.encoder import Tower
from training.dataset import PairExample

NO_KEY = -1


def doc_key(doc_id: str) -> int:
    """A stable 63-bit key per document id: tensors cross devices, strings do not."""
    return int.from_bytes(hashlib.blake2b(doc_id.encode(), digest_size=8).digest(), "big") >> 1


class PairCollator:
    """Docs are laid out as [B positives, then each query's hard negatives]; row i's positive is doc i.

    Up to `hard_negatives` per query are drawn from its mined negatives, seeded by the example's
    position in the training order, so a resumed run draws the same ones. A query with fewer
    negatives contributes fewer rows: the loss gathers uneven batches across ranks.
    """

    def __init__(
        self,
        query_tower: Tower,
        doc_tower: Tower,
        hard_negatives: int,
        known_positives: dict[str, frozenset[str]],
        seed: int,
    ) -> None:
        self.query_tower = query_tower
        self.doc_tower = doc_tower
        self.hard_negatives = hard_negatives
        self.known_positives = known_positives
        self.seed = seed

    def __call__(self, items: list[tuple[int, PairExample]]) -> dict[str, torch.Tensor]:
        examples = [example for _, example in items]
        negatives = [pick for position, example in items for pick in self._pick_negatives(position, example)]
        queries = self.query_tower.tokenize([example.query_text for example in examples])
        doc_ids = [example.positive_id for example in examples] + [doc_id for doc_id, _ in negatives]
        doc_texts = [example.positive_text for example in examples] + [text for _, text in negatives]
        docs = self.doc_tower.tokenize(doc_texts)
        return {
            "query_input_ids": queries["input_ids"],
            "query_attention_mask": queries["attention_mask"],
            "doc_input_ids": docs["input_ids"],
            "doc_attention_mask": docs["attention_mask"],
            "doc_keys": torch.tensor([doc_key(doc_id) for doc_id in doc_ids], dtype=torch.long),
            "positive_keys": self._positive_keys(examples),
        }

    def _pick_negatives(self, position: int, example: PairExample) -> list[tuple[str, str]]:
        pool = list(zip(example.negative_ids, example.negative_texts, strict=True))
        if self.hard_negatives == 0 or not pool:
            return []
        rng = random.Random(self.seed * 1_000_003 + position)
        return rng.sample(pool, min(self.hard_negatives, len(pool)))

    def _positive_keys(self, examples: list[PairExample]) -> torch.Tensor:
        """(B, P): the keys of every known positive of each query, padded with NO_KEY."""
        keys = [[doc_key(doc_id) for doc_id in sorted(self.known_positives.get(e.query_id, {e.positive_id}))]
                for e in examples]
        width = max(len(row) for row in keys)
        return torch.tensor([row + [NO_KEY] * (width - len(row)) for row in keys], dtype=torch.long)

"""Training examples read from a `training-pairs` artifact (Parquet written by the Spark job)."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import pyarrow.parquet as pq
from torch.utils.data import Dataset

from towerline.artifacts import Manifest, read_manifest
from towerline.errors import DataError

PAIRS_KIND = "training-pairs"
PAIRS_FILE = "pairs.parquet"
COLUMNS = ["query_id", "query_text", "positive_id", "positive_text", "negative_ids", "negative_texts"]


@dataclass(frozen=True)
class PairExample:
    query_id: str
    query_text: str
    positive_id: str
    positive_text: str
    negative_ids: tuple[str, ...]
    negative_texts: tuple[str, ...]


@dataclass(frozen=True)
class PairSet:
    examples: list[PairExample]
    # Every positive doc id of each query in the pairs: never a negative for that query, in any batch.
    known_positives: dict[str, frozenset[str]]


def load_pairs(path: Path) -> tuple[PairSet, Manifest]:
    manifest = read_manifest(path, PAIRS_KIND)
    rows = pq.read_table(path / PAIRS_FILE, columns=COLUMNS).to_pylist()
    if not rows:
        raise DataError(f"{path}: the training-pairs artifact holds no pairs")
    positives: dict[str, set[str]] = defaultdict(set)
    for row in rows:
        positives[row["query_id"]].add(row["positive_id"])
    known = {query_id: frozenset(ids) for query_id, ids in positives.items()}
    return PairSet([_example(row, known[row["query_id"]]) for row in rows], known), manifest


def _example(row: dict, known_positives: frozenset[str]) -> PairExample:
    # A negative that is a positive of the same query elsewhere in the pairs would teach the opposite.
    negatives = [
        (doc_id, text)
        for doc_id, text in zip(row["negative_ids"] or (), row["negative_texts"] or (), strict=True)
        if doc_id not in known_positives
    ]
    return PairExample(
        query_id=row["query_id"],
        query_text=row["query_text"],
        positive_id=row["positive_id"],
        positive_text=row["positive_text"],
        negative_ids=tuple(doc_id for doc_id, _ in negatives),
        negative_texts=tuple(text for _, text in negatives),
    )


class ArrangedPairs(Dataset):
    """Examples in training order (see `training/batching.py`); item i is (i, example), so the
    collator can draw negatives from the position alone and a resumed run draws the same ones."""

    def __init__(self, examples: list[PairExample], order: list[int]) -> None:
        self.examples = examples
        self.order = order

    def __len__(self) -> int:
        return len(self.order)

    def __getitem__(self, position: int) -> tuple[int, PairExample]:
        return position, self.examples[self.order[position]]

"""Training examples read from a `training-pairs` artifact (Parquet written by the Spark job)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pyarrow.parquet as pq

from towerline.artifacts import Manifest, read_manifest
from towerline.errors import DataError

PAIRS_KIND = "training-pairs"
PAIRS_FILE = "pairs.parquet"


@dataclass(frozen=True)
class PairExample:
    query_text: str
    positive_text: str
    negative_texts: tuple[str, ...]


def load_pairs(path: Path) -> tuple[list[PairExample], Manifest]:
    manifest = read_manifest(path, PAIRS_KIND)
    table = pq.read_table(path / PAIRS_FILE, columns=["query_text", "positive_text", "negative_texts"])
    examples = [
        PairExample(row["query_text"], row["positive_text"], tuple(row["negative_texts"] or ()))
        for row in table.to_pylist()
    ]
    if not examples:
        raise DataError(f"{path}: the training-pairs artifact holds no pairs")
    return examples, manifest

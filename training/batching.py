"""Batches for contrastive training: every batch holds distinct queries.

The same query twice in one batch would make each of its positives a negative for the other
row. The order is laid out up front for every epoch from a seed, so the trainer reads it
sequentially and a resumed run continues at the same position with the same batches.
"""

from __future__ import annotations

import math
import random
from collections import deque


def epoch_batches(query_ids: list[str], batch_size: int, rng: random.Random) -> list[list[int]]:
    """One epoch: a shuffle, then full batches of distinct queries. An example whose query is
    already in the batch waits for the next one; the last incomplete batch is left out."""
    order = list(range(len(query_ids)))
    rng.shuffle(order)
    queue: deque[int] = deque(order)
    batches: list[list[int]] = []
    batch: list[int] = []
    in_batch: set[str] = set()
    waiting: list[int] = []
    while queue:
        index = queue.popleft()
        if query_ids[index] in in_batch:
            waiting.append(index)
            continue
        batch.append(index)
        in_batch.add(query_ids[index])
        if len(batch) == batch_size:
            batches.append(batch)
            batch, in_batch = [], set()
            queue.extendleft(reversed(waiting))
            waiting = []
    return batches


def arrange(query_ids: list[str], batch_size: int, epochs: float, seed: int, max_steps: int | None = None) -> list[int]:
    """Example indices in training order for `max_steps` batches (default: `epochs` epochs)."""
    rng = random.Random(seed)
    first = epoch_batches(query_ids, batch_size, rng)
    if not first:
        raise ValueError(f"{len(query_ids)} examples make no batch of {batch_size} distinct queries")
    steps = max_steps or max(1, math.ceil(len(first) * epochs))
    batches = list(first)
    while len(batches) < steps:
        batches.extend(epoch_batches(query_ids, batch_size, rng))
    return [index for batch in batches[:steps] for index in batch]

"""Retrieval metrics straight from an encode function and a loaded index, with no service around
them: how distillation scores its student on dev queries and export scores its graph variants."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from evaluation.metrics import Qrels, score_run
from indexing.load import LoadedIndex

DEFAULT_TOP_K = 100


def retrieval_metrics(
    encode: Callable[[list[str]], np.ndarray],
    queries: dict[str, str],
    qrels: Qrels,
    index: LoadedIndex,
    positive_min: int,
    top_k: int = DEFAULT_TOP_K,
) -> dict[str, float]:
    query_ids = list(queries)
    hits = index.search(encode([queries[qid] for qid in query_ids]), top_k)
    run = {qid: dict(found) for qid, found in zip(query_ids, hits, strict=True)}
    return score_run(qrels, run, positive_min)

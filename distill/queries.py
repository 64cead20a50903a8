"""The query texts stage 2 learns from: unlabeled, deduplicated, with a labeled dev set held out.

Training texts: the judged train queries not held out, pseudo-queries drawn from the corpus
(`towerline pseudo-queries`) and any query log a user supplies. Dev: a seeded sample of judged
train queries, scored by retrieval against the teacher's index, never trained on.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import pyarrow.parquet as pq

from towerline.artifacts import read_manifest
from towerline.beir import BeirDataset, Qrels, positives
from towerline.errors import DataError

PSEUDO_QUERIES_KIND = "pseudo-queries"
PSEUDO_QUERIES_FILE = "queries.parquet"


@dataclass(frozen=True)
class DistillQueries:
    train_texts: list[str]
    dev_queries: dict[str, str]
    dev_qrels: Qrels
    sources: dict[str, int]


def collect_queries(
    dataset: BeirDataset,
    split: str,
    positive_min: int,
    dev_count: int,
    seed: int,
    pseudo_queries: Path | None = None,
    query_log: Path | None = None,
) -> DistillQueries:
    qrels = dataset.split(split)
    judged = sorted(qid for qid, docs in qrels.items() if positives(docs, positive_min))
    random.Random(seed).shuffle(judged)
    dev_ids = set(judged[: min(dev_count, len(judged) // 2)])
    train_queries = [dataset.queries[qid] for qid in judged if qid not in dev_ids]
    pseudo = _pseudo_queries(pseudo_queries) if pseudo_queries else []
    logged = _query_log(query_log) if query_log else []
    dev_texts = {dataset.queries[qid] for qid in dev_ids}
    # Deduplicated in first-seen order; a dev query's text never leaks into training.
    texts = [text for text in dict.fromkeys([*train_queries, *pseudo, *logged]) if text not in dev_texts]
    if not texts:
        raise DataError("distill: no query texts to learn from (train queries, pseudo-queries or a query log)")
    return DistillQueries(
        train_texts=texts,
        dev_queries={qid: dataset.queries[qid] for qid in sorted(dev_ids)},
        dev_qrels={qid: qrels[qid] for qid in sorted(dev_ids)},
        sources={"train_queries": len(train_queries), "pseudo_queries": len(pseudo), "query_log": len(logged),
                 "distinct_texts": len(texts), "dev_queries": len(dev_ids)},
    )


def _pseudo_queries(path: Path) -> list[str]:
    read_manifest(path, PSEUDO_QUERIES_KIND)
    return [str(text) for text in pq.read_table(path / PSEUDO_QUERIES_FILE, columns=["query_text"])["query_text"]]


def _query_log(path: Path) -> list[str]:
    if not path.is_file():
        raise DataError(f"distill.query_log: {path} not found")
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]

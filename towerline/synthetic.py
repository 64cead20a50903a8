"""Synthetic BEIR-layout datasets with latent topics, for tests, scale runs and benchmarks.

Each document draws most words from one topic's vocabulary plus a few words of its own;
each query repeats some of its positive document's own words and topic words, so lexical
and dense retrieval both have signal to learn from.
"""

from __future__ import annotations

import json
import random
from pathlib import Path


def _word(rng: random.Random, length: int = 6) -> str:
    return "".join(rng.choice("bcdfghjklmnpqrstvwz") + rng.choice("aeiou") for _ in range(length // 2))


def vocabulary(seed: int = 0, topics: int = 8, words_per_topic: int = 30) -> list[list[str]]:
    rng = random.Random(seed)
    return [[_word(rng) for _ in range(words_per_topic)] for _ in range(topics)]


def write_synthetic_beir(
    root: Path,
    *,
    docs: int = 120,
    queries: int = 60,
    topics: int = 8,
    test_fraction: float = 0.5,
    seed: int = 0,
) -> Path:
    rng = random.Random(seed)
    topic_words = vocabulary(seed, topics)
    root.mkdir(parents=True, exist_ok=True)
    (root / "qrels").mkdir(exist_ok=True)
    doc_records = []
    doc_keywords: list[list[str]] = []
    for index in range(docs):
        topic = index % topics
        own_words = [_word(rng, 8) for _ in range(3)]
        body = rng.choices(topic_words[topic], k=20) + own_words * 2
        rng.shuffle(body)
        doc_keywords.append(own_words + rng.sample(topic_words[topic], 2))
        doc_records.append(
            {"_id": f"d{index}", "title": " ".join(own_words[:2]), "text": " ".join(body), "metadata": {}}
        )
    query_records, qrel_rows = [], []
    for index in range(queries):
        target = rng.randrange(docs)
        words = rng.sample(doc_keywords[target], 3)
        query_records.append({"_id": f"q{index}", "text": " ".join(words), "metadata": {}})
        qrel_rows.append((f"q{index}", f"d{target}"))
    _write_jsonl(root / "corpus.jsonl", doc_records)
    _write_jsonl(root / "queries.jsonl", query_records)
    split_at = int(len(qrel_rows) * (1 - test_fraction))
    _write_qrels(root / "qrels" / "train.tsv", qrel_rows[:split_at])
    _write_qrels(root / "qrels" / "test.tsv", qrel_rows[split_at:])
    return root


def _write_jsonl(path: Path, records: list[dict]) -> None:
    path.write_text("".join(json.dumps(record) + "\n" for record in records))


def _write_qrels(path: Path, rows: list[tuple[str, str]]) -> None:
    lines = ["query-id\tcorpus-id\tscore"] + [f"{qid}\t{did}\t1" for qid, did in rows]
    path.write_text("\n".join(lines) + "\n")

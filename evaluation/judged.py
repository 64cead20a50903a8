"""The judged queries an evaluation scores: a BEIR-format dataset's split, or TREC topics + qrels files
(`evaluation.trec`)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from evaluation.metrics import Qrels
from evaluation.trec import read_trec_qrels, read_trec_topics
from towerline.beir import content_fingerprint, load_dataset, positives
from towerline.config import TowerlineConfig
from towerline.errors import DataError
from towerline.progress import console

# What eval reports scored on TREC topics name as their split.
TREC_SPLIT = "trec"


@dataclass(frozen=True)
class JudgedQueries:
    queries: dict[str, str]  # the queries with at least one positive judgment, in file order
    qrels: Qrels
    identity: dict[str, str]  # {"name", "fingerprint"}: how results name the data, never by path
    from_corpus_dataset: bool  # False for TREC files: nothing ties them to an index's corpus
    split: str  # the dataset's qrels split, or "trec"
    dropped: int = 0  # judgments dropped while reading (unknown query or doc id, repeated)


def dataset_judged(config: TowerlineConfig) -> JudgedQueries:
    """The configured dataset's eval split (data.dir / $TOWERLINE_DATA_DIR / bundled; eval.split)."""
    split, positive_min = config.eval.split, config.data.positive_min
    dataset = load_dataset(config.data, [split])
    qrels = dataset.split(split)
    dropped = dataset.rejected_in(dataset.files.split_file(split))
    if dropped:
        console.print(f"[yellow]qrels/{split}: {dropped} judgment(s) dropped (unknown query or doc id, or repeated)")
    queries = {qid: dataset.queries[qid] for qid, docs in qrels.items() if positives(docs, positive_min)}
    if not queries:
        raise DataError(f"qrels/{split}: no query has a judgment with score >= data.positive_min={positive_min}")
    return JudgedQueries(queries, qrels, dataset.files.identity(), True, split, dropped)


def trec_judged(topics: Path, qrels_path: Path, positive_min: int) -> JudgedQueries:
    """TREC topics + qrels; judgments of topics the file lacks are dropped and counted."""
    texts = read_trec_topics(topics)
    qrels = read_trec_qrels(qrels_path)
    unknown = {qid for qid in qrels if qid not in texts}
    dropped = sum(len(qrels[qid]) for qid in unknown)
    if unknown:
        console.print(f"[yellow]{qrels_path.name}: {dropped} judgment(s) of {len(unknown)} topic(s) missing "
                      f"from {topics.name} dropped")
    qrels = {qid: docs for qid, docs in qrels.items() if qid in texts}
    queries = {qid: texts[qid] for qid, docs in qrels.items() if positives(docs, positive_min)}
    if not queries:
        raise DataError(f"{qrels_path}: no topic of {topics.name} has a judgment >= positive_min={positive_min}")
    identity = {"name": topics.stem, "fingerprint": content_fingerprint([topics, qrels_path])}
    return JudgedQueries(queries, qrels, identity, False, TREC_SPLIT, dropped)

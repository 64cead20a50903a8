"""The judged queries an evaluation scores: a BEIR-format dataset's split, or TREC topics + qrels files.

TREC topics are read in either of their two common forms: the classic SGML (`<top>`, `<num>`,
`<title>`; the title is the query) or a TSV of `query_id<TAB>text` lines. TREC qrels are
`query_id iteration doc_id relevance` lines. A malformed line is named by file and line number.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from evaluation.metrics import Qrels
from towerline.beir import content_fingerprint, load_dataset, positives
from towerline.config import TowerlineConfig
from towerline.errors import DataError
from towerline.progress import console

TOP = re.compile(r"<top>(.*?)</top>", re.DOTALL | re.IGNORECASE)
NUM = re.compile(r"<num>\s*(?:Number:)?\s*(\S+)", re.IGNORECASE)
TITLE = re.compile(r"<title>\s*(?:Topic:)?\s*(.*?)\s*(?=<[a-z]+>|$)", re.DOTALL | re.IGNORECASE)


@dataclass(frozen=True)
class JudgedQueries:
    queries: dict[str, str]  # the queries with at least one positive judgment, in file order
    qrels: Qrels
    identity: dict[str, str]  # {"name", "fingerprint"}: how results name the data, never by path
    from_corpus_dataset: bool  # False for TREC files: nothing ties them to an index's corpus
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
    return JudgedQueries(queries, qrels, dataset.files.identity(), True, dropped)


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
    return JudgedQueries(queries, qrels, identity, False, dropped)


def read_trec_topics(path: Path) -> dict[str, str]:
    text = path.read_text()
    topics: dict[str, str] = {}
    if "<top>" in text.lower():
        for number, block in enumerate(TOP.findall(text), start=1):
            num, title = NUM.search(block), TITLE.search(block)
            if not num or not title or not title.group(1).strip():
                raise DataError(f"{path}: topic {number} has no <num> or no <title>")
            topics[num.group(1)] = " ".join(title.group(1).split())
    else:
        for line_no, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            query_id, tab, query = line.partition("\t")
            if not tab or not query_id.strip() or not query.strip():
                raise DataError(f"{path}:{line_no}: expected query_id<TAB>text")
            topics[query_id.strip()] = query.strip()
    if not topics:
        raise DataError(f"{path}: no topics")
    return topics


def read_trec_qrels(path: Path) -> Qrels:
    qrels: Qrels = {}
    for line_no, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        fields = line.split()
        if len(fields) != 4:
            raise DataError(f"{path}:{line_no}: expected `query_id iteration doc_id relevance`, found "
                            f"{len(fields)} field(s)")
        try:
            grade = int(fields[3])
        except ValueError:
            raise DataError(f"{path}:{line_no}: relevance {fields[3]!r} is not an integer") from None
        qrels.setdefault(fields[0], {})[fields[2]] = grade
    if not qrels:
        raise DataError(f"{path}: no judgments")
    return qrels

"""Synthetic impression/click logs over a real corpus, from a few million to a hundred million rows.

The latent structure a click model should find:
- every document has a latent topic; every query is written from one source document (2–4 words of
  its title) and shares its topic; query popularity is Zipf-distributed;
- a result page shows 10 documents: the query's source document (at a random position, on most
  pages), documents of the same topic, and unrelated ones;
- a user examines position p with probability 1 / p^0.7 (position bias) and clicks an examined
  document by its attractiveness (source ≫ same topic ≫ unrelated);
- dwell time after a click is log-normal, long for the source document and short for the rest, so
  a dwell threshold separates satisfied clicks from the others.

Rows are generated in vectorised chunks and written as Parquet (dictionary-encoded strings), or as
JSON lines for small logs; the same seed gives the same log.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from towerline.beir import Document

PAGE = 10
CHUNK_REQUESTS = 100_000
START_MS = 1_767_225_600_000  # 2026-01-01 UTC
SPAN_MS = 30 * 86_400_000
EXAMINATION_POWER = 0.7
# Click probability of an examined document, by its relation to the query's source document.
ATTRACTION = {"source": 0.85, "topic": 0.3, "other": 0.05}
# Median dwell (ms) after a click, by the same relation; log-normal with sigma 0.6.
DWELL_MEDIAN_MS = {"source": 60_000, "topic": 20_000, "other": 6_000}
SOURCE_SHOWN = 0.8
TOPIC_SLOTS = 6
_WORD = re.compile(r"[A-Za-z][A-Za-z\-]{2,}")


@dataclass(frozen=True)
class ClickLogSpec:
    rows: int
    seed: int = 0
    queries: int | None = None  # default: one per 20 rows, between 100 and 50,000
    topics: int = 50
    zipf: float = 1.1

    @property
    def query_count(self) -> int:
        return self.queries or int(min(50_000, max(100, self.rows // 20)))


def write_click_logs(documents: list[Document], output: Path, spec: ClickLogSpec, fmt: str = "parquet") -> dict:
    """Write `spec.rows` impressions (whole pages, so rounded up to a multiple of 10) into `output`
    (a directory of part files); returns what was written."""
    if len(documents) < 2 * PAGE:
        raise ValueError(f"a click log needs a corpus of at least {2 * PAGE} documents, got {len(documents)}")
    rng = np.random.default_rng(spec.seed)
    world = _World.build(documents, spec, rng)
    output.mkdir(parents=True, exist_ok=True)
    requests = -(-spec.rows // PAGE)
    written = 0
    for part, start in enumerate(range(0, requests, CHUNK_REQUESTS)):
        count = min(CHUNK_REQUESTS, requests - start)
        table = world.pages(start, count, requests, rng)
        if fmt == "parquet":
            pq.write_table(table, output / f"part-{part:05d}.parquet")
        else:
            _write_json_lines(table, output / f"part-{part:05d}.jsonl")
        written += table.num_rows
    return {"rows": written, "requests": requests, "queries": spec.query_count, "documents": len(documents),
            "seed": spec.seed, "format": fmt}


@dataclass(frozen=True)
class _World:
    doc_ids: np.ndarray  # [D] str
    doc_topic: np.ndarray  # [D]
    topic_docs: list[np.ndarray]  # per topic, its documents' indexes
    query_texts: np.ndarray  # [Q] str
    query_source: np.ndarray  # [Q] document index
    query_popularity: np.ndarray  # [Q] probabilities

    @classmethod
    def build(cls, documents: list[Document], spec: ClickLogSpec, rng: np.random.Generator) -> _World:
        doc_ids = np.array([document.doc_id for document in documents])
        topics = min(spec.topics, len(documents) // PAGE)
        doc_topic = rng.integers(topics, size=len(documents))
        topic_docs = [np.flatnonzero(doc_topic == topic) for topic in range(topics)]
        sources = rng.integers(len(documents), size=spec.query_count)
        texts = np.array([_query_text(documents[source], rng) for source in sources])
        ranks = np.arange(1, spec.query_count + 1, dtype=np.float64)
        popularity = ranks ** -spec.zipf
        return cls(doc_ids, doc_topic, topic_docs, texts, sources, popularity / popularity.sum())

    def pages(self, first_request: int, count: int, total: int, rng: np.random.Generator) -> pa.Table:
        queries = rng.choice(len(self.query_texts), size=count, p=self.query_popularity)
        sources = self.query_source[queries]
        page = self._candidates(sources, rng)
        relation = np.where(page == sources[:, None], 2, np.where(
            self.doc_topic[page] == self.doc_topic[sources][:, None], 1, 0))
        positions = np.arange(1, PAGE + 1)
        examined = rng.random(page.shape) < positions[None, :] ** -EXAMINATION_POWER
        attraction = np.array([ATTRACTION["other"], ATTRACTION["topic"], ATTRACTION["source"]])[relation]
        clicked = examined & (rng.random(page.shape) < attraction)
        median = np.array([DWELL_MEDIAN_MS["other"], DWELL_MEDIAN_MS["topic"], DWELL_MEDIAN_MS["source"]])[relation]
        dwell = np.where(clicked, np.round(median * np.exp(rng.normal(0, 0.6, page.shape))), 0).astype(np.int64)
        request = np.arange(first_request, first_request + count)
        ts = START_MS + (request * SPAN_MS) // total  # requests spread evenly over the span, in order
        rows = count * PAGE
        return pa.table({
            "request_id": pa.array(np.char.add("r", np.repeat(request, PAGE).astype(str))),
            "ts": pa.array(np.repeat(ts, PAGE) + np.tile(np.arange(PAGE), count)),
            "query": pa.DictionaryArray.from_arrays(pa.array(np.repeat(queries, PAGE).astype(np.int32)),
                                                    pa.array(self.query_texts)),
            "doc_id": pa.DictionaryArray.from_arrays(pa.array(page.reshape(rows).astype(np.int32)),
                                                     pa.array(self.doc_ids)),
            "position": pa.array(np.tile(positions, count).astype(np.int32)),
            "clicked": pa.array(clicked.reshape(rows)),
            "dwell_ms": pa.array(dwell.reshape(rows)),
        })

    def _candidates(self, sources: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """[n, PAGE] distinct document indexes per page: same-topic and unrelated documents, and the
        source document on most pages."""
        count = len(sources)
        topic = self.doc_topic[sources]
        sizes = np.array([len(docs) for docs in self.topic_docs])[topic]
        page = rng.integers(len(self.doc_ids), size=(count, PAGE))
        # Same-topic documents in the first slots, then shuffled with the rest below.
        picks = (rng.random((count, TOPIC_SLOTS)) * sizes[:, None]).astype(np.int64)
        for t in np.unique(topic):
            rows = topic == t
            page[rows, :TOPIC_SLOTS] = self.topic_docs[t][picks[rows]]
        page = rng.permuted(page, axis=1)
        shown = rng.random(count) < SOURCE_SHOWN
        slots = rng.integers(PAGE, size=count)
        already = (page == sources[:, None]).any(axis=1)
        place = shown & ~already
        page[place, slots[place]] = sources[place]
        return _distinct(page, sources, len(self.doc_ids), rng)


def _distinct(page: np.ndarray, sources: np.ndarray, documents: int, rng: np.random.Generator) -> np.ndarray:
    """Redraw repeated documents on a page (the source document is never the one redrawn)."""
    for _ in range(100):
        repeated = np.zeros(page.shape, dtype=bool)
        for slot in range(1, PAGE):
            repeated[:, slot] = (page[:, :slot] == page[:, slot : slot + 1]).any(axis=1)
        # Keep the source where it is: redraw its earlier twin instead.
        twin = repeated & (page == sources[:, None])
        if twin.any():
            rows = np.flatnonzero(twin.any(axis=1))
            for row in rows:
                slots = np.flatnonzero(page[row] == sources[row])
                repeated[row] = False
                repeated[row, slots[:-1]] = True
        if not repeated.any():
            return page
        page[repeated] = rng.integers(documents, size=int(repeated.sum()))
    raise RuntimeError("could not draw distinct documents for every page")


def _query_text(document: Document, rng: np.random.Generator) -> str:
    words = _WORD.findall(document.title) or _WORD.findall(document.text) or [document.doc_id]
    length = min(len(words), int(rng.integers(2, 5)))
    start = int(rng.integers(len(words) - length + 1))
    return " ".join(words[start : start + length]).lower()


def _write_json_lines(table: pa.Table, path: Path) -> None:
    with path.open("w") as out:
        for row in table.to_pylist():
            out.write(json.dumps(row) + "\n")

"""BM25 over a corpus with bm25s: one tokenisation for documents and queries, shared by the pairs
job (hard-negative mining), the sparse side of every index and the benchmarks.

Tokens are lower-cased with English stop words removed and, by default, Snowball-stemmed. An index
saves in bm25s's own format (numpy arrays + JSON, never pickled) next to the settings that built it,
so that queries are always tokenised the way the documents were.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache, cached_property
from pathlib import Path

import bm25s
import Stemmer

STOPWORDS = "en"


@cache
def _stemmer(name: str) -> Stemmer.Stemmer | None:
    # PyStemmer objects do not pickle, so each (Spark worker) process builds its own once.
    return None if name == "none" else Stemmer.Stemmer(name)


def tokenize(texts: list[str], stemmer: str) -> list[list[str]]:
    """Lower-cased, English stop words removed, optionally stemmed; the same for docs and queries."""
    return bm25s.tokenize(texts, stopwords=STOPWORDS, stemmer=_stemmer(stemmer), return_ids=False,
                          show_progress=False)


@dataclass
class Bm25Index:
    """A bm25s index and the doc id of each of its rows; picklable, for a Spark broadcast."""

    doc_ids: list[str]
    retriever: bm25s.BM25
    stemmer: str

    @cached_property
    def row_of(self) -> dict[str, int]:
        return {doc_id: row for row, doc_id in enumerate(self.doc_ids)}

    def search(self, queries: list[str], k: int) -> list[list[tuple[str, float]]]:
        """Top-k (doc_id, BM25 score) per query, best first; documents sharing no term with the
        query (score 0) are left out, so a query of stop words only gets no hits."""
        k = min(k, len(self.doc_ids))
        return [self._top(tokens, k) for tokens in tokenize(queries, self.stemmer)]

    def _top(self, tokens: list[str], k: int) -> list[tuple[str, float]]:
        # What BM25.retrieve does for one query (its scores, then its numpy top-k: the same order,
        # ties included), without retrieve's per-call set-up, which costs ~25x the scoring on a
        # 5k-document corpus: this is the BM25 side of every hybrid request.
        if not tokens:
            return []
        scores, rows = bm25s.selection.topk(self.retriever.get_scores(tokens), k, backend="numpy", sorted=True)
        return [(self.doc_ids[row], float(score)) for row, score in zip(rows.tolist(), scores.tolist(), strict=True)
                if score > 0]

    def save(self, directory: Path) -> None:
        self.retriever.save(str(directory), show_progress=False)

    @classmethod
    def load(cls, directory: Path, doc_ids: list[str], stemmer: str) -> Bm25Index:
        retriever = bm25s.BM25.load(str(directory), load_corpus=False, allow_pickle=False)
        return cls(doc_ids=doc_ids, retriever=retriever, stemmer=stemmer)


def build_index(doc_ids: list[str], doc_texts: list[str], stemmer: str) -> Bm25Index:
    retriever = bm25s.BM25()
    retriever.index(tokenize(doc_texts, stemmer), show_progress=False)
    return Bm25Index(doc_ids=doc_ids, retriever=retriever, stemmer=stemmer)


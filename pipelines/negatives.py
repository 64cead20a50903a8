"""BM25 hard negatives: index the corpus once on the driver, retrieve per query in Spark workers.

A hard negative is a document BM25 ranks high for a query but that is not judged relevant to
it; those teach the towers more than random documents do. The index (towerline.bm25: sparse
scores precomputed, so retrieval is a cheap lookup) is shipped to workers as a broadcast variable.
"""

from __future__ import annotations

from collections.abc import Iterator
from functools import partial
from itertools import islice

import pandas as pd
from pyspark import Broadcast
from pyspark.sql import DataFrame
from pyspark.sql import functions as F

from towerline.bm25 import Bm25Index, tokenize
from towerline.config import PairsConfig

NEGATIVES_SCHEMA = "query_id string, negative_ids array<string>"
# (query_id, query_text, positive_ids, known_negative_ids): what negatives are mined for.
MINING_COLUMNS = ("query_id", "query_text", "positive_ids", "known_negative_ids")


def pick_negatives(
    hit_ids: list[str],
    hit_scores: list[float],
    positives: set[str],
    known: list[str],
    settings: PairsConfig,
    positive_score: float | None = None,
) -> list[str]:
    """Judged non-relevant docs first; then BM25 hits past the top `skip_top` that share a term with
    the query, are neither positives nor already picked and, with `negative_margin`, score below
    that fraction of the query's weakest positive (positive-aware mining, as in NV-Retriever):
    a candidate scoring like a positive is more likely an unjudged positive than a negative."""
    wanted = settings.negatives_per_query
    picked = [doc_id for doc_id in known if doc_id not in positives][:wanted]
    ceiling = (settings.negative_margin * positive_score
               if settings.negative_margin is not None and positive_score else float("inf"))
    ranked = zip(hit_ids[settings.skip_top :], hit_scores[settings.skip_top :], strict=True)
    # A zero score means no shared term: such a document is a random negative, not a hard one.
    excluded = positives | set(picked)
    candidates = (doc_id for doc_id, score in ranked if 0 < score < ceiling and doc_id not in excluded)
    return picked + list(islice(candidates, wanted - len(picked)))


def weakest_positive_score(index: Bm25Index, query_tokens: list[str], positives: set[str]) -> float | None:
    """The lowest BM25 score among a query's positives (None when none of them is indexed)."""
    scores = index.retriever.get_scores(query_tokens)
    rows = [index.row_of[doc_id] for doc_id in positives if doc_id in index.row_of]
    return float(min(scores[row] for row in rows)) if rows else None


def mine_negatives(
    index: Bm25Index,
    query_texts: list[str],
    positives: list[set[str]],
    known: list[list[str]],
    settings: PairsConfig,
) -> list[list[str]]:
    """Negatives for each query: its judged non-relevant docs, then BM25 hard negatives in rank order."""
    if not query_texts or settings.negatives_per_query == 0:
        return [[] for _ in query_texts]
    top_k = min(settings.bm25_top_k, len(index.doc_ids))
    query_tokens = tokenize(query_texts, index.stemmer)
    results = index.retriever.retrieve(query_tokens, k=top_k, show_progress=False, n_threads=1)
    margins = ([weakest_positive_score(index, tokens, judged) for tokens, judged in zip(query_tokens, positives,
                                                                                         strict=True)]
               if settings.negative_margin is not None else [None] * len(query_texts))
    return [
        pick_negatives([index.doc_ids[row] for row in rows], list(scores), judged, known_ids, settings, margin)
        for rows, scores, judged, known_ids, margin in zip(
            results.documents, results.scores, positives, known, margins, strict=True
        )
    ]


def negatives_in_spark(judged_queries: DataFrame, index: Broadcast[Bm25Index], settings: PairsConfig) -> DataFrame:
    """(query_id, negative_ids) for a DataFrame with MINING_COLUMNS."""
    batches = judged_queries.select(*MINING_COLUMNS)
    return batches.mapInPandas(partial(_negatives_for_batches, index, settings), NEGATIVES_SCHEMA)


def attach_texts(negatives: DataFrame, documents: DataFrame, aligned: tuple[str, ...] = ()) -> DataFrame:
    """Add negative_texts, aligned with negative_ids (and keep each `aligned` array column in the same
    order); a query without negatives keeps empty arrays."""
    zipped = F.arrays_zip("negative_ids", *aligned)
    exploded = negatives.select("query_id", F.posexplode_outer(zipped).alias("rank", "negative")).select(
        "query_id", "rank", F.col("negative.negative_ids").alias("doc_id"),
        *[F.col(f"negative.{name}").alias(name) for name in aligned])
    with_text = exploded.join(documents.select("doc_id", "doc_text"), on="doc_id", how="left")
    hit = F.when(F.col("rank").isNotNull(), F.struct("rank", "doc_id", "doc_text", *aligned))
    ranked = with_text.groupBy("query_id").agg(F.sort_array(F.collect_list(hit)).alias("hits"))
    # hits.field of an array of structs is the array of that field, order kept.
    return ranked.select("query_id", F.col("hits")["doc_id"].alias("negative_ids"),
                         F.col("hits")["doc_text"].alias("negative_texts"),
                         *[F.col("hits")[name].alias(name) for name in aligned])


def _negatives_for_batches(
    index: Broadcast[Bm25Index], settings: PairsConfig, batches: Iterator[pd.DataFrame]
) -> Iterator[pd.DataFrame]:
    for batch in batches:
        negatives = mine_negatives(
            index.value,
            batch["query_text"].tolist(),
            [set(ids) for ids in batch["positive_ids"]],
            [list(ids) for ids in batch["known_negative_ids"]],
            settings,
        )
        yield pd.DataFrame({"query_id": batch["query_id"], "negative_ids": negatives})

"""The one metrics module: nDCG@10, Recall@100 and MRR@10 computed by pytrec_eval."""

from __future__ import annotations

import pytrec_eval

Run = dict[str, dict[str, float]]
Qrels = dict[str, dict[str, int]]

HEADLINE_METRICS = ("ndcg@10", "recall@100", "mrr@10")


def truncate(run: Run, depth: int) -> Run:
    return {
        query_id: dict(sorted(hits.items(), key=lambda item: -item[1])[:depth])
        for query_id, hits in run.items()
    }


def score_run(qrels: Qrels, run: Run, positive_min: int = 1) -> dict[str, float]:
    """Mean metrics over every query with a positive (score >= positive_min); no hits counts as zero.

    nDCG uses the graded scores as gains (negative grades count as 0); Recall and MRR count a
    document as relevant from `positive_min` up.
    """
    judged = {
        qid: {doc_id: max(grade, 0) for doc_id, grade in docs.items()}
        for qid, docs in qrels.items()
        if any(grade >= positive_min for grade in docs.values())
    }
    complete_run = {qid: run.get(qid) or {"__none__": 0.0} for qid in judged}
    per_query = pytrec_eval.RelevanceEvaluator(
        judged, {"ndcg_cut.10", "recall.100"}, relevance_level=positive_min
    ).evaluate(complete_run)
    # pytrec_eval's recip_rank has no cutoff: MRR@10 is recip_rank over the top 10 only.
    reciprocal = pytrec_eval.RelevanceEvaluator(
        judged, {"recip_rank"}, relevance_level=positive_min
    ).evaluate(truncate(complete_run, 10))
    count = max(len(judged), 1)
    return {
        "ndcg@10": sum(scores["ndcg_cut_10"] for scores in per_query.values()) / count,
        "recall@100": sum(scores["recall_100"] for scores in per_query.values()) / count,
        "mrr@10": sum(scores["recip_rank"] for scores in reciprocal.values()) / count,
        "queries": float(len(judged)),
    }


def candidate_metrics(relevant: Qrels, run: Run) -> dict[str, float]:
    """Candidate generation for recommendation: mean NDCG@10 and Recall@50 over users with a relevant item."""
    complete_run = {user: run.get(user) or {"__none__": 0.0} for user in relevant}
    per_user = pytrec_eval.RelevanceEvaluator(relevant, {"ndcg_cut.10", "recall.50"}).evaluate(complete_run)
    count = max(len(per_user), 1)
    return {"ndcg@10": sum(scores["ndcg_cut_10"] for scores in per_user.values()) / count,
            "recall@50": sum(scores["recall_50"] for scores in per_user.values()) / count}

"""The one metrics module: nDCG@10, Recall@100/1000, MRR@10, MAP (per query and mean) and Recall@k, by pytrec_eval."""

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


def _complete(run: Run, judged: Qrels) -> Run:
    """Every judged query's hits, a placeholder hit for a query with none: pytrec_eval skips a query
    absent from the run, where it must count as a zero."""
    return {qid: run.get(qid) or {"__none__": 0.0} for qid in judged}


def _judged(qrels: Qrels, positive_min: int) -> Qrels:
    """Queries with a positive (score >= positive_min); graded scores as gains, negative grades as 0."""
    return {
        qid: {doc_id: max(grade, 0) for doc_id, grade in docs.items()}
        for qid, docs in qrels.items()
        if any(grade >= positive_min for grade in docs.values())
    }


def per_query_scores(qrels: Qrels, run: Run, positive_min: int = 1) -> dict[str, dict[str, float]]:
    """nDCG@10, Recall@100, MRR@10 and MAP (over the run's depth) of every query with a positive, plus
    Recall@1000 when the run goes 1,000 deep; a query with no hits scores zero.

    nDCG uses the graded scores as gains (negative grades count as 0); Recall, MRR and MAP count a
    document as relevant from `positive_min` up.
    """
    judged = _judged(qrels, positive_min)
    complete_run = _complete(run, judged)
    deep = max((len(hits) for hits in complete_run.values()), default=0) >= 1000
    measures = {"ndcg_cut.10", "recall.100,1000" if deep else "recall.100", "map"}
    per_query = pytrec_eval.RelevanceEvaluator(judged, measures, relevance_level=positive_min).evaluate(complete_run)
    # pytrec_eval's recip_rank has no cutoff: MRR@10 is recip_rank over the top 10 only.
    reciprocal = pytrec_eval.RelevanceEvaluator(
        judged, {"recip_rank"}, relevance_level=positive_min
    ).evaluate(truncate(complete_run, 10))
    return {
        qid: {"ndcg@10": scores["ndcg_cut_10"], "recall@100": scores["recall_100"],
              "mrr@10": reciprocal[qid]["recip_rank"], "map": scores["map"],
              **({"recall@1000": scores["recall_1000"]} if deep else {})}
        for qid, scores in per_query.items()
    }


def score_run(qrels: Qrels, run: Run, positive_min: int = 1) -> dict[str, float]:
    """Mean metrics over every query with a positive (see `per_query_scores`)."""
    return mean_scores(per_query_scores(qrels, run, positive_min))


def mean_scores(per_query: dict[str, dict[str, float]]) -> dict[str, float]:
    """Each metric of `per_query_scores` averaged over the queries, and their count."""
    count = max(len(per_query), 1)
    names = next(iter(per_query.values()), dict.fromkeys(HEADLINE_METRICS))
    means = {metric: sum(scores[metric] for scores in per_query.values()) / count for metric in names}
    return {**means, "queries": float(len(per_query))}


def recall_curve(qrels: Qrels, run: Run, positive_min: int, cutoffs: tuple[int, ...]) -> dict[int, float]:
    """Mean Recall@k over the queries with a positive, for every k of `cutoffs`."""
    judged = _judged(qrels, positive_min)
    complete_run = _complete(run, judged)
    measures = {f"recall.{','.join(str(k) for k in cutoffs)}"}
    per_query = pytrec_eval.RelevanceEvaluator(judged, measures, relevance_level=positive_min).evaluate(complete_run)
    count = max(len(per_query), 1)
    return {k: sum(scores[f"recall_{k}"] for scores in per_query.values()) / count for k in cutoffs}


CANDIDATE_METRICS = ("ndcg@10", "recall@50")


def per_user_candidate_scores(relevant: Qrels, run: Run) -> dict[str, dict[str, float]]:
    """Candidate generation for recommendation: NDCG@10 and Recall@50 of every user with a relevant item."""
    complete_run = _complete(run, relevant)
    per_user = pytrec_eval.RelevanceEvaluator(relevant, {"ndcg_cut.10", "recall.50"}).evaluate(complete_run)
    return {user: {"ndcg@10": scores["ndcg_cut_10"], "recall@50": scores["recall_50"]}
            for user, scores in per_user.items()}


def candidate_metrics(relevant: Qrels, run: Run) -> dict[str, float]:
    """Mean NDCG@10 and Recall@50 over users with a relevant item (see `per_user_candidate_scores`)."""
    per_user = per_user_candidate_scores(relevant, run)
    count = max(len(per_user), 1)
    return {metric: sum(scores[metric] for scores in per_user.values()) / count for metric in CANDIDATE_METRICS}

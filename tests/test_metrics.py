import math

from evaluation.metrics import score_run


def test_perfect_and_partial_rankings() -> None:
    qrels = {"q1": {"d1": 1}, "q2": {"d2": 1}}
    perfect = {"q1": {"d1": 2.0, "x": 1.0}, "q2": {"d2": 3.0}}
    assert score_run(qrels, perfect)["ndcg@10"] == 1.0
    second = {"q1": {"x": 2.0, "d1": 1.0}, "q2": {}}
    scores = score_run(qrels, second)
    assert math.isclose(scores["mrr@10"], 0.25)
    assert math.isclose(scores["ndcg@10"], (1 / math.log2(3)) / 2)
    assert scores["recall@100"] == 0.5


def test_mrr_is_cut_at_ten() -> None:
    qrels = {"q1": {"d1": 1}}
    run = {"q1": {f"x{i}": 100.0 - i for i in range(10)} | {"d1": 1.0}}
    scores = score_run(qrels, run)
    assert scores["mrr@10"] == 0.0
    assert scores["recall@100"] == 1.0


def test_map_and_recall_at_1000_only_for_deep_runs() -> None:
    qrels = {"q1": {"d1": 1, "d2": 1}, "q2": {"d3": 1}}
    shallow = {"q1": {"x": 3.0, "d1": 2.0, "d2": 1.0}, "q2": {}}
    scores = score_run(qrels, shallow)
    assert math.isclose(scores["map"], ((1 / 2 + 2 / 3) / 2) / 2)  # q1: AP (1/2 + 2/3) / 2; q2: 0
    assert "recall@1000" not in scores  # a 100-deep run says nothing about depth 1000
    deep = {"q1": {f"x{i}": 2000.0 - i for i in range(1200)} | {"d1": 1.0}, "q2": {"d3": 1.0}}
    scores = score_run(qrels, deep)
    assert scores["recall@1000"] == 0.5 and scores["recall@100"] == 0.5  # q1: neither found; q2: found

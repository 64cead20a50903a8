"""`towerline eval compare`: paired significance tests, the multiple-comparison correction, the checks
that refuse runs scored on other data, and the self-contained report."""

from __future__ import annotations

import itertools
import json
import re
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from evaluation.compare import SystemRun, compare_systems, holm, paired_tests
from evaluation.metrics import per_query_scores, score_run
from evaluation.trec import read_trec_run, write_trec_run
from towerline.artifacts import ArtifactWriter
from towerline.beir import load_dataset
from towerline.cli import app
from towerline.config import load_config
from towerline.errors import DataError
from towerline.synthetic import write_synthetic_beir

runner = CliRunner()


def test_holm_by_hand() -> None:
    # Sorted 0.01, 0.03, 0.04 → ×3, ×2, ×1 = 0.03, 0.06, 0.04 → monotone: 0.03, 0.06, 0.06.
    assert holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    assert holm([0.5, 0.9]) == pytest.approx([1.0, 1.0])  # capped at 1
    assert holm([0.2]) == [0.2]


def test_randomisation_test_is_the_exact_sign_flip_test() -> None:
    rng = np.random.default_rng(1)
    baseline = rng.uniform(size=10)
    challenger = baseline + rng.normal(0.15, 0.2, size=10)
    differences = challenger - baseline
    observed = abs(differences.mean())
    flips = np.array(list(itertools.product((1, -1), repeat=10)))
    exact = float(np.mean(np.abs((flips * differences).mean(axis=1)) >= observed - 1e-12))
    # 2^10 = 1,024 sign patterns ≤ the resamples asked for: scipy enumerates them all.
    result = paired_tests(challenger, baseline, permutations=5000, seed=0)
    assert result["permutation_p"] == pytest.approx(exact)
    assert 0 < result["t_test_p"] < 1
    assert paired_tests(baseline, baseline.copy(), 5000, 0) == {"t_test_p": 1.0, "permutation_p": 1.0}


def _qrels_and_runs(queries: int = 60) -> tuple[dict[str, dict[str, int]], dict[str, dict[str, float]], ...]:
    qrels = {f"q{i}": {f"d{i}": 1} for i in range(queries)}
    distractors = {f"x{j}": 10.0 - j for j in range(9)}
    first = {f"q{i}": {f"d{i}": 100.0, **distractors} for i in range(queries)}  # relevant doc at rank 1
    fifth = {f"q{i}": {**{f"x{j}": 10.0 - j for j in range(4)}, f"d{i}": 5.5} for i in range(queries)}  # rank 5
    # Like `fifth` but for two queries, where the relevant doc moves to rank 1: too few to be significant.
    almost = {q: dict(hits) for q, hits in fifth.items()}
    for q in ("q0", "q1"):
        almost[q] = first[q]
    return qrels, first, fifth, almost


def test_a_clear_gain_is_significant_and_a_small_one_is_not() -> None:
    qrels, first, fifth, almost = _qrels_and_runs()
    systems = [SystemRun("fifth", fifth), SystemRun("first", first), SystemRun("almost", almost)]
    comparison = compare_systems(qrels, systems, permutations=2000)
    assert comparison["baseline"] == "fifth" and comparison["queries"] == 60
    clear, small = comparison["comparisons"]["first"]["ndcg@10"], comparison["comparisons"]["almost"]["ndcg@10"]
    assert clear["significant"] and clear["wins"] == 60 and clear["losses"] == 0
    assert clear["delta"] == pytest.approx(score_run(qrels, first)["ndcg@10"] - score_run(qrels, fifth)["ndcg@10"])
    assert not small["significant"] and small["wins"] == 2
    # Recall@100 is 1 for every system: no difference, p = 1.
    assert comparison["comparisons"]["first"]["recall@100"]["t_test_p"] == 1.0
    # Holm: the adjusted p is never below the raw one.
    for test in (clear, small):
        assert test["t_test_p_holm"] >= test["t_test_p"] and test["permutation_p_holm"] >= test["permutation_p"]
    assert comparison["table"]["first"]["mrr@10"] == 1.0
    assert comparison["recall_curves"]["fifth"][3] == 0.0 and comparison["recall_curves"]["fifth"][5] == 1.0


def test_per_query_scores_average_to_score_run() -> None:
    qrels, first, fifth, almost = _qrels_and_runs(12)
    qrels["q0"]["d99"] = 2  # graded
    for run in (first, fifth, almost):
        per_query = per_query_scores(qrels, run)
        means = score_run(qrels, run)
        for metric in ("ndcg@10", "recall@100", "mrr@10"):
            assert np.mean([scores[metric] for scores in per_query.values()]) == pytest.approx(means[metric])


def test_trec_run_round_trip_and_a_bad_line_named(tmp_path: Path) -> None:
    run = {"q1": {"d1": 2.5, "d2": 1.0}, "q2": {"d3": 0.5}}
    write_trec_run(tmp_path / "run.trec", run)
    assert read_trec_run(tmp_path / "run.trec") == run
    (tmp_path / "bad.trec").write_text("q1 Q0 d1 1 2.5 tag\nq1 Q0 d2 2 high tag\n")
    with pytest.raises(DataError, match=r"bad.trec:2: score 'high'"):
        read_trec_run(tmp_path / "bad.trec")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_synthetic_beir(tmp_path_factory.mktemp("beir") / "cmp", docs=60, queries=80, test_fraction=0.5)


def _runs_on(dataset: Path, tmp_path: Path) -> tuple[Path, Path]:
    """Two TREC runs over the dataset's test queries: the relevant docs first, or fifth."""
    config = load_config(None, [f"data.dir={dataset}"])
    qrels = load_dataset(config.data, ["test"]).split("test")
    good = {q: {**{d: 100.0 for d in docs}, **{f"x{j}": 10.0 - j for j in range(9)}} for q, docs in qrels.items()}
    poor = {q: {**{f"x{j}": 10.0 - j for j in range(4)}, **{d: 5.5 for d in docs}} for q, docs in qrels.items()}
    write_trec_run(tmp_path / "good.trec", good)
    write_trec_run(tmp_path / "poor.trec", poor)
    return tmp_path / "poor.trec", tmp_path / "good.trec"


def test_compare_command_writes_a_self_contained_report(dataset: Path, tmp_path: Path) -> None:
    poor, good = _runs_on(dataset, tmp_path)
    out = tmp_path / "report"
    result = runner.invoke(app, ["eval", "compare", str(poor), str(good), "--name", "bm25", "--name", "tuned",
                                 "--data", str(dataset), "--permutations", "500", "--out", str(out),
                                 "--config", str(_untracked(tmp_path))])
    assert result.exit_code == 0, result.output
    comparison = json.loads((out / "comparison.json").read_text())
    assert comparison["comparisons"]["tuned"]["ndcg@10"]["significant"]
    assert comparison["dataset"]["name"] == "cmp" and comparison["dataset"]["split"] == "test"
    html = (out / "report.html").read_text()
    images = re.findall(r'<img [^>]*src="([^"]+)"', html)
    assert len(images) == 3 and all(src.startswith("data:image/png;base64,") for src in images)
    assert "http://" not in html and "https://" not in html  # nothing to fetch: it opens offline
    markdown = (out / "report.md").read_text()
    for link in re.findall(r"\]\((plots/[^)]+)\)", markdown):
        assert (out / link).is_file()
    assert "| tuned | ndcg@10 | +" in markdown
    assert json.loads((out / "manifest.json").read_text())["kind"] == "eval-comparison"
    assert str(tmp_path) not in (out / "comparison.json").read_text()


def _untracked(tmp_path: Path) -> Path:
    path = tmp_path / "untracked.yaml"
    path.write_text("tracking:\n  enabled: false\n")
    return path


def _eval_report(path: Path, run_file: Path, dataset: dict[str, str], split: str = "test") -> Path:
    with ArtifactWriter(path, "eval-report", producer="eval") as staged:
        (staged.path / "run.trec").write_bytes(run_file.read_bytes())
        (staged.path / "latency.json").write_text(json.dumps({"batch_size": 8, "calls_ms": [3.0, 4.0, 5.0, 40.0]}))
        staged.metadata.update(dataset=dataset, split=split, positive_min=1)
    return path


def test_runs_scored_on_other_data_are_refused_unless_forced(dataset: Path, tmp_path: Path) -> None:
    poor, good = _runs_on(dataset, tmp_path)
    config = load_config(None, [f"data.dir={dataset}"])
    identity = load_dataset(config.data, ["test"]).files.identity()
    same = _eval_report(tmp_path / "same", poor, identity)
    other = _eval_report(tmp_path / "other", good, {"name": "cmp", "fingerprint": "0" * 64})
    dev = _eval_report(tmp_path / "dev", good, identity, split="dev")
    common = ["--data", str(dataset), "--permutations", "200", "--config", str(_untracked(tmp_path))]
    for refused, reason in ((other, "dataset cmp (000000000000) is not cmp"), (dev, "split 'dev' is not 'test'")):
        result = runner.invoke(app, ["eval", "compare", str(same), str(refused), "--out", str(tmp_path / "x"),
                                     *common])
        assert result.exit_code == 2, result.output
        assert reason in " ".join(result.output.split()) and not (tmp_path / "x").exists()
    forced = runner.invoke(app, ["eval", "compare", str(same), str(other), "--force", "--out",
                                 str(tmp_path / "forced"), *common])
    assert forced.exit_code == 0, forced.output
    comparison = json.loads((tmp_path / "forced" / "comparison.json").read_text())
    assert comparison["latency_ms"]["same"]["calls"] == 4 and comparison["latency_ms"]["same"]["p50"] == 4.5
    assert (tmp_path / "forced" / "plots" / "latency.png").is_file()
    assert json.loads((tmp_path / "forced" / "manifest.json").read_text())["metadata"]["forced"] is True
    one = runner.invoke(app, ["eval", "compare", str(same), "--out", str(tmp_path / "y"), *common])
    assert one.exit_code == 2 and "at least two runs" in one.output


def test_a_run_read_back_from_its_file_scores_as_it_did() -> None:
    # Scores that differ only past the sixth decimal: rounded, they would tie and reorder.
    qrels = {"q1": {"d2": 1}}
    run = {"q1": {"d1": 12.3456781, "d2": 12.3456784, "d3": 1.0}}
    import tempfile

    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "run.trec"
        write_trec_run(path, run)
        assert read_trec_run(path) == run
        assert score_run(qrels, read_trec_run(path)) == score_run(qrels, run)

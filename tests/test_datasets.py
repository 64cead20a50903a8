"""Any BEIR-format dataset runs end to end: `towerline demo --data` on each quirk real collections have,
through Spark, training, ONNX, FAISS and gRPC, or to a one-line error in the check step."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
from beir_quirks import EMPTY_DOC_LINE, TEXT_ONLY, TITLE_ONLY, make_quirky, non_relevant_doc
from typer.testing import CliRunner

from towerline.beir import EMPTY_DOCUMENT, UNKNOWN_DOC, locate_dataset
from towerline.cli import app
from towerline.config import DataConfig

runner = CliRunner()
# The tiny dataset: 40 queries with one judged document each, half in qrels/train and half in qrels/test.
TEST_QUERIES = TRAIN_JUDGMENTS = 20
# The emptied document is judged in qrels/train: that judgment now names an unknown doc (reported only).
EMPTY_DOC_REJECTIONS = [
    {"source": "corpus.jsonl", "reason": EMPTY_DOCUMENT, "fatal": True, "rows": 1},
    {"source": "qrels/train.tsv", "reason": UNKNOWN_DOC, "fatal": False, "rows": 1},
]


@pytest.fixture()
def quirky(tiny_dataset: Path, tmp_path: Path, request: pytest.FixtureRequest) -> Path:
    return make_quirky(tiny_dataset, request.param, tmp_path / request.param)


def run_demo(dataset: Path, overrides: list[str], out: Path, *options: str) -> tuple[dict, Path]:
    """`towerline demo --data DATASET` with its run dir and results under `out`; (demo.json, demo artifacts)."""
    results = out / "demo.json"
    command = ["demo", "--data", str(dataset), "--results", str(results), *options]
    outcome = runner.invoke(app, [*command, *overrides, f"run_dir={out / 'runs'}"])
    assert outcome.exit_code == 0, outcome.output
    return json.loads(results.read_text()), out / "runs" / "demo"


def index_ids(demo_root: Path, label: str = "zero_shot") -> list[str]:
    return json.loads((demo_root / f"index-{label}" / "doc_ids.json").read_text())


def assert_names_its_dataset(summary: dict, dataset: Path) -> None:
    identity = locate_dataset(DataConfig(dir=dataset)).identity()
    assert summary["dataset"]["name"] == identity["name"] == dataset.name
    assert summary["dataset"]["fingerprint"] == identity["fingerprint"]


@pytest.mark.parametrize("quirky", ["title-and-text-only"], indirect=True)
def test_title_only_and_text_only_documents_are_indexed(quirky: Path, tiny_overrides: list[str], tmp_path: Path):
    summary, demo_root = run_demo(quirky, tiny_overrides, tmp_path)
    assert_names_its_dataset(summary, quirky)
    assert summary["protocol"]["kind"] == "official"
    assert summary["fine_tuned"]["queries"] == TEST_QUERIES
    for label in ("zero_shot", "fine_tuned"):
        assert set(TITLE_ONLY + TEXT_ONLY) <= set(index_ids(demo_root, label))
        assert len(index_ids(demo_root, label)) == 80
    assert summary["dataset"]["rejected"] == []


@pytest.mark.parametrize("quirky", ["numeric-ids"], indirect=True)
def test_numeric_ids_are_the_same_ids_everywhere(quirky: Path, tiny_overrides: list[str], tmp_path: Path):
    summary, demo_root = run_demo(quirky, tiny_overrides, tmp_path)
    assert summary["fine_tuned"]["queries"] == TEST_QUERIES  # every judged query matched its id
    assert summary["fine_tuned"]["ndcg@10"] > 0
    assert "12" in index_ids(demo_root)
    pairs = pd.read_parquet(demo_root / "pairs" / "pairs.parquet")
    assert len(pairs) == TRAIN_JUDGMENTS and pairs["positive_id"].str.isdigit().all()


@pytest.mark.parametrize("quirky", ["graded-qrels-with-zeros"], indirect=True)
def test_graded_qrels_keep_zeros_as_known_negatives(quirky: Path, tiny_overrides: list[str], tmp_path: Path):
    summary, demo_root = run_demo(quirky, tiny_overrides, tmp_path)
    pairs = pd.read_parquet(demo_root / "pairs" / "pairs.parquet")
    assert len(pairs) == TRAIN_JUDGMENTS  # one pair per graded-2 judgment; no score-0 judgment became a pair
    for pair in pairs.itertuples():
        assert pair.negative_ids[0] == non_relevant_doc(pair.positive_id)  # the judged negative comes first
    assert summary["fine_tuned"]["queries"] == TEST_QUERIES


@pytest.mark.parametrize("quirky", ["gzipped", "crlf"], indirect=True)
def test_gzipped_and_crlf_files_run(quirky: Path, tiny_dataset: Path, tiny_overrides: list[str], tmp_path: Path):
    summary, demo_root = run_demo(quirky, tiny_overrides, tmp_path)
    assert_names_its_dataset(summary, quirky)
    assert summary["fine_tuned"]["queries"] == TEST_QUERIES
    assert len(index_ids(demo_root, "fine_tuned")) == 80
    same_content = quirky.name == "gzipped"
    clean = locate_dataset(DataConfig(dir=tiny_dataset)).identity()["fingerprint"]
    assert (summary["dataset"]["fingerprint"] == clean) is same_content


@pytest.mark.parametrize("quirky", ["no-train-split"], indirect=True)
def test_no_train_split_runs_zero_shot_or_splits_the_test_queries_when_asked(
    quirky: Path, tiny_overrides: list[str], tmp_path: Path
) -> None:
    summary, demo_root = run_demo(quirky, tiny_overrides, tmp_path / "zero")
    assert summary["protocol"]["kind"] == "zero-shot only"
    assert summary["fine_tuned"] is None and summary["zero_shot"]["queries"] == TEST_QUERIES
    assert summary["dataset"]["splits"] == ["test"]
    assert not (demo_root / "pairs").exists()
    # BM25 and an untuned hybrid beside the zero-shot towers (no train queries to tune the fusion on).
    assert summary["bm25"]["queries"] == summary["hybrid"]["queries"] == TEST_QUERIES
    assert summary["fusion"] is None

    summary, demo_root = run_demo(quirky, tiny_overrides, tmp_path / "split", "--split-test-queries", "0.5")
    protocol = summary["protocol"]
    assert protocol["kind"] == "split-test-queries" and "not the official protocol" in protocol["protocol"]
    assert (protocol["train_queries"], protocol["eval_queries"]) == (10, 10)
    assert summary["fine_tuned"]["queries"] == summary["zero_shot"]["queries"] == 10
    trained_on = set(pd.read_parquet(demo_root / "pairs" / "pairs.parquet")["query_id"])
    evaluated = {line.split()[0] for line in (demo_root / "eval-fine_tuned" / "run.trec").read_text().splitlines()}
    assert len(trained_on) == 10 and not trained_on & evaluated


@pytest.mark.parametrize("quirky", ["empty-document"], indirect=True)
def test_an_empty_document_fails_in_the_check_or_is_quarantined(
    quirky: Path, tiny_overrides: list[str], tmp_path: Path
) -> None:
    results = tmp_path / "failed.json"
    outcome = runner.invoke(app, ["demo", "--data", str(quirky), "--results", str(results), *tiny_overrides])
    assert outcome.exit_code == 2, outcome.output
    lines = [line for line in outcome.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and f"corpus.jsonl:{EMPTY_DOC_LINE}: {EMPTY_DOCUMENT}" in lines[0], outcome.stderr
    assert not (tmp_path / "runs").exists() and not results.exists()  # nothing started, nothing written

    summary, demo_root = run_demo(quirky, [*tiny_overrides, "data.on_malformed=quarantine"], tmp_path)
    assert len(index_ids(demo_root, "fine_tuned")) == 79
    assert summary["dataset"]["rejected"] == EMPTY_DOC_REJECTIONS
    # The Spark job quarantined exactly what the check reported.
    stats = json.loads((demo_root / "pairs" / "stats.json").read_text())
    assert stats["quarantine_reasons"] == [
        {"source": row["source"], "reason": row["reason"], "count": row["rows"]} for row in EMPTY_DOC_REJECTIONS
    ]


@pytest.mark.parametrize("quirky", ["empty-document"], indirect=True)
def test_data_check_reports_and_fails_in_one_line(quirky: Path) -> None:
    outcome = runner.invoke(app, ["data", "check", str(quirky), "--json"])
    assert outcome.exit_code == 2
    report = json.loads(outcome.stdout)
    assert report["documents"] == 79 and report["queries"] == 40
    assert sorted(report["splits"]) == ["test", "train"]
    assert report["splits"]["test"]["queries_with_positives"] == TEST_QUERIES
    assert report["rejected"] == EMPTY_DOC_REJECTIONS
    assert report["document_words"]["max"] >= report["document_words"]["median"] > 0
    [line] = [line for line in outcome.stderr.splitlines() if line.strip()]
    assert f"corpus.jsonl:{EMPTY_DOC_LINE}: {EMPTY_DOCUMENT}" in line

    passing = runner.invoke(app, ["data", "check", str(quirky), "data.on_malformed=quarantine", "--positive-min", "2"])
    assert passing.exit_code == 0, passing.output
    assert "document has neither title nor text" in passing.stdout and "positive_min=2" in passing.stdout


@pytest.mark.parametrize("quirky", ["no-train-split"], indirect=True)
def test_data_split_writes_qrels_the_stages_can_read(quirky: Path, tmp_path: Path) -> None:
    split_dir = tmp_path / "split"
    outcome = runner.invoke(app, ["data", "split", str(quirky), "--fraction", "0.25", "--seed", "3",
                                  "--out", str(split_dir), f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}"])
    assert outcome.exit_code == 0, outcome.output
    manifest = json.loads((split_dir / "manifest.json").read_text())
    assert manifest["kind"] == "qrels-split" and "not the official protocol" in manifest["metadata"]["protocol"]
    checked = runner.invoke(app, ["data", "check", str(quirky), f"data.qrels_dir={split_dir / 'qrels'}", "--json"])
    splits = json.loads(checked.stdout)["splits"]
    assert (splits["train"]["queries_with_positives"], splits["test"]["queries_with_positives"]) == (5, 15)

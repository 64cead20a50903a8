"""The command line end to end: the whole slice on tiny data, and one-line errors for bad input."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from evaluation.metrics import score_run
from towerline.beir import load_dataset
from towerline.cli import app
from towerline.config import DataConfig, TowerlineConfig
from towerline.towers import load_towers

runner = CliRunner()


def test_demo_runs_the_whole_slice(tiny_config: TowerlineConfig, tiny_overrides: list[str], tmp_path: Path) -> None:
    """Real Spark (local), tiny random towers, ONNX Runtime, FAISS, gRPC on loopback, MLflow sqlite."""
    results = tmp_path / "demo.json"
    outcome = runner.invoke(app, ["demo", "--results", str(results), *tiny_overrides, "train.epochs=10"])
    assert outcome.exit_code == 0, outcome.output
    summary = json.loads(results.read_text())
    for label in ("zero_shot", "fine_tuned"):
        assert 0.0 <= summary[label]["ndcg@10"] <= 1.0
        assert summary[label]["queries"] > 0
    # What came back through gRPC (ONNX Runtime + FAISS) equals brute-force PyTorch retrieval.
    in_process = _in_process_metrics(tiny_config.run_dir / "demo" / "encoder", tiny_config.data.dir)
    assert abs(summary["fine_tuned"]["ndcg@10"] - in_process["ndcg@10"]) < 1e-3
    assert abs(summary["fine_tuned"]["recall@100"] - in_process["recall@100"]) < 1e-3
    assert {"pairs", "train", "index.fine_tuned", "eval.fine_tuned"} <= set(summary["stage_seconds"])
    demo_root = tiny_config.run_dir / "demo"
    report = json.loads((demo_root / "eval-fine_tuned" / "manifest.json").read_text())
    assert report["kind"] == "eval-report"
    # The demo's comparison report: every row against zero-shot, with the demo's own figures.
    comparison = json.loads((demo_root / "compare" / "comparison.json").read_text())
    assert comparison["baseline"] == "zero_shot" and "fine_tuned" in comparison["comparisons"]
    assert comparison["table"]["fine_tuned"]["ndcg@10"] == pytest.approx(summary["fine_tuned"]["ndcg@10"])
    assert (demo_root / "compare" / "report.html").is_file()
    db_path = str(tiny_config.tracking.uri).removeprefix("sqlite:///")
    with sqlite3.connect(db_path) as db:
        run_names = {row[0] for row in db.execute("select name from runs")}
        versions = db.execute("select name, version from model_versions").fetchall()
        space_tags = {row[0] for row in db.execute("select value from model_version_tags where key='embedding_space'")}
    assert {"demo", "pairs", "train", "eval.fine_tuned"} <= run_names
    # Every export is a registered model version; the distilled student shares the fine-tuned teacher's space,
    # and each index is registered in its own.
    assert sorted(versions) == [*(("towerline-index", version) for version in (1, 2)),
                                *(("towerline-query-encoder", version) for version in (1, 2, 3))]
    assert len(space_tags) == 2
    # Stage 2: the student served against the fine-tuned index, with its speed measured beside it.
    assert summary["distilled"]["queries"] == summary["fine_tuned"]["queries"]
    assert summary["distilled_over_teacher"]["ndcg@10"] > 0
    assert {"distill", "export.distilled", "eval.distilled"} <= set(summary["stage_seconds"])
    assert "index.distilled" not in summary["stage_seconds"]  # the teacher's index is reused as it is
    assert all(summary[label]["p50_ms_batch1"] > 0 for label in ("zero_shot", "fine_tuned", "distilled"))
    # Hybrid: the index version's BM25 side alone, and fused with each query tower, all through gRPC; the
    # BM25 row equals bm25s run in-process, and the fusion was tuned on train queries before any of it.
    from towerline.bm25 import build_index as build_bm25

    beir = load_dataset(DataConfig(dir=tiny_config.data.dir), ["test"])
    bm25 = build_bm25(list(beir.corpus), [doc.full_text for doc in beir.corpus.values()], "english")
    test_ids = list(beir.split("test"))
    direct = dict(zip(test_ids, map(dict, bm25.search([beir.queries[q] for q in test_ids], 20)), strict=True))
    assert summary["bm25"]["ndcg@10"] == score_run(beir.split("test"), direct)["ndcg@10"]
    assert summary["fusion"]["split"] == "train" and summary["fusion"]["chosen"]
    for label in ("bm25", "hybrid", "distilled_hybrid"):
        assert 0.0 < summary[label]["ndcg@10"] <= 1.0 and summary[label]["search_p50_ms"] > 0
        assert "p50_ms_batch1" not in summary[label]  # no query encoder of its own to time
    hybrid_run = (demo_root / "eval-hybrid" / "run.trec").read_text()
    assert hybrid_run not in ((demo_root / "eval-fine_tuned" / "run.trec").read_text(),
                              (demo_root / "eval-bm25" / "run.trec").read_text())
    assert list(summary["stage_seconds"]).index("tune_fusion") < list(summary["stage_seconds"]).index("eval.fine_tuned")


def _in_process_metrics(encoder_dir: Path, dataset: Path) -> dict[str, float]:
    query_tower, doc_tower, _ = load_towers(encoder_dir)
    beir = load_dataset(DataConfig(dir=dataset), ["test"])
    corpus, queries, qrels = beir.corpus, beir.queries, beir.split("test")
    doc_ids = list(corpus)
    doc_matrix = doc_tower.encode([corpus[d].full_text for d in doc_ids])
    query_ids = list(qrels)
    scores = query_tower.encode([queries[q] for q in query_ids]) @ doc_matrix.T
    run = {}
    for row, query_id in enumerate(query_ids):
        top = np.argsort(-scores[row])[:20]
        run[query_id] = {doc_ids[i]: float(scores[row, i]) for i in top}
    return score_run(qrels, run)


def _error_line(outcome) -> str:
    assert outcome.exit_code == 2, outcome.output
    lines = [line for line in outcome.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, outcome.stderr
    return lines[0]


def test_config_typo_is_one_line(tmp_path: Path) -> None:
    line = _error_line(runner.invoke(app, ["train", "--zero-shot", "train.lerning_rate=1"]))
    assert "unknown config key 'train.lerning_rate'" in line


def test_missing_data_dir_is_one_line(tmp_path: Path) -> None:
    outcome = runner.invoke(app, ["demo", f"data.dir={tmp_path / 'nope'}", f"run_dir={tmp_path / 'runs'}"])
    assert "data dir not found" in _error_line(outcome)
    assert not (tmp_path / "runs").exists()


def test_malformed_jsonl_names_the_line(
    tiny_config: TowerlineConfig, tiny_overrides: list[str], tiny_dataset: Path, tmp_path: Path
) -> None:
    broken = tmp_path / "broken"
    broken.mkdir()
    for name in ("queries.jsonl", "qrels"):
        (broken / name).symlink_to(tiny_dataset / name)
    lines = (tiny_dataset / "corpus.jsonl").read_text().splitlines()
    lines[6] = '{"_id": "d6", "text": oops'
    (broken / "corpus.jsonl").write_text("\n".join(lines) + "\n")
    overrides = [*tiny_overrides, f"data.dir={broken}"]
    runner.invoke(app, ["train", "--zero-shot", *overrides])
    encoder_dir = tiny_config.run_dir / "encoder-zero-shot"
    outcome = runner.invoke(
        app, ["index", "build", "--encoder", str(encoder_dir), "--out", str(tmp_path / "index"), *overrides]
    )
    assert "corpus.jsonl:7: malformed JSON" in _error_line(outcome)
    assert not (tmp_path / "index").exists()
    assert not any(p.name.startswith(".index") for p in tmp_path.iterdir())


def test_wrong_artifact_kind_is_one_line(
    tiny_config: TowerlineConfig, tiny_overrides: list[str], tmp_path: Path
) -> None:
    overrides = tiny_overrides
    assert runner.invoke(app, ["train", "--zero-shot", *overrides]).exit_code == 0
    encoder_dir = tiny_config.run_dir / "encoder-zero-shot"
    outcome = runner.invoke(app, ["export", "--encoder", str(tmp_path), "--out", str(tmp_path / "x"), *overrides])
    assert "no manifest.json" in _error_line(outcome)
    outcome = runner.invoke(app, ["train", "--pairs", str(encoder_dir), "--out", str(tmp_path / "y"), *overrides])
    assert "expected 'training-pairs'" in _error_line(outcome)
    assert not (tmp_path / "y").exists()


@pytest.mark.parametrize("command", [[], ["index"], ["train"], ["demo"], ["serve"], ["eval"], ["pairs"]])
def test_help_explains(command: list[str]) -> None:
    outcome = runner.invoke(app, [*command, "--help"])
    assert outcome.exit_code == 0
    assert "Usage" in outcome.output

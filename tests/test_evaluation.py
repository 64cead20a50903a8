"""Offline evaluation: in-process from artifacts and through a live gRPC server give the same scores."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from indexing.build import build_index
from serving.app import build_service
from serving.onnx_export import run_export
from serving.server import start_server
from towerline.cli import app
from towerline.config import TowerlineConfig
from training.run import init_dual_encoder

runner = CliRunner()


def test_eval_in_process_equals_eval_through_grpc(tiny_config: TowerlineConfig, tmp_path: Path) -> None:
    init_dual_encoder(tiny_config, tmp_path / "encoder")
    run_export(tiny_config, tmp_path / "encoder", tmp_path / "onnx")
    build_index(tiny_config, tmp_path / "encoder", tmp_path / "index")
    overrides = [f"data.dir={tiny_config.data.dir}", "eval.top_k=20", f"tracking.uri={tiny_config.tracking.uri}"]

    offline = runner.invoke(app, ["eval", "--index", str(tmp_path / "index"), "--encoder", str(tmp_path / "onnx"),
                                  "--out", str(tmp_path / "offline"), *overrides])
    assert offline.exit_code == 0, offline.output
    serve_config = tiny_config.serve.model_copy(update={"port": 0})
    server, port = start_server(build_service(tiny_config, tmp_path / "index", tmp_path / "onnx"), serve_config)
    try:
        live = runner.invoke(app, ["eval", "--address", f"127.0.0.1:{port}", "--out", str(tmp_path / "live"),
                                   *overrides])
        found = runner.invoke(app, ["search", "alpha beta", "--address", f"127.0.0.1:{port}", "-k", "3",
                                    f"data.dir={tiny_config.data.dir}"])
    finally:
        server.stop(grace=1).wait()
    assert live.exit_code == 0, live.output
    assert found.exit_code == 0, found.output
    assert sum(line.startswith(("  1  ", "  2  ", "  3  ")) for line in found.output.splitlines()) == 3

    # Every mode of the index version (dense, BM25, hybrid) scores the same in-process and through gRPC.
    for mode in ("dense", "sparse", "hybrid"):
        offline_metrics = json.loads((tmp_path / "offline" / mode / "metrics.json").read_text())
        live_metrics = json.loads((tmp_path / "live" / mode / "metrics.json").read_text())
        assert offline_metrics == live_metrics, mode
        assert live_metrics["queries"] == 20
        live_run = (tmp_path / "live" / mode / "run.trec").read_text()
        assert live_run == (tmp_path / "offline" / mode / "run.trec").read_text(), mode
    assert "hybrid" in live.output and "sparse" in live.output
    dense_run = (tmp_path / "live" / "dense" / "run.trec").read_text()
    assert dense_run != (tmp_path / "live" / "hybrid" / "run.trec").read_text()


def test_an_index_is_not_scored_against_other_data_unless_forced(tiny_config: TowerlineConfig,
                                                                  tmp_path: Path) -> None:
    from towerline.beir import load_dataset
    from towerline.synthetic import write_synthetic_beir

    init_dual_encoder(tiny_config, tmp_path / "encoder")
    run_export(tiny_config, tmp_path / "encoder", tmp_path / "onnx")
    build_index(tiny_config, tmp_path / "encoder", tmp_path / "index")
    built_on = load_dataset(tiny_config.data).files.identity()
    serve_config = tiny_config.serve.model_copy(update={"port": 0})
    server, port = start_server(build_service(tiny_config, tmp_path / "index", tmp_path / "onnx"), serve_config)
    try:
        from serving.client import RetrievalClient

        with RetrievalClient(f"127.0.0.1:{port}") as client:
            info = client.info()  # the index names its data over the wire
        assert (info.dataset, info.dataset_fingerprint) == (built_on["name"], built_on["fingerprint"])
    finally:
        server.stop(grace=1).wait()

    other = write_synthetic_beir(tmp_path / "other", docs=80, queries=40, seed=5)
    overrides = [f"data.dir={other}", "eval.top_k=20", f"tracking.uri={tiny_config.tracking.uri}"]
    command = ["eval", "--index", str(tmp_path / "index"), "--encoder", str(tmp_path / "onnx"), "--mode", "dense"]
    refused = runner.invoke(app, [*command, "--out", str(tmp_path / "refused"), *overrides])
    assert refused.exit_code == 2, refused.output
    message = " ".join(refused.output.split())
    assert f"built from {built_on['name']} ({built_on['fingerprint'][:12]}), not from other" in message
    assert not (tmp_path / "refused").exists()
    forced = runner.invoke(app, [*command, "--force", "--out", str(tmp_path / "forced"), *overrides])
    assert forced.exit_code == 0, forced.output
    assert json.loads((tmp_path / "forced" / "manifest.json").read_text())["metadata"]["forced"] is True
    latency = json.loads((tmp_path / "forced" / "latency.json").read_text())
    assert len(latency["calls_ms"]) >= 1 and all(ms > 0 for ms in latency["calls_ms"])
    summary = json.loads((tmp_path / "forced" / "manifest.json").read_text())["metadata"]["latency_ms"]
    assert summary["calls"] == len(latency["calls_ms"]) and 0 < summary["p50"] <= summary["p99"]


def test_trec_topics_and_qrels_score_like_the_dataset_split(tiny_config: TowerlineConfig, tmp_path: Path) -> None:
    from towerline.beir import load_dataset

    init_dual_encoder(tiny_config, tmp_path / "encoder")
    build_index(tiny_config, tmp_path / "encoder", tmp_path / "index")
    dataset = load_dataset(tiny_config.data, ["test"])
    qrels = dataset.split("test")
    # The same judged queries as TREC files: SGML topics and four-column qrels.
    (tmp_path / "topics.txt").write_text("".join(
        f"<top>\n<num> Number: {qid}\n<title> {dataset.queries[qid]}\n<desc> Description:\nignored\n</top>\n\n"
        for qid in qrels))
    (tmp_path / "qrels.txt").write_text("".join(f"{qid} 0 {doc} {grade}\n" for qid, docs in qrels.items()
                                                for doc, grade in docs.items()))
    overrides = [f"data.dir={tiny_config.data.dir}", "eval.top_k=20", f"tracking.uri={tiny_config.tracking.uri}"]
    command = ["eval", "--index", str(tmp_path / "index"), "--encoder", str(tmp_path / "encoder"), "--mode", "dense"]
    from_split = runner.invoke(app, [*command, "--out", str(tmp_path / "split"), *overrides])
    from_trec = runner.invoke(app, [*command, "--topics", str(tmp_path / "topics.txt"), "--qrels",
                                    str(tmp_path / "qrels.txt"), "--out", str(tmp_path / "trec"), *overrides])
    assert from_split.exit_code == 0, from_split.output
    assert from_trec.exit_code == 0, from_trec.output
    assert (json.loads((tmp_path / "trec" / "metrics.json").read_text())
            == json.loads((tmp_path / "split" / "metrics.json").read_text()))
    assert json.loads((tmp_path / "trec" / "manifest.json").read_text())["metadata"]["dataset"]["name"] == "topics"
    lonely = runner.invoke(app, [*command, "--topics", str(tmp_path / "topics.txt"), *overrides])
    assert lonely.exit_code == 2 and "--topics and --qrels go together" in lonely.output

    # Runs scored on TREC topics compare on the same files; a run scored on the dataset split does not.
    trec_files = ["--topics", str(tmp_path / "topics.txt"), "--qrels", str(tmp_path / "qrels.txt"),
                  "--permutations", "200", "--config", str(_untracked(tmp_path))]
    compared = runner.invoke(app, ["eval", "compare", str(tmp_path / "trec"), str(tmp_path / "trec"), "--name", "a",
                                   "--name", "b", "--out", str(tmp_path / "cmp"), *trec_files])
    assert compared.exit_code == 0, compared.output
    assert json.loads((tmp_path / "cmp" / "comparison.json").read_text())["dataset"]["split"] == "trec"
    mixed = runner.invoke(app, ["eval", "compare", str(tmp_path / "trec"), str(tmp_path / "split"), "--out",
                                str(tmp_path / "mixed"), *trec_files])
    assert mixed.exit_code == 2 and "split 'test' is not 'trec'" in " ".join(mixed.output.split())


def _untracked(tmp_path: Path) -> Path:
    path = tmp_path / "untracked.yaml"
    path.write_text("tracking:\n  enabled: false\n")
    return path


def test_trec_readers_name_the_bad_line(tmp_path: Path) -> None:
    from evaluation.trec import read_trec_qrels, read_trec_topics
    from towerline.errors import DataError

    (tmp_path / "topics.tsv").write_text("q1\tfirst query\n\nq2\tsecond query\n")
    assert read_trec_topics(tmp_path / "topics.tsv") == {"q1": "first query", "q2": "second query"}
    (tmp_path / "bad.tsv").write_text("q1\tfirst\nq2 no tab\n")
    with pytest.raises(DataError, match=r"bad.tsv:2: expected query_id<TAB>text"):
        read_trec_topics(tmp_path / "bad.tsv")
    (tmp_path / "qrels").write_text("q1 0 d1 1\nq1 0 d2 high\n")
    with pytest.raises(DataError, match=r"qrels:2: relevance 'high'"):
        read_trec_qrels(tmp_path / "qrels")
    (tmp_path / "short").write_text("q1 d1 1\n")
    with pytest.raises(DataError, match=r"short:1: expected `query_id iteration doc_id relevance`"):
        read_trec_qrels(tmp_path / "short")


def test_eval_suite_scores_one_encoder_on_every_dataset(tiny_config: TowerlineConfig, tmp_path: Path) -> None:
    from towerline.synthetic import write_synthetic_beir

    init_dual_encoder(tiny_config, tmp_path / "encoder")
    second = write_synthetic_beir(tmp_path / "second", docs=60, queries=30, seed=7)
    result = runner.invoke(app, ["eval", "suite", "--data", str(tiny_config.data.dir), "--data", str(second),
                                 "--encoder", str(tmp_path / "encoder"), "--out", str(tmp_path / "suite"),
                                 "eval.top_k=20", f"tracking.uri={tiny_config.tracking.uri}"])
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "suite" / "summary.json").read_text())
    names = [Path(str(tiny_config.data.dir)).name, "second"]
    assert list(summary["rows"]) == names
    for metric in ("ndcg@10", "recall@100", "mrr@10"):
        expected = sum(summary["rows"][name]["dense"][metric] for name in names) / 2
        assert summary["mean"]["dense"][metric] == pytest.approx(expected)
    # Each corpus got its own index, built from (and scored on) its own dataset.
    fingerprints = {json.loads((tmp_path / "suite" / name / "index" / "manifest.json").read_text())
                    ["metadata"]["dataset"]["fingerprint"] for name in names}
    assert len(fingerprints) == 2 and set(summary["datasets"]) == set(names)
    assert str(tmp_path) not in (tmp_path / "suite" / "summary.json").read_text()

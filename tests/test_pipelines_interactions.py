"""The interactions Spark job on real Spark (local): formats, validation, histories, time split."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
from pathlib import Path

import pandas as pd
import pytest
import yaml
from conftest import SPARK_TEST_OVERRIDES
from pyspark.sql import SparkSession

from personalization.recommender import COLD_START, PERSONALISED
from pipelines.interaction_formats import (
    parse_csv_item,
    parse_dat_interaction,
    parse_dat_item,
    parse_ml100k_item,
    parse_ml100k_user,
)
from pipelines.interactions import run_interactions
from towerline.artifacts import read_manifest
from towerline.beir import RowRejected
from towerline.config import TowerlineConfig, load_config
from towerline.errors import ArtifactError, ConfigError, DataError
from towerline.synthetic_rec import SyntheticRecSpec, write_synthetic_interactions

SPEC = SyntheticRecSpec(users=300, items=60, interactions_per_user=30, seed=3)


def rec_config(tmp_path: Path, dataset: Path | str, *overrides: str) -> TowerlineConfig:
    return load_config(None, [f"run_dir={tmp_path / 'runs'}", f"rec.data.dataset={dataset}",
                              *SPARK_TEST_OVERRIDES, *overrides])


@pytest.fixture(scope="module")
def synthetic_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_synthetic_interactions(tmp_path_factory.mktemp("rec") / "synthetic", SPEC)


@pytest.fixture(scope="module")
def synthetic_artifact(spark: SparkSession, synthetic_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("interactions")
    run_interactions(rec_config(tmp, synthetic_dir, "rec.data.long_history=8", "rec.data.short_history=3"),
                     tmp / "out")
    return tmp / "out"


def test_histories_look_only_backwards_and_the_split_never_trains_on_the_future(synthetic_artifact: Path,
                                                                                 synthetic_dir: Path) -> None:
    samples = pd.read_parquet(synthetic_artifact / "samples.parquet")
    items = pd.read_parquet(synthetic_artifact / "items.parquet")
    raw = pd.read_csv(synthetic_dir / "interactions.csv")
    assert len(samples) == len(raw)
    by_split = samples.groupby("split")["timestamp"]
    assert by_split.max()["train"] < by_split.min()["valid"] <= by_split.max()["valid"] < by_split.min()["test"]
    fractions = samples["split"].value_counts(normalize=True)
    assert fractions["train"] == pytest.approx(0.8, abs=0.02) and fractions["test"] == pytest.approx(0.1, abs=0.02)
    assert samples["label"].tolist() == [int(r > 3) for r in samples["rating"]]

    when = {(row.user_index, row.item_index): row.timestamp for row in samples.itertuples()}
    titles = dict(zip(items["item_index"], items["title"], strict=True))
    for row in samples.itertuples():
        history = list(row.long_history)
        assert len(history) <= 8 and list(row.short_history) == history[-3:]
        assert [when[(row.user_index, item)] for item in history] == sorted(when[(row.user_index, item)]
                                                                             for item in history)
        assert all(when[(row.user_index, item)] < row.timestamp for item in history)
        assert list(row.short_history_titles) == [titles[item] for item in row.short_history]
    # Histories are the latest interactions before the sample: a user's 9th event has the 8 before it.
    user = samples[samples["user_index"] == samples["user_index"].iloc[0]].sort_values("timestamp")
    assert list(user.iloc[8]["long_history"]) == user["item_index"].iloc[:8].tolist()


def test_sequences_users_items_and_stats(synthetic_artifact: Path) -> None:
    from towerline.artifacts import read_manifest

    manifest = read_manifest(synthetic_artifact, "interactions", verify=True)
    sequences = pd.read_parquet(synthetic_artifact / "sequences.parquet")
    users = pd.read_parquet(synthetic_artifact / "users.parquet")
    items = pd.read_parquet(synthetic_artifact / "items.parquet")
    assert users["user_index"].tolist() == list(range(1, SPEC.users + 1))
    assert items["item_index"].tolist() == list(range(1, SPEC.items + 1))
    assert set(users["gender"]) <= {"F", "M"}
    assert all(list(ts) == sorted(ts) for ts in sequences["timestamps"])
    assert manifest.metadata["samples"] == sum(len(items) for items in sequences["item_indexes"])
    assert manifest.metadata["label"] == "rating > 3"
    assert manifest.metadata["dataset"]["format"] == "generic" and manifest.metadata["quarantined"] == {}


@pytest.fixture()
def damaged_dir(synthetic_dir: Path, tmp_path: Path) -> Path:
    root = tmp_path / "damaged"
    shutil.copytree(synthetic_dir, root)
    lines = (root / "interactions.csv").read_text().splitlines()
    lines[4] = "u1,i2,not-a-number,1600000000"
    lines.append("u1,no-such-item,4,1600000001")
    (root / "interactions.csv").write_text("\n".join(lines) + "\n")
    return root


def test_a_malformed_line_fails_naming_it_and_writes_nothing(spark: SparkSession, damaged_dir: Path,
                                                              tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"interactions.csv:5: rating is not a number"):
        run_interactions(rec_config(tmp_path, damaged_dir), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_quarantine_keeps_bad_lines_with_reasons(spark: SparkSession, damaged_dir: Path, tmp_path: Path) -> None:
    manifest = run_interactions(rec_config(tmp_path, damaged_dir, "rec.data.on_malformed=quarantine"),
                                tmp_path / "out")
    quarantine = pd.read_parquet(tmp_path / "out" / "quarantine.parquet")
    assert quarantine[["source", "line", "reason"]].values.tolist() == [
        ["interactions.csv", 5, "rating is not a number"],
        ["interactions.csv", len((damaged_dir / "interactions.csv").read_text().splitlines()), "unknown item"],
    ]
    assert manifest.metadata["quarantined"] == {"rating is not a number": 1, "unknown item": 1}


def test_movielens_line_parsers() -> None:
    item = parse_ml100k_item("1|Toy Story (1995)|01-Jan-1995||http://x|0|0|0|1|1|1|0|0|0|0|0|0|0|0|0|0|0|0|0")
    assert item == ("1", "Toy Story (1995)", ["Animation", "Children's", "Comedy"])
    assert parse_ml100k_user("1|24|M|technician|85711") == ("1", "M", "24", "technician")
    assert parse_dat_interaction("1::1193::5::978300760") == ("1", "1193", 5.0, 978300760)
    assert parse_dat_item("1::Toy Story (1995)::Animation|Children's|Comedy")[2] == ["Animation", "Children's",
                                                                                      "Comedy"]
    assert parse_csv_item('11,"American President, The (1995)",Comedy|Drama|Romance') == (
        "11", "American President, The (1995)", ["Comedy", "Drama", "Romance"])
    assert parse_csv_item("9,Sudden Death (1995),(no genres listed)")[2] == []
    with pytest.raises(RowRejected, match="wrong number of fields"):
        parse_dat_interaction("1::1193::5")


ML100K = Path(os.environ.get("TOWERLINE_DATA_DIR", "")) / "ml-100k"


@pytest.mark.slow
@pytest.mark.skipif(not (ML100K / "u.data").is_file(), reason="ML-100K is read from $TOWERLINE_DATA_DIR only")
def test_movielens_100k_from_the_data_dir(spark: SparkSession, tmp_path: Path) -> None:
    manifest = run_interactions(rec_config(tmp_path, "ml-100k"), tmp_path / "out")
    meta = manifest.metadata
    assert (meta["users"], meta["items"], meta["samples"]) == (943, 1682, 100_000)
    assert meta["dataset"]["format"] == "ml-100k"
    assert 0.5 < meta["splits"]["train"]["positive_rate"] < 0.6


def test_din_trains_on_the_spark_output_and_beats_popularity(synthetic_artifact: Path, tmp_path: Path) -> None:
    from personalization.crm_run import run_train_crm
    from personalization.din import load_din
    from towerline.tracking import Tracker

    config = rec_config(tmp_path, "synthetic", "rec.crm.max_epochs=5", "rec.crm.history_length=8",
                        "rec.crm.embedding_dim=8", "rec.crm.batch_size=128")
    manifest = run_train_crm(config, synthetic_artifact, tmp_path / "crm", Tracker(None))
    meta = manifest.metadata
    assert meta["din"]["test"]["auc"] > meta["baselines"]["popularity"]["auc"]
    assert 1 <= meta["best_epoch"] <= meta["epochs_run"] <= 5
    assert load_din(tmp_path / "crm").representation_dim == meta["representation_dim"]

    # `rec compare`: the artifact's test probabilities, paired over users, in the eval compare report.
    from sklearn.metrics import roc_auc_score
    from typer.testing import CliRunner

    from towerline.cli import app

    result = CliRunner().invoke(app, ["rec", "compare", str(tmp_path / "crm"), "--permutations", "300", "--out",
                                      str(tmp_path / "cmp")])
    assert result.exit_code == 0, result.output
    comparison = json.loads((tmp_path / "cmp" / "comparison.json").read_text())
    assert comparison["baseline"] == "popularity" and list(comparison["comparisons"]) == ["logreg", "din"]
    for name in ("auc", "logloss", "gauc"):
        assert comparison["table"]["din"][name] == pytest.approx(meta["din"]["test"][name])
        assert comparison["table"]["popularity"][name] == pytest.approx(meta["baselines"]["popularity"][name])
    frame = pd.read_parquet(tmp_path / "crm" / "test_predictions.parquet")
    both = frame.groupby("user_index")["label"].transform("nunique") == 2
    per_user = {model: frame[both].groupby("user_index")[["label", model]].apply(
                    lambda g, m=model: roc_auc_score(g["label"], g[m])) for model in ("popularity", "din")}
    assert comparison["queries"] == len(per_user["din"])
    expected = (per_user["din"] - per_user["popularity"]).mean()
    assert comparison["comparisons"]["din"]["user_auc"]["delta"] == pytest.approx(expected)
    html = (tmp_path / "cmp" / "report.html").read_text()
    assert "users (with both labels)" in html and html.count("data:image/png;base64,") == 2  # delta bars, distributions

    # Two CRM artifacts of the same interactions: their DIN models side by side.
    run_train_crm(config.model_copy(update={"rec": config.rec.model_copy(update={
        "crm": config.rec.crm.model_copy(update={"seed": 1})})}), synthetic_artifact, tmp_path / "crm-b",
        Tracker(None))
    two = CliRunner().invoke(app, ["rec", "compare", str(tmp_path / "crm"), str(tmp_path / "crm-b"),
                                   "--permutations", "300", "--out", str(tmp_path / "cmp2")])
    assert two.exit_code == 0, two.output
    assert list(json.loads((tmp_path / "cmp2" / "comparison.json").read_text())["table"]) == ["crm", "crm-b"]


def test_two_tower_candidates_beat_most_popular(synthetic_artifact: Path, tiny_backbone: Path, tmp_path: Path) -> None:
    import numpy as np

    from personalization.two_tower_run import run_train_two_tower
    from towerline.tracking import Tracker

    config = rec_config(tmp_path, "synthetic", f"rec.two_tower.title_encoder={tiny_backbone}",
                        "rec.two_tower.history_length=8", "rec.two_tower.batch_size=32", "rec.two_tower.epochs=8")
    manifest = run_train_two_tower(config, synthetic_artifact, tmp_path / "two-tower", Tracker(None))
    meta = manifest.metadata
    print(meta["two_tower"], meta["most_popular"])
    # 60 items: Recall@50 is near 1 for any ranking here; the order within the top 10 is what differs.
    assert meta["two_tower"]["ndcg@10"] > meta["most_popular"]["ndcg@10"]
    vectors = np.load(tmp_path / "two-tower" / "item_vectors.npy")
    assert vectors.shape == (SPEC.items + 1, 64)
    assert np.allclose(np.linalg.norm(vectors[1:], axis=1), 1.0, atol=1e-5)


@pytest.fixture(scope="module")
def rec_root(synthetic_artifact: Path, tiny_backbone: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """interactions + crm + two-tower + item-index, as `towerline serve --recommender ROOT` reads them."""
    from personalization.crm_run import run_train_crm
    from personalization.two_tower_run import build_item_index, run_train_two_tower
    from towerline.tracking import Tracker

    root = tmp_path_factory.mktemp("rec-root")
    shutil.copytree(synthetic_artifact, root / "interactions")
    config = rec_config(root, "synthetic", "rec.crm.max_epochs=2", "rec.crm.history_length=8",
                        "rec.crm.embedding_dim=8", f"rec.two_tower.title_encoder={tiny_backbone}",
                        "rec.two_tower.history_length=8", "rec.two_tower.epochs=2")
    run_train_crm(config, root / "interactions", root / "crm", Tracker(None))
    run_train_two_tower(config, root / "interactions", root / "two-tower", Tracker(None))
    build_item_index(config, root / "two-tower", root / "item-index")
    return root


def test_recommend_over_grpc_equals_the_in_process_pipeline(rec_root: Path) -> None:
    import grpc

    from personalization.recommender import COLD_START, PERSONALISED, Recommender, RecommenderPaths
    from serving.proto.towerline.v1 import retrieval_pb2 as pb
    from serving.proto.towerline.v1 import retrieval_pb2_grpc as pb_grpc
    from serving.server import start_server

    config = load_config(None, ["serve.port=0"])
    recommender = Recommender(RecommenderPaths.under(rec_root), config.index)
    server, port = start_server(None, config.serve, recommender)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.RetrievalServiceStub(channel)
            requests = [("u3", [], 5), ("someone-new", ["i1", "i2"], 7), ("", [], 4), ("u5", ["i9"], 60)]
            for user_id, recent, top_k in requests:
                remote = stub.Recommend(pb.RecommendRequest(user_id=user_id, history_item_ids=recent, top_k=top_k),
                                        timeout=30)
                local = recommender.recommend(user_id, recent, top_k)
                assert [item.item_id for item in remote.items] == [item.item_id for item in local.items]
                assert [item.score for item in remote.items] == pytest.approx([item.score for item in local.items])
                assert [item.title for item in remote.items] == [item.title for item in local.items]
                assert remote.strategy == local.strategy and remote.model_version == local.model_version
                known = recommender.histories.get(recommender.user_indexes.get(user_id, 0), [])
                seen = set(recent) | {recommender.item_ids[index] for index in known}
                assert not seen & {item.item_id for item in remote.items}
                assert len(remote.items) == min(top_k, SPEC.items - len(seen))
                assert remote.strategy == (COLD_START if not user_id and not recent else PERSONALISED)
            for request, field in ((pb.RecommendRequest(user_id="u3", top_k=0), "top_k"),
                                   (pb.RecommendRequest(history_item_ids=["nope"], top_k=3), r"history_item_ids\[0\]")):
                with pytest.raises(grpc.RpcError) as raised:
                    stub.Recommend(request, timeout=30)
                assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
                assert re.search(field, raised.value.details())
    finally:
        server.stop(None).wait()

    bare, bare_port = start_server(None, config.serve)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{bare_port}") as channel, pytest.raises(grpc.RpcError) as raised:
            pb_grpc.RetrievalServiceStub(channel).Recommend(pb.RecommendRequest(top_k=3), timeout=30)
        assert raised.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    finally:
        bare.stop(None).wait()


def test_rec_eval_scores_the_pipeline_from_the_test_start_and_refuses_the_latest_state(rec_root: Path,
                                                                                       tmp_path: Path) -> None:
    from evaluation.recommend import evaluate_recommend_artifacts, evaluate_recommend_service, liked_in_test_period
    from personalization.recommender import Recommender, RecommenderPaths
    from serving.server import start_server

    config = load_config(None, ["serve.port=0"])
    paths = RecommenderPaths.under(rec_root)
    replay = Recommender(paths, config.index, state="test-start")
    latest = Recommender(paths, config.index)
    samples = pd.read_parquet(rec_root / "interactions" / "samples.parquet")
    before_test = samples[samples["split"] != "test"].groupby("user_index").size()
    for user, history in latest.histories.items():
        assert replay.histories.get(user, []) == history[: before_test.get(user, 0)]
    in_process = evaluate_recommend_artifacts(config, rec_root, tmp_path / "in-process", top_k=20)
    qrels = liked_in_test_period(rec_root / "interactions")
    assert in_process["users"] == len(qrels) > 0
    assert 0 < in_process["recall@50"] <= 1 and 0 < in_process["ndcg@10"] <= 1
    for recommender, outcome in ((replay, None), (latest, "recommend_state=test-start")):
        server, port = start_server(None, config.serve, recommender)
        try:
            if outcome is None:
                live = evaluate_recommend_service(config, f"127.0.0.1:{port}", rec_root / "interactions",
                                                  tmp_path / "live", top_k=20)
                assert {key: live[key] for key in ("recall@50", "ndcg@10")} == pytest.approx(
                    {key: in_process[key] for key in ("recall@50", "ndcg@10")})
            else:
                with pytest.raises(ConfigError, match=outcome):
                    evaluate_recommend_service(config, f"127.0.0.1:{port}", rec_root / "interactions",
                                               tmp_path / "refused", top_k=20)
                assert not (tmp_path / "refused").exists()
        finally:
            server.stop(None).wait()
    report = read_manifest(tmp_path / "live", "rec-eval-report")
    # Users who arrived during the test period have no history at its start: they get the cold-start answer.
    known = sum(replay.user_indexes[user] in replay.histories for user in qrels)
    assert 0 < known < len(qrels)
    assert report.metadata["strategies"] == {PERSONALISED: known, COLD_START: len(qrels) - known}

    # `rec compare` on rec eval reports: paired over the test users, against the truth each report kept.
    from typer.testing import CliRunner

    from evaluation.trec import read_trec_qrels
    from towerline.cli import app

    assert read_trec_qrels(tmp_path / "live" / "qrels.trec") == qrels
    evaluate_recommend_artifacts(config, rec_root, tmp_path / "top-5", top_k=5)
    result = CliRunner().invoke(app, ["rec", "compare", str(tmp_path / "in-process"), str(tmp_path / "live"),
                                      str(tmp_path / "top-5"), "--permutations", "300", "--out", str(tmp_path / "cmp")])
    assert result.exit_code == 0, result.output
    comparison = json.loads((tmp_path / "cmp" / "comparison.json").read_text())
    same, shorter = comparison["comparisons"]["live"], comparison["comparisons"]["top-5"]
    assert same["recall@50"]["delta"] == 0 and same["recall@50"]["t_test_p"] == 1.0  # identical answers
    assert shorter["recall@50"]["delta"] < 0 and shorter["recall@50"]["wins"] == 0  # 5 items never find more
    assert comparison["table"]["in-process"]["recall@50"] == pytest.approx(in_process["recall@50"])
    assert comparison["latency_ms"]["live"]["calls"] == len(qrels)


def test_bench_rec_writes_one_table_over_seeds(synthetic_dir: Path, tiny_backbone: Path, tmp_path: Path) -> None:
    from benchmarks.rec import run_rec_bench

    config = rec_config(tmp_path, "synthetic", "rec.crm.max_epochs=2", "rec.crm.history_length=8",
                        "rec.crm.embedding_dim=8", f"rec.two_tower.title_encoder={tiny_backbone}",
                        "rec.two_tower.history_length=8", "rec.two_tower.epochs=2")
    results = tmp_path / "rec.json"
    summary = run_rec_bench(config, [str(synthetic_dir), str(tmp_path / "absent")], [0, 1], tmp_path / "work", results)
    assert json.loads(results.read_text()) == summary
    [table] = summary["datasets"].values()
    assert set(table["ctr_test"]) == {"popularity", "logreg", "din"}
    assert set(table["candidates_test"]) == {"two_tower", "most_popular", "recommend_two_tower_din"}
    for metric in table["ctr_test"]["din"].values():
        assert metric["std"] >= 0 and 0 < metric["mean"] < 1
    assert [row["seed"] for row in table["per_seed"]] == [0, 1]
    assert table["recommend_grpc"]["concurrency_8"]["requests"] > 0


@pytest.fixture(scope="module")
def reclora_root(rec_root: Path, tiny_backbone: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """rec_root's artifacts plus reclora/, trained by the command line with a tiny random Llama."""
    from conftest import build_tiny_decoder
    from typer.testing import CliRunner

    from towerline.cli import app

    root = tmp_path_factory.mktemp("reclora-root")
    for name in ("interactions", "two-tower", "crm", "item-index"):
        shutil.copytree(rec_root / name, root / name)
    llm = build_tiny_decoder(root / "llm", ["The", "user", "watched", "Will", "like", "Answer", "Yes", "No"],
                             causal_lm=True)
    outcome = CliRunner().invoke(app, [
        "rec", "train-reclora", "--interactions", str(root / "interactions"), "--crm", str(root / "crm"),
        "--out", str(root / "reclora"), f"rec.reclora.llm={llm}", f"rec.reclora.title_encoder={tiny_backbone}",
        "rec.reclora.experts=2", "rec.reclora.rank=2", "rec.reclora.train_samples=64", "rec.reclora.eval_samples=48",
        "rec.reclora.batch_size=16", "rec.reclora.max_prompt_tokens=48",
        f"tracking.uri=sqlite:///{root / 'mlflow.db'}"])
    assert outcome.exit_code == 0, outcome.output
    return root


def test_rec_train_reclora_writes_a_scorer_gated_by_its_crm(reclora_root: Path) -> None:
    from personalization.reclora import load_scorer

    manifest = read_manifest(reclora_root / "reclora", "reclora")
    crm = read_manifest(reclora_root / "crm", "crm")
    assert manifest.metadata["gated_by_crm"] == manifest.inputs["crm"] == crm.fingerprint
    assert manifest.metadata["train_samples"] == 64 and manifest.metadata["test_samples"] == 48
    assert set(manifest.metadata["test"]) == set(manifest.metadata["din_same_rows"]) == {"auc", "logloss", "gauc"}
    scorer, _, spec = load_scorer(reclora_root / "reclora")
    assert spec["crm"] == crm.fingerprint and scorer.settings.experts == 2
    # One ONNX graph, α an input: checked against torch on test prompts of several users.
    onnx = manifest.metadata["onnx"]
    assert (reclora_root / "reclora" / onnx["file"]).is_file() and onnx["samples"] == 64
    assert onnx["max_abs_probability_diff"] <= onnx["parity_tolerance"]
    assert set(onnx["samples_per_s"]) == {"torch", "onnxruntime"}


def test_recommend_re_ranks_the_din_top_n_with_reclora_over_grpc(reclora_root: Path, tmp_path: Path) -> None:
    from personalization.crm_run import run_train_crm
    from personalization.recommender import Recommender, RecommenderPaths
    from serving.client import RetrievalClient
    from serving.server import start_server
    from towerline.tracking import Tracker

    config = load_config(None, ["serve.port=0"])
    paths = RecommenderPaths.under(reclora_root)
    assert paths.reclora == reclora_root / "reclora"
    with_llm = Recommender(paths, config.index, reclora_top_n=3)
    din_only = Recommender(dataclasses.replace(paths, reclora=None), config.index)
    server, port = start_server(None, config.serve, with_llm)
    try:
        with RetrievalClient(f"127.0.0.1:{port}", timeout_s=30) as client:
            for user_id, top_k in (("u3", 5), ("u7", 2), ("u11", 8)):
                remote = client.recommend(user_id, top_k=top_k)
                local = with_llm.recommend(user_id, [], top_k)
                assert [item.item_id for item in remote.items] == [item.item_id for item in local.items]
                assert remote.strategy == local.strategy == (
                    f"{PERSONALISED}, RecLoRA re-rank of the top 3 (onnxruntime)")
                din = din_only.recommend(user_id, [], 8)
                # The LLM reorders DIN's top 3, in its own score order; below them DIN's order stands.
                head = min(3, top_k)
                assert {item.item_id for item in remote.items[:head]} <= {item.item_id for item in din.items[:3]}
                scores = [item.score for item in remote.items[:head]]
                assert scores == sorted(scores, reverse=True)
                assert [item.item_id for item in remote.items[3:]] == [item.item_id for item in din.items[3:top_k]]
    finally:
        server.stop(None).wait()
    other_crm = tmp_path / "other-crm"
    run_train_crm(rec_config(tmp_path, "synthetic", "rec.crm.max_epochs=1", "rec.crm.seed=5",
                             "rec.crm.history_length=8", "rec.crm.embedding_dim=8"),
                  reclora_root / "interactions", other_crm, Tracker(None))
    with pytest.raises(ArtifactError, match="gated by CRM"):
        Recommender(dataclasses.replace(paths, crm=other_crm), config.index)


def test_bench_reclora_scores_every_row_on_the_same_test_rows(synthetic_dir: Path, tiny_backbone: Path,
                                                              tmp_path: Path) -> None:
    from conftest import build_tiny_decoder

    from benchmarks.reclora import LLM_ROWS, run_reclora_bench

    llm = build_tiny_decoder(tmp_path / "llm", ["The", "user", "watched", "Will", "like", "Answer", "Yes", "No"],
                             causal_lm=True)
    config = rec_config(tmp_path, "synthetic", "rec.crm.max_epochs=1", "rec.crm.history_length=8",
                        "rec.crm.embedding_dim=8", f"rec.reclora.llm={llm}",
                        f"rec.reclora.title_encoder={tiny_backbone}", "rec.reclora.experts=2", "rec.reclora.rank=2",
                        "rec.reclora.train_samples=48", "rec.reclora.eval_samples=40", "rec.reclora.batch_size=16",
                        "rec.reclora.max_prompt_tokens=48")
    summary = run_reclora_bench(config, str(synthetic_dir), [0, 1], list(LLM_ROWS), tmp_path / "work",
                                tmp_path / "reclora.json")
    assert json.loads((tmp_path / "reclora.json").read_text()) == summary
    assert summary["test_rows_scored"] == 40 and [row["seed"] for row in summary["din"]["per_seed"]] == [0, 1]
    gate_crm = summary["din"]["per_seed"][0]["scored_rows"]
    for name in LLM_ROWS:
        row = summary["llm_rows"][name]
        assert row["test_samples"] == 40 and row["train_samples"] == 48
        assert row["din_same_rows"] == pytest.approx(gate_crm)  # every row scored on the rows DIN was
    assert summary["llm_rows"]["shared_lora"]["settings_changed"] == {"experts": 1, "routing": "uniform"}
    onnx = summary["llm_rows"]["reclora"]["onnx"]
    assert onnx["max_abs_probability_diff"] <= onnx["parity_tolerance"]


def test_rec_demo_with_reclora_ends_in_personalised_recommendations_over_grpc(tiny_backbone: Path,
                                                                              tmp_path: Path) -> None:
    from conftest import build_tiny_decoder
    from typer.testing import CliRunner

    from towerline.cli import app

    llm = build_tiny_decoder(tmp_path / "llm", ["The", "user", "watched", "Will", "like", "Answer", "Yes", "No"],
                             causal_lm=True)
    outcome = CliRunner().invoke(app, [
        "rec", "demo", "--reclora", f"run_dir={tmp_path / 'runs'}", *SPARK_TEST_OVERRIDES,
        "rec.data.synthetic_users=80", "rec.data.synthetic_items=40", "rec.crm.max_epochs=1",
        "rec.crm.embedding_dim=8", "rec.two_tower.epochs=1", f"rec.two_tower.title_encoder={tiny_backbone}",
        f"rec.reclora.llm={llm}", f"rec.reclora.title_encoder={tiny_backbone}", "rec.reclora.experts=2",
        "rec.reclora.rank=2", "rec.reclora.train_samples=32", "rec.reclora.eval_samples=32",
        f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}"])
    assert outcome.exit_code == 0, outcome.output
    root = tmp_path / "runs" / "rec-demo"
    reclora = read_manifest(root / "reclora", "reclora")
    # The demo sizes what the command line left unset, and keeps what it set.
    settings = yaml.safe_load((root / "reclora" / "config.yaml").read_text())["rec"]["reclora"]
    assert reclora.metadata["train_samples"] == settings["train_samples"] == 32 and settings["prompt_history"] == 3
    assert "RecLoRA re-rank of the top" in outcome.output and "rec demo done" in outcome.output
    assert read_manifest(root / "rec-eval", "rec-eval-report").metadata["users"] > 0


@pytest.mark.parametrize("line", ["1,2,4.0,97\r8", "1,2\r,4.0,978", "7,a title\rsplit,Comedy"])
def test_a_carriage_return_inside_a_csv_line_is_quarantined_not_a_crash(line: str) -> None:
    # Unquoted, csv.reader raises on it; before, that exception failed the whole Spark job.
    from pipelines.interaction_formats import BAD_CSV, parse_csv_interaction, parse_generic_item
    from towerline.beir import RowRejected

    parser = parse_generic_item if line.startswith("7") else parse_csv_interaction
    with pytest.raises(RowRejected) as rejected:
        parser(line)
    assert rejected.value.reason == BAD_CSV

"""`towerline bench reliability` on tiny artifacts: every scenario runs its real faults (SIGKILLed
publishers, replicas and training; bad versions; overload; fuzzed RPCs and readers; auth) against real
processes, and must lose nothing and answer only documented codes."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from benchmarks import reliability_jobs
from benchmarks.reliability import ReliabilityPlan, run_reliability_bench
from indexing.build import build_index
from serving.onnx_export import run_export
from towerline.config import TowerlineConfig, load_config
from training.run import init_dual_encoder

pytestmark = pytest.mark.reliability

SMALL = ReliabilityPlan(publish_trials=20, replica_trials=2, bursts=1, burst_calls=300, soak_s=4.0,
                        fuzz_examples=25, spark_trials=2, malformed_lines=3000, train_trials=1, train_steps=4)


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory: pytest.TempPathFactory, tiny_dataset: Path,
              tiny_backbone: Path) -> tuple[TowerlineConfig, Path]:
    root = tmp_path_factory.mktemp("reliability")
    config = load_config(None, [f"run_dir={root / 'runs'}", f"data.dir={tiny_dataset}",
                                f"encoder.backbone={tiny_backbone}", "encoder.max_query_length=16",
                                "encoder.max_doc_length=48", "spark.master=local[1]", "spark.shuffle_partitions=2",
                                "spark.keep_session=true", "train.batch_size=4", "train.dev_queries=0",
                                "tracking.enabled=false"])
    init_dual_encoder(config, root / "encoder")
    run_export(config, root / "encoder", root / "onnx")
    build_index(config, root / "encoder", root / "index")
    return config, root


def _run(config: TowerlineConfig, root: Path, tmp_path: Path, *scenarios: str, pairs: Path | None = None) -> dict:
    results = tmp_path / "reliability.json"
    run_reliability_bench(config, root / "index", root / "onnx", pairs, results, SMALL, scenarios)
    summary = json.loads(results.read_text())
    assert set(summary["scenarios"]) == set(scenarios)
    for name, outcome in summary["scenarios"].items():
        assert outcome["data_lost"] == 0, (name, outcome["problems"])
        assert outcome["requests_failed_undocumented"] == 0, (name, outcome)
        assert outcome["trials"] > 0 and outcome["faults_injected"] > 0, (name, outcome)
    return summary["scenarios"]


def test_killed_publishes_and_bad_versions_never_reach_callers(artifacts: tuple[TowerlineConfig, Path],
                                                                 tmp_path: Path) -> None:
    config, root = artifacts
    outcome = _run(config, root, tmp_path, "publish_kill", "bad_versions")
    publish = outcome["publish_kill"]
    assert publish["trials"] == 20 and publish["killed_mid_publish"] >= 5
    assert publish["requests_sent"] > 0 and publish["requests_failed"] == 0
    assert publish["versions_served"] >= 2  # reloads happened under the load
    bad = outcome["bad_versions"]
    assert bad["refused_and_kept_serving"] == {"corrupt": True, "half_copied": True, "incompatible": True,
                                               "missing": True}
    assert bad["requests_failed"] == 0


def test_overload_is_shed_with_documented_codes_and_a_killed_replica_loses_no_call(
        artifacts: tuple[TowerlineConfig, Path], tmp_path: Path) -> None:
    config, root = artifacts
    outcome = _run(config, root, tmp_path, "overload", "replica_kill")
    overload = outcome["overload"]
    assert overload["codes"].get("RESOURCE_EXHAUSTED", 0) > 0 and overload["codes"].get("OK", 0) > 0
    assert overload["recovered_after_each_burst"] and overload["requests_failed"] == 0
    assert overload["memory"]["soak_samples"] >= 4
    replicas = outcome["replica_kill"]
    assert replicas["requests_sent"] > 0 and replicas["requests_failed"] == 0


def test_fuzzed_rpcs_and_readers_and_auth(artifacts: tuple[TowerlineConfig, Path], tmp_path: Path) -> None:
    config, root = artifacts
    outcome = _run(config, root, tmp_path, "rpc_fuzz", "auth", "reader_fuzz")
    fuzz = outcome["rpc_fuzz"]
    assert fuzz["server_alive_after"] and fuzz["health_after"] == "SERVING"
    assert fuzz["codes"].get("INVALID_ARGUMENT", 0) > 0 and fuzz["codes"].get("OK", 0) > 0
    assert outcome["auth"]["unauthorised_calls_let_through"] == 0
    assert outcome["auth"]["authorised_calls_refused"] == 0
    readers = outcome["reader_fuzz"]
    assert readers["tracebacks"] == 0 and readers["clear_errors"] > 0


def test_malformed_click_lines_are_counted_exactly(artifacts: tuple[TowerlineConfig, Path], tmp_path: Path) -> None:
    config, root = artifacts
    outcome = _run(config, root, tmp_path, "spark_malformed")["spark_malformed"]
    assert outcome["valid"] + outcome["quarantined"] == outcome["lines"] > 2000
    assert outcome["valid"] > 0


def test_training_killed_and_resumed_ends_with_the_uninterrupted_weights(
        artifacts: tuple[TowerlineConfig, Path], tiny_dataset: Path, tmp_path: Path) -> None:
    from test_training import write_pairs_artifact

    config, root = artifacts
    pairs = write_pairs_artifact(tiny_dataset, tmp_path / "pairs")
    outcome = _run(config, root, tmp_path, "train_resume", pairs=pairs)["train_resume"]
    assert outcome["max_abs_weight_difference"] <= 1e-6


@pytest.mark.slow
def test_a_spark_job_killed_mid_write_leaves_a_complete_version_or_nothing(tmp_path: Path) -> None:
    outcome = reliability_jobs.spark_kill(tmp_path, 3, random.Random(7))
    assert outcome.data_lost == 0, outcome.problems
    assert outcome.faults_injected == 3

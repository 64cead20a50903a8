"""`towerline bench reliability`: faults injected into real processes, and what survived them.

Scenarios (benchmarks/reliability_serving.py, reliability_fuzz.py, reliability_jobs.py): index
publishes SIGKILLed under load; corrupt, half-copied, incompatible and missing versions; overload
bursts and a memory soak; a replica SIGKILLed behind the client's round-robin; fuzzing of every RPC
field over a real channel and of the input readers; auth on every RPC; a Spark job SIGKILLed
mid-publish; fuzzed click-log lines through the Spark reader; training SIGKILLed and resumed.

Per scenario: trials run, faults injected, requests sent, requests failed (where none should),
requests failed outside the documented status codes, and data lost; the targets are zero and zero.
"""

from __future__ import annotations

import random
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks import reliability_fuzz, reliability_jobs, reliability_serving
from benchmarks.fault_tally import DOCUMENTED_CODES, Scenario
from towerline.beir import load_dataset
from towerline.config import TowerlineConfig
from towerline.errors import ConfigError
from towerline.progress import console, status
from towerline.results import result_header, write_results

SCENARIOS = ("publish_kill", "bad_versions", "overload", "replica_kill", "rpc_fuzz", "auth", "reader_fuzz",
             "spark_kill", "spark_malformed", "train_resume")


@dataclass(frozen=True)
class ReliabilityPlan:
    """How hard each scenario is pushed."""

    publish_trials: int = 20
    replica_trials: int = 4
    bursts: int = 3
    burst_calls: int = 1000
    soak_s: float = 180.0
    fuzz_examples: int = 500
    spark_trials: int = 5
    malformed_lines: int = 20_000
    train_trials: int = 3
    train_steps: int = 6
    seed: int = 0


def run_reliability_bench(config: TowerlineConfig, index: Path, onnx: Path, pairs: Path | None, results: Path,
                          plan: ReliabilityPlan, only: tuple[str, ...] = SCENARIOS) -> dict[str, Any]:
    unknown = sorted(set(only) - set(SCENARIOS))
    if unknown:
        raise ConfigError(f"--scenario: unknown {', '.join(unknown)}; choose from {', '.join(SCENARIOS)}")
    rng = random.Random(plan.seed)
    texts = _query_texts(config)
    scenarios: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="towerline-reliability-") as scratch:
        work_dir = Path(scratch)
        runs: dict[str, Callable[[], Scenario]] = {
            "publish_kill": lambda: reliability_serving.publish_kill(config, index, onnx, work_dir, texts,
                                                                     plan.publish_trials, rng),
            "bad_versions": lambda: reliability_serving.bad_versions(config, index, onnx, work_dir, texts),
            "overload": lambda: reliability_serving.overload(config, index, onnx, texts, plan.bursts,
                                                             plan.burst_calls, plan.soak_s),
            "replica_kill": lambda: reliability_serving.replica_kill(config, index, onnx, texts, plan.replica_trials,
                                                                     rng),
            "rpc_fuzz": lambda: reliability_fuzz.rpc_fuzz(config, index, onnx, plan.fuzz_examples),
            "auth": lambda: reliability_fuzz.auth(config, index, onnx, work_dir),
            "reader_fuzz": lambda: reliability_fuzz.reader_fuzz(plan.fuzz_examples),
            "spark_kill": lambda: reliability_jobs.spark_kill(work_dir, plan.spark_trials, rng),
            "spark_malformed": lambda: reliability_jobs.spark_malformed(config, work_dir, plan.malformed_lines, rng),
            "train_resume": lambda: _train_resume(config, pairs, work_dir, plan, rng),
        }
        for name in SCENARIOS:
            if name not in only:
                continue
            with status(f"reliability: {name}"):
                started = time.perf_counter()
                outcome = runs[name]().as_dict()
            outcome["seconds"] = round(time.perf_counter() - started, 1)
            scenarios[name] = outcome
            console.print(f"{name}: {outcome['trials']} trials, {outcome['faults_injected']} faults, "
                          f"{outcome['requests_sent']} requests, {outcome['requests_failed']} failed, "
                          f"{outcome['requests_failed_undocumented']} undocumented, {outcome['data_lost']} data lost")
    totals = {key: sum(outcome[key] for outcome in scenarios.values())
              for key in ("trials", "faults_injected", "requests_sent", "requests_failed",
                          "requests_failed_undocumented", "data_lost")}
    summary = {
        **result_header("reliability"),
        "inputs": {"index": index.name, "onnx": onnx.name, "pairs": pairs.name if pairs else None,
                   "backbone": config.encoder.backbone},
        "plan": plan.__dict__,
        "documented_codes": sorted(DOCUMENTED_CODES),
        "targets": {"requests_failed_undocumented": 0, "data_lost": 0},
        "totals": totals,
        "targets_met": totals["requests_failed_undocumented"] == 0 and totals["data_lost"] == 0,
        "scenarios": scenarios,
    }
    write_results(results, summary)
    console.print(f"[bold]{results}[/]: {totals['faults_injected']} faults over {totals['trials']} trials, "
                  f"{totals['requests_failed_undocumented']} undocumented failures, {totals['data_lost']} data lost")
    return summary


def _train_resume(config: TowerlineConfig, pairs: Path | None, work_dir: Path, plan: ReliabilityPlan,
                  rng: random.Random) -> Scenario:
    if pairs is None:
        raise ConfigError("train_resume needs a training-pairs artifact (--pairs)")
    return reliability_jobs.train_resume(config, pairs, work_dir, plan.train_steps, plan.train_trials, rng)


def _query_texts(config: TowerlineConfig) -> list[str]:
    dataset = load_dataset(config.data, [config.eval.split])
    return [dataset.queries[qid] for qid in dataset.split(config.eval.split)]

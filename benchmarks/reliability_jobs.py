"""Batch-side fault scenarios of `towerline bench reliability`.

- spark_kill: a Spark job that publishes artifact versions through Hadoop's file system
  (pipelines/target.py) is SIGKILLed, driver and JVM, at random moments: the target holds the last
  complete version or nothing, never a partial one.
- spark_malformed: a click log of fuzzed lines through the Spark reader: every line is either a valid
  row or quarantined with a reason — counted exactly, none lost.
- train_resume: `towerline train` SIGKILLed after its first checkpoint and resumed ends with the same
  weights as an uninterrupted run.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from benchmarks.fault_tally import Scenario
from towerline.artifacts import SUCCESS_MARKER, read_manifest
from towerline.config import TowerlineConfig, dump_config
from towerline.errors import ArtifactError

SPARK_KIND = "reliability-table"
# A driver that publishes ever larger versions of one artifact until it is killed.
_SPARK_PUBLISHER = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    from pipelines.parquet_output import write_parquet
    from pipelines.spark import spark_session
    from pipelines.target import SparkArtifactWriter
    from towerline.config import load_config

    spark = spark_session(load_config(None, ["spark.master=local[1]", "spark.shuffle_partitions=2"]).spark,
                          "reliability-publisher")
    print("ready", flush=True)
    rows = 0
    while True:
        rows += 1000
        frame = spark.range(rows).selectExpr("id", "cast(id * 2 as string) as doubled")
        with SparkArtifactWriter(spark, sys.argv[1], sys.argv[2], producer="bench reliability") as staged:
            write_parquet(frame, staged.uri("table.parquet"), ("id", "doubled"), ["id"])
            staged.write_text("stats.json", json.dumps({"rows": rows}))
            staged.metadata["rows"] = rows
""")


def spark_kill(work_dir: Path, trials: int, rng: random.Random) -> Scenario:
    scenario = Scenario("spark_kill")
    target = work_dir / "spark-target" / "artifact"
    target.parent.mkdir(parents=True, exist_ok=True)
    complete = 0
    for trial in range(trials):
        scenario.trials += 1
        job = subprocess.Popen([sys.executable, "-c", _SPARK_PUBLISHER, str(target), SPARK_KIND],
                               stdout=subprocess.PIPE, text=True, start_new_session=True)
        assert job.stdout is not None and job.stdout.readline().strip() == "ready"
        time.sleep(rng.uniform(0.5, 6.0))
        os.killpg(job.pid, signal.SIGKILL)  # the driver and its JVM, as a lost container would go
        job.wait()
        scenario.faults_injected += 1
        visible = sorted(path.name for path in target.parent.iterdir() if not path.name.startswith("."))
        if visible == []:
            continue  # killed before its first publish: nothing at the target, as it must be
        if visible != [target.name]:
            scenario.lost(f"trial {trial}: unexpected entries at the target: {visible}")
            continue
        try:
            manifest = read_manifest(target, SPARK_KIND, verify=True)
        except ArtifactError as error:
            scenario.lost(f"trial {trial}: a partial artifact at the target: {error}")
            continue
        if not (target / SUCCESS_MARKER).is_file():
            scenario.lost(f"trial {trial}: a published artifact without its {SUCCESS_MARKER}")
        elif json.loads((target / "stats.json").read_text())["rows"] != manifest.metadata["rows"]:
            scenario.lost(f"trial {trial}: files of two versions mixed at the target")
        else:
            complete += 1
    scenario.details["trials_with_a_complete_version"] = complete
    return scenario


def spark_malformed(config: TowerlineConfig, work_dir: Path, lines: int, rng: random.Random) -> Scenario:
    """Fuzzed click-log lines (valid rows, wrong types, broken JSON, binary noise) through the job's
    own reader: lines in == valid rows + quarantined rows, and every quarantined row has a reason."""
    from pyspark.sql import functions as F

    from pipelines.click_logs import read_click_logs
    from pipelines.spark import spark_session

    scenario = Scenario("spark_malformed")
    doc_ids = [f"d{number}" for number in range(50)]
    path = work_dir / "fuzzed-logs" / "clicks.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    written = [_fuzzed_log_line(rng, doc_ids, number) for number in range(lines)]
    path.write_text("\n".join(written) + "\n", errors="surrogateescape")
    spark = spark_session(config.spark, "towerline-reliability")
    docs = spark.createDataFrame([(doc_id,) for doc_id in doc_ids], "doc_id string")
    rows = read_click_logs(spark, path, docs, config.clicks)
    counts = rows.agg(F.count("*").alias("rows"), F.count("reason").alias("quarantined")).first()
    assert counts is not None
    non_blank = sum(1 for line in written if line.strip(" "))  # the reader skips lines of spaces only
    scenario.trials = 1
    scenario.faults_injected = counts["quarantined"]
    scenario.details.update(lines=non_blank, valid=counts["rows"] - counts["quarantined"],
                            quarantined=counts["quarantined"])
    if counts["rows"] != non_blank:
        scenario.lost(f"{non_blank} non-blank lines in, {counts['rows']} rows out")
    return scenario


def _fuzzed_log_line(rng: random.Random, doc_ids: list[str], number: int) -> str:
    row = {"request_id": f"r{number // 5}", "ts": 1_767_225_600_000 + number, "query": f"query {number % 40}",
           "doc_id": rng.choice(doc_ids), "position": number % 5 + 1, "clicked": rng.random() < 0.3,
           "dwell_ms": rng.randrange(0, 90_000)}
    damage = rng.randrange(8)
    if damage == 0:
        return json.dumps(row)[: rng.randrange(1, 40)]  # cut short
    if damage == 1:
        row[rng.choice(list(row))] = rng.choice([None, "", [], {}, -1, 1e300, "x" * 3000, True])
    if damage == 2:
        del row[rng.choice(list(row))]
    if damage == 3:
        # Noise, control characters included, but no line breaks (\n, \r: the line separators).
        noise = "".join(chr(rng.randrange(1, 0x2FF)) for _ in range(rng.randrange(1, 60)))
        return noise.replace("\n", " ").replace("\r", " ")
    return json.dumps(row)


def train_resume(config: TowerlineConfig, pairs: Path, work_dir: Path, steps: int, trials: int,
                 rng: random.Random) -> Scenario:
    """`towerline train` straight through once; then per trial SIGKILLed at a random moment after one of
    its checkpoints began (mid-step or mid-checkpoint) and resumed: the weights must equal the straight
    run's."""
    scenario = Scenario("train_resume")
    config_file = work_dir / "train.yaml"
    settings = config.model_copy(deep=True)
    settings.train = settings.train.model_copy(update={"max_steps": steps, "save_steps": 1, "dev_queries": 0})
    settings.tracking = settings.tracking.model_copy(update={"enabled": False})
    dump_config(settings, config_file)
    straight = work_dir / "train-straight"
    started = time.perf_counter()
    _run_train(pairs, straight, config_file)
    straight_s = time.perf_counter() - started
    worst = 0.0
    for trial in range(trials):
        scenario.trials += 1
        resumed = work_dir / f"train-resumed-{trial}"
        job = _start_train(pairs, resumed, config_file)
        # Killed once a random checkpoint k < steps has begun, a random moment later (up to a few
        # ms): mid-step or mid-checkpoint-write.
        started = resumed.with_name(f"{resumed.name}.checkpoints") / f"checkpoint-{rng.randrange(1, steps)}"
        while job.poll() is None and not started.is_dir():
            time.sleep(0.01)
        time.sleep(rng.uniform(0.0, 0.2))
        if job.poll() is None:
            job.kill()
            scenario.faults_injected += 1
        job.wait()
        try:
            _run_train(pairs, resumed, config_file, resume=True)
        except subprocess.CalledProcessError as error:
            scenario.lost(f"trial {trial}: the resumed run failed: {error.stderr.decode()[-500:]}")
            continue
        try:
            difference = _max_weight_difference(straight, resumed)
        except OSError as error:
            scenario.lost(f"trial {trial}: the resumed artifact is missing weights: {error}")
            continue
        worst = max(worst, difference)
        if difference > 1e-6:
            scenario.lost(f"trial {trial}: resumed weights differ from the uninterrupted run's by {difference:g}")
    scenario.details.update(steps=steps, straight_seconds=round(straight_s, 1), max_abs_weight_difference=worst)
    return scenario


def _max_weight_difference(expected_dir: Path, actual_dir: Path) -> float:
    import numpy as np
    from safetensors.numpy import load_file

    differences = []
    for file in sorted(expected_dir.rglob("*.safetensors")):
        expected, actual = load_file(file), load_file(actual_dir / file.relative_to(expected_dir))
        differences.extend(float(np.max(np.abs(expected[name] - actual[name]))) for name in expected)
    return max(differences) if differences else float("inf")  # nothing compared is a failure, not a match


def _train_command(pairs: Path, output: Path, config_file: Path, resume: bool = False) -> list[str]:
    return [sys.executable, "-m", "towerline", "train", "--pairs", str(pairs), "--out", str(output),
            "-c", str(config_file), *(["--resume"] if resume else [])]


def _run_train(pairs: Path, output: Path, config_file: Path, resume: bool = False) -> None:
    subprocess.run(_train_command(pairs, output, config_file, resume), capture_output=True, check=True)


def _start_train(pairs: Path, output: Path, config_file: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(_train_command(pairs, output, config_file), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)

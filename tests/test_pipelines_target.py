"""Spark jobs' artifacts published through Hadoop's file systems (pipelines/target.py): the executors
write to a hidden staging directory, the manifest and the _SUCCESS marker come last, and a failed or
killed job leaves nothing at the target."""

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

import pandas as pd
import pytest
from pyspark.sql import SparkSession

from pipelines.parquet_output import write_parquet
from pipelines.target import SparkArtifactWriter
from towerline.artifacts import SUCCESS_MARKER, checksum_tree, local_path, read_manifest, target_uri
from towerline.errors import ArtifactError

ROOT = Path(__file__).resolve().parent.parent


def _publish(spark: SparkSession, target: str | Path, rows: int, fail: bool = False) -> None:
    frame = spark.range(rows).selectExpr("id", "cast(id * 2 as string) as doubled")
    with SparkArtifactWriter(spark, target, "test-table", producer="test") as staged:
        write_parquet(frame, staged.uri("table.parquet"), ("id", "doubled"), ["id"])
        staged.write_text("stats.json", json.dumps({"rows": rows}))
        staged.metadata["rows"] = rows
        if fail:
            raise RuntimeError("the job failed mid-write")


def _leftovers(directory: Path) -> list[str]:
    return sorted(path.name for path in directory.iterdir() if path.name.startswith("."))


def test_target_uris() -> None:
    assert target_uri("hdfs://namenode:8020/data/pairs/") == "hdfs://namenode:8020/data/pairs"
    assert target_uri("s3a://bucket/pairs") == "s3a://bucket/pairs"
    assert target_uri("/tmp/a b/pairs") == "file:///tmp/a b/pairs"
    assert local_path("file:///tmp/a b/pairs") == Path("/tmp/a b/pairs")
    assert local_path("relative/pairs") == Path("relative/pairs").resolve()
    assert local_path("hdfs://namenode/pairs") is None


@pytest.mark.parametrize("as_uri", [False, True], ids=["path", "file-uri"])
def test_published_artifact_has_the_manifest_the_marker_and_no_hadoop_side_files(
        spark: SparkSession, tmp_path: Path, as_uri: bool) -> None:
    dest = tmp_path / "with space" / "artifact"
    _publish(spark, f"file://{dest}" if as_uri else dest, 5)

    manifest = read_manifest(dest, "test-table", verify=True)
    assert (dest / SUCCESS_MARKER).is_file()
    # The JVM-side sha256 equals Python's own: a copy of the artifact verifies anywhere.
    assert manifest.files == {name: digest for name, digest in checksum_tree(dest).items() if name != SUCCESS_MARKER}
    assert not [name for name in manifest.files if name.endswith(".crc") or name.endswith(SUCCESS_MARKER)]
    assert manifest.metadata == {"rows": 5}
    assert pd.read_parquet(dest / "table.parquet")["id"].tolist() == [0, 1, 2, 3, 4]
    assert _leftovers(dest.parent) == []


def test_a_new_version_replaces_the_old_and_a_failed_job_leaves_it_untouched(
        spark: SparkSession, tmp_path: Path) -> None:
    dest = tmp_path / "artifact"
    _publish(spark, dest, 3)
    _publish(spark, dest, 4)
    assert json.loads((dest / "stats.json").read_text()) == {"rows": 4}

    with pytest.raises(RuntimeError, match="mid-write"):
        _publish(spark, dest, 9, fail=True)
    assert read_manifest(dest, "test-table", verify=True).metadata == {"rows": 4}
    assert _leftovers(tmp_path) == []  # neither the failed staging nor the retired version stays

    fresh = tmp_path / "never-published"
    with pytest.raises(RuntimeError, match="mid-write"):
        _publish(spark, fresh, 9, fail=True)
    assert not fresh.exists()
    assert _leftovers(tmp_path) == []


def test_a_file_added_after_publishing_fails_verification(spark: SparkSession, tmp_path: Path) -> None:
    dest = tmp_path / "artifact"
    _publish(spark, dest, 2)
    (dest / "table.parquet" / "extra.parquet").write_bytes(b"x")
    with pytest.raises(ArtifactError, match="not in the manifest"):
        read_manifest(dest, "test-table", verify=True)


_KILLED_JOB = textwrap.dedent("""
    import sys
    from pathlib import Path
    sys.path.insert(0, {tests!r})
    from pipelines.spark import spark_session
    from test_pipelines_target import _publish
    from towerline.config import load_config

    spark = spark_session(load_config(None, ["spark.master=local[1]", "spark.shuffle_partitions=2"]).spark, "killed")
    print("ready", flush=True)
    rows = 1
    while True:  # publish new versions until killed
        rows += 1
        _publish(spark, Path({dest!r}), rows * 1000)
""")


@pytest.mark.slow
def test_a_job_killed_mid_write_leaves_the_last_complete_version_or_nothing(tmp_path: Path) -> None:
    dest = tmp_path / "artifact"
    script = tmp_path / "job.py"
    script.write_text(_KILLED_JOB.format(tests=str(ROOT / "tests"), dest=str(dest)))
    draws = random.Random(7)
    for _ in range(3):
        job = subprocess.Popen([sys.executable, str(script)], cwd=ROOT, stdout=subprocess.PIPE, text=True,
                               start_new_session=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
        assert job.stdout is not None and job.stdout.readline().strip() == "ready"
        time.sleep(draws.uniform(0.5, 6.0))
        os.killpg(job.pid, signal.SIGKILL)  # the driver and its JVM, as a lost container would be
        job.wait()
        if dest.exists():  # a version published before the kill, complete and verified
            manifest = read_manifest(dest, "test-table", verify=True)
            assert (dest / SUCCESS_MARKER).is_file()
            assert len(pd.read_parquet(dest / "table.parquet")) == manifest.metadata["rows"]
        visible = sorted(name for name in os.listdir(tmp_path) if not name.startswith("."))
        assert visible in (["artifact", "job.py"], ["job.py"])

"""Spark jobs' artifacts published through Hadoop's file systems (pipelines/target.py): the executors
write to a hidden staging directory, the manifest and the _SUCCESS marker come last, and a failed job
leaves nothing at the target (a SIGKILLed one: tests/test_reliability.py)."""

from __future__ import annotations

import json
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

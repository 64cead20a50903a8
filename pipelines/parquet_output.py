"""Spark output as one sorted Parquet file per table: stable run to run, readable without Spark."""

from __future__ import annotations

from pyspark.sql import DataFrame


def write_parquet(rows: DataFrame, uri: str, columns: tuple[str, ...], order: list[str]) -> None:
    """One sorted file, so the output is stable run to run and easy to read without Spark. `uri` is
    inside a `pipelines.target.SparkArtifactWriter`, which drops Hadoop's side files when it seals."""
    rows.repartition(1).sortWithinPartitions(*order).select(*columns).write.parquet(uri)

"""Spark output as one sorted Parquet file per table: stable run to run, readable without Spark."""

from __future__ import annotations

from pathlib import Path

from pyspark.sql import DataFrame


def write_parquet(rows: DataFrame, path: Path, columns: tuple[str, ...], order: list[str]) -> None:
    """One sorted file, so the output is stable run to run and easy to read without Spark."""
    rows.repartition(1).sortWithinPartitions(*order).select(*columns).write.parquet(str(path))
    drop_hadoop_side_files(path)


def drop_hadoop_side_files(directory: Path) -> None:
    # Hadoop's .crc files and _SUCCESS marker: the manifest already checksums every file.
    for path in directory.iterdir():
        if path.name == "_SUCCESS" or (path.name.startswith(".") and path.name.endswith(".crc")):
            path.unlink()

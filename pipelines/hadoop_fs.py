"""Hadoop's FileSystem API from the driver, through the JVM Spark already runs: the one way Spark
jobs list and move files on a local disk, HDFS or an object store alike."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pyspark.sql import SparkSession

from towerline.artifacts import target_uri


class HadoopFs:
    """The file system of one URI. For local paths it is the raw local file system, which writes no
    .crc side files for the driver's own small writes and renames; Spark's writers still go through
    the checksummed one."""

    def __init__(self, spark: SparkSession, uri: str | Path) -> None:
        self.jvm = spark.sparkContext._jvm
        self.conf = spark.sparkContext._jsc.hadoopConfiguration()
        path = self.path(target_uri(uri))
        self.fs = path.getFileSystem(self.conf)
        if self.fs.getScheme() == "file":
            self.fs = self.jvm.org.apache.hadoop.fs.FileSystem.getLocal(self.conf).getRawFileSystem()
        self.root = self.fs.makeQualified(path)

    def path(self, uri: str, child: str | None = None) -> Any:
        parent = self.jvm.org.apache.hadoop.fs.Path(uri)
        return parent if child is None else self.jvm.org.apache.hadoop.fs.Path(parent, child)

    def files_under(self, directory: Any) -> list[Any]:
        """Every file below `directory`, recursively."""
        listing = self.fs.listFiles(directory, True)
        found = []
        while listing.hasNext():
            found.append(listing.next().getPath())
        return found

    def matching_files(self) -> list[Any]:
        """The files the URI names: a file, a directory's files (recursively) or a glob's matches."""
        statuses = self.fs.globStatus(self.root) or []
        files = []
        for status in statuses:
            files.extend(self.files_under(status.getPath()) if status.isDirectory() else [status.getPath()])
        return files

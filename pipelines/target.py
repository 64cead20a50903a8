"""Spark jobs' artifacts written through Hadoop's FileSystem to any target URI: a local path,
`file://`, `hdfs://` or an object store (`s3a://`, `gs://`, `abfs://`, given their connector jars).

The executors write the tables straight to a hidden staging directory beside the target; the
driver then drops Hadoop's side files, checksums every file inside the JVM (sha256 streamed
there, no data through Python), writes the manifest, renames the staging directory onto the
target and writes the `_SUCCESS` marker last. On HDFS and local disks the rename is atomic; on
an object store a rename is a copy, so readers there wait for `_SUCCESS`. A failed or killed job
leaves nothing at the target: at most a hidden staging directory, which a failure removes.

The manifest lists the same sha256 digests as `towerline.artifacts.ArtifactWriter`, so a copy of
the artifact on local disk reads and verifies with `read_manifest` like any other.
"""

from __future__ import annotations

import uuid
from pathlib import Path
from types import TracebackType
from typing import Any

from pydantic import BaseModel
from pyspark.sql import SparkSession

from pipelines.hadoop_fs import HadoopFs
from towerline.artifacts import CONFIG_NAME, MANIFEST_NAME, SUCCESS_MARKER, Manifest, new_manifest, target_uri
from towerline.config import config_yaml

_BUFFER = 1 << 20


class SparkArtifactWriter:
    """`with SparkArtifactWriter(spark, target, kind, producer=...) as out:` write tables to
    `out.uri(name)` with Spark and small files with `out.write_text`; on a clean exit the artifact
    is sealed and published at `target`, on an exception the staging directory is deleted."""

    def __init__(self, spark: SparkSession, target: str | Path, kind: str, *, producer: str,
                 inputs: dict[str, Manifest] | None = None, config: BaseModel | None = None) -> None:
        self.target = target_uri(target)
        self.kind = kind
        self.producer = producer
        self.inputs = {name: manifest.fingerprint for name, manifest in (inputs or {}).items()}
        self.config = config
        self.metadata: dict[str, Any] = {}
        self.manifest: Manifest | None = None
        self._hadoop = HadoopFs(spark, self.target)
        self._jvm = self._hadoop.jvm
        self._fs = self._hadoop.fs
        self._dest = self._hadoop.root
        self._staging = self._sibling("staging")

    def uri(self, name: str) -> str:
        """Where a table or file named `name` of this artifact is written while the job runs."""
        return f"{self._staging.toString()}/{name}"

    def write_text(self, name: str, text: str) -> None:
        stream = self._fs.create(self._hadoop.path(self.uri(name)), True)
        try:
            stream.write(bytearray(text.encode()))
        finally:
            stream.close()

    def __enter__(self) -> SparkArtifactWriter:
        if not self._fs.mkdirs(self._staging):
            raise OSError(f"cannot create the staging directory {self._staging.toString()}")
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if exc_type is None:
            try:
                self.manifest = self._seal()
                self._publish()
                return
            except BaseException:
                self._fs.delete(self._staging, True)
                raise
        self._fs.delete(self._staging, True)

    def _seal(self) -> Manifest:
        self._drop_side_files()
        if self.config is not None:
            self.write_text(CONFIG_NAME, config_yaml(self.config))
        manifest = new_manifest(self.kind, self.producer, self.inputs, self._checksums(), self.metadata)
        self.write_text(MANIFEST_NAME, manifest.model_dump_json(indent=2))
        return manifest

    def _publish(self) -> None:
        retired = None
        if self._fs.exists(self._dest):
            retired = self._sibling("retired")
            self._rename(self._dest, retired)
        try:
            self._rename(self._staging, self._dest)
        except BaseException:
            if retired is not None:  # the previous version goes back under its name
                self._fs.rename(retired, self._dest)
            raise
        self._fs.create(self._hadoop.path(self._dest.toString(), SUCCESS_MARKER), True).close()
        if retired is not None:
            self._fs.delete(retired, True)

    def _rename(self, source: Any, dest: Any) -> None:
        if not self._fs.rename(source, dest):
            raise OSError(f"cannot rename {source.toString()} to {dest.toString()}")

    def _sibling(self, role: str) -> Any:
        return self._hadoop.path(self._dest.getParent().toString(),
                                 f".{self._dest.getName()}.{role}-{uuid.uuid4().hex[:8]}")

    def _files(self) -> list[Any]:
        return self._hadoop.files_under(self._staging)

    def _drop_side_files(self) -> None:
        # Each table's own _SUCCESS and the local file system's .crc files: the manifest checksums
        # every file, and the artifact's one _SUCCESS is written at publish.
        for path in self._files():
            name = path.getName()
            if name == SUCCESS_MARKER or (name.startswith(".") and name.endswith(".crc")):
                self._fs.delete(path, False)

    def _checksums(self) -> dict[str, str]:
        root = self._staging.toUri().getPath().rstrip("/") + "/"
        digests = {}
        for path in self._files():
            digests[path.toUri().getPath().removeprefix(root)] = self._sha256(path)
        return dict(sorted(digests.items()))

    def _sha256(self, path: Any) -> str:
        digest = self._jvm.java.security.MessageDigest.getInstance("SHA-256")
        stream = self._jvm.java.security.DigestInputStream(self._fs.open(path), digest)
        try:
            self._jvm.org.apache.hadoop.io.IOUtils.copyBytes(
                stream, self._jvm.java.io.OutputStream.nullOutputStream(), _BUFFER, False)
        finally:
            stream.close()
        return bytes(digest.digest()).hex()


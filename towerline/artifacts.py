"""Artifact directories and their manifests: the only way stages hand work to each other.

An artifact is a directory with a `manifest.json` (kind, schema version, producer, input
fingerprints, per-file checksums, created time, free-form metadata) and the resolved config.
`ArtifactWriter` builds it in a hidden staging directory next to the destination and moves it
into place only when the producer finished, so a failed stage never leaves a half-written
artifact under the destination name.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import urlparse

from pydantic import BaseModel, Field, ValidationError

from towerline import __version__
from towerline.config import dump_config
from towerline.errors import ArtifactError

MANIFEST_NAME = "manifest.json"
# Written after the manifest by jobs that publish through Hadoop file systems (pipelines/target.py):
# on an object store, where a rename is a copy, readers wait for it.
SUCCESS_MARKER = "_SUCCESS"
CONFIG_NAME = "config.yaml"
SCHEMA_VERSION = 1


class Manifest(BaseModel):
    kind: str
    schema_version: int = SCHEMA_VERSION
    producer: str
    created_at: str
    inputs: dict[str, str] = Field(default_factory=dict)
    files: dict[str, str] = Field(default_factory=dict)
    fingerprint: str = ""
    metadata: dict[str, Any] = Field(default_factory=dict)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def checksum_tree(root: Path, under: str = "") -> dict[str, str]:
    """sha256 of every file below `root/under`, keyed by path relative to `root`."""
    base = root / under if under else root
    # Only the artifact's own manifest is left out: a nested artifact's manifest is one of its files.
    return {
        path.relative_to(root).as_posix(): sha256_file(path)
        for path in sorted(base.rglob("*"))
        if path.is_file() and path != root / MANIFEST_NAME
    }


def fingerprint_of(checksums: dict[str, str]) -> str:
    lines = "\n".join(f"{name}:{digest}" for name, digest in sorted(checksums.items()))
    return hashlib.sha256(lines.encode()).hexdigest()


def target_uri(target: str | Path) -> str:
    """A URI for `target`: kept when it has a scheme, else the absolute local path as `file://`."""
    text = str(target)
    if len(urlparse(text).scheme) > 1:  # one letter is a Windows drive, not a scheme
        return text.rstrip("/")
    # Not percent-encoded: Hadoop's Path takes a local path with spaces as it is.
    return f"file://{Path(text).expanduser().resolve()}"


def local_path(target: str | Path) -> Path | None:
    """The local directory a target names, or None for a remote one (hdfs://, s3a:// ...)."""
    parsed = urlparse(target_uri(target))
    return Path(parsed.path) if parsed.scheme == "file" else None


class ArtifactWriter:
    """Context manager: `with ArtifactWriter(dest, "faiss-index", ...) as staged: write into staged.path`."""

    def __init__(
        self,
        dest: Path,
        kind: str,
        *,
        producer: str,
        inputs: dict[str, Manifest] | None = None,
        config: BaseModel | None = None,
    ) -> None:
        self.dest = Path(dest)
        self.kind = kind
        self.producer = producer
        self.inputs = {name: manifest.fingerprint for name, manifest in (inputs or {}).items()}
        self.config = config
        self.metadata: dict[str, Any] = {}
        self.path = self.dest.parent / f".{self.dest.name}.staging-{uuid.uuid4().hex[:8]}"
        self.manifest: Manifest | None = None

    def __enter__(self) -> ArtifactWriter:
        self.dest.parent.mkdir(parents=True, exist_ok=True)
        self.path.mkdir()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is not None:
            shutil.rmtree(self.path, ignore_errors=True)
            return
        try:
            self.manifest = self._finalise()
            _swap_into_place(self.path, self.dest)
        except BaseException:
            shutil.rmtree(self.path, ignore_errors=True)
            raise

    def _finalise(self) -> Manifest:
        if self.config is not None:
            dump_config(self.config, self.path / CONFIG_NAME)
        manifest = new_manifest(self.kind, self.producer, self.inputs, checksum_tree(self.path), self.metadata)
        (self.path / MANIFEST_NAME).write_text(manifest.model_dump_json(indent=2))
        return manifest


def new_manifest(kind: str, producer: str, inputs: dict[str, str], files: dict[str, str],
                 metadata: dict[str, Any]) -> Manifest:
    """The manifest sealing `files` (name → sha256), stamped with this towerline's version and now."""
    return Manifest(
        kind=kind,
        producer=f"towerline {__version__} {producer}",
        created_at=datetime.now(UTC).isoformat(timespec="seconds"),
        inputs=inputs,
        files=files,
        fingerprint=fingerprint_of(files),
        metadata=metadata,
    )


def reseal_artifact(source: Path, dest: Path, kind: str, *, producer: str, new_files: dict[str, str],
                    metadata: dict[str, Any]) -> Manifest:
    """A new seal of an artifact: its files (hard-linked where the filesystem allows: artifact files are
    never modified in place) plus `new_files` (name → text), its metadata updated, a fresh manifest.
    `dest` may be `source`: the new seal replaces the old one only once complete."""
    previous = read_manifest(source, kind, verify=True)
    with ArtifactWriter(dest, kind, producer=producer) as staged:
        for name in previous.files:
            target = staged.path / name
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(source / name, target)
            except OSError:
                shutil.copy2(source / name, target)
        for name, text in new_files.items():
            (staged.path / name).write_text(text)
        staged.inputs = dict(previous.inputs)
        staged.metadata = {**previous.metadata, **metadata}
    assert staged.manifest is not None
    return staged.manifest


def _swap_into_place(staging: Path, dest: Path) -> None:
    if not dest.exists():
        os.replace(staging, dest)
        return
    retired = dest.parent / f".{dest.name}.retired-{uuid.uuid4().hex[:8]}"
    os.replace(dest, retired)
    os.replace(staging, dest)
    shutil.rmtree(retired, ignore_errors=True)


def read_manifest(path: Path, kind: str | tuple[str, ...], *, verify: bool = False) -> Manifest:
    """Read and check an artifact's manifest; refuse a missing, wrong-kind or corrupt artifact."""
    path = Path(path)
    kinds = (kind,) if isinstance(kind, str) else kind
    wanted = " or ".join(repr(k) for k in kinds)
    manifest_path = path / MANIFEST_NAME
    if not path.is_dir():
        raise ArtifactError(f"{path}: artifact directory not found (expected a {wanted} artifact)")
    if not manifest_path.is_file():
        raise ArtifactError(f"{path}: no {MANIFEST_NAME}; not a towerline artifact (expected {wanted})")
    try:
        manifest = Manifest.model_validate(json.loads(manifest_path.read_text()))
    except (ValueError, ValidationError) as exc:
        raise ArtifactError(f"{manifest_path}: unreadable manifest ({exc.__class__.__name__})") from None
    escaping = [name for name in manifest.files if _escapes(name)]
    if escaping:
        # An artifact may come from elsewhere: its manifest must not make verify or reseal read files
        # outside its directory.
        raise ArtifactError(f"{manifest_path}: file name(s) outside the artifact: {', '.join(escaping[:3])}")
    if manifest.kind not in kinds:
        raise ArtifactError(f"{path}: artifact is of kind {manifest.kind!r}, expected {wanted}")
    if manifest.schema_version > SCHEMA_VERSION:
        raise ArtifactError(
            f"{path}: schema version {manifest.schema_version} is newer than this towerline "
            f"supports ({SCHEMA_VERSION}); upgrade towerline"
        )
    if verify:
        verify_checksums(path, manifest)
    return manifest


def _escapes(name: str) -> bool:
    parts = Path(name).parts
    return not parts or Path(name).is_absolute() or ".." in parts or "\\" in name


def verify_checksums(path: Path, manifest: Manifest) -> None:
    """Every listed file present with its checksum, and no file that the manifest does not list."""
    for name, expected in manifest.files.items():
        file_path = path / name
        if not file_path.is_file():
            raise ArtifactError(f"{path}: file {name} listed in the manifest is missing")
        if sha256_file(file_path) != expected:
            raise ArtifactError(f"{path}: checksum mismatch for {name}; the artifact is corrupt")
    listed = {*manifest.files, MANIFEST_NAME, SUCCESS_MARKER}
    extra = sorted(name for name in (file.relative_to(path).as_posix() for file in path.rglob("*") if file.is_file())
                   if name not in listed)
    if extra:
        raise ArtifactError(f"{path}: file(s) not in the manifest: {', '.join(extra[:5])}; the artifact was "
                            "changed after it was written")


def require_same_space(space_a: str, name_a: str, space_b: str, name_b: str) -> None:
    """Refuse to pair a query encoder and an index built in different embedding spaces."""
    if space_a != space_b:
        raise ArtifactError(
            f"embedding space mismatch: {name_a} is {space_a[:12]}…, {name_b} is {space_b[:12]}…; "
            "rebuild the index with the doc tower that belongs to this query encoder"
        )

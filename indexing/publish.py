"""A registry of published indexes: `root/name/v0001`, `v0002`, … and a `CURRENT` pointer.

Servers load `root/name`, which follows CURRENT; publishing copies and verifies the new version
first and only then swaps CURRENT with an atomic rename, so a reader never sees a half-copied
index and a failed publish leaves the previous version serving.
"""

from __future__ import annotations

import os
import re
import shutil
import uuid
from pathlib import Path
from typing import Any

from indexing.layout import INDEX_KIND
from towerline.artifacts import read_manifest
from towerline.errors import ArtifactError

CURRENT_FILE = "CURRENT"
VERSION_PATTERN = re.compile(r"^v(\d{4,})$")


def publish_index(index_artifact: Path, registry_root: Path, name: str) -> Path:
    """Copy a verified index artifact to the next version of `registry_root/name`; make it CURRENT."""
    _check_name(name)
    source = read_manifest(index_artifact, INDEX_KIND, verify=True)
    entry = Path(registry_root) / name
    entry.mkdir(parents=True, exist_ok=True)
    staging = entry / f".staging-{uuid.uuid4().hex[:8]}"
    try:
        shutil.copytree(index_artifact, staging)
        copied = read_manifest(staging, INDEX_KIND, verify=True)
        if copied.fingerprint != source.fingerprint:
            raise ArtifactError(f"{index_artifact}: changed while it was being published; publish again")
        version_dir = _claim_next_version(entry)
        try:
            # Renaming onto the empty directory we just claimed is atomic on POSIX.
            os.replace(staging, version_dir)
        except OSError:
            version_dir.rmdir()
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    _write_current(entry, version_dir.name)
    return version_dir


def resolve_published(entry: Path) -> Path:
    """The version directory that `entry/CURRENT` names."""
    pointer = Path(entry) / CURRENT_FILE
    if not pointer.is_file():
        raise ArtifactError(f"{entry}: no {CURRENT_FILE} pointer; not a published index (publish one first)")
    version = pointer.read_text().strip()
    if not VERSION_PATTERN.match(version) or not (Path(entry) / version).is_dir():
        raise ArtifactError(f"{pointer}: names {version!r}, which is not a published version here")
    return Path(entry) / version


def is_registry_entry(path: Path) -> bool:
    return (Path(path) / CURRENT_FILE).is_file()


def list_versions(entry: Path) -> list[str]:
    if not Path(entry).is_dir():
        return []
    numbered = [
        (int(match.group(1)), child.name)
        for child in Path(entry).iterdir()
        if child.is_dir() and (match := VERSION_PATTERN.match(child.name))
    ]
    return [name for _, name in sorted(numbered)]


def index_info(path: Path) -> dict[str, Any]:
    """Manifest summary of an index artifact or registry entry (for `towerline index info`)."""
    path = Path(path)
    summary: dict[str, Any] = {}
    if is_registry_entry(path):
        summary["versions"] = list_versions(path)
        path = resolve_published(path)
        summary["current"] = path.name
    manifest = read_manifest(path, INDEX_KIND)
    return {
        "path": str(path),
        **summary,
        "kind": manifest.kind,
        "fingerprint": manifest.fingerprint,
        "created_at": manifest.created_at,
        "producer": manifest.producer,
        "inputs": manifest.inputs,
        **manifest.metadata,
    }


def _check_name(name: str) -> None:
    if not name or name.startswith(".") or "/" in name or "\\" in name:
        raise ArtifactError(f"index name {name!r} must be a plain directory name (no slash, no leading dot)")


def _claim_next_version(entry: Path) -> Path:
    existing = list_versions(entry)
    number = int(VERSION_PATTERN.match(existing[-1]).group(1)) + 1 if existing else 1
    while True:
        candidate = entry / f"v{number:04d}"
        try:
            # mkdir fails if the name exists, so two concurrent publishers never share a version.
            candidate.mkdir()
            return candidate
        except FileExistsError:
            number += 1


def _write_current(entry: Path, version: str) -> None:
    temp = entry / f".{CURRENT_FILE}.{uuid.uuid4().hex[:8]}"
    with temp.open("w") as handle:
        handle.write(version + "\n")
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temp, entry / CURRENT_FILE)

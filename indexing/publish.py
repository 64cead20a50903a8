"""A registry of published indexes: `root/name/v0001`, `v0002`, … and a `CURRENT` pointer.

Servers load `root/name`, which follows CURRENT; publishing copies the new version into a hidden
staging directory, fsyncs and verifies it, renames it into place and only then swaps CURRENT with
an atomic rename, so a reader never sees a half-copied index and a failed (or killed) publish
leaves the previous version serving. Publishers of one entry take turns on a lock file, so staging
directories found while holding it are a crashed publisher's leftovers and are removed.
"""

from __future__ import annotations

import fcntl
import os
import re
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from indexing.layout import INDEX_KIND
from towerline.artifacts import read_manifest
from towerline.errors import ArtifactError

CURRENT_FILE = "CURRENT"
LOCK_FILE = ".publish.lock"
STAGING_PREFIX = ".staging-"
VERSION_PATTERN = re.compile(r"^v(\d{4,})$")


def publish_index(index_artifact: Path, registry_root: Path, name: str, keep: int | None = None) -> Path:
    """Copy a verified index artifact to the next version of `registry_root/name`; make it CURRENT.
    With `keep`, only the newest `keep` versions stay afterwards (CURRENT always stays)."""
    _check_name(name)
    if keep is not None and keep < 1:
        raise ArtifactError(f"keep={keep}: at least the version being published must be kept (keep >= 1)")
    source = read_manifest(index_artifact, INDEX_KIND, verify=True)
    entry = Path(registry_root) / name
    entry.mkdir(parents=True, exist_ok=True)
    with _publish_lock(entry):
        _remove_leftovers(entry)
        staging = entry / f"{STAGING_PREFIX}{uuid.uuid4().hex[:8]}"
        try:
            shutil.copytree(index_artifact, staging)
            _fsync_tree(staging)
            copied = read_manifest(staging, INDEX_KIND, verify=True)
            if copied.fingerprint != source.fingerprint:
                raise ArtifactError(f"{index_artifact}: changed while it was being published; publish again")
            version_dir = _next_version(entry)
            # A rename onto a fresh name is atomic on POSIX; the lock keeps other publishers off it.
            os.rename(staging, version_dir)
            _fsync_dir(entry)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        _write_current(entry, version_dir.name)
        if keep is not None:
            prune_versions(entry, keep)
    return version_dir


def rollback(entry: Path, to: str | None = None) -> tuple[str, str]:
    """Point CURRENT at `to` (default: the newest version older than CURRENT), after verifying it.
    Returns (previous CURRENT, new CURRENT)."""
    entry = Path(entry)
    current = resolve_published(entry).name
    versions = list_versions(entry)
    if to is None:
        older = [version for version in versions if _number(version) < _number(current)]
        if not older:
            raise ArtifactError(f"{entry}: CURRENT is {current}, the oldest version kept; nothing to roll back to")
        to = older[-1]
    elif to not in versions:
        raise ArtifactError(f"{entry}: no version {to!r} (kept: {', '.join(versions)})")
    read_manifest(entry / to, INDEX_KIND, verify=True)  # never point CURRENT at a corrupt version
    with _publish_lock(entry):
        _write_current(entry, to)
    return current, to


def verify_entry(path: Path, all_versions: bool = False) -> list[str]:
    """Verify an index artifact, or a registry entry's CURRENT version (every version with
    `all_versions`): each file's checksum, no file missing, none extra. Returns what was verified."""
    path = Path(path)
    if not is_registry_entry(path):
        read_manifest(path, INDEX_KIND, verify=True)
        return [str(path)]
    targets = list_versions(path) if all_versions else [resolve_published(path).name]
    for version in targets:
        read_manifest(path / version, INDEX_KIND, verify=True)
    return targets


def prune_versions(entry: Path, keep: int) -> list[str]:
    """Delete all but the newest `keep` versions, never the CURRENT one. Returns the deleted names."""
    current = resolve_published(entry).name
    versions = list_versions(entry)
    doomed = [version for version in versions[: max(len(versions) - keep, 0)] if version != current]
    for version in doomed:
        # Renamed out of sight first, so that a reader never lists a half-deleted version.
        hidden = entry / f"{STAGING_PREFIX}{version}-{uuid.uuid4().hex[:8]}"
        os.replace(entry / version, hidden)
        shutil.rmtree(hidden, ignore_errors=True)
    return doomed


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


def _number(version: str) -> int:
    match = VERSION_PATTERN.match(version)
    assert match is not None, version
    return int(match.group(1))


@contextmanager
def _publish_lock(entry: Path) -> Iterator[None]:
    with (entry / LOCK_FILE).open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _remove_leftovers(entry: Path) -> None:
    """Staging copies and CURRENT temp files of a publisher that died (we hold the lock: none is live)."""
    for child in entry.iterdir():
        if child.name.startswith(STAGING_PREFIX) and child.is_dir():
            shutil.rmtree(child, ignore_errors=True)
        elif child.name.startswith(f".{CURRENT_FILE}.") and child.is_file():
            child.unlink(missing_ok=True)


def _fsync_tree(root: Path) -> None:
    for path in sorted(root.rglob("*")):
        if path.is_file():
            with path.open("rb") as handle:
                os.fsync(handle.fileno())
    for directory in [root, *(path for path in root.rglob("*") if path.is_dir())]:
        _fsync_dir(directory)


def _fsync_dir(directory: Path) -> None:
    descriptor = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _next_version(entry: Path) -> Path:
    existing = list_versions(entry)
    return entry / f"v{_number(existing[-1]) + 1 if existing else 1:04d}"


def _write_current(entry: Path, version: str) -> None:
    temp = entry / f".{CURRENT_FILE}.{uuid.uuid4().hex[:8]}"
    with temp.open("w") as handle:
        handle.write(version + "\n")
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temp, entry / CURRENT_FILE)
    _fsync_dir(entry)

import json
from pathlib import Path

import pytest

from towerline.artifacts import ArtifactWriter, read_manifest, require_same_space
from towerline.errors import ArtifactError


def test_written_artifact_round_trips_with_checksums(tmp_path: Path) -> None:
    dest = tmp_path / "art"
    with ArtifactWriter(dest, "thing", producer="test") as staged:
        (staged.path / "a.txt").write_text("hello")
        staged.metadata["dim"] = 4
    manifest = read_manifest(dest, "thing", verify=True)
    assert manifest.metadata["dim"] == 4
    assert set(manifest.files) == {"a.txt"}
    assert manifest.fingerprint


def test_failed_producer_leaves_nothing_and_keeps_previous(tmp_path: Path) -> None:
    dest = tmp_path / "art"
    with ArtifactWriter(dest, "thing", producer="test") as staged:
        (staged.path / "a.txt").write_text("v1")
    with pytest.raises(RuntimeError), ArtifactWriter(dest, "thing", producer="test") as staged:
        (staged.path / "a.txt").write_text("half")
        raise RuntimeError("boom")
    assert (dest / "a.txt").read_text() == "v1"
    assert [p.name for p in tmp_path.iterdir()] == ["art"]


def test_wrong_kind_missing_and_corrupt_are_refused(tmp_path: Path) -> None:
    dest = tmp_path / "art"
    with ArtifactWriter(dest, "thing", producer="test") as staged:
        (staged.path / "a.txt").write_text("v1")
    with pytest.raises(ArtifactError, match=r"kind .thing., expected .faiss-index."):
        read_manifest(dest, "faiss-index")
    with pytest.raises(ArtifactError, match="not found"):
        read_manifest(tmp_path / "nope", "thing")
    (dest / "a.txt").write_text("tampered")
    with pytest.raises(ArtifactError, match=r"checksum mismatch for a\.txt"):
        read_manifest(dest, "thing", verify=True)
    manifest_path = dest / "manifest.json"
    data = json.loads(manifest_path.read_text())
    data["schema_version"] = 99
    manifest_path.write_text(json.dumps(data))
    with pytest.raises(ArtifactError, match="newer"):
        read_manifest(dest, "thing")


def test_embedding_space_mismatch() -> None:
    require_same_space("abc", "a", "abc", "b")
    with pytest.raises(ArtifactError, match="embedding space mismatch"):
        require_same_space("abc", "encoder", "def", "index")


@pytest.mark.parametrize("name", ["../outside.txt", "/etc/hostname", "a/../../outside.txt", "", "..\\outside"])
def test_a_manifest_naming_files_outside_its_artifact_is_refused(tmp_path: Path, name: str) -> None:
    # A received artifact must not make verify (or reseal, which copies the listed files) read elsewhere.
    with ArtifactWriter(tmp_path / "a", "thing", producer="test") as staged:
        (staged.path / "data.txt").write_text("x")
    (tmp_path / "outside.txt").write_text("secret")
    manifest = json.loads((tmp_path / "a" / "manifest.json").read_text())
    manifest["files"][name] = "0" * 64
    (tmp_path / "a" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="outside the artifact"):
        read_manifest(tmp_path / "a", "thing", verify=True)

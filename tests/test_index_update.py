"""`index update`: upserts and deletes into a new version, stable labels, only changed texts embedded."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from indexing.build import build_index
from indexing.embedding_cache import read_embedding_cache
from indexing.load import load_index
from indexing.update import read_upserts, update_index
from towerline.beir import Document, load_dataset
from towerline.config import TowerlineConfig
from towerline.errors import ArtifactError, DataError
from towerline.towers import load_towers
from training.run import init_dual_encoder

NEW = Document("new-1", "Brand new", "an entirely new document about zebras and lighthouses")


@pytest.fixture()
def built(tiny_config: TowerlineConfig, tmp_path: Path) -> tuple[Path, Path]:
    init_dual_encoder(tiny_config, tmp_path / "encoder")
    return tmp_path / "encoder", tmp_path


def _embed(encoder: Path, config: TowerlineConfig, documents: list[Document]) -> np.ndarray:
    _, doc_tower, _ = load_towers(encoder)
    return doc_tower.encode([doc.render(doc_tower.spec.document_template) for doc in documents])


@pytest.mark.parametrize(("index_type", "how"), [("flat", "rebuilt"), ("hnsw", "rebuilt"), ("ivf", "in place")])
def test_update_then_delete_returns_the_right_ids(tiny_config: TowerlineConfig, built: tuple[Path, Path],
                                                  index_type: str, how: str) -> None:
    encoder, root = built
    config = tiny_config.model_copy(update={"index": tiny_config.index.model_copy(
        update={"type": index_type, "ivf_nlist": 2, "ivf_nprobe": 2, "hnsw_ef_search": 200})})
    build_index(config, encoder, root / "v1")
    corpus = load_dataset(config.data).corpus
    ids = list(corpus)
    changed = Document(ids[3], "A changed title", "text rewritten about zebras at sea")
    same = corpus[ids[4]]  # upserted with the same text: neither re-embedded nor moved
    manifest = update_index(config, root / "v1", encoder, root / "v2", upserts=[NEW, changed, same],
                            deletes=[ids[0], ids[1]])
    assert manifest.metadata["update"] == {"base_version": load_index(root / "v1").version, "how": manifest.metadata[
        "update"]["how"], "added": 1, "changed": 1, "unchanged": 77, "deleted": 2, "embedded": 2}
    assert manifest.metadata["update"]["how"].startswith(how)
    v1, v2 = load_index(root / "v1"), load_index(root / "v2")
    assert v2.size == 79 and v2.doc_ids[:2] == [None, None] and v2.doc_ids[80] == "new-1"
    assert v2.doc_ids[2:80] == v1.doc_ids[2:80]  # every other label stays where it was
    new_vector, changed_vector = _embed(encoder, config, [NEW, changed])
    assert v2.search(new_vector, 1)[0][0][0] == "new-1"
    assert v2.search(changed_vector, 1)[0][0][0] == changed.doc_id
    old_vectors, _ = read_embedding_cache(root / "v1", 80)
    found = {doc_id for hits in v2.search(old_vectors[:2], 10) for doc_id, _ in hits}
    assert not found & {ids[0], ids[1]}
    cached, hashes = read_embedding_cache(root / "v2", 81)
    assert np.array_equal(cached[4], old_vectors[4]) and hashes[0] is None and not cached[0].any()
    assert v2.doc_store.lookup([changed.doc_id, "new-1"]) == {changed.doc_id: (changed.title, changed.text),
                                                              "new-1": (NEW.title, NEW.text)}
    assert v2.sparse is not None and v2.sparse.search(["zebras lighthouses"], 1)[0][0][0] == "new-1"
    # Exact search agrees with brute force over the cached vectors of the live labels.
    if index_type == "flat":
        live = [label for label, doc_id in enumerate(v2.doc_ids) if doc_id is not None]
        scores = old_vectors[5:6] @ cached[live].T
        best = [v2.doc_ids[live[column]] for column in np.argsort(-scores[0])[:5]]
        assert [doc_id for doc_id, _ in v2.search(old_vectors[5:6], 5)[0]] == best

    # Then delete the new document again: gone, labels of the others unchanged.
    update_index(config, root / "v2", encoder, root / "v3", upserts=[], deletes=["new-1"])
    v3 = load_index(root / "v3")
    assert v3.size == 78 and v3.doc_ids[80] is None and v3.doc_ids[2:80] == v2.doc_ids[2:80]
    assert "new-1" not in {doc_id for doc_id, _ in v3.search(new_vector, 10)[0]}


def test_bad_updates_are_refused_before_anything_is_written(tiny_config: TowerlineConfig,
                                                            built: tuple[Path, Path], tmp_path: Path) -> None:
    encoder, root = built
    build_index(tiny_config, encoder, root / "v1")
    ids = list(load_dataset(tiny_config.data).corpus)
    with pytest.raises(DataError, match=r"not in the index, e\.g\. 'nope'"):
        update_index(tiny_config, root / "v1", encoder, root / "v2", upserts=[NEW], deletes=["nope"])
    with pytest.raises(DataError, match="both upserted and deleted"):
        update_index(tiny_config, root / "v1", encoder, root / "v2", upserts=[Document(ids[0], "t", "x")],
                     deletes=[ids[0]])
    with pytest.raises(DataError, match="appears twice"):
        update_index(tiny_config, root / "v1", encoder, root / "v2", upserts=[NEW, NEW], deletes=[])
    other = tmp_path / "other-encoder"
    init_dual_encoder(tiny_config.model_copy(update={"encoder": tiny_config.encoder.model_copy(
        update={"doc_prefix": "passage: "})}), other)
    with pytest.raises(ArtifactError, match="not the doc tower"):
        update_index(tiny_config, root / "v1", other, root / "v2", upserts=[NEW], deletes=[])
    assert not (root / "v2").exists()
    lines = root / "upserts.jsonl"
    lines.write_text(json.dumps({"_id": "a", "title": "t", "text": "x"}) + "\n\n" + '{"_id": "b", "title": 3}\n')
    with pytest.raises(DataError, match=r"upserts\.jsonl:3: "):
        read_upserts(lines)


def test_index_update_publish_verify_and_rollback_from_the_command_line(tiny_config: TowerlineConfig,
                                                                        tiny_overrides: list[str],
                                                                        built: tuple[Path, Path]) -> None:
    from typer.testing import CliRunner

    from towerline.cli import app

    encoder, root = built
    build_index(tiny_config, encoder, root / "v1")
    (root / "new.jsonl").write_text(json.dumps({"_id": NEW.doc_id, "title": NEW.title, "text": NEW.text}) + "\n")
    gone = next(iter(load_dataset(tiny_config.data).corpus))
    (root / "gone.txt").write_text(gone + "\n")
    runner = CliRunner()

    def run(*args: str) -> str:
        outcome = runner.invoke(app, list(args))
        assert outcome.exit_code == 0, outcome.output
        return outcome.output

    said = run("index", "update", str(root / "v1"), "--upsert", str(root / "new.jsonl"), "--delete",
               str(root / "gone.txt"), "--encoder", str(encoder), "--out", str(root / "v2"), *tiny_overrides)
    assert "1 added, 0 changed, 1 deleted, 79 unchanged; 1 embedded" in " ".join(said.split())
    registry = root / "registry"
    for version in ("v1", "v2"):
        run("index", "publish", str(root / version), "--registry", str(registry), "--name", "tiny", "--keep", "2")
    run("index", "verify", str(registry / "tiny"), "--all-versions")
    assert load_index(registry / "tiny").size == 80 - 1 + 1
    run("index", "rollback", str(registry / "tiny"))
    assert load_index(registry / "tiny").doc_ids[0] == gone  # v0001 serves again


def test_a_build_that_dies_resumes_from_its_finished_embedding_shards(tiny_config: TowerlineConfig,
                                                                      built: tuple[Path, Path],
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    from indexing.embed_shards import shard_dir_for
    from towerline.encoder import Tower

    encoder, root = built
    config = tiny_config.model_copy(update={"index": tiny_config.index.model_copy(update={"embed_shard_size": 30})})
    build_index(config, encoder, root / "reference")
    encode, calls = Tower.encode, []

    def dies_on_the_third_shard(self: Tower, texts: list[str], *args: object, **kwargs: object) -> np.ndarray:
        calls.append(len(texts))
        if len(calls) == 3:
            raise KeyboardInterrupt("killed")
        return encode(self, texts, *args, **kwargs)

    monkeypatch.setattr(Tower, "encode", dies_on_the_third_shard)
    with pytest.raises(KeyboardInterrupt):
        build_index(config, encoder, root / "index")
    assert not (root / "index").exists() and len(list(shard_dir_for(root / "index").glob("shard-*.npy"))) == 2
    calls.clear()
    build_index(config, encoder, root / "index")  # 80 docs: shards of 30, 30, 20 — only the last is embedded
    assert calls == [20] and not shard_dir_for(root / "index").exists()
    assert np.array_equal(read_embedding_cache(root / "index", 80)[0], read_embedding_cache(root / "reference", 80)[0])

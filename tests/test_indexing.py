"""Indexing: build from the tiny dual encoder, index types, registry publishing, refusals (real FAISS)."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from indexing.build import build_index, build_index_from_embeddings
from indexing.gpu import gpu_count
from indexing.layout import INDEX_FILE
from indexing.load import load_index
from indexing.publish import (
    CURRENT_FILE,
    LOCK_FILE,
    index_info,
    list_versions,
    publish_index,
    resolve_published,
    rollback,
    verify_entry,
)
from towerline.artifacts import ArtifactWriter
from towerline.beir import load_dataset, locate_dataset
from towerline.config import IndexConfig, TowerlineConfig
from towerline.errors import ArtifactError, ConfigError, DataError
from towerline.towers import save_dual_encoder, towers_from_backbone

SPACE = "synthetic-space"


def clustered_embeddings(count: int, dim: int, clusters: int, seed: int) -> np.ndarray:
    """Unit vectors around random centres: neighbourhoods like real embeddings, unlike isotropic noise."""
    rng = np.random.default_rng(seed)
    centres = np.random.default_rng(0).normal(size=(clusters, dim))
    vectors = centres[rng.integers(clusters, size=count)] + 0.3 * rng.normal(size=(count, dim))
    return (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype(np.float32)


def build_synthetic(output: Path, embeddings: np.ndarray, index_type: str = "flat") -> Path:
    doc_ids = [f"doc{row}" for row in range(len(embeddings))]
    build_index_from_embeddings(
        embeddings, doc_ids, output, index_config=IndexConfig(type=index_type), embedding_space=SPACE
    )
    return output


def test_built_index_finds_each_doc_as_its_own_top_hit(
    tiny_config: TowerlineConfig, tiny_dataset: Path, tmp_path: Path
) -> None:
    # Documents are rendered with the doc tower's own template, whatever the index build's config says.
    trained_with = tiny_config.model_copy(deep=True)
    trained_with.encoder.doc_template = "passage: {text} (from {title})"
    query_tower, doc_tower = towers_from_backbone(trained_with.encoder)
    encoder_manifest = save_dual_encoder(
        query_tower, doc_tower, tmp_path / "encoder", producer="test", config=trained_with
    )

    manifest = build_index(tiny_config, tmp_path / "encoder", tmp_path / "index")

    assert manifest.kind == "faiss-index"
    assert manifest.inputs == {"encoder": encoder_manifest.fingerprint}
    assert manifest.metadata["embedding_space"] == encoder_manifest.metadata["embedding_space"]
    assert manifest.metadata["dim"] == 32
    assert manifest.metadata["count"] == 80
    assert manifest.metadata["index_type"] == "flat"
    assert manifest.metadata["metric"] == "ip"
    assert manifest.metadata["dataset"] == locate_dataset(tiny_config.data).identity()
    assert manifest.metadata["dataset"]["name"] == tiny_dataset.name
    loaded = load_index(tmp_path / "index")
    assert (loaded.size, loaded.dim, loaded.embedding_space) == (80, 32, manifest.metadata["embedding_space"])
    corpus = load_dataset(tiny_config.data).corpus
    doc_embeddings = doc_tower.encode(
        [doc.render(trained_with.encoder.doc_template) for doc in corpus.values()],
        batch_size=tiny_config.index.batch_size,
    )
    top_hits = [hits[0] for hits in loaded.search(doc_embeddings, k=3)]
    assert [doc_id for doc_id, _ in top_hits] == list(corpus)
    assert all(score == pytest.approx(1.0, abs=1e-4) for _, score in top_hits)


@pytest.mark.parametrize("index_type", ["hnsw", "ivf"])
def test_approximate_indexes_recall_at_least_90_percent_of_flat(index_type: str, tmp_path: Path) -> None:
    doc_embeddings = clustered_embeddings(4000, 32, clusters=40, seed=1)
    query_embeddings = clustered_embeddings(200, 32, clusters=40, seed=2)
    exact = load_index(build_synthetic(tmp_path / "flat", doc_embeddings))
    approximate = load_index(build_synthetic(tmp_path / index_type, doc_embeddings, index_type))

    k = 10
    exact_hits = exact.search(query_embeddings, k)
    approximate_hits = approximate.search(query_embeddings, k)
    found = sum(
        len({doc for doc, _ in want} & {doc for doc, _ in got})
        for want, got in zip(exact_hits, approximate_hits, strict=True)
    )
    assert found / (k * len(query_embeddings)) >= 0.9
    assert approximate.index_type == index_type


def _recall(exact: list, approximate: list, k: int) -> float:
    found = sum(len({doc for doc, _ in want} & {doc for doc, _ in got})
                for want, got in zip(exact, approximate, strict=True))
    return found / (k * len(exact))


@pytest.mark.parametrize("opq", [False, True])
def test_ivf_pq_compresses_and_a_per_call_nprobe_trades_speed_for_recall(opq: bool, tmp_path: Path) -> None:
    doc_embeddings = clustered_embeddings(4000, 32, clusters=40, seed=1)
    query_embeddings = clustered_embeddings(200, 32, clusters=40, seed=2)
    exact = load_index(build_synthetic(tmp_path / "flat", doc_embeddings)).search(query_embeddings, 10)
    config = IndexConfig(type="ivf_pq", ivf_nlist=64, ivf_nprobe=1, pq_m=16, opq=opq)
    build_index_from_embeddings(doc_embeddings, [f"doc{row}" for row in range(4000)], tmp_path / "pq",
                                index_config=config, embedding_space=SPACE)
    loaded = load_index(tmp_path / "pq")
    params = loaded.manifest.metadata["params"]
    assert (params["pq_m"], params["opq"], params["ivf_nprobe"], loaded.index_type) == (16, opq, 1, "ivf_pq")
    assert (tmp_path / "pq" / INDEX_FILE).stat().st_size < 4000 * 32 * 4 / 4  # codes, not vectors
    narrow = _recall(exact, loaded.search(query_embeddings, 10), 10)
    wide = _recall(exact, loaded.search(query_embeddings, 10, nprobe=64), 10)
    assert wide > narrow and wide >= 0.5
    assert loaded.search(query_embeddings, 10) == loaded.search(query_embeddings, 10, nprobe=1)  # call-local


@pytest.mark.parametrize("index_type", ["flat", "ivf", "hnsw"])
def test_a_memory_mapped_index_answers_as_the_loaded_one(index_type: str, tmp_path: Path) -> None:
    path = build_synthetic(tmp_path / index_type, clustered_embeddings(2000, 16, 10, seed=5), index_type)
    queries = clustered_embeddings(20, 16, 10, seed=6)
    mapped = load_index(path, IndexConfig(type=index_type, mmap=True))
    assert mapped.search(queries, 5) == load_index(path, IndexConfig(type=index_type)).search(queries, 5)


def test_a_per_call_ef_search_overrides_hnsw_for_that_call_only(tmp_path: Path) -> None:
    doc_embeddings = clustered_embeddings(4000, 32, clusters=40, seed=1)
    query_embeddings = clustered_embeddings(200, 32, clusters=40, seed=2)
    exact = load_index(build_synthetic(tmp_path / "flat", doc_embeddings)).search(query_embeddings, 10)
    build_index_from_embeddings(doc_embeddings, [f"doc{row}" for row in range(4000)], tmp_path / "hnsw",
                                index_config=IndexConfig(type="hnsw", hnsw_m=4, hnsw_ef_search=10),
                                embedding_space=SPACE)
    loaded = load_index(tmp_path / "hnsw")
    stored = loaded.search(query_embeddings, 10)
    assert _recall(exact, loaded.search(query_embeddings, 10, ef_search=200), 10) > _recall(exact, stored, 10)
    assert loaded.search(query_embeddings, 10) == stored


def test_auto_picks_exact_then_the_most_accurate_structure_that_fits_the_budget(tmp_path: Path) -> None:
    from indexing.factory import choose_index_type, estimated_bytes

    auto = IndexConfig(type="auto")
    assert choose_index_type(10_000, 384, auto).type == "flat"
    assert choose_index_type(1_000_000, 384, auto).type == "hnsw"
    hnsw, ivf = (estimated_bytes(kind, 1_000_000, 384, auto) for kind in ("hnsw", "ivf"))
    between = IndexConfig(type="auto", memory_budget_mb=(hnsw + ivf) / 2 / 2**20)
    assert choose_index_type(1_000_000, 384, between).type == "ivf"
    tight = IndexConfig(type="auto", memory_budget_mb=200)
    choice = choose_index_type(1_000_000, 384, tight)
    assert choice.type == "ivf_pq" and "memory_budget_mb=200" in choice.reason
    with pytest.raises(ConfigError, match="even IVF-PQ"):
        choose_index_type(1_000_000, 384, IndexConfig(type="auto", memory_budget_mb=1))
    with pytest.raises(ConfigError, match="must divide"):
        choose_index_type(1_000_000, 384, IndexConfig(type="auto", pq_m=7, memory_budget_mb=200))
    # Built: the manifest names the structure chosen and why.
    embeddings = clustered_embeddings(3000, 16, 8, seed=3)
    build_index_from_embeddings(embeddings, [f"d{row}" for row in range(3000)], tmp_path / "auto",
                                index_config=IndexConfig(type="auto", auto_exact_below=1000), embedding_space=SPACE)
    loaded = load_index(tmp_path / "auto")
    assert loaded.index_type == "hnsw" and "3000 documents" in loaded.manifest.metadata["auto_choice"]


def test_ivf_caps_the_number_of_lists_on_a_small_corpus(tmp_path: Path) -> None:
    loaded = load_index(build_synthetic(tmp_path / "ivf", clustered_embeddings(80, 16, 4, seed=3), "ivf"))
    assert loaded.manifest.metadata["params"]["ivf_nlist"] == 2
    assert len(loaded.search(clustered_embeddings(1, 16, 4, seed=4), k=5)[0]) == 5


@pytest.mark.parametrize("index_type", ["flat", "hnsw"])
def test_search_drops_slots_faiss_could_not_fill(index_type: str, tmp_path: Path) -> None:
    embeddings = clustered_embeddings(5, 8, 2, seed=5)
    loaded = load_index(build_synthetic(tmp_path / "small", embeddings, index_type))
    hits = loaded.search(embeddings[:2], k=50)
    assert [len(row) for row in hits] == [5, 5]
    assert hits[0][0][0] == "doc0"


def test_search_params_from_config_override_the_stored_ones(tmp_path: Path) -> None:
    path = build_synthetic(tmp_path / "hnsw", clustered_embeddings(100, 8, 4, seed=6), "hnsw")
    assert load_index(path).index.hnsw.efSearch == IndexConfig().hnsw_ef_search
    tuned = load_index(path, IndexConfig(type="hnsw", hnsw_ef_search=16, use_gpu="never"))
    assert tuned.index.hnsw.efSearch == 16


def test_inconsistent_inputs_are_refused(tmp_path: Path) -> None:
    embeddings = clustered_embeddings(3, 8, 1, seed=7)
    with pytest.raises(DataError, match="3 embeddings but 2 doc ids"):
        build_index_from_embeddings(
            embeddings, ["a", "b"], tmp_path / "x", index_config=IndexConfig(), embedding_space=SPACE
        )
    with pytest.raises(DataError, match="not unique"):
        build_index_from_embeddings(
            embeddings, ["a", "b", "a"], tmp_path / "x", index_config=IndexConfig(), embedding_space=SPACE
        )
    assert not (tmp_path / "x").exists()


def test_publish_creates_versions_and_moves_current(tmp_path: Path) -> None:
    first = build_synthetic(tmp_path / "first", clustered_embeddings(20, 8, 2, seed=8))
    second = build_synthetic(tmp_path / "second", clustered_embeddings(30, 8, 2, seed=9))
    registry = tmp_path / "registry"

    assert publish_index(first, registry, "scifact") == registry / "scifact" / "v0001"
    assert publish_index(second, registry, "scifact") == registry / "scifact" / "v0002"

    entry = registry / "scifact"
    assert (entry / CURRENT_FILE).read_text().strip() == "v0002"
    assert resolve_published(entry) == entry / "v0002"
    assert sorted(path.name for path in entry.iterdir()) == [LOCK_FILE, CURRENT_FILE, "v0001", "v0002"]
    loaded = load_index(entry)
    assert (loaded.size, loaded.published_version, loaded.version) == (30, "v0002", "v0002")
    summary = index_info(entry)
    assert summary["versions"] == list_versions(entry) == ["v0001", "v0002"]
    assert (summary["current"], summary["count"], summary["kind"]) == ("v0002", 30, "faiss-index")


def test_a_publish_killed_between_files_leaves_current_and_no_partial_version(tmp_path: Path) -> None:
    """A real SIGKILL of a publishing process after its first copied file."""
    registry = tmp_path / "registry"
    publish_index(build_synthetic(tmp_path / "first", clustered_embeddings(20, 8, 2, seed=8)), registry, "sf")
    second = build_synthetic(tmp_path / "second", clustered_embeddings(30, 8, 2, seed=9))
    script = (
        "import os, shutil, signal, sys\n"
        "from indexing.publish import publish_index\n"
        "copy = shutil.copyfile\n"
        "def copy_then_die(source, target, **kwargs):\n"
        "    copy(source, target, **kwargs)\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
        "shutil.copyfile = copy_then_die\n"
        "publish_index(sys.argv[1], sys.argv[2], 'sf')\n"
    )
    died = subprocess.run([sys.executable, "-c", script, str(second), str(registry)], cwd=Path(__file__).parents[1],
                          capture_output=True, check=False)
    assert died.returncode == -signal.SIGKILL, died.stderr.decode()
    entry = registry / "sf"
    assert any(child.name.startswith(".staging-") for child in entry.iterdir())  # it did die mid-copy
    assert (entry / CURRENT_FILE).read_text().strip() == "v0001" and list_versions(entry) == ["v0001"]
    assert load_index(entry).size == 20
    # The next publish cleans the dead publisher's staging copy.
    assert publish_index(second, registry, "sf") == entry / "v0002"
    assert not any(child.name.startswith(".staging-") for child in entry.iterdir())


def test_a_flipped_byte_or_an_extra_file_fails_verify_and_loading(tmp_path: Path) -> None:
    registry = tmp_path / "registry"
    publish_index(build_synthetic(tmp_path / "first", clustered_embeddings(20, 8, 2, seed=8)), registry, "sf")
    entry = registry / "sf"
    assert verify_entry(entry) == ["v0001"]
    stray = entry / "v0001" / "notes.txt"
    stray.write_text("added after publishing")
    for check in (lambda: verify_entry(entry), lambda: load_index(entry)):
        with pytest.raises(ArtifactError, match=r"not in the manifest: notes\.txt"):
            check()
    stray.unlink()
    index_file = entry / "v0001" / INDEX_FILE
    data = bytearray(index_file.read_bytes())
    data[len(data) // 2] ^= 0x01
    index_file.write_bytes(bytes(data))
    for check in (lambda: verify_entry(entry, all_versions=True), lambda: load_index(entry)):
        with pytest.raises(ArtifactError, match=f"checksum mismatch for {INDEX_FILE}"):
            check()


def test_rollback_restores_the_previous_results_and_keep_prunes_old_versions(tmp_path: Path) -> None:
    registry, entry = tmp_path / "registry", tmp_path / "registry" / "sf"
    sizes = (20, 30, 40)
    for number, size in enumerate(sizes):
        embeddings = clustered_embeddings(size, 8, 2, seed=number)
        publish_index(build_synthetic(tmp_path / f"built{number}", embeddings), registry, "sf")
    query = clustered_embeddings(1, 8, 2, seed=1)
    before = load_index(entry).search(query, 5)
    assert rollback(entry) == ("v0003", "v0002")
    assert load_index(entry).search(query, 5) == load_index(entry / "v0002").search(query, 5) != before
    assert rollback(entry, to="v0003") == ("v0002", "v0003")
    assert load_index(entry).search(query, 5) == before
    with pytest.raises(ArtifactError, match="no version 'v0009'"):
        rollback(entry, to="v0009")
    # keep=2 after a rollback to v0001: the newest two stay and so does CURRENT.
    rollback(entry, to="v0001")
    publish_index(tmp_path / "built1", registry, "sf", keep=2)
    assert list_versions(entry) == ["v0003", "v0004"]
    assert rollback(entry, to="v0003") == ("v0004", "v0003")
    with pytest.raises(ArtifactError, match="nothing to roll back to"):
        rollback(entry)
    rollback(entry, to="v0004")
    (entry / "v0003" / INDEX_FILE).write_bytes(b"corrupt")
    with pytest.raises(ArtifactError, match="checksum mismatch"):
        rollback(entry, to="v0003")
    assert resolve_published(entry).name == "v0004"  # a corrupt target never becomes CURRENT


def test_registry_entry_without_a_valid_current_is_refused(tmp_path: Path) -> None:
    entry = tmp_path / "registry" / "scifact"
    entry.mkdir(parents=True)
    with pytest.raises(ArtifactError, match="no CURRENT"):
        resolve_published(entry)
    (entry / CURRENT_FILE).write_text("v0007\n")
    with pytest.raises(ArtifactError, match="not a published version"):
        load_index(entry)
    with pytest.raises(ArtifactError, match="plain directory name"):
        publish_index(tmp_path / "any", tmp_path / "registry", "../escape")


def test_wrong_kind_artifact_is_refused(tmp_path: Path) -> None:
    with ArtifactWriter(tmp_path / "encoder", "dual-encoder", producer="test") as staged:
        (staged.path / INDEX_FILE).write_bytes(b"not an index")
    with pytest.raises(ArtifactError, match="kind 'dual-encoder', expected 'faiss-index'"):
        load_index(tmp_path / "encoder")
    with pytest.raises(ArtifactError, match="expected 'faiss-index'"):
        publish_index(tmp_path / "encoder", tmp_path / "registry", "scifact")


def test_corrupted_index_file_is_refused(tmp_path: Path) -> None:
    path = build_synthetic(tmp_path / "index", clustered_embeddings(20, 8, 2, seed=10))
    index_file = path / INDEX_FILE
    data = bytearray(index_file.read_bytes())
    data[-1] ^= 0xFF
    index_file.write_bytes(bytes(data))

    with pytest.raises(ArtifactError, match=f"checksum mismatch for {INDEX_FILE}"):
        load_index(path)
    with pytest.raises(ArtifactError, match="checksum mismatch"):
        publish_index(path, tmp_path / "registry", "scifact")
    assert list_versions(tmp_path / "registry" / "scifact") == []


@pytest.mark.skipif(gpu_count() > 0, reason="checks the no-GPU refusal")
def test_use_gpu_always_without_a_gpu_is_a_clear_error(tmp_path: Path) -> None:
    path = build_synthetic(tmp_path / "index", clustered_embeddings(20, 8, 2, seed=11))
    with pytest.raises(ConfigError, match="use_gpu='always' but FAISS sees no GPU"):
        load_index(path, IndexConfig(use_gpu="always"))
    assert not load_index(path, IndexConfig(use_gpu="auto")).on_gpu


@pytest.mark.gpu
@pytest.mark.skipif(gpu_count() == 0, reason="needs faiss-gpu and a CUDA device")
@pytest.mark.parametrize("index_type", ["flat", "ivf"])
def test_gpu_index_returns_the_cpu_results(index_type: str, tmp_path: Path) -> None:
    doc_embeddings = clustered_embeddings(2000, 32, clusters=20, seed=12)
    query_embeddings = clustered_embeddings(50, 32, clusters=20, seed=13)
    path = build_synthetic(tmp_path / index_type, doc_embeddings, index_type)
    on_cpu = load_index(path, IndexConfig(type=index_type, use_gpu="never"))
    on_gpu = load_index(path, IndexConfig(type=index_type, use_gpu="always"))
    assert on_gpu.on_gpu
    cpu_ids = [[doc for doc, _ in row] for row in on_cpu.search(query_embeddings, 10)]
    gpu_ids = [[doc for doc, _ in row] for row in on_gpu.search(query_embeddings, 10)]
    agreement = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(cpu_ids, gpu_ids, strict=True)])
    assert agreement >= 0.95


def test_the_doc_store_looks_up_by_id_and_must_match_the_index(tmp_path: Path) -> None:
    from indexing.doc_store import DOC_STORE_FILE, load_doc_store, write_doc_store

    embeddings = clustered_embeddings(3, 8, 1, seed=4)
    build_index_from_embeddings(embeddings, ["a", "b", "c"], tmp_path / "index", index_config=IndexConfig(),
                                embedding_space=SPACE, documents=(["A", "B", "C"], ["text a", "text b", "text c"]))
    store = load_index(tmp_path / "index").doc_store
    assert store is not None
    assert store.lookup(["c", "missing", "a", "c"]) == {"c": ("C", "text c"), "a": ("A", "text a")}
    assert store.lookup([f"id{n}" for n in range(2000)]) == {}  # more ids than one statement takes
    (tmp_path / "other").mkdir()
    write_doc_store(tmp_path / "other", ["a"], ["A"], ["text a"])
    with pytest.raises(ArtifactError, match="holds 1 documents but the index holds 3 rows"):
        load_doc_store(tmp_path / "other", 3)
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / DOC_STORE_FILE).write_bytes(b"not a database at all" * 10)
    with pytest.raises(ArtifactError, match="unreadable document store"):
        load_doc_store(tmp_path / "broken", 3)

"""Hybrid retrieval: the BM25 side of every index version, fusion, the three modes over a real gRPC
channel, and fusion tuning that never reads the eval split — on two BEIR-format datasets."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import grpc
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from evaluation.fusion_tuning import choose_fusion, tune_fusion
from indexing.build import build_index
from indexing.layout import FUSION_FILE
from indexing.load import load_index
from indexing.sparse import SPARSE_DIR
from serving.app import build_service
from serving.client import RetrievalClient
from serving.errors import RetrievalRpcError
from serving.fusion import fuse
from serving.onnx_export import run_export
from serving.proto.towerline.v1 import retrieval_pb2 as pb
from serving.proto.towerline.v1 import retrieval_pb2_grpc as pb_grpc
from serving.server import start_server
from towerline.bm25 import build_index as build_bm25
from towerline.config import FusionConfig, TowerlineConfig
from towerline.errors import ArtifactError
from towerline.towers import save_dual_encoder, towers_from_backbone
from training.run import init_dual_encoder


def write_second_dataset(root: Path) -> Path:
    """Another BEIR-format collection: no titles, graded qrels (0 = judged non-relevant), other ids."""
    words = ["river", "bank", "loan", "water", "stone", "bridge", "credit", "flood", "rate", "fish"]
    root.mkdir(parents=True)
    docs = [{"_id": f"doc-{i:03d}", "text": " ".join(words[(i + j) % 10] for j in range(i % 4 + 3))}
            for i in range(30)]
    (root / "corpus.jsonl").write_text("".join(json.dumps(doc) + "\n" for doc in docs))
    queries = [{"_id": f"Q{i}", "text": f"{words[i % 10]} {words[(i + 1) % 10]}"} for i in range(20)]
    (root / "queries.jsonl").write_text("".join(json.dumps(query) + "\n" for query in queries))
    (root / "qrels").mkdir()
    for split, ids in (("train", range(0, 14)), ("test", range(14, 20))):
        lines = ["query-id\tcorpus-id\tscore"]
        for i in ids:
            lines += [f"Q{i}\tdoc-{i:03d}\t2", f"Q{i}\tdoc-{(i + 10) % 30:03d}\t1", f"Q{i}\tdoc-{(i + 5) % 30:03d}\t0"]
        (root / "qrels" / f"{split}.tsv").write_text("\n".join(lines) + "\n")
    return root


@pytest.fixture(params=["synthetic", "second"])
def hybrid_setup(request: pytest.FixtureRequest, tiny_config: TowerlineConfig, tmp_path: Path,
                 ) -> tuple[TowerlineConfig, Path, Path, Path]:
    """(config, dual encoder, ONNX query encoder, index with a BM25 side) on one of two datasets."""
    config = tiny_config.model_copy(deep=True)
    if request.param == "second":
        config.data.dir = write_second_dataset(tmp_path / "second")
    init_dual_encoder(config, tmp_path / "encoder")
    run_export(config, tmp_path / "encoder", tmp_path / "onnx")
    build_index(config, tmp_path / "encoder", tmp_path / "index")
    return config, tmp_path / "encoder", tmp_path / "onnx", tmp_path / "index"


def test_the_bm25_side_lives_in_the_index_version_and_is_verified_with_it(
    hybrid_setup: tuple[TowerlineConfig, Path, Path, Path], tmp_path: Path
) -> None:
    config, _, _, index_dir = hybrid_setup
    manifest = json.loads((index_dir / "manifest.json").read_text())
    assert manifest["metadata"]["sparse"]["stemmer"] == "english"
    sparse_files = [name for name in manifest["files"] if name.startswith(f"{SPARSE_DIR}/")]
    assert f"{SPARSE_DIR}/manifest.json" in sparse_files and len(sparse_files) >= 4
    index = load_index(index_dir, config.index)
    assert index.sparse is not None and index.sparse.doc_ids == index.doc_ids

    # The same scores as bm25s over the same texts, tokenised the same way.
    from towerline.beir import load_dataset

    corpus = load_dataset(config.data).corpus
    direct = build_bm25(list(corpus), [doc.full_text for doc in corpus.values()], "english")
    query = next(iter(load_dataset(config.data).queries.values()))
    assert index.sparse.search([query], 10) == direct.search([query], 10)
    assert index.sparse.search(["the and of"], 10) == [[]]  # stop words only: no BM25 hit

    # Published as one version: the registry's CURRENT serves both sides.
    from indexing.publish import publish_index

    publish_index(index_dir, tmp_path / "registry", "corpus")
    published = load_index(tmp_path / "registry" / "corpus", config.index)
    assert published.published_version == "v0001" and published.sparse is not None
    assert published.sparse.search([query], 10) == index.sparse.search([query], 10)

    # A tampered BM25 file fails the version's checksums: the two sides are one version.
    tampered = tmp_path / "tampered"
    shutil.copytree(index_dir, tampered)
    data_file = next((tampered / SPARSE_DIR).glob("data.*.npy"))
    data_file.write_bytes(data_file.read_bytes()[:-4] + b"\0\0\0\0")
    with pytest.raises(ArtifactError, match="checksum mismatch"):
        load_index(tampered, config.index)


def test_three_modes_over_grpc_equal_in_process_and_say_which_side_found_each_hit(
    hybrid_setup: tuple[TowerlineConfig, Path, Path, Path],
) -> None:
    config, _, onnx_dir, index_dir = hybrid_setup
    service = build_service(config, index_dir, onnx_dir)
    server, port = start_server(service, config.serve.model_copy(update={"port": 0}))
    from towerline.beir import load_dataset

    query = next(iter(load_dataset(config.data).queries.values()))  # words of the corpus: both sides find
    try:
        with RetrievalClient(f"127.0.0.1:{port}") as client:
            info = client.info()
            assert (info.sparse, info.default_mode, info.fusion) == (True, "hybrid", "rrf k=60 depth=100")
            for mode in ("dense", "sparse", "hybrid"):
                remote = client.search_result(query, 8, mode)
                local = service.search(query, 8, mode=mode)
                assert remote.hits == local.hits and remote.mode == local.mode == mode
            default = client.search_result(query, 8)
            assert default.mode == "hybrid" and default.hits == service.search(query, 8, mode="hybrid").hits
            batch = client.batch_search_results([query, "zebra crossing"], 5, "sparse")
            assert [result.mode for result in batch] == ["sparse", "sparse"]
            # A request for a mode this server does not know (a newer client) is INVALID_ARGUMENT.
            stub = pb_grpc.RetrievalServiceStub(client._channel)
            with pytest.raises(grpc.RpcError) as raised:
                stub.Search(pb.SearchRequest(query=query, top_k=3, mode=7), timeout=5)
            assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert raised.value.details().startswith("mode")
    finally:
        server.stop(grace=1).wait()

    dense = {hit.doc_id: hit.score for hit in service.search(query, 100, mode="dense").hits}
    sparse = {hit.doc_id: hit.score for hit in service.search(query, 100, mode="sparse").hits}
    hybrid = service.search(query, 20, mode="hybrid").hits
    for hit in hybrid:
        assert hit.dense_score == dense.get(hit.doc_id) and hit.sparse_score == sparse.get(hit.doc_id)
        assert hit.found_by == tuple(side for side, found in (("dense", dense), ("sparse", sparse))
                                     if hit.doc_id in found)
    assert any(hit.found_by == ("dense", "sparse") for hit in hybrid)


def test_an_index_without_a_bm25_side_serves_dense_and_refuses_the_others(
    tiny_config: TowerlineConfig, tmp_path: Path
) -> None:
    config = tiny_config.model_copy(deep=True)
    config.index.sparse = False
    init_dual_encoder(config, tmp_path / "encoder")
    run_export(config, tmp_path / "encoder", tmp_path / "onnx")
    build_index(config, tmp_path / "encoder", tmp_path / "index")
    assert not (tmp_path / "index" / SPARSE_DIR).exists()
    service = build_service(config, tmp_path / "index", tmp_path / "onnx")
    server, port = start_server(service, config.serve.model_copy(update={"port": 0}))
    try:
        with RetrievalClient(f"127.0.0.1:{port}") as client:
            assert client.search_result("alpha", 3).mode == "dense"
            assert (client.info().sparse, client.info().default_mode) == (False, "dense")
            with pytest.raises(RetrievalRpcError) as raised:
                client.search("alpha", 3, mode="hybrid")
            assert raised.value.code == "INVALID_ARGUMENT" and "BM25" in str(raised.value)
    finally:
        server.stop(grace=1).wait()
    with pytest.raises(ArtifactError, match="no BM25 side"):
        tune_fusion(config, tmp_path / "index", tmp_path / "onnx")


def test_tune_fusion_chooses_on_held_out_train_queries_and_never_reads_the_eval_split(
    hybrid_setup: tuple[TowerlineConfig, Path, Path, Path], tmp_path: Path
) -> None:
    config, encoder_dir, onnx_dir, index_dir = hybrid_setup
    # The eval split is gone from a copy of the dataset: a tuner that read it would fail.
    blind = tmp_path / "without-test"
    shutil.copytree(config.data.dir, blind)
    (blind / "qrels" / "test.tsv").unlink()
    config = config.model_copy(deep=True)
    config.data.dir = blind
    from towerline.beir import load_dataset

    train = load_dataset(config.data, ["train"]).split("train")
    held_out = sorted(train)[:5]
    # A dual encoder that records its held-out dev queries, as `towerline train` does.
    query_tower, doc_tower = towers_from_backbone(config.encoder)
    save_dual_encoder(query_tower, doc_tower, tmp_path / "trained", producer="test", config=config,
                      metadata={"dev": {"query_ids": held_out}})
    before = load_index(index_dir, config.index)

    report = tune_fusion(config, index_dir, onnx_dir, dev_from=tmp_path / "trained")
    assert report["dev_queries"] == 5 and report["dev_source"].startswith("held out of training")
    assert len(report["grid"]) == 15
    # The default stays unless a candidate beat it on dev beyond chance (see test_choose_fusion_*).
    chosen = next(row for row in report["grid"] if row["fusion"] == report["chosen"])
    assert report["chosen"] == report["default"] or (chosen["significant"] and chosen["delta"] > 0)
    tuned = load_index(index_dir, config.index)  # re-sealed in place: verified, a new version
    assert tuned.tuned_fusion is not None and tuned.version != before.version
    assert tuned.manifest.metadata["fusion"]["chosen"] == report["chosen"]
    assert json.loads((index_dir / FUSION_FILE).read_text())["method"] in ("rrf", "convex")
    assert build_service(config, index_dir, onnx_dir).info().fusion == report["chosen"]

    # Without held-out queries in the encoder: a seeded sample of train queries, said so.
    fallback = tune_fusion(config, index_dir, onnx_dir, tmp_path / "elsewhere", dev_from=encoder_dir)
    assert "not held out" in fallback["dev_source"]
    assert fallback["dev_queries"] == min(config.fusion.dev_queries, len(train))


def _candidates(scores: dict[str, list[float]]) -> list[dict[str, object]]:
    return [{"fusion": name, "ndcg@10": float(np.mean(values)), "scores": np.array(values)}
            for name, values in scores.items()]


def test_choose_fusion_keeps_the_default_against_a_lead_within_chance() -> None:
    rng = np.random.default_rng(0)
    default = rng.uniform(0.3, 0.9, 100)
    # Higher on average, but by less than the per-query noise: no reason to leave the default.
    noisy = np.clip(default + 0.03 + rng.normal(0, 0.25, 100), 0, 1)
    candidates = _candidates({"rrf": list(default), "convex": list(noisy)})
    assert candidates[1]["ndcg@10"] > candidates[0]["ndcg@10"]
    chosen, tests = choose_fusion(candidates, "rrf", FusionConfig())
    assert chosen["fusion"] == "rrf" and not tests["convex"]["significant"]
    # "best" takes the highest dev mean, however small its lead.
    assert choose_fusion(candidates, "rrf", FusionConfig(selection="best"))[0]["fusion"] == "convex"


def test_choose_fusion_takes_the_best_of_the_candidates_that_beat_the_default_beyond_chance() -> None:
    rng = np.random.default_rng(1)
    default = rng.uniform(0.3, 0.7, 100)
    candidates = _candidates({
        "rrf": list(default),
        "steady": list(default + 0.1),  # better on every query
        "steadier": list(default + 0.2),  # better still: the one chosen
        "worse": list(default - 0.2),  # significant, but the wrong way
        "lucky": list(default + np.where(np.arange(100) == 0, 30.0, -0.01)),  # highest mean, one query
    })
    chosen, tests = choose_fusion(candidates, "rrf", FusionConfig())
    assert chosen["fusion"] == "steadier"
    assert tests["steady"]["significant"] and tests["worse"]["significant"] and not tests["lucky"]["significant"]
    assert "rrf" not in tests


def test_rrf_and_convex_fusion_by_hand() -> None:
    dense = [("a", 0.9), ("b", 0.8), ("c", 0.1)]
    sparse = [("c", 12.0), ("d", 6.0)]
    rrf = fuse(dense, sparse, FusionConfig(method="rrf", rrf_k=1), 4)
    assert [hit.doc_id for hit in rrf] == ["c", "a", "b", "d"]  # c: 1/4 + 1/2 beats a: 1/2
    assert rrf[0].score == pytest.approx(1 / 4 + 1 / 2, rel=1e-6)
    assert (rrf[0].dense_score, rrf[0].sparse_score) == (pytest.approx(0.1), 12.0)
    assert rrf[1].sparse_score is None and rrf[3].dense_score is None
    only_dense = fuse(dense, sparse, FusionConfig(method="convex", dense_weight=1.0), 2)
    assert [hit.doc_id for hit in only_dense] == ["a", "b"]
    # Min-max puts each list's last at 0, level with documents that side did not find.
    only_sparse = fuse(dense, [*sparse, ("e", 1.0)], FusionConfig(method="convex", dense_weight=0.0), 2)
    assert [hit.doc_id for hit in only_sparse] == ["c", "d"]
    halfway = fuse(dense, sparse, FusionConfig(method="convex", dense_weight=0.5), 1)[0]
    # a: 0.5 * 1 + 0.5 * 0 and c: 0.5 * 0 + 0.5 * 1 tie; the smaller doc id goes first.
    assert (halfway.doc_id, halfway.score) == ("a", pytest.approx(0.5))
    # Each side is cut to the depth before fusing: c is past the dense cut, so only BM25 found it.
    shallow = {hit.doc_id: hit for hit in fuse(dense, sparse, FusionConfig(depth=2), 2)}
    assert shallow["c"].dense_score is None and shallow["c"].sparse_score == 12.0


ranked_lists = st.lists(st.tuples(st.sampled_from("abcdefghij"), st.floats(-5, 50)), max_size=10,
                        unique_by=lambda hit: hit[0]).map(lambda hits: sorted(hits, key=lambda hit: -hit[1]))


@settings(max_examples=150, deadline=None)
@given(ranked_lists, ranked_lists, st.sampled_from(["rrf", "convex"]), st.integers(1, 12), st.integers(1, 12))
def test_fused_lists_are_the_sorted_union_without_repeats(
    dense: list[tuple[str, float]], sparse: list[tuple[str, float]], method: str, depth: int, top_k: int
) -> None:
    settings_ = FusionConfig(method=method, depth=depth)
    hits = fuse(dense, sparse, settings_, top_k)
    pool = {doc_id for doc_id, _ in dense[: max(depth, top_k)]} | {doc_id for doc_id, _ in sparse[: max(depth, top_k)]}
    assert len(hits) == min(top_k, len(pool)) and len({hit.doc_id for hit in hits}) == len(hits)
    assert {hit.doc_id for hit in hits} <= pool
    assert [hit.score for hit in hits] == sorted((hit.score for hit in hits), reverse=True)
    assert all(hit.found_by for hit in hits)

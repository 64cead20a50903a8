"""Scale-out of the index: `towerline index shard` splits an index into shard artifacts, and the
sharded client over one `towerline serve` per shard answers as one service over the whole index."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from contextlib import ExitStack
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from indexing.build import build_index
from indexing.load import LoadedIndex, load_index
from indexing.shard import shard_index, shard_of
from serving.client import RetrievalClient
from serving.onnx_export import run_export
from serving.results import Hit
from serving.sharded_client import ShardedRetrievalClient, ShardError, merge_hits
from towerline.beir import load_dataset
from towerline.cli import app
from towerline.config import TowerlineConfig
from towerline.errors import ConfigError, DataError
from training.run import init_dual_encoder

SHARDS = 2


@pytest.fixture()
def encoder(tiny_config: TowerlineConfig, tmp_path: Path) -> Path:
    init_dual_encoder(tiny_config, tmp_path / "encoder")
    return tmp_path / "encoder"


def _index(config: TowerlineConfig, encoder: Path, out: Path, **index: object) -> Path:
    built = config.model_copy(deep=True)
    built.index = built.index.model_copy(update=index)
    build_index(built, encoder, out)
    return out


def _merged(shards: list[LoadedIndex], queries: np.ndarray, k: int) -> list[list[Hit]]:
    per_shard = [shard.search(queries, k) for shard in shards]
    return [merge_hits([[Hit(doc_id, score) for doc_id, score in found[row]] for found in per_shard], k)
            for row in range(len(queries))]


def _assert_same_hits(actual: list[Hit], expected: list[Hit] | list[tuple[str, float]]) -> None:
    assert [hit[0] for hit in actual] == [hit[0] for hit in expected]
    assert np.allclose([hit[1] for hit in actual], [hit[1] for hit in expected], rtol=0, atol=1e-5)


def test_shards_are_disjoint_verified_indexes_of_the_source_space(tiny_config: TowerlineConfig, encoder: Path,
                                                                   tmp_path: Path) -> None:
    source = load_index(_index(tiny_config, encoder, tmp_path / "index"))
    outcome = CliRunner().invoke(app, ["index", "shard", str(source.path), "--shards", str(SHARDS),
                                       "--out", str(tmp_path / "shards"), f"run_dir={tmp_path / 'runs'}"])
    assert outcome.exit_code == 0, outcome.output
    assert sorted(path.name for path in (tmp_path / "shards").iterdir()) == ["shard-0", "shard-1"]
    shards = [load_index(tmp_path / "shards" / f"shard-{number}") for number in range(SHARDS)]  # verified
    owned = [set(filter(None, shard.doc_ids)) for shard in shards]
    assert owned[0].isdisjoint(owned[1]) and owned[0] | owned[1] == set(filter(None, source.doc_ids))
    assert all(owned), "both shards hold documents"
    for number, (shard, docs) in enumerate(zip(shards, owned, strict=True)):
        assert shard.embedding_space == source.embedding_space and shard.size == len(docs)
        assert all(shard_of(doc_id, SHARDS) == number for doc_id in docs)
        # Labels stay the source's: the same label names the same document.
        assert all(doc_id in (None, source.doc_ids[label]) for label, doc_id in enumerate(shard.doc_ids))
        assert shard.sparse is None and shard.tuned_fusion is None
        assert shard.doc_store is not None and shard.doc_store.count == len(docs)
        assert shard.doc_store.lookup(sorted(docs)) == source.doc_store.lookup(sorted(docs))
        described = shard.manifest.metadata["shard"]
        assert (described["index"], described["count"]) == (number, SHARDS)
        assert described["source_fingerprint"] == source.manifest.fingerprint and "sparse" in described["left_out"]
        assert shard.manifest.inputs["source"] == source.manifest.fingerprint


@pytest.mark.parametrize("structure", [{"type": "flat"}, {"type": "ivf", "ivf_nprobe": 1}, {"type": "hnsw"}],
                         ids=["flat", "ivf-probing-1-of-2-lists", "hnsw"])
def test_merged_shards_give_the_sources_top_k(tiny_config: TowerlineConfig, encoder: Path, tmp_path: Path,
                                               structure: dict[str, object]) -> None:
    source_dir = _index(tiny_config, encoder, tmp_path / "index", sparse=False, **structure)
    source = load_index(source_dir)
    if structure["type"] == "ivf":
        # Probing one list of two is approximate: only shards that kept the source's centroids and
        # stored knob probe the same lists, and so find the same candidates.
        assert source.search_knobs["ivf_nlist"] == 2 and source.search_knobs["ivf_nprobe"] == 1
    shard_index(tiny_config, source_dir, SHARDS, tmp_path / "shards")
    shards = [load_index(tmp_path / "shards" / f"shard-{number}") for number in range(SHARDS)]
    assert all(shard.search_knobs == source.search_knobs for shard in shards)
    queries = np.random.default_rng(0).standard_normal((12, source.dim)).astype(np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    for k in (1, 5, 20, source.size):
        for merged, whole in zip(_merged(shards, queries, k), source.search(queries, k), strict=True):
            _assert_same_hits(merged, whole)


def test_bad_splits_are_refused_before_anything_is_written(tiny_config: TowerlineConfig, encoder: Path,
                                                           tmp_path: Path) -> None:
    source = _index(tiny_config, encoder, tmp_path / "index", sparse=False)
    with pytest.raises(ConfigError, match="at least 2 shards"):
        shard_index(tiny_config, source, 1, tmp_path / "one")
    with pytest.raises(ConfigError, match="holds only 80 documents"):
        shard_index(tiny_config, source, 81, tmp_path / "many")
    with pytest.raises(DataError, match=r"shard \d+ would hold none of the 80 documents"):
        shard_index(tiny_config, source, 80, tmp_path / "sparse-split")
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "keep.txt").write_text("someone's file")
    with pytest.raises(ConfigError, match="exists and is not empty"):
        shard_index(tiny_config, source, SHARDS, tmp_path / "taken")
    assert not any(path.exists() for path in (tmp_path / "one", tmp_path / "many", tmp_path / "sparse-split"))
    assert [path.name for path in tmp_path.iterdir() if path.name.startswith(".")] == []


def test_merge_orders_by_score_then_doc_id_and_refuses_overlapping_shards() -> None:
    merged = merge_hits([[Hit("b", 0.9), Hit("d", 0.5)], [Hit("a", 0.9), Hit("c", 0.7)]], 3)
    assert merged == [Hit("a", 0.9), Hit("b", 0.9), Hit("c", 0.7)]
    with pytest.raises(ConfigError, match="came from shard 0 and from shard 1"):
        merge_hits([[Hit("a", 0.9)], [Hit("a", 0.9)]], 1)


def _start(stack: ExitStack, index: Path, onnx: Path) -> subprocess.Popen[str]:
    """`towerline serve` in a process of its own on a free loopback port; SIGTERM when `stack` closes."""
    server = subprocess.Popen(
        [sys.executable, "-m", "towerline", "serve", "--index", str(index), "--onnx", str(onnx),
         "serve.host=127.0.0.1", "serve.port=0", "serve.reload_interval_s=0", "serve.shutdown_grace_s=1"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**os.environ, "COLUMNS": "200"})
    stack.callback(_stop, server)
    return server


def _stop(server: subprocess.Popen[str]) -> None:
    if server.poll() is None:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def _address(server: subprocess.Popen[str]) -> str:
    """Where the server listens, from its start-up line."""
    assert server.stdout is not None
    output = []
    for line in server.stdout:
        output.append(line)
        if found := re.search(r"RetrievalService on 127\.0\.0\.1:(\d+)", line):
            return f"127.0.0.1:{found.group(1)}"
    pytest.fail("the server stopped before serving:\n" + "".join(output))


def test_two_served_shards_answer_as_one_service_over_the_whole_index(
    tiny_config: TowerlineConfig, encoder: Path, tiny_dataset: Path, tmp_path: Path
) -> None:
    run_export(tiny_config, encoder, tmp_path / "onnx")
    whole = _index(tiny_config, encoder, tmp_path / "index")  # with its BM25 side, which shards leave out
    shard_index(tiny_config, whole, SHARDS, tmp_path / "shards")
    dataset = load_dataset(tiny_config.data)
    queries = [dataset.queries[query_id] for query_id in sorted(dataset.queries)[:6]]
    with ExitStack() as stack:
        # All three start side by side; most of a start is imports.
        servers = [_start(stack, path, tmp_path / "onnx")
                   for path in (whole, *(tmp_path / "shards" / f"shard-{n}" for n in range(SHARDS)))]
        reference, *shard_addresses = [_address(server) for server in servers]
        one = stack.enter_context(RetrievalClient(reference, timeout_s=30))
        sharded = stack.enter_context(ShardedRetrievalClient(shard_addresses, timeout_s=30))
        infos = sharded.infos()
        assert [info.count for info in infos] == [load_index(tmp_path / "shards" / f"shard-{n}").size
                                                  for n in range(SHARDS)]
        assert sum(info.count for info in infos) == one.info().count == 80
        assert {info.embedding_space for info in infos} == {one.info().embedding_space}

        for k in (1, 3, 10, 80):
            for query in queries:
                result = sharded.search_result(query, k)
                assert result.missing_shards == () and all(result.shard_versions)
                _assert_same_hits(result.hits, one.search(query, k, mode="dense"))
            for merged, expected in zip(sharded.batch_search(queries, k), one.batch_search(queries, k, mode="dense"),
                                        strict=True):
                _assert_same_hits(merged, expected)
        with_documents = sharded.search(queries[0], 5, include_documents=True)
        assert [(hit.doc_id, hit.title) for hit in with_documents] == [
            (hit.doc_id, hit.title) for hit in one.search(queries[0], 5, mode="dense", include_documents=True)]

        with ShardedRetrievalClient([shard_addresses[0]] * SHARDS) as doubled:
            with pytest.raises(ConfigError, match="same index version"):
                doubled.infos()
            with pytest.raises(ConfigError, match="came from shard 0 and from shard 1"):
                doubled.search(queries[0], 3)

        # A shard goes down: an error naming it, never a silently partial top-k...
        servers[2].kill()
        servers[2].wait()
        with pytest.raises(ShardError, match=re.escape(f"shard 1 ({shard_addresses[1]}) UNAVAILABLE")) as failed:
            sharded.search(queries[0], 10)
        assert failed.value.code == "UNAVAILABLE" and list(failed.value.failures) == [shard_addresses[1]]
        assert "no partial results" in str(failed.value)
        # ...unless the caller opts in, and then each result names the missing shard.
        with ShardedRetrievalClient(shard_addresses, timeout_s=30, allow_partial=True) as partial:
            result = partial.search_result(queries[0], 10)
        assert result.missing_shards == (shard_addresses[1],) and result.shard_versions[1] == ""
        first_shard = [hit for hit in one.search(queries[0], 80, mode="dense") if shard_of(hit.doc_id, SHARDS) == 0]
        _assert_same_hits(result.hits, first_shard[:10])

"""Hot reload over a real channel: a new version swapped in under load with no failed call; corrupt
and incompatible versions refused while the old one keeps serving; NOT_SERVING until a first publish."""

from __future__ import annotations

import shutil
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from waiting import wait_until

from indexing.build import build_index
from indexing.publish import _write_current, publish_index
from serving.app import build_service
from serving.client import RetrievalClient
from serving.errors import RetrievalRpcError
from serving.onnx_export import run_export
from serving.reload import Reloader
from serving.server import serve_forever
from towerline.config import TowerlineConfig
from training.run import init_dual_encoder


@pytest.fixture()
def setup(tiny_config: TowerlineConfig, tmp_path: Path) -> tuple[TowerlineConfig, Path]:
    config = tiny_config.model_copy(deep=True)
    config.serve = config.serve.model_copy(update={"port": 0, "reload_interval_s": 0.2})
    init_dual_encoder(config, tmp_path / "encoder")
    run_export(config, tmp_path / "encoder", tmp_path / "onnx")
    return config, tmp_path


@contextmanager
def serving(config: TowerlineConfig, entry: Path, onnx: Path, reloader: Reloader) -> Iterator[str]:
    stop, ready, ports = threading.Event(), threading.Event(), []
    service = reloader_service(config, entry, onnx)
    thread = threading.Thread(target=serve_forever, args=(service, config.serve),
                              kwargs={"stop": stop, "reloader": reloader, "grace_s": 1.0,
                                      "on_started": lambda port: (ports.append(port), ready.set())})
    thread.start()
    try:
        assert ready.wait(timeout=10)
        yield f"127.0.0.1:{ports[0]}"
    finally:
        stop.set()
        thread.join(timeout=15)


def reloader_service(config: TowerlineConfig, entry: Path, onnx: Path):
    return build_service(config, entry, onnx) if (entry / "CURRENT").is_file() else None


def test_a_new_version_swaps_in_under_load_and_bad_ones_are_refused(setup: tuple[TowerlineConfig, Path]) -> None:
    config, root = setup
    build_index(config, root / "encoder", root / "index-a")
    hnsw = config.model_copy(deep=True)
    hnsw.index.type = "hnsw"
    build_index(hnsw, root / "encoder", root / "index-b")
    ivf = config.model_copy(deep=True)
    ivf.index.type = "ivf"
    build_index(ivf, root / "encoder", root / "index-c")
    entry = root / "registry" / "corpus"
    publish_index(root / "index-a", root / "registry", "corpus")
    reloader = Reloader(config, entry, root / "onnx", serving=reloader_service(config, entry, root / "onnx"))

    failures: list[str] = []
    versions: list[str] = []
    stop_load = threading.Event()

    def load(address: str) -> None:
        with RetrievalClient(address, timeout_s=5) as client:
            while not stop_load.is_set():
                try:
                    versions.append(client.search_result("alpha beta", 3).index_version)
                except RetrievalRpcError as error:
                    failures.append(str(error))

    with serving(config, entry, root / "onnx", reloader) as address:
        worker = threading.Thread(target=load, args=(address,))
        worker.start()
        try:
            assert wait_until(lambda: versions and versions[-1] == "v0001")
            publish_index(root / "index-b", root / "registry", "corpus")
            assert wait_until(lambda: versions[-1] == "v0002"), "the new version was never served"

            # A corrupt version: CURRENT names a new version whose index file was damaged after sealing.
            shutil.copytree(root / "index-c", entry / "v0003")
            (entry / "v0003" / "index.faiss").write_bytes(b"not a faiss index")
            _write_current(entry, "v0003")
            assert wait_until(lambda: reloader.refused is not None)
            assert "checksum mismatch for index.faiss" in reloader.last_refusal
            seen = len(versions)
            assert wait_until(lambda: len(versions) > seen + 5)
            assert set(versions[seen:]) == {"v0002"}

            # An incompatible one: built by another dual encoder (another embedding space).
            other = config.model_copy(deep=True)
            other.encoder.pooling = "cls"
            init_dual_encoder(other, root / "other-encoder")
            build_index(other, root / "other-encoder", root / "index-other")
            refused_before = reloader.refused
            publish_index(root / "index-other", root / "registry", "corpus")
            assert wait_until(lambda: reloader.refused not in (None, refused_before))
            assert "embedding space mismatch" in reloader.last_refusal
            assert reloader.check() == "unchanged (refused before)"
            seen = len(versions)
            assert wait_until(lambda: len(versions) > seen + 5)
            assert set(versions[seen:]) == {"v0002"}
            with RetrievalClient(address) as client:
                assert client.info().index_version == "v0002" and client.health() == "SERVING"
        finally:
            stop_load.set()
            worker.join(timeout=10)
    assert failures == [], failures[:3]
    assert versions.index("v0002") > 0  # v0001 answered first, then v0002 without a gap in between


def test_a_server_started_before_any_publish_is_not_serving_until_the_first(
    setup: tuple[TowerlineConfig, Path],
) -> None:
    config, root = setup
    build_index(config, root / "encoder", root / "index-a")
    entry = root / "registry" / "corpus"
    reloader = Reloader(config, entry, root / "onnx")
    assert reloader.check() == "nothing published yet"
    with serving(config, entry, root / "onnx", reloader) as address, RetrievalClient(address) as client:
        assert client.health() == "NOT_SERVING"
        with pytest.raises(RetrievalRpcError) as raised:
            client.search("alpha", 3)
        assert raised.value.code == "UNAVAILABLE"
        publish_index(root / "index-a", root / "registry", "corpus")
        client.wait_ready(timeout=10)
        assert client.search_result("alpha", 3).index_version == "v0001"
        # The same content published again under a new name: what the service reports follows CURRENT.
        publish_index(root / "index-a", root / "registry", "corpus")
        assert wait_until(lambda: client.search_result("alpha", 3).index_version == "v0002")
        assert client.info().index_version == "v0002"

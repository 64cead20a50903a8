"""The model registry on a real MLflow (sqlite, and a real `mlflow server` on loopback): registration
with lineage, `promote` both ways, and serving the `@champion` with its index over a real gRPC channel."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import mlflow
import pytest
from typer.testing import CliRunner

from evaluation.registry import parse_model_uri, registered_serving_artifacts
from serving.app import build_service
from serving.client import RetrievalClient
from serving.server import start_server
from towerline.artifacts import read_manifest
from towerline.cli import app
from towerline.config import load_config
from towerline.errors import ConfigError

runner = CliRunner()
MODEL = "towerline-query-encoder"


def _exported(overrides: list[str], tmp_path: Path, name: str, pooling: str) -> None:
    """A zero-shot dual encoder with `pooling`, exported and indexed through the CLI (both register)."""
    if not (tmp_path / f"encoder-{pooling}").exists():
        made = runner.invoke(app, ["train", "--zero-shot", "--out", str(tmp_path / f"encoder-{pooling}"), *overrides,
                                   f"encoder.pooling={pooling}"])
        assert made.exit_code == 0, made.output
        built = runner.invoke(app, ["index", "build", "--encoder", str(tmp_path / f"encoder-{pooling}"),
                                    "--out", str(tmp_path / f"index-{pooling}"), *overrides,
                                    f"encoder.pooling={pooling}"])
        assert built.exit_code == 0, built.output
    exported = runner.invoke(app, ["export", "--encoder", str(tmp_path / f"encoder-{pooling}"), "--out",
                                   str(tmp_path / name), *overrides, f"encoder.pooling={pooling}"])
    assert exported.exit_code == 0, exported.output


def _promote(overrides: list[str], tmp_path: Path, name: str) -> tuple[int, str]:
    result = runner.invoke(app, ["promote", "--permutations", "500", "--out", str(tmp_path / name), *overrides])
    return result.exit_code, " ".join(result.output.split())


@pytest.fixture()
def mlflow_server(tmp_path: Path, free_tcp_port: int) -> Iterator[str]:
    """A real `mlflow server` process on loopback: sqlite backend, artifacts proxied by the server."""
    command = [str(Path(sys.executable).parent / "mlflow"), "server", "--host", "127.0.0.1",
               "--port", str(free_tcp_port), "--workers", "1",
               "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
               "--artifacts-destination", str(tmp_path / "server-artifacts")]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    uri = f"http://127.0.0.1:{free_tcp_port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"{uri}/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            assert process.poll() is None, "mlflow server exited"
            assert time.monotonic() < deadline, "mlflow server did not come up"
            time.sleep(0.5)
        yield uri
    finally:
        process.terminate()
        process.wait(timeout=30)


@pytest.mark.parametrize("backend", ["sqlite", "server"])
def test_promote_needs_a_significant_win_and_serving_follows_the_champion(
        backend: str, tiny_overrides: list[str], tmp_path: Path, request: pytest.FixtureRequest) -> None:
    if backend == "server":
        uri = request.getfixturevalue("mlflow_server")
        tiny_overrides = [o for o in tiny_overrides if not o.startswith("tracking.uri=")] + [f"tracking.uri={uri}"]
    tiny_config = load_config(None, tiny_overrides)
    client = mlflow.MlflowClient(tiny_config.tracking.uri)
    # CLS pooling of a randomly initialised tower carries little of the text: the weak first champion.
    _exported(tiny_overrides, tmp_path, "onnx-cls", "cls")
    code, output = _promote(tiny_overrides, tmp_path, "promote-1")
    assert code == 0 and "no champion yet" in output
    assert str(client.get_model_version_by_alias(MODEL, "champion").version) == "1"

    # The same encoder again: no difference, refused; the champion stays.
    _exported(tiny_overrides, tmp_path, "onnx-cls-again", "cls")
    code, output = _promote(tiny_overrides, tmp_path, "promote-2")
    assert code == 1 and "refused" in output and "not significantly better" in output
    assert str(client.get_model_version_by_alias(MODEL, "champion").version) == "1"
    assert client.get_model_version(MODEL, "2").tags["promotion.decision"] == "refused"

    # Mean pooling (in its own embedding space, with its own index) retrieves far better: promoted.
    _exported(tiny_overrides, tmp_path, "onnx-mean", "mean")
    code, output = _promote(tiny_overrides, tmp_path, "promote-3")
    assert code == 0, output
    assert "promoted to champion (was v1)" in output and "significantly better" in output
    champion = client.get_model_version_by_alias(MODEL, "champion")
    assert str(champion.version) == "3" and champion.tags["promotion.previous_champion"] == "1"
    record = json.loads((tmp_path / "promote-3" / "promotion.json").read_text())
    assert record["decision"] == "promoted" and record["dataset_fingerprint"]
    comparison = json.loads((tmp_path / "promote-3" / "compare" / "comparison.json").read_text())
    assert comparison["comparisons"]["challenger v3"]["ndcg@10"]["significant"]

    # Lineage: the index names the dual encoder it was built from, the encoder the same one.
    encoder_fingerprint = read_manifest(tmp_path / "encoder-mean", "dual-encoder").fingerprint
    indexes = {v.tags["embedding_space"]: v for v in client.search_model_versions("name='towerline-index'")}
    index_version = indexes[champion.tags["embedding_space"]]
    assert index_version.tags["lineage.encoder"] == encoder_fingerprint
    assert champion.tags["lineage.encoder"] == encoder_fingerprint
    assert index_version.tags["dataset_fingerprint"] == record["dataset_fingerprint"]
    towers = {v.tags["fingerprint"]: v for v in client.search_model_versions("name='towerline-dual-encoder'")}
    assert encoder_fingerprint in towers and len(towers) == 2  # the cls and the mean towers
    assert towers[encoder_fingerprint].tags["embedding_space"] == champion.tags["embedding_space"]

    # A forced promotion moves the alias back and says so.
    forced = runner.invoke(app, ["promote", "--challenger", "2", "--force", "--permutations", "200", "--out",
                                 str(tmp_path / "promote-4"), *tiny_overrides])
    assert forced.exit_code == 0 and "forced" in forced.output
    assert client.get_model_version(MODEL, "2").tags["promotion.decision"] == "forced"
    mlflow.MlflowClient(tiny_config.tracking.uri).set_registered_model_alias(MODEL, "champion", "3")

    # Serving `models:/...@champion` picks the champion's ONNX encoder and the index of its space.
    onnx_dir, index_dir, _ = registered_serving_artifacts(tiny_config, f"models:/{MODEL}@champion", None)
    assert read_manifest(index_dir, "faiss-index").fingerprint == read_manifest(
        tmp_path / "index-mean", "faiss-index").fingerprint
    assert read_manifest(onnx_dir, "onnx-query-encoder").fingerprint == read_manifest(
        tmp_path / "onnx-mean", "onnx-query-encoder").fingerprint
    # `towerline eval` takes the alias too, and scores what the champion's artifacts score.
    by_alias = runner.invoke(app, ["eval", "--encoder", f"models:/{MODEL}@champion", "--mode", "dense", "--out",
                                   str(tmp_path / "eval-alias"), *tiny_overrides])
    by_path = runner.invoke(app, ["eval", "--encoder", str(tmp_path / "onnx-mean"), "--index",
                                  str(tmp_path / "index-mean"), "--mode", "dense", "--out",
                                  str(tmp_path / "eval-path"), *tiny_overrides])
    assert by_alias.exit_code == 0 and by_path.exit_code == 0, by_alias.output + by_path.output
    assert ((tmp_path / "eval-alias" / "metrics.json").read_text()
            == (tmp_path / "eval-path" / "metrics.json").read_text())
    server, port = start_server(build_service(tiny_config, index_dir, onnx_dir),
                                tiny_config.serve.model_copy(update={"port": 0}))
    try:
        with RetrievalClient(f"127.0.0.1:{port}") as grpc_client:
            assert grpc_client.info().embedding_space == champion.tags["embedding_space"]
            assert len(grpc_client.search("alpha beta", 3)) == 3
    finally:
        server.stop(grace=1).wait()


def test_model_uris_are_checked() -> None:
    assert parse_model_uri("models:/enc@champion") == ("enc", "champion", None)
    assert parse_model_uri("models:/enc/12") == ("enc", None, "12")
    for bad in ("runs:/x", "models:/enc", "models:/enc/latest", "models:/@champion"):
        with pytest.raises(ConfigError, match="expected models:/NAME@ALIAS"):
            parse_model_uri(bad)

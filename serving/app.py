"""Wiring for `towerline serve` and the demo: artifacts on disk → a ready `RetrievalService`."""

from __future__ import annotations

from pathlib import Path

from indexing.load import load_index
from serving.onnx_format import ONNX_KIND
from serving.query_encoder import QueryEncoder
from serving.server import serve_forever
from serving.service import RetrievalService
from serving.servicer import RecommendBackend
from towerline.artifacts import read_manifest
from towerline.config import ServeConfig, TowerlineConfig
from towerline.progress import console, status
from towerline.tower_spec import QUERY_TOWER_KINDS


def load_query_encoder(path: Path, serve: ServeConfig) -> QueryEncoder:
    """An ONNX export serves through ONNX Runtime; a dual encoder or a distilled student through its
    PyTorch query tower."""
    manifest = read_manifest(path, (ONNX_KIND, *QUERY_TOWER_KINDS))
    if manifest.kind == ONNX_KIND:
        from serving.onnx_encoder import OnnxQueryEncoder

        return OnnxQueryEncoder(path, intra_op_threads=serve.intra_op_threads)
    from serving.torch_encoder import TorchQueryEncoder

    return TorchQueryEncoder.from_dual_encoder(path, threads=serve.intra_op_threads)


def build_service(config: TowerlineConfig, index_path: Path, encoder_path: Path) -> RetrievalService:
    """Load the index (a registry entry follows CURRENT) and the query encoder; refuse a mismatched pair."""
    index = load_index(index_path, config.index)
    return RetrievalService(load_query_encoder(encoder_path, config.serve), index, config.serve, config.fusion)


def load_recommender(config: TowerlineConfig, root: Path) -> RecommendBackend:
    """Recommend's pipeline from the rec artifacts under `root` (imports the torch models only here)."""
    from personalization.recommender import Recommender, RecommenderPaths

    return Recommender(RecommenderPaths.under(root), config.index, threads=config.serve.intra_op_threads,
                       state=config.serve.recommend_state, reclora_top_n=config.rec.reclora.rerank_top_n)


def serve_until_stopped(config: TowerlineConfig, index_path: Path, encoder_path: Path,
                        recommender_root: Path | None = None) -> None:
    from serving.access_log import configure_service_logging
    from serving.reload import Reloader

    configure_service_logging(config.serve.log_format, config.serve.access_log)
    recommender = None
    if recommender_root is not None:
        with status(f"loading the recommender from {recommender_root}"):
            recommender = load_recommender(config, recommender_root)
    reloading = config.serve.reload_interval_s > 0
    service = None
    if reloading and _nothing_published(index_path):
        console.print(f"[yellow]no index at {index_path} yet: NOT_SERVING until one is published there "
                      f"(looked for every {config.serve.reload_interval_s:g} s)")
    else:
        with status(f"loading {index_path} and {encoder_path}"):
            service = build_service(config, index_path, encoder_path)
        info = service.info()
        console.print(
            f"index [bold]{info.index_version}[/] ({info.index_type}, {info.count} docs, dim {info.dim}"
            f"{', + BM25' if info.sparse else ''}), encoder [bold]{info.encoder_name}[/], default mode "
            f"{info.default_mode}"
        )
    reloader = Reloader(config, index_path, encoder_path, serving=service) if reloading else None

    def announce(port: int) -> None:
        console.print(f"serving towerline.v1.RetrievalService on [bold]{config.serve.host}:{port}[/]; Ctrl-C stops"
                      + ("; SIGHUP reloads" if reloading else ""))

    serve_forever(service, config.serve, on_started=announce, recommender=recommender, reloader=reloader)


def _nothing_published(index_path: Path) -> bool:
    """A registry entry without CURRENT yet, or a path where no artifact exists yet."""
    from indexing.publish import is_registry_entry
    from towerline.artifacts import MANIFEST_NAME

    return not is_registry_entry(index_path) and not (Path(index_path) / MANIFEST_NAME).is_file()

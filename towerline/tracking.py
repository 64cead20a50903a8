"""MLflow tracking for every command that trains, builds or evaluates.

Embedded default: a sqlite backend `mlflow.db` and artifacts under `mlartifacts/` in the
working directory. `MLFLOW_TRACKING_URI` (or `tracking.uri`) points at a server instead.
"""

from __future__ import annotations

import functools
import logging
import os
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from towerline.artifacts import Manifest
from towerline.config import TowerlineConfig
from towerline.progress import console

DEFAULT_URI = "sqlite:///mlflow.db"
DEFAULT_ARTIFACT_ROOT = "mlartifacts"
# Registry aliases: every new version becomes the challenger; `towerline promote` moves the champion.
CHAMPION_ALIAS = "champion"
CHALLENGER_ALIAS = "challenger"
# On versions registered by reference: the artifact directory's file URI.
LOCATION_TAG = "location"


class Tracker:
    """A thin handle over the active run; a disabled tracker makes every call a no-op."""

    def __init__(self, mlflow_module: Any | None) -> None:
        self._mlflow = mlflow_module

    @property
    def run_id(self) -> str | None:
        if self._mlflow is None:
            return None
        return self._mlflow.active_run().info.run_id

    def metrics(self, values: dict[str, float], step: int | None = None) -> None:
        if self._mlflow is not None:
            self._mlflow.log_metrics({metric_name(k): float(v) for k, v in values.items()}, step=step)

    def params(self, values: dict[str, Any]) -> None:
        if self._mlflow is not None:
            self._mlflow.log_params({k: _param_text(v) for k, v in values.items()})

    def artifact_dir(self, path: Path, name: str) -> None:
        """Log the small files of an artifact (manifest, config, reports), not the weights."""
        if self._mlflow is None:
            return
        for file_name in ("manifest.json", "config.yaml", "metrics.json", "report.md"):
            if (path / file_name).is_file():
                self._mlflow.log_artifact(str(path / file_name), artifact_path=name)

    def register_model(self, artifact_dir: Path, model_name: str, manifest: Manifest, *,
                       by_reference: bool = False, lineage: dict[str, str] | None = None) -> str | None:
        """Register an artifact as a new version of `model_name` and point the `challenger` alias at it.

        The version's source is a logged copy of the whole directory, or with `by_reference` (indexes
        and towers: too large to copy into the artifact store) a logged copy of its manifest, with the
        directory's own URI in the `location` tag. Tags: the artifact's kind, fingerprint, embedding
        space and dataset, the git commit, and its lineage (`lineage.<input>` = the fingerprint of each
        artifact it was made from; `lineage` adds further ancestors), so a registry user can tell which
        towers built which index from which pairs.
        """
        if self._mlflow is None:
            return None
        from mlflow.exceptions import MlflowException

        if by_reference:
            # The source is the logged manifest; where the artifact itself lives goes in the `location`
            # tag (a tracking server refuses model sources outside its artifact store).
            self._mlflow.log_artifact(str(artifact_dir / "manifest.json"), artifact_path=manifest.kind)
        else:
            self._mlflow.log_artifacts(str(artifact_dir), artifact_path=manifest.kind)
        source = self._mlflow.get_artifact_uri(manifest.kind)
        client = self._mlflow.MlflowClient()
        try:
            client.get_registered_model(model_name)
        except MlflowException:
            client.create_registered_model(model_name)
        tags = {"kind": manifest.kind, "fingerprint": manifest.fingerprint,
                **({LOCATION_TAG: Path(artifact_dir).resolve().as_uri()} if by_reference else {}),
                **{f"lineage.{name}": fingerprint for name, fingerprint in manifest.inputs.items()},
                **{f"lineage.{name}": fingerprint for name, fingerprint in (lineage or {}).items()}}
        if "embedding_space" in manifest.metadata:
            tags["embedding_space"] = str(manifest.metadata["embedding_space"])
        dataset = manifest.metadata.get("dataset")
        if isinstance(dataset, dict) and "fingerprint" in dataset:
            tags.update({"dataset": str(dataset.get("name")), "dataset_fingerprint": str(dataset["fingerprint"])})
        commit = git_commit()
        if commit:
            tags["git_commit"] = commit
        version = client.create_model_version(model_name, source=source, run_id=self.run_id, tags=tags)
        client.set_registered_model_alias(model_name, CHALLENGER_ALIAS, version.version)
        console.print(f"registered as MLflow model {model_name} version {version.version}")
        return str(version.version)

    def tags(self, values: dict[str, str]) -> None:
        if self._mlflow is not None:
            self._mlflow.set_tags(values)


def register_index(tracker: Tracker, config: TowerlineConfig, index_dir: Path, manifest: Manifest,
                   encoder_path: Path) -> str | None:
    """Register a freshly built index (by reference) as a version of `tracking.index_model`, its lineage
    the dual encoder that built it and that encoder's own inputs (the training pairs)."""
    if not config.tracking.index_model:
        return None
    from towerline.artifacts import read_manifest
    from towerline.tower_spec import DUAL_ENCODER_KIND

    encoder_inputs = read_manifest(encoder_path, DUAL_ENCODER_KIND).inputs
    return tracker.register_model(index_dir, config.tracking.index_model, manifest, by_reference=True,
                                  lineage={f"encoder.{name}": value for name, value in encoder_inputs.items()})


@functools.cache
def git_commit() -> str | None:
    """The commit of the working tree the process runs from, or None outside a git checkout."""
    try:
        result = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                                cwd=Path(__file__).resolve().parent)
    except (OSError, subprocess.SubprocessError):
        return None
    return result.stdout.strip() or None if result.returncode == 0 else None


def metric_name(name: str) -> str:
    """MLflow refuses '@' in metric names: ndcg@10 is logged as ndcg_at_10."""
    return name.replace("@", "_at_")


def _param_text(value: Any) -> str:
    text = str(value)
    return text if len(text) <= 500 else text[:497] + "..."


def tracking_uri(config: TowerlineConfig) -> str:
    return config.tracking.uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_URI


@contextmanager
def track(config: TowerlineConfig, run_name: str, *, nested: bool = False) -> Iterator[Tracker]:
    """Open an MLflow run with the resolved config as params; nested runs share the parent.
    Under torchrun only rank 0 tracks: the other ranks would open duplicate runs."""
    if not config.tracking.enabled or os.environ.get("RANK", "0") != "0":
        yield Tracker(None)
        return
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    import mlflow

    # The sqlite store logs every schema migration at INFO; keep the console for our own output.
    # (Set after the import: mlflow configures its logger when imported.)
    for logger_name in ("mlflow", "alembic"):
        logging.getLogger(logger_name).setLevel(logging.WARNING)

    uri = tracking_uri(config)
    mlflow.set_tracking_uri(uri)
    _ensure_experiment(mlflow, config.tracking.experiment, uri)
    with mlflow.start_run(run_name=run_name, nested=nested):
        tracker = Tracker(mlflow)
        tracker.params(config.flat())
        tracker.tags({"towerline.stage": run_name, **({"git_commit": git_commit()} if git_commit() else {})})
        yield tracker


def _ensure_experiment(mlflow: Any, name: str, uri: str) -> None:
    if mlflow.get_experiment_by_name(name) is None:
        location = None
        if uri.startswith("sqlite:///"):
            # Keep artifacts next to the sqlite file rather than in a cwd-relative ./mlruns.
            db_path = Path(uri.removeprefix("sqlite:///")).resolve()
            location = (db_path.parent / DEFAULT_ARTIFACT_ROOT).as_uri()
        mlflow.create_experiment(name, artifact_location=location)
    mlflow.set_experiment(name)

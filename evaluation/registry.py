"""The model registry (MLflow): resolve `models:/NAME@ALIAS` to artifacts, find the index a query encoder
belongs to, and promote a challenger to champion only on a significant win.

`export` registers every ONNX query encoder (a logged copy) and `index build` every index (by reference)
with their fingerprints, embedding space, dataset and lineage as tags; each new version becomes the
`challenger`. `towerline promote` scores champion and challenger on the same judged queries, each with
its own index, and moves `champion` only when the challenger is better on the chosen metric with
significance (paired t-test and randomisation test, `evaluation.compare`), or when forced; the
decision is recorded as tags on the challenger's version either way.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

from towerline.config import TowerlineConfig
from towerline.errors import ArtifactError, ConfigError, DataError
from towerline.tracking import CHALLENGER_ALIAS, CHAMPION_ALIAS, LOCATION_TAG, tracking_uri

MODEL_URI_PREFIX = "models:/"


@dataclass(frozen=True)
class RegisteredArtifact:
    name: str
    version: str
    path: Path  # a local directory holding the artifact
    tags: dict[str, str]


def registry_client(config: TowerlineConfig) -> Any:
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    try:
        import mlflow
    except ImportError:
        raise ConfigError("models:/ URIs need MLflow (the pipeline extra: pip install '.[cpu]'); a serving-only "
                          "install takes artifact directories") from None
    mlflow.set_tracking_uri(tracking_uri(config))
    return mlflow.MlflowClient()


def parse_model_uri(uri: str) -> tuple[str, str | None, str | None]:
    """models:/NAME@ALIAS or models:/NAME/VERSION → (name, alias, version)."""
    if not uri.startswith(MODEL_URI_PREFIX):
        raise ConfigError(f"{uri!r}: expected models:/NAME@ALIAS or models:/NAME/VERSION")
    rest = uri.removeprefix(MODEL_URI_PREFIX)
    if "@" in rest:
        name, alias = rest.split("@", 1)
        if name and alias:
            return name, alias, None
    elif "/" in rest:
        name, version = rest.split("/", 1)
        if name and version.isdigit():
            return name, None, version
    raise ConfigError(f"{uri!r}: expected models:/NAME@ALIAS or models:/NAME/VERSION")


def resolve_model(config: TowerlineConfig, uri: str) -> RegisteredArtifact:
    """The registered version a models:/ URI names, with a local directory holding its artifact
    (downloaded from the artifact store for logged copies; the directory itself for references)."""
    from mlflow.exceptions import MlflowException

    client = registry_client(config)
    name, alias, version = parse_model_uri(uri)
    try:
        found = client.get_model_version_by_alias(name, alias) if alias else client.get_model_version(name, version)
    except MlflowException as exc:
        raise ArtifactError(f"{uri}: not in the registry at {tracking_uri(config)} "
                            f"({str(exc).splitlines()[0]})") from None
    return RegisteredArtifact(name, str(found.version), _local_source(client, found), dict(found.tags))


def _local_source(client: Any, version: Any) -> Path:
    location = version.tags.get(LOCATION_TAG)
    if location:  # registered by reference
        path = Path(unquote(urlparse(location).path))
        if not path.is_dir():
            raise ArtifactError(f"{version.name} version {version.version}: its directory {path} is gone")
        return path
    import mlflow

    return Path(mlflow.artifacts.download_artifacts(artifact_uri=client.get_model_version_download_uri(
        version.name, version.version)))


def matching_index(config: TowerlineConfig, embedding_space: str) -> RegisteredArtifact:
    """The newest registered index (config.tracking.index_model) built in `embedding_space` whose
    directory still exists."""
    client = registry_client(config)
    name = config.tracking.index_model
    versions = sorted(client.search_model_versions(f"name='{name}'"), key=lambda v: -int(v.version))
    for version in versions:
        if version.tags.get("embedding_space") == embedding_space:
            try:
                return RegisteredArtifact(name, str(version.version), _local_source(client, version),
                                          dict(version.tags))
            except ArtifactError:
                continue
    raise ArtifactError(f"no registered {name} version in embedding space {embedding_space[:12]} with its "
                        "directory present: build one with `towerline index build` (tracking on)")


def registered_serving_artifacts(config: TowerlineConfig, uri: str, index: Path | None) -> tuple[Path, Path, str]:
    """(ONNX dir, index dir, a description) for `towerline serve --onnx models:/...`: the registered query
    encoder, and `index` or else the newest registered index in its embedding space."""
    encoder = resolve_model(config, uri)
    index_path = index if index is not None else matching_index(config, _embedding_space(encoder)).path
    return encoder.path, index_path, f"{encoder.name} version {encoder.version} ({uri}) with index {index_path}"


@dataclass
class Promotion:
    model: str
    challenger: str
    champion: str | None  # the version that was champion before (None: there was none)
    promoted: bool
    forced: bool
    reason: str
    comparison: dict[str, Any] | None


def promote(config: TowerlineConfig, output: Path, *, model: str | None = None, challenger: str | None = None,
            metric: str = "ndcg@10", alpha: float = 0.05, permutations: int = 10_000, mode: str = "dense",
            force: bool = False, note: str = "") -> Promotion:
    """Score champion and challenger (each on its own registered index) on the eval split, compare
    them, and move `champion` to the challenger when it wins significantly on `metric` (or `force`)."""
    from evaluation.compare import COMPARED_METRICS, compare_to_report
    from evaluation.service import evaluate_artifacts

    if metric not in COMPARED_METRICS:
        raise ConfigError(f"--metric {metric!r}: expected one of {', '.join(COMPARED_METRICS)}")
    model = model or config.tracking.query_encoder_model
    client = registry_client(config)
    contender = resolve_model(config, f"{MODEL_URI_PREFIX}{model}/{challenger}" if challenger
                              else f"{MODEL_URI_PREFIX}{model}@{CHALLENGER_ALIAS}")
    incumbent = _current_champion(config, model)
    if incumbent is not None and incumbent.version == contender.version:
        raise DataError(f"{model} version {contender.version} is already the champion")
    comparison = None
    if incumbent is None:
        promoted, reason = True, "no champion yet"
    else:
        evaluated = {}
        for role, entry in (("champion", incumbent), ("challenger", contender)):
            index = matching_index(config, _embedding_space(entry))
            evaluated[role] = output / f"eval-{role}"
            evaluate_artifacts(config, index.path, entry.path, evaluated[role], mode)
        comparison = compare_to_report(
            config, [evaluated["champion"], evaluated["challenger"]], output / "compare",
            names=[f"champion v{incumbent.version}", f"challenger v{contender.version}"], alpha=alpha,
            permutations=permutations, title=f"{model}: challenger v{contender.version} vs champion "
                                             f"v{incumbent.version}")
        test = next(iter(comparison["comparisons"].values()))[metric]
        promoted = test["delta"] > 0 and test["significant"]
        reason = (f"{metric} {test['delta']:+.4f} over {comparison['queries']} queries, p (Holm) t-test "
                  f"{test['t_test_p_holm']:.3g} / randomisation {test['permutation_p_holm']:.3g}, alpha {alpha}: "
                  + ("significantly better" if promoted else "not significantly better"))
    forced = force and not promoted
    if promoted or forced:
        client.set_registered_model_alias(model, CHAMPION_ALIAS, contender.version)
    record = {"decision": "promoted" if promoted else ("forced" if forced else "refused"), "reason": reason,
              "previous_champion": incumbent.version if incumbent else "", "metric": metric,
              "at": datetime.now(UTC).isoformat(timespec="seconds"), "note": note}
    if comparison is not None:
        record["dataset_fingerprint"] = comparison["dataset"]["fingerprint"]
    for key, value in record.items():
        client.set_model_version_tag(model, contender.version, f"promotion.{key}", str(value))
    output.mkdir(parents=True, exist_ok=True)
    (output / "promotion.json").write_text(json.dumps({"model": model, "challenger": contender.version, **record},
                                                      indent=2) + "\n")
    return Promotion(model, contender.version, incumbent.version if incumbent else None, promoted, forced, reason,
                     comparison)


def _current_champion(config: TowerlineConfig, model: str) -> RegisteredArtifact | None:
    from mlflow.exceptions import MlflowException

    client = registry_client(config)
    try:
        client.get_model_version_by_alias(model, CHAMPION_ALIAS)
    except MlflowException:
        return None
    return resolve_model(config, f"{MODEL_URI_PREFIX}{model}@{CHAMPION_ALIAS}")


def _embedding_space(entry: RegisteredArtifact) -> str:
    space = entry.tags.get("embedding_space")
    if not space:
        raise ArtifactError(f"{entry.name} version {entry.version} has no embedding_space tag: it cannot be "
                            "paired with an index")
    return space

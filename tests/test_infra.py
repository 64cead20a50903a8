"""The deployment files hold together: images, Kubernetes manifests and the compose file refer to
things that exist, their commands parse against the real CLI, and their configs load as towerline
configs. Nothing is built or applied here (no Docker daemon, no cluster): `make lint` runs hadolint
and kubernetes-validate on the same files; these tests check what neither tool knows about."""

from __future__ import annotations

import fnmatch
import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from infra_manifests import (
    DOCKER,
    INFRA,
    ROOT,
    containers,
    dockerfile_instructions,
    entrypoint,
    final_stage,
    find,
    k8s_objects,
    parse_towerline,
    pod_templates,
)

from towerline.config import load_config

IMAGES = {"towerline-serve": "serve.Dockerfile", "towerline-jobs": "jobs.Dockerfile",
          "towerline-jobs-cuda": "jobs-cuda.Dockerfile", "towerline-mlflow": "mlflow.Dockerfile"}
UID = 10001


@pytest.fixture(scope="module")
def objects() -> list[dict[str, Any]]:
    return k8s_objects()


def _config_map_file(objects: list[dict[str, Any]], name: str, tmp_path: Path) -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(find(objects, "ConfigMap", name)["data"]["config.yaml"])
    return path


# --- images -----------------------------------------------------------------------------------


@pytest.mark.parametrize("dockerfile", sorted(IMAGES.values()))
def test_images_are_multi_stage_and_run_as_a_fixed_non_root_uid(dockerfile: str) -> None:
    instructions = dockerfile_instructions(DOCKER / dockerfile)
    assert sum(keyword == "FROM" for keyword, _ in instructions) >= 2
    runtime = final_stage(DOCKER / dockerfile)
    users = [rest for keyword, rest in runtime if keyword == "USER"]
    assert users == [f"{UID}:{UID}"], "numeric, so that Kubernetes' runAsNonRoot can check it"
    # The runtime stage copies the builder's venv and installs nothing from a package index itself.
    assert any(keyword == "COPY" and rest.startswith("--from=builder /opt/venv") for keyword, rest in runtime)
    assert not any(keyword == "RUN" and "pip install" in rest for keyword, rest in runtime)
    # Each file names the tag it builds, which the manifests and the compose file use.
    (tag,) = [image for image, name in IMAGES.items() if name == dockerfile]
    assert f"-f infra/docker/{dockerfile} -t {tag}:latest ." in (DOCKER / dockerfile).read_text()


def test_each_image_installs_its_own_extra() -> None:
    installs = {name: " ".join(rest for keyword, rest in dockerfile_instructions(DOCKER / name)
                               if keyword == "RUN" and "pip install" in rest) for name in IMAGES.values()}
    assert '".[serve]"' in installs["serve.Dockerfile"]
    assert '".[cpu]"' in installs["jobs.Dockerfile"] and '".[gpu]"' in installs["jobs-cuda.Dockerfile"]
    for jobs in ("jobs.Dockerfile", "jobs-cuda.Dockerfile"):
        runtime = " ".join(rest for _, rest in final_stage(DOCKER / jobs))
        assert "openjdk-17-jre-headless" in runtime and "COPY --from=builder /opt/towerline /opt/towerline" in (
            "COPY " + " COPY ".join(rest for keyword, rest in final_stage(DOCKER / jobs) if keyword == "COPY"))
        assert entrypoint(DOCKER / jobs)[-1] == "/opt/towerline/infra/spark/entrypoint.sh"


def test_the_serving_image_entry_point_is_a_valid_serve_command() -> None:
    argv = entrypoint(DOCKER / "serve.Dockerfile")
    assert argv[0] == "towerline"
    params = parse_towerline(argv[1:]).params
    assert (str(params["index"]), str(params["onnx"])) == ("/artifacts/index", "/artifacts/onnx")


def _ignored(path: str, patterns: list[str]) -> bool:
    """Docker's .dockerignore rule for the patterns this repository uses: a pattern matches the path
    or one of its parent directories; `**/` matches at any depth."""
    parts = path.split("/")
    prefixes = ["/".join(parts[:n]) for n in range(1, len(parts) + 1)]
    for pattern in patterns:
        if pattern.startswith("**/"):
            if any(fnmatch.fnmatch(part, pattern[3:]) for part in parts):
                return True
        elif any(fnmatch.fnmatch(prefix, pattern) for prefix in prefixes):
            return True
    return False


def test_the_build_context_keeps_what_the_images_need_and_drops_the_rest() -> None:
    patterns = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    assert not any(p.startswith("!") for p in patterns), "exceptions are not handled by _ignored"
    needed = ["pyproject.toml", "README.md", "towerline/cli.py", "serving/server.py", "indexing/build.py",
              "towerline/datasets/scifact/corpus.jsonl.gz", "infra/spark/job.py", "infra/spark/entrypoint.sh",
              "infra/torchrun.sh"]
    assert [path for path in needed if _ignored(path, patterns)] == []
    dropped = [".venv/bin/python", ".git/HEAD", "runs/demo/index/manifest.json", "tests/test_infra.py",
               "mlflow.db", "towerline/__pycache__/cli.cpython-311.pyc", "benchmarks/results/demo.json"]
    assert [path for path in dropped if not _ignored(path, patterns)] == []


# --- Kubernetes ---------------------------------------------------------------------------------


def test_pods_run_the_images_built_here_as_their_non_root_user(objects: list[dict[str, Any]]) -> None:
    for owner, pod in pod_templates(objects):
        security = pod["spec"]["securityContext"]
        assert security["runAsNonRoot"] and security["runAsUser"] == UID, owner
        for container in containers(pod):
            assert container["image"].split(":")[0] in IMAGES, f"{owner}: {container['image']}"
            assert container["securityContext"]["allowPrivilegeEscalation"] is False, owner
            assert container["securityContext"]["capabilities"]["drop"] == ["ALL"], owner


def test_every_volume_claim_config_map_and_mount_refers_to_something_defined(
        objects: list[dict[str, Any]]) -> None:
    defined = {(o["kind"], o["metadata"]["name"]) for o in objects}
    # The token Secret is created with kubectl (retrieval.yaml says how), never committed.
    external = {("Secret", "towerline-auth")}
    for owner, pod in pod_templates(objects):
        volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
        for volume in volumes.values():
            if "persistentVolumeClaim" in volume:
                assert ("PersistentVolumeClaim", volume["persistentVolumeClaim"]["claimName"]) in defined, owner
            if "configMap" in volume:
                assert ("ConfigMap", volume["configMap"]["name"]) in defined, owner
            if "secret" in volume:
                assert ("Secret", volume["secret"]["secretName"]) in defined | external, owner
        for container in containers(pod):
            for mount in container.get("volumeMounts", []):
                assert mount["name"] in volumes, f"{owner}: mount {mount['name']} has no volume"
    assert "kubectl create secret generic towerline-auth --from-file=token=" in (
        INFRA / "k8s" / "retrieval.yaml").read_text()


def test_the_service_reads_its_config_and_token_where_the_deployment_mounts_them(
        objects: list[dict[str, Any]], tmp_path: Path) -> None:
    deployment = find(objects, "Deployment", "towerline-retrieval")
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    # The image's entry point plus the container's arguments: one valid `towerline serve` command.
    argv = entrypoint(DOCKER / "serve.Dockerfile")[1:] + container["args"]
    params = parse_towerline(argv).params
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    config_path = Path(params["config_file"])
    config_volume = next(name for name, m in mounts.items() if Path(m["mountPath"]) == config_path.parent)
    assert volumes[config_volume]["configMap"]["name"] == "towerline-serve"
    config = load_config(_config_map_file(objects, "towerline-serve", tmp_path), params["overrides"])
    assert config.serve.host == "0.0.0.0" and config.serve.port == 50051 and config.serve.metrics_port == 9100
    token = config.serve.auth_token_file
    assert token is not None
    token_mount = next(m for m in mounts.values() if Path(m["mountPath"]) == token.parent)
    assert token_mount["readOnly"]
    items = volumes[token_mount["name"]]["secret"]["items"]
    assert [item["path"] for item in items] == [token.name]
    # The artifacts the entry point names live on the read-only volume; the root file system is read-only.
    assert mounts["artifacts"]["mountPath"] == "/artifacts" and mounts["artifacts"]["readOnly"]
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"grpc": config.serve.port, "metrics": config.serve.metrics_port}
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["grpc"]["port"] == config.serve.port
    # Kubernetes waits for the drain and the in-flight grace before it kills the process.
    assert pod["terminationGracePeriodSeconds"] > config.serve.drain_delay_s + config.serve.shutdown_grace_s


def test_service_autoscaler_and_budget_select_the_deployment(objects: list[dict[str, Any]]) -> None:
    deployment = find(objects, "Deployment", "towerline-retrieval")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    service = find(objects, "Service", "towerline-retrieval")
    assert service["spec"]["clusterIP"] == "None" and service["spec"]["selector"].items() <= labels.items()
    hpa = find(objects, "HorizontalPodAutoscaler", "towerline-retrieval")
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                             "name": "towerline-retrieval"}
    assert "replicas" not in deployment["spec"], "the autoscaler owns the replica count"
    pdb = find(objects, "PodDisruptionBudget", "towerline-retrieval")
    assert pdb["apiVersion"] == "policy/v1" and pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert hpa["spec"]["minReplicas"] - pdb["spec"]["maxUnavailable"] >= 2


def test_index_job_and_cron_job_run_real_build_and_publish_commands(
        objects: list[dict[str, Any]], tmp_path: Path) -> None:
    job = find(objects, "Job", "towerline-index-publish")["spec"]["template"]
    cron = find(objects, "CronJob", "towerline-index-nightly")
    assert cron["spec"]["jobTemplate"]["spec"]["template"] == job, "the two must not drift apart"
    assert cron["spec"]["concurrencyPolicy"] == "Forbid"
    (build,) = job["spec"]["initContainers"]
    (publish,) = job["spec"]["containers"]
    built = parse_towerline(build["args"][1:]).params
    published = parse_towerline(publish["args"][1:]).params
    assert build["args"][:3] == ["towerline", "index", "build"]
    assert publish["args"][:3] == ["towerline", "index", "publish"]
    # Publish takes what build wrote, into the registry entry the service's entry point follows.
    assert published["index"] == built["out"]
    assert published["registry"] / published["name"] == Path(entrypoint(DOCKER / "serve.Dockerfile")[3])
    config = load_config(_config_map_file(objects, "towerline-jobs", tmp_path), built["overrides"])
    mounts = {m["mountPath"] for m in build["volumeMounts"]}
    assert {"/data", "/artifacts", str(Path(built["config_file"]).parent)} <= mounts
    assert config.data.dir is not None and config.data.dir.is_relative_to("/data")
    assert built["encoder"].is_relative_to("/artifacts")


def test_spark_service_account_is_the_one_submit_sh_uses(objects: list[dict[str, Any]]) -> None:
    submit = (INFRA / "spark" / "submit.sh").read_text()
    (default,) = re.findall(r"serviceAccountName=\"\$\{K8S_SERVICE_ACCOUNT:-([\w-]+)\}\"", submit)
    account = find(objects, "ServiceAccount", default)
    binding = find(objects, "RoleBinding", "spark-driver")
    assert {"kind": "ServiceAccount", "name": account["metadata"]["name"]} in binding["subjects"]
    role = find(objects, "Role", binding["roleRef"]["name"])
    pods = next(rule for rule in role["rules"] if "pods" in rule["resources"])
    assert {"create", "get", "list", "watch", "delete"} <= set(pods["verbs"])
    # The driver's image must hold the project where submit.sh points spark-submit.
    assert "local:///opt/towerline/infra/spark/job.py" in submit
    template = yaml.safe_load((INFRA / "spark" / "pod-template.yaml").read_text())
    assert template["kind"] == "Pod" and template["spec"]["securityContext"]["runAsUser"] == UID


def test_the_training_job_is_an_indexed_torchrun_group_with_rank_0_as_master(
        objects: list[dict[str, Any]], tmp_path: Path) -> None:
    job = find(objects, "Job", "towerline-train")
    spec = job["spec"]
    pod = spec["template"]
    (container,) = pod["spec"]["containers"]
    env = {item["name"]: item["value"] for item in container["env"]}
    assert spec["completionMode"] == "Indexed"
    assert spec["completions"] == spec["parallelism"] == int(env["TORCHRUN_NNODES"])
    # Pod i of an Indexed Job is NAME-i; with the headless Service as subdomain, NAME-0.SERVICE resolves.
    service = find(objects, "Service", pod["spec"]["subdomain"])
    assert service["spec"]["clusterIP"] == "None" and service["spec"]["publishNotReadyAddresses"]
    assert service["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    assert env["TORCHRUN_MASTER_ADDR"] == f"{job['metadata']['name']}-0.{service['metadata']['name']}"
    assert int(env["TORCHRUN_MASTER_PORT"]) in [p["port"] for p in service["spec"]["ports"]]
    script, gpus, *train_args = container["args"]
    assert script == "/opt/towerline/infra/torchrun.sh"
    assert container["resources"]["limits"]["nvidia.com/gpu"] == int(gpus)
    torchrun = (INFRA / "torchrun.sh").read_text()
    assert "JOB_COMPLETION_INDEX" in torchrun and "-m towerline.cli train" in torchrun
    params = parse_towerline(["train", *train_args]).params
    load_config(_config_map_file(objects, "towerline-jobs", tmp_path), params["overrides"])


# --- compose ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load((INFRA / "compose.yaml").read_text())


def test_compose_services_refer_to_images_services_and_volumes_that_exist(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert set(services) == {"postgres", "mlflow", "retrieval"}
    for name, service in services.items():
        assert "image" in service or "build" in service, name
        if "build" in service:
            context = (INFRA / service["build"]["context"]).resolve()
            assert context == ROOT and (context / service["build"]["dockerfile"]).is_file(), name
            assert IMAGES[service["image"].split(":")[0]] == Path(service["build"]["dockerfile"]).name, name
        for dependency in service.get("depends_on", {}):
            assert dependency in services, f"{name} depends on unknown {dependency}"
        for volume in service.get("volumes", []):
            source = volume["source"] if isinstance(volume, dict) else volume.split(":")[0]
            if not source.startswith(("$", ".", "/")):
                assert source in compose["volumes"], f"{name}: volume {source} is not declared"
        for port in service.get("ports", []):
            assert port.startswith("127.0.0.1:"), f"{name} publishes {port} beyond loopback"


def test_compose_mlflow_uses_postgres_and_serves_artifacts_from_its_volume(compose: dict[str, Any]) -> None:
    postgres, mlflow = compose["services"]["postgres"], compose["services"]["mlflow"]
    flags = dict(item.partition("=")[::2] for item in mlflow["command"])
    backend = re.fullmatch(r"postgresql\+psycopg2://(\w+):\$\{POSTGRES_PASSWORD[^}]*\}@(\w+):5432/(\w+)",
                           flags["--backend-store-uri"])
    assert backend is not None
    user, host, database = backend.groups()
    assert (user, database) == (postgres["environment"]["POSTGRES_USER"], postgres["environment"]["POSTGRES_DB"])
    assert host == "postgres" and mlflow["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert "--serve-artifacts" in flags
    assert f"mlflow-artifacts:{flags['--artifacts-destination']}" in mlflow["volumes"]


def test_compose_retrieval_mounts_the_artifacts_read_only_where_the_image_reads_them(
        compose: dict[str, Any]) -> None:
    retrieval = compose["services"]["retrieval"]
    (mount,) = retrieval["volumes"]
    assert mount["read_only"] is True and mount["target"] == "/artifacts"
    image_paths = [arg for arg in entrypoint(DOCKER / "serve.Dockerfile") if arg.startswith("/")]
    assert image_paths and all(Path(path).is_relative_to(mount["target"]) for path in image_paths)
    assert retrieval["read_only"] is True and "/tmp" in retrieval["tmpfs"]

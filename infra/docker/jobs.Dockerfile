# Jobs image (CPU): Spark jobs (also as Spark-on-Kubernetes driver and executors), training,
# distillation, export, index build / publish, evaluation. The `cpu` extra: torch==2.13.0 (CPU wheel),
# PySpark with a headless Java 17 runtime, MLflow. The project lies at /opt/towerline, where
# infra/spark/submit.sh k8s looks for infra/spark/job.py.
# Build from the repository root:
#   docker build -f infra/docker/jobs.Dockerfile -t towerline-jobs:latest .
# bookworm: the Debian release that still packages a Java 17 runtime.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS builder
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /opt/towerline
COPY . .
# The project itself, not a registry package: its pyproject.toml carries the version bounds.
# hadolint ignore=DL3013
RUN pip install ".[cpu]"

FROM ${PYTHON_IMAGE}
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# tini reaps the JVM's and Python workers' children and forwards signals (PID 1 does neither).
# Not pinned to exact versions: the archive drops superseded ones, which would break rebuilds;
# the base image's tag fixes the release.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends openjdk-17-jre-headless tini \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --gid 10001 towerline \
    && useradd --uid 10001 --gid 10001 --create-home --home-dir /home/towerline --shell /bin/bash towerline
COPY --from=builder /opt/venv /opt/venv
COPY --from=builder /opt/towerline /opt/towerline
# The venv first on PATH: Spark's workers run `python3` (spark.pyspark.python in submit.sh k8s).
# TOKENIZERS_PARALLELISM is no secret (DL3064 matches 'TOKEN' in the name).
# hadolint ignore=DL3064
ENV PATH=/opt/venv/bin:$PATH HOME=/home/towerline \
    HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 MLFLOW_DISABLE_TELEMETRY=true TOKENIZERS_PARALLELISM=false \
    COLUMNS=120 PYTHONUNBUFFERED=1
USER 10001:10001
# Writable by the user: Spark writes spark-warehouse / derby files into the working directory.
WORKDIR /home/towerline
# `driver` and `executor` (what Spark on Kubernetes runs in its pods) start Spark; anything else runs
# as given, e.g. `towerline index build ...`.
ENTRYPOINT ["/usr/bin/tini", "--", "/opt/towerline/infra/spark/entrypoint.sh"]
CMD ["towerline", "--help"]

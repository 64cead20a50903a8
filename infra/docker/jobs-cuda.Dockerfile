# Jobs image (CUDA): as jobs.Dockerfile, with the `gpu` extra — torch's CUDA wheels, faiss-gpu-cu12,
# onnxruntime-gpu — on an NVIDIA CUDA runtime base (cuDNN included, which ONNX Runtime's CUDA EP
# loads). Ubuntu 24.04 brings Python 3.12 and a Java 17 runtime. The project lies at /opt/towerline.
# Build from the repository root:
#   docker build -f infra/docker/jobs-cuda.Dockerfile -t towerline-jobs-cuda:latest .
ARG CUDA_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04

FROM ${CUDA_IMAGE} AS builder
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# Not pinned to exact versions: the archive drops superseded ones, which would break rebuilds;
# the base image's tag fixes the release.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/*
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /opt/towerline
COPY . .
# The project itself, not a registry package: its pyproject.toml carries the version bounds.
# hadolint ignore=DL3013
RUN pip install ".[gpu]"

FROM ${CUDA_IMAGE}
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# Not pinned to exact versions: the archive drops superseded ones, which would break rebuilds;
# the base image's tag fixes the release.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 openjdk-17-jre-headless tini \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --gid 10001 towerline \
    && useradd --uid 10001 --gid 10001 --create-home --home-dir /home/towerline --shell /bin/bash towerline
COPY --from=builder /opt/venv /opt/venv
COPY --from=builder /opt/towerline /opt/towerline
# TOKENIZERS_PARALLELISM is no secret (DL3064 matches 'TOKEN' in the name).
# hadolint ignore=DL3064
ENV PATH=/opt/venv/bin:$PATH HOME=/home/towerline \
    HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 MLFLOW_DISABLE_TELEMETRY=true TOKENIZERS_PARALLELISM=false \
    COLUMNS=120 PYTHONUNBUFFERED=1
USER 10001:10001
WORKDIR /home/towerline
ENTRYPOINT ["/usr/bin/tini", "--", "/opt/towerline/infra/spark/entrypoint.sh"]
CMD ["towerline", "--help"]

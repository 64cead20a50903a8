# Serving image: the gRPC retrieval service on the lean `serve` install — ONNX Runtime, FAISS and
# gRPC; no torch, Spark, Java or MLflow (tests/test_export.py serves with those unimportable).
# Build from the repository root:
#   docker build -f infra/docker/serve.Dockerfile -t towerline-serve:latest .
# Both stages start from the same image, so the venv's interpreter links stay valid in the second.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS builder
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
# .dockerignore keeps virtualenvs, runs, logs and tests out of the context.
COPY . .
# Not editable: the runtime stage takes the venv alone, never the source tree.
# The project itself, not a registry package: its pyproject.toml carries the version bounds.
# hadolint ignore=DL3013
RUN pip install ".[serve]"

FROM ${PYTHON_IMAGE}
# A fixed uid, so that Kubernetes' runAsNonRoot can check it and volumes can be granted to it.
RUN groupadd --system --gid 10001 towerline \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --shell /usr/sbin/nologin towerline
COPY --from=builder /opt/venv /opt/venv
# HOME on /tmp: the only writable path under Kubernetes' read-only root file system.
ENV PATH=/opt/venv/bin:$PATH HOME=/tmp \
    HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 COLUMNS=120 \
    PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
USER 10001:10001
WORKDIR /tmp
# gRPC, and Prometheus metrics on /metrics.
EXPOSE 50051 9100
# Mount the index (a registry entry with CURRENT, or one version) and the ONNX encoder at /artifacts;
# the service follows CURRENT and reloads on SIGHUP. Arguments after the image name are appended
# (`--config FILE`, key=value overrides).
ENTRYPOINT ["towerline", "serve", "--index", "/artifacts/index", "--onnx", "/artifacts/onnx", \
            "serve.host=0.0.0.0", "serve.metrics_port=9100"]

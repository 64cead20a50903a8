# MLflow tracking server for infra/compose.yaml: MLflow with the PostgreSQL driver, nothing of
# Towerline. The versions are the ones tests/test_tracking_server.py ran against PostgreSQL.
# Build from the repository root (the context is not used):
#   docker build -f infra/docker/mlflow.Dockerfile -t towerline-mlflow:latest .
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS builder
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
RUN pip install mlflow==3.17.2 psycopg2-binary==2.9.13

FROM ${PYTHON_IMAGE}
# /mlartifacts owned by the user: a fresh named volume mounted there takes this directory's owner.
RUN groupadd --system --gid 10001 mlflow \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --shell /usr/sbin/nologin mlflow \
    && mkdir /mlartifacts && chown 10001:10001 /mlartifacts
COPY --from=builder /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH MLFLOW_DISABLE_TELEMETRY=true PYTHONUNBUFFERED=1
USER 10001:10001
WORKDIR /tmp
EXPOSE 5000
ENTRYPOINT ["mlflow", "server"]

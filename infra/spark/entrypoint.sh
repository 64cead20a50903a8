#!/usr/bin/env bash
# Entry point of the jobs images (infra/docker/jobs*.Dockerfile). Spark on Kubernetes starts its
# pods with `driver ARGS` or `executor` and expects the image to turn those into a Spark process, as
# Spark's own images do; pip's PySpark ships the jars and scripts but not that entry point, so here
# it is. Anything else runs as given (`towerline index build ...`, `bash`).
set -euo pipefail

# pip's PySpark is a complete Spark home; found through the interpreter, whatever its Python version.
if [[ -z "${SPARK_HOME:-}" ]]; then
  SPARK_HOME="$(python3 -c 'import os, pyspark; print(os.path.dirname(pyspark.__file__))')"
  export SPARK_HOME
fi

case "${1:-}" in
  driver)
    shift
    # The driver pod runs the application in client mode: the cluster-mode submit happened outside.
    exec "$SPARK_HOME/bin/spark-submit" \
      --conf "spark.driver.bindAddress=${SPARK_DRIVER_BIND_ADDRESS:-0.0.0.0}" \
      --deploy-mode client "$@" ;;
  executor)
    shift
    # Spark passes the executor's JVM options as SPARK_JAVA_OPT_0, _1, ... (in that order).
    java_opts=()
    while IFS= read -r opt; do
      java_opts+=("$opt")
    done < <(env | grep '^SPARK_JAVA_OPT_' | sort -t_ -k4 -n | sed 's/^[^=]*=//')
    classpath="${SPARK_CONF_DIR:-$SPARK_HOME/conf}:$SPARK_HOME/jars/*"
    if [[ -n "${SPARK_EXTRA_CLASSPATH:-}" ]]; then
      classpath="$classpath:$SPARK_EXTRA_CLASSPATH"
    fi
    exec java "${java_opts[@]}" -Xms"$SPARK_EXECUTOR_MEMORY" -Xmx"$SPARK_EXECUTOR_MEMORY" -cp "$classpath" \
      org.apache.spark.scheduler.cluster.k8s.KubernetesExecutorBackend \
      --driver-url "$SPARK_DRIVER_URL" --executor-id "$SPARK_EXECUTOR_ID" --cores "$SPARK_EXECUTOR_CORES" \
      --app-id "$SPARK_APPLICATION_ID" --hostname "$SPARK_EXECUTOR_POD_IP" \
      --resourceProfileId "${SPARK_RESOURCE_PROFILE_ID:-0}" --podName "$SPARK_EXECUTOR_POD_NAME" "$@" ;;
  "")
    echo "usage: entrypoint.sh driver ARGS | executor | COMMAND [ARGS...]" >&2
    exit 2 ;;
  *)
    exec "$@" ;;
esac

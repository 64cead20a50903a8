#!/usr/bin/env bash
# Run a Towerline Spark job (pairs, pseudo-queries, embed, rec data) through spark-submit.
#
#   infra/spark/submit.sh yarn  JOB [ARGS...]   YARN, cluster mode; executors unpack $TOWERLINE_ENV
#                                               (infra/spark/pack-env.sh) and run its Python
#   infra/spark/submit.sh k8s   JOB [ARGS...]   Kubernetes ($K8S_API, e.g. https://host:6443), cluster
#                                               mode; driver and executors run $TOWERLINE_IMAGE, which
#                                               holds the project at /opt/towerline
#   infra/spark/submit.sh local JOB [ARGS...]   local-cluster[2,1,1024] on this machine: executors in
#                                               their own JVMs and Python workers (a rehearsal; tested)
#
# JOB and ARGS are the CLI's (`pairs --logs hdfs:///logs/2026-12-*`, `embed --encoder ...`); extra
# spark-submit options go in $SPARK_SUBMIT_OPTS_EXTRA. Paths the job reads or writes must be
# reachable from the driver and the executors (HDFS, object store, or a shared volume).
set -euo pipefail
target="${1:?yarn, k8s or local}"; shift
here="$(cd "$(dirname "$0")" && pwd)"
read -r -a extra <<< "${SPARK_SUBMIT_OPTS_EXTRA:-}"
case "$target" in
  yarn)
    env_archive="${TOWERLINE_ENV:-towerline-env.tar.gz}"
    exec spark-submit --master yarn --deploy-mode cluster \
      --archives "${env_archive}#environment" \
      --conf spark.yarn.appMasterEnv.PYSPARK_PYTHON=./environment/bin/python \
      --conf spark.executorEnv.PYSPARK_PYTHON=./environment/bin/python \
      "${extra[@]}" "$here/job.py" "$@" spark.master=yarn ;;
  k8s)
    api="${K8S_API:?set K8S_API to the API server of the cluster, e.g. https://host:6443}"
    image="${TOWERLINE_IMAGE:?set TOWERLINE_IMAGE to an image with the project at /opt/towerline}"
    exec spark-submit --master "k8s://${api}" --deploy-mode cluster \
      --conf spark.kubernetes.container.image="$image" \
      --conf spark.kubernetes.authenticate.driver.serviceAccountName="${K8S_SERVICE_ACCOUNT:-spark}" \
      --conf spark.kubernetes.namespace="${K8S_NAMESPACE:-default}" \
      --conf spark.pyspark.python=python3 \
      "${extra[@]}" local:///opt/towerline/infra/spark/job.py "$@" "spark.master=k8s://${api}" ;;
  local)
    master="local-cluster[2,1,1024]"
    python="${PYSPARK_PYTHON:-$(command -v python3)}"
    exec spark-submit --master "$master" --conf spark.pyspark.python="$python" \
      --conf spark.pyspark.driver.python="$python" \
      "${extra[@]}" "$here/job.py" "$@" "spark.master=${master}" ;;
  *)
    echo "unknown target $target: yarn, k8s or local" >&2; exit 2 ;;
esac

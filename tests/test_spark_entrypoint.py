"""infra/spark/entrypoint.sh, the jobs images' entry point, run here with pip's PySpark and this
machine's Java: Spark on Kubernetes starts its pods with `driver ...` or `executor`, anything else
passes through. No cluster here: the executor is started against a driver address where nothing
listens, which shows its JVM options, heap, class path and main class, up to the driver connection."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pyspark
import pytest

ENTRYPOINT = Path(__file__).resolve().parents[1] / "infra" / "spark" / "entrypoint.sh"
pytestmark = pytest.mark.skipif(shutil.which("java") is None, reason="needs a Java runtime")


def _run(args: list[str], **env: str) -> subprocess.CompletedProcess[str]:
    # The images put the venv first on PATH; SPARK_HOME is left for the entry point to find.
    environment = {k: v for k, v in os.environ.items() if k != "SPARK_HOME"}
    environment.update(PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}", **env)
    return subprocess.run(["bash", str(ENTRYPOINT), *args], capture_output=True, text=True, timeout=120,
                          env=environment)


def test_other_commands_pass_through_and_no_command_is_refused() -> None:
    passed = _run(["python3", "-c", "import os; print(os.environ['SPARK_HOME'])"])
    assert passed.returncode == 0, passed.stderr
    assert Path(passed.stdout.strip()) == Path(pyspark.__file__).parent
    refused = _run([])
    assert refused.returncode == 2 and "usage" in refused.stderr


def test_driver_runs_spark_submit_in_client_mode() -> None:
    result = _run(["driver", "--version"])
    assert result.returncode == 0, result.stderr
    assert f"version {pyspark.__version__}" in result.stdout + result.stderr


def test_executor_starts_the_kubernetes_backend_with_spark_s_settings() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed_port = probe.getsockname()[1]  # released: nothing listens there
    result = _run(["executor"], SPARK_EXECUTOR_MEMORY="512m",
                  SPARK_DRIVER_URL=f"spark://CoarseGrainedScheduler@127.0.0.1:{closed_port}",
                  SPARK_EXECUTOR_ID="1", SPARK_EXECUTOR_CORES="1", SPARK_APPLICATION_ID="spark-test",
                  SPARK_EXECUTOR_POD_IP="127.0.0.1", SPARK_EXECUTOR_POD_NAME="towerline-exec-1",
                  # Spark passes JVM options this way; the JVM prints its flags with this one.
                  SPARK_JAVA_OPT_0="-XX:+PrintCommandLineFlags", SPARK_JAVA_OPT_1="-Dtowerline.test=1")
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert "MaxHeapSize=536870912" in output and "PrintCommandLineFlags" in output
    assert "ClassNotFoundException" not in output
    assert f"Failed to connect to /127.0.0.1:{closed_port}" in output

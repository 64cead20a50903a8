"""The one place a SparkSession is built, so every Spark job runs with the same settings.

Under `spark-submit` a session already exists and `getOrCreate` returns it; the settings here
are the embedded defaults for `local[*]` runs.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

from pyspark.sql import SparkSession

from towerline.config import SparkConfig

# Spark's own log4j2 defaults print INFO lines and a "Setting default log level" banner on
# every start; this keeps WARN and above, minus the native-hadoop notice every laptop gets.
_LOG4J2_PROPERTIES = """\
rootLogger.level = warn
rootLogger.appenderRef.stderr.ref = console
appender.console.type = Console
appender.console.name = console
appender.console.target = SYSTEM_ERR
appender.console.layout.type = PatternLayout
appender.console.layout.pattern = %d{yy/MM/dd HH:mm:ss} %p %c{1}: %m%n%ex
logger.nativecode.name = org.apache.hadoop.util.NativeCodeLoader
logger.nativecode.level = error
"""


def spark_session(spark: SparkConfig, app_name: str) -> SparkSession:
    """Get or start the session: config master, driver memory and shuffle partitions, no UI."""
    if spark.master.startswith("local"):
        # local and local-cluster workers run on this machine: give them this interpreter. On a
        # cluster the executors bring their own (a packed environment or an image, infra/spark/).
        _point_workers_at_this_python()
        # Otherwise Spark warns that the hostname resolves to loopback on every start.
        os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
    session = (
        SparkSession.builder.master(spark.master)
        .appName(app_name)
        .config("spark.driver.memory", spark.driver_memory)
        .config("spark.sql.shuffle.partitions", str(spark.shuffle_partitions))
        .config("spark.ui.enabled", "false")
        .config("spark.ui.showConsoleProgress", "false")
        .config("spark.driver.extraJavaOptions", f"-Dlog4j2.configurationFile={_log4j2_config().as_uri()}")
        .getOrCreate()
    )
    session.sparkContext.setLogLevel("WARN")
    return session


def _point_workers_at_this_python() -> None:
    # Python workers otherwise start whatever `python3` is on PATH, which lacks pyarrow & co.
    os.environ["PYSPARK_PYTHON"] = sys.executable
    os.environ["PYSPARK_DRIVER_PYTHON"] = sys.executable


def _log4j2_config() -> Path:
    """Write the log4j2 file once per user; written beside and renamed, so concurrent starts are safe."""
    path = Path(tempfile.gettempdir()) / f"towerline-spark-log4j2-{_user_id()}.properties"
    if not path.is_file() or path.read_text() != _LOG4J2_PROPERTIES:
        scratch = path.with_name(f"{path.name}.{os.getpid()}")
        scratch.write_text(_LOG4J2_PROPERTIES)
        os.replace(scratch, path)
    return path


def _user_id() -> int:
    # Per user, so one user's file never blocks another's; os.getuid is POSIX-only.
    return os.getuid() if hasattr(os, "getuid") else 0


def stop_spark(spark: SparkConfig) -> None:
    """Stop the active session, if any and unless `spark.keep_session`: frees the driver JVM before
    memory-hungry stages run."""
    if spark.keep_session:
        return
    active = SparkSession.getActiveSession()
    if active is not None:
        active.stop()

"""The driver program spark-submit runs: the Towerline CLI, so a cluster job is the same command
as a local one (`job.py pairs --logs ... spark.master=yarn`). The session spark-submit configured is
the one the job's `getOrCreate` returns."""

import sys

from towerline.cli import main

if __name__ == "__main__":
    sys.exit(main())

"""Multi-node training as the Kubernetes Indexed Job runs it (infra/k8s/train-job.yaml), rehearsed on
loopback: two "nodes", each `infra/torchrun.sh 1` with TORCHRUN_NNODES=2 and its own JOB_COMPLETION_INDEX,
meeting at a master address — a static torchrun rendezvous across two launchers, not --standalone."""

from __future__ import annotations

import json
import os
import socket
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from test_training import write_pairs_artifact

SCRIPT = Path(__file__).resolve().parents[1] / "infra" / "torchrun.sh"


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.slow
def test_two_nodes_train_one_model_as_the_indexed_job_does(
        tiny_dataset: Path, tiny_backbone: Path, tmp_path: Path) -> None:
    write_pairs_artifact(tiny_dataset, tmp_path / "pairs")
    args = ["--pairs", str(tmp_path / "pairs"), "--out", str(tmp_path / "encoder"), f"data.dir={tiny_dataset}",
            f"encoder.backbone={tiny_backbone}", "train.batch_size=4", "train.epochs=2", "train.dev_queries=0",
            "encoder.max_query_length=16", "encoder.max_doc_length=48",
            f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}", f"run_dir={tmp_path / 'runs'}"]
    base = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
            "TORCHRUN_NNODES": "2", "TORCHRUN_MASTER_ADDR": "127.0.0.1", "TORCHRUN_MASTER_PORT": str(_free_port())}
    nodes = [subprocess.Popen(["bash", str(SCRIPT), "1", *args], env={**base, "JOB_COMPLETION_INDEX": str(index)},
                              cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for index in range(2)]
    try:
        outputs = [node.communicate(timeout=600)[0] for node in nodes]
    finally:
        for node in nodes:
            if node.poll() is None:
                node.kill()
                node.wait()
    assert [node.returncode for node in nodes] == [0, 0], "\n".join(output[-3000:] for output in outputs)
    manifest = json.loads((tmp_path / "encoder" / "manifest.json").read_text())
    # One DDP group over the two nodes: world size 2, each step a global batch of 2 x 4; rank 0 alone
    # wrote the artifact and opened the MLflow run (two separate worlds would each have a rank 0).
    assert manifest["metadata"]["world_size"] == 2 and manifest["metadata"]["global_batch_size"] == 8
    with sqlite3.connect(tmp_path / "mlflow.db") as db:
        assert [row[0] for row in db.execute("select name from runs")] == ["train"]

"""Scale-out of stage 1: `towerline train` under torchrun, 2 gloo ranks of B/2 pairs each, trains as one
process on the same global batch of B pairs: the same per-step loss curve and the same weights."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from towerline.towers import load_towers

ROOT = Path(__file__).resolve().parents[1]
GLOBAL_BATCH, WORLD = 8, 2


@pytest.fixture(autouse=True)
def _no_gpu_ranks(monkeypatch: pytest.MonkeyPatch) -> None:
    # Two ranks on one GPU would not be the gloo/CPU setting this test is about.
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")


def _train(command: list[str], out: Path, batch_size: int, common: list[str], cwd: Path) -> subprocess.Popen[str]:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    return subprocess.Popen([*command, "--out", str(out), f"train.batch_size={batch_size}", *common],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=cwd)


def _overrides(pairs: Path, dataset: Path, backbone: Path, tmp_path: Path, *extra: str) -> list[str]:
    """What every run of these tests shares: 3 epochs over the tiny pairs, a loss logged every step."""
    return ["--pairs", str(pairs), f"data.dir={dataset}", f"encoder.backbone={backbone}",
            "encoder.max_query_length=16", "encoder.max_doc_length=48", "train.epochs=3", "train.dev_queries=0",
            "train.learning_rate=1e-3", "train.log_every=1", "tracking.enabled=false", f"run_dir={tmp_path / 'runs'}",
            *extra]


def _finished(process: subprocess.Popen[str], out: Path) -> dict:
    output, _ = process.communicate(timeout=600)
    assert process.returncode == 0, output[-3000:]
    return json.loads((out / "manifest.json").read_text())["metadata"]


def test_two_ranks_of_half_the_batch_train_as_one_process_on_the_whole_batch(
    tiny_dataset: Path, tiny_backbone: Path, tmp_path: Path
) -> None:
    from test_grad_cache import _without_dropout
    from test_training import _weights, write_pairs_artifact

    # Dropout draws its masks from each process's own generator, so with it the two runs would agree
    # in distribution only; without it they must agree to float precision.
    backbone = _without_dropout(tiny_backbone, tmp_path / "no-dropout")
    pairs = write_pairs_artifact(tiny_dataset, tmp_path / "pairs")
    common = _overrides(pairs, tiny_dataset, backbone, tmp_path, "train.torch_threads=1")
    # Both at once: each process is one thread, and most of either run is start-up.
    one = _train([sys.executable, "-m", "towerline", "train"], tmp_path / "one", GLOBAL_BATCH, common, tmp_path)
    ranks = _train(["bash", str(ROOT / "infra" / "torchrun.sh"), str(WORLD)], tmp_path / "ranks",
                   GLOBAL_BATCH // WORLD, common, tmp_path)
    single, distributed = _finished(one, tmp_path / "one"), _finished(ranks, tmp_path / "ranks")

    assert (single["world_size"], distributed["world_size"]) == (1, WORLD)
    assert single["global_batch_size"] == distributed["global_batch_size"] == GLOBAL_BATCH
    # 20 pairs: 2 global batches of 8 distinct queries per epoch, 3 epochs, one logged loss per step.
    assert single["steps"] == distributed["steps"] == 6
    steps = [point["step"] for point in single["loss_history"]]
    assert steps == [point["step"] for point in distributed["loss_history"]] == list(range(1, 7))
    expected = np.array([point["loss"] for point in single["loss_history"]])
    actual = np.array([point["loss"] for point in distributed["loss_history"]])
    assert expected[-1] < expected[0] - 0.05, expected  # a curve that moves, not a constant
    # Measured: the runs agree to ~3e-7 relative; a rank scoring its queries against its own documents
    # only moves the curve by up to 39 %, and ranks drawing their own batches change the step count.
    np.testing.assert_allclose(actual, expected, rtol=1e-4, atol=0)
    for one_tower, rank_tower in zip(load_towers(tmp_path / "one")[:2], load_towers(tmp_path / "ranks")[:2],
                                     strict=True):
        reference, trained = _weights(one_tower), _weights(rank_tower)
        assert reference.keys() == trained.keys()
        for name in reference:
            assert torch.allclose(reference[name], trained[name], atol=1e-5, rtol=1e-4), name


def test_fsdp_is_refused_on_cpu_and_clashing_settings_are_named(tiny_config, tiny_dataset: Path,
                                                                 tmp_path: Path) -> None:
    from test_training import write_pairs_artifact

    from towerline.config import load_config
    from towerline.errors import ConfigError
    from towerline.tracking import Tracker
    from training.run import run_train

    with pytest.raises(ConfigError, match=r"train\.fsdp does not combine with train\.lora, train\.dev_queries"):
        load_config(None, ["train.fsdp=true", "train.lora=true", "train.dev_queries=5"])
    config = tiny_config.model_copy(deep=True)
    config.train = config.train.model_copy(update={"fsdp": True, "max_steps": 1})
    pairs = write_pairs_artifact(tiny_dataset, tmp_path / "pairs")
    with pytest.raises(ConfigError, match=r"train\.fsdp needs CUDA GPUs"):
        run_train(config, pairs, tmp_path / "encoder", Tracker(None))
    assert not (tmp_path / "encoder").exists()


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < WORLD, reason="needs 2 CUDA GPUs")
def test_fsdp_ranks_train_as_ddp_ranks(tiny_dataset: Path, tiny_backbone: Path, tmp_path: Path,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """FSDP (full shard) under torchrun: the same loss curve as DDP on the same global batches."""
    from test_grad_cache import _without_dropout
    from test_training import write_pairs_artifact

    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    backbone = _without_dropout(tiny_backbone, tmp_path / "no-dropout")
    pairs = write_pairs_artifact(tiny_dataset, tmp_path / "pairs")
    common = _overrides(pairs, tiny_dataset, backbone, tmp_path, "train.precision=fp32")
    command = ["bash", str(ROOT / "infra" / "torchrun.sh"), str(WORLD)]
    ddp = _finished(_train(command, tmp_path / "ddp", GLOBAL_BATCH // WORLD, common, tmp_path), tmp_path / "ddp")
    fsdp = _finished(_train(command, tmp_path / "fsdp", GLOBAL_BATCH // WORLD, [*common, "train.fsdp=true"],
                            tmp_path), tmp_path / "fsdp")
    np.testing.assert_allclose([point["loss"] for point in fsdp["loss_history"]],
                               [point["loss"] for point in ddp["loss_history"]], rtol=1e-3)

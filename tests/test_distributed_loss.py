"""Cross-device negatives: InfoNCE under 2-process DDP (gloo, CPU) equals the single-process loss."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from training.losses import InfoNCELoss

BATCH, HARD, DIM, WORLD = 3, 1, 8, 2


def _embeddings(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    queries = torch.nn.functional.normalize(torch.randn(BATCH, DIM, generator=generator), dim=-1)
    docs = torch.nn.functional.normalize(torch.randn(BATCH * (1 + HARD), DIM, generator=generator), dim=-1)
    return queries, docs


def _rank_main(rank: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    queries, docs = _embeddings(rank)
    docs.requires_grad_(True)
    loss = InfoNCELoss(temperature=0.1, learnable=False)(queries, docs)
    loss.backward()
    torch.save({"loss": loss.detach(), "doc_grad": docs.grad}, f"{out_dir}/rank{rank}.pt")
    # Without it a rank can exit while gloo still serves the other one, which aborts that process.
    dist.barrier()
    dist.destroy_process_group()


def test_gathered_loss_matches_one_big_batch(tmp_path: Path) -> None:
    mp.spawn(_rank_main, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD, join=True)
    per_rank = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(WORLD)]
    # Reference: one process sees every query and the concatenation of every rank's docs.
    parts = [_embeddings(rank) for rank in range(WORLD)]
    all_queries = torch.cat([queries for queries, _ in parts])
    all_docs = torch.cat([docs for _, docs in parts]).requires_grad_(True)
    docs_per_rank = BATCH * (1 + HARD)
    labels = torch.cat([torch.arange(BATCH) + rank * docs_per_rank for rank in range(WORLD)])
    reference = torch.nn.functional.cross_entropy(all_queries @ all_docs.T / 0.1, labels)
    reference.backward()
    mean_rank_loss = torch.stack([result["loss"] for result in per_rank]).mean()
    assert torch.allclose(mean_rank_loss, reference, atol=1e-5)
    # Every rank's queries push on this rank's docs: the gather's backward sums the ranks' gradients,
    # so each rank holds WORLD x the big batch's gradient for its docs. Without the gather (only local
    # queries reaching local docs) the gradient differs.
    for rank, result in enumerate(per_rank):
        expected = all_docs.grad[rank * docs_per_rank : (rank + 1) * docs_per_rank] * WORLD
        assert torch.allclose(result["doc_grad"], expected, atol=1e-5)


def _uneven_rank_main(rank: int, init_file: str, out_dir: str) -> None:
    """Rank 1 holds a query without hard negatives (fewer docs), and its positive is rank 0's query 0's positive."""
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    queries, docs, keys, positive_keys = _uneven_inputs(rank)
    loss = InfoNCELoss(temperature=0.1, learnable=False)(queries, docs, keys, positive_keys)
    torch.save({"loss": loss.detach()}, f"{out_dir}/uneven{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


def _uneven_inputs(rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    from training.collator import doc_key

    queries, docs = _embeddings(rank)
    doc_ids = [f"d{rank * 10 + i}" for i in range(docs.size(0))]
    if rank == 1:
        docs, doc_ids = docs[:BATCH], doc_ids[:BATCH]  # no hard negatives on this rank
        docs[0] = _embeddings(0)[1][0]  # the same document as rank 0's first positive
        doc_ids[0] = "d0"
    keys = torch.tensor([doc_key(doc_id) for doc_id in doc_ids])
    positive_keys = torch.tensor([[doc_key(doc_id)] for doc_id in doc_ids[:BATCH]])
    return queries, docs, keys, positive_keys


def test_uneven_ranks_gather_and_a_repeated_positive_is_masked_across_ranks(tmp_path: Path) -> None:
    mp.spawn(_uneven_rank_main, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD, join=True)
    per_rank = [torch.load(tmp_path / f"uneven{rank}.pt")["loss"] for rank in range(WORLD)]
    parts = [_uneven_inputs(rank) for rank in range(WORLD)]
    all_docs = torch.cat([docs for _, docs, _, _ in parts])
    offsets = [0, parts[0][1].size(0)]
    expected = []
    for rank, (queries, _, _, _) in enumerate(parts):
        scores = queries @ all_docs.T / 0.1
        labels = torch.arange(BATCH) + offsets[rank]
        # "d0" sits at column 0 (rank 0) and at column offsets[1] (rank 1): each copy is masked for the other.
        twin = {0: offsets[1], 1: 0}[rank]
        row = 0
        scores[row, twin] = float("-inf")
        expected.append(torch.nn.functional.cross_entropy(scores, labels))
    assert torch.allclose(torch.stack(per_rank), torch.stack(expected), atol=1e-5)


@pytest.mark.slow
def test_towerline_train_under_torchrun_writes_one_artifact_and_one_run(
    tiny_dataset: Path, tiny_backbone: Path, tmp_path: Path
) -> None:
    """Two CPU ranks (gloo) through infra/torchrun.sh: each step's global batch split across ranks, rank 0
    alone writes and tracks."""
    import json
    import os
    import sqlite3
    import subprocess
    import sys

    from test_training import write_pairs_artifact

    write_pairs_artifact(tiny_dataset, tmp_path / "pairs")
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    script = Path(__file__).resolve().parents[1] / "infra" / "torchrun.sh"
    command = ["bash", str(script), "2", "--pairs", str(tmp_path / "pairs"), "--out", str(tmp_path / "encoder"),
               f"data.dir={tiny_dataset}", f"encoder.backbone={tiny_backbone}", "train.batch_size=4",
               "train.epochs=2", "train.dev_queries=0", "encoder.max_query_length=16", "encoder.max_doc_length=48",
               f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}", f"run_dir={tmp_path / 'runs'}"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    manifest = json.loads((tmp_path / "encoder" / "manifest.json").read_text())
    # 20 pairs, 2 ranks of 4: global batches of 8 distinct queries, 2 per epoch, 2 epochs.
    assert manifest["metadata"]["steps"] == 4 and manifest["metadata"]["global_batch_size"] == 8
    with sqlite3.connect(tmp_path / "mlflow.db") as db:
        assert [row[0] for row in db.execute("select name from runs")] == ["train"]

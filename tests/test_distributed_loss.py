"""Cross-device negatives: InfoNCE under 2-process DDP (gloo, CPU) equals the single-process loss."""

from __future__ import annotations

from pathlib import Path

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

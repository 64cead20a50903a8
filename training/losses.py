"""InfoNCE over in-batch + hard negatives, with cross-device negatives under DDP."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F


def gather_with_grad(tensor: torch.Tensor) -> tuple[torch.Tensor, int]:
    """All-gather across ranks keeping the local slice differentiable; returns (all, local offset)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return tensor, 0
    from torch.distributed.nn.functional import all_gather

    gathered = all_gather(tensor)
    offset = sum(part.size(0) for part in gathered[: dist.get_rank()])
    return torch.cat(gathered, dim=0), offset


class InfoNCELoss(torch.nn.Module):
    """Cross-entropy of each query against every doc in the (global) batch.

    Docs are laid out per rank as [B positives, B*H hard negatives]; query i's positive is
    local doc row i, so after the gather its label is the rank's doc offset + i.
    """

    def __init__(self, temperature: float, learnable: bool) -> None:
        super().__init__()
        log_inverse = torch.tensor(1.0 / temperature).log()
        self.log_inverse_temperature = torch.nn.Parameter(log_inverse, requires_grad=learnable)

    @property
    def temperature(self) -> float:
        return float(1.0 / self.log_inverse_temperature.exp())

    def forward(self, query_embeddings: torch.Tensor, doc_embeddings: torch.Tensor) -> torch.Tensor:
        all_docs, doc_offset = gather_with_grad(doc_embeddings)
        # Keep the learned scale bounded (CLIP-style): 1/T <= 100.
        scale = self.log_inverse_temperature.clamp(max=4.6052).exp()
        scores = query_embeddings @ all_docs.T * scale
        labels = torch.arange(query_embeddings.size(0), device=scores.device) + doc_offset
        return F.cross_entropy(scores, labels)

"""InfoNCE over in-batch + hard negatives, with cross-device negatives under DDP.

Ranks may hold different numbers of documents (a query without hard negatives adds none), so
the gather pads to the longest rank and strips the padding again. Documents that are known
positives of a query (its other positives, or its positive repeated elsewhere in the global
batch) are masked out of that query's negatives.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def gather_rows(tensor: torch.Tensor, differentiable: bool) -> tuple[torch.Tensor, int]:
    """Concatenate every rank's rows (uneven counts allowed); returns (all rows, this rank's offset).
    With `differentiable`, gradients flow back to every rank's rows through the gather."""
    if not _distributed():
        return tensor, 0
    count = torch.tensor([tensor.size(0)], device=tensor.device)
    counts = [torch.zeros_like(count) for _ in range(dist.get_world_size())]
    dist.all_gather(counts, count)
    sizes = [int(size) for size in counts]
    padded = F.pad(tensor, [0, 0] * (tensor.dim() - 1) + [0, max(sizes) - tensor.size(0)])
    if differentiable:
        from torch.distributed.nn.functional import all_gather

        gathered = list(all_gather(padded))
    else:
        gathered = [torch.empty_like(padded) for _ in sizes]
        dist.all_gather(gathered, padded)
    rows = torch.cat([part[:size] for part, size in zip(gathered, sizes, strict=True)])
    return rows, sum(sizes[: dist.get_rank()])


class InfoNCELoss(torch.nn.Module):
    """Cross-entropy of each query against every doc in the (global) batch.

    Docs are laid out per rank as [B positives, then hard negatives]; query i's positive is
    local doc row i, so after the gather its label is the rank's doc offset + i.
    """

    def __init__(self, temperature: float, learnable: bool) -> None:
        super().__init__()
        log_inverse = torch.tensor(1.0 / temperature).log()
        self.log_inverse_temperature = torch.nn.Parameter(log_inverse, requires_grad=learnable)

    @property
    def temperature(self) -> float:
        return float(1.0 / self.log_inverse_temperature.exp())

    def forward(
        self,
        query_embeddings: torch.Tensor,
        doc_embeddings: torch.Tensor,
        doc_keys: torch.Tensor | None = None,
        positive_keys: torch.Tensor | None = None,
    ) -> torch.Tensor:
        all_docs, doc_offset = gather_rows(doc_embeddings, differentiable=True)
        # Keep the learned scale bounded (CLIP-style): 1/T <= 100.
        scale = self.log_inverse_temperature.clamp(max=4.6052).exp()
        scores = query_embeddings @ all_docs.T * scale
        labels = torch.arange(query_embeddings.size(0), device=scores.device) + doc_offset
        if doc_keys is not None and positive_keys is not None:
            all_keys, _ = gather_rows(doc_keys, differentiable=False)
            known = (all_keys[None, :, None] == positive_keys[:, None, :]).any(dim=-1)
            known[torch.arange(known.size(0), device=known.device), labels] = False
            scores = scores.masked_fill(known, float("-inf"))
        return F.cross_entropy(scores, labels)

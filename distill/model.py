"""The student query tower and the ScalingNote stage-2 loss."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from transformers.utils import logging as hf_logging

from towerline.config import DistillConfig
from towerline.encoder import Tower
from towerline.errors import ConfigError
from towerline.tower_spec import TowerSpec

LAYERS_PREFIX = "layers:"


def build_student(settings: DistillConfig, teacher: Tower, teacher_dir: Path) -> Tower:
    """"layers:N": the teacher's own lower N layers (same width, same tokenizer); otherwise another
    backbone with the teacher's prompt, plus a linear projection when the widths differ."""
    if settings.student.startswith(LAYERS_PREFIX):
        layers = _layer_count(settings.student, int(teacher.backbone.config.num_hidden_layers))
        # The upper layers' weights are left out on purpose: silence the load report listing them.
        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()
        try:
            return Tower.from_backbone(str(teacher_dir), teacher.spec.model_copy(update={"projection_dim": None}),
                                       num_hidden_layers=layers)
        finally:
            hf_logging.set_verbosity(verbosity)
    plain = Tower.from_backbone(settings.student, TowerSpec())
    width = int(plain.backbone.config.hidden_size)
    spec = teacher.spec.model_copy(update={"pooling": "mean", "projection_dim": teacher.dim if width != teacher.dim
                                           else None})
    return Tower.from_backbone(settings.student, spec)


@torch.no_grad()
def fit_projection(student: Tower, texts: list[str], targets: torch.Tensor, sample: int, seed: int) -> float | None:
    """Start a fresh projection at the least-squares map from the student's pooled embeddings to the
    teacher's (ridge-regularised, on up to `sample` training texts) instead of at random: the student
    then begins near the teacher's space and distillation refines the backbone. Returns the mean
    cosine to the teacher after the fit (None when the student has no projection)."""
    if student.projection is None:
        return None
    rows = torch.randperm(len(texts), generator=torch.Generator().manual_seed(seed))[:sample].tolist()
    projection, spec = student.projection, student.spec
    student.projection, student.spec = None, spec.model_copy(update={"normalize": False})
    try:
        pooled = torch.as_tensor(student.encode([texts[row] for row in rows]), dtype=torch.float64)
    finally:
        student.projection, student.spec = projection, spec
    wanted = targets[rows].to(torch.float64)
    design = torch.cat([pooled, torch.ones(len(rows), 1, dtype=torch.float64)], dim=1)
    ridge = 1e-3 * design.pow(2).sum(0).mean() * torch.eye(design.shape[1], dtype=torch.float64)
    solution = torch.linalg.solve(design.T @ design + ridge, design.T @ wanted)
    projection.weight.copy_(solution[:-1].T.to(projection.weight.dtype))
    projection.bias.copy_(solution[-1].to(projection.bias.dtype))
    fitted = F.normalize(design @ solution, dim=-1)
    return float(F.cosine_similarity(fitted, F.normalize(wanted, dim=-1), dim=-1).mean())


def _layer_count(student: str, teacher_layers: int) -> int:
    text = student.removeprefix(LAYERS_PREFIX)
    if not text.isdigit() or not 0 < int(text) < teacher_layers:
        raise ConfigError(f"distill.student={student!r}: keep between 1 and {teacher_layers - 1} of the "
                          f"teacher's {teacher_layers} layers")
    return int(text)


def count_parameters(tower: Tower) -> int:
    return sum(parameter.numel() for parameter in tower.parameters())


class DistillationModel(torch.nn.Module):
    """loss = λ·‖s − t‖² + μ·(1 − cos(s, t)) [+ ν·KL(teacher ‖ student) over the teacher's documents],
    averaged over queries (ScalingNote stage 2, plus an optional ranking term).

    The squared distance is summed over dimensions, so on unit vectors both terms share a scale
    (‖s − t‖² = 2 − 2·cos); the teacher's embeddings come precomputed with the batch. The ranking
    term scores every query of the batch against the union of the batch's candidate documents (the
    teacher's top hits, rows of `doc_vectors`, the teacher's index as it is searched).
    """

    def __init__(self, student: Tower, mse_weight: float, cosine_weight: float, *, rank_weight: float = 0.0,
                 rank_temperature: float = 0.05, doc_vectors: torch.Tensor | None = None) -> None:
        super().__init__()
        if rank_weight > 0 and doc_vectors is None:
            raise ValueError("a ranking term needs the teacher index's document vectors")
        self.student = student
        self.mse_weight = mse_weight
        self.cosine_weight = cosine_weight
        self.rank_weight = rank_weight
        self.rank_temperature = rank_temperature
        # Not a parameter and not saved: the index's vectors, read again from the index when needed.
        self.register_buffer("doc_vectors", doc_vectors, persistent=False)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, teacher_embeddings: torch.Tensor,
                candidate_rows: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        student_embeddings = self.student(input_ids=input_ids, attention_mask=attention_mask)
        teacher_embeddings = teacher_embeddings.to(student_embeddings.dtype)
        squared = (student_embeddings - teacher_embeddings).pow(2).sum(dim=-1)
        cosine = F.cosine_similarity(student_embeddings, teacher_embeddings, dim=-1)
        loss = (self.mse_weight * squared + self.cosine_weight * (1 - cosine)).mean()
        if self.rank_weight > 0 and candidate_rows is not None:
            loss = loss + self.rank_weight * self._rank_loss(student_embeddings, teacher_embeddings, candidate_rows)
        return {"loss": loss}

    def _rank_loss(self, student_embeddings: torch.Tensor, teacher_embeddings: torch.Tensor,
                   candidate_rows: torch.Tensor) -> torch.Tensor:
        assert self.doc_vectors is not None
        rows = torch.unique(candidate_rows[candidate_rows >= 0])  # FAISS pads short result lists with -1
        docs = self.doc_vectors[rows].to(student_embeddings.dtype)
        teacher_log_probs = F.log_softmax(teacher_embeddings @ docs.T / self.rank_temperature, dim=-1)
        student_log_probs = F.log_softmax(student_embeddings @ docs.T / self.rank_temperature, dim=-1)
        return F.kl_div(student_log_probs, teacher_log_probs, log_target=True, reduction="batchmean")

"""Two-tower candidate retrieval: a user tower over the recent history and user features, an item
tower over the item id, its genres and its title's text embedding, trained with in-batch negatives.

Item embeddings go into a FAISS index (inner product over unit vectors), so candidate generation for
`Recommend` is one nearest-neighbour search; DIN then re-ranks the candidates.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from personalization.interactions import USER_FIELDS, VocabSizes
from towerline.config import TwoTowerConfig


class TwoTowerModel(nn.Module):
    """`forward(**batch)` → {"loss"}: InfoNCE of each (user state, clicked item) pair against the other
    items of the batch; an item clicked twice in one batch is never its own negative."""

    def __init__(self, sizes: VocabSizes, settings: TwoTowerConfig, item_genres: np.ndarray,
                 user_fields: np.ndarray, title_embeddings: np.ndarray, item_counts: np.ndarray | None = None) -> None:
        super().__init__()
        dim = settings.embedding_dim
        self.settings = settings
        self.item_embedding = nn.Embedding(sizes.items, dim, padding_idx=0)
        self.genre_embedding = nn.Embedding(sizes.genres, dim, padding_idx=0)
        self.user_embedding = nn.Embedding(sizes.users, dim, padding_idx=0) if settings.user_id_embedding else None
        # log q(item): how often an item is a training positive, hence an in-batch negative (add-one smoothed).
        counts = np.ones(sizes.items) if item_counts is None else np.asarray(item_counts, dtype=np.float64) + 1
        self.register_buffer("item_log_frequency", torch.as_tensor(np.log(counts / counts.sum()), dtype=torch.float32))
        self.field_embeddings = nn.ModuleList(
            nn.Embedding(size, dim) for size in (sizes.genders, sizes.ages, sizes.occupations))
        self.register_buffer("item_genres", torch.as_tensor(item_genres, dtype=torch.long))
        self.register_buffer("user_fields", torch.as_tensor(user_fields, dtype=torch.long))
        # Titles embedded once by the text tower: a frozen input the item tower projects.
        self.register_buffer("title_embeddings", torch.as_tensor(title_embeddings, dtype=torch.float32))
        self.title_projection = nn.Linear(self.title_embeddings.shape[1], dim)
        self.item_mlp = _tower_mlp(3 * dim, settings.output_dim)
        self.user_mlp = _tower_mlp((2 + len(USER_FIELDS) + settings.user_id_embedding) * dim, settings.output_dim)
        self.log_scale = nn.Parameter(torch.tensor(1.0 / settings.temperature).log(), requires_grad=False)

    def item_vectors(self, items: torch.Tensor) -> torch.Tensor:
        genres = self.item_genres[items]
        count = (genres != 0).sum(-1, keepdim=True).clamp(min=1)
        genre_mean = self.genre_embedding(genres).sum(-2) / count
        features = [self.item_embedding(items), genre_mean, self.title_projection(self.title_embeddings[items])]
        return F.normalize(self.item_mlp(torch.cat(features, dim=-1)), dim=-1)

    def user_vectors(self, user_index: torch.Tensor, history: torch.Tensor, history_mask: torch.Tensor
                     ) -> torch.Tensor:
        mask = history_mask.unsqueeze(-1).float()
        history_mean = (self.item_embedding(history) * mask).sum(1) / mask.sum(1).clamp(min=1)
        genres = self.item_genres[history]
        genre_count = (genres != 0).sum(-1, keepdim=True).clamp(min=1)
        genre_mean = ((self.genre_embedding(genres).sum(-2) / genre_count) * mask).sum(1) / mask.sum(1).clamp(min=1)
        fields = self.user_fields[user_index]
        features = [history_mean, genre_mean,
                    *(embedding(fields[:, column]) for column, embedding in enumerate(self.field_embeddings))]
        if self.user_embedding is not None:
            features.insert(0, self.user_embedding(user_index))
        return F.normalize(self.user_mlp(torch.cat(features, dim=-1)), dim=-1)

    def forward(self, user_index: torch.Tensor, item_index: torch.Tensor, history: torch.Tensor,
                history_mask: torch.Tensor, **_: torch.Tensor) -> dict[str, torch.Tensor]:
        users = self.user_vectors(user_index, history, history_mask)
        items = self.item_vectors(item_index)
        scores = users @ items.T * self.log_scale.exp()
        if self.settings.logq_correction:
            scores = scores - self.item_log_frequency[item_index][None, :]
        same_item = item_index[:, None] == item_index[None, :]
        scores = scores.masked_fill(same_item & ~torch.eye(len(item_index), dtype=torch.bool,
                                                           device=scores.device), float("-inf"))
        labels = torch.arange(len(item_index), device=scores.device)
        return {"loss": F.cross_entropy(scores, labels)}


def _tower_mlp(inputs: int, outputs: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(inputs, 2 * outputs), nn.ReLU(), nn.Linear(2 * outputs, outputs))


def user_state_batch(history: Mapping[int, list[int]], users: list[int], length: int,
                     feedback: Mapping[int, list[int]] | None = None) -> dict[str, torch.Tensor]:
    """A batch of user states from each user's latest `length` item indexes (oldest first) and,
    when given, the user's feedback on each of them (FEEDBACK_* values; unknown otherwise)."""
    rows = np.zeros((len(users), length), dtype=np.int64)
    mask = np.zeros((len(users), length), dtype=bool)
    known = np.zeros((len(users), length), dtype=np.int64)
    for row, user in enumerate(users):
        recent = history.get(user, [])[-length:]
        rows[row, : len(recent)] = recent
        mask[row, : len(recent)] = True
        if feedback is not None and recent:
            known[row, : len(recent)] = feedback[user][-len(recent):]
    return {"user_index": torch.as_tensor(users, dtype=torch.long), "history": torch.as_tensor(rows),
            "history_mask": torch.as_tensor(mask), "history_feedback": torch.as_tensor(known)}

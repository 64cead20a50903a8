"""Deep Interest Network (Zhou et al., KDD 2018): the CTR ranking model (CRM) of the recommendation side.

An item is [item-id embedding ; mean of its genre embeddings]. A history item also carries the
user's feedback on it (liked / not liked, known before the sample: a learned vector added to it),
because on explicit-rating data such as MovieLens whether a user liked the past items says much
of whether they will like the next one. The local activation unit scores each history item h
against the target item t with an MLP over [h, t, h − t, h * t]; as in the paper the weights are
not softmax-normalised (their scale carries the intensity of the interest), padding slots get
weight 0, and the interest vector is the weighted sum of the history items. The final MLP reads
[user features ; interest ; mean history item ; target item] and outputs one logit (the mean is
DIN's sum pooling of the other behaviour features: it carries how often the user likes things).

Activations are PReLU (the paper's alternative to Dice): Dice normalises with batch statistics,
which makes a sample's score depend on its batch during training; PReLU keeps every score a
function of the sample alone, which the padding and save/load guarantees rely on.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from personalization.interactions import (
    FEEDBACK_UNKNOWN,
    FEEDBACK_VALUES,
    USER_FIELDS,
    CtrData,
    CtrSplit,
    VocabSizes,
    split_batch,
)
from towerline.config import CrmConfig
from towerline.errors import ArtifactError

WEIGHTS_FILE = "model.safetensors"
SPEC_FILE = "crm.json"
SPEC_FORMAT = "towerline-din/2"
# Per item: logit of its smoothed train positive rate, scaled log count (see item_statistics).
ITEM_STATS = 2
USER_REPRESENTATION = ("[user id,] gender, age, occupation embeddings; mean of the history items' "
                       "[id ; genre-mean] + feedback")


def _mlp(inputs: int, hidden: Sequence[int], outputs: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    for width in hidden:
        layers += [nn.Linear(inputs, width), nn.PReLU(width)]
        inputs = width
    layers.append(nn.Linear(inputs, outputs))
    return nn.Sequential(*layers)


class ActivationUnit(nn.Module):
    """DIN's local activation unit: one unnormalised weight per history item, 0 on padding."""

    def __init__(self, item_dim: int, hidden: Sequence[int]) -> None:
        super().__init__()
        self.mlp = _mlp(4 * item_dim, hidden, 1)

    def forward(self, history: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """history [B, L, D], target [B, D], mask [B, L] (True on real items) → weights [B, L]."""
        batch, length, dim = history.shape
        target = target.unsqueeze(1).expand(-1, length, -1)
        features = torch.cat([history, target, history - target, history * target], dim=-1)
        # Flattened so that PReLU's per-channel slopes apply to the hidden units (its channel dim is 1).
        weights = self.mlp(features.reshape(batch * length, 4 * dim)).reshape(batch, length)
        # `where`, not a multiplication: a padded slot contributes an exact 0 whatever its item is.
        return torch.where(mask, weights, torch.zeros_like(weights))


class DinModel(nn.Module):
    """DIN over the interactions artifact's features.

    The item → genres and user → (gender, age, occupation) tables are persistent buffers: they
    travel with the weights, so a batch needs only indexes (see `CtrCollator`).

    `user_representation` is the fixed-size, target-independent user vector for later stages
    (RecLoRA's gating network): [user-feature embeddings (3E, or 4E with the user id) ; mean of the
    history items' representations, feedback included (2E)], E = embedding_dim. DIN's own interest
    vector depends on the target item, so it cannot serve; the mean uses only weights trained by the
    CTR loss (a learned query would add an attention head no loss trains).
    """

    def __init__(self, sizes: VocabSizes, settings: CrmConfig, item_genres: np.ndarray | torch.Tensor | None = None,
                 user_fields: np.ndarray | torch.Tensor | None = None,
                 item_stats: np.ndarray | torch.Tensor | None = None,
                 item_train_counts: np.ndarray | None = None) -> None:
        super().__init__()
        self.sizes = sizes
        self.settings = settings
        dim = settings.embedding_dim
        # Row 0 pads item histories and genre lists, and is the unknown user: a fixed zero vector.
        self.item_embedding = nn.Embedding(sizes.items, dim, padding_idx=0)
        self.genre_embedding = nn.Embedding(sizes.genres, dim, padding_idx=0)
        self.user_embedding = nn.Embedding(sizes.users, dim, padding_idx=0) if settings.user_id_embedding else None
        # Row 0 of a feature is "missing", a category of its own: learned like the others.
        self.gender_embedding = nn.Embedding(sizes.genders, dim)
        self.age_embedding = nn.Embedding(sizes.ages, dim)
        self.occupation_embedding = nn.Embedding(sizes.occupations, dim)
        # Added to a history item's [id ; genre-mean]; row 0 (unknown, padding) adds nothing.
        self.feedback_embedding = nn.Embedding(FEEDBACK_VALUES, 2 * dim, padding_idx=FEEDBACK_UNKNOWN)
        for embedding in (self.item_embedding, self.genre_embedding, self.user_embedding, self.gender_embedding,
                          self.age_embedding, self.occupation_embedding, self.feedback_embedding):
            if embedding is None:
                continue
            # Small initial vectors keep the h * t products of the activation unit near zero at the start.
            nn.init.normal_(embedding.weight, std=0.05)
            if embedding.padding_idx is not None:
                with torch.no_grad():
                    embedding.weight[embedding.padding_idx].zero_()
        self.register_buffer("item_genres", _table(item_genres, (sizes.items, sizes.max_genres)))
        self.register_buffer("user_fields", _table(user_fields, (sizes.users, len(USER_FIELDS))))
        # Per item, 1 + its number of train samples: the mini-batch aware L2's n_j (training only, so not
        # saved; a loaded model carries none and trains without the term).
        self.register_buffer("item_counts", None if item_train_counts is None or settings.embedding_l2 == 0 else
                             torch.as_tensor(np.asarray(item_train_counts) + 1.0, dtype=torch.float32),
                             persistent=False)
        # None (and so not in the state dict) when unused, so that models saved without it still load.
        self.register_buffer("item_stats", _table(item_stats, (sizes.items, ITEM_STATS), torch.float32)
                             if settings.item_statistics else None)

        self.item_dim = 2 * dim
        self.user_dim = (len(USER_FIELDS) + settings.user_id_embedding) * dim
        self.representation_dim = self.user_dim + self.item_dim
        self.attention = ActivationUnit(self.item_dim, settings.attention_hidden)
        extra = ITEM_STATS if settings.item_statistics else 0
        self.mlp = _mlp(self.user_dim + 3 * self.item_dim + extra, settings.mlp_hidden, 1)

    @classmethod
    def from_data(cls, data: CtrData, settings: CrmConfig) -> DinModel:
        stats = item_statistics(data.train, data.sizes.items) if settings.item_statistics else None
        counts = np.bincount(data.train.item_index, minlength=data.sizes.items)
        return cls(data.sizes, settings, data.item_genres, data.user_fields, stats, item_train_counts=counts)

    def item_representation(self, items: torch.Tensor) -> torch.Tensor:
        """items [...] → [..., 2E]: id embedding and the mean of the item's genre embeddings (0 without genres)."""
        genres = self.item_genres[items]
        count = (genres != 0).sum(-1, keepdim=True).clamp(min=1)
        genre_mean = self.genre_embedding(genres).sum(-2) / count
        return torch.cat([self.item_embedding(items), genre_mean], dim=-1)

    def user_features(self, users: torch.Tensor) -> torch.Tensor:
        """users [B] → [B, user_dim]: gender, age and occupation embeddings, after the user id's if it has one."""
        fields = self.user_fields[users]
        parts = [self.gender_embedding(fields[:, 0]), self.age_embedding(fields[:, 1]),
                 self.occupation_embedding(fields[:, 2])]
        if self.user_embedding is not None:
            parts.insert(0, self.user_embedding(users))
        return torch.cat(parts, dim=-1)

    def behaviours(self, history: torch.Tensor, history_feedback: torch.Tensor | None) -> torch.Tensor:
        """history [B, L] (and the user's feedback on each item, unknown when None) → [B, L, 2E]."""
        items = self.item_representation(history)
        return items if history_feedback is None else items + self.feedback_embedding(history_feedback)

    def forward(self, user_index: torch.Tensor, item_index: torch.Tensor, history: torch.Tensor,
                history_mask: torch.Tensor, history_feedback: torch.Tensor | None = None,
                labels: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        target = self.item_representation(item_index)
        behaviours = self.behaviours(history, history_feedback)
        mask = history_mask.bool()
        weights = self.attention(behaviours, target, mask)
        interest = (weights.unsqueeze(-1) * behaviours).sum(1)
        features = [self.user_features(user_index), interest, _masked_mean(behaviours, mask), target]
        if self.item_stats is not None:
            features.append(self.item_stats[item_index])
        logits = self.mlp(torch.cat(features, dim=-1)).squeeze(-1)
        outputs = {"logits": logits}
        if labels is not None:
            outputs["loss"] = F.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype))
            if self.training and self.item_counts is not None:
                outputs["loss"] = outputs["loss"] + self.settings.embedding_l2 * self._batch_embedding_l2(
                    torch.cat([item_index, history[mask]]))
        return outputs

    def _batch_embedding_l2(self, items: torch.Tensor) -> torch.Tensor:
        """DIN's mini-batch aware regulariser: sum over the distinct items of the batch (targets and
        histories) of ||w_j||² / n_j. Only the rows a batch uses are penalised, and rare items more than
        frequent ones: their few samples are what their embeddings overfit to."""
        present = torch.unique(items)
        rows = self.item_embedding.weight[present]
        return ((rows * rows).sum(-1) / self.item_counts[present]).sum()

    def user_representation(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """[B, representation_dim] from a batch's user_index, history and history_mask (other keys
        are ignored); the same width for any history length, history-less users included."""
        behaviours = self.behaviours(batch["history"], batch.get("history_feedback"))
        history_mean = _masked_mean(behaviours, batch["history_mask"].bool())
        return torch.cat([self.user_features(batch["user_index"]), history_mean], dim=-1)


def _masked_mean(items: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """items [B, L, D] averaged over the real slots of mask [B, L]; 0 for an empty history."""
    weights = mask.unsqueeze(-1).to(items.dtype)
    return (items * weights).sum(1) / weights.sum(1).clamp(min=1)


def item_statistics(train: CtrSplit, items: int, prior_weight: float = 10.0) -> np.ndarray:
    """[items, 2] float32 from the train samples alone: the logit of each item's positive rate,
    shrunk towards the global rate by `prior_weight` pseudo-samples (an item seen twice is not
    100 % liked), and log(1 + count) scaled to [0, 1]. Row 0 and unseen items get the prior."""
    counts = np.bincount(train.item_index, minlength=items).astype(np.float64)
    positives = np.bincount(train.item_index, weights=train.label, minlength=items)
    prior = float(train.label.mean()) if len(train) else 0.5
    rate = np.clip((positives + prior_weight * prior) / (counts + prior_weight), 1e-4, 1 - 1e-4)
    log_count = np.log1p(counts)
    scaled = log_count / max(float(log_count.max()), 1.0)
    return np.stack([np.log(rate / (1 - rate)), scaled], axis=1).astype(np.float32)


def _table(values: np.ndarray | torch.Tensor | None, shape: tuple[int, int],
           dtype: torch.dtype = torch.long) -> torch.Tensor:
    if values is None:  # filled by load_state_dict
        return torch.zeros(shape, dtype=dtype)
    table = torch.as_tensor(np.asarray(values), dtype=dtype)
    if tuple(table.shape) != shape:
        raise ValueError(f"lookup table of shape {tuple(table.shape)}, expected {shape}")
    return table.clone()


@torch.no_grad()
def predict_din(model: DinModel, split: CtrSplit, batch_size: int = 1024) -> np.ndarray:
    """Click probabilities for every sample of `split`, in its order (eval mode, no gradients)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    probabilities = []
    try:
        for start in range(0, len(split), batch_size):
            batch = split_batch(split, slice(start, start + batch_size), labels=False)
            logits = model(**{key: value.to(device) for key, value in batch.items()})["logits"]
            probabilities.append(torch.sigmoid(logits.float()).cpu().numpy())
    finally:
        model.train(was_training)
    return np.concatenate(probabilities) if probabilities else np.zeros(0, dtype=np.float32)


def save_din(model: DinModel, directory: Path | str, vocabularies: Mapping[str, Sequence[str]] | None = None) -> Path:
    """Weights (safetensors, the lookup tables included) and crm.json (settings, vocabulary sizes,
    and optionally the feature vocabularies, so that a consumer can check it reads the same artifact)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {key: value.detach().cpu().contiguous() for key, value in model.state_dict().items()}
    save_file(state, str(directory / WEIGHTS_FILE), metadata={"format": "pt"})
    spec: dict[str, Any] = {"format": SPEC_FORMAT, "settings": model.settings.model_dump(mode="json"),
                            "vocab_sizes": model.sizes.to_dict(), "representation_dim": model.representation_dim,
                            "representation": USER_REPRESENTATION}
    if vocabularies is not None:
        spec["vocabularies"] = {name: list(values) for name, values in vocabularies.items()}
    (directory / SPEC_FILE).write_text(json.dumps(spec, indent=2) + "\n")
    return directory


def load_din(directory: Path | str, device: str | torch.device = "cpu") -> DinModel:
    """The model `save_din` wrote, in eval mode."""
    directory = Path(directory)
    spec_path = directory / SPEC_FILE
    if not spec_path.is_file() or not (directory / WEIGHTS_FILE).is_file():
        raise ArtifactError(f"no DIN model in {directory}: expected {SPEC_FILE} and {WEIGHTS_FILE}")
    spec = json.loads(spec_path.read_text())
    if spec.get("format") != SPEC_FORMAT:
        raise ArtifactError(f"{spec_path}: format {spec.get('format')!r}, expected {SPEC_FORMAT!r}")
    model = DinModel(VocabSizes.from_dict(spec["vocab_sizes"]), CrmConfig.model_validate(spec["settings"]))
    model.load_state_dict(load_file(str(directory / WEIGHTS_FILE), device="cpu"))
    return model.to(device).eval()

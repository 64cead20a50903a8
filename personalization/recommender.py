"""The recommendation pipeline behind `Recommend`: two-tower candidates from the item index, minus
what the user has already seen, re-ranked by DIN; popular items for a user with no history.

Plain Python (no gRPC): the servicer is a thin adapter over `Recommender.recommend`, and a test
checks that the service over a real channel answers exactly what this class answers in process.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np
import pandas as pd
import torch
from safetensors.torch import load_file

from indexing.load import LoadedIndex, load_index
from personalization.din import DinModel, load_din
from personalization.interactions import FEEDBACK_DISLIKED, FEEDBACK_LIKED, FEEDBACK_UNKNOWN, VocabSizes, liked_counts
from personalization.two_tower import TwoTowerModel, user_state_batch
from personalization.two_tower_run import SETTINGS_FILE, TWO_TOWER_KIND, WEIGHTS_FILE
from serving.errors import InvalidArgument
from serving.results import Recommendation, RecommendedItem
from towerline.artifacts import MANIFEST_NAME, read_manifest, require_same_space
from towerline.config import IndexConfig, TwoTowerConfig

if TYPE_CHECKING:
    from personalization.reclora_rerank import RecLoraReranker

RecommendState = Literal["latest", "test-start"]
STATE_SUFFIX: dict[str, str] = {"latest": "", "test-start": "@test-start"}

PERSONALISED = "two-tower candidates, DIN re-rank"
COLD_START = "popular items (cold start: no history for this user)"
# Candidates fetched per wanted item: seen items are dropped after the search.
CANDIDATE_FACTOR = 4
MIN_CANDIDATES = 50


@dataclass(frozen=True)
class RecommenderPaths:
    """The artifacts a recommender is served from (the `towerline rec ...` outputs)."""

    interactions: Path
    two_tower: Path
    crm: Path
    item_index: Path
    # Optional last stage: a `rec train-reclora` artifact gated by this CRM.
    reclora: Path | None = None

    @classmethod
    def under(cls, root: Path) -> RecommenderPaths:
        """DIR/{interactions,two-tower,crm,item-index}, and DIR/reclora when there is one."""
        reclora = root / "reclora"
        return cls(root / "interactions", root / "two-tower", root / "crm", root / "item-index",
                   reclora if (reclora / MANIFEST_NAME).is_file() else None)


class Recommender:
    def __init__(self, paths: RecommenderPaths, index_config: IndexConfig, threads: int = 1,
                 state: RecommendState = "latest", reclora_top_n: int = 5) -> None:
        torch.set_num_threads(threads)
        interactions = read_manifest(paths.interactions, "interactions")
        two_tower_manifest = read_manifest(paths.two_tower, TWO_TOWER_KIND)
        self.index: LoadedIndex = load_index(paths.item_index, index_config)
        require_same_space(two_tower_manifest.metadata["embedding_space"], "the two-tower model",
                           self.index.embedding_space, "the item index")
        self.two_tower = _load_two_tower(paths.two_tower)
        self.crm: DinModel = load_din(paths.crm).eval()
        self.reclora: RecLoraReranker | None = None
        if paths.reclora is not None:
            from personalization.reclora_rerank import RecLoraReranker

            crm_fingerprint = read_manifest(paths.crm, "crm").fingerprint
            self.reclora = RecLoraReranker(paths.reclora, paths.interactions, crm_fingerprint, reclora_top_n, threads)
        items = pd.read_parquet(paths.interactions / "items.parquet", columns=["item_index", "item_id", "title"])
        self.item_ids = dict(zip(items["item_index"].tolist(), items["item_id"].tolist(), strict=True))
        self.item_indexes = {item_id: index for index, item_id in self.item_ids.items()}
        self.titles = dict(zip(items["item_index"].tolist(), items["title"].fillna("").tolist(), strict=True))
        users = pd.read_parquet(paths.interactions / "users.parquet", columns=["user_index", "user_id"])
        self.user_indexes = dict(zip(users["user_id"].tolist(), users["user_index"].tolist(), strict=True))
        samples = pd.read_parquet(paths.interactions / "samples.parquet",
                                  columns=["user_index", "item_index", "label", "timestamp", "split"])
        self.histories, self.feedback = _histories(samples, state)
        train = samples[samples["split"] == "train"]
        counts = liked_counts(train["item_index"].to_numpy(), train["label"].to_numpy(), max(self.item_ids) + 1)
        # Most liked first, ties by item index; row 0 (padding) is not an item.
        self.popular = [int(item) for item in np.argsort(-counts[1:], kind="stable") + 1]
        self.state = state
        # The state is part of the version: `rec eval` refuses a service that does not replay test-start.
        reclora_version = f"-{self.reclora.fingerprint[:8]}" if self.reclora else ""
        self.model_version = (f"{interactions.fingerprint[:8]}-{two_tower_manifest.fingerprint[:8]}{reclora_version}"
                              f"{STATE_SUFFIX[state]}")

    def recommend(self, user_id: str, recent_item_ids: list[str], top_k: int,
                  checkpoint: Callable[[], None] = lambda: None) -> Recommendation:
        """Top-k items for the user (known history plus `recent_item_ids`, most recent last)."""
        recent = []
        for position, item_id in enumerate(recent_item_ids):
            if item_id not in self.item_indexes:
                raise InvalidArgument(f"history_item_ids[{position}]", f"unknown item id {item_id!r}")
            recent.append(self.item_indexes[item_id])
        user = self.user_indexes.get(user_id, 0)
        history = self.histories.get(user, []) + recent if user else recent
        if not history:
            return Recommendation(self._popular(top_k, set()), COLD_START, self.model_version)
        # The user's known feedback on past items; none yet on the recent ones sent with the call.
        feedback = (self.feedback.get(user, []) if user else []) + [FEEDBACK_UNKNOWN] * len(recent)
        seen = set(history)
        candidates = self._candidates(user, history, top_k, seen)
        checkpoint()
        # The CRM's view of the user: DIN scores from it, and RecLoRA's gate reads its representation.
        state = user_state_batch({user: history}, [user], self.crm.settings.history_length, {user: feedback})
        scores = self._din_scores(state, candidates)
        order = np.argsort(-scores, kind="stable")
        strategy = PERSONALISED
        if self.reclora is not None and len(order) > 1:
            checkpoint()
            order, scores, strategy = self._reclora_rerank(user, history, state, candidates, order, scores)
        order = order[:top_k]
        items = [RecommendedItem(self.item_ids[candidates[row]], float(scores[row]), self.titles[candidates[row]])
                 for row in order]
        if len(items) < top_k:  # a small catalogue: fill up with popular items not yet shown
            items += self._popular(top_k - len(items), seen | {candidates[row] for row in order})
        return Recommendation(items, strategy, self.model_version)

    @torch.no_grad()
    def _reclora_rerank(self, user: int, history: list[int], state: dict[str, torch.Tensor], candidates: list[int],
                        order: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray, str]:
        """The DIN top-N in RecLoRA's order, with RecLoRA's probabilities as their scores; the rest as DIN left it."""
        assert self.reclora is not None
        head = order[: self.reclora.top_n]
        long_history = history[-self.crm.settings.history_length:]
        probabilities = self.reclora.probabilities(user, long_history, self.crm.user_representation(state),
                                                   [candidates[row] for row in head])
        scores = scores.astype(np.float64).copy()
        scores[head] = probabilities
        reordered = np.concatenate([head[np.argsort(-probabilities, kind="stable")], order[len(head):]])
        return reordered, scores, f"{PERSONALISED}, RecLoRA re-rank of the top {len(head)} ({self.reclora.engine})"

    @torch.no_grad()
    def _candidates(self, user: int, history: list[int], top_k: int, seen: set[int]) -> list[int]:
        length = self.two_tower.settings.history_length
        batch = user_state_batch({user: history}, [user], length)
        vector = self.two_tower.user_vectors(batch["user_index"], batch["history"], batch["history_mask"])
        depth = min(self.index.size, max(MIN_CANDIDATES, CANDIDATE_FACTOR * top_k) + len(seen))
        hits = self.index.search(vector.numpy().astype(np.float32), k=depth)[0]
        return [int(doc_id) for doc_id, _ in hits if int(doc_id) not in seen][: max(MIN_CANDIDATES, top_k)]

    @torch.no_grad()
    def _din_scores(self, state: dict[str, torch.Tensor], candidates: list[int]) -> np.ndarray:
        if not candidates:
            return np.zeros(0)
        count = len(candidates)
        repeated = {key: state[key].repeat(count, 1) for key in ("history", "history_mask", "history_feedback")}
        logits = self.crm(user_index=state["user_index"].repeat(count), item_index=torch.as_tensor(candidates),
                          **repeated)["logits"]
        return torch.sigmoid(logits).numpy()

    def _popular(self, count: int, exclude: set[int]) -> list[RecommendedItem]:
        picked = [item for item in self.popular if item not in exclude][:count]
        # A rank-based score in (0, 1]: cold-start answers carry no model probability.
        return [RecommendedItem(self.item_ids[item], 1.0 / (rank + 1), self.titles[item])
                for rank, item in enumerate(picked)]


def _histories(samples: pd.DataFrame, state: RecommendState) -> tuple[dict[int, list[int]], dict[int, list[int]]]:
    """Each user's items, oldest first (every interaction, or those before the test period), and the
    user's feedback on each (FEEDBACK_LIKED / FEEDBACK_DISLIKED from the sample's label)."""
    # The split is global by time: every train and valid sample came before the test period.
    kept = samples if state == "latest" else samples[samples["split"] != "test"]
    # The order of the pipeline's histories: by time, then item index among equal timestamps.
    ordered = kept.sort_values(["user_index", "timestamp", "item_index"], kind="stable")
    feedback = np.where(ordered["label"].to_numpy() > 0, FEEDBACK_LIKED, FEEDBACK_DISLIKED)
    histories: dict[int, list[int]] = {}
    opinions: dict[int, list[int]] = {}
    users = ordered["user_index"].to_numpy()
    items = ordered["item_index"].to_numpy()
    starts = np.flatnonzero(np.r_[True, users[1:] != users[:-1]]) if len(users) else np.zeros(0, dtype=int)
    for start, end in zip(starts, [*starts[1:], len(users)], strict=True):
        histories[int(users[start])] = items[start:end].tolist()
        opinions[int(users[start])] = feedback[start:end].tolist()
    return histories, opinions


def _load_two_tower(directory: Path) -> TwoTowerModel:
    saved = json.loads((directory / SETTINGS_FILE).read_text())
    weights = load_file(str(directory / WEIGHTS_FILE))
    sizes = VocabSizes.from_dict(saved["sizes"])
    model = TwoTowerModel(sizes, TwoTowerConfig.model_validate(saved["settings"]), weights["item_genres"].numpy(),
                          weights["user_fields"].numpy(), weights["title_embeddings"].numpy())
    model.load_state_dict(weights)
    return model.eval()

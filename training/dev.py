"""Evaluation on dev queries during stage-1 training, and the guard that never ships worse towers.

With `train.dev_queries=N`, N judged queries of the pairs are held out of training (seeded). Their
nDCG@10 is measured before training and after every epoch, by retrieval over a document pool:
every held-out positive plus `train.dev_pool` documents of the corpus (the full corpus would cost
a whole index build per evaluation on CPU). The best epoch's weights are kept; if none beats the
starting point, the untrained towers are what ships, and the artifact says so.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from transformers import TrainerCallback

from evaluation.metrics import score_run
from towerline.beir import Document
from towerline.progress import console
from towerline.tracking import Tracker
from training.dataset import PairSet
from training.model import DualEncoderModel

DEV_TOP_K = 100


@dataclass(frozen=True)
class DevSet:
    queries: dict[str, str]
    qrels: dict[str, dict[str, int]]
    doc_ids: list[str]
    doc_texts: list[str]


def hold_out_dev(
    pairs: PairSet, count: int, pool: int, corpus: dict[str, Document], seed: int, doc_template: str
) -> tuple[PairSet, DevSet]:
    """Split the pairs into training pairs and a dev set of `count` whole queries (never both)."""
    query_ids = sorted(pairs.known_positives)
    random.Random(seed).shuffle(query_ids)
    # At most a fifth: a small collection must keep most of its queries for training.
    dev_ids = set(query_ids[: min(count, max(1, len(query_ids) // 5))])
    train = PairSet([e for e in pairs.examples if e.query_id not in dev_ids],
                    {qid: ids for qid, ids in pairs.known_positives.items() if qid not in dev_ids})
    texts = {e.query_id: e.query_text for e in pairs.examples if e.query_id in dev_ids}
    qrels = {qid: dict.fromkeys(pairs.known_positives[qid], 1) for qid in sorted(dev_ids)}
    positive_ids = sorted({doc_id for judged in qrels.values() for doc_id in judged if doc_id in corpus})
    others = sorted(set(corpus) - set(positive_ids))
    sampled = random.Random(seed + 1).sample(others, min(pool, len(others)))
    doc_ids = positive_ids + sampled
    return train, DevSet(texts, qrels, doc_ids, [corpus[doc_id].render(doc_template) for doc_id in doc_ids])


@torch.no_grad()
def dev_ndcg(model: DualEncoderModel, dev: DevSet) -> float:
    doc_embeddings = model.doc_tower.encode(dev.doc_texts)
    query_ids = list(dev.queries)
    scores = model.query_tower.encode([dev.queries[qid] for qid in query_ids]) @ doc_embeddings.T
    top = np.argsort(-scores, axis=1)[:, :DEV_TOP_K]
    run = {qid: {dev.doc_ids[col]: float(scores[row, col]) for col in top[row]} for row, qid in enumerate(query_ids)}
    return score_run(dev.qrels, run)["ndcg@10"]


class KeepBestOnDev(TrainerCallback):
    """Scores the towers on dev after every epoch (`every_steps`) and keeps the best weights seen,
    the untrained ones included; `restore_best` puts them back at the end."""

    def __init__(self, model: DualEncoderModel, dev: DevSet, tracker: Tracker, every_steps: int) -> None:
        self.model, self.dev, self.tracker = model, dev, tracker
        self.every_steps = max(every_steps, 1)
        self.initial = dev_ndcg(model, dev)
        self.best, self.best_step = self.initial, 0
        self.best_state = _cpu_copy(model)
        self.history = [{"step": 0, "ndcg@10": self.initial}]
        tracker.metrics({"train.dev_ndcg@10": self.initial}, step=0)

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.global_step % self.every_steps and state.global_step != state.max_steps:
            return
        score = dev_ndcg(self.model, self.dev)
        self.history.append({"step": state.global_step, "ndcg@10": score})
        self.tracker.metrics({"train.dev_ndcg@10": score}, step=state.global_step)
        if score > self.best:
            self.best, self.best_step, self.best_state = score, state.global_step, _cpu_copy(self.model)

    def restore_best(self) -> dict[str, Any]:
        """Load the best weights into the model; returns what the artifact records about it."""
        self.model.load_state_dict(self.best_state)
        if self.best_step == 0:
            console.print(f"[yellow]fine-tuning never beat the starting towers on dev (nDCG@10 {self.initial:.4f}): "
                          "shipping the untrained towers")
        # The held-out ids travel with the towers: tune-fusion later tunes on exactly these queries.
        return {"dev_ndcg@10": self.history, "dev_queries": len(self.dev.queries),
                "query_ids": sorted(self.dev.queries), "dev_pool": len(self.dev.doc_ids),
                "best_step": self.best_step, "shipped": "initial" if self.best_step == 0 else "trained"}


def _cpu_copy(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().to("cpu", copy=True) for name, tensor in model.state_dict().items()}

"""`towerline rec train-twotower`: train the candidate model and score it on test users.

Training pairs are the train split's positive samples: (user, history before the sample) → item.
Evaluation follows the usual candidate-generation protocol: each test user's state is their history
before the test period; the relevant items are the ones they rated positively during it; items
they interacted with before are excluded; Recall@50 and NDCG@10 against most-popular.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from safetensors.torch import save_file
from transformers import PrinterCallback, Trainer, TrainingArguments, set_seed

from evaluation.metrics import candidate_metrics
from personalization.interactions import (
    CtrCollator,
    CtrData,
    CtrDataset,
    CtrSplit,
    HistoryBeforeTest,
    liked_counts,
    load_ctr_data,
    positive_samples,
)
from personalization.two_tower import TwoTowerModel, user_state_batch
from towerline.artifacts import ArtifactWriter, Manifest, checksum_tree, fingerprint_of, read_manifest
from towerline.config import TowerlineConfig, TwoTowerConfig
from towerline.errors import DataError
from towerline.tracking import Tracker

TWO_TOWER_KIND = "two-tower"
WEIGHTS_FILE, SETTINGS_FILE, ITEM_VECTORS_FILE = "model.safetensors", "two_tower.json", "item_vectors.npy"
CANDIDATE_DEPTH = 50


def run_train_two_tower(config: TowerlineConfig, interactions: Path, output: Path, tracker: Tracker) -> Manifest:
    settings = config.rec.two_tower
    source = read_manifest(interactions, "interactions")
    data = load_ctr_data(interactions, settings.history_length)
    titles = title_embeddings(interactions, settings, data.sizes.items)
    model = train_two_tower(data, settings, titles)
    history = HistoryBeforeTest.of(data)
    quality = evaluate_candidates(model, data, history, settings.history_length)
    tracker.metrics({f"two_tower.{key}": value for key, value in quality["two_tower"].items()})
    with ArtifactWriter(output, TWO_TOWER_KIND, producer="rec train-twotower", inputs={"interactions": source},
                        config=config) as staged:
        save_file({name: tensor.contiguous() for name, tensor in model.state_dict().items()},
                  staged.path / WEIGHTS_FILE)
        (staged.path / SETTINGS_FILE).write_text(json.dumps(
            {"settings": settings.model_dump(mode="json"), "sizes": data.sizes.to_dict()}, indent=2))
        np.save(staged.path / ITEM_VECTORS_FILE, item_vectors(model, data.sizes.items))
        staged.metadata.update({"dataset": source.metadata.get("dataset"), "items": data.sizes.items - 1,
                                "dim": settings.output_dim, **quality})
        # The item tower's output space: an item index built from these vectors carries it.
        staged.metadata["embedding_space"] = fingerprint_of(checksum_tree(staged.path))
    assert staged.manifest is not None
    return staged.manifest


def title_embeddings(interactions: Path, settings: TwoTowerConfig, items: int) -> np.ndarray:
    """[items, d] text-tower embeddings of the titles (row 0, the padding item, is zero)."""
    if not settings.title_encoder:
        return np.zeros((items, 1), dtype=np.float32)
    from towerline.encoder import Tower
    from towerline.tower_spec import TowerSpec

    table = pd.read_parquet(interactions / "items.parquet", columns=["item_index", "title"])
    tower = Tower.from_backbone(settings.title_encoder, TowerSpec(pooling="mean", max_length=32))
    vectors = tower.encode(table["title"].fillna("").tolist()).astype(np.float32)
    embeddings = np.zeros((items, vectors.shape[1]), dtype=np.float32)
    embeddings[table["item_index"].to_numpy()] = vectors
    return embeddings


def train_two_tower(data: CtrData, settings: TwoTowerConfig, titles: np.ndarray) -> TwoTowerModel:
    set_seed(settings.seed)
    train = positive_samples(data.train)
    counts = np.bincount(train.item_index, minlength=data.sizes.items)
    model = TwoTowerModel(data.sizes, settings, data.item_genres, data.user_fields, titles, counts)
    if len(train) < 2:
        raise DataError("two-tower training: the train split has fewer than 2 positive samples")
    with tempfile.TemporaryDirectory(prefix="towerline-two-tower-") as scratch:
        _fit(model, train, settings, scratch)
    return model.to("cpu").eval()


def _fit(model: TwoTowerModel, train: CtrSplit, settings: TwoTowerConfig, scratch: str) -> None:
    """transformers' Trainer, no checkpoints (a few epochs over the positives): `scratch` stays empty."""
    # Batches drop their remainder (an in-batch softmax over a handful of items says little), so a
    # train split smaller than one batch trains on one batch of everything.
    batch_size = min(settings.batch_size, len(train))
    total_steps = max(1, len(train) // batch_size) * settings.epochs
    args = TrainingArguments(
        output_dir=scratch, num_train_epochs=settings.epochs, warmup_steps=int(0.05 * total_steps),
        per_device_train_batch_size=batch_size, learning_rate=settings.learning_rate,
        lr_scheduler_type="linear", optim="adamw_torch", save_strategy="no",
        logging_strategy="no", seed=settings.seed, use_cpu=not torch.cuda.is_available(),
        remove_unused_columns=False, report_to="none", disable_tqdm=True, dataloader_drop_last=True,
    )
    trainer = Trainer(model=model, args=args, data_collator=CtrCollator(), train_dataset=CtrDataset(train))
    trainer.remove_callback(PrinterCallback)
    trainer.train()


@torch.no_grad()
def item_vectors(model: TwoTowerModel, items: int) -> np.ndarray:
    return model.item_vectors(torch.arange(items)).numpy().astype(np.float32)


@torch.no_grad()
def evaluate_candidates(model: TwoTowerModel, data: CtrData, history: HistoryBeforeTest,
                        history_length: int) -> dict[str, Any]:
    users = sorted(history.relevant)
    if not users:
        raise DataError("two-tower evaluation: no test user has a positive item not seen before")
    qrels = {str(user): dict.fromkeys(map(str, history.relevant[user]), 1) for user in users}
    vectors = item_vectors(model, data.sizes.items)
    batch = user_state_batch(history.before, users, history_length)
    scores = model.user_vectors(batch["user_index"], batch["history"], batch["history_mask"]).numpy() @ vectors.T
    popularity = liked_counts(data.train.item_index, data.train.label, data.sizes.items)
    runs = {"two_tower": {}, "most_popular": {}}
    for row, user in enumerate(users):
        seen = np.asarray([0, *history.before.get(user, [])])
        for name, ranking in (("two_tower", scores[row]), ("most_popular", popularity)):
            ranked = ranking.astype(np.float64).copy()
            ranked[seen] = -np.inf
            top = np.argsort(-ranked, kind="stable")[:CANDIDATE_DEPTH]
            runs[name][str(user)] = {str(item): float(CANDIDATE_DEPTH - rank) for rank, item in enumerate(top)}
    return {name: candidate_metrics(qrels, run) for name, run in runs.items()} | {"test_users": len(users)}


def build_item_index(config: TowerlineConfig, two_tower: Path, output: Path) -> Manifest:
    """`towerline rec index`: the item tower's vectors into a FAISS index artifact (doc ids are item
    indexes), carrying the two-tower model's embedding space like a document index carries its doc tower's."""
    from indexing.build import build_index_from_embeddings

    manifest = read_manifest(two_tower, TWO_TOWER_KIND)
    vectors = np.load(two_tower / ITEM_VECTORS_FILE)[1:]  # row 0 is the padding item
    return build_index_from_embeddings(
        vectors, [str(index) for index in range(1, len(vectors) + 1)], output, index_config=config.index,
        embedding_space=manifest.metadata["embedding_space"], producer="rec index", inputs={"two_tower": manifest},
        config=config, metadata={"dataset": manifest.metadata.get("dataset"), "kind_of_rows": "items"})

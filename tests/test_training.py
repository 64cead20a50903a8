"""Stage 1 on tiny data: the loss, the loop, and the dual-encoder artifact."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from towerline.artifacts import ArtifactWriter, read_manifest
from towerline.beir import load_dataset
from towerline.config import DataConfig, TowerlineConfig
from towerline.errors import ArtifactError
from towerline.towers import load_towers
from towerline.tracking import Tracker
from training.dataset import PAIRS_FILE, PAIRS_KIND
from training.losses import InfoNCELoss
from training.run import init_dual_encoder, run_train


def write_pairs_artifact(dataset: Path, dest: Path) -> Path:
    """A training-pairs artifact built in Python (the Spark job has its own tests)."""
    beir = load_dataset(DataConfig(dir=dataset), ["train"])
    corpus, queries = beir.corpus, beir.queries
    doc_ids = sorted(corpus)
    rows = []
    for query_id, judged in beir.split("train").items():
        for doc_id in judged:
            negatives = [d for d in doc_ids[:40] if d not in judged][:2]
            rows.append({
                "query_id": query_id, "query_text": queries[query_id],
                "positive_id": doc_id, "positive_text": corpus[doc_id].full_text,
                "negative_ids": negatives, "negative_texts": [corpus[d].full_text for d in negatives],
            })
    with ArtifactWriter(dest, PAIRS_KIND, producer="test") as staged:
        pq.write_table(pa.Table.from_pylist(rows), staged.path / PAIRS_FILE)
    return dest


def test_infonce_prefers_the_matching_document() -> None:
    loss = InfoNCELoss(temperature=0.05, learnable=False)
    queries = torch.nn.functional.normalize(torch.randn(4, 8), dim=-1)
    aligned = loss(queries, torch.cat([queries, torch.randn(4, 8)]))
    shuffled = loss(queries, torch.cat([queries.roll(1, 0), torch.randn(4, 8)]))
    assert aligned < shuffled


def _mrr(query_tower, doc_tower, dataset: Path) -> float:
    beir = load_dataset(DataConfig(dir=dataset), ["train"])
    corpus, queries, qrels = beir.corpus, beir.queries, beir.split("train")
    doc_ids = sorted(corpus)
    doc_matrix = doc_tower.encode([corpus[d].full_text for d in doc_ids])
    query_ids = sorted(qrels)
    scores = query_tower.encode([queries[q] for q in query_ids]) @ doc_matrix.T
    reciprocal = []
    for row, query_id in enumerate(query_ids):
        ranking = [doc_ids[i] for i in np.argsort(-scores[row])]
        first = min(ranking.index(d) for d in qrels[query_id])
        reciprocal.append(1.0 / (first + 1))
    return float(np.mean(reciprocal))


def test_training_improves_retrieval_and_writes_artifact(tiny_config: TowerlineConfig, tiny_dataset: Path,
                                                         tmp_path: Path) -> None:
    pairs = write_pairs_artifact(tiny_dataset, tmp_path / "pairs")
    config = tiny_config.model_copy(deep=True)
    config.train.epochs = 12
    baseline = init_dual_encoder(config, tmp_path / "zero")
    trained = run_train(config, pairs, tmp_path / "trained", Tracker(None))
    assert trained.kind == "dual-encoder" and trained.metadata["trained"]
    assert trained.inputs["pairs"] == read_manifest(pairs, PAIRS_KIND).fingerprint
    assert trained.metadata["embedding_space"] != baseline.metadata["embedding_space"]
    before = _mrr(*load_towers(tmp_path / "zero")[:2], tiny_dataset)
    after = _mrr(*load_towers(tmp_path / "trained")[:2], tiny_dataset)
    assert after > before + 0.1, (before, after)


def test_training_refuses_wrong_artifact_kind(tiny_config: TowerlineConfig, tmp_path: Path) -> None:
    init_dual_encoder(tiny_config, tmp_path / "enc")
    with pytest.raises(ArtifactError, match="expected 'training-pairs'"):
        run_train(tiny_config, tmp_path / "enc", tmp_path / "out", Tracker(None))
    assert not (tmp_path / "out").exists()


def test_lora_training_saves_a_plain_model(tiny_config: TowerlineConfig, tiny_dataset: Path, tmp_path: Path) -> None:
    pairs = write_pairs_artifact(tiny_dataset, tmp_path / "pairs")
    config = tiny_config.model_copy(deep=True)
    config.train.lora = True
    config.train.max_steps = 3
    manifest = run_train(config, pairs, tmp_path / "lora", Tracker(None))
    assert manifest.metadata["steps"] == 3
    query_tower = load_towers(tmp_path / "lora")[0]
    assert not any("lora" in name for name, _ in query_tower.backbone.named_parameters())
    init_dual_encoder(config, tmp_path / "base")
    base_query_tower = load_towers(tmp_path / "base")[0]
    changed = [
        not torch.equal(param, base_query_tower.backbone.state_dict()[name])
        for name, param in query_tower.backbone.state_dict().items()
    ]
    assert any(changed) and not all(changed)  # LoRA touched the attention projections only

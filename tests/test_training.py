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
from towerline.errors import ArtifactError, ConfigError
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


@pytest.mark.parametrize("checkpointing", [False, True])
def test_lora_training_saves_a_plain_model(
    tiny_config: TowerlineConfig, tiny_dataset: Path, tmp_path: Path, checkpointing: bool
) -> None:
    """With gradient checkpointing too: the adapters must still receive gradients and train."""
    pairs = write_pairs_artifact(tiny_dataset, tmp_path / "pairs")
    config = tiny_config.model_copy(deep=True)
    config.train.lora = True
    config.train.gradient_checkpointing = checkpointing
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


def _weights(tower) -> dict[str, torch.Tensor]:
    return {name: tensor.clone() for name, tensor in tower.backbone.state_dict().items()}


def test_shared_towers_with_lora_save_one_merged_backbone_twice(
    tiny_config: TowerlineConfig, tiny_dataset: Path, tmp_path: Path
) -> None:
    pairs = write_pairs_artifact(tiny_dataset, tmp_path / "pairs")
    config = tiny_config.model_copy(deep=True)
    config.train.shared_towers = True
    config.train.lora = True
    config.train.max_steps = 3
    run_train(config, pairs, tmp_path / "shared", Tracker(None))
    query_tower, doc_tower, _ = load_towers(tmp_path / "shared")
    query_weights, doc_weights = _weights(query_tower), _weights(doc_tower)
    assert query_weights.keys() == doc_weights.keys()
    assert all(torch.equal(query_weights[name], doc_weights[name]) for name in query_weights)
    init_dual_encoder(config, tmp_path / "base")
    base = _weights(load_towers(tmp_path / "base")[1])
    assert any(not torch.equal(doc_weights[name], base[name]) for name in base)  # the doc tower trained too


def test_resume_after_a_crash_ends_with_the_weights_of_an_uninterrupted_run(
    tiny_config: TowerlineConfig, tiny_dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from towerline.hf_trainer import ProgressAndTracking

    pairs = write_pairs_artifact(tiny_dataset, tmp_path / "pairs")
    config = tiny_config.model_copy(deep=True)
    config.train.max_steps = 6
    config.train.save_steps = 3
    run_train(config, pairs, tmp_path / "straight", Tracker(None))

    original = ProgressAndTracking.on_step_end

    def crash_at_step_4(self, args, state, control, **kwargs):
        original(self, args, state, control, **kwargs)
        if state.global_step == 4:
            raise KeyboardInterrupt("simulated kill after checkpoint-3")

    monkeypatch.setattr(ProgressAndTracking, "on_step_end", crash_at_step_4)
    with pytest.raises(KeyboardInterrupt):
        run_train(config, pairs, tmp_path / "resumed", Tracker(None))
    assert not (tmp_path / "resumed").exists()
    assert (tmp_path / "resumed.checkpoints" / "checkpoint-3").is_dir()
    monkeypatch.setattr(ProgressAndTracking, "on_step_end", original)
    manifest = run_train(config, pairs, tmp_path / "resumed", Tracker(None), resume=True)
    assert manifest.metadata["steps"] == 6 and manifest.metadata["resumed"]
    for straight, resumed in zip(load_towers(tmp_path / "straight")[:2], load_towers(tmp_path / "resumed")[:2],
                                 strict=True):
        expected, actual = _weights(straight), _weights(resumed)
        assert all(torch.allclose(expected[name], actual[name], atol=1e-6) for name in expected)


def test_fp16_on_cpu_is_refused_rather_than_trained_without_a_scaler() -> None:
    from towerline.hf_trainer import mixed_precision

    if torch.cuda.is_available():
        assert mixed_precision("fp16") == {"bf16": False, "fp16": True}
    else:
        with pytest.raises(ConfigError, match="fp16 needs a CUDA GPU"):
            mixed_precision("fp16")
    assert mixed_precision("fp32") == {"bf16": False, "fp16": False}


def test_a_repeated_positive_is_never_its_own_negative() -> None:
    """Query 0's positive shows up again as query 1's hard negative: masked for query 0, a negative for query 1."""
    from training.collator import doc_key

    loss = InfoNCELoss(temperature=0.1, learnable=False)
    queries = torch.nn.functional.normalize(torch.randn(2, 8, generator=torch.Generator().manual_seed(1)), dim=-1)
    docs = torch.nn.functional.normalize(torch.randn(3, 8, generator=torch.Generator().manual_seed(2)), dim=-1)
    docs[2] = docs[0]  # doc "a" again, as query 1's negative
    keys = torch.tensor([doc_key("a"), doc_key("b"), doc_key("a")])
    positive_keys = torch.tensor([[doc_key("a")], [doc_key("b")]])
    masked = loss(queries, docs, keys, positive_keys)
    scores = queries @ docs.T / 0.1
    expected = (torch.nn.functional.cross_entropy(scores[0:1, :2], torch.tensor([0]))
                + torch.nn.functional.cross_entropy(scores[1:2], torch.tensor([1]))) / 2
    assert torch.allclose(masked, expected, atol=1e-6)
    assert not torch.allclose(loss(queries, docs), expected, atol=1e-4)


def test_batches_never_repeat_a_query() -> None:
    from hypothesis import given, settings
    from hypothesis import strategies as st

    from training.batching import arrange, epoch_batches

    @settings(max_examples=60, deadline=None)
    @given(st.lists(st.integers(0, 12), min_size=4, max_size=60), st.integers(2, 6), st.integers(0, 99))
    def check(query_numbers: list[int], batch_size: int, seed: int) -> None:
        import random

        query_ids = [f"q{n}" for n in query_numbers]
        batches = epoch_batches(query_ids, batch_size, random.Random(seed))
        used = [index for batch in batches for index in batch]
        assert len(used) == len(set(used))
        for batch in batches:
            assert len(batch) == batch_size and len({query_ids[i] for i in batch}) == batch_size
        if len(set(query_ids)) >= batch_size:
            assert len(arrange(query_ids, batch_size, 1.0, seed)) % batch_size == 0

    check()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_fp16_on_gpu_trains_with_a_grad_scaler(
    tiny_config: TowerlineConfig, tiny_dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from towerline.hf_trainer import OrderedLossTrainer

    seen = {}
    original = OrderedLossTrainer.train

    def recording_train(self, *args, **kwargs):
        seen["scaler"] = self.accelerator.scaler
        return original(self, *args, **kwargs)

    monkeypatch.setattr(OrderedLossTrainer, "train", recording_train)
    config = tiny_config.model_copy(deep=True)
    config.train.precision = "fp16"
    config.train.max_steps = 3
    manifest = run_train(config, write_pairs_artifact(tiny_dataset, tmp_path / "pairs"), tmp_path / "fp16",
                         Tracker(None))
    assert seen["scaler"] is not None
    assert np.isfinite(manifest.metadata["final_loss"])


def write_topic_dataset(root: Path, seed: int = 5) -> Path:
    """Many positives per query: a query names its topic in topic words; four of the topic's fifteen
    documents are judged relevant, the rest are left unjudged (as in real collections)."""
    import json
    import random

    from towerline.synthetic import vocabulary

    rng, topics = random.Random(seed), vocabulary(0)
    (root / "qrels").mkdir(parents=True)
    docs, queries, rows = [], [], []
    for topic, words in enumerate(topics):
        noise = [w for other in topics if other is not words for w in other]
        for n in range(15):
            body = rng.choices(words, k=12) + rng.choices(noise, k=8)
            docs.append({"_id": f"t{topic}d{n}", "title": "", "text": " ".join(body)})
        for n in range(10):
            query_id = f"t{topic}q{n}"
            queries.append({"_id": query_id, "text": " ".join(rng.sample(words, 3))})
            rows += [f"{query_id}\tt{topic}d{d}\t1" for d in rng.sample(range(15), 4)]
    (root / "corpus.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    (root / "queries.jsonl").write_text("".join(json.dumps(q) + "\n" for q in queries))
    (root / "qrels" / "train.tsv").write_text("\n".join(["query-id\tcorpus-id\tscore", *rows]) + "\n")
    return root


def test_dev_evaluation_keeps_the_best_epoch_and_never_ships_worse_than_the_start(
    tiny_config: TowerlineConfig, tmp_path: Path
) -> None:
    dataset = write_topic_dataset(tmp_path / "topics")
    pairs = write_pairs_artifact(dataset, tmp_path / "pairs")
    config = tiny_config.model_copy(deep=True)
    config.data.dir = dataset
    config.train.dev_queries = 16
    config.train.epochs = 3
    manifest = run_train(config, pairs, tmp_path / "good", Tracker(None))
    dev = manifest.metadata["dev"]
    assert dev["dev_queries"] == 16 and dev["shipped"] == "trained"
    scores = [point["ndcg@10"] for point in dev["dev_ndcg@10"]]
    assert max(scores) > scores[0] + 0.05 and dev["best_step"] > 0

    # A learning rate that wrecks the towers: dev never improves, so the starting towers ship.
    config.train.learning_rate = 5.0
    config.train.epochs = 1
    wrecked = run_train(config, pairs, tmp_path / "wrecked", Tracker(None))
    assert wrecked.metadata["dev"]["shipped"] == "initial"
    init_dual_encoder(config, tmp_path / "start")
    for shipped, start in zip(load_towers(tmp_path / "wrecked")[:2], load_towers(tmp_path / "start")[:2], strict=True):
        expected, actual = _weights(start), _weights(shipped)
        assert all(torch.equal(expected[name], actual[name]) for name in expected)


def test_negative_search_ships_the_recipe_best_on_dev(tiny_config: TowerlineConfig, tmp_path: Path) -> None:
    """Many unjudged relevant documents per topic: BM25's hard negatives are mostly false negatives."""
    from pipelines.pairs import run_pairs
    from training.recipes import search_negative_recipes

    config = tiny_config.model_copy(deep=True)
    config.data.dir = write_topic_dataset(tmp_path / "topics")
    config.train.dev_queries = 16
    run_pairs(config, tmp_path / "pairs")
    manifest = search_negative_recipes(config, tmp_path / "pairs", tmp_path / "encoder", Tracker(None),
                                       work_dir=tmp_path / "search")
    trials = manifest.metadata["negative_search"]
    assert set(trials) == {"in-batch", "bm25", "bm25-filtered"}
    chosen = manifest.metadata["negative_recipe"]
    assert trials[chosen]["dev_ndcg@10"] == max(trial["dev_ndcg@10"] for trial in trials.values())
    assert trials[chosen]["dev_ndcg@10"] > trials[chosen]["start_dev_ndcg@10"]
    print({name: round(trial["dev_ndcg@10"], 4) for name, trial in trials.items()})
    for shipped, candidate in zip(load_towers(tmp_path / "encoder")[:2], load_towers(tmp_path / "search" / chosen)[:2],
                                  strict=True):
        expected, actual = _weights(candidate), _weights(shipped)
        assert all(torch.equal(expected[name], actual[name]) for name in expected)
    assert read_manifest(tmp_path / "encoder", "dual-encoder").metadata["dev"]["dev_queries"] == 16


def test_resume_skips_a_checkpoint_cut_short_by_a_kill(tmp_path: Path) -> None:
    from towerline.hf_trainer import last_checkpoint

    for step, state in ((2, '{"global_step": 2}'), (4, '{"global_step": 4}'), (6, '{"global_st'), (8, None)):
        directory = tmp_path / f"checkpoint-{step}"
        directory.mkdir()
        (directory / "model.safetensors").write_bytes(b"weights")
        if state is not None:
            (directory / "trainer_state.json").write_text(state)
    # checkpoint-8 has no state yet and checkpoint-6's was cut mid-write: both are skipped.
    assert last_checkpoint(tmp_path) == str(tmp_path / "checkpoint-4")
    for step in (2, 4):
        (tmp_path / f"checkpoint-{step}" / "trainer_state.json").unlink()
    with pytest.raises(ConfigError, match="no complete checkpoint"):
        last_checkpoint(tmp_path)

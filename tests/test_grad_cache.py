"""GradCache: a contrastive batch encoded in chunks trains exactly like the whole batch at once."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from towerline.config import TowerlineConfig
from towerline.towers import load_towers
from towerline.tracking import Tracker
from training.collator import PairCollator
from training.dataset import load_pairs
from training.grad_cache import GradCacheTrainer, RngState, grad_cache_step
from training.run import build_model, run_train

BATCH, CHUNK = 6, 4  # chunks of uneven size on purpose (4 + 2 queries, 4 + 4 + 4 docs)


def _without_dropout(backbone: Path, dest: Path) -> Path:
    """Dropout draws different masks for a chunk than for the whole batch; without it the two
    passes must agree to float precision."""
    shutil.copytree(backbone, dest)
    config = json.loads((dest / "config.json").read_text())
    config.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    (dest / "config.json").write_text(json.dumps(config))
    return dest


@pytest.fixture()
def exact_config(tiny_config: TowerlineConfig, tiny_backbone: Path, tmp_path: Path) -> TowerlineConfig:
    config = tiny_config.model_copy(deep=True)
    config.encoder.backbone = str(_without_dropout(tiny_backbone, tmp_path / "no-dropout"))
    config.train.batch_size = BATCH
    return config


def _batch(config: TowerlineConfig, pairs_dir: Path, model, start: int = 0, ranks: int = 1) -> dict[str, torch.Tensor]:
    """BATCH distinct queries from `start`; with `ranks`, the batches of that many ranks from `start` in
    one (each example keeps the position it has on its rank, so it draws the same hard negative)."""
    pairs, _ = load_pairs(pairs_dir)
    by_query = {}
    for example in pairs.examples:
        by_query.setdefault(example.query_id, example)
    examples = list(by_query.values())
    collator = PairCollator(model.query_tower, model.doc_tower, 1, pairs.known_positives, seed=0)
    return collator([(position, examples[start + rank * BATCH + position])
                     for rank in range(ranks) for position in range(BATCH)])


def _gradients(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def test_rng_replay_reproduces_dropout_and_leaves_later_randomness_alone() -> None:
    dropout = torch.nn.Dropout(0.5)
    ones = torch.ones(64)
    state = RngState()
    first = dropout(ones)
    with state.replayed():
        replayed = dropout(ones)
    next_draw = torch.rand(4)
    assert torch.equal(first, replayed) and not torch.equal(first, ones)
    # The replay put the generator back: the next draw is the one that follows `first` alone.
    torch.set_rng_state(state.cpu)
    dropout(ones)
    assert torch.equal(next_draw, torch.rand(4))


def test_grad_cache_gradients_equal_one_whole_batch_pass(exact_config: TowerlineConfig, tiny_dataset: Path,
                                                          tmp_path: Path) -> None:
    from test_training import write_pairs_artifact

    pairs_dir = write_pairs_artifact(tiny_dataset, tmp_path / "pairs")
    torch.manual_seed(0)
    model = build_model(exact_config)
    batch = _batch(exact_config, pairs_dir, model)
    assert batch["doc_input_ids"].size(0) > CHUNK

    model(**batch)["loss"].backward()
    whole = _gradients(model)
    model.zero_grad()
    loss = grad_cache_step(model, batch, CHUNK)
    cached = _gradients(model)
    assert whole.keys() == cached.keys() and len(whole) > 10
    for name in whole:
        assert torch.allclose(whole[name], cached[name], atol=1e-5, rtol=1e-4), name
    assert torch.isclose(loss, model(**batch)["loss"].detach(), atol=1e-6)

    # Plain gradient accumulation (two half batches, each its own contrastive batch) is not the same.
    model.zero_grad()
    for second in (False, True):
        (model(**_half(batch, second))["loss"] / 2).backward()
    accumulated = _gradients(model)
    assert any(not torch.allclose(whole[name], accumulated[name], atol=1e-5) for name in whole)


def _half(batch: dict[str, torch.Tensor], second: bool) -> dict[str, torch.Tensor]:
    """Half the queries with their positives and hard negatives (one per query here)."""
    half = BATCH // 2
    queries = list(range(half, BATCH)) if second else list(range(half))
    docs = queries + [BATCH + row for row in queries]
    return {"query_input_ids": batch["query_input_ids"][queries],
            "query_attention_mask": batch["query_attention_mask"][queries],
            "doc_input_ids": batch["doc_input_ids"][docs], "doc_attention_mask": batch["doc_attention_mask"][docs],
            "doc_keys": batch["doc_keys"][docs], "positive_keys": batch["positive_keys"][queries]}


def test_training_with_grad_cache_ends_with_the_weights_of_whole_batch_training(
    exact_config: TowerlineConfig, tiny_dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from test_training import _weights, write_pairs_artifact

    pairs_dir = write_pairs_artifact(tiny_dataset, tmp_path / "pairs")
    exact_config.train.max_steps = 3
    run_train(exact_config, pairs_dir, tmp_path / "whole", Tracker(None))

    steps = []
    original = GradCacheTrainer.training_step

    def counting_step(self, model, inputs, num_items_in_batch=None):
        steps.append(inputs["query_input_ids"].size(0))
        return original(self, model, inputs, num_items_in_batch)

    monkeypatch.setattr(GradCacheTrainer, "training_step", counting_step)
    exact_config.train.grad_cache_chunk = CHUNK
    run_train(exact_config, pairs_dir, tmp_path / "cached", Tracker(None))
    assert steps == [BATCH] * 3
    for whole, cached in zip(load_towers(tmp_path / "whole")[:2], load_towers(tmp_path / "cached")[:2], strict=True):
        expected, actual = _weights(whole), _weights(cached)
        assert all(torch.allclose(expected[name], actual[name], atol=1e-5) for name in expected)


WORLD = 2


def _ddp_rank_main(rank: int, init_file: str, config_json: str, pairs_dir: str, out_dir: str) -> None:
    """Each rank holds its own batch; DDP's own backward vs GradCache with its manual averaging."""
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    config = TowerlineConfig.model_validate_json(config_json)
    torch.manual_seed(0)
    model = build_model(config)
    batch = _batch(config, Path(pairs_dir), model, start=rank * BATCH)
    wrapped = torch.nn.parallel.DistributedDataParallel(model, find_unused_parameters=True)
    wrapped(**batch)["loss"].backward()
    reference = _gradients(model)
    model.zero_grad(set_to_none=True)
    grad_cache_step(model, batch, CHUNK)
    torch.save({"reference": reference, "cached": _gradients(model)}, f"{out_dir}/rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


@pytest.mark.slow
def test_grad_cache_under_ddp_equals_ddp_on_whole_batches(exact_config: TowerlineConfig, tiny_dataset: Path,
                                                          tmp_path: Path) -> None:
    from test_training import write_pairs_artifact

    pairs_dir = write_pairs_artifact(tiny_dataset, tmp_path / "pairs")
    mp.spawn(_ddp_rank_main, args=(str(tmp_path / "init"), exact_config.model_dump_json(), str(pairs_dir),
                                   str(tmp_path)), nprocs=WORLD, join=True)
    results = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(WORLD)]
    # The ground truth both must equal: one process, one backward over both ranks' batches as one
    # contrastive batch. DDP vs GradCache alone would agree however the cross-rank gather were broken,
    # since both run through it.
    torch.manual_seed(0)
    model = build_model(exact_config)
    model(**_batch(exact_config, pairs_dir, model, ranks=WORLD))["loss"].backward()
    single = _gradients(model)
    for result in results:
        assert result["reference"].keys() == single.keys()
        for name in single:
            assert torch.allclose(result["reference"][name], single[name], atol=1e-5, rtol=1e-4), name
    for result in results:
        reference, cached = result["reference"], result["cached"]
        assert len(reference) > 10
        for name in reference:
            assert torch.allclose(reference[name], cached[name], atol=1e-5, rtol=1e-4), name
    # Averaged across ranks: both ranks hold the same gradients, though their batches differed.
    first, second = results[0]["cached"], results[1]["cached"]
    assert all(torch.allclose(first[name], second[name], atol=1e-6) for name in first)

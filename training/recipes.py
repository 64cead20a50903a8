"""Choosing the negative recipe on dev: in-batch only, BM25 hard negatives, or filtered BM25.

Mined BM25 negatives help where judgments are complete and hurt where many relevant documents are
unjudged (they become false negatives): on one BEIR collection in-batch negatives alone beat BM25
by 0.03 nDCG@10. No recipe is right everywhere, so `towerline train --negative-search` trains
each on the same pairs and dev split and ships the one that scores best on dev.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from towerline.artifacts import Manifest, read_manifest
from towerline.config import TowerlineConfig
from towerline.errors import ConfigError
from towerline.progress import console
from towerline.towers import load_towers, save_dual_encoder
from towerline.tracking import Tracker
from training.dataset import PAIRS_KIND

# Filtered BM25 when the config sets neither: skip BM25's top 3 and drop candidates scoring within
# 5 % of the query's weakest positive (NV-Retriever's positive-aware margin).
FILTER_SKIP_TOP = 3
FILTER_MARGIN = 0.95


@dataclass(frozen=True)
class NegativeRecipe:
    name: str
    hard_negatives: int
    filtered: bool


def recipes(config: TowerlineConfig) -> list[NegativeRecipe]:
    hard = max(1, config.train.hard_negatives)
    return [NegativeRecipe("in-batch", 0, False), NegativeRecipe("bm25", hard, False),
            NegativeRecipe("bm25-filtered", hard, True)]


def filtered_pairs_config(config: TowerlineConfig) -> TowerlineConfig:
    variant = config.model_copy(deep=True)
    pairs = variant.pairs
    pairs.skip_top = pairs.skip_top or FILTER_SKIP_TOP
    pairs.negative_margin = pairs.negative_margin or FILTER_MARGIN
    return variant


def search_negative_recipes(
    config: TowerlineConfig, pairs_path: Path, output: Path, tracker: Tracker, work_dir: Path | None = None
) -> Manifest:
    """Train once per recipe with dev evaluation on, ship the best on dev (ties: the first listed)."""
    from pipelines.pairs import run_pairs
    from pipelines.spark import stop_spark
    from training.run import run_train

    if not config.train.dev_queries:
        raise ConfigError("--negative-search chooses on dev: set train.dev_queries (e.g. 100)")
    work = work_dir or output.parent / f".{output.name}.negative-search"
    filtered = filtered_pairs_config(config)
    console.print(f"negative search: mining filtered BM25 pairs (skip_top={filtered.pairs.skip_top}, "
                  f"negative_margin={filtered.pairs.negative_margin})")
    filtered_pairs = work / "pairs-filtered"
    run_pairs(filtered, filtered_pairs)
    stop_spark(config.spark)
    trials: dict[str, dict[str, Any]] = {}
    for recipe in recipes(config):
        variant = (filtered if recipe.filtered else config).model_copy(deep=True)
        variant.train.hard_negatives = recipe.hard_negatives
        console.rule(f"negative recipe: {recipe.name}")
        manifest = run_train(variant, filtered_pairs if recipe.filtered else pairs_path, work / recipe.name, tracker)
        if manifest is None:  # not rank 0 under DDP
            continue
        dev = manifest.metadata["dev"]
        best = max(point["ndcg@10"] for point in dev["dev_ndcg@10"])
        trials[recipe.name] = {"dev_ndcg@10": best, "start_dev_ndcg@10": dev["dev_ndcg@10"][0]["ndcg@10"],
                               "shipped": dev["shipped"], "config": variant, "manifest": manifest}
        tracker.metrics({f"negative_search.{recipe.name}.dev_ndcg_at_10": best})
    chosen = max(trials, key=lambda name: trials[name]["dev_ndcg@10"])
    winner = trials[chosen]
    console.print(f"negative search: [bold]{chosen}[/] wins on dev "
                  + ", ".join(f"{name} {trial['dev_ndcg@10']:.4f}" for name, trial in trials.items()))
    query_tower, doc_tower, _ = load_towers(work / chosen)
    manifest = save_dual_encoder(
        query_tower, doc_tower, output, producer="train --negative-search", config=winner["config"],
        inputs={"pairs": read_manifest(filtered_pairs if chosen == "bm25-filtered" else pairs_path, PAIRS_KIND)},
        metadata={**winner["manifest"].metadata, "negative_recipe": chosen,
                  "negative_search": {name: {key: trial[key] for key in ("dev_ndcg@10", "start_dev_ndcg@10", "shipped")}
                                      for name, trial in trials.items()}},
    )
    if work_dir is None:
        shutil.rmtree(work, ignore_errors=True)
    return manifest

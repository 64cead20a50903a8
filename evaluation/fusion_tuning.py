"""`towerline eval tune-fusion`: choose how hybrid search fuses the dense and BM25 lists, on dev only.

The dev queries are judged queries of the *train* split that the index's encoder held out of
training (`train.dev_queries`, recorded in its manifest); only when it held none out, a seeded
sample of train queries, with a warning (the dense side has then seen them). The eval split is never
read. Each side is searched once per dev query; every candidate of a small grid (reciprocal-rank
fusion over k, convex combination over the dense weight) is scored on the same lists, and the choice
is written into the index version (`fusion.json`, a new seal of the artifact): by default the
configured fusion stays unless a candidate beats it on dev beyond chance (`fusion.selection`).
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np

from evaluation.metrics import per_query_scores
from indexing.layout import FUSION_FILE, INDEX_KIND
from indexing.load import LoadedIndex, load_index
from serving.app import load_query_encoder
from serving.fusion import describe, fuse
from towerline.artifacts import read_manifest, require_same_space, reseal_artifact
from towerline.beir import load_dataset, positives
from towerline.config import FusionConfig, TowerlineConfig
from towerline.errors import ArtifactError, DataError
from towerline.progress import console
from towerline.tower_spec import DUAL_ENCODER_KIND

RRF_KS = (5, 10, 20, 40, 60, 100)
DENSE_WEIGHTS = tuple(round(0.1 * step, 1) for step in range(1, 10))
# Resamples of the paired randomisation test of each candidate against the default.
TUNE_PERMUTATIONS = 10_000


def fusion_grid(base: FusionConfig) -> list[FusionConfig]:
    return ([base.model_copy(update={"method": "rrf", "rrf_k": k}) for k in RRF_KS]
            + [base.model_copy(update={"method": "convex", "dense_weight": w}) for w in DENSE_WEIGHTS])


def tune_fusion(config: TowerlineConfig, index_path: Path, encoder_path: Path, output: Path | None = None,
                dev_from: Path | None = None) -> dict[str, Any]:
    """Score the grid on dev and seal the winner into `output` (default: the index itself)."""
    index = load_index(index_path, config.index)
    if index.sparse is None:
        raise ArtifactError(f"{index_path}: no BM25 side to fuse (built with index.sparse=false); rebuild the index")
    encoder = load_query_encoder(encoder_path, config.serve)
    require_same_space(encoder.embedding_space, f"query encoder {encoder_path}", index.embedding_space,
                       f"index {index_path}")
    split = config.pairs.split
    dataset = load_dataset(config.data, [split])  # the train split only: eval queries are never read
    qrels = dataset.split(split)
    dev_ids, dev_source = _dev_query_ids(config, index, qrels, dev_from)
    queries = {qid: dataset.queries[qid] for qid in dev_ids}
    dev_qrels = {qid: qrels[qid] for qid in dev_ids}
    depth = config.fusion.depth
    texts = list(queries.values())
    dense = index.search(encoder.encode(texts), depth)
    sparse = index.sparse.search(texts, depth)
    positive_min = config.data.positive_min

    def per_query(hits_per_query: list[list[tuple[str, float]]]) -> np.ndarray:
        run = {qid: dict(hits) for qid, hits in zip(queries, hits_per_query, strict=True)}
        scores = per_query_scores(dev_qrels, run, positive_min)
        return np.array([scores[qid]["ndcg@10"] for qid in queries if qid in scores])

    default = config.fusion
    grid = fusion_grid(default)
    if describe(default) not in {describe(settings) for settings in grid}:
        grid.insert(0, default)
    candidates = []
    for settings in grid:
        fused = [[(hit.doc_id, hit.score) for hit in fuse(d, s, settings, depth)] for d, s in zip(dense, sparse,
                                                                                                 strict=True)]
        scores = per_query(fused)
        candidates.append({"fusion": describe(settings), "ndcg@10": float(scores.mean()), "settings": settings,
                           "scores": scores})
    best, tests = choose_fusion(candidates, describe(default), config.fusion)
    report = {
        "dev_queries": len(queries),
        "dev_source": dev_source,
        "split": split,
        "dense_ndcg@10": float(per_query(dense).mean()),
        "sparse_ndcg@10": float(per_query(sparse).mean()),
        "selection": config.fusion.selection,
        "default": describe(default),
        "chosen": best["fusion"],
        "chosen_ndcg@10": best["ndcg@10"],
        "grid": [{"fusion": c["fusion"], "ndcg@10": c["ndcg@10"], **tests.get(c["fusion"], {})} for c in candidates],
    }
    chosen: FusionConfig = best["settings"]
    reseal_artifact(index.path, output or index.path, INDEX_KIND, producer="eval tune-fusion",
                    new_files={FUSION_FILE: chosen.model_dump_json(indent=2) + "\n"},
                    metadata={"fusion": {key: value for key, value in report.items() if key != "grid"}})
    console.print(f"dev nDCG@10 on {len(queries)} held-out {split} queries ({dev_source}): dense "
                  f"{report['dense_ndcg@10']:.4f}, BM25 {report['sparse_ndcg@10']:.4f}, hybrid "
                  f"{best['ndcg@10']:.4f} with [bold]{best['fusion']}[/]"
                  + (" (the default: no candidate beat it beyond chance)"
                     if best["fusion"] == report["default"] and config.fusion.selection == "significant" else ""))
    return report


def choose_fusion(candidates: list[dict[str, Any]], default: str,
                  settings: FusionConfig) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """The candidate to seal, and each other candidate's paired tests against the default.

    `candidates` hold "fusion" (a `describe` string), "ndcg@10" and "scores" (per dev query, same
    order for all); the one named `default` is among them. Ties go to the first in grid order."""
    # Here, not at the top: scipy (under compare) is for tuning, and the serving path imports this
    # module's neighbours without it.
    from evaluation.compare import challenger_tests

    by_name = {candidate["fusion"]: candidate for candidate in candidates}
    baseline = by_name[default]["scores"]
    challengers = {c["fusion"]: c["scores"] for c in candidates if c["fusion"] != default}
    tests = challenger_tests(baseline, challengers, alpha=settings.tune_alpha, permutations=TUNE_PERMUTATIONS,
                             seed=settings.seed) if challengers else {}
    if settings.selection == "best":
        eligible = candidates
    else:
        eligible = [by_name[default]] + [by_name[name] for name, test in tests.items()
                                         if test["significant"] and test["delta"] > 0]
    best = max(eligible, key=lambda candidate: candidate["ndcg@10"])
    return best, tests


def _dev_query_ids(config: TowerlineConfig, index: LoadedIndex, qrels: dict[str, dict[str, int]],
                   dev_from: Path | None) -> tuple[list[str], str]:
    judged = sorted(qid for qid, docs in qrels.items() if positives(docs, config.data.positive_min))
    encoder_dir = dev_from or Path(str(index.manifest.metadata.get("encoder", "")))
    held_out: list[str] = []
    if (encoder_dir / "manifest.json").is_file():
        dev_record = read_manifest(encoder_dir, DUAL_ENCODER_KIND).metadata.get("dev") or {}
        held_out = [qid for qid in dev_record.get("query_ids", []) if qid in qrels]
    if held_out:
        return held_out, f"held out of training by {encoder_dir.name}"
    if not judged:
        raise DataError(f"qrels/{config.pairs.split}: no judged query to tune the fusion on")
    console.print(f"[yellow]the index's encoder held no dev queries out of training: tuning on "
                  f"{min(config.fusion.dev_queries, len(judged))} seeded {config.pairs.split} queries it may "
                  "have trained on (the dense side looks stronger on them than on new queries)")
    sample = random.Random(config.fusion.seed).sample(judged, min(config.fusion.dev_queries, len(judged)))
    return sorted(sample), f"seeded sample of {config.pairs.split} (not held out of training)"


"""`towerline data split`: a seeded train/eval split of one qrels split, for datasets without train qrels.

Most BEIR collections ship only test qrels. When asked (`--split-test-queries FRACTION`), a
fraction of the evaluation split's queries becomes training queries and the rest stay for
evaluation; the artifact says so in its manifest and every result built on it repeats it, so no
one mistakes it for the official protocol. Stages read it through `data.qrels_dir=ARTIFACT/qrels`.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

from towerline.artifacts import ArtifactWriter, Manifest
from towerline.beir import QRELS_DIR, Qrels, load_dataset, positives
from towerline.config import TowerlineConfig
from towerline.errors import DataError

SPLIT_KIND = "qrels-split"
QRELS_HEADER = "query-id\tcorpus-id\tscore"


def split_eval_queries(config: TowerlineConfig, fraction: float, seed: int, output: Path) -> Manifest:
    """Move `fraction` of the eval split's judged queries into the train split; write both as an artifact."""
    if not 0.0 < fraction < 1.0:
        raise DataError(f"--split-test-queries must be between 0 and 1 (exclusive), got {fraction}")
    source, train_split = config.eval.split, config.pairs.split
    dataset = load_dataset(config.data, [source])
    qrels = dataset.split(source)
    judged = sorted(qid for qid, docs in qrels.items() if positives(docs, config.data.positive_min))
    random.Random(seed).shuffle(judged)
    train_count = round(len(judged) * fraction)
    if train_count == 0 or train_count == len(judged):
        raise DataError(
            f"qrels/{source}: {len(judged)} judged queries cannot be split {fraction:g}/{1 - fraction:g}; "
            "each side needs at least one"
        )
    train_ids = set(judged[:train_count])
    held_out = {qid: docs for qid, docs in qrels.items() if qid not in train_ids}
    protocol = describe_protocol(source, train_count, len(judged), fraction, seed)
    with ArtifactWriter(output, SPLIT_KIND, producer="data split", config=config) as staged:
        (staged.path / QRELS_DIR).mkdir()
        _write_qrels(staged.path / QRELS_DIR / f"{train_split}.tsv", {qid: qrels[qid] for qid in sorted(train_ids)})
        _write_qrels(staged.path / QRELS_DIR / f"{source}.tsv", held_out)
        staged.metadata.update(
            protocol=protocol,
            dataset=dataset.files.identity(),
            source_split=source,
            fraction=fraction,
            seed=seed,
            train_queries=train_count,
            eval_queries=len(judged) - train_count,
        )
    assert staged.manifest is not None
    return staged.manifest


def describe_protocol(source: str, train_count: int, judged: int, fraction: float, seed: int) -> str:
    return (
        f"split-test-queries: {train_count} of the {judged} judged queries of qrels/{source} "
        f"(fraction {fraction:g}, seed {seed}) trained on, the other {judged - train_count} evaluated; "
        "not the official protocol"
    )


def split_summary(manifest: Manifest) -> dict[str, Any]:
    keys = ("protocol", "source_split", "fraction", "seed", "train_queries", "eval_queries")
    return {key: manifest.metadata[key] for key in keys}


def _write_qrels(path: Path, qrels: Qrels) -> None:
    lines = [QRELS_HEADER] + [
        f"{query_id}\t{doc_id}\t{score}" for query_id, judged in qrels.items() for doc_id, score in judged.items()
    ]
    path.write_text("\n".join(lines) + "\n")

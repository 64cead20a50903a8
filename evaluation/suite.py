"""`towerline eval suite`: one dual encoder over several BEIR-format datasets, as BEIR reports a model.

Per dataset: the doc tower embeds that corpus into its own index (OUT/<dataset>/index, with its
BM25 side when index.sparse), the query tower scores the eval split in every requested mode
(OUT/<dataset>/eval-<mode>), and OUT/summary.json holds the table with the mean over datasets,
written last.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from evaluation.metrics import HEADLINE_METRICS
from evaluation.service import evaluate_artifacts, modes_served
from towerline.beir import locate_dataset
from towerline.config import TowerlineConfig
from towerline.errors import DataError
from towerline.progress import console
from towerline.results import result_header

SUMMARY_FILE = "summary.json"


def run_suite(configs: list[TowerlineConfig], encoder: Path, output: Path, mode: str = "dense") -> dict[str, Any]:
    """`configs`: one per dataset (they differ in data.dir). `mode`: dense, sparse, hybrid or all."""
    from indexing.build import build_index

    names = [locate_dataset(config.data).name for config in configs]  # every dataset found before any work
    if len(set(names)) != len(names):
        raise DataError(f"eval suite: two datasets share a name ({', '.join(names)}); the outputs are named by it")
    rows: dict[str, dict[str, dict[str, float]]] = {}
    identities: dict[str, dict[str, str]] = {}
    for name, config in zip(names, configs, strict=True):
        console.rule(f"[bold]{name}")
        index = output / name / "index"
        manifest = build_index(config, encoder, index)
        identities[name] = manifest.metadata["dataset"]
        modes = modes_served(config.index.sparse) if mode == "all" else (mode,)
        rows[name] = {each: evaluate_artifacts(config, index, encoder, output / name / f"eval-{each}", each)
                      for each in modes}
    modes_everywhere = [each for each in next(iter(rows.values())) if all(each in row for row in rows.values())]
    mean = {each: {metric: sum(row[each][metric] for row in rows.values()) / len(rows) for metric in HEADLINE_METRICS}
            for each in modes_everywhere}
    summary = {**result_header("eval-suite"), "datasets": identities, "split": configs[0].eval.split,
               "rows": rows, "mean": mean}
    (output / SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n")
    return summary

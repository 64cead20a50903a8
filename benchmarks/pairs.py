"""`towerline bench pairs`: the click-log pairs job at growing log sizes on the configured Spark master,
and the batch-embedding job (`towerline embed`) against the local embedding path.

For each size a synthetic log (towerline/synthetic_clicks.py, Parquet, over the configured corpus)
is generated once under the work directory (kept for reruns; generation is not timed), then the job
runs end to end — read, validate, quarantine, positives, the three negative sources, write — and
its wall time gives rows/s. The ratio of the largest size's time to the smallest's, against the
ratio of their sizes, says whether any step grows faster than the data. The embedding row embeds the
configured corpus with the same doc tower twice — in Spark, and as `index build` does in-process —
and reports docs/s of each and the largest difference between the two sets of vectors.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np

from pipelines.click_pairs import run_click_pairs
from pipelines.spark import stop_spark
from towerline.beir import load_dataset
from towerline.config import TowerlineConfig
from towerline.progress import console
from towerline.results import result_header, write_results
from towerline.synthetic_clicks import ClickLogSpec, write_click_logs

SPEC_FILE = "spec.json"


def run_pairs_bench(config: TowerlineConfig, sizes: list[int], work_dir: Path, results: Path,
                    seed: int = 0, encoder: Path | None = None) -> dict[str, Any]:
    started = time.perf_counter()
    documents = list(load_dataset(config.data).corpus.values())
    runs = []
    for rows in sorted(sizes):
        console.rule(f"[bold]click logs: {rows:,} rows")
        logs = _logs(documents, work_dir / f"logs-{rows}", ClickLogSpec(rows=rows, seed=seed))
        output = work_dir / f"pairs-{rows}"
        shutil.rmtree(output, ignore_errors=True)
        began = time.perf_counter()
        manifest = run_click_pairs(config, logs["path"], output)
        seconds = time.perf_counter() - began
        stop_spark(config.spark)  # each size starts from a fresh session, as a scheduled job would
        metadata = manifest.metadata
        runs.append({"rows": logs["rows"], "queries": logs["queries"], "seconds": round(seconds, 1),
                     "rows_per_s": round(logs["rows"] / seconds), "pairs": metadata["pairs"],
                     "dev_pairs": metadata["dev_pairs"], "quarantined": metadata["quarantined"],
                     "negatives_by_source": metadata["negatives_by_source"]})
        console.print(f"{logs['rows']:,} rows in {seconds:.1f} s: {logs['rows'] / seconds:,.0f} rows/s")
    console.rule("[bold]batch embedding: Spark vs local")
    embedding = _embedding(config, documents, encoder, work_dir)
    smallest, largest = runs[0], runs[-1]
    summary = {
        **result_header("pairs"),
        "spark": {"master": config.spark.master, "driver_memory": config.spark.driver_memory,
                  "shuffle_partitions": config.spark.shuffle_partitions},
        "corpus": {"dataset": config.data.dataset, "documents": len(documents)},
        "runs": runs,
        "scaling": {"size_ratio": round(largest["rows"] / smallest["rows"], 2),
                    "time_ratio": round(largest["seconds"] / smallest["seconds"], 2),
                    "target_time_ratio_at_most": round(1.1 * largest["rows"] / smallest["rows"], 2)},
        "embedding": embedding,
        "total_seconds": round(time.perf_counter() - started, 1),
        "config": {"clicks": config.clicks.model_dump(mode="json"), "pairs": config.pairs.model_dump(mode="json")},
    }
    write_results(results, summary)
    console.print_json(data={"runs": runs, "scaling": summary["scaling"], "embedding": embedding})
    return summary


def _logs(documents: list, directory: Path, spec: ClickLogSpec) -> dict[str, Any]:
    """The log for `spec` under `directory`, generated unless a complete one is there already."""
    marker = directory / SPEC_FILE
    wanted = {"rows": spec.rows, "seed": spec.seed, "documents": len(documents)}
    if marker.is_file() and {key: json.loads(marker.read_text()).get(key) for key in wanted} == wanted:
        written = json.loads(marker.read_text())
    else:
        shutil.rmtree(directory, ignore_errors=True)
        began = time.perf_counter()
        written = write_click_logs(documents, directory / "parquet", spec)
        written["generate_seconds"] = round(time.perf_counter() - began, 1)
        marker.write_text(json.dumps(written))  # last: a log without it is regenerated
    return {**written, "path": directory / "parquet"}


def _embedding(config: TowerlineConfig, documents: list, encoder: Path | None, work_dir: Path) -> dict[str, Any]:
    """docs/s of `towerline embed` (Spark) and of the local path on the same corpus and doc tower."""
    from indexing.build import embed_texts
    from pipelines.embed_corpus import run_embed_corpus
    from towerline.doc_embeddings import read_embeddings
    from towerline.towers import load_towers, save_dual_encoder, towers_from_backbone

    encoder_name = encoder.name if encoder is not None else f"{config.encoder.backbone} (untrained towers)"
    if encoder is None:  # the configured backbone's untrained towers: the same cost as trained ones
        encoder = work_dir / "encoder-zero-shot"
        if not encoder.is_dir():
            save_dual_encoder(*towers_from_backbone(config.encoder), encoder, producer="bench pairs", config=config)
    output = work_dir / "embeddings"
    shutil.rmtree(output, ignore_errors=True)
    began = time.perf_counter()
    run_embed_corpus(config, encoder, output)
    spark_seconds = time.perf_counter() - began
    stop_spark(config.spark)
    doc_ids, spark_vectors, _ = read_embeddings(output)
    _, doc_tower, _ = load_towers(encoder)
    by_id = {document.doc_id: document for document in documents}
    texts = [by_id[doc_id].render(doc_tower.spec.document_template) for doc_id in doc_ids]
    began = time.perf_counter()
    local_vectors = embed_texts(doc_tower, texts, config.index)
    local_seconds = time.perf_counter() - began
    return {"documents": len(doc_ids), "encoder": encoder_name, "spark_seconds": round(spark_seconds, 1),
            "spark_docs_per_s": round(len(doc_ids) / spark_seconds, 1), "local_seconds": round(local_seconds, 1),
            "local_docs_per_s": round(len(doc_ids) / local_seconds, 1),
            "spark_over_local": round(local_seconds / spark_seconds, 2),
            "max_abs_difference": float(np.abs(spark_vectors - local_vectors).max())}

"""`towerline bench reclora`: RecLoRA against DIN and its ablations on one dataset (ML-100K by default).

Same interactions pipeline, split and samples as `bench rec`. Rows, all scored on the same test rows
(the whole test split, or a seeded sample of rec.reclora.eval_samples):
- din: the CRM alone, one per DIN seed (mean ± std); the first seed's DIN is the gate's input;
- shared_lora: the LLM with one LoRA for every user (K = 1, no gate; TALLRec-style);
- reclora: the meta-LoRA bank mixed per user by the gate over DIN's user representation;
- reclora_recent_history: the prompt's short history is the latest items, not the most relevant;
- reclora_uniform_alpha: the bank without the gate (α = 1/K for everyone).
Every LLM row uses the same LLM, the same Few2Many training sample and the same budget (epochs,
batch, learning rate). The reclora row is also exported to ONNX: parity and samples/s in both engines.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from benchmarks.rec import metric_mean_std
from towerline.config import TowerlineConfig
from towerline.progress import console
from towerline.results import result_header, write_results

# Each LLM row: the changes to rec.reclora it makes.
LLM_ROWS: dict[str, dict[str, Any]] = {
    "shared_lora": {"experts": 1, "routing": "uniform"},
    "reclora": {},
    "reclora_recent_history": {"prompt_history_mode": "recent"},
    "reclora_uniform_alpha": {"routing": "uniform"},
}


def run_reclora_bench(config: TowerlineConfig, dataset: str, din_seeds: list[int], rows: list[str], root: Path,
                      results_path: Path) -> dict[str, Any]:
    from personalization.ctr_metrics import ctr_metrics
    from personalization.din import predict_din
    from personalization.interactions import load_ctr_data, take_rows
    from personalization.reclora_data import ItemTexts, few2many_rows
    from personalization.reclora_run import train_reclora
    from personalization.train_crm import json_safe, train_din
    from pipelines.interactions import run_interactions
    from pipelines.spark import stop_spark

    started = time.perf_counter()
    variant = config.model_copy(deep=True)
    variant.rec.data.dataset = dataset
    interactions = run_interactions(variant, root / "interactions")
    stop_spark(variant.spark)
    settings = variant.rec.reclora
    data = load_ctr_data(root / "interactions", variant.rec.crm.history_length)
    eval_rows = few2many_rows(data.test, settings.eval_samples or len(data.test), settings.seed)
    scored = take_rows(data.test, eval_rows)

    din_rows, crms = [], []
    for seed in din_seeds:
        began = time.perf_counter()
        trained = train_din(data, variant.rec.crm, root / f"crm-seed{seed}", seed=seed)
        crms.append(trained.model)
        on_scored_rows = ctr_metrics(scored.label, predict_din(trained.model, scored), scored.user_index)
        din_rows.append({"seed": seed, "test": trained.test, "seconds": round(time.perf_counter() - began, 1),
                         "scored_rows": on_scored_rows})
    texts = ItemTexts.load(root / "interactions", data.sizes.items, settings.title_encoder)
    llm_rows: dict[str, Any] = {}
    for name in rows:
        console.rule(f"[bold]{name}")
        row_settings = settings.model_copy(update=LLM_ROWS[name])
        result = train_reclora(data, crms[0], texts, row_settings)
        llm_rows[name] = {"seed": row_settings.seed, "settings_changed": LLM_ROWS[name], **result.summary()}
        if name == "reclora":
            llm_rows[name]["onnx"] = _onnx_report(result, data, crms[0], texts, root / "reclora-onnx",
                                                  config.export.opset)
    summary = {
        **result_header("reclora"),
        "dataset": {key: interactions.metadata[key] for key in ("dataset", "users", "items", "samples", "label")},
        "llm": settings.llm, "train_samples": settings.train_samples, "test_rows_scored": len(eval_rows),
        "din": {"per_seed": din_rows, "scored_rows": metric_mean_std([row["scored_rows"] for row in din_rows]),
                "full_test": metric_mean_std([row["test"] for row in din_rows])},
        "llm_rows": llm_rows,
        "total_seconds": round(time.perf_counter() - started, 1), "config": config.flat(),
    }
    summary = json_safe(summary)
    write_results(results_path, summary)
    console.print_json(data={"din": summary["din"]["scored_rows"],
                             **{name: row["test"] for name, row in llm_rows.items()}})
    return summary


def _onnx_report(result: Any, data: Any, crm: Any, texts: Any, directory: Path, opset: int) -> dict[str, Any]:
    from personalization.reclora_onnx import export_and_check
    from personalization.reclora_run import parity_batches

    directory.mkdir(parents=True, exist_ok=True)
    return export_and_check(result.scorer, parity_batches(data, crm, texts, result), directory, opset)

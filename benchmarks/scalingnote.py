"""`towerline bench scalingnote`: ScalingNote's two stages against their baselines, in one run.

On one dataset (SciFact by default), with the same pairs and seed for every trained model:
BM25 with stemming; dual towers fine-tuned from each teacher backbone (MiniLM-L6, mpnet — the
MiniLM row is also the end-to-end baseline: the small model trained directly as a dual tower);
and the distilled student (MiniLM-L6 + a projection to the teacher's width) searching the
largest teacher's own index. For each: nDCG@10 / Recall@100 / MRR@10 on the eval split, and the
ONNX query encoder's latency (one query, p50) and throughput (batch 32) on this machine.
Every figure comes from this run; ratios between rows are what to read on a noisy machine.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from evaluation.latency import encoder_latency
from evaluation.metrics import score_run
from evaluation.retrieval import retrieval_metrics
from indexing.layout import INDEX_KIND
from pipelines.pseudo_queries import KIND as PSEUDO_QUERIES_KIND
from serving.onnx_format import ONNX_KIND
from towerline.artifacts import read_manifest
from towerline.beir import load_dataset, positives
from towerline.config import TowerlineConfig, with_overrides
from towerline.progress import console
from towerline.results import result_header, write_results
from towerline.tower_spec import DUAL_ENCODER_KIND, QUERY_ENCODER_KIND
from towerline.tracking import Tracker
from training.dataset import PAIRS_KIND


def run_scalingnote_bench(
    config: TowerlineConfig, teachers: list[str], student: str, root: Path, results_path: Path, *,
    reuse: bool = False, distil_from: str | None = None, teacher_overrides: dict[str, list[str]] | None = None,
) -> dict[str, Any]:
    """`teachers` from smallest to largest; `distil_from` (default: the largest) is distilled into
    `student`, so that a further, larger row (an LLM) can join the table without changing the student's
    teacher. The smallest is the end-to-end baseline. With `reuse`, the
    pairs, pseudo-queries and teacher artifacts already under `root` (from an earlier run with the
    same config) are used as they are, and the JSON lists them; the student too when its distill
    settings are also the same (else it is distilled anew).
    `teacher_overrides` apply to one teacher's row alone (an LLM's pooling, gradient checkpointing)."""
    from pipelines.pairs import run_pairs
    from pipelines.pseudo_queries import run_pseudo_queries
    from pipelines.spark import stop_spark

    teacher = distil_from or teachers[-1]
    if teacher not in teachers:
        from towerline.errors import ConfigError

        raise ConfigError(f"--distil-from {teacher!r}: not one of the teachers ({', '.join(teachers)})")
    started = time.perf_counter()
    seconds: dict[str, float] = {}
    reused: list[str] = []

    def stage(name: str, artifact: Path, kind: str, work: Any, made_with: TowerlineConfig = config,
              ignored: tuple[str, ...] = NOT_SHAPING, remake_other: bool = False, made_from: Any = None) -> Any:
        """Reuse `artifact` when --reuse and it was made with the same settings (and from the `made_from`
        encoder manifest, if given); one made otherwise is refused, or made anew when `remake_other`
        (the student, whose teacher or distill settings may change)."""
        if reuse and (artifact / "manifest.json").is_file():
            differing = settings_differing(artifact, made_with, ignored)
            if made_from is not None and read_manifest(artifact, kind).inputs.get("encoder") != made_from.fingerprint:
                differing.append("inputs.encoder")
            if not differing:
                reused.append(name)
                return read_manifest(artifact, kind)
            if not remake_other:
                from towerline.errors import ConfigError

                raise ConfigError(f"--reuse: {artifact} was made with other settings ({', '.join(differing[:5])}); "
                                  "run without --reuse or in another --work-dir")
        return _timed(seconds, name, work)

    dataset = load_dataset(config.data, [config.eval.split])
    qrels = dataset.split(config.eval.split)
    queries = {qid: dataset.queries[qid] for qid, docs in qrels.items() if positives(docs, config.data.positive_min)}
    rows: dict[str, dict[str, Any]] = {"bm25_stemmed": _timed(seconds, "bm25", lambda: _bm25(config, dataset, queries))}
    stage("pairs", root / "pairs", PAIRS_KIND, lambda: run_pairs(config, root / "pairs"))
    stage("pseudo_queries", root / "pseudo-queries", PSEUDO_QUERIES_KIND,
          lambda: run_pseudo_queries(config, root / "pseudo-queries"))
    stop_spark(config.spark)
    overrides = teacher_overrides or {}
    for backbone in teachers:
        variant = _with_backbone(config, backbone, overrides.get(backbone))
        rows[f"dual_tower_{Path(backbone).name}"] = _dual_tower_row(variant, root, queries, stage)
        if overrides.get(backbone):
            rows[f"dual_tower_{Path(backbone).name}"]["overrides"] = overrides[backbone]
    rows["student"] = _student_row(_with_backbone(config, teacher, overrides.get(teacher)), student, root, queries,
                                   stage)
    # Latency last, every encoder back to back, so that all rows are timed under the same conditions.
    _timed(seconds, "latency", lambda: _measure_latency(config, rows, list(queries.values())))
    summary = {
        **result_header("scalingnote"),
        "dataset": dataset.files.identity(),
        "split": config.eval.split,
        "queries": len(queries),
        "rows": rows,
        "distilled_teacher": f"dual_tower_{Path(teacher).name}",
        "targets": _targets(rows, teacher, teachers[0]),
        "stage_seconds": seconds,
        # Artifacts taken from an earlier run in the same work dir (bench scalingnote --reuse).
        "reused_artifacts": reused,
        "total_seconds": round(time.perf_counter() - started, 1),
        "config": config.flat(),
    }
    write_results(results_path, summary)
    console.print_json(data={"rows": rows, "targets": summary["targets"]})
    return summary


# Settings that do not shape the reused artifacts; the distill section shapes the student alone.
NOT_SHAPING_STUDENT = ("tracking", "run_dir", "rec")
NOT_SHAPING = ("distill", *NOT_SHAPING_STUDENT)


def settings_differing(artifact: Path, expected: TowerlineConfig, ignored: tuple[str, ...]) -> list[str]:
    """The settings (other than `ignored` sections) in which `artifact`'s config.yaml differs from `expected`."""
    from towerline.config import load_config

    made_with = load_config(artifact / "config.yaml").flat()
    wanted = expected.flat()
    return sorted(key for key in set(made_with) | set(wanted)
                  if not key.startswith(ignored) and made_with.get(key) != wanted.get(key))


def _timed(seconds: dict[str, float], name: str, work: Any) -> Any:
    console.rule(f"[bold]{name}")
    started = time.perf_counter()
    result = work()
    seconds[name] = round(time.perf_counter() - started, 1)
    return result


def _bm25(config: TowerlineConfig, dataset: Any, queries: dict[str, str]) -> dict[str, Any]:
    from towerline.bm25 import build_index

    doc_ids = list(dataset.corpus)
    index = build_index(doc_ids, [dataset.corpus[d].full_text for d in doc_ids], "english")
    query_ids = list(queries)
    found = index.search([queries[q] for q in query_ids], 100)
    run = {qid: dict(hits) for qid, hits in zip(query_ids, found, strict=True)}
    return {"model": "bm25s + english stemming", **score_run(dataset.split(config.eval.split), run,
                                                              config.data.positive_min)}


def _with_backbone(config: TowerlineConfig, backbone: str, overrides: list[str] | None = None) -> TowerlineConfig:
    """The config of one row: its backbone, plus the overrides given for that backbone alone."""
    variant = with_overrides(config, overrides) if overrides else config.model_copy(deep=True)
    variant.encoder.backbone = backbone
    return variant


def parse_teacher_overrides(items: list[str], teachers: list[str]) -> dict[str, list[str]]:
    """`BACKBONE:key=value` items (--teacher-override) → overrides by teacher."""
    from towerline.errors import ConfigError

    by_teacher: dict[str, list[str]] = {}
    for item in items:
        backbone, sep, override = item.partition(":")
        if not sep or backbone not in teachers or "=" not in override:
            raise ConfigError(f"--teacher-override {item!r}: expected TEACHER:key=value with TEACHER one of "
                              f"{', '.join(teachers)} (e.g. smollm2:encoder.pooling=last_token)")
        by_teacher.setdefault(backbone, []).append(override)
    return by_teacher


def _dual_tower_row(variant: TowerlineConfig, root: Path, queries: dict[str, str], stage: Any) -> dict[str, Any]:
    from indexing.build import build_index
    from serving.onnx_export import run_export
    from training.run import run_train

    backbone = variant.encoder.backbone
    base = root / Path(backbone).name
    manifest = stage(f"train.{backbone}", base / "encoder", DUAL_ENCODER_KIND,
                     lambda: run_train(variant, root / "pairs", base / "encoder", Tracker(None)), variant)
    stage(f"export.{backbone}", base / "onnx", ONNX_KIND,
          lambda: run_export(variant, base / "encoder", base / "onnx"), variant)
    stage(f"index.{backbone}", base / "index", INDEX_KIND,
          lambda: build_index(variant, base / "encoder", base / "index"), variant)
    row = _score(variant, base / "onnx", base / "index", queries)
    return {"model": f"{Path(backbone).name} dual tower, fine-tuned",
            "parameters_per_tower": _parameters(base / "encoder"),
            "train_seconds": manifest.metadata["train_seconds"], **row}


def _student_row(variant: TowerlineConfig, student_backbone: str, root: Path, queries: dict[str, str],
                 stage: Any) -> dict[str, Any]:
    from distill.run import run_distill
    from serving.onnx_export import run_export

    teacher = variant.encoder.backbone
    variant.distill.student = student_backbone  # `variant` is this row's own copy (_with_backbone)
    base, student, student_onnx = root / Path(teacher).name, root / "student", root / "student-onnx"
    manifest = stage("distill", student, QUERY_ENCODER_KIND,
                     lambda: run_distill(variant, base / "encoder", base / "index", student, Tracker(None),
                                         pseudo_queries=root / "pseudo-queries"), variant, NOT_SHAPING_STUDENT,
                     remake_other=True)
    stage("export.student", student_onnx, ONNX_KIND, lambda: run_export(variant, student, student_onnx), variant,
          NOT_SHAPING_STUDENT, remake_other=True, made_from=manifest)
    row = _score(variant, student_onnx, base / "index", queries)
    return {"model": f"{Path(student_backbone).name} student of {Path(teacher).name}, on the teacher's index",
            "parameters_per_tower": manifest.metadata["student_parameters"],
            "distill_queries": manifest.metadata["queries"], "dev_ndcg@10": manifest.metadata["dev_ndcg_at_10"],
            **row}


def _score(config: TowerlineConfig, onnx_dir: Path, index_dir: Path, queries: dict[str, str]) -> dict[str, Any]:
    from indexing.load import load_index
    from serving.onnx_encoder import OnnxQueryEncoder

    encoder = OnnxQueryEncoder(onnx_dir, intra_op_threads=config.serve.intra_op_threads)
    index = load_index(index_dir, config.index)
    dataset = load_dataset(config.data, [config.eval.split])
    quality = retrieval_metrics(encoder.encode, queries, dataset.split(config.eval.split), index,
                                config.data.positive_min)
    return {**quality, "onnx": str(onnx_dir)}


def _measure_latency(config: TowerlineConfig, rows: dict[str, dict[str, Any]], texts: list[str]) -> None:
    from serving.onnx_encoder import OnnxQueryEncoder

    for row in rows.values():
        if "onnx" in row:
            encoder = OnnxQueryEncoder(Path(row.pop("onnx")), intra_op_threads=config.serve.intra_op_threads)
            row.update(encoder_latency(encoder, texts))


def _parameters(encoder_dir: Path) -> int:
    from distill.model import count_parameters
    from towerline.towers import load_towers

    return count_parameters(load_towers(encoder_dir)[0])


def _targets(rows: dict[str, dict[str, Any]], teacher: str, smallest: str) -> dict[str, Any]:
    """ScalingNote's claims as measured ratios and comparisons (reported, never asserted here); the
    end-to-end baseline is the smallest teacher, trained directly as a dual tower."""
    student = rows.get("student")
    teacher_row = rows.get(f"dual_tower_{Path(teacher).name}")
    baseline = rows.get(f"dual_tower_{Path(smallest).name}")
    bm25 = rows["bm25_stemmed"]["ndcg@10"]
    if not (student and teacher_row):
        return {}
    return {
        "student_ndcg_over_teacher": student["ndcg@10"] / teacher_row["ndcg@10"],
        "student_p50_latency_over_teacher": student["p50_ms_batch1"] / teacher_row["p50_ms_batch1"],
        "student_beats_end_to_end_baseline": bool(baseline and student["ndcg@10"] > baseline["ndcg@10"]),
        "end_to_end_baseline": f"dual_tower_{Path(smallest).name}",
        "teacher_beats_bm25": teacher_row["ndcg@10"] > bm25,
        "student_beats_bm25": student["ndcg@10"] > bm25,
    }

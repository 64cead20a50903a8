"""`towerline bench serve` on tiny artifacts: it runs, bounds its load and writes its JSON."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from pyspark.sql import SparkSession

from benchmarks.serve import run_serve_bench
from indexing.build import build_index
from serving.onnx_export import run_export
from towerline.config import TowerlineConfig
from towerline.errors import ConfigError
from training.run import init_dual_encoder


def test_serve_bench_writes_its_results(tiny_config: TowerlineConfig, tmp_path: Path) -> None:
    init_dual_encoder(tiny_config, tmp_path / "encoder")
    run_export(tiny_config, tmp_path / "encoder", tmp_path / "onnx")
    build_index(tiny_config, tmp_path / "encoder", tmp_path / "index")
    results = tmp_path / "serve.json"
    summary = run_serve_bench(
        tiny_config, tmp_path / "index", tmp_path / "onnx", tmp_path / "encoder", results,
        requests=20, concurrency=2, concurrencies=(1, 4),
    )
    assert json.loads(results.read_text()) == summary
    assert summary["grpc_search"]["requests"] == 20
    latencies = summary["grpc_search"]
    assert 0 < latencies["latency_ms_p50"] <= latencies["latency_ms_p95"] <= latencies["latency_ms_p99"]
    for figures in summary["query_encoder"].values():
        assert figures["onnx_texts_per_s"] > 0 and figures["torch_texts_per_s"] > 0
    # The hybrid row at the same load, beside dense-only.
    hybrid = summary["grpc_search_hybrid"]
    assert hybrid["requests"] == 20 and hybrid["concurrency"] == 2
    assert summary["hybrid_qps_over_dense"] == hybrid["qps"] / latencies["qps"]
    assert summary["fusion"].startswith("rrf")
    # The sweep (dense and micro-batched at each concurrency), the ceiling and the naive baseline.
    for name in ("dense", "dense_batched", "dense_batched_bucketed"):
        assert set(summary["grpc_search_by_concurrency"][name]) == {"1", "4"}
        assert all(row["requests"] == 20 and row["errors"] == {}
                   for row in summary["grpc_search_by_concurrency"][name].values())
    ceiling = summary["encoder_ceiling"]
    assert ceiling["texts_per_s"] == max(ceiling["texts_per_s_by_batch"].values()) > 0
    assert summary["naive_baseline"]["qps"] > 0
    assert summary["targets"]["max_queue_wait_ms"] == tiny_config.serve.max_queue_wait_ms
    assert set(summary["targets"]["p99_at_4_within_queue_bound"]) == set(summary["grpc_search_by_concurrency"])
    assert summary["targets"]["qps_at_32_over_ceiling"] is None  # no concurrency 32 in this small run
    assert str(tmp_path) not in results.read_text()  # no machine path in the results


@pytest.mark.slow
def test_scalingnote_bench_compares_every_row_in_one_run(
    tiny_config: TowerlineConfig, tiny_backbone: Path, tiny_decoder: Path, tmp_path: Path
) -> None:
    """Tiny stand-ins: the decoder as the 'large' teacher, the tiny BERT as the small teacher and the student."""
    from benchmarks.scalingnote import run_scalingnote_bench

    config = tiny_config.model_copy(deep=True)
    config.distill.epochs = 1
    results = tmp_path / "scalingnote.json"
    # The decoder's row alone pools its last token (an LLM's usual embedding).
    decoder_only = {str(tiny_decoder): ["encoder.pooling=last_token"]}
    summary = run_scalingnote_bench(config, [str(tiny_backbone), str(tiny_decoder)], str(tiny_backbone),
                                    tmp_path / "work", results, teacher_overrides=decoder_only)
    assert json.loads(results.read_text()) == summary
    pooling = {name: json.loads((tmp_path / "work" / name / "encoder" / "query" / "tower.json").read_text())["pooling"]
               for name in ("tiny-bert", "tiny-llama")}
    assert pooling == {"tiny-bert": "mean", "tiny-llama": "last_token"}
    assert summary["rows"]["dual_tower_tiny-llama"]["overrides"] == ["encoder.pooling=last_token"]
    rows = summary["rows"]
    assert set(rows) == {"bm25_stemmed", "dual_tower_tiny-bert", "dual_tower_tiny-llama", "student"}
    for name, row in rows.items():
        assert 0.0 <= row["ndcg@10"] <= 1.0 and row["queries"] == 20, name
    for name in ("dual_tower_tiny-bert", "dual_tower_tiny-llama", "student"):
        assert rows[name]["p50_ms_batch1"] > 0 and rows[name]["texts_per_s_batch32"] > 0
    targets = summary["targets"]
    assert targets["end_to_end_baseline"] == "dual_tower_tiny-bert"
    assert targets["student_ndcg_over_teacher"] == rows["student"]["ndcg@10"] / rows["dual_tower_tiny-llama"]["ndcg@10"]
    assert summary["distilled_teacher"] == "dual_tower_tiny-llama"

    # A further (larger) row joins with --reuse without changing the student's teacher: --distil-from.
    again = run_scalingnote_bench(config, [str(tiny_backbone), str(tiny_decoder)], str(tiny_backbone),
                                  tmp_path / "work", results, reuse=True, distil_from=str(tiny_backbone),
                                  teacher_overrides=decoder_only)
    assert again["distilled_teacher"] == "dual_tower_tiny-bert"
    assert {"train." + str(tiny_decoder), "index." + str(tiny_backbone)} <= set(again["reused_artifacts"])
    assert "distill" not in again["reused_artifacts"]  # another teacher: the student is distilled anew
    assert again["targets"]["student_ndcg_over_teacher"] == (again["rows"]["student"]["ndcg@10"]
                                                             / again["rows"]["dual_tower_tiny-bert"]["ndcg@10"])
    # Same settings once more: the student and its ONNX graph are reused too; other distill settings remake both.
    same = run_scalingnote_bench(config, [str(tiny_backbone), str(tiny_decoder)], str(tiny_backbone),
                                 tmp_path / "work", results, reuse=True, distil_from=str(tiny_backbone),
                                 teacher_overrides=decoder_only)
    assert {"distill", "export.student"} <= set(same["reused_artifacts"])
    assert same["rows"]["student"]["ndcg@10"] == again["rows"]["student"]["ndcg@10"]
    config.distill.cosine_weight = 0.5
    other = run_scalingnote_bench(config, [str(tiny_backbone)], str(tiny_backbone), tmp_path / "work", results,
                                  reuse=True)
    assert not {"distill", "export.student"} & set(other["reused_artifacts"])
    with pytest.raises(ConfigError, match="--distil-from"):
        run_scalingnote_bench(config, [str(tiny_backbone)], str(tiny_backbone), tmp_path / "work", results,
                              reuse=True, distil_from="mpnet")


def test_teacher_overrides_are_parsed_per_teacher_and_refused_when_malformed() -> None:
    from benchmarks.scalingnote import parse_teacher_overrides

    parsed = parse_teacher_overrides(["smollm2:encoder.pooling=last_token", "smollm2:train.batch_size=8"],
                                     ["minilm", "smollm2"])
    assert parsed == {"smollm2": ["encoder.pooling=last_token", "train.batch_size=8"]}
    for bad in ("encoder.pooling=last_token", "bert:encoder.pooling=cls", "smollm2:encoder.pooling"):
        with pytest.raises(ConfigError, match="--teacher-override"):
            parse_teacher_overrides([bad], ["minilm", "smollm2"])


def test_the_load_generator_counts_shed_calls_keeps_its_concurrency_and_stops_on_time() -> None:
    import asyncio
    from contextlib import asynccontextmanager

    import grpc

    from evaluation.load import run_load

    class Shed(grpc.RpcError):
        def code(self) -> grpc.StatusCode:
            return grpc.StatusCode.RESOURCE_EXHAUSTED

    in_flight, most = 0, 0

    @asynccontextmanager
    async def open_caller():
        async def call(number: int) -> None:
            nonlocal in_flight, most
            in_flight += 1
            most = max(most, in_flight)
            await asyncio.sleep(0.002)
            in_flight -= 1
            if number % 4 == 0:
                raise Shed()

        yield call

    figures = run_load(open_caller, concurrency=8, requests=40)
    assert figures["errors"] == {"RESOURCE_EXHAUSTED": 10}
    assert figures["requests"] == 30 and figures["qps"] > 0 and most == 8
    timed = run_load(open_caller, concurrency=2, duration_s=0.3)
    assert 0.3 <= timed["seconds"] < 1.0 and timed["requests"] > 0
    with pytest.raises(ValueError, match="requests, duration_s"):
        run_load(open_caller, concurrency=2)


def test_index_bench_sweeps_every_type_and_marks_the_pareto_front(tiny_config: TowerlineConfig,
                                                                   tmp_path: Path) -> None:
    """Small synthetic corpus plus a real row (the tiny demo-like index and its ONNX query encoder)."""
    from benchmarks.index import clustered_vectors, pareto_front, real_vectors, run_index_bench

    init_dual_encoder(tiny_config, tmp_path / "encoder")
    run_export(tiny_config, tmp_path / "encoder", tmp_path / "onnx")
    build_index(tiny_config, tmp_path / "encoder", tmp_path / "index")
    real = real_vectors(tmp_path / "index", tmp_path / "onnx", tiny_config.data, tiny_config.eval.split)
    config = tiny_config.index.model_copy(update={"auto_exact_below": 1000, "ivf_nlist": 16,
                                                  "pq_m": 4})
    results, plot = tmp_path / "index.json", tmp_path / "pareto.png"
    summary = run_index_bench(results, plot, vectors=3000, dim=16, queries=40, clusters=30, batch1_queries=20,
                              config=config, real=real, real_source="tiny")
    assert json.loads(results.read_text()) == summary and plot.stat().st_size > 0
    synthetic = summary["datasets"]["synthetic"]
    assert set(synthetic["builds"]) == {"flat", "ivf", "ivf_pq", "ivf_pq+opq", "hnsw"}
    flat = next(row for row in synthetic["rows"] if row["index"] == "flat")
    assert flat["recall@10"] == 1.0 and flat["speedup_batch1_over_flat"] == 1.0
    widest = [row for row in synthetic["rows"] if row["index"] == "ivf" and row["nprobe"] in (1, 128)]
    assert widest[0]["recall@10"] < widest[1]["recall@10"] == 1.0  # every list probed is exact
    assert synthetic["auto"]["type"] == "hnsw" and synthetic["auto"]["row"]["ef_search"] == config.hnsw_ef_search
    assert summary["datasets"]["real"]["data"]["vectors"] == 80  # the tiny corpus, queried by its encoder
    assert summary["targets"]["auto_choice"]["type"] == "hnsw"
    assert str(tmp_path) not in results.read_text()
    # The front: nothing on it is beaten on both axes, and everything off it is.
    rows = [{"recall@10": r, "qps_batch1": q} for r, q in ((0.5, 100), (0.9, 50), (0.8, 40), (1.0, 10))]
    assert pareto_front(rows) == [0, 1, 3]
    vectors = clustered_vectors(500, 16, 5, seed=1)
    assert vectors.shape == (500, 16) and np.allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-5)


def test_pairs_bench_times_each_log_size_and_the_embedding_job(spark: SparkSession, tiny_config: TowerlineConfig,
                                                               tmp_path: Path) -> None:
    from benchmarks.pairs import run_pairs_bench

    results = tmp_path / "pairs.json"
    summary = run_pairs_bench(tiny_config, [2_000, 200], tmp_path / "work", results)
    assert json.loads(results.read_text()) == summary
    assert [run["rows"] for run in summary["runs"]] == [200, 2_000]  # smallest first
    for run in summary["runs"]:
        assert run["pairs"] > 0 and run["quarantined"] == 0 and run["rows_per_s"] > 0
    assert summary["scaling"]["size_ratio"] == 10 and summary["scaling"]["target_time_ratio_at_most"] == 11
    embedding = summary["embedding"]
    assert embedding["documents"] == 80 and embedding["max_abs_difference"] < 1e-5
    # A rerun reuses the generated logs (not timed, not regenerated).
    spec = tmp_path / "work" / "logs-200" / "spec.json"
    written = spec.stat().st_mtime_ns
    run_pairs_bench(tiny_config, [200, 400], tmp_path / "work", results)
    assert spec.stat().st_mtime_ns == written

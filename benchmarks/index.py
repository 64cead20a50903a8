"""`towerline bench index`: recall against exact search and QPS of every index type over its search knob.

On synthetic clustered vectors (1M x 384 by default) and, as a sanity row, on a real index's vectors
(the demo's SciFact doc embeddings, queried with the demo's ONNX query encoder): build time and size
of Flat, IVF-Flat, IVF-PQ (+OPQ) and HNSW; for each nprobe / efSearch, recall@10 against Flat over
all held-out queries and QPS at batch 1 and batch 64. Writes the JSON and the batch-1 Pareto plot.
Every figure comes from this run; QPS ratios to Flat (same run, same threads) are what to read.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from indexing.factory import OPQ_MIN_POINTS, choose_index_type, create_index, search_parameters, search_params
from towerline.config import IndexConfig
from towerline.progress import console
from towerline.results import result_header, write_results

K = 10
NPROBES = (1, 2, 4, 8, 16, 32, 64, 128)
EF_SEARCHES = (16, 32, 64, 128, 256)
TYPES = ("flat", "ivf", "ivf_pq", "hnsw")
BATCH1_SECONDS = 10.0
MIN_BATCH1 = 50


def clustered_vectors(count: int, dim: int, clusters: int, seed: int) -> np.ndarray:
    """Unit vectors shaped like text embeddings: Zipf-sized clusters with their own spread, in an
    anisotropic space (a decaying spectrum, as trained encoders produce), generated in chunks."""
    rng = np.random.default_rng(seed)
    space = np.random.default_rng(0)  # the same clusters and space for corpus and queries
    spectrum = (1.0 + np.arange(dim)) ** -0.5
    basis = np.linalg.qr(space.normal(size=(dim, dim)))[0] * spectrum
    centres = space.normal(size=(clusters, dim))
    weights = 1.0 / (1.0 + np.arange(clusters)) ** 0.8
    spread = space.uniform(0.4, 1.0, size=clusters)
    out = np.empty((count, dim), dtype=np.float32)
    for start in range(0, count, 100_000):
        rows = min(100_000, count - start)
        cluster = rng.choice(clusters, size=rows, p=weights / weights.sum())
        latent = centres[cluster] + spread[cluster, None] * rng.normal(size=(rows, dim))
        chunk = latent @ basis.T
        out[start:start + rows] = chunk / np.linalg.norm(chunk, axis=1, keepdims=True)
    return out


def run_index_bench(results_path: Path, plot_path: Path, *, vectors: int, dim: int, queries: int,
                    clusters: int, batch1_queries: int, config: IndexConfig,
                    real: tuple[np.ndarray, np.ndarray] | None, real_source: str) -> dict[str, Any]:
    started = time.perf_counter()
    console.rule(f"[bold]synthetic {vectors:,} x {dim}")
    corpus = clustered_vectors(vectors, dim, clusters, seed=1)
    held_out = clustered_vectors(queries, dim, clusters, seed=2)
    datasets = {"synthetic": _study(corpus, held_out, config, batch1_queries)}
    datasets["synthetic"]["data"] = {"vectors": vectors, "dim": dim, "queries": queries, "clusters": clusters}
    del corpus
    if real is not None:
        console.rule(f"[bold]real: {real_source}")
        datasets["real"] = _study(real[0], real[1], config, batch1_queries)
        datasets["real"]["data"] = {"source": real_source, "vectors": len(real[0]), "dim": int(real[0].shape[1]),
                                    "queries": len(real[1])}
    summary = {
        **result_header("index"),
        "k": K,
        "faiss": {"version": faiss.__version__, "threads": faiss.omp_get_max_threads()},
        "datasets": datasets,
        "targets": _targets(datasets["synthetic"]),
        "total_seconds": round(time.perf_counter() - started, 1),
        "config": config.model_dump(mode="json"),
    }
    write_results(results_path, summary)
    _plot(datasets, plot_path)
    console.print_json(data={"targets": summary["targets"]})
    return summary


def _study(corpus: np.ndarray, queries: np.ndarray, config: IndexConfig, batch1_queries: int) -> dict[str, Any]:
    exact = faiss.IndexFlatIP(corpus.shape[1])
    exact.add(corpus)
    _, truth = exact.search(queries, K)
    rows: list[dict[str, Any]] = []
    builds: dict[str, dict[str, Any]] = {}
    for index_type in TYPES:
        for opq in ((False, True) if index_type == "ivf_pq" and len(corpus) >= OPQ_MIN_POINTS else (False,)):
            name = f"{index_type}+opq" if opq else index_type
            console.print(f"building {name}")
            built = time.perf_counter()
            index = create_index(corpus, config.model_copy(update={"opq": opq}), index_type)
            builds[name] = {"build_seconds": round(time.perf_counter() - built, 1), "bytes": _size(index),
                            "params": search_params(index)}
            for knob, values in _knobs(index_type):
                for value in values:
                    rows.append({"index": name, knob: value,
                                 **_measure(index, queries, truth, batch1_queries, **{knob: value})})
            del index
    flat_qps = next(row["qps_batch1"] for row in rows if row["index"] == "flat")
    for row in rows:
        row["speedup_batch1_over_flat"] = row["qps_batch1"] / flat_qps
    auto = choose_index_type(*corpus.shape, config.model_copy(update={"type": "auto"}))  # what auto would pick
    auto_knob = {"hnsw": ("ef_search", config.hnsw_ef_search), "ivf": ("nprobe", config.ivf_nprobe),
                 "ivf_pq": ("nprobe", config.ivf_nprobe)}.get(auto.type)
    auto_row = next(row for row in rows if row["index"] == auto.type
                    and (auto_knob is None or row.get(auto_knob[0]) == auto_knob[1]))
    front = pareto_front(rows)
    return {"builds": builds, "rows": rows, "pareto_batch1": front,
            "auto": {"type": auto.type, "reason": auto.reason, "row": auto_row,
                     "on_pareto_front": auto_row in [rows[i] for i in front]}}


def _knobs(index_type: str) -> list[tuple[str, tuple[int, ...]]]:
    if index_type in ("ivf", "ivf_pq"):
        return [("nprobe", NPROBES)]
    if index_type == "hnsw":
        return [("ef_search", EF_SEARCHES)]
    return [("exact", (1,))]


def _measure(index: faiss.Index, queries: np.ndarray, truth: np.ndarray, batch1_queries: int,
             nprobe: int | None = None, ef_search: int | None = None, exact: int | None = None) -> dict[str, Any]:
    params = search_parameters(index, nprobe, ef_search)
    found = np.empty_like(truth)
    started = time.perf_counter()
    for start in range(0, len(queries), 64):
        _, found[start:start + 64] = index.search(queries[start:start + 64], K, params=params)
    batch64_seconds = time.perf_counter() - started
    # One query at a time, for at most batch1_queries queries or BATCH1_SECONDS (at least MIN_BATCH1 calls).
    started, timed = time.perf_counter(), 0
    while timed < min(batch1_queries, len(queries)):
        index.search(queries[timed:timed + 1], K, params=params)
        timed += 1
        if timed >= MIN_BATCH1 and time.perf_counter() - started > BATCH1_SECONDS:
            break
    batch1_seconds = time.perf_counter() - started
    hits = sum(len(set(want) & set(got)) for want, got in zip(truth.tolist(), found.tolist(), strict=True))
    return {"recall@10": hits / truth.size, "qps_batch1": timed / batch1_seconds, "batch1_calls": timed,
            "qps_batch64": len(queries) / batch64_seconds}


def pareto_front(rows: list[dict[str, Any]]) -> list[int]:
    """Rows no other row beats on both recall@10 and batch-1 QPS (indices into `rows`)."""
    return [i for i, row in enumerate(rows)
            if not any(other["recall@10"] >= row["recall@10"] and other["qps_batch1"] >= row["qps_batch1"]
                       and (other["recall@10"], other["qps_batch1"]) != (row["recall@10"], row["qps_batch1"])
                       for other in rows)]


def _targets(study: dict[str, Any]) -> dict[str, Any]:
    def best(min_recall: float) -> dict[str, Any] | None:
        eligible = [row for row in study["rows"] if row["recall@10"] >= min_recall and row["index"] != "flat"]
        return max(eligible, key=lambda row: row["qps_batch1"]) if eligible else None

    at_95, at_98 = best(0.95), best(0.98)
    return {
        "best_at_recall_0.95": at_95,
        "recall_0.95_at_10x_flat": bool(at_95 and at_95["speedup_batch1_over_flat"] >= 10),
        "best_at_recall_0.98": at_98,
        "stretch_recall_0.98_at_20x_flat": bool(at_98 and at_98["speedup_batch1_over_flat"] >= 20),
        "auto_choice": {key: study["auto"][key] for key in ("type", "reason", "on_pareto_front")},
    }


def _size(index: faiss.Index) -> int:
    with tempfile.NamedTemporaryFile(suffix=".faiss") as handle:
        faiss.write_index(index, handle.name)
        return Path(handle.name).stat().st_size


def _plot(datasets: dict[str, dict[str, Any]], plot_path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(datasets), figsize=(6.5 * len(datasets), 4.8), squeeze=False)
    for axis, (name, study) in zip(axes[0], datasets.items(), strict=True):
        for index_name in dict.fromkeys(row["index"] for row in study["rows"]):
            points = sorted((row["recall@10"], row["qps_batch1"])
                            for row in study["rows"] if row["index"] == index_name)
            axis.plot(*zip(*points, strict=True), marker="o", label=index_name)
        front = sorted((study["rows"][i]["recall@10"], study["rows"][i]["qps_batch1"])
                       for i in study["pareto_batch1"])
        axis.plot(*zip(*front, strict=True), color="black", linestyle="--", linewidth=1, label="Pareto front")
        auto = study["auto"]["row"]
        axis.scatter([auto["recall@10"]], [auto["qps_batch1"]], s=160, facecolors="none", edgecolors="red",
                     label=f"auto ({study['auto']['type']})", zorder=5)
        data = study["data"]
        axis.set(title=f"{name}: {data['vectors']:,} x {data['dim']}", xlabel="recall@10 vs exact",
                 ylabel="queries/s, batch 1", yscale="log")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    figure.tight_layout()
    plot_path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(plot_path, dpi=110)
    plt.close(figure)


def real_vectors(index_dir: Path, onnx_dir: Path, data_config: Any, split: str) -> tuple[np.ndarray, np.ndarray]:
    """A flat index artifact's doc vectors and its query encoder's embeddings of `split`'s queries."""
    from indexing.load import load_index
    from serving.onnx_encoder import OnnxQueryEncoder
    from towerline.beir import load_dataset

    loaded = load_index(index_dir, IndexConfig(use_gpu="never"))
    corpus = loaded.index.reconstruct_n(0, loaded.size)
    dataset = load_dataset(data_config, [split])
    texts = [dataset.queries[query_id] for query_id in dataset.split(split)]
    return np.ascontiguousarray(corpus, dtype=np.float32), OnnxQueryEncoder(onnx_dir).encode(texts)

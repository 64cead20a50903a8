"""Export a query tower to ONNX (dynamo exporter) and check parity with PyTorch.

The exported graph takes `input_ids` and `attention_mask` (int64, dynamic batch and length)
and returns pooled, normalised `embeddings`; tokenisation stays in Python next to the session.
"""

from __future__ import annotations

import logging
import os
import shutil
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from serving.onnx_format import ONNX_FILE, ONNX_KIND
from serving.onnx_variants import onnx_embeddings, optimize_graph, parity, quantize_int8, require_parity
from towerline.artifacts import ArtifactWriter, Manifest, read_manifest
from towerline.config import TowerlineConfig
from towerline.encoder import Tower
from towerline.progress import console, status
from towerline.tower_spec import QUERY_DIR, QUERY_TOWER_KINDS, TOWER_FILE
from towerline.tracking import Tracker

# Varied lengths and vocabulary so parity covers padding and truncation.
PARITY_TEXTS = [
    "what causes inflammation in the lungs",
    "0-dimensional biomaterials show inductive properties.",
    "A deficiency of vitamin B12 increases blood levels of homocysteine.",
    "ALDH1 expression is associated with better breast cancer outcomes.",
    "how does a dense retrieval model rank documents for a short query " * 6,
    "x",
    "Microstructural development of human newborn cerebral white matter",
    "Cellular differentiation; 42 patients; p < 0.05 (two-sided).",
]


class _ExportWrapper(torch.nn.Module):
    def __init__(self, tower: Tower) -> None:
        super().__init__()
        self.tower = tower

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.tower(input_ids=input_ids, attention_mask=attention_mask)


@contextmanager
def quiet_export() -> Iterator[None]:
    """Gradient-free tracing for torch.onnx.export, without the exporter's chatter: its axis-renaming,
    pytree and "torchvision is not installed" messages say nothing actionable here."""
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    with torch.inference_mode(False), torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", category=UserWarning)
        warnings.simplefilter("ignore", category=FutureWarning)
        yield


def export_query_tower(tower: Tower, onnx_path: Path, opset: int) -> None:
    tower.eval()
    sample = tower.tokenize(PARITY_TEXTS[:2])
    batch, length = torch.export.Dim("batch"), torch.export.Dim("length")
    with quiet_export():
        torch.onnx.export(
            _ExportWrapper(tower),
            (sample["input_ids"], sample["attention_mask"]),
            str(onnx_path),
            input_names=["input_ids", "attention_mask"],
            output_names=["embeddings"],
            dynamic_shapes={
                "input_ids": {0: batch, 1: length},
                "attention_mask": {0: batch, 1: length},
            },
            opset_version=opset,
            dynamo=True,
            external_data=False,
            verbose=False,
        )


def run_export(
    config: TowerlineConfig,
    encoder_path: Path,
    output: Path,
    tracker: Tracker | None = None,
    index_path: Path | None = None,
) -> Manifest:
    """Export and parity-check the query tower (then optimise / quantise when configured); with
    `index_path`, report each graph variant's nDCG@10 on the eval split; with a tracker, register
    the export in MLflow's model registry."""
    settings = config.export
    encoder_manifest = read_manifest(encoder_path, QUERY_TOWER_KINDS)  # a dual encoder or a distilled student
    tower = Tower.load(encoder_path / QUERY_DIR)
    feeds = {name: tensor.numpy() for name, tensor in tower.tokenize(PARITY_TEXTS).items()}
    expected = tower.encode(PARITY_TEXTS, batch_size=len(PARITY_TEXTS))
    score = _variant_scorer(config, tower, encoder_manifest, index_path) if index_path else None
    with ArtifactWriter(output, ONNX_KIND, producer="export", inputs={"encoder": encoder_manifest},
                        config=config) as staged:
        graphs = {"fp32": staged.path / ONNX_FILE}
        with status("exporting the query tower to ONNX"):
            export_query_tower(tower, graphs["fp32"], settings.opset)
        checks = {"fp32": parity(expected, onnx_embeddings(graphs["fp32"], feeds))}
        require_parity("fp32", checks["fp32"], atol=settings.parity_atol)
        if settings.optimize:
            graphs["optimized"] = staged.path / "model.optimized.onnx"
            optimize_graph(graphs["fp32"], graphs["optimized"])
            checks["optimized"] = parity(expected, onnx_embeddings(graphs["optimized"], feeds))
            require_parity("optimized", checks["optimized"], atol=settings.parity_atol)
        if settings.quantize == "int8":
            graphs["int8"] = staged.path / "model.int8.onnx"
            quantize_int8(graphs["optimized" if settings.optimize else "fp32"], graphs["int8"])
            checks["int8"] = parity(expected, onnx_embeddings(graphs["int8"], feeds))
            require_parity("int8", checks["int8"], min_cosine=settings.int8_min_cosine)
        variants = {name: {**checks[name].as_dict(), **({"ndcg@10": score(path)} if score else {})}
                    for name, path in graphs.items()}
        served = list(graphs)[-1]
        _keep_only(graphs, served)
        tower.tokenizer.save_pretrained(staged.path)
        shutil.copy(encoder_path / QUERY_DIR / TOWER_FILE, staged.path / TOWER_FILE)
        staged.metadata.update(
            embedding_space=encoder_manifest.metadata["embedding_space"],
            dim=tower.dim,
            graph=served,
            parity_max_abs_diff=checks[served].max_abs_diff,
            variants=variants,
            opset=settings.opset,
            backbone=encoder_manifest.metadata.get("backbone"),
        )
    assert staged.manifest is not None
    if len(variants) > 1:
        console.print("graph variants: " + "; ".join(
            f"{name} (max diff {v['max_abs_diff']:.1e}, min cos {v['min_cosine']:.4f}"
            + (f", nDCG@10 {v['ndcg@10']:.4f})" if "ndcg@10" in v else ")") for name, v in variants.items()))
    if tracker is not None and config.tracking.query_encoder_model:
        tracker.register_model(output, config.tracking.query_encoder_model, staged.manifest,
                               lineage={f"encoder.{name}": fingerprint
                                        for name, fingerprint in encoder_manifest.inputs.items()})
    return staged.manifest


def _keep_only(graphs: dict[str, Path], served: str) -> None:
    """The served graph becomes model.onnx; the intermediate graphs are not part of the artifact."""
    os.replace(graphs[served], graphs["fp32"].with_name(ONNX_FILE + ".served"))
    for path in graphs.values():
        path.unlink(missing_ok=True)
    os.replace(graphs["fp32"].with_name(ONNX_FILE + ".served"), graphs["fp32"])


def _variant_scorer(
    config: TowerlineConfig, tower: Tower, encoder_manifest: Manifest, index_path: Path
) -> Callable[[Path], float]:
    """nDCG@10 on the eval split of a graph file, searched against `index_path` in-process."""
    import onnxruntime as ort

    from evaluation.retrieval import retrieval_metrics
    from indexing.load import load_index
    from towerline.artifacts import require_same_space
    from towerline.beir import load_dataset, positives
    from towerline.tower_spec import tokenize_texts

    index = load_index(index_path, config.index)
    require_same_space(encoder_manifest.metadata["embedding_space"], "the query tower", index.embedding_space,
                       "the index")
    dataset = load_dataset(config.data, [config.eval.split])
    qrels = dataset.split(config.eval.split)
    queries = {qid: dataset.queries[qid] for qid, docs in qrels.items() if positives(docs, config.data.positive_min)}

    def score(graph: Path) -> float:
        session = ort.InferenceSession(str(graph), providers=["CPUExecutionProvider"])

        def encode(texts: list[str]) -> np.ndarray:
            batches = (tokenize_texts(tower.tokenizer, texts[start : start + 64], tower.spec)
                       for start in range(0, len(texts), 64))
            return np.concatenate([session.run(["embeddings"], feeds)[0] for feeds in batches])

        return retrieval_metrics(encode, queries, qrels, index, config.data.positive_min)["ndcg@10"]

    return score

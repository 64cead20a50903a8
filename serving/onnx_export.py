"""Export a query tower to ONNX (dynamo exporter) and check parity with PyTorch.

The exported graph takes `input_ids` and `attention_mask` (int64, dynamic batch and length)
and returns pooled, normalised `embeddings`; tokenisation stays in Python next to the session.
"""

from __future__ import annotations

import logging
import shutil
import warnings
from pathlib import Path

import numpy as np
import torch

from serving.onnx_format import ONNX_FILE, ONNX_KIND
from towerline.artifacts import ArtifactWriter, Manifest, read_manifest
from towerline.config import TowerlineConfig
from towerline.encoder import Tower
from towerline.errors import ArtifactError
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


def export_query_tower(tower: Tower, onnx_path: Path, opset: int) -> None:
    tower.eval()
    sample = tower.tokenize(PARITY_TEXTS[:2])
    batch, length = torch.export.Dim("batch"), torch.export.Dim("length")
    # The exporter's axis-renaming, pytree and "torchvision is not installed" messages say
    # nothing actionable here.
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    with torch.inference_mode(False), torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", category=UserWarning)
        warnings.simplefilter("ignore", category=FutureWarning)
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


def parity_gap(tower: Tower, onnx_path: Path) -> float:
    """Largest absolute difference between PyTorch and ONNX Runtime embeddings."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    batch = tower.tokenize(PARITY_TEXTS)
    expected = tower.encode(PARITY_TEXTS, batch_size=len(PARITY_TEXTS))
    (actual,) = session.run(
        ["embeddings"],
        {name: tensor.numpy().astype(np.int64) for name, tensor in batch.items()},
    )
    return float(np.abs(actual - expected).max())


def run_export(config: TowerlineConfig, encoder_path: Path, output: Path, tracker: Tracker | None = None) -> Manifest:
    """Export and parity-check the query tower; with a tracker, also register it in MLflow's model registry."""
    encoder_manifest = read_manifest(encoder_path, QUERY_TOWER_KINDS)  # a dual encoder or a distilled student
    tower = Tower.load(encoder_path / QUERY_DIR)
    with ArtifactWriter(output, ONNX_KIND, producer="export", inputs={"encoder": encoder_manifest},
                        config=config) as staged:
        onnx_path = staged.path / ONNX_FILE
        with status("exporting the query tower to ONNX"):
            export_query_tower(tower, onnx_path, config.export.opset)
        gap = parity_gap(tower, onnx_path)
        if gap > config.export.parity_atol:
            raise ArtifactError(
                f"ONNX parity check failed: max |torch - onnx| = {gap:.2e} > export.parity_atol "
                f"{config.export.parity_atol:.0e}; nothing was written"
            )
        tower.tokenizer.save_pretrained(staged.path)
        shutil.copy(encoder_path / QUERY_DIR / TOWER_FILE, staged.path / TOWER_FILE)
        staged.metadata.update(
            embedding_space=encoder_manifest.metadata["embedding_space"],
            dim=tower.dim,
            parity_max_abs_diff=gap,
            opset=config.export.opset,
            backbone=encoder_manifest.metadata.get("backbone"),
        )
    assert staged.manifest is not None
    if tracker is not None and config.tracking.query_encoder_model:
        version = tracker.register_model(output, config.tracking.query_encoder_model, staged.manifest)
        if version:
            console.print(f"registered as MLflow model {config.tracking.query_encoder_model} version {version}")
    return staged.manifest

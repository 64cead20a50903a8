"""Faster variants of an exported query-tower graph: ONNX Runtime graph optimisation and int8
dynamic quantisation. Each is checked against the PyTorch tower before it may replace the fp32
graph: optimisation must keep `export.parity_atol`; int8 changes numbers by design, so it must
keep every parity text's cosine to PyTorch at `export.int8_min_cosine` or above."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from towerline.errors import ArtifactError


@dataclass(frozen=True)
class Parity:
    max_abs_diff: float
    min_cosine: float

    def as_dict(self) -> dict[str, float]:
        return {"max_abs_diff": self.max_abs_diff, "min_cosine": self.min_cosine}


def onnx_embeddings(onnx_path: Path, feeds: dict[str, np.ndarray]) -> np.ndarray:
    import onnxruntime as ort

    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    (embeddings,) = session.run(["embeddings"], feeds)
    return embeddings


def parity(expected: np.ndarray, actual: np.ndarray) -> Parity:
    cosine = (expected * actual).sum(axis=1) / (
        np.linalg.norm(expected, axis=1) * np.linalg.norm(actual, axis=1) + 1e-12
    )
    return Parity(max_abs_diff=float(np.abs(actual - expected).max()), min_cosine=float(cosine.min()))


def optimize_graph(source: Path, target: Path) -> None:
    """ORT's extended graph optimisations (fusions for attention, layer norm, GELU), saved offline so
    the service loads the fused graph directly."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.optimized_model_filepath = str(target)
    ort.InferenceSession(str(source), options, providers=["CPUExecutionProvider"])


def quantize_int8(source: Path, target: Path) -> None:
    """Dynamic quantisation: int8 weights, activations quantised per batch at run time."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(str(source), str(target), weight_type=QuantType.QInt8)


def require_parity(variant: str, found: Parity, *, atol: float | None = None, min_cosine: float | None = None) -> None:
    if atol is not None and found.max_abs_diff > atol:
        raise ArtifactError(f"ONNX parity check failed for the {variant} graph: max |torch - onnx| = "
                            f"{found.max_abs_diff:.2e} > export.parity_atol {atol:.0e}; nothing was written")
    if min_cosine is not None and found.min_cosine < min_cosine:
        raise ArtifactError(f"ONNX parity check failed for the {variant} graph: min cosine to torch "
                            f"{found.min_cosine:.4f} < export.int8_min_cosine {min_cosine}; nothing was written")

"""The RecLoRA scorer as one ONNX graph: the LLM, the whole LoRA bank, and α as a graph input.

Inputs: input_ids and attention_mask (int64 [batch, length], left-padded prompts) and alpha (float32
[batch, K], from the gate, which stays in Python beside the CRM). Output: logits [batch], the
" Yes" − " No" logit difference (sigmoid gives the click probability). One graph personalises every
user: personalisation is data (α), not weights.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from personalization.reclora import RecLoraScorer
from serving.onnx_export import quiet_export
from towerline.errors import ArtifactError

ONNX_SCORER_FILE = "scorer.onnx"
# Parity is checked on probabilities (what Recommend ranks with).
PARITY_TOLERANCE = 1e-3


class _ScorerGraph(torch.nn.Module):
    def __init__(self, scorer: RecLoraScorer) -> None:
        super().__init__()
        self.scorer = scorer

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
        return self.scorer.score_with_mixture(input_ids, attention_mask, alpha)["logits"]


def export_scorer(scorer: RecLoraScorer, sample: dict[str, torch.Tensor], onnx_path: Path, opset: int) -> None:
    """`sample`: a collated batch (input_ids, attention_mask, user_representation) to trace with."""
    scorer.eval()
    alpha = scorer.mixture(sample["user_representation"]).detach()
    batch, length = torch.export.Dim("batch"), torch.export.Dim("length")
    with quiet_export():
        torch.onnx.export(
            _ScorerGraph(scorer), (sample["input_ids"], sample["attention_mask"], alpha), str(onnx_path),
            input_names=["input_ids", "attention_mask", "alpha"], output_names=["logits"],
            dynamic_shapes={"input_ids": {0: batch, 1: length}, "attention_mask": {0: batch, 1: length},
                            "alpha": {0: batch}},
            opset_version=opset, dynamo=True, external_data=True, verbose=False,
        )


class OnnxScorer:
    """An onnxruntime session over the exported scorer; α comes from the torch gate."""

    def __init__(self, onnx_path: Path, threads: int = 1) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])

    def logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, alpha: torch.Tensor) -> np.ndarray:
        feeds = {"input_ids": input_ids.numpy().astype(np.int64),
                 "attention_mask": attention_mask.numpy().astype(np.int64),
                 "alpha": alpha.detach().numpy().astype(np.float32)}
        return self.session.run(["logits"], feeds)[0]


@torch.no_grad()
def parity_and_throughput(scorer: RecLoraScorer, session: OnnxScorer, batches: list[dict[str, torch.Tensor]]
                          ) -> dict[str, Any]:
    """Largest probability difference between torch and ONNX Runtime over `batches`, and each one's samples/s."""
    scorer.eval()
    worst, samples = 0.0, 0
    seconds = {"torch": 0.0, "onnxruntime": 0.0}
    for batch in batches:
        alpha = scorer.mixture(batch["user_representation"])
        began = time.perf_counter()
        expected = torch.sigmoid(scorer.score_with_mixture(batch["input_ids"], batch["attention_mask"], alpha)
                                 ["logits"]).numpy()
        seconds["torch"] += time.perf_counter() - began
        began = time.perf_counter()
        found = 1 / (1 + np.exp(-session.logits(batch["input_ids"], batch["attention_mask"], alpha)))
        seconds["onnxruntime"] += time.perf_counter() - began
        worst = max(worst, float(np.abs(found - expected).max()))
        samples += len(expected)
    return {"max_abs_probability_diff": worst, "samples": samples,
            "samples_per_s": {name: samples / max(value, 1e-9) for name, value in seconds.items()}}


def export_and_check(scorer: RecLoraScorer, batches: list[dict[str, torch.Tensor]], directory: Path,
                     opset: int) -> dict[str, Any]:
    """Export into `directory`, then compare with torch on `batches`: ArtifactError beyond the tolerance."""
    export_scorer(scorer, batches[0], directory / ONNX_SCORER_FILE, opset)
    report = parity_and_throughput(scorer, OnnxScorer(directory / ONNX_SCORER_FILE), batches)
    if report["max_abs_probability_diff"] > PARITY_TOLERANCE:
        raise ArtifactError(f"RecLoRA ONNX parity check failed: max |torch - onnx| probability "
                            f"{report['max_abs_probability_diff']:.2e} > {PARITY_TOLERANCE:.0e}; nothing was written")
    return {"file": ONNX_SCORER_FILE, "opset": opset, "parity_tolerance": PARITY_TOLERANCE, **report}

"""RecLoRA as Recommend's last stage: the DIN top-N re-scored by the personalised LLM.

Loaded from a `reclora` artifact, which must have been gated by the very CRM the recommender
serves (its manifest names that CRM's fingerprint). The exported ONNX graph runs when the artifact
has one (ONNX Runtime; the gate stays in torch beside the CRM), else the torch scorer.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from personalization.reclora import RECLORA_KIND, TITLE_VECTORS_FILE, load_scorer
from personalization.reclora_data import ItemTexts, RecLoraCollator
from personalization.reclora_onnx import ONNX_SCORER_FILE, OnnxScorer
from towerline.artifacts import read_manifest
from towerline.errors import ArtifactError


class RecLoraReranker:
    def __init__(self, directory: Path, interactions: Path, crm_fingerprint: str, top_n: int,
                 threads: int = 1) -> None:
        manifest = read_manifest(directory, RECLORA_KIND)
        if manifest.inputs.get("crm") != crm_fingerprint:
            raise ArtifactError(f"{directory}: the RecLoRA bank was gated by CRM {manifest.inputs.get('crm')}, "
                                f"not by the served CRM {crm_fingerprint}: train it with that CRM")
        self.scorer, tokenizer, _ = load_scorer(directory)
        self.settings = self.scorer.settings
        self.texts = ItemTexts.with_vectors(interactions, np.load(directory / TITLE_VECTORS_FILE))
        self.collator = RecLoraCollator(tokenizer, self.settings.max_prompt_tokens)
        onnx = directory / ONNX_SCORER_FILE
        self.session = OnnxScorer(onnx, threads) if onnx.is_file() else None
        self.engine = "onnxruntime" if self.session else "torch"
        self.top_n = top_n
        self.fingerprint = manifest.fingerprint

    @torch.no_grad()
    def probabilities(self, user: int, long_history: list[int], user_representation: torch.Tensor,
                      candidates: list[int]) -> np.ndarray:
        """Click probabilities of `candidates` for the user (history oldest first; representation [1, D])."""
        representation = user_representation[0].float().numpy()
        rows = [{"prompt": self.texts.prompt(user, long_history, item, self.settings),
                 "user_representation": representation} for item in candidates]
        batch = self.collator(rows)
        alpha = self.scorer.mixture(batch["user_representation"])
        if self.session is not None:
            logits = self.session.logits(batch["input_ids"], batch["attention_mask"], alpha)
        else:
            outputs = self.scorer.score_with_mixture(batch["input_ids"], batch["attention_mask"], alpha)
            logits = outputs["logits"].numpy()
        return 1 / (1 + np.exp(-np.asarray(logits, dtype=np.float64)))

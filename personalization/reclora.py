"""RecLoRA's scorer: a decoder LLM answers the CTR prompt, personalised by the meta-LoRA bank.

The click probability is the softmax over the " Yes" / " No" next-token logits at the prompt's last
position, i.e. sigmoid(logit_yes − logit_no): `forward` returns that difference as the logit, so the
loss is plain binary cross-entropy. Prompts are padded on the left, so the last position is the
prompt's own last token in every row; only that position's logits are computed (the vocabulary
projection over every position would dominate the cost on CPU).

The mixing weights α come from the gate over the CRM's user representation (soft or top-k routing)
or are uniform (the ablation without the gate). Only the bank and the gate train; the LLM is frozen.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from personalization.meta_lora import LoraGate, MetaLoraBank
from personalization.reclora_prompt import ANSWER_NO, ANSWER_YES
from towerline.config import RecLoraConfig
from towerline.errors import ArtifactError, ConfigError

ADAPTER_FILE, SPEC_FILE, TITLE_VECTORS_FILE = "reclora.safetensors", "reclora.json", "title_vectors.npy"
SPEC_FORMAT = "towerline-reclora/1"
RECLORA_KIND = "reclora"


class RecLoraScorer(nn.Module):
    def __init__(self, llm: nn.Module, settings: RecLoraConfig, user_dim: int, answer_ids: tuple[int, int]) -> None:
        super().__init__()
        self.llm = llm
        self.settings = settings
        self.user_dim = user_dim
        self.answer_ids = answer_ids
        self.bank = MetaLoraBank.attach(llm, settings.target_modules, settings.experts, settings.rank,
                                        settings.lora_alpha)
        self.gate = None if settings.routing == "uniform" else LoraGate(
            user_dim, settings.experts, settings.gate_hidden, settings.gate_temperature,
            settings.top_k if settings.routing == "top_k" else 0)

    def mixture(self, user_representation: torch.Tensor) -> torch.Tensor:
        """α [B, K] for a batch of CRM user representations [B, D]."""
        if self.gate is None:
            batch = user_representation.shape[0]
            return user_representation.new_full((batch, self.settings.experts), 1.0 / self.settings.experts)
        return self.gate(user_representation)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, user_representation: torch.Tensor,
                labels: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        return self.score_with_mixture(input_ids, attention_mask, self.mixture(user_representation), labels)

    def score_with_mixture(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, alpha: torch.Tensor,
                           labels: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """The scorer with α given: what the exported graph computes (α is one of its inputs)."""
        # Positions count real tokens only, so a left-padded prompt is positioned as if unpadded.
        positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        with self.bank.mixing(alpha):
            logits = self.llm(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions,
                              logits_to_keep=1).logits[:, -1, :]
        yes, no = self.answer_ids
        outputs = {"logits": (logits[:, yes] - logits[:, no]).float()}
        if labels is not None:
            outputs["loss"] = F.binary_cross_entropy_with_logits(outputs["logits"], labels.float())
        return outputs

    def adapter_state(self) -> dict[str, torch.Tensor]:
        """The trained weights only: the bank's A/B per adapted layer and the gate."""
        state = {f"bank.{name}.{part}": getattr(layer, part).detach().cpu().contiguous()
                 for name, layer in self.bank.layers.items() for part in ("lora_a", "lora_b")}
        if self.gate is not None:
            state |= {f"gate.{key}": value.detach().cpu().contiguous() for key, value in self.gate.state_dict().items()}
        return state

    def load_adapter_state(self, state: dict[str, torch.Tensor]) -> None:
        expected = set(self.adapter_state())
        if set(state) != expected:
            raise ArtifactError(f"RecLoRA weights hold {sorted(set(state) ^ expected)[:4]}… unlike this scorer's")
        with torch.no_grad():
            for name, layer in self.bank.layers.items():
                layer.lora_a.copy_(state[f"bank.{name}.lora_a"])
                layer.lora_b.copy_(state[f"bank.{name}.lora_b"])
        if self.gate is not None:
            self.gate.load_state_dict({key.removeprefix("gate."): value for key, value in state.items()
                                       if key.startswith("gate.")})


def load_llm(name_or_path: str) -> tuple[nn.Module, Any, tuple[int, int]]:
    """(causal LM, left-padding tokenizer truncating on the left, (yes, no) token ids)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from towerline.backbones import resolve_backbone

    directory = resolve_backbone(name_or_path)
    tokenizer = AutoTokenizer.from_pretrained(directory)
    # Left: the last position is every prompt's last token. Truncating the left drops the oldest
    # history lines and keeps the question.
    tokenizer.padding_side = tokenizer.truncation_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    answer_ids = []
    for answer in (ANSWER_YES, ANSWER_NO):
        ids = tokenizer(answer, add_special_tokens=False)["input_ids"]
        if len(ids) != 1:
            raise ConfigError(f"rec.reclora.llm {name_or_path!r}: the answer {answer!r} is {len(ids)} tokens, "
                              "expected one")
        answer_ids.append(ids[0])
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    return model, tokenizer, (answer_ids[0], answer_ids[1])


def build_scorer(settings: RecLoraConfig, user_dim: int) -> tuple[RecLoraScorer, Any]:
    llm, tokenizer, answer_ids = load_llm(settings.llm)
    return RecLoraScorer(llm, settings, user_dim, answer_ids), tokenizer


def save_scorer(scorer: RecLoraScorer, directory: Path, extra: dict[str, Any]) -> None:
    save_file(scorer.adapter_state(), str(directory / ADAPTER_FILE), metadata={"format": "pt"})
    spec = {"format": SPEC_FORMAT, "settings": scorer.settings.model_dump(mode="json"), "user_dim": scorer.user_dim,
            "answer_ids": list(scorer.answer_ids), **extra}
    (directory / SPEC_FILE).write_text(json.dumps(spec, indent=2) + "\n")


def load_scorer(directory: Path) -> tuple[RecLoraScorer, Any, dict[str, Any]]:
    """(scorer in eval mode, tokenizer, the saved spec) from a directory `save_scorer` wrote."""
    spec_path = directory / SPEC_FILE
    if not spec_path.is_file() or not (directory / ADAPTER_FILE).is_file():
        raise ArtifactError(f"no RecLoRA scorer in {directory}: expected {SPEC_FILE} and {ADAPTER_FILE}")
    spec = json.loads(spec_path.read_text())
    if spec.get("format") != SPEC_FORMAT:
        raise ArtifactError(f"{spec_path}: format {spec.get('format')!r}, expected {SPEC_FORMAT!r}")
    scorer, tokenizer = build_scorer(RecLoraConfig.model_validate(spec["settings"]), int(spec["user_dim"]))
    scorer.load_adapter_state(load_file(str(directory / ADAPTER_FILE)))
    return scorer.eval(), tokenizer, spec

"""RecLoRA's personalised meta-LoRA bank (Zhu et al., arXiv 2408.03533).

Each adapted projection W (the attention's q and v by default) gets K low-rank pairs (A_k, B_k);
a sample's output is W x + s · Σ_k α_k B_k A_k x, with α the sample's mixing weights (a row of a
[batch, K] tensor from the gate). The sum over experts is one batched einsum for the whole batch:
no per-user loop and no per-user weights; α is an ordinary input, which is what lets one exported
graph personalise every user. With K = 1 and α = 1 the layer is a plain shared LoRA (the
TALLRec-style baseline).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn


class MetaLoraLinear(nn.Module):
    """A frozen nn.Linear plus a bank of K LoRA pairs mixed per sample."""

    def __init__(self, base: nn.Linear, experts: int, rank: int, lora_alpha: float) -> None:
        super().__init__()
        self.base = base
        for parameter in base.parameters():
            parameter.requires_grad_(False)
        self.experts, self.rank = experts, rank
        self.scale = lora_alpha / rank
        self.lora_a = nn.Parameter(torch.empty(experts, rank, base.in_features))
        # B starts at zero (as in LoRA): the adapted model starts as the base model for every α.
        self.lora_b = nn.Parameter(torch.zeros(experts, base.out_features, rank))
        for expert in range(experts):
            nn.init.kaiming_uniform_(self.lora_a.data[expert], a=math.sqrt(5))
        self.mixture: torch.Tensor | None = None

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        """inputs [B, ..., in] → [B, ..., out]; `mixture` [B, K] must be set (see `MetaLoraBank.mixing`)."""
        if self.mixture is None:
            raise RuntimeError("meta-LoRA mixing weights are not set: call the model inside bank.mixing(alpha)")
        down = torch.einsum("...i,kri->...kr", inputs, self.lora_a.to(inputs.dtype))
        # α [B, K] broadcast over the middle dims (sequence positions) and the rank.
        alpha = self.mixture.to(inputs.dtype).reshape(inputs.shape[0], *([1] * (inputs.dim() - 2)), self.experts, 1)
        update = torch.einsum("...kr,kor->...o", down * alpha, self.lora_b.to(inputs.dtype))
        return self.base(inputs) + self.scale * update


class MetaLoraBank:
    """The adapted layers of one model, and the context that hands them a batch's mixing weights."""

    def __init__(self, layers: dict[str, MetaLoraLinear]) -> None:
        if not layers:
            raise ValueError("no layer was adapted: check the target module names")
        self.layers = layers

    @classmethod
    def attach(cls, model: nn.Module, targets: Sequence[str], experts: int, rank: int,
               lora_alpha: float) -> MetaLoraBank:
        """Replace every nn.Linear whose name ends with one of `targets` (e.g. q_proj, v_proj) in place;
        freezes the rest of the model."""
        for parameter in model.parameters():
            parameter.requires_grad_(False)
        found: dict[str, MetaLoraLinear] = {}
        for name, module in list(model.named_modules()):
            if isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] in targets:
                parent_name, _, child = name.rpartition(".")
                adapted = MetaLoraLinear(module, experts, rank, lora_alpha)
                setattr(model.get_submodule(parent_name) if parent_name else model, child, adapted)
                found[name] = adapted
        return cls(found)

    @property
    def experts(self) -> int:
        return next(iter(self.layers.values())).experts

    def parameters(self) -> Iterator[nn.Parameter]:
        for layer in self.layers.values():
            yield layer.lora_a
            yield layer.lora_b

    @contextmanager
    def mixing(self, alpha: torch.Tensor) -> Iterator[None]:
        """Every adapted layer mixes its experts with `alpha` [B, K] for the calls inside the block."""
        if alpha.dim() != 2 or alpha.shape[1] != self.experts:
            raise ValueError(f"mixing weights of shape {tuple(alpha.shape)}, expected [batch, {self.experts}]")
        for layer in self.layers.values():
            layer.mixture = alpha
        try:
            yield
        finally:
            for layer in self.layers.values():
                layer.mixture = None


class LoraGate(nn.Module):
    """α = softmax(MLP(user representation) / T): soft routing over the K experts; with `top_k` > 0
    only the k largest weights stay (renormalised), the others are exactly 0."""

    def __init__(self, user_dim: int, experts: int, hidden: int, temperature: float, top_k: int = 0) -> None:
        super().__init__()
        if not 0 <= top_k <= experts:
            raise ValueError(f"top_k={top_k} must be between 0 (soft routing) and the number of experts {experts}")
        self.mlp = nn.Sequential(nn.Linear(user_dim, hidden), nn.ReLU(), nn.Linear(hidden, experts))
        self.temperature, self.top_k = temperature, top_k

    def forward(self, user_representation: torch.Tensor) -> torch.Tensor:
        alpha = torch.softmax(self.mlp(user_representation) / self.temperature, dim=-1)
        if self.top_k:
            kept = torch.topk(alpha, self.top_k, dim=-1)
            alpha = torch.zeros_like(alpha).scatter(-1, kept.indices, kept.values)
            alpha = alpha / alpha.sum(-1, keepdim=True)
        return alpha

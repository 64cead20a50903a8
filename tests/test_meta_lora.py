"""RecLoRA's meta-LoRA bank: one batched computation equals the per-sample sum, K = 1 is peft's LoRA,
and the gate's routing."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from personalization.meta_lora import LoraGate, MetaLoraBank, MetaLoraLinear


def _randomised(layer: MetaLoraLinear, seed: int = 0) -> MetaLoraLinear:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        layer.lora_b.copy_(torch.randn(layer.lora_b.shape, generator=generator))
    return layer


def test_the_batched_mixture_equals_each_sample_with_its_own_weights() -> None:
    torch.manual_seed(0)
    layer = _randomised(MetaLoraLinear(nn.Linear(12, 10), experts=4, rank=3, lora_alpha=6))
    inputs = torch.randn(5, 7, 12)
    alpha = torch.softmax(torch.randn(5, 4), dim=-1)
    layer.mixture = alpha
    batched = layer(inputs)
    for sample in range(5):
        # W x + s Σ_k α_k B_k A_k x, one sample and one expert at a time.
        expected = layer.base(inputs[sample])
        for expert in range(4):
            delta = inputs[sample] @ layer.lora_a[expert].T @ layer.lora_b[expert].T
            expected = expected + layer.scale * alpha[sample, expert] * delta
        torch.testing.assert_close(batched[sample], expected, rtol=1e-5, atol=1e-5)
    # Different users get different outputs for the same input: the mixture is per sample.
    layer.mixture = alpha.flip(0)
    assert not torch.allclose(layer(inputs)[0], batched[0])


def test_one_expert_with_weight_one_is_pefts_lora() -> None:
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(8, 8))
    reference = get_peft_model(nn.Sequential(nn.Linear(8, 8)), LoraConfig(r=4, lora_alpha=8, target_modules=["0"]))
    reference.base_model.model[0].base_layer.load_state_dict(base[0].state_dict())
    bank = MetaLoraBank.attach(base, ["0"], experts=1, rank=4, lora_alpha=8)
    adapted = bank.layers["0"]
    _randomised(adapted)
    peft_layer = reference.base_model.model[0]
    with torch.no_grad():
        peft_layer.lora_A["default"].weight.copy_(adapted.lora_a[0])
        peft_layer.lora_B["default"].weight.copy_(adapted.lora_b[0])
    inputs = torch.randn(3, 8)
    with bank.mixing(torch.ones(3, 1)):
        ours = base(inputs)
    torch.testing.assert_close(ours, reference(inputs))


def test_a_fresh_bank_is_the_base_model_and_only_the_bank_trains(tiny_decoder: Path) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_decoder)
    ids = torch.tensor([[5, 6, 7, 8], [9, 10, 11, 12]])
    before = model(input_ids=ids).logits
    bank = MetaLoraBank.attach(model, ["q_proj", "v_proj"], experts=3, rank=2, lora_alpha=4)
    assert sorted(bank.layers) == sorted(f"model.layers.{layer}.self_attn.{proj}"
                                         for layer in range(2) for proj in ("q_proj", "v_proj"))
    with bank.mixing(torch.full((2, 3), 1 / 3)):
        torch.testing.assert_close(model(input_ids=ids).logits, before)
    trainable = {id(parameter) for parameter in model.parameters() if parameter.requires_grad}
    assert trainable == {id(parameter) for parameter in bank.parameters()}
    with pytest.raises(RuntimeError, match="mixing weights are not set"):
        model(input_ids=ids)
    with pytest.raises(ValueError, match=r"expected \[batch, 3\]"), bank.mixing(torch.ones(2, 2)):
        pass


def test_the_gate_routes_softly_or_to_the_top_k_and_passes_gradients() -> None:
    torch.manual_seed(0)
    users = torch.randn(6, 10, requires_grad=True)
    soft = LoraGate(10, experts=5, hidden=8, temperature=0.5)(users)
    assert (soft > 0).all() and torch.allclose(soft.sum(-1), torch.ones(6))
    routed = LoraGate(10, experts=5, hidden=8, temperature=0.5, top_k=2)(users)
    assert ((routed > 0).sum(-1) == 2).all() and torch.allclose(routed.sum(-1), torch.ones(6))
    (routed[:, 0].sum() + soft[:, 1].sum()).backward()
    assert users.grad is not None and users.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="top_k=6"):
        LoraGate(10, experts=5, hidden=8, temperature=1.0, top_k=6)

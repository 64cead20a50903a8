"""RecLoRA: the long-short retriever, the prompt, the Yes/No scorer on a tiny random Llama with left
padding, routing, and Few2Many training end to end with a save/load round trip."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import build_tiny_decoder
from rec_fixtures import write_interactions_artifact

from personalization.din import DinModel
from personalization.interactions import CtrData, load_ctr_data
from personalization.reclora import build_scorer, load_scorer, save_scorer
from personalization.reclora_data import ItemTexts, RecLoraCollator, build_inputs, few2many_rows
from personalization.reclora_prompt import PromptItem, build_prompt, pick_short_history
from personalization.reclora_run import predict_reclora, train_reclora
from personalization.train_crm import train_din
from towerline.config import CrmConfig, RecLoraConfig

CRM = CrmConfig(embedding_dim=8, attention_hidden=(16,), mlp_hidden=(32, 16), learning_rate=1e-2, batch_size=128,
                max_epochs=2, history_length=20)
PROMPT_WORDS = ["The", "user", "watched", "has", "no", "history", "yet", "rated", "Will", "like", "Answer", "Yes",
                "No", "or", "Item", "of", "topic", ":", "-", "(", ")", "?", ".", '"', *map(str, range(200))]


@pytest.fixture(scope="module", autouse=True)
def few_threads() -> Iterator[None]:
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def llm(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_decoder(tmp_path_factory.mktemp("llm") / "tiny-llama", PROMPT_WORDS, causal_lm=True)


@pytest.fixture(scope="module")
def artifact(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_interactions_artifact(tmp_path_factory.mktemp("interactions"), users=120, items=60, seed=1,
                                       interactions=(10, 30))


@pytest.fixture(scope="module")
def data(artifact: Path) -> CtrData:
    return load_ctr_data(artifact, history_length=CRM.history_length)


@pytest.fixture(scope="module")
def crm(data: CtrData, tmp_path_factory: pytest.TempPathFactory) -> DinModel:
    return train_din(data, CRM, tmp_path_factory.mktemp("crm"), seed=0).model


@pytest.fixture(scope="module")
def texts(artifact: Path, data: CtrData, tiny_backbone: Path) -> ItemTexts:
    return ItemTexts.load(artifact, data.sizes.items, str(tiny_backbone))


def settings(llm: Path, tiny_backbone: Path, **changes: object) -> RecLoraConfig:
    return RecLoraConfig(llm=str(llm), title_encoder=str(tiny_backbone), experts=4, rank=2, gate_hidden=8,
                         prompt_history=3, train_samples=96, eval_samples=64, batch_size=16, epochs=2,
                         learning_rate=1e-2, max_prompt_tokens=64).model_copy(update=changes)


def test_the_short_history_is_the_most_relevant_items_in_time_order() -> None:
    vectors = np.eye(6, dtype=np.float32)
    vectors[5] = vectors[1] * 0.8 + vectors[3] * 0.6  # the target resembles items 1 and 3
    assert pick_short_history([4, 3, 2, 1], target=5, title_vectors=vectors, size=2, mode="relevant") == [3, 1]
    assert pick_short_history([4, 3, 2, 1], target=5, title_vectors=vectors, size=2, mode="recent") == [2, 1]
    assert pick_short_history([2], target=5, title_vectors=vectors, size=2, mode="relevant") == [2]
    # Among equally relevant items the latest wins.
    assert pick_short_history([2, 4, 0], target=5, title_vectors=vectors, size=1, mode="relevant") == [0]


def test_the_prompt_names_the_history_with_ratings_and_the_target() -> None:
    prompt = build_prompt([PromptItem("Heat", 5.0), PromptItem("Clue", None)], "Alien")
    assert "- Heat (rated 5)" in prompt and "- Clue\n" in prompt
    assert prompt.endswith('Will the user like "Alien"? Answer Yes or No.\nAnswer:')
    assert "no history yet" in build_prompt([], "Alien")


def test_the_score_is_yes_against_no_at_each_prompts_own_last_token(llm: Path, tiny_backbone: Path) -> None:
    torch.manual_seed(0)
    scorer, tokenizer = build_scorer(settings(llm, tiny_backbone, routing="uniform"), user_dim=5)
    scorer.eval()
    prompts = ["The user has no history yet . Answer :", "The user watched : - Item 3 ( rated 4 ) Answer :"]
    batch = RecLoraCollator(tokenizer, 64)([{"prompt": text, "user_representation": np.zeros(5)} for text in prompts])
    assert (batch["attention_mask"][:, 0] == 0).any()  # the shorter prompt is padded, on the left
    with torch.no_grad():
        batched = scorer(**batch)["logits"]
        for row, text in enumerate(prompts):
            ids = tokenizer(text, return_tensors="pt")["input_ids"]
            # A fresh bank (B = 0) leaves the base LLM: score it alone, unpadded, with the LoRA bypassed.
            with scorer.bank.mixing(torch.ones(1, 4) / 4):
                logits = scorer.llm(input_ids=ids).logits[0, -1]
            yes, no = scorer.answer_ids
            assert batched[row].item() == pytest.approx((logits[yes] - logits[no]).item(), abs=1e-4)


def test_the_gate_personalises_and_uniform_routing_does_not(llm: Path, tiny_backbone: Path) -> None:
    users = torch.randn(3, 5)
    torch.manual_seed(0)
    soft, _ = build_scorer(settings(llm, tiny_backbone), user_dim=5)
    alpha = soft.mixture(users)
    assert not torch.allclose(alpha[0], alpha[1])
    routed, _ = build_scorer(settings(llm, tiny_backbone, routing="top_k", top_k=1), user_dim=5)
    assert ((routed.mixture(users) > 0).sum(-1) == 1).all()
    uniform, _ = build_scorer(settings(llm, tiny_backbone, routing="uniform"), user_dim=5)
    assert uniform.gate is None and torch.equal(uniform.mixture(users), torch.full((3, 4), 0.25))


def test_few2many_trains_the_bank_on_a_sample_and_round_trips(llm: Path, tiny_backbone: Path, data: CtrData,
                                                               crm: DinModel, texts: ItemTexts, tmp_path: Path) -> None:
    chosen = settings(llm, tiny_backbone)
    assert len(few2many_rows(data.train, chosen.train_samples, seed=0)) == chosen.train_samples < len(data.train)
    result = train_reclora(data, crm, texts, chosen)
    assert result.train_samples == 96 and result.test_samples == 64
    assert set(result.test) == set(result.din_test) == {"auc", "logloss", "gauc"}
    trained_b = [layer.lora_b for layer in result.scorer.bank.layers.values()]
    assert all(weights.abs().sum() > 0 for weights in trained_b)  # B starts at 0: training moved every layer
    save_scorer(result.scorer, tmp_path, extra={"crm": "test"})
    loaded, tokenizer, spec = load_scorer(tmp_path)
    assert spec["crm"] == "test" and spec["settings"]["experts"] == 4
    rows = few2many_rows(data.test, 32, seed=0)
    inputs = build_inputs(data.test, rows, crm, texts, chosen)
    collator = RecLoraCollator(tokenizer, chosen.max_prompt_tokens)
    np.testing.assert_allclose(predict_reclora(loaded, inputs, collator, 8),
                               predict_reclora(result.scorer, inputs, collator, 8), rtol=1e-5, atol=1e-6)

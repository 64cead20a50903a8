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


def test_prefix_changes_the_embedding(tiny_backbone: Path) -> None:
    plain = Tower.from_backbone(str(tiny_backbone), TowerSpec(max_length=16))
    prefixed = Tower.from_backbone(str(tiny_backbone), TowerSpec(prefix="query: ", max_length=16))
    assert not np.allclose(plain.encode(["text"]), prefixed.encode(["text"]))


def test_unknown_backbone_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"encoder\.backbone"):
        resolve_backbone(str(tmp_path / "missing"))

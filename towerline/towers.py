"""Dual-encoder artifacts: a query tower and a doc tower saved side by side.

The embedding space of a dual encoder is the fingerprint of its doc tower: documents indexed
with that tower can be searched by any query encoder that carries the same fingerprint (the
trained query tower, its ONNX export, or a distilled student).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from towerline.artifacts import ArtifactWriter, Manifest, checksum_tree, fingerprint_of, read_manifest
from towerline.config import EncoderConfig, TowerlineConfig
from towerline.encoder import Tower
from towerline.tower_spec import DOC_DIR, DUAL_ENCODER_KIND, QUERY_DIR, TowerSpec


def tower_spec(encoder: EncoderConfig, role: Literal["query", "doc"]) -> TowerSpec:
    """The two towers differ only in prefix and length budget."""
    is_query = role == "query"
    return TowerSpec(
        pooling=encoder.pooling,
        prefix=encoder.query_prefix if is_query else encoder.doc_prefix,
        max_length=encoder.max_query_length if is_query else encoder.max_doc_length,
        normalize=encoder.normalize,
        document_template=encoder.doc_template,
    )


def towers_from_backbone(encoder: EncoderConfig) -> tuple[Tower, Tower]:
    """Both towers start from the same checkpoint (ScalingNote stage 1)."""
    return (
        Tower.from_backbone(encoder.backbone, tower_spec(encoder, "query")),
        Tower.from_backbone(encoder.backbone, tower_spec(encoder, "doc")),
    )


def save_dual_encoder(
    query_tower: Tower,
    doc_tower: Tower,
    dest: Path,
    *,
    producer: str,
    config: TowerlineConfig,
    inputs: dict[str, Manifest] | None = None,
    metadata: dict | None = None,
) -> Manifest:
    with ArtifactWriter(dest, DUAL_ENCODER_KIND, producer=producer, inputs=inputs, config=config) as staged:
        query_tower.save(staged.path / QUERY_DIR)
        doc_tower.save(staged.path / DOC_DIR)
        staged.metadata.update(metadata or {})
        staged.metadata["backbone"] = config.encoder.backbone
        staged.metadata["dim"] = doc_tower.dim
        staged.metadata["embedding_space"] = fingerprint_of(checksum_tree(staged.path, DOC_DIR))
    assert staged.manifest is not None
    return staged.manifest


def read_dual_encoder(path: Path) -> Manifest:
    return read_manifest(path, DUAL_ENCODER_KIND)


def load_towers(path: Path) -> tuple[Tower, Tower, Manifest]:
    manifest = read_dual_encoder(path)
    return Tower.load(path / QUERY_DIR), Tower.load(path / DOC_DIR), manifest

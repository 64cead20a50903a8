"""The batch-embedding Spark job: the doc tower inside Spark gives the local path's vectors, and
`index build --embeddings` indexes them — refusing vectors of another tower or another corpus."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from pyspark.sql import SparkSession

from indexing.build import build_index, embed_texts
from indexing.load import load_index
from pipelines.embed_corpus import run_embed_corpus
from towerline.artifacts import read_manifest
from towerline.beir import load_dataset
from towerline.config import TowerlineConfig
from towerline.doc_embeddings import EMBEDDINGS_KIND, read_embeddings
from towerline.errors import DataError
from towerline.towers import load_towers, save_dual_encoder, towers_from_backbone


@pytest.fixture(scope="module")
def encoder(tmp_path_factory: pytest.TempPathFactory, tiny_backbone: Path, tiny_dataset: Path) -> Path:
    from towerline.config import load_config

    config = load_config(None, [f"encoder.backbone={tiny_backbone}", "encoder.max_doc_length=48"])
    path = tmp_path_factory.mktemp("embed") / "encoder"
    save_dual_encoder(*towers_from_backbone(config.encoder), path, producer="test", config=config)
    return path


@pytest.fixture(scope="module")
def embeddings(spark: SparkSession, encoder: Path, tiny_dataset: Path,
               tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, TowerlineConfig]:
    from conftest import SPARK_TEST_OVERRIDES

    from towerline.config import load_config

    config = load_config(None, [f"data.dir={tiny_dataset}", *SPARK_TEST_OVERRIDES, "index.batch_size=8"])
    output = tmp_path_factory.mktemp("embeddings") / "embeddings"
    run_embed_corpus(config, encoder, output, partitions=3)  # several workers' partitions, several files
    return output, config


def test_spark_embeddings_equal_the_local_path(embeddings: tuple[Path, TowerlineConfig], encoder: Path) -> None:
    path, config = embeddings
    doc_ids, vectors, manifest = read_embeddings(path)
    corpus = load_dataset(config.data).corpus
    assert doc_ids == sorted(corpus) and manifest.kind == EMBEDDINGS_KIND
    assert manifest.metadata["count"] == len(corpus) and manifest.metadata["dim"] == vectors.shape[1]
    assert len(list((path / "embeddings.parquet").glob("*.parquet"))) > 1
    _, doc_tower, encoder_manifest = load_towers(encoder)
    assert manifest.metadata["embedding_space"] == encoder_manifest.metadata["embedding_space"]
    template = doc_tower.spec.document_template
    local = embed_texts(doc_tower, [corpus[doc_id].render(template) for doc_id in doc_ids], config.index)
    np.testing.assert_allclose(vectors, local, rtol=0, atol=1e-5)


def test_index_build_takes_the_spark_embeddings(embeddings: tuple[Path, TowerlineConfig], encoder: Path,
                                                tmp_path: Path) -> None:
    path, config = embeddings
    from_spark = build_index(config, encoder, tmp_path / "from-spark", path)
    local = build_index(config, encoder, tmp_path / "local")
    assert from_spark.metadata["embedding_space"] == local.metadata["embedding_space"]
    queries = np.eye(1, from_spark.metadata["dim"], dtype=np.float32)
    queries = np.vstack([queries, load_index(tmp_path / "local", config.index).index.reconstruct(0)[None]])
    hits = [load_index(tmp_path / name, config.index).search(queries, 5) for name in ("from-spark", "local")]
    assert [[doc_id for doc_id, _ in row] for row in hits[0]] == [[doc_id for doc_id, _ in row] for row in hits[1]]


def test_embeddings_of_another_tower_or_corpus_are_refused(embeddings: tuple[Path, TowerlineConfig], encoder: Path,
                                                           tiny_dataset: Path, tmp_path: Path) -> None:
    path, config = embeddings
    query_tower, doc_tower, _ = load_towers(encoder)
    with torch.no_grad():
        next(doc_tower.parameters()).add_(0.01)
    other = tmp_path / "other-encoder"
    save_dual_encoder(query_tower, doc_tower, other, producer="test", config=config)
    with pytest.raises(DataError, match="another doc tower"):
        build_index(config, other, tmp_path / "index", path)
    smaller = tmp_path / "smaller"
    shutil.copytree(tiny_dataset, smaller)
    lines = (smaller / "corpus.jsonl").read_text().splitlines(keepends=True)
    (smaller / "corpus.jsonl").write_text("".join(lines[:-3]))
    with pytest.raises(DataError, match="embedded documents against"):
        build_index(config.model_copy(update={"data": config.data.model_copy(update={"dir": smaller})}), encoder,
                    tmp_path / "index", path)
    assert not (tmp_path / "index").exists()
    assert read_manifest(path, EMBEDDINGS_KIND).metadata["count"] == len(lines)

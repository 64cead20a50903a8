"""Stage 2: pseudo-queries (Spark), query-tower distillation, and the student served against the
teacher's index over a real gRPC channel."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from distill.run import run_distill
from indexing.build import build_index
from pipelines.pseudo_queries import pseudo_queries_for, run_pseudo_queries
from serving.app import build_service
from serving.client import RetrievalClient
from serving.onnx_export import run_export
from serving.server import start_server
from towerline.config import DistillConfig, TowerlineConfig
from towerline.encoder import Tower
from towerline.errors import ArtifactError
from towerline.tracking import Tracker
from training.run import init_dual_encoder


@pytest.fixture()
def teacher(tiny_config: TowerlineConfig, tmp_path: Path) -> tuple[Path, Path]:
    """A dual encoder and the FAISS index its doc tower built: what a distilled student must search."""
    init_dual_encoder(tiny_config, tmp_path / "teacher")
    build_index(tiny_config, tmp_path / "teacher", tmp_path / "teacher-index")
    return tmp_path / "teacher", tmp_path / "teacher-index"


def distill_config(tiny_config: TowerlineConfig) -> TowerlineConfig:
    config = tiny_config.model_copy(deep=True)
    config.distill.student = "layers:1"
    config.distill.batch_size = 8
    config.distill.epochs = 8
    config.distill.learning_rate = 3e-3
    config.distill.dev_queries = 5
    return config


def test_pseudo_queries_are_titles_and_sentences_drawn_the_same_way_every_time() -> None:
    settings = DistillConfig(pseudo_sentences_per_doc=2, pseudo_min_words=3)
    body = "Short one. This sentence has enough words in it. Another sentence that is long enough! Tiny."
    rows = pseudo_queries_for("d1", "A title of five words", body, settings)
    assert rows[0] == ("A title of five words", "d1", "title")
    sentences = {text for text, _, kind in rows if kind == "sentence"}
    assert sentences == {"This sentence has enough words in it.", "Another sentence that is long enough!"}
    assert pseudo_queries_for("d1", "A title of five words", body, settings) == rows
    assert pseudo_queries_for("d2", "Two words", body, DistillConfig(pseudo_sentences_per_doc=1))[0][2] == "sentence"


def test_distilled_student_learns_the_teacher_and_keeps_its_embedding_space(
    tiny_config: TowerlineConfig, teacher: tuple[Path, Path], tiny_decoder: Path, tmp_path: Path
) -> None:
    """A student of another architecture (a tiny Llama) starts far from the teacher and learns it."""
    config = distill_config(tiny_config)
    config.distill.student = str(tiny_decoder)
    run_pseudo_queries(config, tmp_path / "pseudo")
    pseudo = pd.read_parquet(tmp_path / "pseudo" / "queries.parquet")
    assert len(pseudo) == 80 and set(pseudo["kind"]) == {"sentence"}  # 2-word titles are too short

    teacher_dir, index_dir = teacher
    manifest = run_distill(config, teacher_dir, index_dir, tmp_path / "student", Tracker(None),
                           pseudo_queries=tmp_path / "pseudo")
    teacher_manifest = json.loads((teacher_dir / "manifest.json").read_text())
    assert manifest.kind == "query-encoder"
    assert manifest.metadata["embedding_space"] == teacher_manifest["metadata"]["embedding_space"]
    assert manifest.metadata["student_parameters"] < manifest.metadata["teacher_parameters"]
    assert manifest.metadata["queries"]["pseudo_queries"] == 80 and manifest.metadata["queries"]["dev_queries"] == 5
    assert len(manifest.metadata["dev_ndcg_at_10"]["per_epoch"]) >= 1

    # The student moved towards the teacher on texts it never saw.
    held_out = ["zebra crossing at night", "a completely new query", "d1 d2 d3"]
    teacher_tower = Tower.load(teacher_dir / "query")
    student = Tower.load(tmp_path / "student" / "query")
    initial = Tower.from_backbone(str(tiny_decoder), student.spec)
    target = teacher_tower.encode(held_out)
    before = (initial.encode(held_out) * target).sum(axis=1).mean()
    after = (student.encode(held_out) * target).sum(axis=1).mean()
    assert after > before + 0.2, (before, after)


def test_a_rerun_takes_the_teacher_query_embeddings_from_its_cache(
    tiny_config: TowerlineConfig, teacher: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = distill_config(tiny_config)
    teacher_dir, index_dir = teacher
    encode, teacher_calls = Tower.encode, []

    def recording(self: Tower, texts: list[str], *args: object, **kwargs: object):
        if Path(self.backbone.config._name_or_path) == teacher_dir / "query":
            teacher_calls.append(len(texts))
        return encode(self, texts, *args, **kwargs)

    monkeypatch.setattr(Tower, "encode", recording)
    first = run_distill(config, teacher_dir, index_dir, tmp_path / "student", Tracker(None))
    texts = first.metadata["queries"]["distinct_texts"]
    assert texts in teacher_calls and len(list((tmp_path / "student.teacher-cache").glob("shard-*.npy"))) == 1
    teacher_calls.clear()
    config.distill.cosine_weight = 0.5  # another student setting, the same teacher and texts
    run_distill(config, teacher_dir, index_dir, tmp_path / "student", Tracker(None))
    assert texts not in teacher_calls  # only the dev scoring ran the teacher


def test_the_student_serves_against_the_teacher_index_and_no_other(
    tiny_config: TowerlineConfig, teacher: tuple[Path, Path], tmp_path: Path
) -> None:
    config = distill_config(tiny_config)
    config.distill.max_steps = 2
    config.distill.rank_weight = 1.0  # the ranking term on the way (its maths: test_ranking_term_...)
    teacher_dir, index_dir = teacher
    run_distill(config, teacher_dir, index_dir, tmp_path / "student", Tracker(None))
    run_export(config, tmp_path / "student", tmp_path / "student-onnx")
    service = build_service(config, index_dir, tmp_path / "student-onnx")
    server, port = start_server(service, config.serve.model_copy(update={"port": 0}))
    try:
        with RetrievalClient(f"127.0.0.1:{port}") as client:
            hits = client.search("topic words of a query", 5)
            assert len(hits) == 5
            expected = service.search("topic words of a query", 5).hits
            assert [hit.doc_id for hit in hits] == [hit.doc_id for hit in expected]
            assert client.info().embedding_space == json.loads(
                (teacher_dir / "manifest.json").read_text())["metadata"]["embedding_space"]
    finally:
        server.stop(grace=1).wait()

    # Another dual encoder's index lives in another embedding space: refused, at distillation and at serving.
    other = config.model_copy(deep=True)
    other.encoder.pooling = "cls"
    init_dual_encoder(other, tmp_path / "other")
    build_index(other, tmp_path / "other", tmp_path / "other-index")
    with pytest.raises(ArtifactError, match="embedding space mismatch"):
        build_service(config, tmp_path / "other-index", tmp_path / "student-onnx")
    with pytest.raises(ArtifactError, match="embedding space mismatch"):
        run_distill(config, teacher_dir, tmp_path / "other-index", tmp_path / "nope", Tracker(None))
    assert not (tmp_path / "nope").exists()
    assert np.isfinite(hits[0][1])


def test_a_fresh_projection_starts_at_the_least_squares_map_to_the_teacher(
    tiny_config: TowerlineConfig, teacher: tuple[Path, Path], tiny_decoder: Path
) -> None:
    import torch

    from distill.model import fit_projection
    from towerline.tower_spec import TowerSpec

    teacher_tower = Tower.load(teacher[0] / "query")
    texts = [f"d{i} d{i + 1} zebra {i}" for i in range(60)]
    targets = torch.as_tensor(teacher_tower.encode(texts))
    torch.manual_seed(0)
    student = Tower.from_backbone(str(tiny_decoder), TowerSpec(projection_dim=teacher_tower.dim + 8))
    student_targets = torch.nn.functional.pad(targets, (0, 8))  # a wider teacher space, for the shapes
    before = float((torch.as_tensor(student.encode(texts)) * student_targets).sum(1).mean())
    fitted = fit_projection(student, texts, student_targets, sample=40, seed=0)
    after = float((torch.as_tensor(student.encode(texts)) * student_targets).sum(1).mean())
    assert fitted is not None and after > before + 0.3, (before, after)
    assert after == pytest.approx(fitted, abs=0.05)  # the fit's own report (40 of the 60 texts)
    assert fit_projection(Tower.from_backbone(str(tiny_decoder), TowerSpec()), texts, targets, 40, 0) is None


@pytest.mark.parametrize("index_type", ["flat", "ivf"])
def test_ranking_term_reads_the_teacher_index_and_is_zero_only_when_the_student_ranks_as_the_teacher(
    tiny_config: TowerlineConfig, tmp_path: Path, index_type: str
) -> None:
    import torch

    from distill.model import DistillationModel
    from distill.ranking import index_vectors, teacher_candidates
    from indexing.load import load_index

    config = tiny_config.model_copy(deep=True)
    config.index.type = index_type
    init_dual_encoder(config, tmp_path / "teacher")
    build_index(config, tmp_path / "teacher", tmp_path / "index")
    index = load_index(tmp_path / "index", config.index)
    vectors = index_vectors(index)
    assert vectors.shape == (index.size, index.dim)
    # The stored vectors by row: each finds itself first at its own norm (unit vectors).
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-4)
    assert [hits[0][0] for hits in index.search(vectors[[0, 7]], 1)] == [index.doc_ids[0], index.doc_ids[7]]
    doc_tower = Tower.load(tmp_path / "teacher" / "doc")
    queries = Tower.load(tmp_path / "teacher" / "query").encode(["d1 d2 zebra", "topic words", "d7"])
    candidates = teacher_candidates(index, queries, 4, batch_size=2)
    assert candidates.shape == (3, 4)
    assert candidates[:, 0].tolist() == [index.doc_ids.index(hits[0][0]) for hits in index.search(queries, 1)]

    model = DistillationModel(doc_tower, 0.0, 0.0, rank_weight=1.0, doc_vectors=torch.from_numpy(vectors))
    teacher = torch.from_numpy(queries)
    rows = torch.from_numpy(candidates)
    rows[0, -1] = -1  # FAISS's padding for a short result list is skipped
    assert float(model._rank_loss(teacher, teacher, rows)) == pytest.approx(0.0, abs=1e-6)
    student = teacher.flip(0).clone().requires_grad_(True)  # each query answered as another would be
    loss = model._rank_loss(student, teacher, rows)
    assert float(loss.detach()) > 0.01
    loss.backward()
    assert student.grad is not None and float(student.grad.abs().sum()) > 0
    with pytest.raises(ValueError, match="document vectors"):
        DistillationModel(doc_tower, 1.0, 1.0, rank_weight=1.0)

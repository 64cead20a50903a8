"""Stage 2 driver (`towerline distill`): a dual encoder + its doc index → a small query encoder.

Only the query tower is distilled: documents keep the teacher doc tower's embeddings, so the
student searches the teacher's index as it is. The student artifact (kind `query-encoder`)
carries the teacher's embedding space; export and the service pair it with that index only.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset
from transformers import TrainerCallback

from distill.model import DistillationModel, build_student, count_parameters, fit_projection
from distill.queries import DistillQueries, collect_queries
from distill.ranking import index_vectors, teacher_candidates
from evaluation.retrieval import retrieval_metrics
from indexing.embed_shards import embed_resumably
from indexing.load import LoadedIndex, load_index
from towerline.artifacts import ArtifactWriter, Manifest, read_manifest, require_same_space
from towerline.beir import load_dataset
from towerline.config import TowerlineConfig
from towerline.encoder import Tower
from towerline.hf_trainer import OrderedLossTrainer, ProgressAndTracking, last_checkpoint, training_arguments
from towerline.progress import console, progress_bar
from towerline.tower_spec import DUAL_ENCODER_KIND, QUERY_DIR, QUERY_ENCODER_KIND
from towerline.tracking import Tracker

# Texts the least-squares projection start is fitted on (a 385 x 768 solve: seconds).
PROJECTION_FIT_SAMPLE = 8192
# Teacher query embeddings are cached in shards of this many texts: one shard for any realistic
# query set, so the encoding is the single length-sorted pass it always was (same numbers).
TEACHER_CACHE_SHARD = 1_000_000


class TeacherTargets(Dataset):
    """(query text, the frozen teacher's embedding of it, the teacher's top index rows for it), in
    training order."""

    def __init__(self, texts: list[str], embeddings: np.ndarray, order: list[int],
                 candidates: np.ndarray | None = None) -> None:
        self.texts, self.embeddings, self.order, self.candidates = texts, embeddings, order, candidates

    def __len__(self) -> int:
        return len(self.order)

    def __getitem__(self, position: int) -> tuple[str, np.ndarray, np.ndarray | None]:
        row = self.order[position]
        return self.texts[row], self.embeddings[row], None if self.candidates is None else self.candidates[row]


class StudentCollator:
    def __init__(self, student: Tower) -> None:
        self.student = student

    def __call__(self, items: list[tuple[str, np.ndarray, np.ndarray | None]]) -> dict[str, torch.Tensor]:
        batch = self.student.tokenize([text for text, _, _ in items])
        batch["teacher_embeddings"] = torch.from_numpy(np.stack([target for _, target, _ in items]))
        if items[0][2] is not None:
            batch["candidate_rows"] = torch.from_numpy(np.stack([rows for _, _, rows in items]))
        return batch


def dev_ndcg(tower: Tower, queries: DistillQueries, index: LoadedIndex, positive_min: int) -> dict[str, float]:
    """Retrieval against the teacher's index, not cosine to the teacher: a student at cosine 0.99
    can still lose the ranking."""
    return retrieval_metrics(tower.encode, queries.dev_queries, queries.dev_qrels, index, positive_min)


class DevRetrieval(TrainerCallback):
    """nDCG@10 of the student on the dev queries after every epoch (`every_steps`), logged to MLflow."""

    def __init__(self, student: Tower, queries: DistillQueries, index: LoadedIndex, positive_min: int,
                 tracker: Tracker, every_steps: int) -> None:
        self.student, self.queries, self.index, self.positive_min = student, queries, index, positive_min
        self.tracker = tracker
        self.every_steps = max(every_steps, 1)
        self.history: list[dict[str, float]] = []

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if not state.is_world_process_zero or state.global_step % self.every_steps:
            return
        metrics = dev_ndcg(self.student, self.queries, self.index, self.positive_min)
        self.history.append({"step": state.global_step, "ndcg@10": metrics["ndcg@10"]})
        self.tracker.metrics({"distill.dev_ndcg@10": metrics["ndcg@10"]}, step=state.global_step)


def run_distill(
    config: TowerlineConfig,
    encoder_path: Path,
    index_path: Path,
    output: Path,
    tracker: Tracker,
    *,
    pseudo_queries: Path | None = None,
    resume: bool = False,
) -> Manifest:
    settings = config.distill
    teacher_manifest = read_manifest(encoder_path, DUAL_ENCODER_KIND)
    index = load_index(index_path, config.index)
    require_same_space(teacher_manifest.metadata["embedding_space"], "the teacher", index.embedding_space,
                       "the index")
    dataset = load_dataset(config.data, [config.pairs.split])
    queries = collect_queries(dataset, config.pairs.split, config.data.positive_min, settings.dev_queries,
                              settings.seed, pseudo_queries, settings.query_log)
    teacher = Tower.load(encoder_path / QUERY_DIR).eval()
    # The frozen teacher's query embeddings are kept beside the output (keyed by the teacher and the
    # texts), so a rerun with other student settings does not encode them again.
    with progress_bar("teacher query embeddings", len(queries.train_texts)) as bar:
        targets = embed_resumably(
            queries.train_texts, lambda texts: teacher.encode(texts, on_batch=lambda n: bar.advance(0, n)),
            output.parent / f"{output.name}.teacher-cache", TEACHER_CACHE_SHARD, teacher_manifest.fingerprint,
            on_reused=lambda n: bar.advance(0, n))
    torch.manual_seed(settings.seed)
    student = build_student(settings, teacher, encoder_path / QUERY_DIR)
    start_cosine = (fit_projection(student, queries.train_texts, torch.as_tensor(targets), PROJECTION_FIT_SAMPLE,
                                   settings.seed) if settings.projection_init == "least_squares" else None)
    doc_vectors, candidates = None, None
    if settings.rank_weight > 0:
        doc_vectors = torch.from_numpy(index_vectors(index))
        candidates = teacher_candidates(index, targets, settings.rank_candidates)
    order = _epoch_order(len(targets), settings.batch_size, settings.epochs, settings.max_steps, settings.seed)
    total_steps = max(1, len(order) // settings.batch_size // settings.gradient_accumulation_steps)
    steps_per_epoch = max(1, len(targets) // settings.batch_size // settings.gradient_accumulation_steps)
    dev = DevRetrieval(student, queries, index, config.data.positive_min, tracker, steps_per_epoch)
    progress = ProgressAndTracking(tracker, total_steps, stage="distill")
    checkpoints = output.parent / f"{output.name}.checkpoints"
    trainer = OrderedLossTrainer(
        model=DistillationModel(student, settings.mse_weight, settings.cosine_weight,
                                rank_weight=settings.rank_weight, rank_temperature=settings.rank_temperature,
                                doc_vectors=doc_vectors),
        args=training_arguments(settings, checkpoints, total_steps),
        data_collator=StudentCollator(student),
        train_dataset=TeacherTargets(queries.train_texts, targets, order, candidates),
        callbacks=[progress, dev],
    )
    outcome = trainer.train(resume_from_checkpoint=last_checkpoint(checkpoints) if resume else None)
    student.to("cpu").eval()
    final = dev_ndcg(student, queries, index, config.data.positive_min)
    teacher_dev = dev_ndcg(teacher, queries, index, config.data.positive_min)
    console.print(f"dev nDCG@10 against the teacher's index: student {final['ndcg@10']:.4f}, "
                  f"teacher {teacher_dev['ndcg@10']:.4f}")
    with ArtifactWriter(output, QUERY_ENCODER_KIND, producer="distill", config=config,
                        inputs={"teacher": teacher_manifest, "index": index.manifest}) as staged:
        student.save(staged.path / QUERY_DIR)
        staged.metadata.update(
            embedding_space=teacher_manifest.metadata["embedding_space"],
            dim=student.dim,
            student=settings.student,
            student_parameters=count_parameters(student),
            teacher_parameters=count_parameters(teacher),
            backbone=f"{teacher_manifest.metadata.get('backbone')} ({settings.student})",
            steps=outcome.global_step,
            train_loss=outcome.training_loss,
            queries=queries.sources,
            projection_init=settings.projection_init if student.projection is not None else None,
            projection_fit_cosine=start_cosine,
            dev_ndcg_at_10={"student": final["ndcg@10"], "teacher": teacher_dev["ndcg@10"],
                            "per_epoch": dev.history},
        )
    assert staged.manifest is not None
    return staged.manifest


def _epoch_order(count: int, batch_size: int, epochs: float, max_steps: int | None, seed: int) -> list[int]:
    """A seeded shuffle per epoch, whole batches only; `max_steps` batches when set."""
    rng = random.Random(seed)
    per_epoch = count // batch_size
    steps = max_steps or max(1, int(per_epoch * epochs))
    order: list[int] = []
    while len(order) < steps * batch_size:
        epoch = list(range(count))
        rng.shuffle(epoch)
        order.extend(epoch[: max(per_epoch, 1) * batch_size] if count >= batch_size else epoch)
    return order[: steps * batch_size]

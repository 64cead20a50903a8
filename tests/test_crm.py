"""The CTR ranking model (DIN) and its baselines on a synthetic interactions artifact."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from pydantic import ValidationError
from rec_fixtures import ITEMS_SCHEMA, SAMPLES_SCHEMA, USERS_SCHEMA, write_interactions_artifact
from sklearn.metrics import log_loss, roc_auc_score

from personalization.ctr_baselines import ItemPopularity, LogisticRegressionCtr
from personalization.ctr_metrics import ctr_metrics
from personalization.din import DinModel, load_din, predict_din
from personalization.interactions import (
    FEEDBACK_DISLIKED,
    FEEDBACK_LIKED,
    CtrCollator,
    CtrData,
    CtrDataset,
    load_ctr_data,
    split_batch,
)
from personalization.train_crm import CrmResult, train_din
from towerline.config import CrmConfig
from towerline.errors import ArtifactError

# Tiny widths: the synthetic task has 4 topics; these keep the whole file to seconds of CPU per epoch.
SETTINGS = CrmConfig(embedding_dim=8, attention_hidden=(16,), mlp_hidden=(32, 16), learning_rate=1e-2,
                       batch_size=128, max_epochs=6, patience=2, history_length=20)


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    # The tensors here are tiny: intra-op threads cost more than they save, several times more
    # when the cores are busy with something else. Restored for the other test files.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def artifact(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_interactions_artifact(tmp_path_factory.mktemp("interactions"), users=300, items=120, seed=0)


@pytest.fixture(scope="module")
def data(artifact: Path) -> CtrData:
    return load_ctr_data(artifact, history_length=SETTINGS.history_length)


@pytest.fixture(scope="module")
def trained(data: CtrData, tmp_path_factory: pytest.TempPathFactory) -> CrmResult:
    return train_din(data, SETTINGS, tmp_path_factory.mktemp("crm"), seed=0)


def test_load_reads_the_layout_by_index(artifact: Path, data: CtrData) -> None:
    items = pd.read_parquet(artifact / "items.parquet").set_index("item_index")
    users = pd.read_parquet(artifact / "users.parquet").set_index("user_index")
    assert data.sizes.items == len(items) + 1 and data.sizes.users == len(users) + 1
    assert not data.item_genres[0].any() and not data.user_fields[0].any()
    for index in (1, 7, 120):  # rows are shuffled in the files: the tables must follow item_index
        expected = sorted(items.loc[index, "genres"])
        assert sorted(data.genres[code] for code in data.item_genres[index] if code) == expected
    for index in (1, 42, 300):
        gender = users.loc[index, "gender"]
        assert data.genders[data.user_fields[index, 0]] == (gender if gender is not None else "<unk>")

    samples = pd.read_parquet(artifact / "samples.parquet")
    sizes = {name: len(split) for name, split in data.splits.items()}
    assert sum(sizes.values()) == len(samples)
    assert sizes["train"] == pytest.approx(0.8 * len(samples), abs=2)
    assert data.train.timestamp.max() <= data.valid.timestamp.min() <= data.test.timestamp.min()
    # Histories: the most recent `history_length` items, oldest first, right-padded with 0.
    split = data.train
    by_key = samples.set_index(["user_index", "timestamp"])["long_history"]
    feedback_by_key = samples.set_index(["user_index", "timestamp"])["long_history_labels"]
    for row in (0, len(split) // 2, len(split) - 1):
        full = list(by_key.loc[(split.user_index[row], split.timestamp[row])])
        length = split.history_length[row]
        assert length == min(len(full), SETTINGS.history_length)
        assert list(split.history[row, :length]) == full[len(full) - length:]
        assert not split.history[row, length:].any()
        labels = list(feedback_by_key.loc[(split.user_index[row], split.timestamp[row])])
        assert list(split.history_feedback[row, :length]) == [
            FEEDBACK_LIKED if label else FEEDBACK_DISLIKED for label in labels[len(labels) - length:]]
        assert not split.history_feedback[row, length:].any()


def test_shorter_history_keeps_the_most_recent_items(data: CtrData) -> None:
    split = data.test
    short = split.with_history_length(5)
    row = int(np.argmax(split.history_length))
    length = split.history_length[row]
    assert short.history.shape == (len(split), 5)
    assert list(short.history[row, : short.history_length[row]]) == list(split.history[row, length - 5: length])
    assert list(short.history_feedback[row, :5]) == list(split.history_feedback[row, length - 5: length])


def test_nulls_truncation_and_spark_directories(tmp_path: Path) -> None:
    # What Spark may write besides the fixture's clean lists: null lists, null names, "" features.
    items = pa.table({"item_index": [2, 1, 3], "item_id": ["b", "a", "c"], "title": ["B", "A", "C"],
                      "genres": [None, ["Drama", None, "Comedy"], []]}, schema=ITEMS_SCHEMA)
    users = pa.table({"user_index": [1], "user_id": ["u"], "gender": [""], "age": [None], "occupation": ["7"]},
                     schema=USERS_SCHEMA)
    samples = pa.table({"user_index": [1, 1, 0], "item_index": [1, 2, 3], "label": [1, 0, 1], "rating": [5.0, 2.0, 4.0],
                        "timestamp": [5, 3, 9], "split": ["train", "train", "test"],
                        "long_history": [[3, 2, 1, 3], None, []], "long_history_labels": [[1, 0, 0, 1], None, []],
                        "short_history": [[3], None, []],
                        "short_history_titles": [["C"], None, []]}, schema=SAMPLES_SCHEMA)
    for name, table in (("items", items), ("users", users)):
        pq.write_table(table, tmp_path / f"{name}.parquet")
    # Spark's layout: a directory of part files, beside Hadoop's marker and checksum files.
    (tmp_path / "samples.parquet").mkdir()
    pq.write_table(samples.slice(0, 2), tmp_path / "samples.parquet" / "part-00000.snappy.parquet")
    pq.write_table(samples.slice(2), tmp_path / "samples.parquet" / "part-00001.snappy.parquet")
    (tmp_path / "samples.parquet" / "_SUCCESS").write_text("")
    (tmp_path / "samples.parquet" / ".part-00000.snappy.parquet.crc").write_bytes(b"\0")
    data = load_ctr_data(tmp_path, history_length=3)
    assert data.genres == ("<pad>", "Comedy", "Drama")
    assert data.item_genres.tolist() == [[0, 0, 0], [2, 0, 1], [0, 0, 0], [0, 0, 0]]
    assert data.genders == ("<unk>",) and data.user_fields.tolist() == [[0, 0, 0], [0, 0, 1]]
    train = data.train  # in time order: the null history first
    assert train.history.tolist() == [[0, 0, 0], [2, 1, 3]] and train.history_length.tolist() == [0, 3]
    liked, disliked = FEEDBACK_LIKED, FEEDBACK_DISLIKED
    assert train.history_feedback.tolist() == [[0, 0, 0], [disliked, disliked, liked]]
    assert len(data.valid) == 0 and data.test.user_index.tolist() == [0]


def test_missing_column_is_an_artifact_error(artifact: Path, tmp_path: Path) -> None:
    for name in ("items.parquet", "users.parquet"):
        (tmp_path / name).write_bytes((artifact / name).read_bytes())
    table = pq.read_table(artifact / "samples.parquet").drop_columns(["long_history"])
    pq.write_table(table, tmp_path / "samples.parquet")
    with pytest.raises(ArtifactError, match="long_history"):
        load_ctr_data(tmp_path)


def test_metrics_by_hand() -> None:
    # user 1: positive 0.9 beats negative 0.2, loses to 0.95 → AUC 1/2 over 3 samples;
    # user 2: positives 0.4, 0.8 against negatives 0.1, 0.4 → (1 + ½ + 1 + 1) / 4 = 7/8 over 4 samples;
    # user 3: positives only → left out of GAUC.
    labels = [1, 0, 0, 0, 1, 1, 0, 1, 1]
    scores = [0.9, 0.2, 0.95, 0.1, 0.4, 0.8, 0.4, 0.6, 0.7]
    users = [1, 1, 1, 2, 2, 2, 2, 3, 3]
    metrics = ctr_metrics(labels, scores, users)
    assert metrics["gauc"] == pytest.approx((3 * 0.5 + 4 * 0.875) / 7)
    assert metrics["auc"] == pytest.approx(roc_auc_score(labels, scores))
    assert metrics["logloss"] == pytest.approx(log_loss(labels, scores))


def test_gauc_equals_per_user_sklearn() -> None:
    rng = np.random.default_rng(3)
    users = rng.integers(0, 40, size=600)
    labels = rng.integers(0, 2, size=600)
    scores = np.round(rng.random(600), 1)  # rounded: plenty of ties
    expected_sum = expected_weight = 0.0
    for user in np.unique(users):
        mine = users == user
        if len(np.unique(labels[mine])) == 2:
            expected_sum += mine.sum() * roc_auc_score(labels[mine], scores[mine])
            expected_weight += mine.sum()
    assert ctr_metrics(labels, scores, users)["gauc"] == pytest.approx(expected_sum / expected_weight, abs=1e-12)


def test_settings_are_validated() -> None:
    for bad in ({"embedding_dim": 0}, {"mlp_hidden": ()}, {"learning_rate": 0}, {"patience": 0}, {"hidden": 3}):
        with pytest.raises(ValidationError):
            CrmConfig(**bad)


def test_attention_masks_padding(data: CtrData) -> None:
    torch.manual_seed(0)
    model = DinModel.from_data(data, SETTINGS).eval()
    split = data.test
    rows = np.flatnonzero((split.history_length > 0) & (split.history_length < SETTINGS.history_length))[:64]
    batch = split_batch(split, rows)
    assert not batch["history_mask"].all()
    scrambled = dict(batch, history=torch.where(batch["history_mask"], batch["history"],
                                                torch.randint(1, data.sizes.items, batch["history"].shape)),
                     history_feedback=torch.where(batch["history_mask"], batch["history_feedback"],
                                                  torch.randint(1, 3, batch["history"].shape)))
    assert not torch.equal(scrambled["history"], batch["history"])
    with torch.no_grad():
        assert torch.equal(model(**batch)["logits"], model(**scrambled)["logits"])
        assert torch.equal(model.user_representation(batch), model.user_representation(scrambled))
        # Not vacuous: a real history slot does move the score.
        changed = dict(batch, history=batch["history"].clone())
        changed["history"][:, 0] = (changed["history"][:, 0] % (data.sizes.items - 1)) + 1
        assert not torch.equal(model(**batch)["logits"], model(**changed)["logits"])
        # And so does the user's feedback on it (liked ↔ disliked).
        flipped = dict(batch, history_feedback=batch["history_feedback"].clone())
        flipped["history_feedback"][:, 0] = FEEDBACK_LIKED + FEEDBACK_DISLIKED - flipped["history_feedback"][:, 0]
        assert not torch.equal(model(**batch)["logits"], model(**flipped)["logits"])


def test_user_representation_has_a_fixed_size(data: CtrData) -> None:
    torch.manual_seed(0)
    model = DinModel.from_data(data, SETTINGS).eval()
    assert model.representation_dim == 5 * SETTINGS.embedding_dim  # gender, age, occupation; history mean (2E)
    with_ids = DinModel.from_data(data, SETTINGS.model_copy(update={"user_id_embedding": True}))
    assert with_ids.representation_dim == 6 * SETTINGS.embedding_dim
    rows = np.arange(32)
    with torch.no_grad():
        for length in (1, 5, 40):
            batch = split_batch(data.train.with_history_length(length), rows)
            representation = model.user_representation(batch)
            assert representation.shape == (32, model.representation_dim)
            assert torch.isfinite(representation).all()
    assert (data.train.history_length[rows] == 0).any()  # history-less users are covered


def test_collator_batches_a_dataloader(data: CtrData) -> None:
    loader = torch.utils.data.DataLoader(CtrDataset(data.valid), batch_size=16, collate_fn=CtrCollator())
    batch = next(iter(loader))
    expected = split_batch(data.valid, slice(0, 16))
    assert batch.keys() == expected.keys()
    for key, value in expected.items():
        assert torch.equal(batch[key], value), key


def test_din_beats_popularity(data: CtrData, trained: CrmResult) -> None:
    test = data.test
    popularity = ItemPopularity().fit(data.train).predict_proba(test)
    popularity_auc = ctr_metrics(test.label, popularity, test.user_index)["auc"]
    assert trained.test["auc"] > popularity_auc + 0.08, (trained.test, popularity_auc)
    assert trained.test["gauc"] > 0.6
    assert 1 <= trained.best_epoch <= trained.epochs_run <= SETTINGS.max_epochs
    best = max(trained.history, key=lambda epoch: epoch["auc"])
    assert trained.valid["auc"] == pytest.approx(best["auc"], abs=1e-6)


def test_logistic_regression_baseline(data: CtrData) -> None:
    model = LogisticRegressionCtr(data)
    features = model.features(data.train)
    # One user, one item, that item's genres, gender, age and occupation per row.
    genre_counts = (data.item_genres[data.train.item_index] != 0).sum(1)
    assert np.array_equal(np.asarray(features.sum(1)).ravel(), 5 + genre_counts)
    probabilities = model.fit(data.train).predict_proba(data.test)
    assert probabilities.shape == (len(data.test),) and ((probabilities > 0) & (probabilities < 1)).all()
    assert roc_auc_score(data.train.label, model.predict_proba(data.train)) > 0.6


def test_early_stopping_restores_the_best_epoch(data: CtrData, tmp_path: Path) -> None:
    # Validating on the training samples with flipped labels: the better the fit, the worse the
    # valid AUC, so epoch 1 is the best and patience 1 stops training after epoch 2.
    train = data.train
    rows = slice(0, 3000)
    subset = dataclasses.replace(train, **{field.name: getattr(train, field.name)[rows]
                                           for field in dataclasses.fields(train)})
    flipped = dataclasses.replace(subset, label=1 - subset.label)
    settings = SETTINGS.model_copy(update={"max_epochs": 5, "patience": 1})
    result = train_din(data.with_split("train", subset).with_split("valid", flipped), settings, tmp_path, seed=0)
    assert [epoch["epoch"] for epoch in result.history] == [1, 2]
    assert result.best_epoch == 1 and result.epochs_run == 2
    assert result.history[1]["auc"] < result.history[0]["auc"]
    assert result.valid["auc"] == pytest.approx(result.history[0]["auc"], abs=1e-6)
    assert json.loads((tmp_path / "metrics.json").read_text())["best_epoch"] == 1
    assert not (tmp_path / "checkpoints").exists()


def test_save_load_round_trip(data: CtrData, trained: CrmResult) -> None:
    model = trained.model.cpu()  # trained on the GPU where there is one; loaded on the CPU
    loaded = load_din(trained.model_dir)
    np.testing.assert_allclose(predict_din(loaded, data.test), predict_din(model, data.test), rtol=0, atol=1e-7)
    batch = split_batch(data.test, slice(0, 8))
    with torch.no_grad():
        assert torch.equal(loaded.user_representation(batch), model.user_representation(batch))
    spec = json.loads((trained.model_dir / "crm.json").read_text())
    assert spec["vocab_sizes"]["items"] == data.sizes.items
    assert spec["representation_dim"] == loaded.representation_dim
    assert spec["vocabularies"]["genres"][0] == "<pad>"
    assert str(trained.model_dir) not in (trained.model_dir / "crm.json").read_text()


def test_item_statistics_come_from_train_alone_and_travel_with_the_model(data: CtrData, tmp_path: Path) -> None:
    from personalization.din import item_statistics

    stats = item_statistics(data.train, data.sizes.items, prior_weight=10.0)
    train = data.train
    item = int(np.bincount(train.item_index).argmax())  # the most seen item
    seen = train.item_index == item
    prior = train.label.mean()
    rate = (train.label[seen].sum() + 10 * prior) / (seen.sum() + 10)
    assert stats[item, 0] == pytest.approx(np.log(rate / (1 - rate)), abs=1e-5)
    assert stats[item, 1] == pytest.approx(1.0)  # the largest count scales to 1
    assert stats[0, 1] == 0 and stats[0, 0] == pytest.approx(np.log(prior / (1 - prior)), abs=1e-5)
    # Labels of valid and test never enter: flipping them changes nothing.
    flipped = data.with_split("test", dataclasses.replace(data.test, label=1 - data.test.label))
    assert np.array_equal(item_statistics(flipped.train, data.sizes.items), item_statistics(train, data.sizes.items))

    settings = SETTINGS.model_copy(update={"item_statistics": True, "max_epochs": 1})
    result = train_din(data, settings, tmp_path, seed=0)
    loaded = load_din(tmp_path)
    assert loaded.item_stats is not None and torch.equal(loaded.item_stats, torch.from_numpy(item_statistics(
        train, data.sizes.items)))
    np.testing.assert_allclose(predict_din(loaded, data.test), predict_din(result.model.cpu(), data.test), atol=1e-7)
    assert load_din(tmp_path).mlp[0].in_features == DinModel.from_data(data, SETTINGS).mlp[0].in_features + 2


def test_mini_batch_aware_l2_penalises_the_batch_items_by_inverse_frequency(data: CtrData) -> None:
    torch.manual_seed(0)
    settings = SETTINGS.model_copy(update={"embedding_l2": 0.5})
    model = DinModel.from_data(data, settings).train()
    plain = DinModel(data.sizes, SETTINGS.model_copy(update={"embedding_l2": 0.0}), data.item_genres,
                     data.user_fields).train()
    plain.load_state_dict(model.state_dict())
    batch = split_batch(data.train, slice(0, 64))
    counts = np.bincount(data.train.item_index, minlength=data.sizes.items) + 1.0
    history = batch["history"][batch["history_mask"].bool()]
    used = np.unique(np.concatenate([batch["item_index"].numpy(), history.numpy()]))
    weights = model.item_embedding.weight.detach().numpy()
    expected = 0.5 * sum(float((weights[item] ** 2).sum()) / counts[item] for item in used)
    assert expected > 0
    with torch.no_grad():
        penalty = model(**batch)["loss"] - plain(**batch)["loss"]
        assert float(penalty) == pytest.approx(expected, rel=1e-4)
        # Training only: evaluation (early stopping's valid loss) is the plain log loss.
        assert torch.equal(model.eval()(**batch)["loss"], plain.eval()(**batch)["loss"])
    # A rarely seen item's embedding is pulled towards 0 harder than a frequent one's of the same norm.
    model.train()
    rare, frequent = int(np.argmin(counts[1:])) + 1, int(np.argmax(counts))
    with torch.no_grad():
        model.item_embedding.weight[rare] = model.item_embedding.weight[frequent]
    model.zero_grad()
    model._batch_embedding_l2(torch.tensor([rare, frequent])).backward()
    grad = model.item_embedding.weight.grad
    assert grad[rare].norm() > grad[frequent].norm() > 0

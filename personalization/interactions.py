"""The interactions artifact as numpy arrays for the CTR models, and its torch batches.

The artifact is a directory written by the Spark job (tests build the same layout with
`tests/rec_fixtures.py`). Each table is one Parquet file or a directory of part files (Spark's
output); manifest.json and any other file are not read here:

- items.parquet: item_index int64 (1..N, 0 = padding), item_id, title, genres list<string>
- users.parquet: user_index int64 (1..U, 0 = unknown user), user_id, gender, age, occupation (nullable strings)
- samples.parquet: user_index, item_index, label int8, timestamp, split ("train" | "valid" | "test"),
  long_history list<int64> (earlier interactions, oldest first, at most 60), short_history, short_history_titles

Entity features (an item's genres, a user's gender/age/occupation) are kept as lookup tables indexed
by item/user index rather than copied into every sample: the model holds them as buffers, so a batch
only carries indexes and a later stage can score a (user, history) without the artifact at hand.
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import torch
from torch.utils.data import Dataset

from towerline.errors import ArtifactError

SPLITS = ("train", "valid", "test")
PAD = 0  # item index 0 pads histories, genre 0 pads genre lists, feature value 0 means unknown/missing
PAD_TOKEN = "<pad>"
UNKNOWN_TOKEN = "<unk>"
USER_FIELDS = ("gender", "age", "occupation")

_ITEM_COLUMNS = ("item_index", "genres")
_USER_COLUMNS = ("user_index", *USER_FIELDS)
_SAMPLE_COLUMNS = ("user_index", "item_index", "label", "timestamp", "split", "long_history", "long_history_labels")
# history_feedback values: what the user thought of a history item, when it is known.
FEEDBACK_UNKNOWN, FEEDBACK_DISLIKED, FEEDBACK_LIKED = 0, 1, 2
FEEDBACK_VALUES = 3


@dataclass(frozen=True)
class VocabSizes:
    """Embedding table sizes, each including row 0 (padding or unknown), and the width of the
    item → genres table. Saved next to a trained model: it is all that is needed to rebuild it."""

    items: int
    users: int
    genres: int
    genders: int
    ages: int
    occupations: int
    max_genres: int

    def to_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> VocabSizes:
        return cls(**{field.name: int(values[field.name]) for field in dataclasses.fields(cls)})


@dataclass(frozen=True, eq=False)
class CtrSplit:
    """One split's samples in (timestamp, user, item) order. `history` is oldest first and padded
    on the right with 0; only its first `history_length[i]` slots of row i are real."""

    user_index: np.ndarray  # int64 [n]
    item_index: np.ndarray  # int64 [n]
    label: np.ndarray  # float32 [n], 0 or 1
    timestamp: np.ndarray  # int64 [n]
    history: np.ndarray  # int32 [n, L] (item indexes < 2^31; batches are int64)
    history_length: np.ndarray  # int64 [n], 0..L
    # int8 [n, L]: FEEDBACK_LIKED / FEEDBACK_DISLIKED per history item (the user's label, given
    # before the sample), FEEDBACK_UNKNOWN on padding.
    history_feedback: np.ndarray

    def __len__(self) -> int:
        return len(self.label)

    @property
    def history_mask(self) -> np.ndarray:
        return np.arange(self.history.shape[1]) < self.history_length[:, None]

    def with_history_length(self, length: int) -> CtrSplit:
        """The same samples with `length` history slots: the most recent items when shortening."""
        keep = np.minimum(self.history_length, length)
        # Row i's kept items start at history_length[i] - keep[i] (the oldest ones are dropped).
        columns = (self.history_length - keep)[:, None] + np.arange(length)
        valid = np.arange(length) < keep[:, None]
        source = np.minimum(columns, self.history.shape[1] - 1)
        history = np.where(valid, np.take_along_axis(self.history, source, axis=1), PAD).astype(self.history.dtype)
        feedback = np.where(valid, np.take_along_axis(self.history_feedback, source, axis=1), FEEDBACK_UNKNOWN)
        return dataclasses.replace(self, history=history, history_length=keep.astype(np.int64),
                                   history_feedback=feedback.astype(np.int8))


@dataclass(frozen=True, eq=False)
class CtrData:
    sizes: VocabSizes
    item_genres: np.ndarray  # int64 [sizes.items, sizes.max_genres], genre indexes padded with 0
    user_fields: np.ndarray  # int64 [sizes.users, 3]: gender, age, occupation indexes (0 = unknown)
    genres: tuple[str, ...]  # genre vocabulary; genres[0] is the padding token
    genders: tuple[str, ...]  # feature vocabularies; [0] is the unknown token
    ages: tuple[str, ...]
    occupations: tuple[str, ...]
    splits: Mapping[str, CtrSplit]
    history_length: int

    @property
    def train(self) -> CtrSplit:
        return self.splits["train"]

    @property
    def valid(self) -> CtrSplit:
        return self.splits["valid"]

    @property
    def test(self) -> CtrSplit:
        return self.splits["test"]

    def with_history_length(self, length: int) -> CtrData:
        if length == self.history_length:
            return self
        splits = {name: split.with_history_length(length) for name, split in self.splits.items()}
        return dataclasses.replace(self, splits=splits, history_length=length)

    def with_split(self, name: str, split: CtrSplit) -> CtrData:
        return dataclasses.replace(self, splits={**self.splits, name: split})

    def vocabularies(self) -> dict[str, list[str]]:
        return {"genres": list(self.genres), "gender": list(self.genders), "age": list(self.ages),
                "occupation": list(self.occupations)}


def liked_counts(item_index: np.ndarray, label: np.ndarray, items: int) -> np.ndarray:
    """Positive samples per item index ([items]; row 0, padding, stays 0): most-popular's ranking."""
    return np.bincount(np.asarray(item_index)[np.asarray(label) > 0], minlength=items).astype(np.float64)


def take_rows(split: CtrSplit, rows: np.ndarray) -> CtrSplit:
    """The samples at `rows` (indexes or a boolean mask), in that order."""
    return dataclasses.replace(split, **{field.name: getattr(split, field.name)[rows]
                                         for field in dataclasses.fields(split)})


def positive_samples(split: CtrSplit) -> CtrSplit:
    return take_rows(split, split.label > 0)


@dataclass(frozen=True)
class HistoryBeforeTest:
    """Each user's items before the test period (oldest first), and the positives during it."""

    before: dict[int, list[int]]
    relevant: dict[int, set[int]]

    @classmethod
    def of(cls, data: CtrData) -> HistoryBeforeTest:
        """The splits are cut by time, each in timestamp order: train then valid is all that came
        before the test period."""
        before: dict[int, list[int]] = defaultdict(list)
        for split in (data.train, data.valid):
            for user, item in zip(split.user_index.tolist(), split.item_index.tolist(), strict=True):
                before[user].append(item)
        seen = {user: set(items) for user, items in before.items()}
        relevant: dict[int, set[int]] = defaultdict(set)
        test = positive_samples(data.test)
        for user, item in zip(test.user_index.tolist(), test.item_index.tolist(), strict=True):
            if item not in seen.get(user, ()):
                relevant[user].add(item)
        return cls(dict(before), dict(relevant))


def load_ctr_data(artifact_dir: Path | str, history_length: int = 60) -> CtrData:
    """Read an interactions artifact; `history_length` most recent history items are kept per sample."""
    if history_length < 1:
        raise ValueError(f"history_length must be at least 1, got {history_length}")
    directory = Path(artifact_dir)
    items = _read_table(directory / "items.parquet", _ITEM_COLUMNS)
    users = _read_table(directory / "users.parquet", _USER_COLUMNS)
    samples = _read_table(directory / "samples.parquet", _SAMPLE_COLUMNS)

    item_rows = _contiguous_rows(items, "item_index", "items.parquet")
    user_rows = _contiguous_rows(users, "user_index", "users.parquet")
    num_items, num_users = len(item_rows) + 1, len(user_rows) + 1

    genres, item_genres = _item_genres(items.column("genres"), item_rows)
    vocabularies: dict[str, tuple[str, ...]] = {}
    user_fields = np.zeros((num_users, len(USER_FIELDS)), dtype=np.int64)
    for position, name in enumerate(USER_FIELDS):
        vocabularies[name], codes = _categorical(users.column(name))
        user_fields[1:, position] = codes[user_rows]

    sizes = VocabSizes(items=num_items, users=num_users, genres=len(genres),
                       genders=len(vocabularies["gender"]), ages=len(vocabularies["age"]),
                       occupations=len(vocabularies["occupation"]), max_genres=item_genres.shape[1])
    splits = _read_splits(samples, sizes, history_length)
    return CtrData(sizes=sizes, item_genres=item_genres, user_fields=user_fields, genres=genres,
                   genders=vocabularies["gender"], ages=vocabularies["age"],
                   occupations=vocabularies["occupation"], splits=splits, history_length=history_length)


def _read_table(path: Path, columns: Sequence[str]) -> pa.Table:
    """A single Parquet file, or a directory of part files as Spark's `write.parquet` leaves it."""
    if not path.exists():
        raise ArtifactError(f"interactions artifact: {path.name} is missing from {path.parent}")
    # pyarrow's dataset skips names starting with "." or "_" (Hadoop's .crc files and _SUCCESS).
    dataset = ds.dataset(path, format="parquet")
    missing = [name for name in columns if name not in dataset.schema.names]
    if missing:
        raise ArtifactError(f"interactions artifact: {path.name} lacks column(s) {', '.join(missing)}")
    return dataset.to_table(columns=list(columns))


def _contiguous_rows(table: pa.Table, column: str, file: str) -> np.ndarray:
    """Row order that sorts `column`, which must hold exactly 1..n (0 is reserved)."""
    indexes = _int_array(table.column(column))
    order = np.argsort(indexes, kind="stable")
    if not np.array_equal(indexes[order], np.arange(1, len(indexes) + 1)):
        raise ArtifactError(f"interactions artifact: {file}: {column} must be exactly 1..{len(indexes)}")
    return order


def _int_array(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    return np.asarray(pc.fill_null(column, 0).to_numpy(zero_copy_only=False), dtype=np.int64)


def _list_entries(column: pa.ChunkedArray, width: int | None = None
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, pa.Array]:
    """Where each row's last `width` entries (all when None) go in a left-aligned [rows, width]
    matrix: (row, column, position in the values) per entry, the row counts, and the values.
    Null lists count as empty.

    Vectorised and without a dense matrix of positions: MovieLens-1M has a million samples with
    up to 60 history items each, where a Python loop per row would dominate the load time.
    """
    array = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    offsets = np.asarray(array.offsets.to_numpy(), dtype=np.int64)
    starts = offsets[:-1]
    lengths = np.where(array.is_null().to_numpy(zero_copy_only=False), 0, offsets[1:] - starts)
    keep = lengths if width is None else np.minimum(lengths, width)
    rows = np.repeat(np.arange(len(lengths)), keep)
    cols = np.arange(int(keep.sum())) - np.repeat(np.cumsum(keep) - keep, keep)
    sources = np.repeat(starts + lengths - keep, keep) + cols
    return rows, cols, sources, keep.astype(np.int64), array.values


def _codes(names: list[str | None]) -> tuple[list[str], np.ndarray]:
    """Sorted vocabulary of the non-empty names, and each name's 1-based code (0 for None or "")."""
    values = np.asarray(names, dtype=object)
    present = np.array([name is not None and name != "" for name in names], dtype=bool)
    vocabulary = sorted(set(values[present].tolist()))
    codes = np.zeros(len(values), dtype=np.int64)
    if vocabulary:
        codes[present] = np.searchsorted(np.asarray(vocabulary, dtype=object), values[present]) + 1
    return vocabulary, codes


def _categorical(column: pa.ChunkedArray) -> tuple[tuple[str, ...], np.ndarray]:
    """A user feature's vocabulary (UNKNOWN_TOKEN at 0) and each row's code: null or "" is unknown."""
    vocabulary, codes = _codes(pc.cast(column, pa.string()).to_pylist())
    return (UNKNOWN_TOKEN, *vocabulary), codes


def _item_genres(column: pa.ChunkedArray, item_rows: np.ndarray) -> tuple[tuple[str, ...], np.ndarray]:
    """Genre vocabulary (PAD_TOKEN at 0) and the item → genre indexes table [N + 1, max genres].
    A null or empty genre name inside a list becomes 0 in place: the model only averages non-zero slots."""
    rows, cols, sources, counts, values = _list_entries(column)
    vocabulary, codes = _codes(values.take(pa.array(sources, type=pa.int64())).to_pylist())
    by_row = np.zeros((len(counts), max(1, int(counts.max(initial=0)))), dtype=np.int64)
    by_row[rows, cols] = codes
    table = np.zeros((len(item_rows) + 1, by_row.shape[1]), dtype=np.int64)
    table[1:] = by_row[item_rows]
    return (PAD_TOKEN, *vocabulary), table


def _read_splits(samples: pa.Table, sizes: VocabSizes, history_length: int) -> dict[str, CtrSplit]:
    user = _int_array(samples.column("user_index"))
    item = _int_array(samples.column("item_index"))
    label = _int_array(samples.column("label"))
    timestamp = _int_array(samples.column("timestamp"))
    split = np.asarray(samples.column("split").to_pylist(), dtype=object)
    rows, cols, sources, lengths, history_values = _list_entries(samples.column("long_history"), history_length)
    real = _int_array(history_values)[sources]

    def fail(problem: str) -> ArtifactError:
        return ArtifactError(f"interactions artifact: samples.parquet: {problem}")

    if len(user) and (user.min() < 0 or user.max() >= sizes.users):
        raise fail(f"user_index outside 0..{sizes.users - 1}")
    if len(item) and (item.min() < 1 or item.max() >= sizes.items):
        raise fail(f"item_index outside 1..{sizes.items - 1}")
    if not np.isin(label, (0, 1)).all():
        raise fail("label must be 0 or 1")
    unknown_splits = set(split.tolist()) - set(SPLITS)
    if unknown_splits:
        raise fail(f"unknown split value(s) {sorted(map(str, unknown_splits))}; expected {', '.join(SPLITS)}")
    if len(real) and (real.min() < 1 or real.max() >= sizes.items):
        raise fail(f"long_history holds item indexes outside 1..{sizes.items - 1}")
    feedback_rows, feedback_cols, feedback_sources, feedback_lengths, feedback_values = _list_entries(
        samples.column("long_history_labels"), history_length)
    feedback_labels = _int_array(feedback_values)[feedback_sources]
    if not np.array_equal(feedback_lengths, lengths):
        raise fail("long_history_labels must hold one label per long_history item")
    if not np.isin(feedback_labels, (0, 1)).all():
        raise fail("long_history_labels must be 0 or 1")
    # int32 halves the largest array (MovieLens-1M: 10^6 samples × 60); batches convert to int64.
    history = np.zeros((len(user), history_length), dtype=np.int32)
    history[rows, cols] = real
    feedback = np.full((len(user), history_length), FEEDBACK_UNKNOWN, dtype=np.int8)
    feedback[feedback_rows, feedback_cols] = np.where(feedback_labels == 1, FEEDBACK_LIKED, FEEDBACK_DISLIKED)
    # Spark writes rows in no particular order: sort so that a run is reproducible.
    order = np.lexsort((item, user, timestamp))
    splits: dict[str, CtrSplit] = {}
    for name in SPLITS:
        rows = order[split[order] == name]
        splits[name] = CtrSplit(user_index=user[rows], item_index=item[rows], label=label[rows].astype(np.float32),
                                timestamp=timestamp[rows], history=history[rows], history_length=lengths[rows],
                                history_feedback=feedback[rows])
    return splits


class CtrDataset(Dataset):
    """A split as a map-style dataset of per-sample dicts, for a DataLoader or transformers' Trainer."""

    def __init__(self, split: CtrSplit) -> None:
        self.split = split

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, index: int) -> dict[str, Any]:
        split = self.split
        return {"user_index": split.user_index[index], "item_index": split.item_index[index],
                "history": split.history[index], "history_length": split.history_length[index],
                "history_feedback": split.history_feedback[index], "labels": split.label[index]}


class CtrCollator:
    """Stacks per-sample dicts into the model's batch: user_index, item_index, history [B, L],
    history_mask [B, L] (True on real items), history_feedback [B, L] and, when every sample has
    one, labels (float)."""

    def __call__(self, rows: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        lengths = np.array([row["history_length"] for row in rows], dtype=np.int64)
        history = np.stack([row["history"] for row in rows]).astype(np.int64)
        feedback = np.stack([row["history_feedback"] for row in rows])
        labels = None
        if all(row.get("labels") is not None for row in rows):
            labels = np.array([row["labels"] for row in rows], dtype=np.float32)
        return _batch(np.array([row["user_index"] for row in rows], dtype=np.int64),
                      np.array([row["item_index"] for row in rows], dtype=np.int64), history, lengths, feedback,
                      labels)


def split_batch(split: CtrSplit, rows: slice | np.ndarray | None = None, labels: bool = True
                ) -> dict[str, torch.Tensor]:
    """A batch straight from a split's arrays (no per-sample dicts): for prediction loops."""
    rows = slice(None) if rows is None else rows
    return _batch(split.user_index[rows], split.item_index[rows], split.history[rows], split.history_length[rows],
                  split.history_feedback[rows], split.label[rows] if labels else None)


def _batch(user: np.ndarray, item: np.ndarray, history: np.ndarray, lengths: np.ndarray, feedback: np.ndarray,
           labels: np.ndarray | None) -> dict[str, torch.Tensor]:
    mask = np.arange(history.shape[1]) < lengths[:, None]
    batch = {"user_index": torch.as_tensor(user, dtype=torch.long),
             "item_index": torch.as_tensor(item, dtype=torch.long),
             "history": torch.as_tensor(history, dtype=torch.long),
             "history_mask": torch.as_tensor(mask),
             "history_feedback": torch.as_tensor(feedback, dtype=torch.long)}
    if labels is not None:
        batch["labels"] = torch.as_tensor(labels, dtype=torch.float32)
    return batch

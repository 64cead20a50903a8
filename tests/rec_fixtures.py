"""A synthetic interactions artifact in the Spark job's layout (see personalization/interactions.py).

Every item has a latent topic (shown as its first genre) and a small quality bias. Every user
has two topics and switches from the first to the second at a random moment; each interaction
is, with probability `focus`, an item of the user's current topic, otherwise any item. A click
depends on whether the item matches the user's *current* topic (plus the item's bias), so:
- item popularity only sees the bias and how often a topic is in favour;
- the user id alone is ambiguous (two topics over time), while the recent history reveals which
  one is current: a model that attends over the history (DIN) can do clearly better.
Samples are split by global time: the oldest 80% train, the next 10% valid, the newest 10% test.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

LONG_HISTORY = 60
SHORT_HISTORY = 10

ITEMS_SCHEMA = pa.schema([("item_index", pa.int64()), ("item_id", pa.string()), ("title", pa.string()),
                          ("genres", pa.list_(pa.string()))])
USERS_SCHEMA = pa.schema([("user_index", pa.int64()), ("user_id", pa.string()), ("gender", pa.string()),
                          ("age", pa.string()), ("occupation", pa.string())])
SAMPLES_SCHEMA = pa.schema([("user_index", pa.int64()), ("item_index", pa.int64()), ("label", pa.int8()),
                            ("rating", pa.float64()), ("timestamp", pa.int64()), ("split", pa.string()),
                            ("long_history", pa.list_(pa.int64())), ("long_history_labels", pa.list_(pa.int8())),
                            ("short_history", pa.list_(pa.int64())),
                            ("short_history_titles", pa.list_(pa.string()))])


def write_interactions_artifact(directory: Path, users: int = 300, items: int = 120, seed: int = 0, topics: int = 4,
                                interactions: tuple[int, int] = (20, 60), focus: float = 0.6,
                                match_logit: float = 4.0) -> Path:
    rng = np.random.default_rng(seed)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)

    item_topic = rng.integers(topics, size=items)
    item_bias = rng.normal(0.0, 0.5, size=items)
    popularity = 1.0 / (np.arange(items) + 5.0)  # Zipf-like, in a random order
    popularity = rng.permutation(popularity)
    extra = [f"Style{k}" for k in range(3)]
    genres = []
    for index in range(items):
        roll = rng.random()
        if roll < 0.1:
            genres.append([])  # items without genres exist in the real data
        elif roll < 0.4:
            genres.append([f"Topic{item_topic[index]}", str(rng.choice(extra))])
        else:
            genres.append([f"Topic{item_topic[index]}"])
    titles = [f"Item {index + 1} of topic {item_topic[index]}" for index in range(items)]
    item_frame = pd.DataFrame({"item_index": np.arange(1, items + 1, dtype=np.int64),
                               "item_id": [f"i{index + 1}" for index in range(items)], "title": titles,
                               "genres": genres})

    def nullable(values: list[str]) -> list[str | None]:
        return [None if rng.random() < 0.1 else str(rng.choice(values)) for _ in range(users)]

    user_frame = pd.DataFrame({"user_index": np.arange(1, users + 1, dtype=np.int64),
                               "user_id": [f"u{index + 1}" for index in range(users)],
                               "gender": nullable(["F", "M"]), "age": nullable(["18", "25", "35", "50"]),
                               "occupation": nullable([str(k) for k in range(5)])})

    horizon = 10_000_000
    rows: list[dict] = []
    for user in range(1, users + 1):
        first, second = rng.choice(topics, size=2, replace=False)
        switch = rng.uniform(0.2, 0.9) * horizon
        count = int(rng.integers(interactions[0], interactions[1] + 1))
        times = np.sort(rng.choice(horizon, size=count, replace=False)) + 1_000_000_000
        history: list[int] = []
        liked: list[int] = []
        for time in times:
            current = first if time - 1_000_000_000 < switch else second
            pool = np.flatnonzero(item_topic == current) if rng.random() < focus else np.arange(items)
            if not len(pool):
                pool = np.arange(items)
            weights = popularity[pool] / popularity[pool].sum()
            item = int(rng.choice(pool, p=weights))
            logit = match_logit * (item_topic[item] == current) - match_logit / 2 + item_bias[item]
            label = int(rng.random() < 1 / (1 + np.exp(-logit)))
            long_history = [index + 1 for index in history[-LONG_HISTORY:]]
            short_history = long_history[-SHORT_HISTORY:]
            rating = float(rng.integers(4, 6) if label else rng.integers(1, 4))
            rows.append({"user_index": user, "item_index": item + 1, "label": label, "rating": rating,
                         "timestamp": int(time),
                         "long_history": long_history, "long_history_labels": liked[-LONG_HISTORY:],
                         "short_history": short_history,
                         "short_history_titles": [titles[index - 1] for index in short_history]})
            history.append(item)
            liked.append(label)

    samples = pd.DataFrame(rows)
    order = np.argsort(samples["timestamp"].to_numpy(), kind="stable")
    position = np.empty(len(order), dtype=np.int64)
    position[order] = np.arange(len(order))
    fraction = position / len(order)
    samples["split"] = np.where(fraction < 0.8, "train", np.where(fraction < 0.9, "valid", "test"))
    samples = samples[[field.name for field in SAMPLES_SCHEMA]]

    # Rows in no particular order, as Spark writes them: readers must go by the index columns.
    _write(item_frame.sample(frac=1, random_state=seed), ITEMS_SCHEMA, directory / "items.parquet")
    _write(user_frame.sample(frac=1, random_state=seed), USERS_SCHEMA, directory / "users.parquet")
    _write(samples.sample(frac=1, random_state=seed), SAMPLES_SCHEMA, directory / "samples.parquet")
    manifest = {"kind": "interactions", "synthetic": True, "users": users, "items": items, "samples": len(samples),
                "seed": seed}
    (directory / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return directory


def _write(frame: pd.DataFrame, schema: pa.Schema, path: Path) -> None:
    table = pa.Table.from_pandas(frame.reset_index(drop=True), schema=schema, preserve_index=False)
    pq.write_table(table, path)

"""Synthetic user–item interactions in the generic schema: the embedded default of the
recommendation side (MovieLens may not be redistributed, so the project ships this instead).

The generating process gives every model something to learn:
- latent topics: each item belongs to one topic (its genre) and has a title drawn from that topic's
  words; each user has a preference mixture over topics;
- popularity skew: within a topic items are picked with Zipf-like weights;
- time and drift: users arrive at different times and rate a few items per session; a user's
  taste drifts toward the topics of items they liked recently, so recent history predicts the next
  rating beyond the static preference (what attention over history can exploit);
- ratings 1–5 from the user's affinity for the item's topic plus the item's quality and noise.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from towerline.synthetic import vocabulary

START_TIMESTAMP = 1_600_000_000
# Chosen so that about half the ratings are above 3 (ML-100K: 55 %).
RATING_CENTRE = 2.2
GENDERS = ("F", "M")
AGES = ("18", "25", "35", "45", "56")
OCCUPATIONS = ("artist", "engineer", "student", "writer", "other")


@dataclass(frozen=True)
class SyntheticRecSpec:
    users: int = 600
    items: int = 400
    topics: int = 8
    interactions_per_user: int = 40
    seed: int = 7


def write_synthetic_interactions(root: Path, spec: SyntheticRecSpec = SyntheticRecSpec()) -> Path:
    """interactions.csv, items.csv and users.csv under `root`; returns `root`."""
    rng = np.random.default_rng(spec.seed)
    words = vocabulary(spec.seed, topics=spec.topics, words_per_topic=12)
    genre_names = [f"{topic_words[0].capitalize()}-core" for topic_words in words]
    item_topic = rng.integers(0, spec.topics, size=spec.items)
    item_quality = rng.normal(0.0, 0.6, size=spec.items)
    popularity = 1.0 / np.arange(1, spec.items + 1) ** 0.8
    rng.shuffle(popularity)
    user_topics = rng.dirichlet(np.full(spec.topics, 0.3), size=spec.users)
    # Gender and age shift the taste a little: user features carry some signal of their own.
    user_gender = rng.integers(0, len(GENDERS), size=spec.users)
    user_age = rng.integers(0, len(AGES), size=spec.users)
    user_topics = _normalise(user_topics + 0.15 * np.eye(spec.topics)[(user_gender + 2 * user_age) % spec.topics])
    arrivals = np.sort(rng.uniform(0, 300 * 86_400, size=spec.users))

    root.mkdir(parents=True, exist_ok=True)
    rows = []
    for user in range(spec.users):
        taste = user_topics[user].copy()
        clock = arrivals[user]
        count = max(3, int(rng.poisson(spec.interactions_per_user)))
        unseen = np.ones(spec.items, dtype=bool)
        for _ in range(count):
            clock += rng.exponential(2 * 86_400)
            topic = rng.choice(spec.topics, p=taste)
            candidates = np.flatnonzero((item_topic == topic) & unseen)
            if candidates.size == 0:
                continue
            weights = popularity[candidates] / popularity[candidates].sum()
            item = int(rng.choice(candidates, p=weights))
            unseen[item] = False
            affinity = np.log(taste[item_topic[item]] * spec.topics + 1e-3)
            score = RATING_CENTRE + 0.9 * affinity + item_quality[item] + rng.normal(0, 0.8)
            rating = int(np.clip(np.rint(score), 1, 5))
            # Drift: a liked item pulls the taste toward its topic, a disliked one pushes away.
            shift = np.eye(spec.topics)[item_topic[item]] * (0.25 if rating > 3 else -0.1)
            taste = _normalise(np.clip(taste + shift, 1e-3, None))
            rows.append((f"u{user}", f"i{item}", rating, START_TIMESTAMP + int(clock)))
    rows.sort(key=lambda row: row[3])
    _write_csv(root / "interactions.csv", ["user_id", "item_id", "rating", "timestamp"], rows)
    items = [(f"i{item}", _title(rng, words[item_topic[item]]), genre_names[item_topic[item]])
             for item in range(spec.items)]
    _write_csv(root / "items.csv", ["item_id", "title", "genres"], items)
    users = [(f"u{user}", GENDERS[user_gender[user]], AGES[user_age[user]], OCCUPATIONS[user % len(OCCUPATIONS)])
             for user in range(spec.users)]
    _write_csv(root / "users.csv", ["user_id", "gender", "age", "occupation"], users)
    return root


def _normalise(weights: np.ndarray) -> np.ndarray:
    return weights / weights.sum(axis=-1, keepdims=True)


def _title(rng: np.random.Generator, topic_words: list[str]) -> str:
    return " ".join(word.capitalize() for word in rng.choice(topic_words, size=int(rng.integers(2, 4)), replace=False))


def _write_csv(path: Path, header: list[str], rows: list[tuple]) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)

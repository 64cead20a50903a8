"""Interaction datasets on disk: the MovieLens releases and Towerline's generic schema.

Each format names three files (interactions, items, optional users) and a per-line parser that
turns a line into a plain tuple or raises `RowRejected` with a reason. The Spark job runs these
parsers in its workers, so a line is judged the same way everywhere.

Generic schema (CSV with a header line; the synthetic generator writes it):
    interactions.csv  user_id,item_id,rating,timestamp   (rating: a number; or a `click` column, 0/1)
    items.csv         item_id,title,genres               (genres separated by "|", may be empty)
    users.csv         user_id,gender,age,occupation      (optional; any of the three may be empty)
"""

from __future__ import annotations

import csv
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from towerline.beir import RowRejected
from towerline.errors import DataError

# (user_id, item_id, rating, timestamp); a click is read as rating 0.0 / 1.0 by the generic parser.
Interaction = tuple[str, str, float, int]
Item = tuple[str, str, list[str]]  # (item_id, title, genres)
User = tuple[str, str | None, str | None, str | None]  # (user_id, gender, age, occupation)

BAD_FIELDS = "wrong number of fields"
BAD_CSV = "malformed CSV"
BAD_RATING = "rating is not a number"
BAD_TIMESTAMP = "timestamp is not an integer"
MISSING_ID = "missing id"
HEADER = "header"

# ML-100K's u.item ends with 19 genre flags in this order (u.genre).
ML100K_GENRES = (
    "unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary", "Drama",
    "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller", "War", "Western",
)


def _fields(line: str, separator: str, count: int, at_least: bool = False) -> list[str]:
    text = line.rstrip("\r\n")
    try:
        fields = text.split(separator) if separator != "," else next(csv.reader([text]))
    except csv.Error:
        # e.g. a carriage return inside the line (found by bench reliability's reader fuzzing): the
        # line is quarantined, where the exception would have failed the whole Spark job.
        raise RowRejected(BAD_CSV) from None
    if len(fields) < count if at_least else len(fields) != count:
        raise RowRejected(BAD_FIELDS)
    return [field.strip() for field in fields]


def _ids(*values: str) -> None:
    if any(not value for value in values):
        raise RowRejected(MISSING_ID)


def _rating(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise RowRejected(BAD_RATING) from None


def _timestamp(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        try:
            value = float(text)
        except ValueError:
            raise RowRejected(BAD_TIMESTAMP) from None
        if not value.is_integer():
            raise RowRejected(BAD_TIMESTAMP) from None
        return int(value)


def _interaction(fields: list[str]) -> Interaction:
    user_id, item_id, rating, timestamp = fields[:4]
    _ids(user_id, item_id)
    return user_id, item_id, _rating(rating), _timestamp(timestamp)


def _optional(value: str) -> str | None:
    return value or None


# --- ML-100K: tab-separated u.data, "|"-separated u.item (latin-1) and u.user ------------------------------


def parse_ml100k_interaction(line: str) -> Interaction:
    return _interaction(_fields(line, "\t", 4))


def parse_ml100k_item(line: str) -> Item:
    fields = _fields(line, "|", 5 + len(ML100K_GENRES))
    _ids(fields[0])
    genres = [name for name, flag in zip(ML100K_GENRES, fields[5:], strict=True) if flag == "1"]
    return fields[0], fields[1], genres


def parse_ml100k_user(line: str) -> User:
    user_id, age, gender, occupation, _zip = _fields(line, "|", 5)
    _ids(user_id)
    return user_id, _optional(gender), _optional(age), _optional(occupation)


# --- ML-1M / ML-10M: "::"-separated .dat files ---------------------------------------------------------------


def parse_dat_interaction(line: str) -> Interaction:
    return _interaction(_fields(line, "::", 4))


def parse_dat_item(line: str) -> Item:
    item_id, title, genres = _fields(line, "::", 3)
    _ids(item_id)
    return item_id, title, _genre_list(genres)


def parse_dat_user(line: str) -> User:
    user_id, gender, age, occupation, _zip = _fields(line, "::", 5)
    _ids(user_id)
    return user_id, _optional(gender), _optional(age), _optional(occupation)


# --- ML-20M / ML-25M / ml-latest: CSV with headers ----------------------------------------------------------


def _csv_fields(line: str, count: int, header_id: str) -> list[str]:
    """A CSV line's fields; the header line (its first field is `header_id`) is rejected as HEADER."""
    fields = _fields(line, ",", count)
    if fields[0] == header_id:
        raise RowRejected(HEADER)
    return fields


def _csv_item(line: str, header_id: str) -> Item:
    item_id, title, genres = _csv_fields(line, 3, header_id)
    _ids(item_id)
    return item_id, title, _genre_list(genres)


def parse_csv_interaction(line: str) -> Interaction:
    return _interaction(_csv_fields(line, 4, "userId"))


def parse_csv_item(line: str) -> Item:
    return _csv_item(line, "movieId")


# --- generic schema --------------------------------------------------------------------------------------------


def parse_generic_interaction(line: str) -> Interaction:
    return _interaction(_csv_fields(line, 4, "user_id"))


def parse_generic_item(line: str) -> Item:
    return _csv_item(line, "item_id")


def parse_generic_user(line: str) -> User:
    user_id, gender, age, occupation = _csv_fields(line, 4, "user_id")
    _ids(user_id)
    return user_id, _optional(gender), _optional(age), _optional(occupation)


def _genre_list(text: str) -> list[str]:
    # MovieLens writes "(no genres listed)" for an item without genres.
    return [genre for genre in text.split("|") if genre and genre != "(no genres listed)"]


@dataclass(frozen=True)
class InteractionFormat:
    """Where a release keeps its three tables, and how to read one line of each."""

    name: str
    interactions: str
    items: str
    users: str | None
    parse_interaction: Callable[[str], Interaction]
    parse_item: Callable[[str], Item]
    parse_user: Callable[[str], User] | None
    encoding: str = "utf-8"
    # True when the interaction file's value column holds clicks (0/1) rather than ratings.
    clicks: bool = False


FORMATS = {
    "ml-100k": InteractionFormat("ml-100k", "u.data", "u.item", "u.user", parse_ml100k_interaction,
                                 parse_ml100k_item, parse_ml100k_user, encoding="latin-1"),
    "ml-dat": InteractionFormat("ml-dat", "ratings.dat", "movies.dat", "users.dat", parse_dat_interaction,
                                parse_dat_item, parse_dat_user, encoding="latin-1"),
    "ml-csv": InteractionFormat("ml-csv", "ratings.csv", "movies.csv", None, parse_csv_interaction,
                                parse_csv_item, None),
    "generic": InteractionFormat("generic", "interactions.csv", "items.csv", "users.csv",
                                 parse_generic_interaction, parse_generic_item, parse_generic_user),
}


def detect_format(root: Path, name: str = "auto") -> InteractionFormat:
    """The named format, or the first whose interactions and items files are both in `root`."""
    if name != "auto":
        chosen = FORMATS[name]
        missing = [f for f in (chosen.interactions, chosen.items) if not (root / f).is_file()]
        if missing:
            raise DataError(f"{root}: rec.format={name} needs {', '.join(missing)}")
        return chosen
    for candidate in FORMATS.values():
        if (root / candidate.interactions).is_file() and (root / candidate.items).is_file():
            return candidate
    expected = "; ".join(f"{f.name}: {f.interactions} + {f.items}" for f in FORMATS.values())
    raise DataError(f"{root}: no interaction dataset found (expected one of — {expected})")


def generic_header(clicks: bool) -> str:
    return f"user_id,item_id,{'click' if clicks else 'rating'},timestamp"

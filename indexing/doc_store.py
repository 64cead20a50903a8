"""The documents of an index version, so that `Search` can return titles and snippets, not only ids.

One SQLite file in the index artifact (`docs.sqlite`, table `docs(doc_id, title, text)`), written
once at build time and opened read-only and immutable by the service: no locks, no journal, and the
artifact's checksums still cover it. Lookups are by primary key, one query per result list.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Sequence
from pathlib import Path

from towerline.errors import ArtifactError

DOC_STORE_FILE = "docs.sqlite"
# SQLite's default limit on host parameters in one statement is 32,766; lists are far shorter.
_LOOKUP_CHUNK = 900


def write_doc_store(directory: Path, doc_ids: Sequence[str], titles: Sequence[str], texts: Sequence[str]) -> None:
    path = directory / DOC_STORE_FILE
    with sqlite3.connect(path) as connection:
        connection.execute("CREATE TABLE docs (doc_id TEXT PRIMARY KEY, title TEXT NOT NULL, text TEXT NOT NULL) "
                           "WITHOUT ROWID")
        connection.executemany("INSERT INTO docs VALUES (?, ?, ?)", zip(doc_ids, titles, texts, strict=True))
    connection.close()


class DocStore:
    """Read-only lookups; safe to share between the service's threads (one connection, one lock)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            self._connection = sqlite3.connect(f"file:{path}?mode=ro&immutable=1", uri=True, check_same_thread=False)
            self.count = int(self._connection.execute("SELECT COUNT(*) FROM docs").fetchone()[0])
        except sqlite3.DatabaseError as exc:
            raise ArtifactError(f"{path}: unreadable document store ({exc})") from None
        self._lock = threading.Lock()

    def lookup(self, doc_ids: Sequence[str]) -> dict[str, tuple[str, str]]:
        """doc id → (title, text) for the ids the store holds."""
        found: dict[str, tuple[str, str]] = {}
        unique = list(dict.fromkeys(doc_ids))
        with self._lock:
            for start in range(0, len(unique), _LOOKUP_CHUNK):
                chunk = unique[start:start + _LOOKUP_CHUNK]
                marks = ",".join("?" * len(chunk))
                rows = self._connection.execute(f"SELECT doc_id, title, text FROM docs WHERE doc_id IN ({marks})",
                                                chunk)
                found.update((doc_id, (title, text)) for doc_id, title, text in rows)
        return found

    def close(self) -> None:
        self._connection.close()


def load_doc_store(directory: Path, expected_count: int) -> DocStore | None:
    path = directory / DOC_STORE_FILE
    if not path.is_file():
        return None
    store = DocStore(path)
    if store.count != expected_count:
        store.close()
        raise ArtifactError(f"{path}: holds {store.count} documents but the index holds {expected_count} rows")
    return store

"""Printing search hits for people: rank, score, doc id and, when the corpus is at hand, its title."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from rich.markup import escape

from towerline.beir import Document
from towerline.progress import console


def print_hits(
    query: str,
    hits: Sequence[tuple[Any, ...]],
    corpus: dict[str, Document] | None = None,
    relevant: set[str] | None = None,
    show_sides: bool = False,
) -> None:
    """One line per hit (doc id and score first in each hit); with `relevant` (judged doc ids), judged
    hits are marked with ✓; with `show_sides`, which side found each hybrid hit (D: dense, S: BM25)."""
    console.print(f"[bold]query:[/] {escape(query)}")
    id_width = max((len(hit[0]) for hit in hits), default=6)
    for rank, hit in enumerate(hits, start=1):
        doc_id, score = hit[0], hit[1]
        mark = "" if relevant is None else ("[green]✓[/] " if doc_id in relevant else "  ")
        sides = _sides(hit) if show_sides else ""
        line = f"{rank:>3}  {mark}{score:7.4f}{sides}  {escape(doc_id):<{id_width}}"
        served = _served_document(hit)
        if served is not None:
            line += "  " + escape(served)
        elif corpus is not None:
            document = corpus.get(doc_id)
            line += "  " + (escape(document.title or document.text) if document else "(not in this corpus)")
        # One hit per line, cut to the terminal width.
        console.print(line, no_wrap=True, overflow="ellipsis")


def _served_document(hit: tuple[Any, ...]) -> str | None:
    # serving.results.Hit with include_documents: (…, title, snippet) from the service's document store.
    if len(hit) >= 6 and (hit[4] is not None or hit[5] is not None):
        return str(hit[4] or hit[5])
    return None


def _sides(hit: tuple[Any, ...]) -> str:
    # serving.results.Hit: (doc_id, score, dense_score, sparse_score), a side's score None when it missed.
    dense, sparse = (hit[2], hit[3]) if len(hit) >= 4 else (None, None)
    return f" {'D' if dense is not None else '-'}{'S' if sparse is not None else '-'}"

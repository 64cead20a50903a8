"""Printing search hits for people: rank, score, doc id and, when the corpus is at hand, its title."""

from __future__ import annotations

from collections.abc import Sequence

from rich.markup import escape

from towerline.beir import Document
from towerline.progress import console


def print_hits(
    query: str,
    hits: Sequence[tuple[str, float]],
    corpus: dict[str, Document] | None = None,
    relevant: set[str] | None = None,
) -> None:
    """One line per hit; with `relevant` (judged doc ids), judged hits are marked with ✓."""
    console.print(f"[bold]query:[/] {escape(query)}")
    id_width = max((len(doc_id) for doc_id, _ in hits), default=6)
    for rank, (doc_id, score) in enumerate(hits, start=1):
        mark = "" if relevant is None else ("[green]✓[/] " if doc_id in relevant else "  ")
        line = f"{rank:>3}  {mark}{score:7.4f}  {escape(doc_id):<{id_width}}"
        if corpus is not None:
            document = corpus.get(doc_id)
            line += "  " + (escape(document.title or document.text) if document else "(not in this corpus)")
        # One hit per line, cut to the terminal width.
        console.print(line, no_wrap=True, overflow="ellipsis")

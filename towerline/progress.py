"""Rich progress bars shared by every long-running stage."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

console = Console(stderr=True)


@contextmanager
def progress_bar(description: str, total: int | None) -> Iterator[Progress]:
    """Yields a Progress with one task (id 0); call `bar.advance(0, n)` as work completes."""
    columns = [
        SpinnerColumn(),
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    ]
    with Progress(*columns, console=console, transient=False) as bar:
        bar.add_task(description, total=total)
        yield bar


@contextmanager
def status(message: str) -> Iterator[None]:
    """A spinner for work that has no measurable total (Spark job, server start)."""
    with console.status(f"[bold]{message}"):
        yield

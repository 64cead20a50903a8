"""Rich progress bars shared by every long-running stage."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

console = Console(stderr=True)

# Without a terminal (nohup, CI, a log collector) a rich bar only draws its final state, so long
# work would look hung: report every this-many percent as a plain line instead.
LOG_EVERY_PERCENT = 10


class LoggedProgress(Progress):
    """A rich Progress that also prints a plain line at every LOG_EVERY_PERCENT when not on a terminal."""

    def __init__(self, *columns: Any, **kwargs: Any) -> None:
        super().__init__(*columns, **kwargs)
        self._logged_step: dict[TaskID, int] = {}

    def update(self, task_id: TaskID, **kwargs: Any) -> None:
        super().update(task_id, **kwargs)
        self._log_milestone(task_id)

    def advance(self, task_id: TaskID, advance: float = 1) -> None:
        super().advance(task_id, advance)
        self._log_milestone(task_id)

    def _log_milestone(self, task_id: TaskID) -> None:
        if self.console.is_terminal:
            return
        task = self._tasks[task_id]
        if not task.total:
            return
        step = int(100 * task.completed / task.total) // LOG_EVERY_PERCENT
        if step <= self._logged_step.get(task_id, 0):
            return
        self._logged_step[task_id] = step
        elapsed = task.elapsed or 0.0
        remaining = task.total - task.completed
        left = f", ~{elapsed * remaining / task.completed:.0f} s left" if remaining > 0 else ""
        self.console.print(f"{time.strftime('%H:%M:%S')} {task.description}: {task.completed:g}/{task.total:g} "
                           f"({100 * task.completed / task.total:.0f} %) in {elapsed:.0f} s{left}", highlight=False)


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
    with LoggedProgress(*columns, console=console, transient=False) as bar:
        bar.add_task(description, total=total)
        yield bar


@contextmanager
def status(message: str) -> Iterator[None]:
    """A spinner for work that has no measurable total (Spark job, server start)."""
    with console.status(f"[bold]{message}"):
        yield

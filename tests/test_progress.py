"""Progress reporting without a terminal: plain milestone lines instead of a silent bar."""

from __future__ import annotations

import io

from rich.console import Console

from towerline.progress import LoggedProgress


def _run(console: Console, total: int, steps: list[int]) -> str:
    with LoggedProgress(console=console, transient=False) as bar:
        task = bar.add_task("embedding", total=total)
        for step in steps:
            bar.advance(task, step)
    return console.file.getvalue()  # type: ignore[attr-defined]


def test_without_a_terminal_every_tenth_is_reported_once() -> None:
    out = _run(Console(file=io.StringIO(), force_terminal=False, width=200), 100, [3] * 33 + [1])
    milestones = [line for line in out.splitlines() if "embedding:" in line]
    assert len(milestones) == 10
    assert "12/100 (12 %)" in milestones[0] and "s left" in milestones[0]  # the first step past 10 %
    assert "100/100 (100 %)" in milestones[-1] and "s left" not in milestones[-1]


def test_a_jump_past_several_tenths_reports_once_and_a_terminal_gets_no_lines() -> None:
    out = _run(Console(file=io.StringIO(), force_terminal=False, width=200), 10, [7, 3])
    assert next(line.split(" ", 1)[1] for line in out.splitlines() if "embedding:" in line).startswith(
        "embedding: 7/10 (70 %)")
    assert len([line for line in out.splitlines() if "embedding:" in line]) == 2
    terminal = _run(Console(file=io.StringIO(), force_terminal=True, width=200), 10, [5, 5])
    assert "(50 %)" not in terminal

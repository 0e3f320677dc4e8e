"""One rich progress bar for the outer loop of long work (extraction, training epochs)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text


class _Rate(ProgressColumn):
    def __init__(self, unit: str) -> None:
        super().__init__()
        self.unit = unit

    def render(self, task) -> Text:
        speed = task.finished_speed or task.speed
        return Text(f"{speed:,.0f} {self.unit}/s" if speed else "")


class _Bar:
    def __init__(self, progress: Progress, task_id) -> None:
        self._progress, self._task = progress, task_id

    def advance(self, n: float = 1) -> None:
        self._progress.advance(self._task, n)

    def describe(self, text: str) -> None:
        self._progress.update(self._task, description=text)


@contextmanager
def progress_bar(description: str, total: float, unit: str = "it", disable: bool = False) -> Iterator[_Bar]:
    columns = [TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), _Rate(unit),
               TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn()]
    with Progress(*columns, disable=disable) as progress:
        yield _Bar(progress, progress.add_task(description, total=total))

"""What a person sees: one line per stage with its key figures, a live progress display for long stages, the summary,
and errors in full. Library output goes to ``<run_dir>/logs/`` (see :mod:`pipeline.logs`); ``--verbose`` shows it.

On a terminal the progress display is a live bar that is replaced by the stage's line when the stage ends; in a log
file (a scheduler, CI) there is no bar, only a progress line every ``PLAIN_PROGRESS_EVERY_S`` seconds.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from typing import TextIO

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

from pipeline.progress import StageProgress

PLAIN_PROGRESS_EVERY_S = 30.0
_NAME_WIDTH = 9


def make_console(stream: TextIO) -> Console:
    return Console(file=stream, soft_wrap=True, highlight=False)


class _Stage:
    """One stage's progress on the console."""

    def __init__(self, console: Console, name: str) -> None:
        self.console = console
        self.name = name
        self.summary = ""
        self.started = time.perf_counter()
        self._progress: Progress | None = None
        self._task: TaskID | None = None
        self._total: float | None = None
        self._unit = ""
        self._last_plain = self.started

    def total(self, total: float, unit: str) -> None:
        self._total, self._unit = total, unit
        if not self.console.is_terminal:
            return
        self._progress = Progress(
            SpinnerColumn(),
            TextColumn(f"{self.name:<{_NAME_WIDTH}}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn(unit),
            TextColumn("{task.fields[status]}"),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            console=self.console,
            transient=True,
        )
        self._task = self._progress.add_task(self.name, total=total or None, status="")
        self._progress.start()

    def update(self, completed: float, status: str = "") -> None:
        if self._progress is not None and self._task is not None:
            self._progress.update(self._task, completed=completed, status=status)
            return
        now = time.perf_counter()
        if now - self._last_plain >= PLAIN_PROGRESS_EVERY_S:
            self._last_plain = now
            of = f"/{self._total:,.0f}" if self._total else ""
            self.console.print(f"{self.name:<{_NAME_WIDTH}} {completed:,.0f}{of} {self._unit} {status}".rstrip())

    def done(self, summary: str) -> None:
        self.summary = summary

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None

    def seconds(self) -> float:
        return time.perf_counter() - self.started


class ConsoleReporter:
    """The stages' reporter for the command line."""

    def __init__(self, console: Console) -> None:
        self.console = console

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[StageProgress]:
        stage = _Stage(self.console, name)
        if not self.console.is_terminal:
            self.console.print(f"{name:<{_NAME_WIDTH}} started")
        try:
            yield stage
        except BaseException:
            stage.close()
            self.console.print(f"[red]{name:<{_NAME_WIDTH}} failed[/red] after {stage.seconds():.1f}s")
            raise
        stage.close()
        self.console.print(f"[green]{name:<{_NAME_WIDTH}}[/green] {stage.summary} ({stage.seconds():.1f}s)")

"""How a stage tells whoever runs it how far it got, without knowing who that is.

The stages take a :class:`StageProgress` (the command line passes a live progress display; library callers and tests
get the silent default). Training runs in Ray workers, possibly on other machines: rank 0 appends one JSON line per
logged step to ``<run_dir>/logs/train_progress.jsonl`` (``run_dir`` is on storage every node sees) and the driver
follows that file with :class:`ProgressFileFollower`.
"""

from __future__ import annotations

import contextlib
import json
import threading
from collections.abc import Iterator
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any, Protocol


class StageProgress(Protocol):
    """A stage's progress: ``total`` once known, then ``update`` as work completes, ``done`` with its key figures."""

    def total(self, total: float, unit: str) -> None: ...

    def update(self, completed: float, status: str = "") -> None: ...

    def done(self, summary: str) -> None: ...


class StageReporter(Protocol):
    """Whoever runs the stages: opens one :class:`StageProgress` per stage."""

    def stage(self, name: str) -> AbstractContextManager[StageProgress]: ...


class SilentProgress:
    """The default: reports nowhere."""

    def total(self, total: float, unit: str) -> None:
        return None

    def update(self, completed: float, status: str = "") -> None:
        return None

    def done(self, summary: str) -> None:
        return None


class SilentReporter:
    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[StageProgress]:
        yield SILENT


SILENT = SilentProgress()
SILENT_REPORTER = SilentReporter()

TRAIN_PROGRESS_FILE = "train_progress.jsonl"


def log_dir(run_dir: Path) -> Path:
    """Where the driver's and every worker's library output goes: ``<run_dir>/logs``."""
    folder = run_dir.resolve() / "logs"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def append_progress(path: Path, record: dict[str, Any]) -> None:
    """One JSON line; a reader may see a partial last line, which it skips until it is complete."""
    with open(path, "a") as fh:
        fh.write(json.dumps(record) + "\n")


class ProgressFileFollower:
    """Follows a JSON-lines progress file in a background thread and hands each new record to ``on_record``."""

    def __init__(self, path: Path, on_record: Any, interval_s: float = 0.5) -> None:
        self.path = path
        self.on_record = on_record
        self.interval_s = interval_s
        self._offset = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="progress-follower", daemon=True)

    def __enter__(self) -> ProgressFileFollower:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.poll()  # the last records written before the trainer returned

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.poll()

    def poll(self) -> None:
        try:
            with open(self.path) as fh:
                fh.seek(self._offset)
                chunk = fh.read()
        except FileNotFoundError:
            return
        complete, _, _ = chunk.rpartition("\n")
        if not complete:
            return
        self._offset += len(complete) + 1
        for line in complete.splitlines():
            if line.strip():
                self.on_record(json.loads(line))

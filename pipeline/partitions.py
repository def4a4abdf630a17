"""Date partitions of the log root and the data window a run reads.

A ``dt=YYYY-MM-DD`` folder is used only once its writer has finished it (see :class:`CompletenessConfig`): a
partition still being written is skipped, with a line saying which and why, so a run never trains on half a day.

:func:`resolve_window` turns the complete partitions into a :class:`DataWindow`: the exact files of the training and
evaluation windows, resolved once. Stages given a window read that list and nothing else, so a partition or a file
that lands later does not change what a run reads or what its report and tags say.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import pyarrow.parquet as pq

from features.validate import DataValidationError
from pipeline.config import CompletenessConfig
from pipeline.logs import notice

PARTITION = re.compile(r"^dt=(\d{4}-\d{2}-\d{2})$")
WINDOW_FILE = "window.json"


@dataclass(frozen=True)
class PartitionScan:
    """Every ``dt=`` folder with Parquet files under a log root, split by completeness (both sorted by date)."""

    complete: dict[str, list[Path]]
    incomplete: dict[str, str]  # date -> why it is not complete yet

    @property
    def all_dates(self) -> list[str]:
        return sorted([*self.complete, *self.incomplete])


def scan_partitions(root: Path, rule: CompletenessConfig | None = None) -> PartitionScan:
    """Find the partitions under ``root`` and judge each by ``rule`` (default: a ``_SUCCESS`` marker)."""
    rule = rule or CompletenessConfig()
    root = Path(root)
    if not root.is_dir():
        raise DataValidationError(f"log folder {root} does not exist", file=str(root), column=None)
    found: dict[str, tuple[Path, list[Path]]] = {}
    for child in sorted(root.iterdir()):
        m = PARTITION.match(child.name)
        if child.is_dir() and m:
            files = sorted(child.glob("*.parquet"))
            if files:
                found[m.group(1)] = (child, files)
    dates = sorted(found)
    complete: dict[str, list[Path]] = {}
    incomplete: dict[str, str] = {}
    for i, date in enumerate(dates):
        folder, files = found[date]
        why = _incomplete_because(rule, folder, files, later=dates[i + 1 :])
        if why is None:
            complete[date] = files
        else:
            incomplete[date] = why
    return PartitionScan(complete, incomplete)


def _incomplete_because(rule: CompletenessConfig, folder: Path, files: list[Path], later: list[str]) -> str | None:
    if rule.rule == "marker":
        return None if (folder / rule.marker).is_file() else f"no {rule.marker} marker (its writer has not finished)"
    if rule.rule == "min_rows":
        rows = sum(pq.read_metadata(f).num_rows for f in files)
        return None if rows >= rule.min_rows else f"{rows:,} rows, fewer than data.complete.min_rows={rule.min_rows:,}"
    return None if later else "no later partition yet (data.complete.rule=next_partition)"


def discover_partitions(
    root: Path, rule: CompletenessConfig | None = None, say: Callable[[str], None] = notice
) -> dict[str, list[Path]]:
    """Complete ``dt=YYYY-MM-DD`` folder -> its Parquet files, sorted by date; ``say`` gets one line per skipped
    partition. Fails naming the folder if no partition is usable."""
    scan = scan_partitions(root, rule)
    for date, why in scan.incomplete.items():
        say(f"[ingest] skipping partition dt={date} under {root}: {why}")
    if not scan.complete:
        what = "complete " if scan.incomplete else ""
        raise DataValidationError(
            f"no {what}dt=YYYY-MM-DD/*.parquet partitions under {root}", file=str(root), column=None
        )
    return scan.complete


def split_windows(dates: list[str], train_days: int | None, eval_days: int) -> tuple[list[str], list[str]]:
    """The last ``eval_days`` partitions evaluate; the ``train_days`` before them (all, if unset) train."""
    if len(dates) <= eval_days:
        raise DataValidationError(
            f"need more than eval_days={eval_days} date partitions, found {len(dates)}: {dates}", file=None, column=None
        )
    eval_dates = dates[-eval_days:]
    train_dates = dates[:-eval_days]
    if train_days is not None:
        train_dates = train_dates[-train_days:]
    return train_dates, eval_dates


@dataclass(frozen=True)
class DataWindow:
    """The exact source files of a run's training and evaluation windows (absolute paths, sorted)."""

    train_dates: list[str]
    eval_dates: list[str]
    train_sources: list[str]
    eval_sources: list[str]

    def key(self) -> str:
        """Identifies the window's content by dates and file names (not the mount point, which differs per host)."""
        names = [str(Path(f).relative_to(Path(f).parent.parent)) for f in [*self.train_sources, *self.eval_sources]]
        body = {"train": self.train_dates, "eval": self.eval_dates, "files": names}
        return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:12]

    def save(self, path: Path) -> None:
        path.write_text(json.dumps({**asdict(self), "key": self.key()}, indent=2))

    @classmethod
    def load(cls, path: Path) -> DataWindow:
        data = json.loads(path.read_text())
        data.pop("key", None)
        return cls(**data)


def resolve_window(
    root: Path,
    train_days: int | None,
    eval_days: int,
    rule: CompletenessConfig | None = None,
    say: Callable[[str], None] = notice,
) -> DataWindow:
    """The windows over the complete partitions of ``root``, pinned to the files there now."""
    partitions = discover_partitions(root, rule, say)
    train_dates, eval_dates = split_windows(list(partitions), train_days, eval_days)
    return DataWindow(
        train_dates=train_dates,
        eval_dates=eval_dates,
        train_sources=[str(f.absolute()) for d in train_dates for f in partitions[d]],
        eval_sources=[str(f.absolute()) for d in eval_dates for f in partitions[d]],
    )

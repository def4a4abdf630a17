"""Ingest stage: find the date partitions, split the windows, validate every file, quarantine bad rows, and compute the
training window's dense statistics.

Ray Data maps over the files: each file is read and validated by one task (:mod:`pipeline.ingest_task`, free of
torch imports so that fresh Ray workers start it at once), so no process ever holds the whole window and the work
spreads over a cluster. A file whose every row is good is not copied: the later stages read it where it
is (its size and modification time are recorded, and :meth:`IngestResult.check_sources_unchanged` refuses it if it
changed since). A file with bad rows gets its clean rows written to ``<run_dir>/ingested`` and its bad rows, with
their reason, to a quarantine part. The driver only merges counts, moments and the (small) quarantine.

With ``data.validation_cache`` the clean and bad parts and the file's counts and moments go to the cache instead,
named by the file's identity (resolved path, size, modification time) and the spec's fingerprint; a file whose entry
exists is not read at all, and the later stages read its clean part from the cache. So a daily job validates only
the partitions it has not seen, and a file rewritten in place (new size or time) is validated again.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import pyarrow.parquet as pq

from features.encode import dense_stats_from_moments
from features.spec import FeatureSpec
from features.stats import DenseStats
from features.validate import DataValidationError, ValidationCounts, check_files, write_quarantine
from pipeline.config import ExperimentConfig
from pipeline.ingest_task import validate_file
from pipeline.partitions import WINDOW_FILE, DataWindow, discover_partitions, resolve_window, split_windows
from pipeline.progress import SILENT, StageProgress
from pipeline.results import StageResult

__all__ = ["IngestResult", "discover_partitions", "ingest", "split_windows"]

SPLITS = ("train", "validation", "eval")


def split_validation(dates: list[str], validation_days: int) -> tuple[list[str], list[str]]:
    """(training dates, validation dates): the validation window is the last ``validation_days`` of the dates before
    the evaluation window."""
    if validation_days == 0:
        return list(dates), []
    if len(dates) <= validation_days:
        raise DataValidationError(
            f"data.validation_days={validation_days} leaves no training partition: the window before the evaluation "
            f"days holds {len(dates)} ({', '.join(dates)})",
            file=None,
            column=None,
        )
    return dates[:-validation_days], dates[-validation_days:]


@dataclass(frozen=True)
class IngestResult(StageResult):
    """What the later stages need; saved as ``<run_dir>/ingest.json`` so stages can run as separate commands."""

    STAGE: ClassVar[str] = "ingest"

    train_dates: list[str]
    eval_dates: list[str]
    train_files: list[str]
    eval_files: list[str]
    quarantine_path: str
    stats_path: str
    counts: dict[str, dict[str, Any]] = field(default_factory=dict)  # split -> ValidationCounts as dict
    window: dict[str, Any] = field(default_factory=dict)  # the DataWindow read: the exact source files

    def window_key(self) -> str:
        """Identifies the training and evaluation data: the source files' window, or the dates for older results."""
        if self.window:
            return DataWindow(**self.window).key()
        return DataWindow(self.train_dates, self.eval_dates, [], []).key()

    data_hash: str = ""  # identity of this ingest (see data_fingerprint); every later stage records it
    validation_dates: list[str] = field(default_factory=list)  # data.validation_days: scored per epoch, not trained
    validation_files: list[str] = field(default_factory=list)
    files_from_cache: int = 0  # files whose validation was read from data.validation_cache instead of done again
    validation_cache: str = ""
    # Source files read in place (no bad row, so no clean copy): path -> [size, modification time in ns] at ingest.
    read_in_place: dict[str, list[int]] = field(default_factory=dict)

    def check_sources_unchanged(self) -> None:
        """Fail, naming the file, when a source read in place was rewritten or removed after it was validated: its
        rows would reach training or evaluation unvalidated."""
        for path, (size, mtime_ns) in self.read_in_place.items():
            try:
                st = Path(path).stat()
            except FileNotFoundError:
                raise DataValidationError(
                    f"{path}: validated at ingest but gone now; run the ingest stage again", file=path, column=None
                ) from None
            if (st.st_size, st.st_mtime_ns) != (size, mtime_ns):
                raise DataValidationError(
                    f"{path}: changed since it was validated at ingest (size {size} -> {st.st_size} bytes or a new "
                    "modification time); run the ingest stage again",
                    file=path,
                    column=None,
                )

    @property
    def stats(self) -> DenseStats:
        return DenseStats.load(self.stats_path)

    def total_counts(self) -> ValidationCounts:
        total = ValidationCounts(0, 0, 0, {})
        for c in self.counts.values():
            total = total.merge(ValidationCounts(**c))
        return total

    def counts_of(self, split: str) -> ValidationCounts:
        """Counts of one window (``train`` or ``eval``); zero when the window had no files."""
        return ValidationCounts(**self.counts[split]) if split in self.counts else ValidationCounts(0, 0, 0, {})


def data_fingerprint(sources: list[tuple[str, Path]], counts: dict[str, Any], stats_path: Path) -> str:
    """Identity of an ingest: the dated source files (path, size, modification time), the validation counts and the
    dense statistics. A re-ingest of other or changed logs gets another value, so results computed on the earlier
    ingest can be told apart."""
    digest = hashlib.sha256()
    for date, path in sources:
        st = path.stat()
        digest.update(f"{date}|{path.resolve()}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    digest.update(json.dumps(counts, sort_keys=True).encode())
    digest.update(stats_path.read_bytes())
    return digest.hexdigest()[:16]


def cache_key(path: Path, spec: FeatureSpec) -> str:
    """A file's validation-cache key: its identity (resolved path, size, modification time) and the spec's."""
    st = path.stat()
    identity = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}|{spec.fingerprint()}"
    return hashlib.sha256(identity.encode()).hexdigest()[:20]


def ingest(cfg: ExperimentConfig, window: DataWindow | None = None, progress: StageProgress = SILENT) -> IngestResult:
    """Validate the training and evaluation windows into ``cfg.run_dir``: the files of ``window`` when given (pinned
    by the caller), otherwise those of the complete partitions of ``cfg.data.path`` now. ``progress`` counts the
    files validated.

    ``ingest.json`` is written only when every check passed: a stale one is removed first, so after a failed ingest
    no later stage can train on a window that was rejected.
    """
    import ray

    from pipeline.runtime import ensure_ray

    ensure_ray(cfg)  # before any Ray Data call, which would otherwise start a default-sized local Ray
    spec = cfg.feature_spec()
    run_dir = cfg.run_dir.resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "ingest.json").unlink(missing_ok=True)
    if window is None:
        window = resolve_window(cfg.data.path, cfg.data.window_train_days, cfg.data.eval_days, cfg.data.complete)
    window.save(run_dir / WINDOW_FILE)
    train_dates, validation_dates = split_validation(window.train_dates, cfg.data.validation_days)
    eval_dates = window.eval_dates
    files = [(_date_of(f), Path(f)) for f in [*window.train_sources, *window.eval_sources]]
    missing = [str(f) for _, f in files if not f.is_file()]
    if missing:
        raise DataValidationError(
            f"{len(missing)} file(s) of the pinned window are gone: {', '.join(missing[:5])}",
            file=missing[0],
            column=None,
        )
    check_files([f for _, f in files], spec)  # schema problems of every file, in one error

    out = cfg.run_dir.resolve() / "ingested"
    staging = cfg.run_dir.resolve() / "quarantine_parts"
    for stale in (out, staging):  # a re-run must not mix in an earlier run's parts
        shutil.rmtree(stale, ignore_errors=True)
    cache = cfg.data.validation_cache.resolve() if cfg.data.validation_cache is not None else None
    tasks = []
    sources = {str(f.resolve()): f.stat() for _, f in files}  # identity before validation, checked before reading
    for i, (date, f) in enumerate(files):
        split = "eval" if date in eval_dates else "validation" if date in validation_dates else "train"
        if cache is None:
            clean_path, bad_path, meta_path = (
                out / split / f"dt={date}" / f"part-{i:05d}.parquet",
                staging / f"part-{i:05d}.parquet",
                None,
            )
        else:
            entry = cache / f"dt={date}" / f"{f.stem}-{cache_key(f, spec)}"
            clean_path, bad_path, meta_path = (
                entry.with_name(f"{entry.name}.parquet"),
                entry.with_name(f"{entry.name}.bad.parquet"),
                entry.with_name(f"{entry.name}.json"),
            )
        tasks.append(
            {
                "index": i,
                "path": str(f.resolve()),
                "split": split,
                "clean_path": str(clean_path),
                "bad_path": str(bad_path),
                "meta_path": str(meta_path) if meta_path is not None else "",
                "spec_json": spec.model_dump_json(),
            }
        )
    # One block per file, so files validate in parallel tasks.
    progress.total(len(tasks), "files")
    results = []
    for row in ray.data.from_items(tasks, override_num_blocks=len(tasks)).map(validate_file).iter_rows():
        results.append(row)
        progress.update(len(results))

    counts: dict[str, ValidationCounts] = {}
    moments: list[dict[str, tuple[int, float, float]]] = []
    for r in results:
        c = ValidationCounts(**json.loads(r["counts_json"]))
        counts[r["split"]] = counts[r["split"]].merge(c) if r["split"] in counts else c
        if r["split"] == "train":
            moments.append({k: tuple(v) for k, v in json.loads(r["moments_json"]).items()})  # type: ignore[misc]

    quarantine_path = cfg.run_dir.resolve() / "quarantine.parquet"
    bad_tables = [pq.read_table(r["bad_path"]) for r in results if r["bad_path"]]
    write_quarantine(bad_tables, quarantine_path, schema=pq.read_schema(files[0][1]))
    stats = dense_stats_from_moments(moments, spec)
    stats_path = cfg.run_dir.resolve() / "dense_stats.json"
    stats.save(stats_path)

    results.sort(key=lambda r: int(r["index"]))  # Ray Data may finish files out of order; windows stay in date order
    read_paths = {split: [r["read_path"] for r in results if r["split"] == split] for split in SPLITS}
    result = IngestResult(
        train_dates=train_dates,
        eval_dates=eval_dates,
        train_files=read_paths["train"],
        eval_files=read_paths["eval"],
        validation_dates=validation_dates,
        validation_files=read_paths["validation"],
        quarantine_path=str(quarantine_path),
        stats_path=str(stats_path),
        counts={k: asdict(v) for k, v in counts.items()},
        window=asdict(window),
        data_hash=data_fingerprint(files, {k: asdict(v) for k, v in counts.items()}, stats_path),
        files_from_cache=sum(bool(r["cached"]) for r in results),
        validation_cache=str(cache) if cache is not None else "",
        read_in_place={
            r["read_path"]: [sources[r["read_path"]].st_size, sources[r["read_path"]].st_mtime_ns]
            for r in results
            if r["read_path"] in sources
        },
    )
    # Fail after writing the quarantine, so the user can inspect what was rejected; before ingest.json, so nothing
    # downstream takes the rejected window for a validated one.
    result.total_counts().check(cfg.data.max_bad_fraction, str(quarantine_path))
    result.save(run_dir / "ingest.json")
    return result


def _date_of(source: str) -> str:
    """The partition date of a source file, from its ``dt=`` folder."""
    folder = Path(source).parent.name
    if not folder.startswith("dt="):
        raise DataValidationError(f"{source}: not inside a dt=YYYY-MM-DD folder", file=source, column=None)
    return folder.removeprefix("dt=")

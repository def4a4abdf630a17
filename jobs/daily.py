"""The scheduled daily job: for one day (default: the latest date partition) evaluate on that day, train on the
``daily.train_days`` partitions before it, warm-started from the champion, register a challenger, run the promotion
gate and write a run report.

Each day works in its own folder, ``<daily.run_root or run_dir/daily>/<day>``, while the MLflow store stays the
config's (the default SQLite file and artifact folder of ``run_dir``, not one per day).

Re-running a day duplicates nothing and redoes no finished work:

* a version registered for this day and config (tags ``daily_date``, ``config_hash``) already exists: no training,
  no registering; the gate runs again (it is idempotent) and the report is rewritten;
* the day's folder holds a trained and evaluated model of this config (e.g. the server was down at registration):
  only registering, the gate and the report run;
* otherwise the whole day runs; training continues from the day folder's checkpoints of the same config and data
  window (a crash at 90 % costs the last checkpoint interval, not the day); ``fresh`` starts training over.

Scheduling contract: the day's partition must be complete (``data.complete``), else :class:`DailyNotReady` (the CLI
exits with ``EXIT_NOT_READY``, for the scheduler to retry later) and nothing runs. The day's exact files are resolved
once (``window.json`` in the day folder, recorded in ``ingest.json``, the report and the MLflow run), so a partition
that lands during the run changes nothing. One run per day across hosts: a lease ``<run_root>/<day>.lease`` (owner,
heartbeat, expiry; ``jobs/lease.py``); a second run waits up to ``daily.lease_wait_s`` or stops cleanly.
"""

from __future__ import annotations

import datetime as dt
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from jobs import lease
from pipeline.config import ExperimentConfig
from pipeline.logs import notice
from pipeline.partitions import WINDOW_FILE, DataWindow, PartitionScan, scan_partitions, split_windows
from pipeline.register import COMPLETE_TAG, RegisterResult
from pipeline.registry import CHAMPION, call_with_retries, http_settings, redact, registry_client

STATE_FILE = "daily_state.json"
REPORT_JSON = "daily_report.json"
REPORT_MD = "daily_report.md"

#: Exit code of ``mtrec daily`` when the day's partition has not landed or is incomplete: retry later (EX_TEMPFAIL).
EXIT_NOT_READY = 75

Status = Literal["registered", "already_registered", "failed"]


class DailyError(RuntimeError):
    """The day cannot run (a bad date, too few partitions before it)."""


class DailyNotReady(DailyError):
    """The day's partition is missing or still being written: nothing was done; try again later."""


@dataclass
class DailyReport:
    date: str
    status: Status
    run_dir: str
    model_name: str
    train_dates: list[str] = field(default_factory=list)
    eval_dates: list[str] = field(default_factory=list)
    counts: dict[str, Any] = field(default_factory=dict)
    warm_start: str = "none"
    version: str | None = None
    model_uri: str | None = None
    run_id: str | None = None
    promotion: dict[str, Any] | None = None
    metrics: dict[str, dict[str, float]] = field(default_factory=dict)
    stages: dict[str, str] = field(default_factory=dict)  # stage -> "12.3s" or "skipped (...)"
    error: str | None = None
    window: dict[str, Any] = field(default_factory=dict)  # the pinned DataWindow: the exact source files
    started_at: str = ""
    finished_at: str = ""

    def to_markdown(self) -> str:
        lines = [
            f"# Daily run {self.date}: {self.status}",
            "",
            f"- model: `{self.model_name}` version {self.version or '-'} (`{self.model_uri or '-'}`), run "
            f"`{self.run_id or '-'}`",
            f"- training window: {', '.join(self.train_dates) or '-'}; evaluation window: "
            f"{', '.join(self.eval_dates) or '-'}",
            f"- warm start: {self.warm_start}",
            f"- started {self.started_at}, finished {self.finished_at}; folder `{self.run_dir}`",
        ]
        if self.counts:
            lines.append(
                f"- rows read {self.counts.get('rows_read', 0):,}, used {self.counts.get('rows_used', 0):,}, "
                f"quarantined {self.counts.get('rows_quarantined', 0):,}"
            )
        if self.promotion:
            p = self.promotion
            lines += [
                "",
                f"## Promotion: {p['decision']}",
                "",
                f"champion before: {p['champion_before'] or 'none'}, after: {p['champion_after'] or 'none'}. "
                f"{p['reason']}",
            ]
        if self.metrics:
            lines += ["", "## Metrics", "", "| evaluation | metric | value |", "|---|---|---:|"]
            for name, values in self.metrics.items():
                lines += [f"| {name} | {k} | {v:.4f} |" for k, v in values.items() if k != "rows"]
        lines += ["", "## Stages", "", *(f"- {k}: {v}" for k, v in self.stages.items())]
        if self.error:
            lines += ["", "## Error", "", "```", self.error, "```"]
        return "\n".join(lines) + "\n"


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def day_config(cfg: ExperimentConfig, day: str) -> ExperimentConfig:
    """The config of one day: its own run folder, the training window length, the shared MLflow store."""
    day_dir = run_root(cfg) / day
    remote = urlsplit(cfg.tracking_uri()).scheme in ("http", "https")
    mlflow_cfg = cfg.mlflow.model_copy(
        update={
            "tracking_uri": cfg.tracking_uri(),  # pinned: the default lives in run_dir, which changes below
            "artifact_location": cfg.mlflow.artifact_location or (None if remote else cfg.artifact_location()),
        }
    )
    return cfg.model_copy(
        update={
            "run_dir": day_dir,
            "data": cfg.data.model_copy(
                update={
                    "train_days": cfg.daily.train_days,
                    # Days share validated files: each day validates only the partitions it has not seen.
                    "validation_cache": cfg.data.validation_cache or run_root(cfg) / "validation_cache",
                }
            ),
            "mlflow": mlflow_cfg,
        }
    )


def run_root(cfg: ExperimentConfig) -> Path:
    return (cfg.daily.run_root or cfg.run_dir / "daily").resolve()


def check_date(date: str) -> str:
    """A real ``YYYY-MM-DD`` date (it names the day's folder)."""
    try:
        if dt.date.fromisoformat(date).isoformat() == date:
            return date
    except ValueError:
        pass
    raise DailyError(f"--date {date!r} is not a YYYY-MM-DD date")


def choose_day(cfg: ExperimentConfig, scan: PartitionScan, date: str | None) -> str:
    """The day to run: ``date``, or the newest partition that could be complete under ``data.complete`` (under
    ``next_partition`` the newest is never complete, so the one before it). Raises :class:`DailyNotReady` when
    that partition is missing or incomplete."""
    dates = scan.all_dates
    if date is None:
        if not dates:
            raise DailyNotReady(f"no dt=YYYY-MM-DD partition under {cfg.data.path} yet; nothing was done")
        newest_judgeable = -2 if cfg.data.complete.rule == "next_partition" and len(dates) > 1 else -1
        date = dates[newest_judgeable]
    day = check_date(date)
    if day in scan.incomplete:
        raise DailyNotReady(
            f"partition dt={day} under {cfg.data.path} is not complete: {scan.incomplete[day]}; nothing was done"
        )
    if day not in scan.complete:
        latest = dates[-1] if dates else "none"
        raise DailyNotReady(
            f"no partition dt={day} under {cfg.data.path} (latest is {latest}): the day's logs have not landed; "
            "nothing was done"
        )
    return day


def pin_window(cfg: ExperimentConfig, scan: PartitionScan, day: str, fresh: bool) -> DataWindow:
    """The day's exact files: evaluation ends at ``day``; training takes the complete partitions before it (an
    incomplete one is skipped, saying so). A re-run of the day keeps the files its first attempt recorded when the
    windows' dates are the same, so its checkpoints stay valid."""
    for date, why in scan.incomplete.items():
        if date < day:
            notice(f"[daily] skipping partition dt={date}: {why}")
    dates = [d for d in scan.complete if d <= day]
    train_dates, eval_dates = split_windows(dates, cfg.data.window_train_days, cfg.data.eval_days)
    window = DataWindow(
        train_dates=train_dates,
        eval_dates=eval_dates,
        train_sources=[str(f.absolute()) for d in train_dates for f in scan.complete[d]],
        eval_sources=[str(f.absolute()) for d in eval_dates for f in scan.complete[d]],
    )
    recorded_path = cfg.run_dir / WINDOW_FILE
    if not fresh and recorded_path.exists():
        recorded = DataWindow.load(recorded_path)
        same_dates = (recorded.train_dates, recorded.eval_dates) == (train_dates, eval_dates)
        if same_dates and all(Path(f).is_file() for f in [*recorded.train_sources, *recorded.eval_sources]):
            return recorded
        notice(f"[daily] the window differs from the one recorded in {recorded_path}: using the new one")
    cfg.run_dir.mkdir(parents=True, exist_ok=True)
    window.save(recorded_path)
    return window


def _registered_for_day(cfg: ExperimentConfig, day: str, key: str) -> RegisterResult | None:
    """The complete version registered for this day and config, if any."""
    from pipeline.registry import versions_with_tag

    def find() -> RegisterResult | None:
        client = registry_client(cfg)
        found = [
            v
            for v in versions_with_tag(client, cfg.mlflow.model_name, "daily_date", day)
            if v.tags.get("config_hash") == key and v.tags.get(COMPLETE_TAG) == "complete"
        ]
        if not found:
            return None
        v = found[0]
        return RegisterResult(
            run_id=str(v.run_id),
            model_name=v.name,
            version=str(v.version),
            model_uri=f"models:/{v.name}/{v.version}",
            alias_uri=f"models:/{v.name}@challenger",
            tracking_uri=redact(cfg.tracking_uri()),
        )

    with http_settings(cfg):
        return call_with_retries(find, cfg, "look up today's version", "Nothing was trained or registered.")


def _stage_done(day_dir: Path, key: str, window_key: str) -> bool:
    state = day_dir / STATE_FILE
    if not state.exists():
        return False
    done = json.loads(state.read_text())
    files = ("ingest.json", "train.json", "eval.json")
    same = done.get("config_hash") == key and done.get("data_window") == window_key
    return bool(same and done.get("stage") == "evaluated") and all((day_dir / f).exists() for f in files)


def run_daily(cfg: ExperimentConfig, date: str | None = None, fresh: bool = False) -> DailyReport:
    """Run (or finish) one day; always writes the report, also when a stage fails (then re-raises).

    Raises :class:`DailyNotReady` (nothing done) when the day's partition is missing or incomplete, and
    :class:`jobs.lease.LeaseHeldError` (nothing done) when another live run holds the day."""
    scan = scan_partitions(Path(cfg.data.path), cfg.data.complete)
    day = choose_day(cfg, scan, date)
    dcfg = day_config(cfg, day)
    day_dir = dcfg.run_dir
    settings = cfg.daily
    with lease.held(
        run_root(cfg) / f"{day}.lease", settings.lease_ttl_s, settings.heartbeat_s, settings.lease_wait_s
    ) as held:
        report = DailyReport(
            date=day, status="failed", run_dir=str(day_dir), model_name=cfg.mlflow.model_name, started_at=_now()
        )
        try:
            window = pin_window(dcfg, scan, day, fresh)
            report.window = asdict(window)
            report.train_dates, report.eval_dates = window.train_dates, window.eval_dates
            _run_day(dcfg, day, report, window, fresh, held)
        except BaseException as err:
            report.error = redact(f"{type(err).__name__}: {err}")
            raise
        finally:
            report.finished_at = _now()
            _write_report(dcfg, report)
    return report


def _timed(report: DailyReport, stage: str, started: float) -> None:
    report.stages[stage] = f"{time.perf_counter() - started:.1f}s"


def _run_day(
    cfg: ExperimentConfig, day: str, report: DailyReport, window: DataWindow, fresh: bool, held: lease.Lease
) -> None:
    from pipeline.evaluate import EvalResult, evaluate
    from pipeline.ingest import IngestResult, ingest
    from pipeline.promote import promote
    from pipeline.register import register
    from pipeline.registry import resolve_warm_start
    from pipeline.train import TrainResult, train

    day_dir = cfg.run_dir
    key = cfg.fingerprint()  # includes the training window length; excludes paths and operational sections
    registered = _registered_for_day(cfg, day, key)
    if registered is not None:
        report.status = "already_registered"
        for stage in ("ingest", "train", "evaluate", "register"):
            report.stages[stage] = f"skipped (version {registered.version} is registered for {day})"
        if (day_dir / "ingest.json").exists():
            ingested = IngestResult.load(day_dir / "ingest.json")
            report.train_dates, report.eval_dates = ingested.train_dates, ingested.eval_dates
            report.counts = _counts(ingested)
        if (day_dir / "eval.json").exists():
            report.metrics = EvalResult.load(day_dir / "eval.json").metrics
    else:
        if not fresh and _stage_done(day_dir, key, window.key()):
            ingested = IngestResult.load(day_dir / "ingest.json")
            trained = TrainResult.load(day_dir / "train.json")
            evaluated = EvalResult.load(day_dir / "eval.json")
            state = json.loads((day_dir / STATE_FILE).read_text())
            report.warm_start = state.get("warm_start", "none")
            for stage in ("ingest", "train", "evaluate"):
                report.stages[stage] = "skipped (done by an earlier run of this day)"
        else:
            from pipeline.runtime import ensure_ray

            ensure_ray(cfg)
            t = time.perf_counter()
            ingested = ingest(cfg, window)
            _timed(report, "ingest", t)
            warm = None
            if cfg.daily.warm_start:
                warm = resolve_warm_start(cfg, f"models:/{cfg.mlflow.model_name}@{CHAMPION}", strict=False)
            report.warm_start = f"champion version {warm.version}" if warm else "none (cold start)"
            t = time.perf_counter()
            trained = train(cfg, ingested, warm_start_dir=warm.model_dir if warm else None, fresh=fresh)
            _timed(report, "train", t)
            t = time.perf_counter()
            evaluated = evaluate(cfg, ingested, trained)
            _timed(report, "evaluate", t)
            state = {
                "config_hash": key,
                "data_window": window.key(),
                "stage": "evaluated",
                "warm_start": report.warm_start,
            }
            (day_dir / STATE_FILE).write_text(json.dumps(state))
        report.train_dates, report.eval_dates = ingested.train_dates, ingested.eval_dates
        report.counts = _counts(ingested)
        report.metrics = evaluated.metrics
        t = time.perf_counter()
        tags = {"daily_date": day, "warm_start": report.warm_start}
        held.ensure_held()  # a run that stalled past its lease must not register beside the one that took over
        registered = register(cfg, ingested, trained, evaluated, extra_tags=tags)
        _timed(report, "register", t)
        report.status = "registered"
    report.version, report.model_uri, report.run_id = registered.version, registered.model_uri, registered.run_id

    t = time.perf_counter()
    decision = promote(cfg, version=registered.version)
    _timed(report, "promote", t)
    report.promotion = asdict(decision)


def _counts(ingested: Any) -> dict[str, Any]:
    return asdict(ingested.total_counts())


def _write_report(cfg: ExperimentConfig, report: DailyReport) -> None:
    """The report beside the day's outputs, and on the version's run when there is one (same artifact path each
    time, so a re-run replaces it rather than adding one)."""
    day_dir = cfg.run_dir
    day_dir.mkdir(parents=True, exist_ok=True)
    (day_dir / REPORT_JSON).write_text(json.dumps(asdict(report), indent=2))
    (day_dir / REPORT_MD).write_text(report.to_markdown())
    if report.run_id is None:
        return

    def upload() -> None:
        client = registry_client(cfg)
        client.log_artifact(report.run_id, str(day_dir / REPORT_JSON), "daily")
        client.log_artifact(report.run_id, str(day_dir / REPORT_MD), "daily")

    try:
        with http_settings(cfg):
            call_with_retries(upload, cfg, "upload the daily report", f"The report is at {day_dir / REPORT_MD}.")
    except Exception as err:  # the report on disk is what matters; a failed upload must not fail a finished day
        notice(f"[daily] report not uploaded to the run: {redact(str(err))}")

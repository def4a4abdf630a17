"""The ``mtrec`` command line. Every command takes ``--config`` and dotted ``--set`` overrides; stages read the
previous stages' outputs from the run directory, so they can run one by one or all together with ``run``."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, NoReturn

import typer
from rich.console import Console
from rich.table import Table

from features.spec import SpecError
from jobs.console import ConsoleReporter, make_console
from pipeline.config import ConfigError, ExperimentConfig, load_config

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Multi-task recommender training pipeline.")
console = Console(soft_wrap=True)

ConfigOpt = Annotated[Path, typer.Option("--config", "-c", help="experiment YAML", exists=False)]
SetOpt = Annotated[list[str] | None, typer.Option("--set", "-s", help="override, e.g. train.batch_size=4096")]
VerboseOpt = Annotated[
    bool, typer.Option("--verbose", "-v", help="show library output live instead of keeping it in <run_dir>/logs/")
]
FreshOpt = Annotated[
    bool,
    typer.Option(
        "--fresh",
        help="start training over; the run folder's old checkpoints are moved aside (default: continue from them "
        "when they are of this config and data window)",
    ),
]


def _load(config: Path, overrides: list[str] | None) -> ExperimentConfig:
    try:
        return load_config(config, overrides or [])
    except (ConfigError, SpecError) as err:
        console.print(f"[red]error:[/red] {err}", markup=True, highlight=False)
        raise typer.Exit(2) from None


def _quiet_libraries() -> None:
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    for name in ("mlflow", "alembic", "ray", "urllib3"):
        logging.getLogger(name).setLevel(logging.WARNING)


@contextlib.contextmanager
def _session(cfg: ExperimentConfig, verbose: bool) -> Iterator[Console]:
    """The console for a command that runs stages: library output goes to ``<run_dir>/logs/driver.log`` (and each
    training worker's own file) unless ``--verbose``."""
    from pipeline.logs import captured_output
    from pipeline.progress import log_dir
    from pipeline.runtime import set_verbose

    set_verbose(verbose)
    _quiet_libraries()
    if verbose:
        yield console
        return
    logs = log_dir(cfg.run_dir)
    with captured_output(logs / "driver.log", sys.stdout) as stream:
        shown = make_console(stream)
        shown.print(f"[dim]library logs: {logs}[/dim]")
        yield shown


def print_summary(evaluated: object, registered: object | None, out: Console | None = None) -> None:
    from pipeline.evaluate import EvalResult
    from pipeline.register import RegisterResult
    from pipeline.run import date_span

    out = out or console
    assert isinstance(evaluated, EvalResult)
    table = Table(title=f"Evaluation on {date_span(evaluated.eval_dates)} ({evaluated.rows:,} rows)")
    for col in ("task", "metric", "value", "oracle"):
        table.add_column(col, justify="left" if col in ("task", "metric") else "right")
    for name, metric, value, oracle in evaluated.rows_for_table():
        if metric == "rows":
            continue
        table.add_row(name, metric, f"{value:.4f}", "-" if oracle is None else f"{oracle:.4f}")
    out.print(table)
    for note in evaluated.notes:
        out.print(f"[dim]{note}[/dim]")
    if isinstance(registered, RegisterResult):
        out.print(f"registered model: [bold]{registered.model_uri}[/bold] (alias {registered.alias_uri})")


def _fail(err: Exception, out: Console | None = None) -> NoReturn:
    (out or console).print(f"[red]error:[/red] {err}", markup=True, highlight=False)
    raise typer.Exit(1) from None


@app.command()
def generate(config: ConfigOpt, set_: SetOpt = None) -> None:
    """Write generated behaviour logs (dt=YYYY-MM-DD/part-*.parquet) and the oracle file."""
    from pipeline.run import describe_generated
    from pipeline.run import generate as run_generate

    cfg = _load(config, set_)
    result = run_generate(cfg)
    console.print(f"generated {describe_generated(result)} in {result.seconds:.1f}s -> {cfg.data.path}")


@app.command()
def ingest(config: ConfigOpt, set_: SetOpt = None, verbose: VerboseOpt = False) -> None:
    """Validate the logs against the feature spec, quarantine bad rows, compute training statistics."""
    from features.validate import DataValidationError
    from pipeline.ingest import ingest as run_ingest
    from pipeline.run import describe_ingested

    cfg = _load(config, set_)
    with _session(cfg, verbose) as out:
        try:
            with ConsoleReporter(out).stage("ingest") as progress:
                result = run_ingest(cfg, progress=progress)
                progress.done(describe_ingested(result))
        except DataValidationError as err:
            _fail(err, out)
        out.print(f"quarantine -> {result.quarantine_path}")


@app.command()
def train(
    config: ConfigOpt,
    set_: SetOpt = None,
    fresh: FreshOpt = False,
    resume: Annotated[bool, typer.Option("--resume", hidden=True, help="the default; kept for old scripts")] = False,
    warm_start: Annotated[
        str | None,
        typer.Option(
            "--warm-start",
            help="initialise from models:/<name>@<alias>, models:/<name>/<version> or a model folder (same feature "
            "spec and tensor shapes)",
        ),
    ] = None,
    verbose: VerboseOpt = False,
) -> None:
    """Train on the ingested window with Ray Train + TorchRec DistributedModelParallel.

    Continues from the run folder's checkpoints when they are of this config and data window (after a crash, just
    run the same command again); checkpoints of another config are refused, naming both hashes."""
    from pipeline.checkpoints import CheckpointMismatchError
    from pipeline.ingest import IngestResult
    from pipeline.registry import RegistryUnavailableError, resolve_warm_start
    from pipeline.resources import CLUSTER_ERRORS
    from pipeline.run import describe_trained
    from pipeline.train import NothingToTrainError
    from pipeline.train import train as run_train

    cfg = _load(config, set_)
    with _session(cfg, verbose) as out:
        warm_dir = None
        if warm_start:
            try:
                warm = resolve_warm_start(cfg, warm_start, strict=True)
            except (ValueError, RegistryUnavailableError) as err:
                _fail(err, out)
            if warm is None:
                _fail(ValueError(f"--warm-start {warm_start}: no such alias in the registry"), out)
            warm_dir = warm.model_dir
            out.print(f"warm start from {warm_start} -> {warm_dir}")
        ingested = IngestResult.load(cfg.run_dir.resolve() / "ingest.json")
        try:
            with ConsoleReporter(out).stage("train") as progress:
                result = run_train(cfg, ingested, warm_start_dir=warm_dir, fresh=fresh, progress=progress)
                progress.done(describe_trained(result))
        except (CheckpointMismatchError, NothingToTrainError) as err:
            _fail(err, out)
        except CLUSTER_ERRORS as err:
            _fail(err, out)
        out.print(f"model -> {result.model_dir}")


@app.command()
def evaluate(config: ConfigOpt, set_: SetOpt = None, verbose: VerboseOpt = False) -> None:
    """Score the evaluation window and print per-task metrics beside the oracle."""
    from pipeline.evaluate import evaluate as run_evaluate
    from pipeline.ingest import IngestResult
    from pipeline.run import describe_evaluated
    from pipeline.train import TrainResult

    cfg = _load(config, set_)
    run_dir = cfg.run_dir.resolve()
    with _session(cfg, verbose) as out:
        with ConsoleReporter(out).stage("evaluate") as progress:
            ingested, trained = IngestResult.load(run_dir / "ingest.json"), TrainResult.load(run_dir / "train.json")
            result = run_evaluate(cfg, ingested, trained)
            progress.done(describe_evaluated(result))
        print_summary(result, None, out)


@app.command()
def register(config: ConfigOpt, set_: SetOpt = None, verbose: VerboseOpt = False) -> None:
    """Log the run to MLflow (model card, plots) and register the model with the 'challenger' alias.

    Idempotent: the same trained model is registered once; re-running finishes an interrupted registration."""
    from pipeline.evaluate import EvalResult
    from pipeline.ingest import IngestResult
    from pipeline.lineage import StageMismatchError
    from pipeline.register import register as run_register
    from pipeline.registry import RegistryUnavailableError
    from pipeline.run import describe_registered
    from pipeline.train import TrainResult

    cfg = _load(config, set_)
    run_dir = cfg.run_dir.resolve()
    with _session(cfg, verbose) as out:
        try:
            with ConsoleReporter(out).stage("register") as progress:
                result = run_register(
                    cfg,
                    IngestResult.load(run_dir / "ingest.json"),
                    TrainResult.load(run_dir / "train.json"),
                    EvalResult.load(run_dir / "eval.json"),
                )
                progress.done(describe_registered(result))
        except (RegistryUnavailableError, FileNotFoundError, StageMismatchError) as err:
            _fail(err, out)
        out.print(f"registered {result.model_uri} ({result.alias_uri}), run {result.run_id}")


@app.command()
def run(
    config: ConfigOpt,
    set_: SetOpt = None,
    generate_data: Annotated[bool, typer.Option("--generate", help="generate logs first")] = False,
    verbose: VerboseOpt = False,
    fresh: FreshOpt = False,
) -> None:
    """All stages: (generate ->) ingest -> train -> evaluate -> register, then a summary table."""
    from features.validate import DataValidationError
    from pipeline.checkpoints import CheckpointMismatchError
    from pipeline.registry import RegistryUnavailableError
    from pipeline.resources import CLUSTER_ERRORS
    from pipeline.run import run_pipeline
    from pipeline.train import NothingToTrainError

    cfg = _load(config, set_)
    started = time.perf_counter()
    with _session(cfg, verbose) as out:
        try:
            result = run_pipeline(cfg, with_generate=generate_data, reporter=ConsoleReporter(out), fresh=fresh)
        except (
            DataValidationError,
            RegistryUnavailableError,
            CheckpointMismatchError,
            NothingToTrainError,
        ) as err:
            _fail(err, out)
        except CLUSTER_ERRORS as err:
            _fail(err, out)
        print_summary(result.evaluated, result.registered, out)
        out.print(f"done in {time.perf_counter() - started:.0f}s")


@app.command()
def promote(
    config: ConfigOpt,
    set_: SetOpt = None,
    version: Annotated[str | None, typer.Option("--version", help="version to judge; default: the challenger")] = None,
    force: Annotated[bool, typer.Option("--force", help="make it champion whatever the gate says")] = False,
    allow_first: Annotated[
        bool,
        typer.Option("--allow-first", help="accept a first champion unchecked when no promotion.bounds are configured"),
    ] = False,
    fail_on_reject: Annotated[bool, typer.Option("--fail-on-reject", help="exit 3 when rejected")] = False,
    verbose: VerboseOpt = False,
) -> None:
    """Promotion gate: challenger vs champion on the same evaluation window; moves 'champion' on a pass.

    Every gated metric must be within promotion.thresholds and promotion.bounds, with at least one finite
    comparison. The decision is recorded as tags on both versions. A first champion must meet promotion.bounds (or
    --allow-first when none are configured). The champion alias moves only if nobody moved it since the comparison."""
    from pipeline.promote import PromotionError
    from pipeline.promote import promote as run_promote
    from pipeline.registry import RegistryUnavailableError

    cfg = _load(config, set_)
    with _session(cfg, verbose) as out:
        try:
            result = run_promote(cfg, version=version, force=force, allow_first=allow_first)
        except (PromotionError, RegistryUnavailableError) as err:
            _fail(err, out)
        print_promotion(result, out)
    if fail_on_reject and result.decision == "rejected":
        raise typer.Exit(3)


def print_promotion(result: object, out: Console | None = None) -> None:
    from pipeline.promote import PromotionResult

    out = out or console
    assert isinstance(result, PromotionResult)
    if result.checks:
        against = f"champion v{result.champion_before}" if result.champion_before else "promotion.bounds (no champion)"
        table = Table(title=f"Gate: v{result.challenger_version} vs {against}")
        for col in ("metric", "challenger", "champion", "drop", "allowed", ""):
            table.add_column(col, justify="left" if col == "metric" else "right")
        for c in result.checks:
            cells = [c["challenger"], c["champion"], c["drop"]]
            shown = ["-" if v is None else f"{v:.4f}" for v in cells]
            table.add_row(c["key"], *shown, _allowed(c), "ok" if c["passed"] else "[red]FAIL[/red]")
        out.print(table)
    colour = {"promoted": "green", "rejected": "red", "unchanged": "yellow"}[result.decision]
    out.print(
        f"[{colour}]{result.decision}[/{colour}]: {result.model_name} champion is "
        f"{'version ' + result.champion_after if result.champion_after else 'none'} ({result.reason})",
        highlight=False,
    )


def _allowed(check: dict[str, object]) -> str:
    """A check's rule: the largest drop against the champion, or an absolute [min, max]."""
    if check.get("max_drop") is not None:
        return f"drop <= {check['max_drop']:.4f}"
    lo, hi = check.get("bound_min"), check.get("bound_max")
    return f"[{'-' if lo is None else f'{lo:.4f}'}, {'-' if hi is None else f'{hi:.4f}'}]"


@app.command()
def daily(
    config: ConfigOpt,
    set_: SetOpt = None,
    date: Annotated[
        str | None, typer.Option("--date", help="evaluation day YYYY-MM-DD (default: the latest partition)")
    ] = None,
    verbose: VerboseOpt = False,
    fresh: FreshOpt = False,
) -> None:
    """Scheduled job: train, register a challenger, run the promotion gate, write a report for one day.

    Trains on the last daily.train_days complete partitions before the day, warm-started from the champion.
    Re-running a day duplicates nothing and continues what an interrupted run left. Exit codes: 0 done (or another
    host is running this day: nothing done), 75 the day's partition is missing or incomplete (retry later),
    1 failed, 2 bad config."""
    from features.validate import DataValidationError
    from jobs.daily import EXIT_NOT_READY, DailyError, DailyNotReady, run_daily
    from jobs.lease import LeaseHeldError, LeaseLostError
    from pipeline.checkpoints import CheckpointMismatchError
    from pipeline.promote import PromotionError
    from pipeline.registry import RegistryUnavailableError
    from pipeline.resources import CLUSTER_ERRORS

    cfg = _load(config, set_)
    with _session(cfg, verbose) as out:
        try:
            report = run_daily(cfg, date, fresh=fresh)
        except DailyNotReady as err:
            out.print(f"[yellow]not ready:[/yellow] {err}", markup=True, highlight=False)
            raise typer.Exit(EXIT_NOT_READY) from None
        except LeaseHeldError as err:
            out.print(f"skipped: another run of this day is in progress: {err}", highlight=False)
            return
        except (
            DailyError,
            DataValidationError,
            PromotionError,
            RegistryUnavailableError,
            CheckpointMismatchError,
            LeaseLostError,
        ) as err:
            _fail(err, out)
        except CLUSTER_ERRORS as err:
            _fail(err, out)
        out.print(f"daily {report.date}: {report.status}, version {report.version} ({report.model_uri})")
        for stage, took in report.stages.items():
            out.print(f"  {stage}: {took}", highlight=False)
        if report.promotion:
            p = report.promotion
            champion = f"version {p['champion_after']}" if p["champion_after"] else "none"
            out.print(f"promotion: {p['decision']}: champion is {champion} ({p['reason']})")
        out.print(f"report -> {Path(report.run_dir) / 'daily_report.md'}")


REMOTE_COMMANDS = ("generate", "ingest", "train", "evaluate", "register", "promote", "run", "daily")


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def submit(
    ctx: typer.Context,
    config: ConfigOpt,
    set_: SetOpt = None,
    address: Annotated[
        str | None, typer.Option("--address", help="Ray Jobs API, http://<head>:8265 (default: submit.address)")
    ] = None,
    command: Annotated[str, typer.Option("--command", help="the mtrec command to run on the cluster")] = "run",
    remote_config: Annotated[
        str | None, typer.Option("--remote-config", help="the config's path on the cluster (default: as given)")
    ] = None,
    submission_id: Annotated[
        str | None, typer.Option("--submission-id", help="idempotent: follow the job of this id if it exists")
    ] = None,
    env: Annotated[list[str] | None, typer.Option("--env", help="KEY=VALUE for the job's environment")] = None,
    wait: Annotated[bool, typer.Option("--wait/--no-wait", help="follow status and logs until the job ends")] = True,
) -> None:
    """Run an mtrec command on a Ray cluster as a Ray job; stream its logs and exit with its outcome.

    Arguments after `--` go to the remote command, e.g. `mtrec submit -c demo.yaml --address http://head:8265
    --command run -- --generate`."""
    from jobs.submit import SubmitError, build_entrypoint
    from jobs.submit import submit as run_submit

    cfg = _load(config, set_)
    if command not in REMOTE_COMMANDS:
        _fail(ValueError(f"--command {command!r} is not one of {', '.join(REMOTE_COMMANDS)}"))
    variables: dict[str, str] = {}
    for item in env or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            _fail(ValueError(f"--env {item!r} must look like KEY=VALUE"))
        variables[key] = value
    entrypoint = build_entrypoint(cfg, command, remote_config or str(config), list(set_ or []), list(ctx.args))
    try:
        result = run_submit(cfg, entrypoint, address=address, submission_id=submission_id, env=variables, follow=wait)
    except SubmitError as err:
        _fail(err)
    if result.followed and result.status != "SUCCEEDED":
        raise typer.Exit(1)


def main() -> None:
    app(prog_name="mtrec")


if __name__ == "__main__":
    main()

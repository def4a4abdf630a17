"""The ``mtrec`` command line. Every command takes ``--config`` and dotted ``--set`` overrides; stages read the
previous stages' outputs from the run directory, so they can run one by one or all together with ``run``."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Annotated, NoReturn

import typer
from rich.console import Console
from rich.table import Table

from features.spec import SpecError
from pipeline.config import ConfigError, ExperimentConfig, load_config

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Multi-task recommender training pipeline.")
console = Console(soft_wrap=True)

ConfigOpt = Annotated[Path, typer.Option("--config", "-c", help="experiment YAML", exists=False)]
SetOpt = Annotated[list[str] | None, typer.Option("--set", "-s", help="override, e.g. train.batch_size=4096")]


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


def print_summary(evaluated: object, registered: object | None) -> None:
    from pipeline.evaluate import EvalResult
    from pipeline.register import RegisterResult

    assert isinstance(evaluated, EvalResult)
    table = Table(title=f"Evaluation on {', '.join(evaluated.eval_dates)} ({evaluated.rows:,} rows)")
    for col in ("task", "metric", "value", "oracle"):
        table.add_column(col, justify="left" if col in ("task", "metric") else "right")
    for name, metric, value, oracle in evaluated.rows_for_table():
        if metric == "rows":
            continue
        table.add_row(name, metric, f"{value:.4f}", "-" if oracle is None else f"{oracle:.4f}")
    console.print(table)
    if isinstance(registered, RegisterResult):
        console.print(f"registered model: [bold]{registered.model_uri}[/bold] (alias {registered.alias_uri})")


def _fail(err: Exception) -> NoReturn:
    console.print(f"[red]error:[/red] {err}", markup=True, highlight=False)
    raise typer.Exit(1) from None


@app.command()
def generate(config: ConfigOpt, set_: SetOpt = None) -> None:
    """Write generated behaviour logs (dt=YYYY-MM-DD/part-*.parquet) and the oracle file."""
    from pipeline.run import generate as run_generate

    cfg = _load(config, set_)
    result = run_generate(cfg)
    console.print(
        f"generated {result.rows:,} rows in {len(result.files)} files over {len(result.dates)} days "
        f"in {result.seconds:.1f}s -> {cfg.data.path}; oracle -> {result.oracle_path}"
    )


@app.command()
def ingest(config: ConfigOpt, set_: SetOpt = None) -> None:
    """Validate the logs against the feature spec, quarantine bad rows, compute training statistics."""
    from features.validate import DataValidationError
    from pipeline.ingest import ingest as run_ingest

    _quiet_libraries()
    cfg = _load(config, set_)
    try:
        result = run_ingest(cfg)
    except DataValidationError as err:
        _fail(err)
    c = result.total_counts()
    console.print(
        f"rows read {c.rows_read:,} = used {c.rows_used:,} + quarantined {c.rows_quarantined:,} "
        f"{dict(c.by_reason) or ''}; quarantine -> {result.quarantine_path}"
    )


@app.command()
def train(
    config: ConfigOpt,
    set_: SetOpt = None,
    resume: Annotated[
        bool, typer.Option("--resume", help="continue from the latest checkpoint of this run (after the driver died)")
    ] = False,
    warm_start: Annotated[
        str | None,
        typer.Option(
            "--warm-start",
            help="initialise from models:/<name>@<alias>, models:/<name>/<version> or a model folder (same feature "
            "spec and tensor shapes)",
        ),
    ] = None,
) -> None:
    """Train on the ingested window with Ray Train + TorchRec DistributedModelParallel."""
    from pipeline.ingest import IngestResult
    from pipeline.registry import RegistryUnavailableError, resolve_warm_start
    from pipeline.resources import CLUSTER_ERRORS
    from pipeline.train import train as run_train

    _quiet_libraries()
    cfg = _load(config, set_)
    warm_dir = None
    if warm_start:
        try:
            warm = resolve_warm_start(cfg, warm_start, strict=True)
        except (ValueError, RegistryUnavailableError) as err:
            _fail(err)
        if warm is None:
            _fail(ValueError(f"--warm-start {warm_start}: no such alias in the registry"))
        warm_dir = warm.model_dir
        console.print(f"warm start from {warm_start} -> {warm_dir}")
    ingested = IngestResult.load(cfg.run_dir.resolve() / "ingest.json")
    try:
        result = run_train(cfg, ingested, resume=resume, warm_start_dir=warm_dir)
    except CLUSTER_ERRORS as err:
        _fail(err)
    console.print(
        f"trained {result.steps} steps, {result.samples:,} samples, {result.samples_per_s:,.0f} samples/s "
        f"-> {result.model_dir}"
    )


@app.command()
def evaluate(config: ConfigOpt, set_: SetOpt = None) -> None:
    """Score the evaluation window and print per-task metrics beside the oracle."""
    from pipeline.evaluate import evaluate as run_evaluate
    from pipeline.ingest import IngestResult
    from pipeline.train import TrainResult

    cfg = _load(config, set_)
    run_dir = cfg.run_dir.resolve()
    result = run_evaluate(cfg, IngestResult.load(run_dir / "ingest.json"), TrainResult.load(run_dir / "train.json"))
    print_summary(result, None)


@app.command()
def register(config: ConfigOpt, set_: SetOpt = None) -> None:
    """Log the run to MLflow (model card, plots) and register the model with the 'challenger' alias.

    Idempotent: the same trained model is registered once; re-running finishes an interrupted registration."""
    from pipeline.evaluate import EvalResult
    from pipeline.ingest import IngestResult
    from pipeline.register import register as run_register
    from pipeline.registry import RegistryUnavailableError
    from pipeline.train import TrainResult

    _quiet_libraries()
    cfg = _load(config, set_)
    run_dir = cfg.run_dir.resolve()
    try:
        result = run_register(
            cfg,
            IngestResult.load(run_dir / "ingest.json"),
            TrainResult.load(run_dir / "train.json"),
            EvalResult.load(run_dir / "eval.json"),
        )
    except (RegistryUnavailableError, FileNotFoundError) as err:
        _fail(err)
    console.print(f"registered {result.model_uri} ({result.alias_uri}), run {result.run_id}")


@app.command()
def run(
    config: ConfigOpt,
    set_: SetOpt = None,
    generate_data: Annotated[bool, typer.Option("--generate", help="generate logs first")] = False,
) -> None:
    """All stages: (generate ->) ingest -> train -> evaluate -> register, then a summary table."""
    from features.validate import DataValidationError
    from pipeline.registry import RegistryUnavailableError
    from pipeline.resources import CLUSTER_ERRORS
    from pipeline.run import run_pipeline

    _quiet_libraries()
    cfg = _load(config, set_)
    started = time.perf_counter()
    try:
        result = run_pipeline(cfg, with_generate=generate_data)
    except (DataValidationError, RegistryUnavailableError) as err:
        _fail(err)
    except CLUSTER_ERRORS as err:
        _fail(err)
    c = result.ingested.total_counts()
    console.print(
        f"data: read {c.rows_read:,} = used {c.rows_used:,} + quarantined {c.rows_quarantined:,}; "
        f"train {result.trained.steps} steps at {result.trained.samples_per_s:,.0f} samples/s"
    )
    print_summary(result.evaluated, result.registered)
    console.print(f"done in {time.perf_counter() - started:.0f}s")


@app.command()
def promote(
    config: ConfigOpt,
    set_: SetOpt = None,
    version: Annotated[str | None, typer.Option("--version", help="version to judge; default: the challenger")] = None,
    force: Annotated[bool, typer.Option("--force", help="make it champion whatever the gate says")] = False,
    fail_on_reject: Annotated[bool, typer.Option("--fail-on-reject", help="exit 3 when rejected")] = False,
) -> None:
    """Promotion gate: challenger vs champion on the same evaluation window; moves 'champion' on a pass.

    Every gated metric must be within promotion.thresholds. The decision is recorded as tags on both versions; the
    first model becomes champion when there is none."""
    from pipeline.promote import PromotionError
    from pipeline.promote import promote as run_promote
    from pipeline.registry import RegistryUnavailableError

    _quiet_libraries()
    cfg = _load(config, set_)
    try:
        result = run_promote(cfg, version=version, force=force)
    except (PromotionError, RegistryUnavailableError) as err:
        _fail(err)
    print_promotion(result)
    if fail_on_reject and result.decision == "rejected":
        raise typer.Exit(3)


def print_promotion(result: object) -> None:
    from pipeline.promote import PromotionResult

    assert isinstance(result, PromotionResult)
    if result.checks:
        table = Table(title=f"Gate: v{result.challenger_version} vs champion v{result.champion_before}")
        for col in ("metric", "challenger", "champion", "drop", "max drop", ""):
            table.add_column(col, justify="left" if col == "metric" else "right")
        for c in result.checks:
            cells = [c["challenger"], c["champion"], c["drop"]]
            shown = ["-" if v is None else f"{v:.4f}" for v in cells]
            table.add_row(c["key"], *shown, f"{c['max_drop']:.4f}", "ok" if c["passed"] else "[red]FAIL[/red]")
        console.print(table)
    colour = {"promoted": "green", "rejected": "red", "unchanged": "yellow"}[result.decision]
    console.print(
        f"[{colour}]{result.decision}[/{colour}]: {result.model_name} champion is version {result.champion_after} "
        f"({result.reason})",
        highlight=False,
    )


@app.command()
def daily(
    config: ConfigOpt,
    set_: SetOpt = None,
    date: Annotated[
        str | None, typer.Option("--date", help="evaluation day YYYY-MM-DD (default: the latest partition)")
    ] = None,
) -> None:
    """Scheduled job: train, register a challenger, run the promotion gate, write a report for one day.

    Trains on the last daily.train_days partitions before the day, warm-started from the champion. Re-running a day
    duplicates nothing (and finishes what an interrupted run left)."""
    from features.validate import DataValidationError
    from jobs.daily import DailyError, run_daily
    from pipeline.promote import PromotionError
    from pipeline.registry import RegistryUnavailableError
    from pipeline.resources import CLUSTER_ERRORS

    _quiet_libraries()
    cfg = _load(config, set_)
    try:
        report = run_daily(cfg, date)
    except (DailyError, DataValidationError, PromotionError, RegistryUnavailableError) as err:
        _fail(err)
    except CLUSTER_ERRORS as err:
        _fail(err)
    console.print(f"daily {report.date}: {report.status}, version {report.version} ({report.model_uri})")
    for stage, took in report.stages.items():
        console.print(f"  {stage}: {took}", highlight=False)
    if report.promotion:
        p = report.promotion
        console.print(f"promotion: {p['decision']}: champion is version {p['champion_after']} ({p['reason']})")
    console.print(f"report -> {Path(report.run_dir) / 'daily_report.md'}")


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

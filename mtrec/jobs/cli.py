"""The ``mtrec`` command line. Every command takes ``--config`` and dotted ``--set`` overrides; stages read the
previous stages' outputs from the run directory, so they can run one by one or all together with ``run``."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from mtrec.config import ConfigError, ExperimentConfig, load_config
from mtrec.features.spec import SpecError

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
    from mtrec.pipeline.evaluate import EvalResult
    from mtrec.pipeline.register import RegisterResult

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


def _fail(err: Exception) -> None:
    console.print(f"[red]error:[/red] {err}", markup=True, highlight=False)
    raise typer.Exit(1) from None


@app.command()
def generate(config: ConfigOpt, set_: SetOpt = None) -> None:
    """Write generated behaviour logs (dt=YYYY-MM-DD/part-*.parquet) and the oracle file."""
    from mtrec.pipeline.run import generate as run_generate

    cfg = _load(config, set_)
    result = run_generate(cfg)
    console.print(
        f"generated {result.rows:,} rows in {len(result.files)} files over {len(result.dates)} days "
        f"in {result.seconds:.1f}s -> {cfg.data.path}; oracle -> {result.oracle_path}"
    )


@app.command()
def ingest(config: ConfigOpt, set_: SetOpt = None) -> None:
    """Validate the logs against the feature spec, quarantine bad rows, compute training statistics."""
    from mtrec.features.validate import DataValidationError
    from mtrec.pipeline.ingest import ingest as run_ingest

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
def train(config: ConfigOpt, set_: SetOpt = None) -> None:
    """Train on the ingested window with Ray Train + TorchRec DistributedModelParallel."""
    from mtrec.pipeline.ingest import IngestResult
    from mtrec.pipeline.train import train as run_train

    _quiet_libraries()
    cfg = _load(config, set_)
    result = run_train(cfg, IngestResult.load(cfg.run_dir.resolve() / "ingest.json"))
    console.print(
        f"trained {result.steps} steps, {result.samples:,} samples, {result.samples_per_s:,.0f} samples/s "
        f"-> {result.model_dir}"
    )


@app.command()
def evaluate(config: ConfigOpt, set_: SetOpt = None) -> None:
    """Score the evaluation window and print per-task metrics beside the oracle."""
    from mtrec.pipeline.evaluate import evaluate as run_evaluate
    from mtrec.pipeline.ingest import IngestResult
    from mtrec.pipeline.train import TrainResult

    cfg = _load(config, set_)
    run_dir = cfg.run_dir.resolve()
    result = run_evaluate(cfg, IngestResult.load(run_dir / "ingest.json"), TrainResult.load(run_dir / "train.json"))
    print_summary(result, None)


@app.command()
def register(config: ConfigOpt, set_: SetOpt = None) -> None:
    """Log the run to MLflow and register the model as a new version with the 'challenger' alias."""
    from mtrec.pipeline.evaluate import EvalResult
    from mtrec.pipeline.ingest import IngestResult
    from mtrec.pipeline.register import register as run_register
    from mtrec.pipeline.train import TrainResult

    _quiet_libraries()
    cfg = _load(config, set_)
    run_dir = cfg.run_dir.resolve()
    result = run_register(
        cfg,
        IngestResult.load(run_dir / "ingest.json"),
        TrainResult.load(run_dir / "train.json"),
        EvalResult.load(run_dir / "eval.json"),
    )
    console.print(f"registered {result.model_uri} ({result.alias_uri}), run {result.run_id}")


@app.command()
def run(
    config: ConfigOpt,
    set_: SetOpt = None,
    generate_data: Annotated[bool, typer.Option("--generate", help="generate logs first")] = False,
) -> None:
    """All stages: [generate] -> ingest -> train -> evaluate -> register, then a summary table."""
    from mtrec.features.validate import DataValidationError
    from mtrec.pipeline.run import run_pipeline

    _quiet_libraries()
    cfg = _load(config, set_)
    started = time.perf_counter()
    try:
        result = run_pipeline(cfg, with_generate=generate_data)
    except DataValidationError as err:
        _fail(err)
    c = result.ingested.total_counts()
    console.print(
        f"data: read {c.rows_read:,} = used {c.rows_used:,} + quarantined {c.rows_quarantined:,}; "
        f"train {result.trained.steps} steps at {result.trained.samples_per_s:,.0f} samples/s"
    )
    print_summary(result.evaluated, result.registered)
    console.print(f"done in {time.perf_counter() - started:.0f}s")


def main() -> None:
    app(prog_name="mtrec")


if __name__ == "__main__":
    main()

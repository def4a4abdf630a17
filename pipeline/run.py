"""All stages in order, each a plain function over the previous stages' typed outputs, and the one-line summary of
each stage's result that the command line prints."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from features.generator import GenerationResult, generate_logs
from pipeline.config import ExperimentConfig
from pipeline.evaluate import EvalResult, evaluate
from pipeline.ingest import IngestResult, ingest
from pipeline.progress import SILENT_REPORTER, StageReporter
from pipeline.register import RegisterResult, register
from pipeline.resources import check_cluster
from pipeline.train import TrainResult, train


@dataclass(frozen=True)
class PipelineResult:
    ingested: IngestResult
    trained: TrainResult
    evaluated: EvalResult
    registered: RegisterResult
    generated: GenerationResult | None = None


def generate(cfg: ExperimentConfig) -> GenerationResult:
    oracle = cfg.data.oracle_path or (cfg.run_dir / "oracle.parquet")
    return generate_logs(cfg.generator, Path(cfg.data.path), Path(oracle))


def _days(dates: list[str]) -> str:
    return f"{len(dates)} day{'s' if len(dates) != 1 else ''}"


def date_span(dates: list[str]) -> str:
    """The dates as a reader wants them on one line: listed when few, else first .. last and the count."""
    if len(dates) <= 3:
        return ", ".join(dates)
    return f"{dates[0]} .. {dates[-1]} ({len(dates)} days)"


def describe_generated(r: GenerationResult) -> str:
    return f"{r.rows:,} rows in {len(r.files)} files over {len(r.dates)} days; oracle -> {r.oracle_path}"


def describe_ingested(r: IngestResult) -> str:
    c, tr, ev = r.total_counts(), r.counts_of("train"), r.counts_of("eval")
    reasons = ", ".join(f"{k} {v:,}" for k, v in sorted(c.by_reason.items()))
    validation = ""
    if r.validation_dates:
        validation = f"validation {r.counts_of('validation').rows_used:,} rows over {_days(r.validation_dates)}, "
    files = len(r.train_files) + len(r.validation_files) + len(r.eval_files)
    cached = ""
    if r.validation_cache:
        cached = f" ({r.files_from_cache} of {files} files validated before, read from the cache)"
    return (
        f"read {c.rows_read:,} = used {c.rows_used:,} + quarantined {c.rows_quarantined:,}{cached}"
        f"{f' ({reasons})' if reasons else ''}; train {tr.rows_used:,} rows over {_days(r.train_dates)}, "
        f"{validation}eval {ev.rows_used:,} rows over {_days(r.eval_dates)}"
    )


def describe_trained(r: TrainResult) -> str:
    losses = " ".join(f"{k} {v:.4f}" for k, v in r.final_losses.items() if k != "total")
    resumed = f", resumed from step {r.resumed_from_step}" if r.resumed_from_step else ""
    kept = ""
    if r.validation:
        watched = r.validation[-1]["watched"]
        best = next((v["value"] for v in r.validation if v["epoch"] == r.best_epoch), float("nan"))
        stopped = ", stopped early" if r.stopped_early else ""
        kept = f"; kept epoch {r.best_epoch} of {r.epochs}{stopped} (validation {watched} {best:.4f})"
    steady = f" (steady state {r.steady_samples_per_s:,.0f})" if r.steady_samples_per_s else ""
    startup = f", start-up {r.startup['total_s']:.1f} s" if r.startup else ""
    startup += f", wind-down {r.wind_down['total_s']:.1f} s" if r.wind_down else ""
    return (
        f"{r.steps:,} steps, {r.samples:,} samples at {r.samples_per_s:,.0f} samples/s{steady} on {r.world_size} "
        f"workers{startup}{resumed}; final losses {losses}{kept}"
    )


def describe_evaluated(r: EvalResult) -> str:
    return f"{r.rows:,} rows of {date_span(r.eval_dates)}"


def describe_registered(r: RegisterResult) -> str:
    return f"{r.model_uri} ({r.alias_uri})"


def run_pipeline(
    cfg: ExperimentConfig,
    with_generate: bool = False,
    reporter: StageReporter = SILENT_REPORTER,
    fresh: bool = False,
) -> PipelineResult:
    """All stages; training continues from this run folder's checkpoints of the same config and data (``fresh``:
    start over, the old checkpoints moved aside). ``with_generate`` rewrites the logs first, so it trains fresh too:
    checkpoints of logs that no longer exist are no place to continue from."""
    check_cluster(cfg)  # a cluster too small for training fails now, not after generation and ingest
    cfg.run_dir.mkdir(parents=True, exist_ok=True)
    generated = None
    if with_generate:
        with reporter.stage("generate") as p:
            generated = generate(cfg)
            p.done(describe_generated(generated))
    with reporter.stage("ingest") as p:
        ingested = ingest(cfg, progress=p)
        p.done(describe_ingested(ingested))
    with reporter.stage("train") as p:
        trained = train(cfg, ingested, fresh=fresh or with_generate, progress=p)
        p.done(describe_trained(trained))
    with reporter.stage("evaluate") as p:
        evaluated = evaluate(cfg, ingested, trained)
        p.done(describe_evaluated(evaluated))
    with reporter.stage("register") as p:
        registered = register(cfg, ingested, trained, evaluated)
        p.done(describe_registered(registered))
    return PipelineResult(ingested, trained, evaluated, registered, generated)

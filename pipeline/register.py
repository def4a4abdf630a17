"""Register stage: one MLflow run with the resolved config, data and quarantine counts, metrics, a model card and plots;
the model logged as a pyfunc (unsharded weights + the feature transform) and registered as a new version with tags and
the ``challenger`` alias. Works against the embedded SQLite store and an ``mlflow server`` over HTTP alike.

Registering is idempotent and resumable. The key is the hash of the trained weights (``model_hash`` tag on the run
and the version): a version that already carries it is returned as is (finished first if an earlier attempt stopped
half-way), a finished run that already logged the model is reused, and a half-logged run is marked FAILED and redone.
So the whole stage can simply be retried: on connection errors it is, with exponential backoff
(``registry.retries``/``backoff_s``); when the server stays down it fails with a message naming the tracking URI
(without credentials) and where the trained model stays on disk, and ``mtrec register`` later finishes the job.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar
from urllib.parse import urlsplit

import mlflow
import pyarrow.parquet as pq
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from models.gradients import head_config
from models.io import MODEL_FILE, WEIGHTS_FILE, model_hash
from pipeline.config import ExperimentConfig, loggable_config
from pipeline.evaluate import EvalResult
from pipeline.gate import gate
from pipeline.ingest import IngestResult
from pipeline.lineage import check_stage_results
from pipeline.promote import compare_with_champion
from pipeline.pyfunc import MODEL_DIR_ARTIFACT, SERVING_MODULES, feature_columns, model_signature
from pipeline.registry import (
    CHALLENGER,
    MODEL_HASH_TAG,
    call_with_retries,
    http_settings,
    is_transient,
    redact,
    registry_client,
    versions_with_tag,
)
from pipeline.report import GRADIENT_DIAGNOSTICS_FILE, CardInputs, model_card, summary_card, write_plots
from pipeline.results import StageResult
from pipeline.train import TrainResult

if TYPE_CHECKING:
    from mlflow.entities.model_registry import ModelVersion

log = logging.getLogger(__name__)

COMPLETE_TAG = "registration"  # "complete" once description, alias and tags are all set
LOGGED_MODEL_TAG = "mtrec.logged_model_uri"  # on the run, once the pyfunc is logged
# The files of the model folder that serving needs; the DCP checkpoint (sharded training state) stays out of the
# registry: it doubles the upload and is only useful to resume that one training run.
SERVING_FILES = (
    WEIGHTS_FILE,
    MODEL_FILE,
    "plan.json",
    "training_curve.json",
    "summary.json",
    GRADIENT_DIAGNOSTICS_FILE,
)
REPO_ROOT = Path(__file__).resolve().parents[1]
# What the served model imports from PyPI, pinned to the versions that trained it. The served model is the torch.nn
# export (no TorchRec, no FBGEMM) and our own code travels as code_paths (only SERVING_MODULES), so the requirements
# name no distribution of this project and nothing that needs CUDA: plain pip installs them on a CPU machine.
SERVING_DISTRIBUTIONS = (
    "torch",
    "numpy",
    "pandas",
    "pyarrow",
    "safetensors",
    "pydantic",
    "pyyaml",
    "mlflow",
)
QUARANTINE_SAMPLE = "quarantine_sample.parquet"  # run artifact data/<this>; the full file stays in run_dir
_DESCRIPTION_LIMIT = 4500  # MLflow stores version descriptions in a 5000-character column

T = TypeVar("T")


@dataclass(frozen=True)
class RegisterResult(StageResult):
    STAGE: ClassVar[str] = "register"

    run_id: str
    model_name: str
    version: str
    model_uri: str  # models:/<name>/<version>
    alias_uri: str  # models:/<name>@challenger
    tracking_uri: str  # credentials removed


# ---------------------------------------------------------------------------------------------------------------------
# Registering


def serving_requirements() -> list[str]:
    """``name==version`` for each distribution the served model imports, as installed here (local build tags such
    as ``+cpu`` dropped: an index serves the plain version)."""
    from importlib.metadata import PackageNotFoundError, version

    pins = []
    for name in SERVING_DISTRIBUTIONS:
        try:
            pins.append(f"{name}=={version(name).split('+')[0]}")
        except PackageNotFoundError:
            continue
    return pins


def serving_code(out: Path) -> list[str]:
    """The project's packages as the served model needs them: ``SERVING_MODULES`` copied under ``out`` (one folder
    per package, for MLflow's ``code_paths``); the training code (TorchRec, Ray) stays out."""
    packages: list[str] = []
    for module in SERVING_MODULES:
        target = out / module
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO_ROOT / module, target)
        if str(target.parent) not in packages:
            packages.append(str(target.parent))
    return packages


def code_revision() -> str:
    """Git commit of the code that trained (``-dirty`` with local changes); MTREC_CODE_REVISION wins, for images."""
    if os.environ.get("MTREC_CODE_REVISION"):
        return os.environ["MTREC_CODE_REVISION"]
    repo = REPO_ROOT
    try:
        rev = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True, check=True, timeout=10
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=repo,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
        return rev + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


_PARAM_KEY = re.compile(r"^[\w\-. /:]+$")


def flat_params(data: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested config -> dotted MLflow params. A mapping whose keys are not valid param names (``*.auc``) is one
    JSON-valued param."""
    out: dict[str, str] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and all(_PARAM_KEY.match(str(k)) for k in value):
            out.update(flat_params(value, f"{name}."))
        elif isinstance(value, dict | list):
            out[name] = json.dumps(value, sort_keys=True)
        else:
            out[name] = str(value)
    return out


def _metric_key(*parts: str) -> str:
    return ".".join(parts)


def _experiment_id(client: MlflowClient, cfg: ExperimentConfig) -> str:
    exp = client.get_experiment_by_name(cfg.mlflow.experiment)
    if exp is not None:
        if exp.lifecycle_stage == "deleted":
            client.restore_experiment(exp.experiment_id)
        return str(exp.experiment_id)
    remote = urlsplit(cfg.tracking_uri()).scheme in ("http", "https")
    if remote and cfg.mlflow.artifact_location is None:
        # A server decides where artifacts go (its --artifacts-destination, proxied): a local path here would put
        # them on this machine only, out of reach of everyone else using the server.
        return str(client.create_experiment(cfg.mlflow.experiment))
    return str(client.create_experiment(cfg.mlflow.experiment, artifact_location=cfg.artifact_location()))


def _serving_dir(cfg: ExperimentConfig, model_dir: Path) -> Path:
    """A copy of the model folder with only what serving needs (see SERVING_FILES)."""
    out = cfg.run_dir.resolve() / "serving_model"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    for name in SERVING_FILES:
        if (model_dir / name).exists():
            shutil.copy2(model_dir / name, out / name)
    return out


def _find_logged_run(client: MlflowClient, experiment_id: str, key: str) -> tuple[str, str] | None:
    """A finished run that already logged this model (run id, logged model URI). Runs an earlier attempt left
    half-done are marked FAILED so they do not look alive in the UI."""
    runs = client.search_runs([experiment_id], filter_string=f"tags.{MODEL_HASH_TAG} = '{key}'")
    found: tuple[str, str] | None = None
    for run in runs:
        logged = run.data.tags.get(LOGGED_MODEL_TAG)
        if run.info.status == "FINISHED" and logged and found is None:
            found = (run.info.run_id, logged)
        elif run.info.status == "RUNNING":
            client.set_terminated(run.info.run_id, "FAILED")
    return found


def register(
    cfg: ExperimentConfig,
    ingested: IngestResult,
    trained: TrainResult,
    evaluated: EvalResult,
    extra_tags: dict[str, str] | None = None,
) -> RegisterResult:
    """Log and register the trained model (idempotent, retried); ``extra_tags`` go on the run and the version.

    Refuses (:class:`StageMismatchError`, before contacting the registry) stage results that do not describe the
    same data and weights, and an untrained model."""
    check_stage_results(ingested, trained, evaluated)
    on_failure = (
        f"The trained model and its evaluation remain on disk at {trained.model_dir} "
        f"(run directory {cfg.run_dir.resolve()}); run `mtrec register` with the same config when the server is "
        "back to finish registering."
    )
    with http_settings(cfg):
        result = call_with_retries(
            lambda: _register_once(cfg, ingested, trained, evaluated, extra_tags or {}),
            cfg,
            "register the model",
            on_failure,
        )
    result.save(cfg.run_dir.resolve() / "register.json")
    return result


def _register_once(
    cfg: ExperimentConfig,
    ingested: IngestResult,
    trained: TrainResult,
    evaluated: EvalResult,
    extra_tags: dict[str, str],
) -> RegisterResult:
    client = registry_client(cfg)
    name = cfg.mlflow.model_name
    key = model_hash(trained.model_dir)
    existing = versions_with_tag(client, name, MODEL_HASH_TAG, key)
    if existing:
        version = existing[0]
        print(f"[register] model {key} is already version {version.version} of {name}: nothing new registered")
    else:
        experiment_id = _experiment_id(client, cfg)
        logged = _find_logged_run(client, experiment_id, key)
        if logged is None:
            logged = _log_run(client, cfg, experiment_id, key, ingested, trained, evaluated, extra_tags)
        run_id, model_uri = logged
        version = mlflow.register_model(
            model_uri,
            name,
            tags={
                "data_window": f"{ingested.train_dates[0]}..{ingested.train_dates[-1]}",
                "eval_window": ",".join(ingested.eval_dates),
                "data_hash": ingested.data_hash,
                "config_hash": cfg.fingerprint(),
                "code_revision": code_revision(),
                "run_id": run_id,
                MODEL_HASH_TAG: key,
                **extra_tags,
            },
        )
    if version.tags.get(COMPLETE_TAG) != "complete":
        _finish_version(client, cfg, version)
    return RegisterResult(
        run_id=str(version.run_id),
        model_name=name,
        version=str(version.version),
        model_uri=f"models:/{name}/{version.version}",
        alias_uri=f"models:/{name}@{CHALLENGER}",
        tracking_uri=redact(cfg.tracking_uri()),
    )


def _finish_version(client: MlflowClient, cfg: ExperimentConfig, version: ModelVersion) -> None:
    """Description (the card's summary), the challenger alias, then the completion tag: in this order, so a version
    without the tag is known to need these steps (each is safe to repeat)."""
    name, number = version.name, str(version.version)
    summary_path = "card/summary.md"
    try:
        local = mlflow.artifacts.download_artifacts(run_id=version.run_id, artifact_path=summary_path)
        summary = Path(local).read_text()
    except MlflowException as err:
        if is_transient(err):
            raise
        summary = "Model card: see the run's card/model_card.md artifact."
    description = f"**{name} version {number}**\n\n{summary}"
    if len(description) > _DESCRIPTION_LIMIT:
        description = description[: _DESCRIPTION_LIMIT - 80] + "\n\n(truncated: see card/model_card.md in the run)"
    client.update_model_version(name, number, description=description)
    client.set_registered_model_alias(name, CHALLENGER, number)
    client.set_model_version_tag(name, number, COMPLETE_TAG, "complete")
    print(f"[register] {name} version {number} registered, alias {CHALLENGER}")


def _quarantine_sample(path: Path, rows: int, out: Path) -> tuple[int, int]:
    """Up to ``rows`` quarantined rows, spread over the rejection reasons, written to ``out``; returns (rows written,
    rows quarantined). Raw user rows leave the run directory only as this small sample."""
    import polars as pl

    from features.validate import REASON_COLUMN

    if not path.exists():
        return 0, 0
    total = pq.ParquetFile(path).metadata.num_rows
    if rows == 0 or total == 0:
        return 0, total
    frame = pl.read_parquet(path)
    # Round-robin over the reasons: the k-th row of every reason before the (k+1)-th of any.
    turn = pl.int_range(pl.len()).over(REASON_COLUMN).alias("_turn")
    sample = frame.with_columns(turn).sort("_turn", maintain_order=True).head(rows).drop("_turn")
    out.parent.mkdir(parents=True, exist_ok=True)
    sample.write_parquet(out)
    return sample.height, total


def _log_gradient_diagnostics(client: MlflowClient, run_id: str, model_dir: Path) -> None:
    """The gradient method's sampled diagnostics (DRGrad xi1, xi2, lam1, lam2, mu, conflict share; PCGrad cosines;
    uncertainty weights) as metric series ``gradients.<method>.<name>`` over training steps, in batches."""
    from mlflow.entities import Metric

    path = model_dir / "gradient_diagnostics.json"
    points: list[dict[str, float]] = json.loads(path.read_text()) if path.exists() else []
    now = int(time.time() * 1000)
    metrics = [
        Metric(f"gradients.{k.replace('/', '.')}", float(v), now, int(point["step"]))
        for point in points
        for k, v in point.items()
        if k != "step"
    ]
    for start in range(0, len(metrics), 1000):  # the tracking server's batch limit
        client.log_batch(run_id, metrics=metrics[start : start + 1000])


def _log_run(
    client: MlflowClient,
    cfg: ExperimentConfig,
    experiment_id: str,
    key: str,
    ingested: IngestResult,
    trained: TrainResult,
    evaluated: EvalResult,
    extra_tags: dict[str, str],
) -> tuple[str, str]:
    """One run with everything a reviewer needs, ending with the logged pyfunc; returns (run id, model URI)."""
    import tempfile

    spec = cfg.feature_spec()
    counts = ingested.total_counts()
    data_window = f"{ingested.train_dates[0]}..{ingested.train_dates[-1]}"
    config = loggable_config(cfg)

    # Before the run starts: scoring the champion on this evaluation window needs no open run, and a failure here
    # (e.g. server down) then leaves nothing half-logged behind.
    comparison, champion_frame, note = compare_with_champion(
        client, cfg, ingested.eval_files, ingested.eval_dates, exclude_hash=key
    )
    preview = gate(
        evaluated.metrics,
        comparison.metrics if comparison else None,
        cfg.promotion.thresholds,
        cfg.promotion.bounds,
    )

    with mlflow.start_run(experiment_id=experiment_id, run_name=f"{cfg.name}-{ingested.eval_dates[-1]}") as run:
        # The key first: a run an interrupted attempt leaves behind is then recognised (and retired) by the next one.
        mlflow.set_tag(MODEL_HASH_TAG, key)
        mlflow.log_params(flat_params(config))
        mlflow.set_tags(
            {
                "data_window": data_window,
                "data_hash": ingested.data_hash,
                "eval_window": ",".join(ingested.eval_dates),
                "config_hash": cfg.fingerprint(),
                "code_revision": code_revision(),
                "feature_spec_hash": spec.fingerprint(),
                "data_window_key": ingested.window_key(),
                **extra_tags,
            }
        )
        metrics: dict[str, float] = {
            "data.rows_read": counts.rows_read,
            "data.rows_used": counts.rows_used,
            "data.rows_quarantined": counts.rows_quarantined,
            "train.steps": trained.steps,
            "train.samples": trained.samples,
            "train.samples_per_s": trained.samples_per_s,
            **({"train.steady_samples_per_s": trained.steady_samples_per_s} if trained.steady_samples_per_s else {}),
            **{f"train.startup.{k}": v for k, v in trained.startup.items()},
            **{f"train.wind_down.{k}": v for k, v in trained.wind_down.items()},
            **{f"train.rows.{k}": v for k, v in trained.rows.items()},
        }
        for name, values in evaluated.metrics.items():
            metrics.update({_metric_key(name, k): v for k, v in values.items()})
        for name, values in evaluated.oracle.items():
            metrics.update({_metric_key("oracle", name, k): v for k, v in values.items()})
        if comparison is not None:
            for name, values in comparison.metrics.items():
                metrics.update({_metric_key("champion", name, k): v for k, v in values.items()})
        # Parameter report per architecture (DTRN beside K x M separate encoders): free on the meta device.
        import torch

        from models.multitask import build_model, parameter_report

        meta_model = build_model(spec, cfg.model, torch.device("meta"), head_config(cfg.gradients))
        report = parameter_report(meta_model, spec, cfg.model)
        metrics.update({f"params.{k}": v for k, v in report.items()})
        if trained.validation:
            metrics.update({"train.best_epoch": trained.best_epoch, "train.epochs": trained.epochs})
            mlflow.log_dict({"validation": trained.validation}, "train/validation_curve.json")

        def log_metrics(model_id: str) -> None:
            """After the model: MLflow links a run's earlier metrics to a newly logged model by fetching each one's
            history (a request per metric, each paying the server's authentication); logged with the model's id,
            they are linked in the same batched requests that log them."""
            mlflow.log_metrics({k: float(v) for k, v in metrics.items()}, model_id=model_id)
            curve = json.loads((Path(trained.model_dir) / "training_curve.json").read_text())
            for point in curve:
                losses = {f"train_loss.{k}": v for k, v in point.items() if k not in ("step", "epoch")}
                mlflow.log_metrics(losses, step=int(point["step"]), model_id=model_id)
            for point in trained.validation:  # the validation window per epoch: the curve that chose the weights
                values = {
                    _metric_key("validation", name, k): float(v)
                    for name, m in point["metrics"].items()
                    for k, v in m.items()
                    if k != "rows"
                }
                mlflow.log_metrics(values, step=int(point["epoch"]), model_id=model_id)
            _log_gradient_diagnostics(client, run.info.run_id, Path(trained.model_dir))

        mlflow.log_dict(config, "config/experiment.json")
        mlflow.log_artifact(str(cfg.features), "config")
        mlflow.log_dict(dict(ingested.counts), "data/counts.json")
        if ingested.window:  # the exact source files the run read
            mlflow.log_dict(ingested.window, "data/window.json")
        mlflow.log_dict(trained.plan, "train/sharding_plan.json")
        mlflow.log_dict(asdict(evaluated), "eval/metrics.json")
        mlflow.log_text(evaluated.format_table(), "eval/summary.txt")
        if comparison is not None:
            mlflow.log_dict(comparison.to_dict(), "eval/champion_comparison.json")
        if preview is not None:
            mlflow.log_dict(preview.to_dict(), "eval/gate_preview.json")

        with tempfile.TemporaryDirectory() as tmp:
            sample_path = Path(tmp) / QUARANTINE_SAMPLE
            sampled, _ = _quarantine_sample(
                Path(ingested.quarantine_path), cfg.mlflow.quarantine_sample_rows, sample_path
            )
            if sampled:
                mlflow.log_artifact(str(sample_path), "data")
            plots = write_plots(
                Path(tmp) / "plots",
                spec=spec,
                predictions_path=Path(evaluated.predictions_path),
                champion_frame=champion_frame,
                metrics=evaluated.metrics,
                champion_metrics=comparison.metrics if comparison else None,
                champion_label=f"champion v{comparison.champion_version}" if comparison else None,
                oracle=evaluated.oracle,
                model_dir=Path(trained.model_dir),
            )
            for path in plots:
                mlflow.log_artifact(str(path), "plots")
            inputs = CardInputs(
                model_name=cfg.mlflow.model_name,
                run_id=run.info.run_id,
                model_hash=key,
                config_hash=cfg.fingerprint(),
                code_revision=code_revision(),
                config=config,
                train_dates=ingested.train_dates,
                eval_dates=ingested.eval_dates,
                counts=dict(ingested.counts),
                trained=trained,
                evaluated=evaluated,
                comparison=comparison,
                comparison_note=note,
                gate=preview,
                plots=[f"plots/{p.name}" for p in plots],
                tags=extra_tags,
                quarantine_sampled=sampled,
                quarantine_path=ingested.quarantine_path,
            )
            mlflow.log_text(model_card(inputs), "card/model_card.md")
            mlflow.log_text(summary_card(inputs), "card/summary.md")

        example = pq.read_table(ingested.eval_files[0], columns=feature_columns(spec)).slice(0, 5).to_pandas()
        with tempfile.TemporaryDirectory() as code:
            info = mlflow.pyfunc.log_model(
                name="model",
                python_model=str(Path(__file__).resolve().parent / "pyfunc_entry.py"),  # models from code: no pickle
                artifacts={MODEL_DIR_ARTIFACT: str(_serving_dir(cfg, Path(trained.model_dir)))},
                code_paths=serving_code(Path(code)),
                pip_requirements=serving_requirements(),
                signature=model_signature(spec),
                input_example=example,
            )
        log_metrics(info.model_id)
        mlflow.set_tag(LOGGED_MODEL_TAG, info.model_uri)
    return run.info.run_id, info.model_uri

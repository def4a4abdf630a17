"""Register stage: one MLflow run with the resolved config, data and quarantine counts, metrics and artifacts; the
model logged as a pyfunc (unsharded weights + the feature transform) and registered as a new version with tags and
the ``challenger`` alias. Works against the embedded SQLite store and an ``mlflow server`` over HTTP alike."""

from __future__ import annotations

import json
import os
import subprocess
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import mlflow
import pyarrow.parquet as pq
from mlflow.tracking import MlflowClient

import mtrec
from mtrec.config import ExperimentConfig
from mtrec.pipeline.evaluate import EvalResult
from mtrec.pipeline.ingest import IngestResult
from mtrec.pipeline.pyfunc import MODEL_DIR_ARTIFACT, feature_columns, model_signature
from mtrec.pipeline.train import TrainResult

CHALLENGER = "challenger"


@dataclass(frozen=True)
class RegisterResult:
    run_id: str
    model_name: str
    version: str
    model_uri: str  # models:/<name>/<version>
    alias_uri: str  # models:/<name>@challenger
    tracking_uri: str

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(asdict(self), indent=2))


def code_revision() -> str:
    """Git commit of the code that trained (``-dirty`` with local changes); MTREC_CODE_REVISION wins, for images."""
    if os.environ.get("MTREC_CODE_REVISION"):
        return os.environ["MTREC_CODE_REVISION"]
    repo = Path(mtrec.__file__).resolve().parent.parent
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


def flat_params(data: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested config -> dotted MLflow params."""
    out: dict[str, str] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flat_params(value, f"{name}."))
        else:
            out[name] = json.dumps(value) if isinstance(value, list) else str(value)
    return out


def _metric_key(*parts: str) -> str:
    return ".".join(parts)


def _experiment_id(client: MlflowClient, cfg: ExperimentConfig) -> str:
    exp = client.get_experiment_by_name(cfg.mlflow.experiment)
    if exp is not None:
        return str(exp.experiment_id)
    return str(client.create_experiment(cfg.mlflow.experiment, artifact_location=cfg.artifact_location()))


def register(
    cfg: ExperimentConfig, ingested: IngestResult, trained: TrainResult, evaluated: EvalResult
) -> RegisterResult:
    tracking_uri = cfg.tracking_uri()
    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_registry_uri(tracking_uri)
    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    experiment_id = _experiment_id(client, cfg)
    spec = cfg.feature_spec()
    counts = ingested.total_counts()
    data_window = f"{ingested.train_dates[0]}..{ingested.train_dates[-1]}"
    config_hash = cfg.fingerprint()
    revision = code_revision()

    with mlflow.start_run(experiment_id=experiment_id, run_name=f"{cfg.name}-{ingested.eval_dates[-1]}") as run:
        # Paths are machine-specific and the config holds no secrets (tracking URIs may: never log them).
        params = flat_params(cfg.model_dump(mode="json", exclude={"mlflow": {"tracking_uri"}}))
        mlflow.log_params(params)
        mlflow.set_tags(
            {
                "data_window": data_window,
                "eval_window": ",".join(ingested.eval_dates),
                "config_hash": config_hash,
                "code_revision": revision,
                "feature_spec_hash": spec.fingerprint(),
            }
        )
        metrics: dict[str, float] = {
            "data.rows_read": counts.rows_read,
            "data.rows_used": counts.rows_used,
            "data.rows_quarantined": counts.rows_quarantined,
            "train.steps": trained.steps,
            "train.samples": trained.samples,
            "train.samples_per_s": trained.samples_per_s,
        }
        for name, values in evaluated.metrics.items():
            metrics.update({_metric_key(name, k): v for k, v in values.items()})
        for name, values in evaluated.oracle.items():
            metrics.update({_metric_key("oracle", name, k): v for k, v in values.items()})
        mlflow.log_metrics({k: float(v) for k, v in metrics.items()})
        for point in json.loads((Path(trained.model_dir) / "training_curve.json").read_text()):
            step = int(point["step"])
            mlflow.log_metrics(
                {f"train_loss.{k}": v for k, v in point.items() if k not in ("step", "epoch")}, step=step
            )
        mlflow.log_dict(cfg.model_dump(mode="json", exclude={"mlflow": {"tracking_uri"}}), "config/experiment.json")
        mlflow.log_artifact(str(cfg.features), "config")
        mlflow.log_dict({split: c for split, c in ingested.counts.items()}, "data/counts.json")
        mlflow.log_artifact(ingested.quarantine_path, "data")
        mlflow.log_dict(trained.plan, "train/sharding_plan.json")
        mlflow.log_dict(asdict(evaluated), "eval/metrics.json")
        mlflow.log_text(evaluated.format_table(), "eval/summary.txt")

        example = pq.read_table(ingested.eval_files[0], columns=feature_columns(spec)).slice(0, 5).to_pandas()
        info = mlflow.pyfunc.log_model(
            name="model",
            python_model=str(Path(__file__).resolve().parent / "pyfunc_entry.py"),  # models from code: no pickle
            artifacts={MODEL_DIR_ARTIFACT: trained.model_dir},
            code_paths=[str(Path(mtrec.__file__).resolve().parent)],
            signature=model_signature(spec),
            input_example=example,
        )
        version = mlflow.register_model(
            info.model_uri,
            cfg.mlflow.model_name,
            tags={
                "data_window": data_window,
                "config_hash": config_hash,
                "code_revision": revision,
                "run_id": run.info.run_id,
            },
        )
    client.set_registered_model_alias(cfg.mlflow.model_name, CHALLENGER, version.version)
    result = RegisterResult(
        run_id=run.info.run_id,
        model_name=cfg.mlflow.model_name,
        version=str(version.version),
        model_uri=f"models:/{cfg.mlflow.model_name}/{version.version}",
        alias_uri=f"models:/{cfg.mlflow.model_name}@{CHALLENGER}",
        tracking_uri=tracking_uri,
    )
    result.save(cfg.run_dir.resolve() / "register.json")
    return result

"""Experiment configuration: one YAML per experiment, validated by pydantic, with dotted overrides.

    cfg = load_config("configs/experiments/demo.yaml", overrides=["train.batch_size=4096"])

Relative paths in the YAML are resolved against the YAML's folder, so a config can be run from any directory.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from mtrec.features.spec import FeatureSpec, load_feature_spec
from mtrec.models.config import ModelConfig


class ConfigError(ValueError):
    """A configuration that cannot be used; the message names the file and the field path."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class GeneratorConfig(_Strict):
    """Built-in behaviour-log generator (a known latent model, so the best reachable AUC is known)."""

    seed: int = 0
    start_date: str = "2026-01-01"
    num_days: int = Field(default=4, ge=2)
    impressions_per_day: int = Field(default=50_000, gt=0)
    num_users: int = Field(default=5_000, gt=0)
    num_items: int = Field(default=20_000, gt=0)
    num_categories: int = Field(default=200, gt=0)
    num_sellers: int = Field(default=2_000, gt=0)
    latent_dim: int = Field(default=8, gt=0)
    files_per_day: int = Field(default=2, gt=0)
    conflict: float = Field(
        default=0.5, ge=0, le=1, description="share/strength of click-bait items: 0 = aligned tasks"
    )
    max_seq_length: int = Field(default=50, gt=0, description="cap on each behaviour sequence written to the logs")


class DataConfig(_Strict):
    path: Path = Field(default=Path("runs/demo/logs"), description="root of dt=YYYY-MM-DD/part-*.parquet")
    oracle_path: Path | None = Field(default=None, description="oracle Parquet (request id -> true probabilities)")
    oracle_columns: dict[str, str] = Field(
        default_factory=dict, description="prediction name (task, or parent_child for ESMM) -> oracle column"
    )
    train_days: int | None = Field(
        default=None, ge=1, description="last N partitions before the eval window; all if unset"
    )
    eval_days: int = Field(default=1, ge=1)
    max_bad_fraction: float = Field(default=0.01, ge=0, le=1, description="fail the run above this quarantined share")


class TrainConfig(_Strict):
    num_workers: int = Field(default=2, ge=1)
    use_gpu: bool = False
    cpus_per_worker: int = Field(default=1, ge=1)
    batch_size: int = Field(default=1024, gt=0)
    epochs: int = Field(default=1, ge=1)
    dense_lr: float = Field(default=1e-3, gt=0)
    embedding_lr: float = Field(default=0.05, gt=0)
    embedding_optimizer: Literal["rowwise_adagrad", "adam", "sgd"] = "rowwise_adagrad"
    seed: int = 0
    log_every: int = Field(default=50, gt=0)
    shuffle: Literal["none", "local"] = "local"
    local_shuffle_buffer: int = Field(default=20_000, gt=0)
    max_steps: int | None = Field(default=None, ge=1, description="stop early (tests, smoke runs)")


class EvalConfig(_Strict):
    batch_size: int = Field(default=8192, gt=0)


class MlflowConfig(_Strict):
    tracking_uri: str | None = Field(default=None, description="unset: sqlite:///<run_dir>/mlflow.db")
    artifact_location: str | None = Field(default=None, description="unset: <run_dir>/mlartifacts")
    experiment: str = "mtrec"
    model_name: str = "mtrec-multitask"


class ExperimentConfig(_Strict):
    name: str = "experiment"
    run_dir: Path = Path("runs/demo")
    features: Path = Field(description="feature spec YAML")
    generator: GeneratorConfig = GeneratorConfig()
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()
    mlflow: MlflowConfig = MlflowConfig()

    def feature_spec(self) -> FeatureSpec:
        return load_feature_spec(self.features)

    def tracking_uri(self) -> str:
        return self.mlflow.tracking_uri or f"sqlite:///{(self.run_dir / 'mlflow.db').resolve()}"

    def artifact_location(self) -> str:
        return self.mlflow.artifact_location or (self.run_dir / "mlartifacts").resolve().as_uri()

    def fingerprint(self) -> str:
        """Hash of the resolved config and the feature spec's content (paths excluded, they differ per machine)."""
        body = self.model_dump(
            mode="json", exclude={"run_dir": True, "data": {"path", "oracle_path"}, "features": True}
        )
        body["feature_spec"] = self.feature_spec().fingerprint()
        return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:12]


def _set_dotted(data: dict[str, Any], dotted: str, source: str) -> None:
    if "=" not in dotted:
        raise ConfigError(f"override '{dotted}' must look like section.field=value")
    key, raw = dotted.split("=", 1)
    parts = key.strip().split(".")
    node = data
    for p in parts[:-1]:
        child = node.setdefault(p, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override '{dotted}': '{p}' in {source} is not a section")
        node = child
    node[parts[-1]] = yaml.safe_load(raw)  # YAML scalars: 4096 -> int, true -> bool, [1,2] -> list


def parse_config(data: dict[str, Any], source: str = "<dict>", overrides: list[str] | None = None) -> ExperimentConfig:
    data = json.loads(json.dumps(data))  # deep copy of plain data
    for o in overrides or []:
        _set_dotted(data, o, source)
    try:
        return ExperimentConfig.model_validate(data)
    except ValidationError as err:
        lines = [f"invalid config {source}:"]
        for e in err.errors():
            loc = ".".join(str(p) for p in e["loc"]) or "<root>"
            lines.append(f"  {loc}: {e['msg']} (got {e.get('input')!r})")
        raise ConfigError("\n".join(lines)) from None


def load_config(path: str | Path, overrides: list[str] | None = None) -> ExperimentConfig:
    """Load an experiment YAML; relative paths resolve against the working directory where the run is started.

    ``features`` resolves against the YAML's own folder (it sits beside the experiment configs); run paths
    (``run_dir``, ``data.path``) resolve against the current directory so ``--set run_dir=...`` behaves as typed.
    """
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise ConfigError(f"config not found: {path}") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"config {path} is not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config {path} must be a mapping at the top level")
    if isinstance(data.get("features"), str) and not Path(data["features"]).is_absolute():
        data["features"] = str((path.parent / data["features"]).resolve())
    cfg = parse_config(data, str(path), overrides)
    cfg.feature_spec()  # fail early, naming the spec file, if it is broken
    return cfg

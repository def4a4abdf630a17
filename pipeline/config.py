"""Experiment configuration: one YAML per experiment, validated by pydantic, with dotted overrides.

    cfg = load_config("configs/experiments/demo.yaml", overrides=["train.batch_size=4096"])

Relative paths in the YAML are resolved against the YAML's folder, so a config can be run from any directory.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator

from features.generator import GeneratorConfig
from features.spec import FeatureSpec, load_feature_spec
from features.validate import SUCCESS_MARKER
from models.config import ModelConfig
from models.gradients import GradientConfig

_USERINFO = re.compile(r"(?<=//)[^/@\s]+@")


def redact(text: str) -> str:
    """Remove ``user:password@`` from every URL in ``text`` (MLflow's own errors quote the full request URL)."""
    return _USERINFO.sub("***@", text)


class ConfigError(ValueError):
    """A configuration that cannot be used; the message names the file and the field path."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


_PATH_NAME = re.compile(r"[A-Za-z0-9._-]+")


def _path_name(value: str) -> str:
    """Names that become parts of paths (run folders, Ray Train run names): no separators, no "..", nothing a
    shell or a recursive delete could misread."""
    if not _PATH_NAME.fullmatch(value) or value in (".", ".."):
        raise ValueError(f"{value!r} is used in paths: only letters, digits, '-', '_' and '.' (not '.' or '..')")
    return value


PathName = Annotated[str, AfterValidator(_path_name)]


class CompletenessConfig(_Strict):
    """When a ``dt=`` partition counts as written. ``marker``: the writer's marker file is in the folder (Spark,
    Hive and most log writers emit ``_SUCCESS``); ``min_rows``: its Parquet files hold at least ``min_rows`` rows
    (read from the footers); ``next_partition``: a later partition exists (the writer moved on)."""

    rule: Literal["marker", "min_rows", "next_partition"] = "marker"
    marker: PathName = SUCCESS_MARKER
    min_rows: int = Field(default=1, ge=1)


class DataConfig(_Strict):
    path: Path = Field(default=Path("runs/demo/data"), description="root of dt=YYYY-MM-DD/part-*.parquet")
    oracle_path: Path | None = Field(default=None, description="oracle Parquet (request id -> true probabilities)")
    oracle_columns: dict[str, str] = Field(
        default_factory=dict, description="prediction name (task, or parent_child for ESMM) -> oracle column"
    )
    train_days: int | None = Field(
        default=None, ge=1, description="last N partitions before the eval window; all if unset"
    )
    eval_days: int = Field(default=1, ge=1)
    validation_days: int = Field(
        default=0,
        ge=0,
        description="the last N partitions before the eval window: scored at every epoch end, never trained on; the "
        "best epoch's weights are kept (train.validation). 0: no validation window",
    )
    max_bad_fraction: float = Field(default=0.01, ge=0, le=1, description="fail the run above this quarantined share")
    validation_cache: Path | None = Field(
        default=None,
        description="folder of per-file validation results, keyed by the file's identity (resolved path, size, "
        "modification time) and the feature spec: a file validated before is not read again and its clean rows are "
        "read from the cache (no copy per run); a changed file is validated again. Unset: every run validates every "
        "file into its run folder. The daily job uses <daily run root>/validation_cache when unset",
    )
    complete: CompletenessConfig = CompletenessConfig()

    @property
    def window_train_days(self) -> int | None:
        """Partitions before the eval window that the window resolves: the training days plus the validation days."""
        return None if self.train_days is None else self.train_days + self.validation_days


ShardingType = Literal["table_wise", "row_wise", "column_wise", "table_row_wise", "data_parallel"]


class ShardingConfig(_Strict):
    """TorchRec planner inputs. ``tables`` pins a table to sharding types (the planner picks among them); tables not
    listed are the planner's choice. ``memory_per_worker_gb`` caps what the planner may place on one worker."""

    tables: dict[str, list[ShardingType]] = Field(default_factory=dict)
    memory_per_worker_gb: float | None = Field(default=None, gt=0)


class ValidationConfig(_Strict):
    """What the validation window (``data.validation_days``) decides: the epoch whose weights are kept, and when to
    stop. ``epochs`` is then an upper bound."""

    metric: str | None = Field(
        default=None,
        description="'<task>.<metric>' watched at each epoch end (auc or logloss for a binary task or an ESMM "
        "product, rmse for a regression task); default: the first binary task's auc (else the first task's rmse)",
    )
    patience: int | None = Field(
        default=None, ge=1, description="stop after this many epochs without a gain; unset: run every epoch"
    )
    min_delta: float = Field(default=0.0, ge=0, description="a gain smaller than this does not count")


class TrainConfig(_Strict):
    num_workers: int = Field(default=2, ge=1)
    use_gpu: bool = False
    cpus_per_worker: int = Field(default=1, ge=1)
    batch_size: int = Field(default=1024, gt=0)
    epochs: int = Field(default=1, ge=1)
    dense_lr: float = Field(
        default=3e-3,
        gt=0,
        description="Adam on the dense layers; the default is the rate that won on the validation windows of both "
        "real benchmarks (README, 'Defaults')",
    )
    embedding_lr: float = Field(default=0.05, gt=0)
    embedding_optimizer: Literal["rowwise_adagrad", "adagrad", "adam", "sgd"] = Field(
        default="rowwise_adagrad",
        description="fused into the tables' backward: rowwise_adagrad (one state float per row), adagrad (one per "
        "element: twice the table's memory), adam (CUDA only in fbgemm), sgd",
    )
    seed: int = 0
    log_every: int = Field(default=50, gt=0)
    precision: Literal["fp32", "bf16"] = Field(
        default="fp32", description="bf16: autocast the model's forward to bfloat16 (losses and optimizers stay fp32)"
    )
    tf32: bool = Field(default=True, description="TF32 matmuls and convolutions on CUDA; no effect on CPU")
    # Default plain: on CPU (2 gloo processes, the demo experiment) the pipeline measured no faster than the plain step
    # (benchmarks/RESULTS.md, "Step pipeline"), and plain has less machinery. Its overlap is meant for CUDA's copy and
    # data-dist streams, where it has not been measured (no GPU was available).
    step_pipeline: Literal["plain", "sparse_dist"] = Field(
        default="plain",
        description="plain: one batch, one step; sparse_dist: TorchRec's TrainPipelineSparseDist, which copies the "
        "batch after next to the device and starts the next batch's id all-to-all while this one trains (overlap on "
        "CUDA streams; on CPU the same work runs in order). Same updates as plain, with every gradient method",
    )
    shuffle: Literal["none", "local", "global"] = Field(
        default="local",
        description="local: a shuffle buffer per worker (cheap; rows stay near their place in the files); global: "
        "also one seeded all-to-all shuffle of the window first (Ray Data random_shuffle), for logs stored in an "
        "order that matters (sorted, one partition); none: file order",
    )
    local_shuffle_buffer: int = Field(default=20_000, gt=0)
    max_steps: int | None = Field(default=None, ge=1, description="stop early (tests, smoke runs)")
    checkpoint_every_steps: int | None = Field(default=None, ge=1, description="also checkpoint at each epoch end")
    checkpoints_to_keep: int = Field(default=2, ge=1)
    max_failures: int = Field(
        default=0, ge=-1, description="worker-group restarts from the last checkpoint; -1 = no limit"
    )
    sharding: ShardingConfig = ShardingConfig()
    validation: ValidationConfig = ValidationConfig()
    # Scheduling on the cluster (left out of the config fingerprint: they do not change what is trained).
    data_cpus: float = Field(
        default=1.0,
        gt=0,
        description="CPUs kept free beside the training workers for the data path (Ray Data read tasks streaming "
        "the training window); each read task asks for min(1, data_cpus)",
    )
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = Field(
        default="PACK", description="how Ray places the training workers over nodes (SPREAD: one per node if it can)"
    )
    resource_wait_s: float = Field(
        default=300.0,
        gt=0,
        description="how long to wait for the workers' resources (at the start, and for a replacement after a lost "
        "node) before failing",
    )
    stall_timeout_s: float = Field(
        default=600.0,
        gt=0,
        description="fail when no training batch arrives for this long while the cluster has no CPU for a data task",
    )
    materialize: Literal["auto", "always", "never"] = Field(
        default="auto",
        description="read (and globally shuffle) the training and validation windows once into Ray's object store, so "
        "later epochs do not pay the read again; auto: when the windows take at most a quarter of the object store; "
        "never: stream them from the files every epoch",
    )
    controller_poll_s: float = Field(
        default=0.25,
        gt=0,
        le=10,
        description="how often Ray Train's controller polls the workers; it takes their reports and sees them finish "
        "only at a poll (its own default, 2 s, cost every run up to 4 s at the end)",
    )


#: Where and how the workers run, not what they train: kept out of the fingerprint (``step_pipeline`` gives the same
#: updates either way, so a run checkpointed under one resumes under the other).
TRAIN_SCHEDULING_FIELDS = (
    "data_cpus",
    "placement_strategy",
    "resource_wait_s",
    "stall_timeout_s",
    "materialize",
    "controller_poll_s",
    "step_pipeline",
)


class EvalConfig(_Strict):
    batch_size: int = Field(default=8192, gt=0)


class MlflowConfig(_Strict):
    tracking_uri: str | None = Field(default=None, description="unset: sqlite:///<run_dir>/mlflow.db")
    artifact_location: str | None = Field(default=None, description="unset: <run_dir>/mlartifacts")
    experiment: str = "mtrec"
    model_name: str = "mtrec-multitask"
    quarantine_sample_rows: int = Field(
        default=20, ge=0, description="quarantined rows uploaded with the run; the full file stays in run_dir"
    )

    @field_validator("tracking_uri")
    @classmethod
    def _no_credentials(cls, value: str | None) -> str | None:
        # A URI travels in job entrypoints, process arguments and logs: credentials go through MLflow's own variables.
        if value is not None and urlsplit(value).password is not None:
            raise ValueError(
                "the tracking URI must not carry credentials (user:password@): set MLFLOW_TRACKING_USERNAME and "
                "MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN) in the environment instead"
            )
        return value


# Metrics the promotion gate understands, and which way is better: higher (AUC), lower (losses), or nearer 1.
GATE_METRICS: dict[str, Literal["higher", "lower", "one"]] = {
    "auc": "higher",
    "gauc": "higher",
    "logloss": "lower",
    "rmse": "lower",
    "calibration": "one",
}


def _check_metric_key(key: str) -> None:
    name, _, metric = key.rpartition(".")
    if not name or metric not in GATE_METRICS:
        raise ValueError(f"'{key}' must be <evaluation name or *>.<{'|'.join(GATE_METRICS)}>")


class Bound(_Strict):
    """An absolute bound on one metric: ``min`` and/or ``max`` (inclusive)."""

    min: float | None = None
    max: float | None = None


class PromotionConfig(_Strict):
    """The promotion gate: a challenger replaces the champion only if no gated metric regresses by more than allowed.

    ``thresholds`` maps ``<evaluation name>.<metric>`` (``ctr.auc``, ``ctr_cvr.auc``, ``dwell.rmse``) to the largest
    allowed drop, in the metric's own units: AUC may fall by at most that much, RMSE/logloss rise by at most that
    much, calibration move away from 1 by at most that much. ``*.<metric>`` applies to every evaluation name that has
    the metric and no explicit entry. A named entry whose evaluation name is missing fails the gate.

    ``bounds`` are absolute: ``{"*.auc": {"min": 0.6}, "ctr.calibration": {"min": 0.8, "max": 1.25}}``. Every
    promotion checks them; they are the only check a first champion gets, so without them a first model is promoted
    only with ``mtrec promote --allow-first``.
    """

    thresholds: dict[str, float] = Field(default_factory=lambda: {"*.auc": 0.005, "*.gauc": 0.005, "*.rmse": 0.01})
    bounds: dict[str, Bound] = Field(default_factory=dict)

    @field_validator("thresholds")
    @classmethod
    def _known_metrics(cls, value: dict[str, float]) -> dict[str, float]:
        for key, drop in value.items():
            _check_metric_key(key)
            if drop < 0:
                raise ValueError(f"'{key}': the allowed drop must be >= 0, got {drop}")
        return value

    @field_validator("bounds")
    @classmethod
    def _known_bounds(cls, value: dict[str, Bound]) -> dict[str, Bound]:
        for key, bound in value.items():
            _check_metric_key(key)
            if bound.min is None and bound.max is None:
                raise ValueError(f"'{key}': give min, max or both")
            if bound.min is not None and bound.max is not None and bound.min > bound.max:
                raise ValueError(f"'{key}': min {bound.min} is above max {bound.max}")
        return value


class RegistryConfig(_Strict):
    """Talking to the registry: the register and promote stages retry the whole (idempotent) stage on connection
    errors, sleeping ``backoff_s``, 2x, 4x ... (at most ``max_backoff_s``) between attempts."""

    retries: int = Field(default=5, ge=0, description="attempts after the first, on connection errors only")
    backoff_s: float = Field(default=10.0, ge=0)
    max_backoff_s: float = Field(default=120.0, ge=0)
    http_request_retries: int = Field(
        default=2, ge=0, description="MLflow's own per-request retries (MLFLOW_HTTP_REQUEST_MAX_RETRIES if unset)"
    )
    http_timeout_s: int = Field(default=120, gt=0, description="per request (MLFLOW_HTTP_REQUEST_TIMEOUT if unset)")


class DailyConfig(_Strict):
    """``mtrec daily``: train on the last ``train_days`` partitions before the evaluation day, warm-started from the
    champion, register a challenger, run the promotion gate, write a report. One folder per day under ``run_root``."""

    train_days: int = Field(default=7, ge=1)
    warm_start: bool = Field(default=True, description="start from the champion's weights when it is compatible")
    run_root: Path | None = Field(default=None, description="unset: <run_dir>/daily")
    lease_ttl_s: float = Field(
        default=900, gt=0, description="a day's lease expires this long after its owner's last heartbeat"
    )
    heartbeat_s: float = Field(default=60, gt=0, description="how often the owner renews its lease")
    lease_wait_s: float = Field(
        default=0, ge=0, description="wait this long for another host's run of the day to end; 0: exit at once"
    )


class SubmitConfig(_Strict):
    """``mtrec submit``: run a command of this CLI as a Ray job on a cluster (Ray Jobs API, the dashboard address).

    Put no secrets in ``runtime_env``: Ray stores it with the job, visible in the dashboard. Clusters get credentials
    from their own environment (e.g. a Kubernetes Secret, see infra/)."""

    address: str | None = Field(
        default=None, description="http://<head>:8265; unset: RAY_API_SERVER_ADDRESS, then an http RAY_ADDRESS"
    )
    entrypoint: str = Field(
        default="python -m jobs.cli",
        description="how the cluster invokes this CLI: a Python that has this package installed, -m jobs.cli (no "
        "console script on PATH needed); an absolute interpreter path when `python` on the head is another one",
    )
    runtime_env: dict[str, Any] = Field(default_factory=lambda: {"env_vars": {"PYTHONUNBUFFERED": "1"}})
    entrypoint_num_cpus: float | None = Field(default=None, ge=0)
    timeout_s: float | None = Field(default=None, gt=0, description="stop following (not the job) after this long")


class ExperimentConfig(_Strict):
    name: PathName = Field(default="experiment", description="letters, digits, '-', '_', '.' (names paths)")
    run_dir: Path = Path("runs/demo")
    features: Path = Field(description="feature spec YAML")
    generator: GeneratorConfig = GeneratorConfig()
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    gradients: GradientConfig = GradientConfig()
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()
    mlflow: MlflowConfig = MlflowConfig()
    promotion: PromotionConfig = PromotionConfig()
    registry: RegistryConfig = RegistryConfig()
    daily: DailyConfig = DailyConfig()
    submit: SubmitConfig = SubmitConfig()

    def feature_spec(self) -> FeatureSpec:
        return load_feature_spec(self.features)

    def tracking_uri(self) -> str:
        return self.mlflow.tracking_uri or f"sqlite:///{(self.run_dir / 'mlflow.db').resolve()}"

    def artifact_location(self) -> str:
        return self.mlflow.artifact_location or (self.run_dir / "mlartifacts").resolve().as_uri()

    def fingerprint(self) -> str:
        """Hash of the resolved config and the feature spec's content (paths excluded, they differ per machine)."""
        # Operational sections (gate, retries, scheduling, submission) do not change what is trained: left out, so
        # the hash of a config is the same as before they existed and a retry setting never looks like a new model.
        operational: dict[str, Any] = {name: True for name in ("promotion", "registry", "daily", "submit")}
        operational["train"] = set(TRAIN_SCHEDULING_FIELDS)
        body = self.model_dump(
            mode="json",
            exclude={"run_dir": True, "data": {"path", "oracle_path", "complete"}, "features": True, **operational},
        )
        body["feature_spec"] = self.feature_spec().fingerprint()
        return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:12]


def loggable_config(cfg: ExperimentConfig) -> dict[str, Any]:
    """The config as it may be logged or handed to other processes: no tracking URI (a server address is
    deployment detail), no submission runtime env (its values may be secrets)."""
    return cfg.model_dump(mode="json", exclude={"mlflow": {"tracking_uri"}, "submit": {"runtime_env"}})


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
            got = f" (got {redact(repr(e.get('input')))})" if e["loc"] else ""  # the root's input is the whole config
            lines.append(f"  {loc}: {e['msg']}{got}")
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
    spec = cfg.feature_spec()  # fail early, naming the spec file, if it is broken
    if cfg.data.oracle_path is not None and cfg.data.oracle_columns and spec.keys.request_id is None:
        raise ConfigError(
            f"config {path}: data.oracle_path is joined on the request id, but the feature spec {cfg.features} "
            "names none (keys.request_id)"
        )
    return cfg

"""Train stage: Ray Train ``TorchTrainer`` workers, each wrapping the spec-built model in TorchRec's
``DistributedModelParallel`` (tables sharded by the planner, fused embedding optimizer), fed by equal Ray Data shards
of the validated training window, streamed from the files or read once into the object store
(:mod:`pipeline.train_windows`).

Checkpoints (every ``train.checkpoint_every_steps`` steps and at each epoch end) are ``torch.distributed.checkpoint``
folders holding tensors only: the sharded model state, the fused embedding optimizer's state and the dense
optimizer's state, each rank writing its own shards; the step and data position go beside them as JSON. Tensors only,
because DCP unpickles any non-tensor entry when loading. Ray Train keeps the latest checkpoints: after a worker
failure (``train.max_failures``) the restarted workers resume from the latest one, and a new run started with
the same config and data window (``mtrec train`` again, the default) continues from the previous run's latest one;
``fresh=True`` (``--fresh``) starts over, moving the old checkpoints aside (``pipeline/checkpoints.py``).

With a validation window, every checkpoint also carries the best epoch's model (each rank its own shards, under
``best``), so a resumed run keeps it. The finished model leaves in the final checkpoint, which is copied to
``<run_dir>/model``; no worker gathers the model. The driver then writes the unsharded weights as safetensors from
its DCP folder, tensor by tensor (:func:`pipeline.export.export_weights`: peak memory one saved chunk, never the whole
model), the best epoch's when there is one, so evaluation and serving need no process group. A warm start from that
folder reads the DCP checkpoint, each worker only its own shards (:func:`pipeline.worker_state.warm_start`).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import pyarrow.parquet as pq

from features.transform import BatchTransform
from models.io import WEIGHTS_FILE, model_hash
from models.multitask import output_bias_priors
from pipeline.checkpoint_files import checkpoint_to_folder
from pipeline.checkpoints import CheckpointIdentity, prepare_checkpoints
from pipeline.config import ExperimentConfig, loggable_config
from pipeline.export import BEST_PREFIX, export_weights, source_prefix, stored_dcp_keys
from pipeline.ingest import IngestResult
from pipeline.progress import (
    SILENT,
    TRAIN_PROGRESS_FILE,
    ProgressFileFollower,
    StageProgress,
    log_dir,
)
from pipeline.results import StageResult
from pipeline.runtime import ensure_ray, verbose
from pipeline.train_worker import worker_loop
from pipeline.validation import resolve_monitor
from pipeline.worker_state import DCP_DIR, VALIDATION_FILE

if TYPE_CHECKING:
    from pipeline.resources import TrainingNeeds


@dataclass(frozen=True)
class TrainResult(StageResult):
    STAGE: ClassVar[str] = "train"

    model_dir: str
    steps: int
    samples: int
    loop_seconds: float
    samples_per_s: float
    final_losses: dict[str, float]
    plan: dict[str, Any]
    resumed_from_step: int = 0
    world_size: int = 0
    # What these weights are: their hash and the data they were trained on (see pipeline/lineage.py).
    model_hash: str = ""
    data_hash: str = ""
    train_dates: list[str] = field(default_factory=list)
    rows: dict[str, int] = field(default_factory=dict)  # RowAccounting: rows used, trained per epoch, dropped
    # data.validation_days: per completed epoch the validation window's metrics; the weights are best_epoch's.
    validation: list[dict[str, Any]] = field(default_factory=list)
    best_epoch: int = 0  # 0: no validation window (the weights are the last step's)
    stopped_early: bool = False
    epochs: int = 0  # epochs completed
    # The loop's steady state (median log window, epochs' first windows excluded): samples_per_s / this is what the
    # epochs' restarts and checkpoints cost.
    steady_samples_per_s: float = 0.0
    # Seconds of the run's fixed cost: preparing the data (read/shuffle/materialise, priors), workers up and process
    # group formed, model built and sharded by the planner, first batch in hand (rank 0's clock).
    startup: dict[str, float] = field(default_factory=dict)
    # Seconds from the last step to the weights on disk: the final checkpoint and Ray Train's wind-down (workers
    # seen finished, their group shut down), then the driver's export of the weights.
    wind_down: dict[str, float] = field(default_factory=dict)
    materialized: bool = False  # the windows were read once into the object store (train.materialize)
    checkpoints: int = 0  # checkpoints written by the run, its final one included


class NothingToTrainError(ValueError):
    """The training window cannot fill one global batch: training would run 0 steps."""


@dataclass(frozen=True)
class RowAccounting:
    """Where the rows of one epoch go. Ray Data's equal split gives each of ``world`` workers ``rows // world``
    rows (the remainder is dropped), and each worker drops its last partial batch (``drop_last``: every rank must
    run the same steps)."""

    rows_used: int  # validated rows of the training window
    global_batch: int
    steps_per_epoch: int
    rows_trained_per_epoch: int
    dropped_by_equal_split: int
    dropped_by_drop_last: int

    @classmethod
    def of(cls, rows_used: int, batch_size: int, world: int) -> RowAccounting:
        per_worker = rows_used // world
        steps = per_worker // batch_size
        return cls(
            rows_used=rows_used,
            global_batch=batch_size * world,
            steps_per_epoch=steps,
            rows_trained_per_epoch=steps * batch_size * world,
            dropped_by_equal_split=rows_used - per_worker * world,
            dropped_by_drop_last=(per_worker - steps * batch_size) * world,
        )


def check_trainable(cfg: ExperimentConfig, ingested: IngestResult) -> RowAccounting:
    """The row accounting of this window, or a clear error when not one step would run."""
    rows = int(ingested.counts.get("train", {}).get("rows_used", 0))
    accounting = RowAccounting.of(rows, cfg.train.batch_size, cfg.train.num_workers)
    if accounting.steps_per_epoch == 0:
        raise NothingToTrainError(
            f"nothing to train: the training window {ingested.train_dates} has {rows:,} usable rows, fewer than one "
            f"global batch per worker ({cfg.train.num_workers} worker(s) x train.batch_size {cfg.train.batch_size} ="
            f" {accounting.global_batch:,} rows), so training would run 0 steps. Use more partitions "
            "(data.train_days), a smaller train.batch_size or fewer train.num_workers"
        )
    return accounting


def window_bytes(files: list[str]) -> int:
    """The files' rows in memory, estimated from the Parquet footers (uncompressed size of every row group)."""
    total = 0
    for f in files:
        meta = pq.read_metadata(f)
        total += sum(meta.row_group(i).total_byte_size for i in range(meta.num_row_groups))
    return total


def object_store_bytes() -> float:
    import ray

    return float(ray.cluster_resources().get("object_store_memory", 0.0))


def should_materialize(mode: str, files: list[str], store_bytes: float) -> bool:
    """``train.materialize``: auto reads the windows into the object store when they take at most a quarter of it
    (twice the footer estimate, for decoded dictionaries), leaving room for the batches in flight."""
    if mode != "auto":
        return mode == "always"
    return 2 * window_bytes(files) <= store_bytes / 4


def startup_seconds(prepare_started: float, fit_called: float, metrics: dict[str, Any]) -> dict[str, float]:
    """The run's fixed cost by phase, from the driver's and rank 0's wall clocks; empty when rank 0 ran no step."""
    keys = ("worker_entered_at", "model_built_at", "first_batch_at")
    entered, built, first = (float(metrics.get(k, 0.0)) for k in keys)
    if not (entered and built and first):
        return {}
    return {
        "prepare_data_s": round(fit_called - prepare_started, 3),
        "workers_up_s": round(entered - fit_called, 3),
        "build_and_shard_s": round(built - entered, 3),
        "first_batch_s": round(first - built, 3),
        "total_s": round(first - prepare_started, 3),
    }


def wind_down_seconds(fit_returned: float, exported: float, metrics: dict[str, Any]) -> dict[str, float]:
    """The run's fixed cost after its last step, from rank 0's and the driver's wall clocks (empty without a step)."""
    loop_ended = float(metrics.get("loop_ended_at", 0.0))
    if not loop_ended:
        return {}
    return {
        "checkpoint_and_workers_done_s": round(fit_returned - loop_ended, 3),
        "export_s": round(exported - fit_returned, 3),
        "total_s": round(exported - loop_ended, 3),
    }


def worker_config(
    cfg: ExperimentConfig, ingested: IngestResult, warm_start_dir: Path | None, output_bias: dict[str, float]
) -> dict[str, Any]:
    """What every training worker receives. The experiment config in its loggable form: the workers need no tracking
    URI and no submission environment, and Ray may show or store what it hands to workers."""
    return {
        "experiment": loggable_config(cfg),
        "spec": cfg.feature_spec().model_dump(mode="json"),
        "stats": asdict(ingested.stats),
        "warm_start_dir": str(warm_start_dir) if warm_start_dir else None,
        "output_bias": output_bias,
        "log_dir": str(log_dir(cfg.run_dir)),
        "redirect_output": not verbose(),
        "validation": bool(ingested.validation_files),
    }


def read_windows(cfg: ExperimentConfig, ingested: IngestResult, needs: TrainingNeeds) -> tuple[dict[str, Any], bool]:
    """The training window (and the validation window, split equally over the workers like it) as Ray Datasets, and
    whether they were materialised (``train.materialize``, see :mod:`pipeline.train_windows`)."""
    from pipeline.train_windows import WindowSource, read_materialized, read_with_ray_data

    seed = cfg.train.seed if cfg.train.shuffle == "global" else None
    # Seeded, so the order is reproducible (resume); the workers' shuffle buffers still vary it per epoch.
    sources = {"train": WindowSource(ingested.train_files, seed)}
    if ingested.validation_files:
        sources["validation"] = WindowSource(ingested.validation_files, None)
    all_files = [f for source in sources.values() for f in source.files]
    if should_materialize(cfg.train.materialize, all_files, object_store_bytes()):
        # Once, here: every epoch would otherwise read the files (and redo the seeded shuffle, to the same order).
        world = cfg.train.num_workers
        return {
            name: read_materialized(source, 2 * window_bytes(source.files), world, needs.read_task_cpus)
            for name, source in sources.items()
        }, True
    return {name: read_with_ray_data(source, needs.read_task_cpus) for name, source in sources.items()}, False


def train(
    cfg: ExperimentConfig,
    ingested: IngestResult,
    warm_start_dir: Path | None = None,
    fresh: bool = False,
    progress: StageProgress = SILENT,
) -> TrainResult:
    """Train on the ingested training window; returns where the unsharded model was written.

    Continues from the latest checkpoint of an earlier run of the same config and data window in ``run_dir`` (after
    a crash); refuses checkpoints of another config or window. ``fresh``: start over, the old checkpoints moved aside.
    ``progress`` follows rank 0's logged steps.
    """
    import ray.data
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer
    from ray.train.v2.api.config import FailureConfig  # Ray Train v2's, with controller_failure_limit

    from pipeline.resources import check_cluster, controller_settings, explain_training_failure
    from pipeline.train_windows import EqualSplitsOfMaterialized

    prepare_started = time.time()
    accounting = check_trainable(cfg, ingested)
    ingested.check_sources_unchanged()
    spec = cfg.feature_spec()
    if ingested.validation_files:
        resolve_monitor(spec, cfg.train.validation)  # a wrong metric name fails now, not after epoch 1
    needs = check_cluster(cfg)  # fails in seconds, naming the shortfall, when the run cannot fit the cluster
    ensure_ray(cfg)
    logs = log_dir(cfg.run_dir)
    progress_file = logs / TRAIN_PROGRESS_FILE
    progress_file.unlink(missing_ok=True)
    storage = (cfg.run_dir / "ray_results").resolve()
    run_name = f"{cfg.name}-train"
    identity = CheckpointIdentity.of(cfg, ingested.window_key())
    prepare_checkpoints(storage / run_name, identity, fresh)
    ray.data.DataContext.get_current().execution_options.preserve_order = True  # reproducible batch order
    datasets, materialized = read_windows(cfg, ingested, needs)
    label_table = pq.read_table(ingested.train_files, columns=spec.label_columns)  # label columns only
    priors = output_bias_priors(spec, BatchTransform(spec, ingested.stats).labels_numpy(label_table))
    trainer = TorchTrainer(
        worker_loop,
        train_loop_config=worker_config(cfg, ingested, warm_start_dir, priors),
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.train.num_workers,
            use_gpu=cfg.train.use_gpu,
            resources_per_worker=needs.resources_per_worker(),
            placement_strategy=cfg.train.placement_strategy,
        ),
        torch_config=TorchConfig(backend="nccl" if cfg.train.use_gpu else "gloo"),
        run_config=ray.train.RunConfig(
            name=run_name,
            storage_path=str(storage),
            # A worker group that cannot get its resources within train.resource_wait_s (a lost node not replaced)
            # fails the run: Ray Train would otherwise retry the start forever.
            failure_config=FailureConfig(max_failures=cfg.train.max_failures, controller_failure_limit=0),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.train.checkpoints_to_keep),
        ),
        datasets=datasets,
        dataset_config=EqualSplitsOfMaterialized(),
    )
    steps = accounting.steps_per_epoch * cfg.train.epochs
    progress.total(min(steps, cfg.train.max_steps) if cfg.train.max_steps else steps, "steps")

    def on_record(record: dict[str, Any]) -> None:
        if "validation" in record:  # an epoch end with a validation window
            point = record["validation"]
            status = f"epoch {point['epoch']} · validation {point['watched']} {point['value']:.4f}"
            progress.update(point["step"], f"{status} · best epoch {record['best_epoch']}")
            return
        status = f"epoch {record['epoch']} · loss {record['loss']:.4f} · {record['samples_per_s']:,.0f} samples/s"
        progress.update(record["step"], status)

    fit_called = time.time()
    try:
        with (
            ProgressFileFollower(progress_file, on_record),
            controller_settings(cfg.train.resource_wait_s, cfg.train.controller_poll_s),
        ):
            result = trainer.fit()
    except Exception as err:
        explained = explain_training_failure(err, cfg, needs)
        if explained is None:
            raise
        raise explained from err
    fit_returned = time.time()
    if result.error:
        raise result.error
    if result.checkpoint is None:
        raise RuntimeError("training finished without a checkpoint")
    model_dir = (cfg.run_dir / "model").resolve()
    checkpoint_to_folder(result.checkpoint, model_dir)
    # The summary travels inside the checkpoint: Result.metrics is not kept by every Ray Train version.
    metrics = json.loads((model_dir / "summary.json").read_text())
    prefix = source_prefix(stored_dcp_keys(model_dir / DCP_DIR))
    if (prefix == BEST_PREFIX) != (int(metrics.get("best_epoch", 0)) > 0):
        raise RuntimeError(f"{model_dir / DCP_DIR}: best epoch {metrics.get('best_epoch')} but weights under {prefix}")
    export_weights(model_dir / DCP_DIR, model_dir / WEIGHTS_FILE, prefix)
    exported = time.time()
    curve = json.loads((model_dir / "training_curve.json").read_text())
    out = TrainResult(
        model_dir=str(model_dir),
        steps=int(metrics["step"]),
        samples=int(metrics["samples"]),
        loop_seconds=float(metrics["loop_seconds"]),
        samples_per_s=float(metrics["samples_per_s"]),
        final_losses={k: v for k, v in (curve[-1] if curve else {}).items() if k not in ("step", "epoch")},
        plan=json.loads((model_dir / "plan.json").read_text()),
        resumed_from_step=int(metrics.get("resumed_from_step", 0)),
        world_size=int(metrics.get("world_size", cfg.train.num_workers)),
        model_hash=model_hash(model_dir),
        data_hash=ingested.data_hash,
        train_dates=list(ingested.train_dates),
        rows=asdict(accounting),
        validation=json.loads((model_dir / VALIDATION_FILE).read_text()) if ingested.validation_files else [],
        best_epoch=int(metrics.get("best_epoch", 0)),
        stopped_early=bool(metrics.get("stopped_early", False)),
        epochs=int(metrics["epoch"]),
        steady_samples_per_s=float(metrics.get("steady_samples_per_s", 0.0)),
        startup=startup_seconds(prepare_started, fit_called, metrics),
        wind_down=wind_down_seconds(fit_returned, exported, metrics),
        materialized=materialized,
        checkpoints=int(metrics.get("checkpoints", 0)),
    )
    if out.steps == 0:
        raise NothingToTrainError(f"training ran 0 steps ({asdict(accounting)}): the model in {model_dir} is untrained")
    out.save(cfg.run_dir.resolve() / "train.json")
    return out

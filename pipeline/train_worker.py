"""What runs inside each Ray Train worker: build the model on ``meta``, shard it with the planner and DMP, stream
the worker's shard of the training window, step, checkpoint with ``torch.distributed.checkpoint``
(:mod:`pipeline.worker_state`), and hand the finished model back in the final checkpoint: every rank its own shards
(with a validation window, also its shards of the best epoch's model), rank 0 the model description. No rank ever
holds the whole model: the driver side (:mod:`pipeline.train`) writes the unsharded safetensors weights from the
checkpoint, tensor by tensor (:mod:`pipeline.export`).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import torch
from torch import nn

from features.batch import Batch
from features.spec import FeatureSpec
from features.stats import DenseStats
from features.transform import BatchTransform
from models.gradients import GradientMethod, build_gradient_method, head_config
from models.multitask import MultiTaskLoss, set_output_bias
from pipeline.config import ExperimentConfig
from pipeline.logs import redirect_process_output
from pipeline.progress import (
    TRAIN_PROGRESS_FILE,
    append_progress,
)
from pipeline.step_stats import LossWindow, autocast_dtype, configure_device_math
from pipeline.watchdog import watched_batches
from pipeline.worker_state import (
    TrainState,
    load_best,
    load_checkpoint,
    report_checkpoint,
    report_final,
    snapshot_model,
    warm_start,
)


@dataclass
class TrainingParts:
    """Everything a worker needs for a step; built once per worker by :func:`build_training`."""

    model: nn.Module
    optimizer: Any  # torchrec CombinedOptimizer (fused embedding optimizer + dense Adam)
    dense_optimizer: Any  # the dense part alone (its state is created lazily)
    loss_fn: MultiTaskLoss
    plan_summary: dict[str, Any]
    method: GradientMethod  # replaces loss.backward(): equal weights, uncertainty, PCGrad or DRGrad
    autocast: torch.dtype | None = None  # train.precision: the forward's autocast dtype, None for fp32


def build_training(
    cfg: ExperimentConfig, spec: FeatureSpec, device: torch.device, local_world_size: int | None = None
) -> TrainingParts:
    """Build on the meta device, shard with the planner, and set up the optimizers (needs a process group)."""
    from torchrec.optim.keyed import CombinedOptimizer

    from models.multitask import build_model
    from models.sharding import dense_optimizer, describe_plan, embedding_sharders, shard_model

    torch.manual_seed(cfg.train.seed)
    configure_device_math(device, cfg.train.tf32)
    model = build_model(spec, cfg.model, device=torch.device("meta"), drgrad=head_config(cfg.gradients))
    sharders = embedding_sharders(cfg.train.embedding_optimizer, cfg.train.embedding_lr)
    dmp, plan = shard_model(
        model,
        device,
        sharders,
        local_world_size=local_world_size,
        table_sharding={k: list(v) for k, v in cfg.train.sharding.tables.items()},
        memory_per_worker_gb=cfg.train.sharding.memory_per_worker_gb,
        table_sizes={t.name: (t.num_buckets, t.dim) for t in spec.tables},
        optimizer=cfg.train.embedding_optimizer,
    )
    method = build_gradient_method(
        cfg.gradients, dmp, [t.name for t in spec.tasks], weights={t.name: t.loss_weight for t in spec.tasks}
    )
    dense = dense_optimizer(
        dmp,
        cfg.train.dense_lr,
        extra=method.extra_parameters(),
        table_optimizer=cfg.train.embedding_optimizer,
        table_lr=cfg.train.embedding_lr,
    )
    optimizer = CombinedOptimizer([("fused", dmp.fused_optimizer), ("dense", dense)])
    return TrainingParts(
        dmp, optimizer, dense, MultiTaskLoss(spec), describe_plan(plan), method, autocast_dtype(cfg.train.precision)
    )


def forward_losses(parts: TrainingParts, batch: Batch) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The model's outputs and the per-task losses. With ``parts.autocast`` the forward's dense layers run in that
    dtype (the embedding lookups stay fp32) and the losses are taken in fp32."""
    if parts.autocast is None:
        outputs = parts.model(batch)
    else:
        with torch.autocast(batch.dense.device.type, dtype=parts.autocast):
            outputs = {k: v.float() for k, v in parts.model(batch).items()}
    return outputs, parts.loss_fn.task_losses(outputs, batch.labels)


def train_step(parts: TrainingParts, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor], dict[str, float]]:
    """One optimisation step; the fused kernels update the embeddings inside backward. Returns the weighted total,
    the per-task losses and the gradient method's diagnostics (empty on most steps)."""
    _, losses = forward_losses(parts, batch)
    parts.optimizer.zero_grad()
    diagnostics = parts.method.backward(losses)
    parts.optimizer.step()
    return parts.method.total(losses).detach(), losses, diagnostics


def arrow_collate(spec: FeatureSpec, stats: DenseStats, pin_memory: bool = False) -> Any:
    """The collate for ``iter_torch_batches``. With ``pin_memory`` (CUDA workers) the batch is also copied into
    page-locked memory there, so the training thread's ``Batch.to(device, non_blocking=True)`` is an asynchronous DMA:
    Ray pins and moves only plain tensor batches, not a custom ``Batch``."""
    from ray.data.collate_fn import ArrowBatchCollateFn

    class _Collate(ArrowBatchCollateFn):
        """Runs in Ray Data's prefetch threads, so the Arrow -> KJT work (and the pinning) overlaps the step."""

        def __init__(self) -> None:
            self.transform = BatchTransform(spec, stats)

        def __call__(self, batch: pa.Table) -> Batch:  # type: ignore[override]
            out = self.transform(batch)
            return out.pin_memory() if pin_memory else out

    return _Collate()


def _validate_epoch(
    parts: TrainingParts,
    state: TrainState,
    batches: Iterator[Batch],
    spec: FeatureSpec,
    cfg: ExperimentConfig,
    device: torch.device,
) -> bool:
    """Score the validation shards (all ranks), decide on rank 0, apply the broadcast decision to ``state`` on every
    rank. Returns whether this epoch is the new best."""
    from pipeline.validation import (
        broadcast_decision,
        decide,
        gather_scores,
        resolve_monitor,
        score_batches,
        validation_metrics,
    )

    monitor = resolve_monitor(spec, cfg.train.validation)
    frame = gather_scores(score_batches(parts.model, spec, batches, device))
    decision = None
    if frame is not None:
        metrics = validation_metrics(spec, frame)
        decision = decide(monitor, cfg.train.validation, state.epoch, metrics, state.best_value, state.stale_epochs)
    decision = broadcast_decision(decision)
    state.validation.append(
        {
            "epoch": decision.epoch,
            "step": state.step,
            "watched": monitor.name,
            "value": decision.value,
            "metrics": decision.metrics,
        }
    )
    if decision.improved:
        state.best_epoch, state.best_value, state.stale_epochs = decision.epoch, decision.value, 0
    else:
        state.stale_epochs += 1
    state.stopped_early = decision.stop
    return decision.improved


def worker_loop(config: dict[str, Any]) -> None:
    import ray.train
    import ray.train.torch

    from pipeline.step_pipeline import make_stepper  # it builds on this module's train_step

    entered = time.time()  # wall clock, comparable with the driver's: start-up is measured across processes
    cfg = ExperimentConfig.model_validate(config["experiment"])
    spec = FeatureSpec.model_validate(config["spec"])
    stats = DenseStats(**config["stats"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    logs = Path(config["log_dir"])
    if config["redirect_output"]:
        # Everything this worker and its libraries print (planner tables, warnings) goes to its own log file.
        redirect_process_output(logs / f"train-worker-{rank}.log")
    progress_file = logs / TRAIN_PROGRESS_FILE
    device = ray.train.torch.get_device()
    torch.set_num_threads(cfg.train.cpus_per_worker)

    parts = build_training(cfg, spec, device, local_world_size=ctx.get_local_world_size())
    built = time.time()
    state = TrainState(world_size=world)
    resumed_from = 0
    best: dict[str, Any] | None = None  # this rank's shards of the best epoch's model
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            state = load_checkpoint(parts, Path(folder))
            best = load_best(parts, Path(folder))
        if state.best_epoch and best is None:
            raise RuntimeError(f"the checkpoint records best epoch {state.best_epoch} but holds no copy of its weights")
        resumed_from = state.step
        if rank == 0:
            print(
                f"[train] resumed from step {state.step} (epoch {state.epoch}, {state.epoch_samples} samples into it,"
                f" saved by {state.world_size} worker(s), now {world})",
                flush=True,
            )
        state.world_size = world
    elif config.get("warm_start_dir"):
        warm_start(parts, Path(config["warm_start_dir"]), rank)
    else:
        # Start each output at its label's base rate / mean (same priors on every rank), see output_bias_priors.
        set_output_bias(parts.model, config["output_bias"])
    if rank == 0:
        from models.multitask import build_model, format_parameter_report, parameter_report

        meta_model = build_model(spec, cfg.model, torch.device("meta"), head_config(cfg.gradients))
        report = parameter_report(meta_model, spec, cfg.model)
        print(f"[train] parameters:\n{format_parameter_report(report)}", flush=True)
        print(f"[train] sharding plan: {json.dumps(parts.plan_summary)}", flush=True)

    shard = ray.train.get_dataset_shard("train")
    validation_shard = ray.train.get_dataset_shard("validation") if config.get("validation") else None
    collate = arrow_collate(spec, stats, pin_memory=device.type == "cuda")
    shuffle = cfg.train.local_shuffle_buffer if cfg.train.shuffle in ("local", "global") else None
    per_step = cfg.train.batch_size * world
    window = LossWindow()
    window_steps = 0
    started = last_log = time.perf_counter()
    loop_samples = 0

    def batches_of(epoch: int) -> Iterator[Batch]:
        stream = shard.iter_torch_batches(
            batch_size=cfg.train.batch_size,
            collate_fn=collate,
            drop_last=True,
            local_shuffle_buffer_size=max(shuffle, cfg.train.batch_size) if shuffle else None,
            local_shuffle_seed=cfg.train.seed + 1000 * epoch + rank if shuffle else None,
            prefetch_batches=2,
        )
        # Fails, instead of waiting forever, when the stream cannot be scheduled (see pipeline.watchdog).
        return watched_batches(iter(stream), cfg.train.stall_timeout_s, min(1.0, cfg.train.data_cpus))

    def done() -> bool:
        return cfg.train.max_steps is not None and state.step >= cfg.train.max_steps

    def validation_batches() -> Iterator[Batch]:
        assert validation_shard is not None
        # Not dropping the last batch: each rank holds the same number of rows (equal split), so the same batches.
        stream = validation_shard.iter_torch_batches(
            batch_size=cfg.eval.batch_size, collate_fn=collate, drop_last=False, prefetch_batches=1
        )
        return watched_batches(iter(stream), cfg.train.stall_timeout_s, min(1.0, cfg.train.data_cpus))

    parts.model.train()
    stepper = make_stepper(cfg.train.step_pipeline, parts, device, [t.name for t in spec.tasks])
    first_batch_at = 0.0

    def timed(batches: Iterator[Batch]) -> Iterator[Batch]:
        """Start-up ends when the first batch is in hand: it is reported apart, the loop's clock starts there (the
        sparse_dist stepper takes its first batches inside its first step)."""
        nonlocal first_batch_at, started, last_log
        for batch in batches:
            if not first_batch_at:
                first_batch_at = time.time()
                started = last_log = time.perf_counter()
            yield batch

    while state.epoch < cfg.train.epochs and not done() and not state.stopped_early:
        epoch_batches = batches_of(state.epoch)
        epoch_start = True
        # Resume mid-epoch: skip what the workers had trained (a global count, valid for another worker count).
        for _ in range(state.epoch_samples // per_step):
            next(epoch_batches, None)
        batches = timed(epoch_batches)
        while not done():
            # No per-step agreement that every rank has a batch: every rank gets rows // world rows (an equal split,
            # pipeline.train_windows) and batches drop the last partial one, so all ranks run out together.
            result = stepper.step(batches)
            if result is None:
                break
            total, losses, diagnostics = result
            if diagnostics:
                state.diagnostics.append({"step": state.step + 1, **diagnostics})
            state.step += 1
            state.samples += per_step
            state.epoch_samples += per_step
            loop_samples += per_step
            window_steps += 1
            window.add(total, losses)  # summed on the device; read only at log_every
            if state.step % cfg.train.log_every == 0:
                point = window.mean_over_ranks(world)
                now = time.perf_counter()
                rate = window_steps * per_step / (now - last_log)
                last_log, window_steps = now, 0
                state.curve.append({"step": state.step, "epoch": state.epoch, **point})
                state.rates.append({"step": state.step, "samples_per_s": rate, "epoch_start": epoch_start})
                epoch_start = False
                if rank == 0:
                    text = " ".join(f"{k}={v:.4f}" for k, v in point.items())
                    print(f"[train] epoch {state.epoch} step {state.step} {text} {rate:,.0f} samples/s", flush=True)
                    append_progress(
                        progress_file,
                        {"step": state.step, "epoch": state.epoch, "samples_per_s": rate, "loss": point["total"]},
                    )
            if cfg.train.checkpoint_every_steps and state.step % cfg.train.checkpoint_every_steps == 0:
                report_checkpoint(parts, state, {"step": state.step, "epoch": state.epoch}, best)
        stepper.pause()  # the model's own forward back, for validation (and after the last step)
        if not done():
            state.epoch += 1
            state.epoch_samples = 0
            if validation_shard is not None:
                validation_started = time.perf_counter()
                if _validate_epoch(parts, state, validation_batches(), spec, cfg, device):
                    best = snapshot_model(parts.model)  # local: each rank copies its own shards
                paused = time.perf_counter() - validation_started
                started, last_log = started + paused, last_log + paused  # samples/s count training time only
                if rank == 0:
                    append_progress(progress_file, {"validation": state.validation[-1], "best_epoch": state.best_epoch})
            if state.epoch < cfg.train.epochs and not done() and not state.stopped_early:
                # Not after the last epoch: the final checkpoint follows at once with the same state (at large
                # tables a second full write).
                report_checkpoint(parts, state, {"step": state.step, "epoch": state.epoch}, best)
    loop_seconds = time.perf_counter() - started

    # With a validation window the best epoch's weights are the result (under "best" in the final checkpoint); the
    # model and optimizer state stay the last step's.
    metrics = {
        "step": state.step,
        "epoch": state.epoch,
        "samples": state.samples,
        "loop_seconds": loop_seconds,
        "samples_per_s": loop_samples / max(loop_seconds, 1e-9),
        "resumed_from_step": resumed_from,
        "world_size": world,
        "best_epoch": state.best_epoch,
        "stopped_early": state.stopped_early,
        "steady_samples_per_s": steady_rate(state.rates),
        # Start-up on this rank (wall clock): entering the loop, model built and sharded, first batch in hand.
        "worker_entered_at": entered,
        "model_built_at": built,
        "first_batch_at": first_batch_at,
        "loop_ended_at": time.time(),  # the wind-down (final checkpoint, workers' group shut down) starts here
    }
    if rank == 0:
        description = {
            "spec": config["spec"],
            "model": config["experiment"]["model"],
            "gradients": config["experiment"]["gradients"],
            "stats": config["stats"],
        }
        metrics_extra = {
            "plan": parts.plan_summary,
            "curve": state.curve,
            "description": description,
            "diagnostics": state.diagnostics,
            "validation": state.validation,
        }
    else:
        metrics_extra = {}
    report_final(parts, state, metrics, metrics_extra if rank == 0 else None, best)


def steady_rate(rates: list[dict[str, Any]]) -> float:
    """The loop's steady-state samples/s: the median log window that is not an epoch's first (those pay the data
    stream's start-up); 0.0 when every window is one."""
    import statistics

    steady = [r["samples_per_s"] for r in rates if not r["epoch_start"]]
    return statistics.median(steady) if steady else 0.0

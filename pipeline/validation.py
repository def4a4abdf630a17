"""The validation window inside training (``data.validation_days``): at every epoch end the workers score their
shards of it together (the sharded tables make each forward a collective), rank 0 computes every task's metrics and
decides whether the watched metric improved and whether to stop; the decision is broadcast so every rank keeps the
same state. The evaluation window is never read here.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import polars as pl
import torch
import torch.distributed as dist
from torch import nn

from features.batch import Batch
from features.spec import FeatureSpec, TaskKind
from models.multitask import joint_name, predictions
from pipeline.config import ValidationConfig
from pipeline.metrics import task_metrics

#: Metrics a run may watch, and which way is better.
_DIRECTION: dict[str, Literal["max", "min"]] = {"auc": "max", "logloss": "min", "rmse": "min"}


class ValidationConfigError(ValueError):
    """``train.validation`` names a task or metric the feature spec does not have."""


@dataclass(frozen=True)
class Monitor:
    """The watched metric: ``task`` (or ESMM product name), ``metric``, and whether larger is better."""

    task: str
    metric: str
    mode: Literal["max", "min"]

    @property
    def name(self) -> str:
        return f"{self.task}.{self.metric}"

    def gain(self, value: float, best: float | None) -> float:
        """How much ``value`` beats ``best`` (positive: better); a NaN never gains, anything beats no best yet."""
        if not math.isfinite(value):
            return -math.inf
        if best is None:
            return math.inf
        return value - best if self.mode == "max" else best - value


def resolve_monitor(spec: FeatureSpec, validation: ValidationConfig) -> Monitor:
    """The metric ``train.validation.metric`` names, or the default (first binary task's AUC, else the first task's
    RMSE). Raises :class:`ValidationConfigError` naming the field and what is allowed."""
    binary = [t.name for t in spec.tasks if t.kind == TaskKind.binary]
    if validation.metric is None:
        if binary:
            return Monitor(binary[0], "auc", "max")
        return Monitor(spec.tasks[0].name, "rmse", "min")
    task, _, metric = validation.metric.rpartition(".")
    kinds = {t.name: t.kind for t in spec.tasks}
    kinds.update({joint_name(t.esmm_parent, t.name): TaskKind.binary for t in spec.tasks if t.esmm_parent})
    allowed = {TaskKind.binary: ("auc", "logloss"), TaskKind.regression: ("rmse",)}
    if task not in kinds:
        raise ValidationConfigError(
            f"train.validation.metric '{validation.metric}': no task '{task}' (tasks: {', '.join(kinds)}; write "
            "'<task>.<metric>')"
        )
    if metric not in allowed[kinds[task]]:
        raise ValidationConfigError(
            f"train.validation.metric '{validation.metric}': '{metric}' is not watched for a {kinds[task].value} "
            f"task (one of: {', '.join(allowed[kinds[task]])})"
        )
    return Monitor(task, metric, _DIRECTION[metric])


def score_batches(
    model: nn.Module, spec: FeatureSpec, batches: Iterable[Batch], device: torch.device
) -> dict[str, np.ndarray]:
    """This rank's predictions and labels over its validation shard: ``pred:<name>`` and ``label:<task>`` columns.
    Every rank must call it with the same number of batches (an equal split): each forward is a collective."""
    columns: dict[str, list[np.ndarray]] = {}
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for batch in batches:
                on_device = batch.to(device, non_blocking=True)
                for name, value in predictions(spec, model(on_device)).items():
                    columns.setdefault(f"pred:{name}", []).append(value.float().cpu().numpy())
                for name, value in on_device.labels.items():
                    columns.setdefault(f"label:{name}", []).append(value.float().cpu().numpy())
    finally:
        model.train(was_training)
    return {k: np.concatenate(v).astype(np.float64) for k, v in columns.items()}


def gather_scores(local: dict[str, np.ndarray]) -> pl.DataFrame | None:
    """Every rank's scored rows on rank 0 (None on the others)."""
    world = dist.get_world_size()
    parts: list[Any] = [None] * world if dist.get_rank() == 0 else []
    dist.gather_object(local, parts if dist.get_rank() == 0 else None, dst=0)
    if dist.get_rank() != 0:
        return None
    frames = [pl.DataFrame(p) for p in parts if p and len(next(iter(p.values()))) > 0]
    return pl.concat(frames) if frames else pl.DataFrame()


def validation_metrics(spec: FeatureSpec, frame: pl.DataFrame) -> dict[str, dict[str, float]]:
    """The evaluation stage's metrics (no GAUC: the user ids do not travel with the batches) on the scored rows."""
    if frame.height == 0:
        return {}
    score_of = {c.removeprefix("pred:"): c for c in frame.columns if c.startswith("pred:")}
    return task_metrics(spec, frame, score_of, with_gauc=False)


@dataclass(frozen=True)
class EpochDecision:
    """Rank 0's verdict on one epoch, broadcast to every rank."""

    epoch: int
    metrics: dict[str, dict[str, float]]
    value: float
    improved: bool
    stop: bool


def decide(
    monitor: Monitor,
    validation: ValidationConfig,
    epoch: int,
    metrics: dict[str, dict[str, float]],
    best: float | None,
    stale_epochs: int,
) -> EpochDecision:
    """Improved when the watched metric beats the best so far by more than ``min_delta``; stop after ``patience``
    epochs in a row without that."""
    value = metrics.get(monitor.task, {}).get(monitor.metric, float("nan"))
    improved = monitor.gain(value, best) > validation.min_delta
    stale = 0 if improved else stale_epochs + 1
    stop = validation.patience is not None and stale >= validation.patience
    return EpochDecision(epoch=epoch, metrics=metrics, value=float(value), improved=improved, stop=stop)


def broadcast_decision(decision: EpochDecision | None) -> EpochDecision:
    """Rank 0's decision on every rank."""
    box: list[Any] = [decision]
    dist.broadcast_object_list(box, src=0)
    out = box[0]
    assert isinstance(out, EpochDecision)
    return out

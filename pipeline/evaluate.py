"""Evaluate stage: score the evaluation window with the unsharded model and compute per-task metrics, each beside the
oracle's value on the same rows (the generator's true probabilities: the best any model could reach).

Per binary task: AUC, logloss, calibration (mean prediction / mean label), and GAUC by user for tasks over all rows.
ESMM children: AUC etc. of p(child | parent) on the parent's positives, plus the product's AUC on all rows.
Regression: RMSE in label space (log space for log1p labels) on the task's sample space.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from sklearn.metrics import log_loss, roc_auc_score

from features.spec import FeatureSpec, TaskKind, row_ids
from features.transform import BatchTransform
from models.io import load_model, model_hash
from models.multitask import joint_name, predictions
from pipeline.config import ExperimentConfig
from pipeline.ingest import IngestResult
from pipeline.results import StageResult
from pipeline.train import TrainResult

_EPS = 1e-7


@dataclass(frozen=True)
class EvalResult(StageResult):
    """metrics and oracle: evaluation name (task, or ESMM product) -> metric -> value."""

    STAGE: ClassVar[str] = "evaluate"

    metrics: dict[str, dict[str, float]]
    oracle: dict[str, dict[str, float]]
    rows: int
    eval_dates: list[str]
    predictions_path: str
    notes: list[str] = field(default_factory=list)  # why a metric is absent (e.g. GAUC without a grouping key)
    model_hash: str = ""  # the weights scored (see pipeline/lineage.py)
    data_hash: str = ""  # the ingest whose evaluation window was scored

    def rows_for_table(self) -> list[tuple[str, str, float, float | None]]:
        out = []
        for name, metrics in self.metrics.items():
            for metric, value in metrics.items():
                out.append((name, metric, value, self.oracle.get(name, {}).get(metric)))
        return out

    def format_table(self) -> str:
        lines = [f"{'task':<12} {'metric':<14} {'value':>10} {'oracle':>10}", "-" * 49]
        for name, metric, value, oracle in self.rows_for_table():
            o = f"{oracle:10.4f}" if oracle is not None else f"{'-':>10}"
            lines.append(f"{name:<12} {metric:<14} {value:10.4f} {o}")
        return "\n".join(lines)


def binary_metrics(y: np.ndarray, p: np.ndarray) -> dict[str, float]:
    """AUC, logloss and calibration; AUC is NaN when only one class is present."""
    p = np.clip(p, _EPS, 1 - _EPS)
    both = 0 < y.sum() < len(y)
    return {
        "auc": float(roc_auc_score(y, p)) if both else float("nan"),
        "logloss": float(log_loss(y, p, labels=[0, 1])),
        "calibration": float(p.mean() / max(y.mean(), _EPS)),
        "rows": float(len(y)),
    }


def group_auc(groups: np.ndarray, y: np.ndarray, p: np.ndarray) -> float:
    """Impression-weighted mean of per-group AUC over groups that have both classes (GAUC), vectorised with ranks."""
    df = pl.DataFrame({"g": groups, "y": y.astype(np.float64), "p": p})
    df = df.with_columns(pl.col("p").rank("average").over("g").alias("r"))
    per = df.group_by("g").agg(
        n=pl.len(),
        pos=pl.col("y").sum(),
        rank_pos=(pl.col("r") * pl.col("y")).sum(),
    )
    per = per.filter((pl.col("pos") > 0) & (pl.col("pos") < pl.col("n")))
    if per.height == 0:
        return float("nan")
    n = per["n"].to_numpy().astype(np.float64)
    pos = per["pos"].to_numpy()
    auc = (per["rank_pos"].to_numpy() - pos * (pos + 1) / 2) / (pos * (n - pos))
    return float((auc * n).sum() / n.sum())


def regression_metrics(y: np.ndarray, pred: np.ndarray) -> dict[str, float]:
    return {
        "rmse": float(np.sqrt(np.mean((pred - y) ** 2))),
        "calibration": float(pred.mean() / max(abs(y.mean()), _EPS)),
        "rows": float(len(y)),
    }


def task_metrics(
    spec: FeatureSpec, frame: pl.DataFrame, score_of: dict[str, str], with_gauc: bool = True
) -> dict[str, dict[str, float]]:
    """Metrics per evaluation name. ``score_of`` maps evaluation names to score columns of ``frame``; label columns
    are ``label:<task>``. The same function scores the model and the oracle, so both see exactly the same rows."""
    out: dict[str, dict[str, float]] = {}
    user = spec.keys.user_id
    for task in spec.tasks:
        if task.name not in score_of:
            continue
        y = frame[f"label:{task.name}"].to_numpy()
        s = frame[score_of[task.name]].to_numpy()
        cond = task.given or task.esmm_parent
        rows = frame[f"label:{cond}"].to_numpy() > 0.5 if cond else np.ones(len(y), dtype=bool)
        if task.kind == TaskKind.binary:
            m = binary_metrics(y[rows], s[rows])
            if cond is None and with_gauc:
                gauc = group_auc(frame[user].to_numpy()[rows], y[rows], s[rows])
                if math.isfinite(gauc):  # undefined when no user has both classes (one row per user: Census)
                    m["gauc"] = gauc
        else:
            m = regression_metrics(y[rows], s[rows])
        out[task.name] = m
        if task.esmm_parent:
            jname = joint_name(task.esmm_parent, task.name)
            if jname in score_of:
                joint_y = frame[f"label:{task.esmm_parent}"].to_numpy() * y
                out[jname] = binary_metrics(joint_y, frame[score_of[jname]].to_numpy())
    return out


def score_files(
    files: list[str], model: torch.nn.Module, transform: BatchTransform, spec: FeatureSpec, batch_size: int
) -> pl.DataFrame:
    """Predictions and labels for every row of ``files``, with the row key (request id, or the derived row id) and
    the user id."""
    chunks: list[pl.DataFrame] = []
    with torch.no_grad():
        for path in files:
            start = 0
            for rb in pq.ParquetFile(path).iter_batches(batch_size=batch_size):
                table = pa.Table.from_batches([rb])
                batch = transform(table)
                preds = predictions(spec, model(batch))
                rid = spec.keys.request_id
                cols: dict[str, np.ndarray] = {
                    spec.row_key: table[rid].to_numpy() if rid else row_ids(path, start, table.num_rows),
                    spec.keys.user_id: table[spec.keys.user_id].to_numpy(),
                }
                start += table.num_rows
                cols.update({f"pred:{k}": v.numpy().astype(np.float64) for k, v in preds.items()})
                cols.update({f"label:{k}": v.numpy().astype(np.float64) for k, v in batch.labels.items()})
                chunks.append(pl.DataFrame(cols))
    return pl.concat(chunks)


def evaluate(cfg: ExperimentConfig, ingested: IngestResult, trained: TrainResult) -> EvalResult:
    scored_hash = model_hash(trained.model_dir)  # before loading: the hash of exactly what is scored
    loaded = load_model(trained.model_dir)
    transform = BatchTransform(loaded.spec, loaded.stats)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    frame = score_files(ingested.eval_files, loaded.model, transform, loaded.spec, cfg.eval.batch_size)
    pred_cols = {c.removeprefix("pred:"): c for c in frame.columns if c.startswith("pred:")}
    metrics = task_metrics(loaded.spec, frame, pred_cols)

    oracle: dict[str, dict[str, float]] = {}
    if cfg.data.oracle_path is not None and cfg.data.oracle_columns:
        if not Path(cfg.data.oracle_path).exists():
            raise FileNotFoundError(f"oracle file {cfg.data.oracle_path} (data.oracle_path) does not exist")
        truth = pl.read_parquet(cfg.data.oracle_path).rename(
            {col: f"oracle:{name}" for name, col in cfg.data.oracle_columns.items()}
        )
        key = loaded.spec.keys.request_id
        if key is None:
            raise ValueError(
                f"data.oracle_path {cfg.data.oracle_path} is joined on the request id, but the feature spec names "
                "none (keys.request_id)"
            )
        joined = frame.join(truth, on=key, how="left")
        missing = joined[f"oracle:{next(iter(cfg.data.oracle_columns))}"].null_count()
        if missing:
            raise ValueError(f"oracle file {cfg.data.oracle_path} lacks {missing} evaluation request ids")
        oracle = task_metrics(
            loaded.spec, joined, {name: f"oracle:{name}" for name in cfg.data.oracle_columns}, with_gauc=True
        )

    notes = [
        f"{t.name}: no GAUC, no user ({loaded.spec.keys.user_id}) has both classes in the evaluation window"
        for t in loaded.spec.tasks
        if t.kind == TaskKind.binary and not (t.given or t.esmm_parent) and "gauc" not in metrics.get(t.name, {})
    ]
    pred_path = cfg.run_dir.resolve() / "eval_predictions.parquet"
    frame.write_parquet(pred_path)
    result = EvalResult(
        metrics=metrics,
        oracle=oracle,
        rows=frame.height,
        eval_dates=ingested.eval_dates,
        predictions_path=str(pred_path),
        notes=notes,
        model_hash=scored_hash,
        data_hash=ingested.data_hash,
    )
    result.save(cfg.run_dir.resolve() / "eval.json")
    return result

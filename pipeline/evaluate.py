"""Evaluate stage: score the evaluation window with the unsharded model and compute per-task metrics, each beside the
oracle's value on the same rows (the generator's true probabilities: the best any model could reach).

Per binary task: AUC, logloss, calibration (mean prediction / mean label), and GAUC by user for tasks over all rows.
ESMM children: AUC etc. of p(child | parent) on the parent's positives, plus the product's AUC on all rows.
Regression: RMSE in label space (log space for log1p labels) on the task's sample space.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from features.spec import FeatureSpec, TaskKind, row_ids
from features.transform import BatchTransform
from models.io import load_model, model_hash
from models.multitask import predictions
from pipeline.config import ExperimentConfig
from pipeline.ingest import IngestResult
from pipeline.metrics import task_metrics
from pipeline.results import StageResult
from pipeline.train import TrainResult


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
    ingested.check_sources_unchanged()
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

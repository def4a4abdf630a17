"""Metrics of scored rows, shared by the evaluation stage and the per-epoch validation inside the training workers
(which must not import the stages)."""

from __future__ import annotations

import math

import numpy as np
import polars as pl
from sklearn.metrics import log_loss, roc_auc_score

from features.spec import FeatureSpec, TaskKind
from models.multitask import joint_name

_EPS = 1e-7


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

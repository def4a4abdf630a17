"""Evaluation metrics on hand-made frames: GAUC only where a grouping key makes it defined."""

from __future__ import annotations

import math

import numpy as np
import polars as pl

from features.spec import load_feature_spec
from pipeline.metrics import group_auc, task_metrics
from tests.conftest import REPO

SPEC = load_feature_spec(REPO / "configs/features/behaviour_logs.yaml")


def _frame(users: list[int], clicks: list[float], scores: list[float]) -> pl.DataFrame:
    n = len(users)
    return pl.DataFrame(
        {
            "user_id": users,
            "label:ctr": clicks,
            "label:cvr": [0.0] * n,
            "label:dwell": [0.0] * n,
            "pred:ctr": scores,
        }
    )


def test_gauc_is_reported_where_users_have_both_classes() -> None:
    frame = _frame([1, 1, 2, 2], [1.0, 0.0, 0.0, 1.0], [0.9, 0.1, 0.2, 0.8])
    metrics = task_metrics(SPEC, frame, {"ctr": "pred:ctr"})
    assert metrics["ctr"]["gauc"] == 1.0


def test_gauc_is_absent_not_nan_when_every_user_has_one_row() -> None:
    frame = _frame([1, 2, 3, 4], [1.0, 0.0, 0.0, 1.0], [0.9, 0.1, 0.2, 0.8])
    assert math.isnan(group_auc(np.array([1, 2, 3, 4]), np.array([1.0, 0, 0, 1]), np.array([0.9, 0.1, 0.2, 0.8])))
    metrics = task_metrics(SPEC, frame, {"ctr": "pred:ctr"})
    assert "gauc" not in metrics["ctr"] and metrics["ctr"]["auc"] == 1.0

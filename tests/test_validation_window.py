"""The validation window (``data.validation_days``): which dates it takes, which metric it watches, when it stops, and
(slow, real Ray Train workers) that the registered weights are the best epoch's."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import pytest

from features.validate import DataValidationError
from pipeline.config import ValidationConfig
from pipeline.ingest import split_validation
from pipeline.validation import Monitor, ValidationConfigError, decide, resolve_monitor
from tests.conftest import small_config


def _spec():  # type: ignore[no-untyped-def]
    return small_config(Path("/tmp/unused")).feature_spec()


def test_validation_days_are_the_last_before_the_eval_window() -> None:
    dates = ["2024-01-01", "2024-01-02", "2024-01-03", "2024-01-04"]
    assert split_validation(dates, 0) == (dates, [])
    assert split_validation(dates, 1) == (dates[:3], dates[3:])
    with pytest.raises(DataValidationError, match=r"data.validation_days=4 leaves no training partition"):
        split_validation(dates, 4)


def test_window_counts_training_days_beside_the_validation_days() -> None:
    cfg = small_config(Path("/tmp/unused"), "data.train_days=5", "data.validation_days=2")
    assert cfg.data.window_train_days == 7
    assert small_config(Path("/tmp/unused"), "data.validation_days=2").data.window_train_days is None


def test_default_metric_is_the_first_binary_tasks_auc() -> None:
    assert resolve_monitor(_spec(), ValidationConfig()) == Monitor("ctr", "auc", "max")
    assert resolve_monitor(_spec(), ValidationConfig(metric="dwell.rmse")) == Monitor("dwell", "rmse", "min")
    assert resolve_monitor(_spec(), ValidationConfig(metric="ctr_cvr.logloss")).mode == "min"


@pytest.mark.parametrize(
    ("metric", "message"),
    [
        ("clicks.auc", r"train.validation.metric 'clicks.auc': no task 'clicks'"),
        ("dwell.auc", r"'auc' is not watched for a regression task"),
        ("auc", r"no task ''"),
    ],
)
def test_a_wrong_metric_names_the_field(metric: str, message: str) -> None:
    with pytest.raises(ValidationConfigError, match=message):
        resolve_monitor(_spec(), ValidationConfig(metric=metric))


def test_improvement_patience_and_nan() -> None:
    auc, rmse = Monitor("ctr", "auc", "max"), Monitor("dwell", "rmse", "min")
    patient = ValidationConfig(patience=2)

    def step(monitor: Monitor, value: float, best: float | None, stale: int, config: ValidationConfig = patient):
        metrics = {monitor.task: {monitor.metric: value}}
        return decide(monitor, config, 1, metrics, best, stale)

    assert step(auc, 0.70, None, 0).improved  # the first epoch is the best so far
    assert step(auc, 0.71, 0.70, 0).improved
    assert not step(auc, 0.70, 0.71, 0).improved and not step(auc, 0.70, 0.71, 0).stop
    assert step(auc, 0.70, 0.71, 1).stop  # the second epoch in a row without a gain
    assert step(rmse, 0.9, 1.0, 0).improved and not step(rmse, 1.1, 1.0, 0).improved
    assert not step(auc, math.nan, None, 0).improved  # NaN never counts as a gain
    assert not step(auc, 0.7105, 0.71, 0, ValidationConfig(min_delta=0.001)).improved
    assert not step(auc, 0.60, 0.71, 5, ValidationConfig()).stop  # no patience: never stops


@pytest.mark.slow
def test_training_keeps_the_best_epoch_and_stops_early(tmp_path: Path, ray_local: None) -> None:
    """min_delta 1.0: no epoch after the first can count as a gain, so patience 1 stops after epoch 2 and the kept
    weights are epoch 1's: scoring them on the validation window reproduces epoch 1's recorded metric."""
    import pyarrow.parquet as pq

    from features.transform import BatchTransform
    from models.io import load_model
    from pipeline.evaluate import evaluate, score_files
    from pipeline.ingest import ingest
    from pipeline.metrics import task_metrics
    from pipeline.run import generate
    from pipeline.train import train

    cfg = small_config(
        tmp_path,
        "generator.impressions_per_day=8000",
        "generator.num_days=4",
        "data.validation_days=1",
        "train.batch_size=256",
        "train.epochs=4",
        "train.validation.patience=1",
        "train.validation.min_delta=1.0",
        "train.dense_lr=0.01",
    )
    generate(cfg)
    ingested = ingest(cfg)
    assert len(ingested.train_dates) == 2 and len(ingested.validation_dates) == 1 and len(ingested.eval_dates) == 1
    assert not set(ingested.validation_dates) & set(ingested.train_dates + ingested.eval_dates)
    rows = sum(pq.read_metadata(f).num_rows for f in ingested.validation_files)
    assert ingested.counts["validation"]["rows_used"] == rows == 8000
    trained = train(cfg, ingested)

    assert (trained.best_epoch, trained.epochs, trained.stopped_early) == (1, 2, True)
    assert [p["epoch"] for p in trained.validation] == [1, 2]
    assert set(trained.validation[0]["metrics"]) == {"ctr", "cvr", "ctr_cvr", "dwell"}
    first, second = (p["metrics"]["ctr"]["auc"] for p in trained.validation)
    assert first != second

    loaded = load_model(Path(trained.model_dir))
    frame = score_files(
        ingested.validation_files, loaded.model, BatchTransform(loaded.spec, loaded.stats), loaded.spec, 4096
    )
    kept = task_metrics(loaded.spec, frame, {"ctr": "pred:ctr"}, with_gauc=False)["ctr"]["auc"]
    # The workers' equal split may leave out one row of the window: a difference far below epoch to epoch.
    assert abs(kept - first) < 1e-3, (kept, first, second)
    assert abs(kept - first) < abs(kept - second), (kept, first, second)

    evaluated = evaluate(cfg, ingested, trained)  # the evaluation stage scores exactly these weights
    assert evaluated.model_hash == trained.model_hash

    # The same command again resumes from the final checkpoint: the best epoch's weights come back from its shards.
    again = train(cfg, ingested)
    assert again.resumed_from_step == trained.steps and again.best_epoch == 1
    assert again.model_hash == trained.model_hash
    shutil.rmtree(tmp_path / "ray_results", ignore_errors=True)

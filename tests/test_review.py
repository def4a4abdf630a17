"""What a reviewer relies on, checked without a server or a training run: the calibration plot's points, the
fail-closed gate, stage results bound to the weights they describe, training that would do nothing, the quarantine
sample, and credentials kept out of tracking URIs and of the config handed to other processes."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from jobs.cli import app
from pipeline.config import Bound, ConfigError, loggable_config
from pipeline.gate import gate
from tests.conftest import SMALL_CONFIG, small_config

NAN = float("nan")

# ---------------------------------------------------------------------------------------------------------------------
# Calibration plot


def _ctr_frame(n: int, seed: int) -> tuple[pl.DataFrame, np.ndarray]:
    rng = np.random.default_rng(seed)
    rate = rng.uniform(0.01, 0.2, n)
    click = (rng.random(n) < rate).astype(np.float64)
    return pl.DataFrame({"request_id": np.arange(n), "label:ctr": click, "pred:ctr": rate}), rate


def test_calibration_points_lie_on_the_diagonal_and_below_it_for_twice_the_rate(tmp_path: Path) -> None:
    from pipeline.report import calibration_series, plot_calibration

    spec = small_config(tmp_path).feature_spec()
    frame, _ = _ctr_frame(200_000, seed=0)
    calibrated = calibration_series(spec, frame, "ctr")
    assert calibrated is not None
    pred, label = calibrated
    assert len(pred) == 10 and pred.min() < 0.03 and pred.max() > 0.18, "x is the mean prediction per decile"
    assert np.allclose(label, pred, atol=0.01), (pred, label)

    doubled = frame.with_columns(pl.col("pred:ctr") * 2)
    pred2, label2 = calibration_series(spec, doubled, "ctr") or (None, None)
    assert pred2 is not None and label2 is not None
    assert np.all(label2 < pred2), "a model predicting twice the true rate plots below the diagonal"
    assert np.allclose(label2, pred2 / 2, atol=0.01), (pred2, label2)

    out = plot_calibration(spec, doubled, frame, "champion", tmp_path / "calibration.png")
    assert out.stat().st_size > 0


# ---------------------------------------------------------------------------------------------------------------------
# The gate fails closed


def test_gate_needs_a_finite_comparison_and_fails_on_nan() -> None:
    thresholds = {"*.auc": 0.005}
    model = {"ctr": {"auc": 0.80}}
    assert gate(model, {"ctr": {"auc": 0.80}}, thresholds).passed

    nothing = gate({"cvr": {"auc": 0.9}}, {"ctr": {"auc": 0.8}}, thresholds)  # no evaluation name in common
    assert not nothing.passed and "nothing compared" in nothing.reason()
    assert not gate(model, {"ctr": {"auc": 0.80}}, {}).passed, "no threshold at all compares nothing"
    champion_nan = gate(model, {"ctr": {"auc": NAN}}, thresholds)
    assert not champion_nan.passed and "champion's value is not finite" in champion_nan.reason()
    assert not gate({"ctr": {"auc": NAN}}, {"ctr": {"auc": NAN}}, thresholds).passed, "NaN vs NaN fails"
    assert not gate({"ctr": {"auc": math.inf}}, {"ctr": {"auc": 0.8}}, thresholds).passed
    # One finite comparison passing does not cover a NaN elsewhere.
    mixed = gate({"ctr": {"auc": 0.8}, "cvr": {"auc": NAN}}, {"ctr": {"auc": 0.8}, "cvr": {"auc": 0.7}}, thresholds)
    assert not mixed.passed and [c.key for c in mixed.failures] == ["cvr.auc"]


def test_a_first_champion_needs_absolute_bounds() -> None:
    thresholds = {"*.auc": 0.005}
    model = {"ctr": {"auc": 0.75, "calibration": 1.1}, "cvr": {"auc": 0.72}, "dwell": {"rmse": 0.6}}
    unchecked = gate(model, None, thresholds)
    assert not unchecked.passed
    assert "promotion.bounds" in unchecked.reason() and "--allow-first" in unchecked.reason()

    bounds = {"*.auc": Bound(min=0.7), "ctr.calibration": Bound(min=0.8, max=1.25), "dwell.rmse": Bound(max=0.7)}
    first = gate(model, None, thresholds, bounds)
    assert first.passed, first.reason()
    assert {c.key for c in first.checks} == {"ctr.auc", "cvr.auc", "ctr.calibration", "dwell.rmse"}
    assert not gate({**model, "cvr": {"auc": 0.65}}, None, thresholds, bounds).passed
    assert not gate({**model, "ctr": {"auc": 0.75, "calibration": 1.3}}, None, thresholds, bounds).passed
    assert not gate({**model, "ctr": {"auc": NAN, "calibration": 1.0}}, None, thresholds, bounds).passed
    assert not gate(model, None, thresholds, {"ctr_cvr.auc": Bound(min=0.5)}).passed, "a named bound must apply"
    # Beside a champion the bounds still hold, and they do not stand in for a comparison with it.
    champion = {"ctr": {"auc": 0.75}, "cvr": {"auc": 0.60}}
    assert not gate({**model, "cvr": {"auc": 0.65}}, champion, thresholds, bounds).passed
    assert not gate(model, {"other": {"auc": 0.7}}, thresholds, bounds).passed


def test_bounds_config_is_validated(tmp_path: Path) -> None:
    cfg = small_config(tmp_path, 'promotion.bounds={"*.auc": {min: 0.6}, ctr.calibration: {min: 0.8, max: 1.25}}')
    assert cfg.promotion.bounds["ctr.calibration"] == Bound(min=0.8, max=1.25)
    for bad in ("promotion.bounds={ctr.auc: {}}", "promotion.bounds={ctr.auc: {min: 2, max: 1}}"):
        with pytest.raises(ConfigError, match=r"promotion\.bounds"):
            small_config(tmp_path, bad)


# ---------------------------------------------------------------------------------------------------------------------
# Stage results bound to the weights and data they describe


def _write_model(folder: Path, value: float) -> None:
    import torch
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    save_file({"w": torch.full((4,), value)}, str(folder / "weights.safetensors"))
    (folder / "model.json").write_text(json.dumps({"spec": {}}))


def _stage_results(model_dir: Path, data_hash: str = "d1") -> tuple[object, object, object]:
    from models.io import model_hash
    from pipeline.evaluate import EvalResult
    from pipeline.ingest import IngestResult
    from pipeline.train import TrainResult

    ingested = IngestResult(["2026-01-01"], ["2026-01-02"], [], [], "", "", {}, data_hash=data_hash)
    key = model_hash(model_dir)
    trained = TrainResult(str(model_dir), 3, 300, 1.0, 300.0, {}, {}, model_hash=key, data_hash=data_hash)
    trained = TrainResult(**{**trained.__dict__, "train_dates": ["2026-01-01"]})
    evaluated = EvalResult({}, {}, 10, ["2026-01-02"], "", model_hash=key, data_hash=data_hash)
    return ingested, trained, evaluated


def test_stage_results_must_describe_the_same_weights_and_data(tmp_path: Path) -> None:
    import dataclasses

    from models.io import model_hash
    from pipeline.lineage import StageMismatchError, check_stage_results

    model_dir = tmp_path / "model"
    _write_model(model_dir, 1.0)
    ingested, trained, evaluated = _stage_results(model_dir)
    assert check_stage_results(ingested, trained, evaluated) == model_hash(model_dir)  # type: ignore[arg-type]

    # Trained again (new weights, new train.json), not evaluated again: the metrics are of the old weights.
    _write_model(model_dir, 2.0)
    retrained = dataclasses.replace(trained, model_hash=model_hash(model_dir))  # type: ignore[type-var]
    with pytest.raises(StageMismatchError, match=r"eval.json scored the weights .*Re-run `mtrec evaluate`"):
        check_stage_results(ingested, retrained, evaluated)  # type: ignore[arg-type]
    # Weights changed behind train.json's back.
    with pytest.raises(StageMismatchError, match=r"not those train.json describes.*`mtrec train` and `mtrec evaluate`"):
        check_stage_results(ingested, trained, evaluated)  # type: ignore[arg-type]
    # Ingested again (another window) after training and evaluating.
    other = dataclasses.replace(ingested, data_hash="d2", train_dates=["2026-01-05"])  # type: ignore[type-var]
    with pytest.raises(StageMismatchError, match="stage `train` first"):
        check_stage_results(other, retrained, evaluated)  # type: ignore[arg-type]
    # An untrained model is refused whatever the hashes say.
    idle = dataclasses.replace(retrained, steps=0)  # type: ignore[type-var]
    fresh = dataclasses.replace(evaluated, model_hash=model_hash(model_dir))  # type: ignore[type-var]
    with pytest.raises(StageMismatchError, match="0 training steps"):
        check_stage_results(ingested, idle, fresh)  # type: ignore[arg-type]
    assert check_stage_results(ingested, retrained, fresh) == model_hash(model_dir)  # type: ignore[arg-type]


def test_row_accounting_of_the_equal_split_and_drop_last() -> None:
    from pipeline.train import RowAccounting

    rows = RowAccounting.of(1000, batch_size=100, world=3)
    assert rows.steps_per_epoch == 3 and rows.rows_trained_per_epoch == 900
    assert rows.dropped_by_equal_split == 1 and rows.dropped_by_drop_last == 99
    assert rows.rows_trained_per_epoch + rows.dropped_by_equal_split + rows.dropped_by_drop_last == 1000


def test_train_refuses_a_window_smaller_than_one_global_batch(tmp_path: Path) -> None:
    """Through the CLI: 1,000 usable rows over 2 workers of batch 512 would train 0 steps; it fails before Ray."""
    from pipeline.ingest import IngestResult

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    counts = {"rows_read": 1000, "rows_used": 1000, "rows_quarantined": 0, "by_reason": {}}
    IngestResult(["2026-01-01"], ["2026-01-02"], [], [], "", "", {"train": counts}, data_hash="d").save(
        run_dir / "ingest.json"
    )
    args = ["train", "--config", str(SMALL_CONFIG), "--set", f"run_dir={run_dir}", "--set", "train.num_workers=2"]
    result = CliRunner().invoke(app, [*args, "--set", "train.batch_size=512"])
    assert result.exit_code == 1, result.output
    assert "nothing to train" in result.output and "1,000 usable rows" in result.output
    assert "0 steps" in result.output and "train.batch_size" in result.output
    assert not (run_dir / "train.json").exists()


# ---------------------------------------------------------------------------------------------------------------------
# Raw rows and credentials


def test_quarantine_sample_is_small_and_covers_every_reason(tmp_path: Path) -> None:
    from pipeline.register import _quarantine_sample

    n = 500
    reasons = ["null user_id"] * 400 + ["negative dwell"] * 95 + ["conversion without click"] * 5
    table = pa.table({"user_id": list(range(n)), "reason": reasons, "source_file": ["f"] * n})
    pq.write_table(table, tmp_path / "quarantine.parquet")
    sampled, total = _quarantine_sample(tmp_path / "quarantine.parquet", 20, tmp_path / "sample.parquet")
    assert (sampled, total) == (20, 500)
    sample = pl.read_parquet(tmp_path / "sample.parquet")
    assert sample.height == 20 and set(sample["reason"]) == set(reasons)
    assert _quarantine_sample(tmp_path / "quarantine.parquet", 0, tmp_path / "none.parquet") == (0, 500)
    assert not (tmp_path / "none.parquet").exists()


def test_tracking_uri_with_credentials_is_refused(tmp_path: Path) -> None:
    uri = "mlflow.tracking_uri=https://alice:s3cret@mlflow.example.com"
    with pytest.raises(ConfigError) as info:
        small_config(tmp_path, uri)
    message = str(info.value)
    assert "mlflow.tracking_uri" in message and "MLFLOW_TRACKING_USERNAME" in message
    assert "MLFLOW_TRACKING_PASSWORD" in message and "s3cret" not in message
    # Through submission too: refused before anything is sent, without echoing the password.
    result = CliRunner().invoke(
        app, ["submit", "--config", str(SMALL_CONFIG), "--address", "http://127.0.0.1:9", "--set", uri]
    )
    assert result.exit_code == 2 and "MLFLOW_TRACKING_USERNAME" in result.output and "s3cret" not in result.output
    assert small_config(tmp_path, "mlflow.tracking_uri=https://mlflow.example.com").mlflow.tracking_uri


def test_loggable_config_drops_the_submission_environment(tmp_path: Path) -> None:
    cfg = small_config(tmp_path, "submit.runtime_env={env_vars: {API_TOKEN: s3cret-token}}")
    assert "s3cret-token" in json.dumps(cfg.model_dump(mode="json"))
    logged = loggable_config(cfg)
    assert "s3cret-token" not in json.dumps(logged)
    assert type(cfg).model_validate(logged).train == cfg.train, "workers rebuild the config from the loggable one"


def test_only_alias_not_found_means_no_such_alias(tmp_path: Path) -> None:
    """A missing model or alias is "none"; any other registry error raises (it must not read as "no champion")."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    from pipeline.registry import version_by_alias

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    assert version_by_alias(client, "no-such-model", "champion") is None
    client.create_registered_model("m")
    assert version_by_alias(client, "m", "champion") is None
    with pytest.raises(MlflowException, match="alias name cannot be empty"):
        version_by_alias(client, "m", "")
    with pytest.raises(MlflowException, match="Missing value for required parameter 'name'"):
        version_by_alias(client, "", "champion")


def test_training_workers_receive_the_loggable_config(tmp_path: Path) -> None:
    from pipeline.ingest import IngestResult
    from pipeline.train import worker_config

    cfg = small_config(
        tmp_path, "submit.runtime_env={env_vars: {API_TOKEN: s3cret-token}}", "mlflow.tracking_uri=http://mlflow:5000"
    )
    (tmp_path / "stats.json").write_text(json.dumps({"mean": {}, "std": {}}))
    ingested = IngestResult([], [], [], [], "", str(tmp_path / "stats.json"), {})
    handed = json.dumps(worker_config(cfg, ingested, None, {}))
    assert "s3cret-token" not in handed and "mlflow:5000" not in handed
    assert json.loads(handed)["experiment"]["train"]["batch_size"] == cfg.train.batch_size

"""The whole pipeline on the small config, with the real things: local Ray (2 workers), TorchRec sharding over gloo,
a SQLite MLflow store. The run itself happens once per test run (``pipeline_run`` in conftest.py)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow.parquet as pq
import pytest
from mlflow.tracking import MlflowClient

pytestmark = pytest.mark.slow


def test_counts_add_up_and_quarantine_exists(pipeline_run) -> None:  # type: ignore[no-untyped-def]
    _, result = pipeline_run
    counts = result.ingested.total_counts()
    assert counts.rows_read == counts.rows_used + counts.rows_quarantined
    assert counts.rows_read == result.generated.rows
    assert Path(result.ingested.quarantine_path).exists()
    files = result.ingested.train_files + result.ingested.eval_files
    clean_rows = sum(pq.ParquetFile(f).metadata.num_rows for f in files)
    assert clean_rows == counts.rows_used
    assert result.ingested.eval_dates == [result.generated.dates[-1]]


def test_training_used_both_workers_and_sharded_tables(pipeline_run) -> None:  # type: ignore[no-untyped-def]
    cfg, result = pipeline_run
    trained = result.trained
    assert trained.world_size == 2
    assert trained.steps > 0 and trained.samples == trained.steps * cfg.train.batch_size * 2
    sharded = {t: p for t, p in trained.plan.items() if p["sharding_type"] != "data_parallel"}
    assert "item" in sharded and sharded["item"]["compute_kernel"] == "fused"
    assert {t.name for t in cfg.feature_spec().tables} == set(trained.plan)
    # The small windows fit the local object store: read once, not per epoch; the loop's own measurements are kept.
    assert trained.materialized
    assert trained.steady_samples_per_s > 0 and trained.samples_per_s > 0
    phases = ("prepare_data_s", "workers_up_s", "build_and_shard_s", "first_batch_s")
    assert all(trained.startup[k] >= 0 for k in phases)
    assert trained.startup["total_s"] == pytest.approx(sum(trained.startup[k] for k in phases), abs=0.01)
    # One checkpoint per epoch end, the last one being the final checkpoint itself (not written twice).
    assert trained.epochs == cfg.train.epochs and trained.checkpoints == cfg.train.epochs
    after = ("checkpoint_and_workers_done_s", "export_s")
    assert all(trained.wind_down[k] >= 0 for k in after)
    assert trained.wind_down["total_s"] == pytest.approx(sum(trained.wind_down[k] for k in after), abs=0.01)


def test_evaluation_beats_chance_and_reports_oracle(pipeline_run) -> None:  # type: ignore[no-untyped-def]
    _, result = pipeline_run
    metrics, oracle = result.evaluated.metrics, result.evaluated.oracle
    assert metrics["ctr"]["auc"] > 0.62, metrics["ctr"]
    assert oracle["ctr"]["auc"] > metrics["ctr"]["auc"]  # the oracle bounds what a model can reach
    for name in ("ctr", "cvr", "ctr_cvr", "dwell"):
        assert name in metrics and name in oracle
    assert "gauc" in metrics["ctr"]
    assert np.isfinite(metrics["dwell"]["rmse"])
    # CVR is evaluated on clicked rows only, CTCVR on all rows.
    assert metrics["cvr"]["rows"] < metrics["ctr_cvr"]["rows"] == result.evaluated.rows


def test_registered_version_has_metrics_tags_and_alias(pipeline_run) -> None:  # type: ignore[no-untyped-def]
    cfg, result = pipeline_run
    reg = result.registered
    client = MlflowClient(tracking_uri=cfg.tracking_uri(), registry_uri=cfg.tracking_uri())
    version = client.get_model_version_by_alias(cfg.mlflow.model_name, "challenger")
    assert str(version.version) == reg.version
    for tag in ("data_window", "config_hash", "code_revision"):
        assert version.tags.get(tag), tag
    run = client.get_run(reg.run_id)
    assert run.data.metrics["ctr.auc"] == pytest.approx(result.evaluated.metrics["ctr"]["auc"])
    assert run.data.metrics["data.rows_read"] == result.ingested.total_counts().rows_read
    assert "oracle.ctr.auc" in run.data.metrics
    assert run.data.metrics["params.total"] == run.data.metrics["params.embeddings"] + run.data.metrics["params.dense"]
    assert run.data.params["train.batch_size"] == str(cfg.train.batch_size)
    assert version.tags["data_hash"] == result.ingested.data_hash == result.trained.data_hash
    assert version.tags["model_hash"] == result.trained.model_hash == result.evaluated.model_hash
    artifacts = {a.path for a in client.list_artifacts(reg.run_id, "data")}
    assert "data/counts.json" in artifacts
    assert "data/quarantine.parquet" not in artifacts, "raw quarantined rows are uploaded only as a small sample"
    rows = result.trained.rows
    assert rows["rows_used"] == result.ingested.counts["train"]["rows_used"]
    assert (
        rows["rows_trained_per_epoch"] + rows["dropped_by_equal_split"] + rows["dropped_by_drop_last"]
        == (rows["rows_used"])
    )
    assert run.data.metrics["train.rows.rows_trained_per_epoch"] == rows["rows_trained_per_epoch"]
    assert run.data.metrics["train.startup.total_s"] == result.trained.startup["total_s"]
    assert run.data.metrics["train.wind_down.total_s"] == result.trained.wind_down["total_s"]


def test_drgrad_diagnostics_in_mlflow(pipeline_run) -> None:  # type: ignore[no-untyped-def]
    """The shared run trains with DRGrad: its sampled diagnostics are metric series and a plot artifact."""
    cfg, result = pipeline_run
    assert cfg.gradients.method == "drgrad"
    client = MlflowClient(tracking_uri=cfg.tracking_uri(), registry_uri=cfg.tracking_uri())
    run_id = result.registered.run_id
    for name in ("xi1", "xi2", "lam1", "lam2", "mu_own", "conflict"):
        history = client.get_metric_history(run_id, f"gradients.drgrad.{name}")
        assert len(history) >= 2, name
        assert all(0 <= h.step <= result.trained.steps for h in history)
    mu = [h.value for h in client.get_metric_history(run_id, "gradients.drgrad.mu_own")]
    assert all(0.0 < v < 1.0 for v in mu) and mu[-1] != 0.5  # the updater moved mu
    plots = {a.path for a in client.list_artifacts(run_id, "plots")}
    assert "plots/gradient_diagnostics.png" in plots


def test_fresh_process_scores_raw_rows_like_evaluation(pipeline_run, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    cfg, result = pipeline_run
    eval_file = result.ingested.eval_files[0]
    script = f"""
import json, sys
import mlflow, pyarrow.parquet as pq
from features.spec import load_feature_spec
from pipeline.pyfunc import feature_columns
mlflow.set_tracking_uri({cfg.tracking_uri()!r})
model = mlflow.pyfunc.load_model("models:/{cfg.mlflow.model_name}@challenger")
table = pq.read_table({eval_file!r}).slice(0, 300)
out = model.predict(table.select(feature_columns(load_feature_spec({str(cfg.features)!r}))).to_pandas())
out["request_id"] = table["request_id"].to_numpy()
out.to_parquet({str(tmp_path / "scores.parquet")!r})
"""
    subprocess.run([sys.executable, "-c", script], check=True, timeout=300)
    scores = pl.read_parquet(tmp_path / "scores.parquet")
    reference = pl.read_parquet(result.evaluated.predictions_path)
    joined = scores.join(reference, on="request_id", how="inner")
    assert joined.height == 300
    for task in ("ctr", "cvr", "ctr_cvr", "dwell"):
        np.testing.assert_allclose(joined[task].to_numpy(), joined[f"pred:{task}"].to_numpy(), rtol=1e-5, atol=1e-6)


def test_run_artifacts_on_disk(pipeline_run) -> None:  # type: ignore[no-untyped-def]
    cfg, result = pipeline_run
    model_dir = Path(result.trained.model_dir)
    for name in ("weights.safetensors", "model.json", "plan.json", "training_curve.json", "dcp/.metadata"):
        assert (model_dir / name).exists(), name
    curve = json.loads((model_dir / "training_curve.json").read_text())
    assert curve and curve[0]["step"] == cfg.train.log_every

"""Model registry review against a real ``mlflow server`` over HTTP: idempotent registration, model card and plots,
the promotion gate (first champion, a rejected regression, a passing challenger), a server outage during
registration, and a fresh process scoring ``models:/<name>@champion`` exactly like the evaluation did.

The slow tests share the test run's trained model (``pipeline_run``) and one server for the module; each uses its own
registered model name and run directory, so they do not depend on each other's order. Model variants for the gate are
made from the trained weights (no second training): one with the CTR logit negated (AUC becomes 1 - AUC: a certain
regression), one with a negligible bias shift (same ranking: a certain pass).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pipeline.config import ExperimentConfig
from pipeline.gate import gate
from pipeline.registry import is_transient, redact
from tests.conftest import DRGRAD_SET, small_config

VENV_BIN = Path(sys.executable).parent
# What a first champion must meet (the shared test run's trained model beats chance on ctr and is roughly calibrated).
FIRST_CHAMPION_BOUNDS = "promotion.bounds={ctr.auc: {min: 0.55}, ctr.calibration: {min: 0.5, max: 2.0}}"


# ---------------------------------------------------------------------------------------------------------------------
# Fast: the gate, credential redaction, transient-error classification


def test_gate_thresholds_directions_and_wildcards() -> None:
    champion = {
        "ctr": {"auc": 0.80, "gauc": 0.70, "calibration": 1.02, "rows": 100.0},
        "cvr": {"auc": 0.70},
        "dwell": {"rmse": 0.50},
    }
    ok = {"ctr": {"auc": 0.797, "gauc": 0.71, "calibration": 0.99}, "cvr": {"auc": 0.75}, "dwell": {"rmse": 0.505}}
    thresholds = {"*.auc": 0.005, "*.gauc": 0.005, "dwell.rmse": 0.01, "ctr.calibration": 0.0}
    result = gate(ok, champion, thresholds)
    assert result.passed, result.reason()
    assert {c.key for c in result.checks} == {"ctr.auc", "cvr.auc", "ctr.gauc", "dwell.rmse", "ctr.calibration"}

    worse = {**ok, "cvr": {"auc": 0.69}, "dwell": {"rmse": 0.52}}  # AUC -0.01 > 0.005; RMSE +0.02 > 0.01
    result = gate(worse, champion, thresholds)
    assert not result.passed
    assert {c.key for c in result.failures} == {"cvr.auc", "dwell.rmse"}
    assert "cvr.auc" in result.reason() and "dwell.rmse" in result.reason()

    # Calibration: distance from 1 may not grow; an explicit entry for a missing task fails; NaN AUC fails.
    assert not gate({**ok, "ctr": {**ok["ctr"], "calibration": 1.05}}, champion, thresholds).passed
    assert not gate(ok, champion, {"ctr_cvr.auc": 0.01}).passed
    assert not gate({**ok, "cvr": {"auc": float("nan")}}, champion, thresholds).passed
    # An explicit entry overrides the wildcard for its name.
    assert gate({**ok, "cvr": {"auc": 0.60}}, champion, {"*.auc": 0.005, "cvr.auc": 0.2}).passed


def test_redact_and_transient_errors() -> None:
    from mlflow.exceptions import MlflowException

    text = "API request to https://alice:s3cret@mlflow.example.com/api/2.0/x failed with exception refused"
    assert "s3cret" not in redact(text) and "alice" not in redact(text)
    assert "https://***@mlflow.example.com/api" in redact(text)
    assert redact("sqlite:////tmp/x.db") == "sqlite:////tmp/x.db"
    assert is_transient(MlflowException(text))
    assert is_transient(ConnectionRefusedError())
    assert not is_transient(MlflowException("RESOURCE_DOES_NOT_EXIST: no such model"))
    assert not is_transient(ValueError("bad"))


# ---------------------------------------------------------------------------------------------------------------------
# A real tracking server


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class MlflowServer:
    """``mlflow server`` on 127.0.0.1 with a SQLite backend and proxied artifacts, in its own process group so that
    stopping it stops exactly its processes."""

    def __init__(self, root: Path, extra_args: tuple[str, ...] = (), extra_env: dict[str, str] | None = None) -> None:
        self.root = root
        self.port = free_port()
        self.extra_args: list[str] = list(extra_args)  # e.g. ["--app-name", "basic-auth"]
        self.extra_env = extra_env or {}
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        log = open(self.root / "server.log", "ab")  # noqa: SIM115 (kept open for the process's lifetime)
        # No background job workers needed.
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", **self.extra_env}
        self.proc = subprocess.Popen(
            [
                str(VENV_BIN / "mlflow"),
                "server",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--workers",
                "1",
                "--backend-store-uri",
                f"sqlite:///{self.root / 'mlflow.db'}",
                "--artifacts-destination",
                str(self.root / "artifacts"),
                *self.extra_args,
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited: {(self.root / 'server.log').read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as resp:
                    if resp.status == 200:
                        return
            except OSError:
                time.sleep(0.5)
        raise RuntimeError("mlflow server did not become healthy in 180s")

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)
        # Uvicorn's worker may outlive the parent briefly; the whole group goes.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MlflowServer]:
    srv = MlflowServer(tmp_path_factory.mktemp("mlflow_server"))
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()


# ---------------------------------------------------------------------------------------------------------------------
# Helpers over the test run's trained model


def stage_run_dir(pipeline_run: Any, run_dir: Path) -> None:
    """A run directory of its own holding the trained run's stage outputs (their paths point at the original)."""
    cfg, _ = pipeline_run
    run_dir.mkdir(parents=True, exist_ok=True)
    for name in ("ingest.json", "train.json", "eval.json"):
        shutil.copy2(cfg.run_dir.resolve() / name, run_dir / name)


def http_config(pipeline_run: Any, run_dir: Path, server: MlflowServer, name: str, *more: str) -> ExperimentConfig:
    cfg, _ = pipeline_run
    original = cfg.run_dir.resolve()
    return small_config(
        run_dir,
        f"data.path={original / 'data'}",
        f"data.oracle_path={original / 'oracle.parquet'}",
        f"mlflow.tracking_uri={server.uri}",
        f"mlflow.model_name={name}",
        f"mlflow.experiment={name}",
        "registry.retries=1",
        "registry.backoff_s=0.5",
        FIRST_CHAMPION_BOUNDS,
        *DRGRAD_SET,  # the gradients section the shared test run (pipeline_run) was trained with
        *more,
    )


def stages(run_dir: Path) -> tuple[Any, Any, Any]:
    from pipeline.evaluate import EvalResult
    from pipeline.ingest import IngestResult
    from pipeline.train import TrainResult

    return (
        IngestResult.load(run_dir / "ingest.json"),
        TrainResult.load(run_dir / "train.json"),
        EvalResult.load(run_dir / "eval.json"),
    )


def variant(pipeline_run: Any, run_dir: Path, cfg: ExperimentConfig, kind: str) -> tuple[Any, Any, Any]:
    """A copy of the trained model changed by ``kind``, evaluated on the same window into ``run_dir``."""
    import dataclasses

    import torch
    from safetensors.torch import load_file, save_file

    from pipeline.evaluate import evaluate

    stage_run_dir(pipeline_run, run_dir)
    ingested, trained, _ = stages(run_dir)
    model_dir = run_dir / "model"
    shutil.copytree(trained.model_dir, model_dir, ignore=shutil.ignore_patterns("dcp"))
    weights = load_file(str(model_dir / "weights.safetensors"))
    # The CTR output layer: the tensors whose first dimension is 1 (the logit) under towers.ctr., or under both primary
    # towers (T1', T1'') when the shared test run trained DRGrad's split head with ctr as the primary task.
    prefixes = ("towers.ctr.", "head.own.", "head.shared.")
    logit = [k for k, v in weights.items() if k.startswith(prefixes) and v.shape[0] == 1]
    assert logit, f"no CTR output layer among {list(weights)}"
    for k in logit:
        if kind == "negate_ctr":
            weights[k] = -weights[k]
        elif kind.startswith("nudge") and k.endswith("bias"):  # nudge, nudge2, ...: same ranking, other hashes
            weights[k] = weights[k] + 1e-6 * int(kind.removeprefix("nudge") or 1)
    save_file({k: v.contiguous() for k, v in weights.items()}, str(model_dir / "weights.safetensors"))
    from models.io import model_hash

    trained = dataclasses.replace(trained, model_dir=str(model_dir), model_hash=model_hash(model_dir))
    trained.save(run_dir / "train.json")
    torch.set_num_threads(1)
    evaluated = evaluate(cfg, ingested, trained)
    return ingested, trained, evaluated


def with_quarantined_rows(run_dir: Path, rows: int) -> None:
    """Point the run's ingest result at a quarantine file of ``rows`` rejected rows (generated logs have none)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.ingest import IngestResult

    ingested = IngestResult.load(run_dir / "ingest.json")
    table = pq.read_table(ingested.eval_files[0]).slice(0, rows)
    reasons = ["null user_id" if i % 3 else "negative dwell_seconds" for i in range(rows)]
    table = table.append_column("reason", pa.array(reasons)).append_column("source_file", pa.array(["x"] * rows))
    pq.write_table(table, run_dir / "quarantine.parquet")
    dataclass_fields = {**ingested.__dict__, "quarantine_path": str(run_dir / "quarantine.parquet")}
    IngestResult(**dataclass_fields).save(run_dir / "ingest.json")


def client_for(cfg: ExperimentConfig) -> Any:
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=cfg.tracking_uri(), registry_uri=cfg.tracking_uri())


def versions(cfg: ExperimentConfig) -> list[Any]:
    return client_for(cfg).search_model_versions(f"name='{cfg.mlflow.model_name}'")


# ---------------------------------------------------------------------------------------------------------------------
# Slow: against the server


@pytest.fixture(scope="module")
def champion_a(pipeline_run: Any, server: MlflowServer, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """Model 'reg-a': the trained model registered twice (one version) and promoted (first champion)."""
    from pipeline.promote import promote
    from pipeline.register import register

    run_dir = tmp_path_factory.mktemp("reg_a")
    stage_run_dir(pipeline_run, run_dir)
    with_quarantined_rows(run_dir, 60)
    cfg = http_config(pipeline_run, run_dir, server, "reg-a")
    first = register(cfg, *stages(run_dir))
    second = register(cfg, *stages(run_dir))
    decision = promote(cfg)
    again = promote(cfg)
    return cfg, first, second, decision, again


@pytest.mark.slow
def test_register_is_idempotent_with_card_plots_signature(champion_a: Any) -> None:
    import mlflow

    cfg, first, second, _, _ = champion_a
    assert first == second, "registering the same training run twice must return the same version"
    assert [v.version for v in versions(cfg)] == ["1"]
    client = client_for(cfg)
    exp = client.get_experiment_by_name(cfg.mlflow.experiment)
    assert len(client.search_runs([exp.experiment_id])) == 1, "the second register must not log a second run"
    assert exp.artifact_location.startswith("mlflow-artifacts:"), "artifacts must go through the server"

    version = client.get_model_version(cfg.mlflow.model_name, "1")
    assert version.tags["registration"] == "complete" and version.tags["model_hash"]
    assert client.get_model_version_by_alias(cfg.mlflow.model_name, "challenger").version == "1"
    assert "version 1" in version.description and "ctr" in version.description
    # The logged model carries the run's metrics (MLflow's model view): the evaluation's and the loss curve.
    (output,) = client.get_run(first.run_id).outputs.model_outputs
    linked = {m.key for m in client.get_logged_model(output.model_id).metrics or []}
    assert "ctr.auc" in linked and any(key.startswith("train_loss.") for key in linked), sorted(linked)[:20]

    artifacts = {a.path for d in ("card", "plots", "eval") for a in client.list_artifacts(first.run_id, d)}
    for path in ("card/model_card.md", "card/summary.md", "eval/metrics.json"):
        assert path in artifacts
    for plot in ("calibration.png", "metrics_vs_champion.png", "training_curves.png"):
        assert f"plots/{plot}" in artifacts
    card = Path(mlflow.artifacts.download_artifacts(run_id=first.run_id, artifact_path="card/model_card.md"))
    text = card.read_text()
    for needle in ("training window", "evaluation window", "rows quarantined", "| ctr | auc |", "## Configuration"):
        assert needle in text
    # Raw rows: a sample of mlflow.quarantine_sample_rows (20) over both reasons; the full file stays in run_dir.
    import polars as pl

    data = {a.path for a in client.list_artifacts(first.run_id, "data")}
    assert "data/quarantine.parquet" not in data and "data/quarantine_sample.parquet" in data
    sample = pl.read_parquet(
        mlflow.artifacts.download_artifacts(run_id=first.run_id, artifact_path="data/quarantine_sample.parquet")
    )
    assert sample.height == cfg.mlflow.quarantine_sample_rows == 20 and sample["reason"].n_unique() == 2
    assert "A sample of 20" in text and "is not uploaded" in text
    # Rows trained beside rows used, with what the equal split and drop-last left out.
    assert "rows trained per epoch" in text and "by the equal split" in text and "last partial batch" in text
    assert version.tags["data_hash"] and version.tags["model_hash"] == stages(cfg.run_dir)[2].model_hash
    assert cfg.tracking_uri() not in text, "the tracking URI (may carry credentials) stays out of the card"

    info = mlflow.models.get_model_info(f"models:/{cfg.mlflow.model_name}/1")
    assert info.signature is not None and "click_seq" in info.signature.inputs.input_names()
    assert {"ctr", "cvr", "dwell"} <= set(info.signature.outputs.input_names())
    assert info.saved_input_example_info is not None


@pytest.mark.slow
def test_first_model_becomes_champion(champion_a: Any) -> None:
    cfg, _, _, decision, again = champion_a
    assert decision.decision == "promoted" and decision.champion_before is None and decision.champion_after == "1"
    assert again.decision == "unchanged"
    client = client_for(cfg)
    assert client.get_model_version_by_alias(cfg.mlflow.model_name, "champion").version == "1"
    tags = client.get_model_version(cfg.mlflow.model_name, "1").tags
    assert tags["promotion.decision"] == "promoted" and "first champion" in tags["promotion.reason"]
    assert "ctr.auc" in tags["promotion.checks"] and "ctr.calibration" in tags["promotion.checks"]


@pytest.mark.slow
def test_gate_rejects_a_regression_and_promotes_a_pass(pipeline_run: Any, server: MlflowServer, tmp_path: Path) -> None:
    import mlflow

    from pipeline.promote import promote
    from pipeline.register import register

    base_dir = tmp_path / "base"
    stage_run_dir(pipeline_run, base_dir)
    cfg = http_config(pipeline_run, base_dir, server, "reg-b")
    register(cfg, *stages(base_dir))
    assert promote(cfg).champion_after == "1"
    champion_auc = stages(base_dir)[2].metrics["ctr"]["auc"]
    assert champion_auc > 0.55, "the trained model must beat chance for the regression to be measurable"

    # A regression: CTR ranking reversed.
    bad_dir = tmp_path / "bad"
    bad_cfg = http_config(pipeline_run, bad_dir, server, "reg-b")
    bad = variant(pipeline_run, bad_dir, bad_cfg, "negate_ctr")
    assert bad[2].metrics["ctr"]["auc"] < champion_auc - 0.05
    reg = register(bad_cfg, *bad)
    assert reg.version == "2"
    # Registered beside the champion: its card compares on the same window.
    comparison = json.loads(
        Path(
            mlflow.artifacts.download_artifacts(run_id=reg.run_id, artifact_path="eval/champion_comparison.json")
        ).read_text()
    )
    assert comparison["champion_version"] == "1"
    assert comparison["metrics"]["ctr"]["auc"] == pytest.approx(champion_auc, abs=1e-9)
    card = Path(mlflow.artifacts.download_artifacts(run_id=reg.run_id, artifact_path="card/model_card.md"))
    assert "champion v1" in card.read_text() and "would be rejected" in card.read_text()

    rejected = promote(bad_cfg)
    assert rejected.decision == "rejected" and rejected.champion_after == "1"
    assert "ctr.auc" in rejected.reason
    client = client_for(cfg)
    assert client.get_model_version_by_alias("reg-b", "champion").version == "1"
    v2 = client.get_model_version("reg-b", "2").tags
    assert v2["promotion.decision"] == "rejected" and v2["promotion.compared_with"] == "1"
    assert "ctr.auc" in v2["promotion.reason"]
    assert any(c["key"] == "ctr.auc" and not c["passed"] for c in json.loads(v2["promotion.checks"]))
    v1 = client.get_model_version("reg-b", "1").tags
    assert v1["promotion.challenger.v2"].startswith("kept over v2") and "ctr.auc" in v1["promotion.challenger.v2"]
    assert promote(bad_cfg).decision == "rejected", "deciding again gives the recorded decision"

    # A pass: same ranking, a new model hash.
    good_dir = tmp_path / "good"
    good_cfg = http_config(pipeline_run, good_dir, server, "reg-b")
    good = variant(pipeline_run, good_dir, good_cfg, "nudge")
    assert register(good_cfg, *good).version == "3"
    promoted = promote(good_cfg)
    assert promoted.decision == "promoted" and promoted.champion_before == "1" and promoted.champion_after == "3"
    assert client.get_model_version_by_alias("reg-b", "champion").version == "3"
    assert client.get_model_version_by_alias("reg-b", "previous_champion").version == "1"
    assert client.get_model_version("reg-b", "3").tags["promotion.decision"] == "promoted"
    v1 = client.get_model_version("reg-b", "1").tags
    assert v1["promotion.replaced_by"] == "3" and v1["promotion.challenger.v3"].startswith("replaced")


@pytest.mark.slow
def test_server_down_fails_clearly_and_a_later_register_finishes(
    pipeline_run: Any, server: MlflowServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pipeline.register import register
    from pipeline.registry import RegistryUnavailableError

    run_dir = tmp_path / "down"
    stage_run_dir(pipeline_run, run_dir)
    # Credentials travel in MLflow's variables (a URI carrying them is refused), and never show in messages.
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "alice")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "s3cret")
    fast = ("registry.retries=2", "registry.backoff_s=0.3", "registry.http_request_retries=0")
    cfg = http_config(pipeline_run, run_dir, server, "reg-c", *fast)
    server.stop()
    try:
        started = time.monotonic()
        with pytest.raises(RegistryUnavailableError) as info:
            register(cfg, *stages(run_dir))
        took = time.monotonic() - started
        message = str(info.value)
        assert f"127.0.0.1:{server.port}" in message and "3 attempt(s)" in message
        assert "s3cret" not in message and "alice" not in message
        model_dir = stages(run_dir)[1].model_dir
        assert f"remain on disk at {model_dir}" in message and "mtrec register" in message
        assert took >= 0.3 + 0.6, "the attempts must back off"
        assert (Path(model_dir) / "weights.safetensors").exists()
    finally:
        server.start()  # same port, same store: the server is back
    result = register(cfg, *stages(run_dir))
    assert result.version == "1" and "s3cret" not in result.tracking_uri
    assert [v.version for v in versions(cfg)] == ["1"]


@pytest.mark.slow
def test_fresh_process_scores_the_champion_like_the_evaluation(
    pipeline_run: Any, champion_a: Any, server: MlflowServer, tmp_path: Path
) -> None:
    cfg, _, _, _, _ = champion_a
    base_cfg, result = pipeline_run
    eval_date = result.evaluated.eval_dates[0]
    raw_files = sorted((base_cfg.data.path / f"dt={eval_date}").glob("*.parquet"))
    out = tmp_path / "scores.json"
    script = f"""
import json, sys
import mlflow, numpy as np, polars as pl
model = mlflow.pyfunc.load_model("models:/{cfg.mlflow.model_name}@champion")
raw = pl.concat([pl.read_parquet(f) for f in {[str(f) for f in raw_files]!r}])
preds = model.predict(raw.to_pandas())
scored = pl.from_pandas(preds).with_columns(raw["request_id"])
evaluated = pl.read_parquet({result.evaluated.predictions_path!r})
joined = evaluated.join(scored, on="request_id", how="inner")
diffs = {{c: float(np.abs(joined["pred:" + c].to_numpy() - joined[c].to_numpy()).max()) for c in preds.columns}}
json.dump({{"rows": joined.height, "eval_rows": evaluated.height, "diffs": diffs}}, open({str(out)!r}, "w"))
"""
    env = {**os.environ, "MLFLOW_TRACKING_URI": server.uri, "PYTHONPATH": ""}
    proc = subprocess.run(
        [sys.executable, "-c", script], env=env, cwd=str(tmp_path), capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(out.read_text())
    assert got["rows"] == got["eval_rows"], "every evaluated row is scored from its raw row"
    assert set(got["diffs"]) >= {"ctr", "cvr", "dwell"}
    assert max(got["diffs"].values()) < 1e-5, got["diffs"]

"""The command line (help everywhere, config errors naming the field), the daily job (twice for the same day: one
version; an earlier day: warm start from the champion), and Ray Jobs submission to a real local head."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from jobs.cli import app
from tests.conftest import SMALL_CONFIG, small_config

VENV_BIN = Path(sys.executable).parent
COMMANDS = ("generate", "ingest", "train", "evaluate", "register", "promote", "run", "daily", "submit")


def test_every_command_has_help() -> None:
    runner = CliRunner()
    top = runner.invoke(app, ["--help"])
    assert top.exit_code == 0
    for command in COMMANDS:
        assert command in top.output
        result = runner.invoke(app, [command, "--help"])
        assert result.exit_code == 0, (command, result.output)
        assert "--config" in result.output and "--set" in result.output, command


@pytest.mark.parametrize(
    ("override", "path"),
    [
        ("train.batch_size=-5", "train.batch_size"),
        ("train.batchsize=4096", "train.batchsize"),
        ("promotion.thresholds={ctr.foo: 0.1}", "promotion.thresholds"),
        ("registry.retries=many", "registry.retries"),
        ("daily.train_days=0", "daily.train_days"),
    ],
)
def test_bad_set_value_fails_with_the_field_path(override: str, path: str, tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["promote", "--config", str(SMALL_CONFIG), "--set", override])
    assert result.exit_code == 2, result.output
    assert path in result.output and "invalid config" in result.output
    assert not (tmp_path / "promote.json").exists()


def test_submit_rejects_unknown_command_and_missing_address(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delenv("RAY_API_SERVER_ADDRESS", raising=False)
    runner = CliRunner()
    result = runner.invoke(app, ["submit", "--config", str(SMALL_CONFIG), "--command", "rm"])
    assert result.exit_code == 1 and "--command 'rm'" in result.output
    result = runner.invoke(app, ["submit", "--config", str(SMALL_CONFIG), "--command", "generate"])
    assert result.exit_code == 1 and "no Ray cluster address" in result.output


# ---------------------------------------------------------------------------------------------------------------------
# The daily job


TINY = (
    "generator.num_days=3",
    "generator.impressions_per_day=4000",
    "generator.num_users=500",
    "generator.num_items=1000",
    "train.epochs=1",
    "train.max_steps=4",
    "train.batch_size=256",
    "daily.train_days=1",
    "promotion.bounds={ctr.calibration: {min: 0.2, max: 5.0}}",  # what a first champion must meet
    "mlflow.model_name=daily-test",
    "mlflow.experiment=daily-test",
)


@pytest.mark.slow
def test_daily_twice_for_a_day_registers_once_and_warm_starts(ray_local: None, tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient

    from jobs.daily import run_daily
    from pipeline.run import generate

    cfg = small_config(tmp_path, *TINY)
    dates = generate(cfg).dates
    client = MlflowClient(tracking_uri=cfg.tracking_uri(), registry_uri=cfg.tracking_uri())

    first = run_daily(cfg)
    assert first.date == dates[-1] and first.status == "registered" and first.version == "1"
    assert first.eval_dates == [dates[-1]] and first.train_dates == [dates[-2]]  # daily.train_days=1
    assert first.warm_start.startswith("none")  # no champion yet
    assert first.promotion and first.promotion["decision"] == "promoted"  # the first model becomes champion
    day_dir = tmp_path / "daily" / dates[-1]
    assert (day_dir / "daily_report.md").exists() and json.loads((day_dir / "daily_report.json").read_text())

    # The same day again, through the CLI: nothing new anywhere.
    overrides = [
        f"run_dir={tmp_path}",
        f"data.path={tmp_path / 'data'}",
        f"data.oracle_path={tmp_path / 'oracle.parquet'}",
    ]
    args = ["daily", "--config", str(SMALL_CONFIG)]
    for o in [*overrides, *TINY]:
        args += ["--set", o]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    second = json.loads((day_dir / "daily_report.json").read_text())
    assert second["status"] == "already_registered" and second["version"] == "1"
    assert second["stages"]["train"].startswith("skipped")
    assert second["promotion"]["decision"] == "unchanged"
    assert [str(v.version) for v in client.search_model_versions("name='daily-test'")] == ["1"]
    experiment = client.get_experiment_by_name("daily-test")
    assert experiment is not None
    assert len(client.search_runs([experiment.experiment_id])) == 1
    assert "daily/daily_report.md" in {a.path for a in client.list_artifacts(first.run_id or "", "daily")}
    assert (tmp_path / "mlflow.db").exists(), "every day shares the config's store"

    # An earlier day: trains from the champion's weights, on the logs up to that day only.
    earlier = run_daily(cfg, date=dates[-2])
    assert earlier.status == "registered" and earlier.version == "2"
    assert earlier.eval_dates == [dates[-2]] and earlier.train_dates == [dates[-3]]
    assert earlier.warm_start == "champion version 1"
    assert earlier.promotion and earlier.promotion["decision"] in ("promoted", "rejected")
    tags = client.get_model_version("daily-test", "2").tags
    assert tags["daily_date"] == dates[-2] and tags["warm_start"] == "champion version 1"
    assert tags["promotion.compared_with"] == "1"


# ---------------------------------------------------------------------------------------------------------------------
# Ray Jobs submission


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _kill_by_marker(marker: str) -> None:
    """Kill leftover processes of the head started here: those whose command line names its own temp dir."""
    import psutil

    for proc in psutil.process_iter(["pid", "cmdline"]):
        with contextlib.suppress(psutil.Error):
            if marker in " ".join(proc.info["cmdline"] or []):
                proc.kill()


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real Ray head (with the dashboard: the Jobs API lives there) on 127.0.0.1, apart from the test process's own
    local Ray: its own ports and temp dir, so ``ray.init()`` elsewhere never finds it. Stopped by process group and
    temp dir, never by ``ray stop`` (which would stop every Ray on this shared machine)."""
    from ray.job_submission import JobSubmissionClient

    from jobs.submit import enable_ray_token_auth

    temp_dir = Path(tempfile.mkdtemp(prefix="rh", dir="/tmp"))  # short: Ray's socket paths must stay under 108 chars
    dashboard = free_port()
    ports = {
        "--port": free_port(),
        "--dashboard-port": dashboard,
        "--ray-client-server-port": free_port(),
        "--dashboard-agent-listen-port": free_port(),
        "--dashboard-agent-grpc-port": free_port(),
        "--metrics-export-port": free_port(),
        "--runtime-env-agent-port": free_port(),
        "--node-manager-port": free_port(),
        "--object-manager-port": free_port(),
    }
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"  # the job's driver runs `mtrec` from this venv
    log = open(tmp_path_factory.mktemp("ray_head") / "head.log", "wb")  # noqa: SIM115 (open while the head runs)
    proc = subprocess.Popen(
        [
            str(VENV_BIN / "ray"),
            "start",
            "--head",
            "--block",
            "--node-ip-address=127.0.0.1",
            "--dashboard-host=127.0.0.1",
            "--num-cpus=2",
            "--include-dashboard=true",
            "--disable-usage-stats",
            f"--temp-dir={temp_dir}",
            *(f"{k}={v}" for k, v in ports.items()),
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
        start_new_session=True,
    )
    address = f"http://127.0.0.1:{dashboard}"
    enable_ray_token_auth()
    try:
        deadline = time.monotonic() + 240
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"ray start exited with {proc.returncode}; see {log.name}")
            try:
                JobSubmissionClient(address).list_jobs()  # the Jobs API answers (with the cluster's token)
                break
            except Exception:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"the Ray Jobs API at {address} did not come up in 240s; see {log.name}")
            time.sleep(1)
        yield address
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=10)  # the head drains for up to 30s on SIGTERM; nothing here needs draining
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
        time.sleep(2)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        _kill_by_marker(str(temp_dir))
        log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.mark.slow
def test_submit_runs_a_command_on_a_ray_head_and_streams_logs(ray_head: str, tmp_path: Path) -> None:
    from ray.job_submission import JobSubmissionClient

    from jobs.submit import build_entrypoint, submit

    overrides = [
        f"run_dir={tmp_path}",
        f"data.path={tmp_path / 'data'}",
        f"data.oracle_path={tmp_path / 'oracle.parquet'}",
        "generator.num_days=2",
        "generator.impressions_per_day=500",
        "generator.files_per_day=1",
    ]
    cfg = small_config(tmp_path, *overrides[3:])
    entrypoint = build_entrypoint(cfg, "generate", str(SMALL_CONFIG), overrides, [])
    streamed: list[str] = []
    notes: list[str] = []
    result = submit(
        cfg,
        entrypoint,
        address=ray_head,
        submission_id="mtrec-test-generate",
        env={"MTREC_TEST": "1", "MLFLOW_TRACKING_PASSWORD": "s3cret-value"},
        sink=streamed.append,
        status_sink=notes.append,
    )
    assert result.status == "SUCCEEDED" and result.followed, "".join(streamed)[-3000:]
    logs = "".join(streamed)
    assert "generated 1,000 rows" in logs, logs[-3000:]
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == ["dt=2026-01-01", "dt=2026-01-02"]
    assert any("submitted" in n and "MTREC_TEST" in n for n in notes)
    # Environment values (credentials) travel in the runtime environment only: not in the entrypoint, not printed.
    info = JobSubmissionClient(ray_head).get_job_info(result.job_id)
    assert "s3cret-value" not in info.entrypoint and "s3cret-value" not in " ".join(notes)
    assert "s3cret-value" not in result.entrypoint and "s3cret-value" not in logs

    # The same submission id again: the existing job is followed, nothing is started.
    again = submit(cfg, entrypoint, address=ray_head, submission_id="mtrec-test-generate", sink=streamed.append)
    assert again.job_id == result.job_id and again.status == "SUCCEEDED"
    jobs = JobSubmissionClient(ray_head).list_jobs()
    assert [j.submission_id for j in jobs] == ["mtrec-test-generate"]


@pytest.mark.slow
def test_submit_cli_exit_code_follows_the_job(ray_head: str, tmp_path: Path) -> None:
    """Through the CLI: a remote command that fails makes `mtrec submit` fail."""
    result = CliRunner().invoke(
        app,
        [
            "submit",
            "--config",
            str(SMALL_CONFIG),
            "--address",
            ray_head,
            "--command",
            "ingest",
            "--set",
            f"data.path={tmp_path / 'missing'}",
            "--set",
            f"run_dir={tmp_path}",
        ],
    )
    assert result.exit_code == 1, result.output
    assert "FAILED" in result.output and "does not exist" in result.output

"""What unattended, repeated runs rely on: only complete partitions are read, the daily job refuses a day that is not
ready (its own exit code), pins its window, runs once per day across hosts (a lease with owner, heartbeat and
expiry), and stage results appear only after their checks. Real processes, real Ray, a real MLflow store."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from jobs.cli import app
from tests.conftest import SMALL_CONFIG, small_config
from tests.test_jobs import TINY

NOT_READY = 75  # the documented exit code of `mtrec daily` for "retry later"

HOLD_LEASE = """
import sys, time
from pathlib import Path
from jobs.lease import acquire
lease = acquire(Path(sys.argv[1]), ttl_s=60, heartbeat_s=1)
print("held", flush=True)
time.sleep(float(sys.argv[2]))
lease.release()
"""


def _cli_args(command: str, run_dir: Path, *extra: str) -> list[str]:
    args = [command, "--config", str(SMALL_CONFIG)]
    overrides = [
        f"run_dir={run_dir}",
        f"data.path={run_dir / 'data'}",
        f"data.oracle_path={run_dir / 'oracle.parquet'}",
        *TINY,
        *extra,
    ]
    for o in overrides:
        args += ["--set", o]
    return args


def _write_partition(root: Path, date: str, rows: int, marker: bool) -> None:
    folder = root / f"dt={date}"
    folder.mkdir(parents=True)
    pq.write_table(pa.table({"x": list(range(rows))}), folder / "part-00000.parquet")
    if marker:
        (folder / "_SUCCESS").touch()


# ---------------------------------------------------------------------------------------------------------------------
# Complete partitions only


def test_partitions_without_their_marker_are_skipped_saying_why(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from pipeline.ingest import discover_partitions

    _write_partition(tmp_path, "2026-03-01", 10, marker=True)
    _write_partition(tmp_path, "2026-03-02", 10, marker=False)  # still being written
    _write_partition(tmp_path, "2026-03-03", 10, marker=True)
    found = discover_partitions(tmp_path)
    assert list(found) == ["2026-03-01", "2026-03-03"]
    said = capsys.readouterr().out.splitlines()
    assert len(said) == 1 and "dt=2026-03-02" in said[0] and "_SUCCESS" in said[0]


def test_completeness_rules_min_rows_and_next_partition(tmp_path: Path) -> None:
    from pipeline.config import CompletenessConfig
    from pipeline.partitions import scan_partitions

    _write_partition(tmp_path, "2026-03-01", 10, marker=False)
    _write_partition(tmp_path, "2026-03-02", 3, marker=False)
    _write_partition(tmp_path, "2026-03-03", 10, marker=False)
    by_rows = scan_partitions(tmp_path, CompletenessConfig(rule="min_rows", min_rows=5))
    assert list(by_rows.complete) == ["2026-03-01", "2026-03-03"]
    assert "3 rows" in by_rows.incomplete["2026-03-02"]
    by_next = scan_partitions(tmp_path, CompletenessConfig(rule="next_partition"))
    assert list(by_next.complete) == ["2026-03-01", "2026-03-02"]
    assert "no later partition" in by_next.incomplete["2026-03-03"]
    by_marker = scan_partitions(tmp_path, CompletenessConfig(marker="READY"))
    assert not by_marker.complete and "no READY marker" in by_marker.incomplete["2026-03-01"]


def test_daily_over_an_incomplete_partition_is_not_ready_and_trains_nothing(tmp_path: Path) -> None:
    from pipeline.run import generate

    cfg = small_config(tmp_path, *TINY)
    day = generate(cfg).dates[-1]
    (tmp_path / "data" / f"dt={day}" / "_SUCCESS").unlink(missing_ok=True)  # the writer has not finished the day

    result = CliRunner().invoke(app, _cli_args("daily", tmp_path))
    assert result.exit_code == NOT_READY, result.output
    assert f"dt={day}" in result.output and "not complete" in result.output
    day_dir = tmp_path / "daily" / day
    assert not (day_dir / "ingest.json").exists() and not (day_dir / "train.json").exists()
    assert not (tmp_path / "mlflow.db").exists(), "nothing may be registered"

    # A day that has not landed at all is "not ready" too.
    result = CliRunner().invoke(app, [*_cli_args("daily", tmp_path), "--date", "2099-01-01"])
    assert result.exit_code == NOT_READY, result.output


# ---------------------------------------------------------------------------------------------------------------------
# Names used in paths


@pytest.mark.parametrize("name", ["../../etc", "a/b", "..", "x y"])
def test_names_used_in_paths_are_validated(name: str, tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["train", "--config", str(SMALL_CONFIG), "--set", f"name={name}"])
    assert result.exit_code == 2, result.output
    assert "invalid config" in result.output and "name" in result.output


def test_daily_date_must_be_a_date(tmp_path: Path) -> None:
    from pipeline.run import generate

    generate(small_config(tmp_path, *TINY))
    result = CliRunner().invoke(app, [*_cli_args("daily", tmp_path), "--date", "../2026-01-01"])
    assert result.exit_code == 1 and "is not a YYYY-MM-DD date" in result.output, result.output
    assert not (tmp_path / "2026-01-01").exists()


# ---------------------------------------------------------------------------------------------------------------------
# The day lease


def _hold_lease(path: Path, seconds: float, owner: str) -> subprocess.Popen[str]:
    env = {**os.environ, "MTREC_LEASE_OWNER": owner}
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD_LEASE, str(path), str(seconds)], env=env, stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
    return proc


def test_live_lease_of_another_host_is_respected_then_waited_for(tmp_path: Path) -> None:
    from jobs.lease import LeaseHeldError, acquire, read_lease

    path = tmp_path / "2026-03-01.lease"
    holder = _hold_lease(path, 4, owner="host-a")
    try:
        with pytest.raises(LeaseHeldError, match="host-a"):
            acquire(path, ttl_s=60, heartbeat_s=1, wait_s=0)
        said: list[str] = []
        lease = acquire(path, ttl_s=60, heartbeat_s=1, wait_s=60, poll_s=0.2, say=said.append)
        assert holder.wait(timeout=30) == 0
        assert any("waiting" in line and "host-a" in line for line in said)
        info = read_lease(path)
        assert info is not None and info.token == lease.info.token
        lease.release()
        assert not path.exists()
    finally:
        holder.kill()


def test_expired_lease_is_taken_over_and_says_so(tmp_path: Path) -> None:
    from jobs.lease import acquire, read_lease

    path = tmp_path / "2026-03-01.lease"
    gone = time.time() - 3600
    stale = {"host": "host-gone", "pid": 4242, "token": "t0", "acquired_at": gone, "heartbeat_at": gone}
    path.write_text(json.dumps({**stale, "expires_at": gone + 900}))
    said: list[str] = []
    lease = acquire(path, ttl_s=60, heartbeat_s=0.2, wait_s=0, say=said.append)
    try:
        assert any("took over the expired lease of host host-gone pid 4242" in line for line in said), said
        info = read_lease(path)
        assert info is not None and info.token == lease.info.token and info.pid == os.getpid()
        first_beat = info.heartbeat_at
        deadline = time.time() + 30
        while (info := read_lease(path)) is not None and info.heartbeat_at == first_beat and time.time() < deadline:
            time.sleep(0.1)
        assert info is not None and info.heartbeat_at > first_beat, "the owner renews its lease"
    finally:
        lease.release()


# ---------------------------------------------------------------------------------------------------------------------
# Daily runs: one per day across hosts, pinned windows, results only after checks


@pytest.mark.slow
def test_two_daily_runs_of_a_day_from_two_hosts_run_once(
    ray_local: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mlflow.tracking import MlflowClient

    from jobs.daily import run_daily
    from pipeline.run import generate

    cfg = small_config(tmp_path, *TINY)
    day = generate(cfg).dates[-1]
    monkeypatch.setenv("MTREC_LEASE_OWNER", "host-a")
    outcome: dict[str, object] = {}

    def first() -> None:
        try:
            outcome["report"] = run_daily(cfg)
        except BaseException as err:  # surfaced by the assertion below
            outcome["error"] = err

    thread = threading.Thread(target=first)
    thread.start()
    lease_file = tmp_path / "daily" / f"{day}.lease"
    deadline = time.time() + 120
    while not lease_file.exists() and thread.is_alive() and time.time() < deadline:
        time.sleep(0.05)
    assert lease_file.exists(), "the first run never took the day's lease"

    env = {**os.environ, "MTREC_LEASE_OWNER": "host-b"}
    cli = [sys.executable, "-m", "jobs.cli"]
    second = subprocess.run([*cli, *_cli_args("daily", tmp_path)], env=env, capture_output=True, text=True, timeout=300)
    # A third scheduler waits for the day instead, then finds it done.
    waiting = subprocess.Popen(
        [*cli, *_cli_args("daily", tmp_path, "daily.lease_wait_s=600")],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    thread.join(timeout=900)
    waited_out, _ = waiting.communicate(timeout=600)

    assert "error" not in outcome, outcome.get("error")
    assert second.returncode == 0, second.stdout + second.stderr
    assert "skipped" in second.stdout and "host-a" in second.stdout, second.stdout
    assert waiting.returncode == 0, waited_out
    assert "waiting" in waited_out and "already_registered" in waited_out, waited_out
    client = MlflowClient(tracking_uri=cfg.tracking_uri(), registry_uri=cfg.tracking_uri())
    assert [str(v.version) for v in client.search_model_versions("name='daily-test'")] == ["1"]
    assert not lease_file.exists(), "the lease is released at the end"


@pytest.mark.slow
def test_partition_landing_mid_run_does_not_change_the_recorded_windows(
    ray_local: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import mlflow
    from mlflow.tracking import MlflowClient

    import pipeline.ingest
    from jobs.daily import run_daily
    from pipeline.run import generate

    cfg = small_config(tmp_path, *TINY)
    dates = generate(cfg).dates
    day, late = dates[-1], "2099-01-01"
    real_ingest = pipeline.ingest.ingest

    def ingest_after_a_partition_lands(*args, **kwargs):  # type: ignore[no-untyped-def]
        # The next day's writer finishes while the job runs: after the job started, before ingest reads.
        shutil.copytree(tmp_path / "data" / f"dt={day}", tmp_path / "data" / f"dt={late}")
        return real_ingest(*args, **kwargs)

    monkeypatch.setattr(pipeline.ingest, "ingest", ingest_after_a_partition_lands)
    report = run_daily(cfg)

    assert (tmp_path / "data" / f"dt={late}" / "_SUCCESS").exists()
    assert report.date == day and report.eval_dates == [day] and report.train_dates == [dates[-2]]
    ingested = json.loads((tmp_path / "daily" / day / "ingest.json").read_text())
    assert ingested["eval_dates"] == [day]
    sources = [*ingested["window"]["train_sources"], *ingested["window"]["eval_sources"]]
    assert sources and not any(f"dt={late}" in s for s in sources)
    assert all(f"/dt={day}/" in s for s in ingested["window"]["eval_sources"])
    assert report.window == ingested["window"]
    client = MlflowClient(tracking_uri=cfg.tracking_uri(), registry_uri=cfg.tracking_uri())
    run = client.get_run(report.run_id or "")
    assert run.data.tags["eval_window"] == day
    mlflow.set_tracking_uri(cfg.tracking_uri())
    logged = mlflow.artifacts.load_dict(f"runs:/{report.run_id}/data/window.json")
    assert logged == ingested["window"]


@pytest.mark.slow
def test_failed_ingest_leaves_no_ingest_json(ray_local: None, tmp_path: Path) -> None:
    from features.validate import TooManyBadRowsError
    from pipeline.ingest import ingest
    from pipeline.run import generate

    cfg = small_config(tmp_path, *TINY, "data.max_bad_fraction=0.001")
    dates = generate(cfg).dates
    ingest(cfg)
    assert (tmp_path / "ingest.json").exists()

    # Corrupt the evaluation day: negative dwell times on a tenth of its rows.
    part = sorted((tmp_path / "data" / f"dt={dates[-1]}").glob("*.parquet"))[0]
    table = pq.read_table(part)
    dwell = table.column("dwell_seconds")
    bad = pc.if_else(pc.less(pa.array(range(table.num_rows)), table.num_rows // 10), pa.scalar(-1.0, dwell.type), dwell)
    pq.write_table(table.set_column(table.schema.get_field_index("dwell_seconds"), "dwell_seconds", bad), part)

    with pytest.raises(TooManyBadRowsError):
        ingest(cfg)
    assert not (tmp_path / "ingest.json").exists(), "a rejected window must not look ingested"
    assert (tmp_path / "quarantine.parquet").exists(), "the rejected rows stay inspectable"
    result = CliRunner().invoke(app, _cli_args("train", tmp_path))
    assert result.exit_code != 0 and "run the ingest stage first" in str(result.exception or result.output)

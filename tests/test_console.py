"""The command line as a person sees it: a short console (stage lines, the summary, the model URI, every progress line
once) with the library output kept in ``<run_dir>/logs/``. The run uses logs without a request-id column and a spec
that names none, so it also shows that such logs train with a YAML only."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from features.generator import GeneratorConfig, generate_logs
from tests.conftest import REPO

#: The console of a successful run stays within this many lines (the README states the demo's count).
LINE_BUDGET = 60


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, subprocess.CompletedProcess[str]]:
    root = tmp_path_factory.mktemp("console")
    data = root / "data"
    gen = GeneratorConfig(seed=5, num_days=3, impressions_per_day=6000, num_users=400, num_items=1500)
    generate_logs(gen, data, root / "oracle.parquet")
    for part in data.glob("dt=*/*.parquet"):  # exported event logs rarely carry a request id
        table = pq.read_table(part)
        pq.write_table(table.drop_columns(["request_id"]), part)

    spec = yaml.safe_load((REPO / "configs/features/behaviour_logs.yaml").read_text())
    del spec["keys"]["request_id"]
    (root / "spec.yaml").write_text(yaml.safe_dump(spec))
    config = {
        "name": "console",
        "run_dir": str(root / "run"),
        "features": str(root / "spec.yaml"),
        "data": {"path": str(data), "eval_days": 1},
        "train": {"num_workers": 2, "batch_size": 256, "epochs": 1, "log_every": 5, "shuffle": "global"},
        "mlflow": {"experiment": "console", "model_name": "console"},
    }
    (root / "experiment.yaml").write_text(yaml.safe_dump(config))
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    done = subprocess.run(
        [sys.executable, "-m", "jobs.cli", "run", "--config", str(root / "experiment.yaml")],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    return root / "run", done


@pytest.mark.slow
def test_console_is_short_and_ends_with_the_summary_and_model_uri(
    cli_run: tuple[Path, subprocess.CompletedProcess[str]],
) -> None:
    _, done = cli_run
    console = done.stdout + done.stderr
    assert done.returncode == 0, console
    lines = console.splitlines()
    assert len(lines) <= LINE_BUDGET, f"{len(lines)} lines:\n{console}"
    for stage in ("ingest", "train", "evaluate", "register"):
        assert sum(1 for ln in lines if re.match(rf"{stage}\s+\S.*\(\d+\.\ds\)$", ln)) == 1, (stage, console)
    assert "Evaluation on" in console and "registered model: models:/console/1" in console
    # What libraries say stays out of the console.
    for chatter in ("GreedyPerfPartitioner", "is not in the config", "Warning", "(RayTrainWorker", "INFO"):
        assert chatter not in console, (chatter, console)
    # A progress line, if any was printed, appears once.
    progress = [ln for ln in lines if re.match(r"train\s+\d+/\d+ steps", ln)]
    assert len(progress) == len(set(progress)), console


@pytest.mark.slow
def test_library_output_lands_in_the_run_folder_logs(cli_run: tuple[Path, subprocess.CompletedProcess[str]]) -> None:
    run_dir, done = cli_run
    assert done.returncode == 0, done.stdout + done.stderr
    logs = run_dir / "logs"
    driver = (logs / "driver.log").read_text()
    assert driver.strip(), "the driver's library output is missing"
    workers = [(logs / f"train-worker-{rank}.log").read_text() for rank in (0, 1)]
    assert "[train] parameters" in workers[0] and "[train] sharding plan" in workers[0]
    assert all(w.strip() for w in workers)
    assert (logs / "ray").is_symlink() and any((logs / "ray").iterdir())
    assert (logs / "train_progress.jsonl").read_text().count("\n") >= 1


@pytest.mark.slow
def test_logs_without_request_id_train_with_a_yaml_only(cli_run: tuple[Path, subprocess.CompletedProcess[str]]) -> None:
    run_dir, done = cli_run
    assert done.returncode == 0, done.stdout + done.stderr
    predictions = pq.read_table(run_dir / "eval_predictions.parquet")
    ids = predictions.column("_row_id").to_numpy()
    assert len(set(ids.tolist())) == len(ids) > 0  # one stable id per evaluated row


def test_long_windows_print_as_a_span() -> None:
    from pipeline.run import date_span

    assert date_span(["2026-01-01", "2026-01-02"]) == "2026-01-01, 2026-01-02"
    days = [f"1998-04-{d:02d}" for d in range(1, 29)]
    assert date_span(days) == "1998-04-01 .. 1998-04-28 (28 days)"

"""Checkpoint, resume and failure handling of the train stage, with the real things: local Ray Train workers, TorchRec
sharding over gloo, torch.distributed.checkpoint, SIGKILL for the failures. No mocks."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest
import torch
from safetensors.torch import load_file

from models.sharding import ShardingPlanError, table_bytes
from pipeline.config import ExperimentConfig
from pipeline.evaluate import evaluate
from pipeline.ingest import IngestResult, ingest
from pipeline.run import generate
from pipeline.train import TrainResult, train
from tests.conftest import DRGRAD_SET, SMALL_CONFIG, small_config

pytestmark = pytest.mark.slow

STEPS = 40
# Deterministic: no shuffle, fixed seeds; small batches so a run has enough steps to interrupt.
TRAIN_SET = [
    "generator.impressions_per_day=8000",
    "generator.num_days=3",
    "train.batch_size=256",
    "train.epochs=3",
    "train.shuffle=none",
    "train.log_every=10",
    *DRGRAD_SET,  # exact resume must restore the split tower's mu state (sigma) too
]


@dataclass
class Straight:
    cfg: ExperimentConfig
    ingested: IngestResult
    result: TrainResult
    weights: dict[str, torch.Tensor]
    ctr_auc: float


def _cfg(run_dir: Path, *extra: str) -> ExperimentConfig:
    return small_config(run_dir, *TRAIN_SET, *extra)


def _copy_inputs(src: Path, dst: Path) -> IngestResult:
    """Reuse the generated and validated data of ``src`` in a new run folder (paths inside ingest.json stay valid)."""
    dst.mkdir(parents=True, exist_ok=True)
    shutil.copy(src / "ingest.json", dst / "ingest.json")
    return IngestResult.load(dst / "ingest.json")


def _weights(result: TrainResult) -> dict[str, torch.Tensor]:
    return load_file(str(Path(result.model_dir) / "weights.safetensors"))


def _assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6, msg=key)


@pytest.fixture(scope="module")
def straight(tmp_path_factory: pytest.TempPathFactory, ray_local: None) -> Straight:
    """An uninterrupted run of STEPS steps: the reference for every test below."""
    run_dir = tmp_path_factory.mktemp("straight")
    cfg = _cfg(run_dir, f"train.max_steps={STEPS}")
    generate(cfg)
    ingested = ingest(cfg)
    result = train(cfg, ingested)
    auc = evaluate(cfg, ingested, result).metrics["ctr"]["auc"]
    return Straight(cfg, ingested, result, _weights(result), auc)


def test_resume_is_exact(straight: Straight, tmp_path: Path) -> None:
    """N/2 steps, stop, resume to N: the same weights as N steps straight."""
    ingested = _copy_inputs(straight.cfg.run_dir, tmp_path)
    half = train(_cfg(tmp_path, f"train.max_steps={STEPS // 2}"), ingested)
    assert half.steps == STEPS // 2
    resumed = train(_cfg(tmp_path, f"train.max_steps={STEPS}"), ingested)  # resumes by default
    assert resumed.resumed_from_step == STEPS // 2
    assert resumed.steps == STEPS and resumed.samples == straight.result.samples
    _assert_same_weights(_weights(resumed), straight.weights)


def test_sparse_dist_pipeline_half_then_resumed_matches_plain_straight(straight: Straight, tmp_path: Path) -> None:
    """train.step_pipeline=sparse_dist through the worker loop: N/2 steps (stopping mid-epoch with batches prefetched
    but not trained), resume to N across an epoch end: the same weights as the plain loop's N steps straight."""
    ingested = _copy_inputs(straight.cfg.run_dir, tmp_path)
    piped = "train.step_pipeline=sparse_dist"
    half = train(_cfg(tmp_path, f"train.max_steps={STEPS // 2}", piped), ingested)
    assert half.steps == STEPS // 2
    resumed = train(_cfg(tmp_path, f"train.max_steps={STEPS}", piped), ingested)
    assert resumed.resumed_from_step == STEPS // 2 and resumed.epochs >= 1, "the run should cross an epoch end"
    assert resumed.steps == STEPS and resumed.samples == straight.result.samples
    _assert_same_weights(_weights(resumed), straight.weights)


def test_resume_on_another_worker_count_reshards(straight: Straight, tmp_path: Path) -> None:
    """DCP loads by global offsets: the state saved by 2 workers loads onto 1 worker unchanged."""
    run_dir = tmp_path / "run"
    shutil.copytree(straight.cfg.run_dir, run_dir, ignore=shutil.ignore_patterns("logs", "ingested", "model"))
    ingested = IngestResult.load(run_dir / "ingest.json")
    one = train(_cfg(run_dir, f"train.max_steps={STEPS}", "train.num_workers=1"), ingested)
    assert one.world_size == 1 and one.resumed_from_step == STEPS and one.steps == STEPS
    _assert_same_weights(_weights(one), straight.weights)


def _train_workers() -> list[psutil.Process]:
    """This test process's Ray Train workers (the local Ray runs as our descendants)."""
    found = []
    for proc in psutil.Process(os.getpid()).children(recursive=True):
        try:
            if "RayTrainWorker" in " ".join(proc.cmdline()) or "RayTrainWorker" in proc.name():
                found.append(proc)
        except psutil.Error:
            continue
    return found


def _wait_for_checkpoint(storage: Path, timeout: float) -> None:
    """Until Ray Train has registered a checkpoint (its snapshot file is written after registration; a checkpoint
    folder alone may not be registered yet, and an unregistered one is rightly not resumed from)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if any(storage.glob("*/checkpoint_manager_snapshot.json")):
            return
        time.sleep(0.2)
    raise TimeoutError(f"no checkpoint under {storage} after {timeout}s")


def test_worker_killed_mid_training_resumes_and_completes(straight: Straight, tmp_path: Path) -> None:
    ingested = _copy_inputs(straight.cfg.run_dir, tmp_path)
    cfg = _cfg(
        tmp_path,
        f"train.max_steps={STEPS}",
        "train.checkpoint_every_steps=5",
        "train.max_failures=2",
        f"data.oracle_path={straight.cfg.data.oracle_path}",
    )
    outcome: dict[str, object] = {}

    def run() -> None:
        try:
            outcome["result"] = train(cfg, ingested)
        except BaseException as err:  # surfaced by the assertion below
            outcome["error"] = err

    thread = threading.Thread(target=run)
    thread.start()
    _wait_for_checkpoint(tmp_path / "ray_results", timeout=300)
    victims = _train_workers()
    assert victims, "no Ray Train worker process found to kill"
    victims[-1].send_signal(signal.SIGKILL)
    thread.join(timeout=600)
    assert "error" not in outcome, outcome.get("error")
    result = outcome["result"]
    assert isinstance(result, TrainResult)
    assert result.resumed_from_step > 0, "the restarted workers did not resume from a checkpoint"
    assert result.steps == straight.result.steps and result.samples == straight.result.samples
    auc = evaluate(cfg, ingested, result).metrics["ctr"]["auc"]
    assert abs(auc - straight.ctr_auc) < 0.02


def test_driver_killed_then_the_same_command_resumes(straight: Straight, tmp_path: Path) -> None:
    """SIGKILL the whole training command mid-run, then run the very same command again (no flag): it continues
    from the last checkpoint and ends with the step count of an uninterrupted run."""
    _copy_inputs(straight.cfg.run_dir, tmp_path)
    overrides = [
        f"run_dir={tmp_path}",
        f"data.path={tmp_path / 'data'}",
        *TRAIN_SET,
        f"train.max_steps={STEPS}",
        "train.checkpoint_every_steps=5",
    ]
    args = [sys.executable, "-m", "jobs.cli", "train", "--config", str(SMALL_CONFIG)]
    for o in overrides:
        args += ["--set", o]
    # A new process session, so killing its group takes down the driver and the local Ray it started: a crashed machine.
    driver = subprocess.Popen(args, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_for_checkpoint(tmp_path / "ray_results", timeout=300)
    finally:
        os.killpg(driver.pid, signal.SIGKILL)
        driver.wait(timeout=60)
    done = subprocess.run(args, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = TrainResult.load(tmp_path / "train.json")
    assert 0 < result.resumed_from_step < STEPS
    assert result.steps == STEPS and result.samples == straight.result.samples


def test_fresh_moves_the_old_checkpoints_aside(straight: Straight, tmp_path: Path) -> None:
    ingested = _copy_inputs(straight.cfg.run_dir, tmp_path)
    cfg = _cfg(tmp_path, "train.max_steps=6", "train.checkpoint_every_steps=3")
    first = train(cfg, ingested)
    assert first.steps == 6
    again = train(cfg, ingested, fresh=True)
    assert again.resumed_from_step == 0 and again.steps == 6
    storage = tmp_path / "ray_results"
    aside = [p for p in storage.iterdir() if p.name.startswith(f"{cfg.name}-train.aside-")]
    assert len(aside) == 1, sorted(p.name for p in storage.iterdir())
    kept = sorted(aside[0].glob("checkpoint_*"))
    assert kept and any((c / "train_state.json").exists() for c in kept), "the old checkpoints are kept, not deleted"
    assert (aside[0] / "checkpoint_manager_snapshot.json").exists()


def test_checkpoint_of_another_config_is_refused_naming_both_hashes(straight: Straight, tmp_path: Path) -> None:
    from pipeline.checkpoints import CheckpointMismatchError, checkpoint_config_hash

    ingested = _copy_inputs(straight.cfg.run_dir, tmp_path)
    cfg = _cfg(tmp_path, "train.max_steps=2")
    train(cfg, ingested)
    other = _cfg(tmp_path, "train.max_steps=2", "train.dense_lr=0.01")
    with pytest.raises(CheckpointMismatchError) as info:
        train(other, ingested)
    old_hash, new_hash = checkpoint_config_hash(cfg), checkpoint_config_hash(other)
    assert old_hash != new_hash and old_hash in str(info.value) and new_hash in str(info.value)
    assert "--fresh" in str(info.value)
    assert (tmp_path / "ray_results" / f"{cfg.name}-train" / "checkpoint_manager_snapshot.json").exists()


def test_table_that_cannot_fit_names_table_and_memory(straight: Straight, tmp_path: Path) -> None:
    ingested = _copy_inputs(straight.cfg.run_dir, tmp_path)
    item = straight.cfg.feature_spec().table("item")
    need = table_bytes(item.num_buckets, item.dim, "rowwise_adagrad")
    cap_gb = need / 1024**3 * 0.6  # the item table alone is larger than a worker
    cfg = _cfg(
        tmp_path,
        "train.max_steps=2",
        f"train.sharding.memory_per_worker_gb={cap_gb}",
        "train.sharding.tables={item: [table_wise]}",
    )
    with pytest.raises(Exception) as info:
        train(cfg, ingested)
    text = str(info.value)
    cause = info.value
    while cause is not None and not isinstance(cause, ShardingPlanError):
        text += str(cause)
        cause = cause.__cause__
    assert "'item'" in text and "GiB" in text, text


def test_chosen_plan_follows_config_and_is_written(straight: Straight, tmp_path: Path) -> None:
    ingested = _copy_inputs(straight.cfg.run_dir, tmp_path)
    cfg = _cfg(
        tmp_path,
        "train.max_steps=2",
        "train.sharding.tables={item: [row_wise], user: [column_wise], seller: [table_wise], slot: [data_parallel]}",
    )
    result = train(cfg, ingested)
    plan = result.plan
    assert plan["item"]["sharding_type"] == "row_wise" and plan["item"]["ranks"] == [0, 1]
    assert plan["user"]["sharding_type"] == "column_wise"
    assert plan["seller"]["sharding_type"] == "table_wise"
    assert plan["slot"]["sharding_type"] == "data_parallel"
    assert (Path(result.model_dir) / "plan.json").exists()

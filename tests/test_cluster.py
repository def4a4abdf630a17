"""Training on a Ray cluster: the resource check (a cluster too small fails in seconds, naming the numbers and the
settings), the data-stall watchdog, the submitted entrypoint, and real clusters of separate `ray start` processes on
127.0.0.1: a 2-CPU head, and a head plus a worker node that trains one worker per node, survives the loss of the
worker node when a replacement comes, and fails within a bounded wait when none does."""

from __future__ import annotations

import json
import os
import shutil
import signal
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from jobs.submit import SubmitError, build_entrypoint, missing_package_hint, submit
from pipeline.resources import ClusterTooSmallError, NodeResources, TrainingNeeds, check_fits, local_cpus
from pipeline.watchdog import DataStallError, watched_batches
from tests.conftest import SMALL_CONFIG, small_config
from tests.ray_nodes import VENV_BIN, RayNode, clean_env, start_head, start_worker

GIB = 1024**3


def node(cpus: float, gpus: float = 0, memory_gib: float = 8, head: bool = False) -> NodeResources:
    return NodeResources("127.0.0.1", cpus, gpus, memory_gib * GIB, head)


def needs(tmp_path: Path, *overrides: str) -> TrainingNeeds:
    return TrainingNeeds.of(small_config(tmp_path, *overrides))


# ---------------------------------------------------------------------------------------------------------------------
# The resource check


def test_two_workers_on_a_two_cpu_cluster_fail_naming_numbers_and_knobs(tmp_path: Path) -> None:
    with pytest.raises(ClusterTooSmallError) as info:
        check_fits(needs(tmp_path), [node(2, head=True)])
    text = str(info.value)
    assert "has 2 CPUs" in text and "needs 3" in text, text
    assert "train.num_workers=2" in text and "train.cpus_per_worker=1" in text and "train.data_cpus=1" in text
    assert "127.0.0.1 (head): 2 CPUs" in text


def test_room_for_workers_and_data_path_passes(tmp_path: Path) -> None:
    check_fits(needs(tmp_path), [node(3, head=True)])
    check_fits(needs(tmp_path, "train.placement_strategy=SPREAD"), [node(1, head=True), node(2)])
    check_fits(needs(tmp_path, "train.data_cpus=0.5"), [node(1.5), node(1)])


def test_data_path_needs_one_node_with_a_free_cpu(tmp_path: Path) -> None:
    """3 CPUs in all, but 1.5 per node: after a worker on each, no node can start a 1-CPU read task."""
    with pytest.raises(ClusterTooSmallError, match="at least one node must keep 1 CPU free"):
        check_fits(needs(tmp_path), [node(1.5), node(1.5)])


def test_workers_that_cannot_be_placed_fail(tmp_path: Path) -> None:
    with pytest.raises(ClusterTooSmallError, match=r"cannot place the training workers.*STRICT_SPREAD"):
        check_fits(needs(tmp_path, "train.placement_strategy=STRICT_SPREAD"), [node(8)])
    with pytest.raises(ClusterTooSmallError, match="GPU"):
        check_fits(needs(tmp_path, "train.use_gpu=true"), [node(8, gpus=1)])
    with pytest.raises(ClusterTooSmallError, match="cannot place"):
        check_fits(needs(tmp_path, "train.cpus_per_worker=4"), [node(4), node(3), node(2)])
    with pytest.raises(ClusterTooSmallError, match="memory_per_worker_gb"):
        check_fits(needs(tmp_path, "train.sharding.memory_per_worker_gb=6"), [node(8, memory_gib=8)])


def test_local_ray_gets_what_the_run_needs(tmp_path: Path) -> None:
    assert local_cpus(small_config(tmp_path)) == max(os.cpu_count() or 1, 3)
    assert local_cpus(small_config(tmp_path, "train.num_workers=8", "train.data_cpus=2")) == max(
        os.cpu_count() or 1, 10
    )


def test_scheduling_settings_leave_the_fingerprint_alone(tmp_path: Path) -> None:
    base = small_config(tmp_path).fingerprint()
    moved = small_config(
        tmp_path, "train.placement_strategy=SPREAD", "train.data_cpus=2", "train.resource_wait_s=5"
    ).fingerprint()
    assert moved == base
    assert small_config(tmp_path, "train.num_workers=3").fingerprint() != base


# ---------------------------------------------------------------------------------------------------------------------
# The watchdog


def _blocking_source(release: threading.Event, items: list[int]) -> Iterator[int]:
    yield items[0]
    release.wait()
    yield from items[1:]


def test_watched_batches_keep_order_and_end() -> None:
    assert list(watched_batches(iter(range(50)), 5.0, 1.0, poll_s=0.05)) == list(range(50))


def test_stall_with_no_free_cpu_fails_naming_the_knobs() -> None:
    release = threading.Event()
    batches = watched_batches(_blocking_source(release, [1, 2]), 0.3, 1.0, poll_s=0.05, cpus_free=lambda: 0.0)
    assert next(batches) == 1
    with pytest.raises(DataStallError) as info:
        next(batches)
    release.set()
    text = str(info.value)
    assert "train.stall_timeout_s=0.3" in text and "0 CPUs free" in text and "train.num_workers" in text


def test_slow_batches_with_cpus_free_are_waited_for() -> None:
    release = threading.Event()
    threading.Timer(0.6, release.set).start()
    batches = watched_batches(_blocking_source(release, [1, 2, 3]), 0.2, 1.0, poll_s=0.05, cpus_free=lambda: 4.0)
    assert list(batches) == [1, 2, 3]


def test_errors_of_the_stream_reach_the_consumer() -> None:
    def broken() -> Iterator[int]:
        yield 1
        raise ValueError("bad block")

    batches = watched_batches(broken(), 5.0, 1.0, poll_s=0.05)
    assert next(batches) == 1
    with pytest.raises(ValueError, match="bad block"):
        next(batches)


# ---------------------------------------------------------------------------------------------------------------------
# The submitted entrypoint


def test_entrypoint_runs_the_module_not_a_console_script(tmp_path: Path) -> None:
    cfg = small_config(tmp_path)
    line = build_entrypoint(cfg, "run", "c.yaml", ["train.max_steps=2"], ["--generate"])
    assert line == "python -m jobs.cli run --config c.yaml --set train.max_steps=2 --generate"


def test_missing_package_on_the_cluster_is_explained() -> None:
    hint = missing_package_hint("/usr/bin/python: No module named jobs\n", "python -m jobs.cli run")
    assert hint and "cannot import this package" in hint and "submit.runtime_env" in hint
    assert "submit.entrypoint" in hint
    hint = missing_package_hint("/bin/sh: 1: /opt/venv/bin/python: not found", "/opt/venv/bin/python -m jobs.cli")
    assert hint and "has no `/opt/venv/bin/python`" in hint
    assert missing_package_hint("Traceback ... ValueError: bad config", "python -m jobs.cli run") is None


# ---------------------------------------------------------------------------------------------------------------------
# Real clusters: separate `ray start` processes on 127.0.0.1, their PATH without this virtualenv (the entrypoint names
# the interpreter), their temp dirs and ports their own.

BARE_PATH = "/usr/bin:/bin"
PYTHON_ENTRYPOINT = f"submit.entrypoint={VENV_BIN / 'python'} -m jobs.cli"
JOB_TIMEOUT_S = 900


def _overrides(run_dir: Path, *extra: str) -> list[str]:
    return [
        f"run_dir={run_dir}",
        f"data.path={run_dir / 'data'}",
        f"data.oracle_path={run_dir / 'oracle.parquet'}",
        *extra,
    ]


def _submit(dashboard: str, command: str, overrides: list[str], extra_args: list[str] | None = None, **kw):  # type: ignore[no-untyped-def]
    cfg = small_config(Path("/tmp/unused"), *overrides)
    entrypoint = build_entrypoint(cfg, command, str(SMALL_CONFIG), overrides, extra_args or [])
    logs: list[str] = []
    notes: list[str] = []
    deadline = time.monotonic() + 240
    submission_id = f"mtrec-test-{uuid.uuid4().hex[:8]}"  # a retried submission follows the job it may have started
    while True:
        try:
            result = submit(cfg, entrypoint, dashboard, submission_id, sink=logs.append, status_sink=notes.append, **kw)
            return result, "".join(logs), notes
        except SubmitError:  # a head still starting its job agent (or too busy to answer): try again
            if time.monotonic() > deadline:
                raise
            time.sleep(3)


@pytest.fixture(scope="module")
def two_cpu_head(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The cluster of the first try: one head with 2 CPUs."""
    node, _, dashboard = start_head(tmp_path_factory.mktemp("two_cpu_head"), 2, clean_env(BARE_PATH))
    try:
        yield dashboard
    finally:
        node.stop()


@pytest.mark.slow
def test_training_that_cannot_fit_a_two_cpu_head_fails_fast_naming_the_settings(
    two_cpu_head: str, tmp_path: Path
) -> None:
    overrides = _overrides(tmp_path, PYTHON_ENTRYPOINT, "generator.impressions_per_day=20000")
    started = time.monotonic()
    result, logs, _ = _submit(two_cpu_head, "run", overrides, ["--generate"])
    took = time.monotonic() - started
    assert result.status == "FAILED", logs[-3000:]
    assert "has 2 CPUs; training needs 3" in logs, logs[-3000:]
    assert "train.num_workers=2 x train.cpus_per_worker=1" in logs and "train.data_cpus=1" in logs
    assert not (tmp_path / "data").exists(), "the check runs before generation and ingest"
    assert "Traceback" not in logs, "a clear error, not a stack trace"
    print(f"failed after {took:.0f}s from submission")


@pytest.mark.slow
def test_cluster_python_without_the_package_gets_what_to_install(two_cpu_head: str, tmp_path: Path) -> None:
    """A head whose `python3` is a bare interpreter (no PYTHONPATH to this checkout either)."""
    overrides = _overrides(tmp_path, "submit.entrypoint=python3 -m jobs.cli")
    result, logs, notes = _submit(two_cpu_head, "generate", overrides, env={"PYTHONPATH": ""})
    assert result.status == "FAILED", logs[-3000:]
    assert result.hint and "cannot import this package" in result.hint, (logs[-2000:], notes)
    assert any("submit.runtime_env" in n and "submit.entrypoint" in n for n in notes), notes


@pytest.mark.slow
def test_stalled_data_stream_fails_instead_of_hanging(ray_local: None, tmp_path: Path) -> None:
    """Other work takes the CPUs beside the training workers after the check passed: the read tasks cannot start,
    and the workers fail naming the stall instead of waiting for them forever."""
    import ray

    from pipeline.ingest import ingest
    from pipeline.run import generate
    from pipeline.train import train

    cfg = small_config(
        tmp_path,
        "generator.num_days=2",
        "generator.impressions_per_day=2000",
        "train.max_steps=4",
        "train.batch_size=128",
        "train.stall_timeout_s=20",
        # Streamed: a window read into the object store before the workers start takes their CPUs for the read and
        # never needs a read task again, so only a stream can stall.
        "train.materialize=never",
    )
    generate(cfg)
    ingested = ingest(cfg)
    # From the node's total, not what is free this instant: the ingest's tasks may still hold CPUs, and a hog sized
    # by that moment would leave a CPU to the read tasks once they finish. The hog waits for them instead.
    spare = ray.cluster_resources().get("CPU", 0) - cfg.train.num_workers * cfg.train.cpus_per_worker

    @ray.remote
    class Hog:
        def ready(self) -> bool:
            return True

    hog = Hog.options(num_cpus=spare).remote()  # type: ignore[attr-defined]
    try:
        ray.get(hog.ready.remote(), timeout=120)
        with pytest.raises(DataStallError) as info:
            train(cfg, ingested)
    finally:
        ray.kill(hog)
    text = str(info.value)
    assert "train.stall_timeout_s=20" in text and "0 CPUs free" in text and "train.num_workers" in text, text


# ---------------------------------------------------------------------------------------------------------------------
# Two nodes: a head with 1 CPU and a worker node with 2; one training worker per node, the data path beside the
# worker node's training worker.

STEPS = 40
TRAIN = (
    "generator.num_days=3",
    "generator.impressions_per_day=8000",
    "train.batch_size=256",
    "train.shuffle=none",
    f"train.max_steps={STEPS}",
    "train.checkpoint_every_steps=5",
    "train.placement_strategy=SPREAD",
    "train.max_failures=2",
    PYTHON_ENTRYPOINT,
)


class TwoNodes:
    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.env = clean_env(BARE_PATH)
        self.head, self.gcs, self.dashboard = start_head(log_dir, 1, self.env)
        self.workers: list[RayNode] = []
        self.reference: dict[str, object] = {}
        self.add_worker()

    def add_worker(self) -> RayNode:
        worker = start_worker(self.log_dir, f"worker{len(self.workers)}", self.gcs, self.dashboard, 2, self.env)
        self.workers.append(worker)
        return worker

    def stop(self) -> None:
        for worker in self.workers:
            worker.stop()
        self.head.stop()


@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TwoNodes]:
    cluster = TwoNodes(tmp_path_factory.mktemp("two_nodes"))
    try:
        yield cluster
    finally:
        cluster.stop()


def _wait_for_checkpoint(storage: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(storage.glob("*/checkpoint_manager_snapshot.json")):
            return
        time.sleep(0.5)
    raise TimeoutError(f"no checkpoint under {storage} after {timeout}s")


def _follow(dashboard: str, job_id: str, timeout: float) -> tuple[str, str]:
    from ray.job_submission import JobSubmissionClient

    client = JobSubmissionClient(dashboard)
    deadline = time.monotonic() + timeout
    status = str(client.get_job_status(job_id).value)
    while status not in ("SUCCEEDED", "FAILED", "STOPPED") and time.monotonic() < deadline:
        time.sleep(2)
        status = str(client.get_job_status(job_id).value)
    return status, client.get_job_logs(job_id)


@pytest.mark.slow
def test_two_nodes_train_one_worker_each_evaluate_and_register(two_nodes: TwoNodes, tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient
    from ray.util.state import list_actors

    from pipeline.train import TrainResult

    started = time.monotonic()
    result, logs, _ = _submit(two_nodes.dashboard, "run", _overrides(tmp_path, *TRAIN), ["--generate"])
    took = time.monotonic() - started
    assert result.status == "SUCCEEDED", logs[-4000:]
    trained = TrainResult.load(tmp_path / "train.json")
    assert trained.steps == STEPS and trained.world_size == 2
    assert json.loads((tmp_path / "eval.json").read_text())["metrics"]["ctr"]["auc"] > 0.5
    cfg = small_config(tmp_path, *TRAIN)
    client = MlflowClient(tracking_uri=cfg.tracking_uri(), registry_uri=cfg.tracking_uri())
    assert [str(v.version) for v in client.search_model_versions(f"name='{cfg.mlflow.model_name}'")] == ["1"]
    workers = list_actors(address=two_nodes.dashboard, filters=[("class_name", "=", "RayTrainWorker")], detail=True)
    assert len({w.node_id for w in workers}) == 2, "SPREAD: one training worker per node"
    two_nodes.reference.update(run_dir=tmp_path, steps=trained.steps, samples=trained.samples)
    print(f"two-node run (generate, ingest, train {STEPS} steps, evaluate, register): {took:.0f}s")


def _start_train(two_nodes: TwoNodes, run_dir: Path, *extra: str) -> str:
    reference = two_nodes.reference.get("run_dir")
    if not isinstance(reference, Path):
        pytest.skip("needs the uninterrupted two-node run")
    run_dir.mkdir(parents=True, exist_ok=True)
    shutil.copy(reference / "ingest.json", run_dir / "ingest.json")  # the validated data, paths on shared storage
    result, _, _ = _submit(two_nodes.dashboard, "train", _overrides(run_dir, *TRAIN, *extra), follow=False)
    _wait_for_checkpoint(run_dir / "ray_results", timeout=600)
    return result.job_id


@pytest.mark.slow
def test_lost_worker_node_resumes_on_a_replacement_with_the_same_steps(two_nodes: TwoNodes, tmp_path: Path) -> None:
    from pipeline.train import TrainResult

    job_id = _start_train(two_nodes, tmp_path)
    two_nodes.workers[-1].kill(signal.SIGKILL)  # the machine is gone: raylet, its workers, its read tasks
    two_nodes.add_worker()  # as an autoscaler would
    status, logs = _follow(two_nodes.dashboard, job_id, JOB_TIMEOUT_S)
    assert status == "SUCCEEDED", logs[-4000:]
    resumed = TrainResult.load(tmp_path / "train.json")
    assert resumed.resumed_from_step > 0, "the restarted workers did not resume from a checkpoint"
    assert resumed.steps == two_nodes.reference["steps"] and resumed.samples == two_nodes.reference["samples"]


@pytest.mark.slow
def test_lost_worker_node_without_replacement_fails_after_the_wait(two_nodes: TwoNodes, tmp_path: Path) -> None:
    job_id = _start_train(two_nodes, tmp_path, "train.resource_wait_s=10")
    two_nodes.workers[-1].kill(signal.SIGKILL)
    lost_at = time.monotonic()
    status, logs = _follow(two_nodes.dashboard, job_id, JOB_TIMEOUT_S)
    assert status == "FAILED", logs[-4000:]
    assert "did not get their resources within train.resource_wait_s=10s" in logs, logs[-4000:]
    assert "add a node" in logs
    print(f"failed {time.monotonic() - lost_at:.0f}s after the node was lost")

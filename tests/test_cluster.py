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
from collections.abc import Iterator
from pathlib import Path

import pytest

from jobs.submit import build_entrypoint, missing_package_hint, submit
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
    with pytest.raises(ClusterTooSmallError, match="cannot place the training workers.*STRICT_SPREAD"):
        check_fits(needs(tmp_path, "train.placement_strategy=STRICT_SPREAD"), [node(8)])
    with pytest.raises(ClusterTooSmallError, match="GPU"):
        check_fits(needs(tmp_path, "train.use_gpu=true"), [node(8, gpus=1)])
    with pytest.raises(ClusterTooSmallError, match="cannot place"):
        check_fits(needs(tmp_path, "train.cpus_per_worker=4"), [node(4), node(3), node(2)])
    with pytest.raises(ClusterTooSmallError, match="memory_per_worker_gb"):
        check_fits(needs(tmp_path, "train.sharding.memory_per_worker_gb=6"), [node(8, memory_gib=8)])


def test_local_ray_gets_what_the_run_needs(tmp_path: Path) -> None:
    assert local_cpus(small_config(tmp_path)) == max(os.cpu_count() or 1, 3)
    assert local_cpus(small_config(tmp_path, "train.num_workers=8", "train.data_cpus=2")) == max(os.cpu_count() or 1, 10)


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
